"""Our Decoder against gemma's own Gemma 3, logit for logit.

gemma's `Gemma3_270M` config shrunk to three layers (two sliding with a
window of 4, one global; QK-norm, post-norms, local/global rotary bases
10 000 / 1 000 000), run on 12 tokens so the window matters. Random
weights, scaled so logits reach about 10, go through `from_gemma_params`
one way and `to_gemma_params` the other; both models must give the same
logits to float32 round-off. The real `Gemma3_270M` class checks the tree
layout at full size, and one forward.
"""

import dataclasses

from gemma import gm
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft import models
from peft.models import _gemma_params as gp
from peft.models._config import gemma3_270m
from peft.models._config import tiny_gemma3_config

_A = gm.nn.config.AttentionType
TINY = dataclasses.replace(
    gm.nn.Gemma3_270M.config, num_embed=320, embed_dim=64, hidden_dim=128,
    num_heads=4, head_dim=16, num_kv_heads=2, sliding_window_size=4,
    attention_types=gm.nn.config.make_attention_layers_types(
        (_A.LOCAL_SLIDING, _A.LOCAL_SLIDING, _A.GLOBAL), num_layers=3))
VARIANTS = {
  'gqa': TINY,
  'mqa': dataclasses.replace(TINY, num_kv_heads=1),  # as Gemma 3 270M
  'mha': dataclasses.replace(TINY, num_kv_heads=4),  # gemma's qkv_einsum
  # Gemma 2's options: soft caps, queries scaled by (D / N) ** -0.5 rather
  # than head_dim ** -0.5, the untransposed gating kernel, no QK-norm.
  'gemma2_options': dataclasses.replace(
    TINY, head_dim=32, use_qk_norm=False, attn_logits_soft_cap=50.0,
    final_logit_softcap=30.0, transpose_gating_einsum=False,
    query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation
    .BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS),
}
# Token 0 is gemma's padding id: it would shift gemma's positions.
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 320, (2, 12)),
                     jnp.int32)
# Max |logit difference| over max |logit| (logits reach 8 to 10). Measured:
# 2.8e-7 to 4.5e-7 on the tiny configs in both directions, 1.4e-6 on Gemma 3
# 270M: float32 round-off.
TOL = 1e-5


