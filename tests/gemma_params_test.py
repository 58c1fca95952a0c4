"""Our Decoder params <-> gemma's param tree, without gemma installed.

tests/integration/gemma3_crosscheck_test.py runs both models on the
converted trees; here the conversion's layout, round trips and errors.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from peft import models
from peft.models import _gemma_params as gp
from peft.models._config import gemma3_270m
from peft.models._config import tiny_gemma3_config
from tests.helpers import assert_trees_close

TOKENS = jnp.ones((1, 4), jnp.int32)


def _our_tree(config, dtype=np.float32, seed=0):
  """A Decoder params tree of `config` with a distinct random value per leaf.

  Random norm scales too (init gives zeros), so a swapped pair of norms
  would not round-trip.
  """
  shapes = jax.eval_shape(models.Decoder(config=config).init,
                          jax.random.key(0), TOKENS)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(dtype), shapes)


def _flat(tree):
  return {'/'.join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _deleted(tree, path):
  tree = jax.tree.map(lambda x: x, tree)
  *keys, last = path.split('/')
  node = tree
  for key in keys:
    node = node[key]
  del node[last]
  return tree


def _replaced(tree, path, value):
  tree = jax.tree.map(lambda x: x, tree)
  *keys, last = path.split('/')
  node = tree
  for key in keys:
    node = node[key]
  node[last] = value
  return tree


@pytest.mark.parametrize('n_kv_heads', [1, 2, 4])
@pytest.mark.parametrize('transpose', [True, False])
def test_round_trip_is_exact(n_kv_heads, transpose):
  cfg = tiny_gemma3_config(n_kv_heads=n_kv_heads)
  ours = _our_tree(cfg)
  theirs = gp.to_gemma_params(ours, cfg, transpose_gating_einsum=transpose)
  back = gp.from_gemma_params(theirs, cfg, transpose_gating_einsum=transpose)
  assert_trees_close(back, ours)  # exact: rtol = atol = 0, same dtypes


def test_round_trip_keeps_bfloat16():
  cfg = tiny_gemma3_config()
  ours = _our_tree(cfg, dtype=ml_dtypes.bfloat16)
  theirs = gp.to_gemma_params(ours, cfg)
  assert {np.asarray(x).dtype for x in jax.tree.leaves(theirs)} == {
      np.dtype(ml_dtypes.bfloat16)}
  assert_trees_close(gp.from_gemma_params(theirs, cfg), ours)


def test_gemma_tree_layout_by_value():
  cfg = tiny_gemma3_config()  # 4 query heads, 2 key/value heads
  ours = _our_tree(cfg)
  theirs = gp.to_gemma_params(ours, cfg)
  assert {k: np.shape(v) for k, v in _flat(theirs).items()} == (
      gp.gemma_shapes(cfg))
  np.testing.assert_array_equal(theirs['embedder']['input_embedding'],
                                ours['embedder']['embedding'])
  for i in range(cfg.n_layers):
    o, t = ours[f'layers_{i}'], theirs[f'layer_{i}']
    for c in range(2):  # gemma 3: (2, F, D), ours (2, D, F)
      np.testing.assert_array_equal(t['mlp']['gating_einsum'][c],
                                    o['mlp']['gating_einsum'][c].T)
    for name in ('pre_attention_norm', 'post_attention_norm', 'pre_ffw_norm',
                 'post_ffw_norm'):
      np.testing.assert_array_equal(t[name]['scale'], o[name]['scale'])
    for name in ('_query_norm', '_key_norm'):
      np.testing.assert_array_equal(t['attn'][name]['scale'],
                                    o['attn'][name]['scale'])
    np.testing.assert_array_equal(t['attn']['kv_einsum']['w'],
                                  o['attn']['kv_einsum']['w'])


def test_full_multi_head_stacks_q_k_v_as_gemmas_qkv_einsum():
  cfg = tiny_gemma3_config(n_kv_heads=4)
  ours = _our_tree(cfg)
  attn = gp.to_gemma_params(ours, cfg)['layer_1']['attn']
  assert 'q_einsum' not in attn and 'kv_einsum' not in attn
  qkv = attn['qkv_einsum']['w']
  assert qkv.shape == (3, 4, 64, 16)
  np.testing.assert_array_equal(qkv[0], ours['layers_1']['attn']['q_einsum'][
      'w'])
  np.testing.assert_array_equal(qkv[1:], ours['layers_1']['attn'][
      'kv_einsum']['w'])


def test_untransposed_gating_keeps_our_layout():
  cfg = tiny_gemma3_config()
  ours = _our_tree(cfg)
  theirs = gp.to_gemma_params(ours, cfg, transpose_gating_einsum=False)
  np.testing.assert_array_equal(theirs['layer_0']['mlp']['gating_einsum'],
                                ours['layers_0']['mlp']['gating_einsum'])


def test_without_qk_and_post_norms():
  cfg = tiny_gemma3_config(qk_norm=False, post_norms=False)
  shapes = gp.gemma_shapes(cfg)
  assert 'layer_0/attn/_query_norm/scale' not in shapes
  assert 'layer_0/post_ffw_norm/scale' not in shapes
  ours = _our_tree(cfg)
  assert_trees_close(gp.from_gemma_params(gp.to_gemma_params(ours, cfg), cfg),
                     ours)


def test_gemma3_270m_shapes_and_eval_shape_conversion():
  cfg = gemma3_270m()
  shapes = gp.gemma_shapes(cfg)
  assert shapes['layer_17/attn/kv_einsum/w'] == (2, 1, 640, 256)
  assert shapes['layer_0/mlp/gating_einsum'] == (2, 2048, 640)
  assert len(shapes) == 2 + 18 * 11
  ours = jax.eval_shape(models.Decoder(config=cfg).init, jax.random.key(0),
                        TOKENS)['params']
  theirs = jax.eval_shape(lambda p: gp.to_gemma_params(p, cfg), ours)
  assert {k: v.shape for k, v in _flat(theirs).items()} == shapes


# Errors.


@pytest.fixture(scope='module')
def trees():
  cfg = tiny_gemma3_config()
  ours = _our_tree(cfg)
  return cfg, ours, gp.to_gemma_params(ours, cfg)


def test_missing_leaf_names_path_and_shape(trees):
  cfg, ours, theirs = trees
  with pytest.raises(ValueError, match=(
      r"our Decoder params lack 'layers_1/attn/_key_norm/scale' \(shape "
      r"\(16,\)\): no '_key_norm' under 'layers_1/attn'.*Pass the params")):
    gp.to_gemma_params(_deleted(ours, 'layers_1/attn/_key_norm'), cfg)
  with pytest.raises(ValueError, match=(
      r"gemma's params lack 'layer_2/mlp/linear' \(shape \(128, 64\)\): no "
      r"'linear' under 'layer_2/mlp'.*Pass the params tree of gemma")):
    gp.from_gemma_params(_deleted(theirs, 'layer_2/mlp/linear'), cfg)


def test_a_config_with_more_layers_names_the_first_missing_one(trees):
  cfg, ours, _ = trees
  with pytest.raises(ValueError, match=(
      r"lack 'layers_3/pre_attention_norm/scale'.*no 'layers_3' under "
      r"'the root', which has \['embedder', 'final_norm', 'layers_0'")):
    gp.to_gemma_params(ours, dataclasses.replace(cfg, n_layers=4))


def test_a_leaf_where_a_dict_belongs_is_named(trees):
  cfg, _, theirs = trees
  bad = _replaced(theirs, 'layer_0/attn', np.zeros(3))
  with pytest.raises(ValueError, match=(
      r"no '_query_norm' under 'layer_0/attn', which is a ndarray, not a "
      r'dict')):
    gp.from_gemma_params(bad, cfg)


def test_wrong_shape_names_path_and_both_shapes(trees):
  cfg, ours, theirs = trees
  bad = _replaced(ours, 'layers_0/attn/q_einsum/w', np.zeros((4, 64, 8)))
  with pytest.raises(ValueError, match=(
      r"our Decoder params 'layers_0/attn/q_einsum/w' has shape \(4, 64, "
      r"8\), but the config needs \(4, 64, 16\)\. Pass the params")):
    gp.to_gemma_params(bad, cfg)
  bad = _replaced(theirs, 'embedder/input_embedding', np.zeros((32, 64)))
  with pytest.raises(ValueError, match=(
      r"gemma's params 'embedder/input_embedding' has shape \(32, 64\), but "
      r"the config needs \(320, 64\)")):
    gp.from_gemma_params(bad, cfg)


@pytest.mark.parametrize('transpose', [True, False])
def test_other_gating_layout_says_which_flag_to_pass(trees, transpose):
  cfg, ours, _ = trees
  theirs = gp.to_gemma_params(ours, cfg, transpose_gating_einsum=transpose)
  with pytest.raises(ValueError, match=(
      r"'layer_0/mlp/gating_einsum' has shape .*other layout of "
      f'gating_einsum: pass transpose_gating_einsum={transpose}')):
    gp.from_gemma_params(theirs, cfg, transpose_gating_einsum=not transpose)


def test_extra_leaves_are_refused(trees):
  cfg, ours, theirs = trees
  lora = _replaced(ours, 'layers_0/attn/q_einsum/lora_a', np.zeros((64, 2)))
  with pytest.raises(ValueError, match=(
      r"our Decoder params hold 1 leaf\(s\) that gemma's tree of this config "
      r"has no place for, e.g. \['layers_0/attn/q_einsum/lora_a'\]\. .*"
      r'peft.split_params')):
    gp.to_gemma_params(lora, cfg)
  vision = {**theirs, 'vision_encoder': {'w': np.zeros(3)}}
  with pytest.raises(ValueError, match=(
      r"gemma's params hold 1 leaf\(s\) that the Decoder tree of this config "
      r"has no place for, e.g. \['vision_encoder/w'\]")):
    gp.from_gemma_params(vision, cfg)
  more_layers = {**theirs, 'layer_3': theirs['layer_2']}
  with pytest.raises(ValueError, match=r"no place for, e.g. \['layer_3/"):
    gp.from_gemma_params(more_layers, cfg)


def test_params_wrapper_and_non_dict_are_refused(trees):
  cfg, ours, theirs = trees
  with pytest.raises(ValueError, match=(
      r"our Decoder params are wrapped in \{'params': \.\.\.\}.*Pass "
      r"tree\['params'\]")):
    gp.to_gemma_params({'params': ours}, cfg)
  with pytest.raises(ValueError, match=r"gemma's params are wrapped in"):
    gp.from_gemma_params({'params': theirs}, cfg)
  with pytest.raises(TypeError, match=(
      r'our Decoder params must be a nested dict of arrays; got list')):
    gp.to_gemma_params([1, 2], cfg)


@pytest.mark.parametrize('field,value', [
    ('tie_embeddings', False),
    ('scale_embeddings', False),
    ('norm_add_one', False),
    ('norm_eps', 1e-5),
    ('activation', 'silu'),
])
def test_configs_gemma_cannot_run_are_refused(trees, field, value):
  cfg, ours, theirs = trees
  bad = dataclasses.replace(cfg, **{field: value})
  message = (f"to_gemma_params: gemma's Transformer always runs {field}="
             f'.*but the config has {field}={value!r}.*params_to_hf')
  with pytest.raises(ValueError, match=message):
    gp.to_gemma_params(ours, bad)
  with pytest.raises(ValueError, match=f'from_gemma_params: .*{field}'):
    gp.from_gemma_params(theirs, bad)
  with pytest.raises(ValueError, match=f'gemma_shapes: .*{field}'):
    gp.gemma_shapes(bad)


def test_non_config_is_refused(trees):
  _, ours, _ = trees
  with pytest.raises(TypeError, match=(
      r"to_gemma_params needs a DecoderConfig; got \{'d_model': 64\}")):
    gp.to_gemma_params(ours, {'d_model': 64})


# decoder_config_from_gemma, on stand-ins with gemma's attribute names.


def _gemma_like(**overrides):
  """What gemma's tiny Gemma 3 TransformerConfig reads like."""
  fields = dict(
      num_embed=320, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16,
      num_kv_heads=2, final_logit_softcap=None, use_post_attn_norm=True,
      use_post_ffw_norm=True, use_qk_norm=True,
      attention_types=['LOCAL_SLIDING', 'LOCAL_SLIDING', 'GLOBAL'],
      query_pre_attn_scalar=lambda: 16 ** -0.5, attn_logits_soft_cap=None,
      sliding_window_size=4, local_base_frequency=10_000,
      global_base_frequency=1_000_000, local_scale_factor=1.0,
      global_scale_factor=1.0, vision_encoder=None)
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def test_decoder_config_from_gemma_matches_ours():
  got = gp.decoder_config_from_gemma(_gemma_like(), max_len=256)
  assert got == tiny_gemma3_config()


def test_decoder_config_from_gemma_enum_members_and_patterns():
  kind = types.SimpleNamespace
  sliding, full = kind(name='LOCAL_SLIDING'), kind(name='GLOBAL')
  got = gp.decoder_config_from_gemma(
      _gemma_like(attention_types=[sliding, full] * 2))
  assert got.sliding_window_pattern == 2 and got.n_layers == 4
  every = gp.decoder_config_from_gemma(
      _gemma_like(attention_types=[sliding] * 3))
  assert (every.sliding_window, every.sliding_window_pattern) == (4, None)
  glob = gp.decoder_config_from_gemma(_gemma_like(attention_types=[full] * 2))
  assert (glob.sliding_window, glob.rope_local_theta) == (None, None)
  assert [glob.rope_base(i) for i in range(2)] == [1e6, 1e6]


def test_decoder_config_from_gemma_query_scale_equals_gemmas():
  # Gemma 2 27B: queries times (embed_dim // num_heads) ** -0.5, not
  # head_dim ** -0.5.
  like = _gemma_like(head_dim=32, query_pre_attn_scalar=lambda: 16 ** -0.5,
                     attn_logits_soft_cap=50.0, final_logit_softcap=30.0)
  got = gp.decoder_config_from_gemma(like)
  assert got.query_pre_attn_scalar == 16.0
  assert got.query_scale == 0.25
  assert (got.attn_logit_softcap, got.final_logit_softcap) == (50.0, 30.0)
  odd = gp.decoder_config_from_gemma(
      _gemma_like(query_pre_attn_scalar=lambda: 0.3))
  np.testing.assert_allclose(odd.query_scale, 0.3, rtol=1e-15)