def _random(shapes, seed, std=0.2, dtype=np.float32):
  """Normal(0, std) leaves; std 0.2 gives logits of magnitude about 10."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: (std * rng.standard_normal(s.shape, np.float32)).astype(dtype),
    shapes)


def _gemma_model(gemma_config, dtype=jnp.float32):
  return gm.nn.Transformer(config=gemma_config, dtype=dtype)


def _gemma_shapes(gemma_config, dtype=jnp.float32):
  model = _gemma_model(gemma_config, dtype)
  return jax.eval_shape(model.init, jax.random.key(0), TOKENS)['params']


def _gemma_logits(gemma_config, params, dtype=jnp.float32):
  logits = _gemma_model(gemma_config, dtype).apply({'params': params}, TOKENS)
  return np.asarray(logits.logits, np.float32)


def _our_logits(config, params, dtype=jnp.float32):
  model = models.Decoder(config=config, dtype=dtype, param_dtype=dtype)
  return np.asarray(jax.jit(model.apply)({'params': params}, TOKENS))


def _layout(tree):
  """Each leaf's (shape, dtype), in the tree's structure."""
  return jax.tree.map(lambda x: (np.shape(x), np.dtype(x.dtype)), tree)


def _assert_logits_match(ours, theirs, tol=TOL):
  scale = np.abs(theirs).max()
  assert scale > 3.0  # the weights are not so small that logits are ~0
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol * scale)


def test_tiny_gemma_config_is_our_tiny_gemma3_config():
  assert gp.decoder_config_from_gemma(TINY, max_len=256) == (
    tiny_gemma3_config())


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_gemma_params_give_our_decoder_gemmas_logits(variant):
  gemma_config = VARIANTS[variant]
  theirs = _random(_gemma_shapes(gemma_config), seed=1)
  config = gp.decoder_config_from_gemma(gemma_config)
  ours = gp.from_gemma_params(
    theirs, config,
    transpose_gating_einsum=gemma_config.transpose_gating_einsum)
  _assert_logits_match(_our_logits(config, ours),
                       _gemma_logits(gemma_config, theirs))


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_our_params_give_gemma_our_logits(variant):
  gemma_config = VARIANTS[variant]
  config = gp.decoder_config_from_gemma(gemma_config)
  shapes = jax.eval_shape(models.Decoder(config=config).init,
                          jax.random.key(0), TOKENS)['params']
  ours = _random(shapes, seed=2)
  theirs = gp.to_gemma_params(
    ours, config,
    transpose_gating_einsum=gemma_config.transpose_gating_einsum)
  assert _layout(theirs) == _layout(_gemma_shapes(gemma_config))
  _assert_logits_match(_our_logits(config, ours),
                       _gemma_logits(gemma_config, theirs))


@pytest.fixture(scope='module')
def gqa_run():
  theirs = _random(_gemma_shapes(TINY), seed=1)
  config = gp.decoder_config_from_gemma(TINY)
  return config, gp.from_gemma_params(theirs, config), _gemma_logits(
    TINY, theirs)


@pytest.mark.parametrize('change', [
  dict(sliding_window=5),  # the boundary: `t - s < window` in both
  dict(sliding_window=3),
  dict(sliding_window=None, sliding_window_pattern=None),
  dict(rope_theta=10_000.0, rope_local_theta=1_000_000.0),  # bases swapped
  dict(rope_local_theta=None),  # sliding layers on the global base
  dict(query_pre_attn_scalar=32.0),
], ids=['window_5', 'window_3', 'no_window', 'bases_swapped',
        'one_base', 'query_scale'])
def test_the_crosscheck_sees_each_convention(gqa_run, change):
  """Each convention above, changed in our config alone, breaks agreement.

  So the agreement of the tests above is not the luck of a weak probe.
  """
  config, ours, theirs = gqa_run
  changed = _our_logits(dataclasses.replace(config, **change), ours)
  assert np.abs(changed - theirs).max() > 1e-2 * np.abs(theirs).max()


def test_bfloat16_params_agree_to_bfloat16_rounding():
  """In bfloat16 gemma also runs its norms in bfloat16, we in float32.

  Both land within a few bfloat16 steps of gemma's float32 logits; measured
  (max difference over max logit): gemma 8.2e-3, ours 6.5e-3, apart 1.1e-2.
  """
  theirs = _random(_gemma_shapes(TINY, jnp.bfloat16), seed=1,
                   dtype=jnp.bfloat16)
  config = gp.decoder_config_from_gemma(TINY)
  ours = gp.from_gemma_params(theirs, config)
  assert {x.dtype for x in jax.tree.leaves(ours)} == {jnp.dtype('bfloat16')}
  reference = _gemma_logits(TINY, jax.tree.map(
    lambda x: x.astype(np.float32), theirs))
  ours_bf16 = _our_logits(config, ours, jnp.bfloat16)
  gemma_bf16 = _gemma_logits(TINY, theirs, jnp.bfloat16)
  _assert_logits_match(ours_bf16, reference, tol=3e-2)
  _assert_logits_match(gemma_bf16, reference, tol=3e-2)
  _assert_logits_match(ours_bf16, gemma_bf16, tol=3e-2)


# The real Gemma3_270M class definition (262 144-token vocabulary).


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32],
                         ids=['bfloat16', 'float32'])
def test_gemma3_270m_tree_is_ours_converted(dtype):
  model = gm.nn.Gemma3_270M(dtype=dtype)
  config = gp.decoder_config_from_gemma(model.config)
  assert config == gemma3_270m()
  theirs = jax.eval_shape(model.init, jax.random.key(0), TOKENS)['params']
  ours = jax.eval_shape(
    models.Decoder(config=config, param_dtype=dtype).init,
    jax.random.key(0), TOKENS)['params']
  # Same structure, shapes and dtypes, both ways.
  assert _layout(jax.eval_shape(lambda p: gp.to_gemma_params(p, config),
                                ours)) == _layout(theirs)
  assert _layout(jax.eval_shape(lambda p: gp.from_gemma_params(p, config),
                                theirs)) == _layout(ours)


def test_gemma3_270m_forward_matches():
  """One float32 forward of the full-size model (about 20 s on 2 cores)."""
  model = gm.nn.Gemma3_270M(dtype=jnp.float32)
  config = gp.decoder_config_from_gemma(model.config)
  tokens = jnp.asarray(
    np.random.default_rng(3).integers(1, config.vocab_size, (1, 12)),
    jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  theirs = _random(shapes, seed=4, std=0.05)  # D = 640: logits about 8
  expected = np.asarray(model.apply({'params': theirs}, tokens).logits)
  ours = gp.from_gemma_params(theirs, config)
  got = np.asarray(jax.jit(models.Decoder(config=config).apply)(
    {'params': ours}, tokens))
  _assert_logits_match(got, expected)