@pytest.mark.parametrize('overrides,message', [
    (dict(vision_encoder=object()),
     r'has a vision_encoder; the reference decoder is text only\. Pass '
     r'dataclasses\.replace\(config, vision_encoder=None\)'),
    (dict(global_scale_factor=8.0),
     r'global_scale_factor=8\.0: a scaled rope.*such as 270M or 1B'),
    (dict(use_post_ffw_norm=False),
     r'use_post_attn_norm=True but use_post_ffw_norm=False.*Set them equal'),
    (dict(attention_types=['LOCAL_SLIDING', 'BIDIRECTIONAL']),
     r"attention_types=\['LOCAL_SLIDING', 'BIDIRECTIONAL'\]; each must be "
     r"'LOCAL_SLIDING' or 'GLOBAL'"),
    (dict(attention_types=['LOCAL_SLIDING', 'GLOBAL', 'GLOBAL']),
     r'global layers at \[1, 2\], which is not every N-th layer'),
    (dict(sliding_window_size=None),
     r'sliding layers .* but sliding_window_size=None\. Set '
     r'sliding_window_size'),
    (dict(query_pre_attn_scalar=lambda: 0.0),
     r'query_pre_attn_scalar\(\) is 0\.0; a query scale must be a positive'),
])
def test_decoder_config_from_gemma_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    gp.decoder_config_from_gemma(_gemma_like(**overrides))


def test_decoder_config_from_gemma_missing_attribute():
  like = _gemma_like()
  del like.use_qk_norm
  with pytest.raises(ValueError, match=(
      r"gemma_config lacks 'use_qk_norm' \(got a SimpleNamespace\)\. Pass "
      r"gemma's TransformerConfig")):
    gp.decoder_config_from_gemma(like)
