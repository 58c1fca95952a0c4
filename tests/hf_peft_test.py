"""Hugging Face PEFT adapters in and out, against a fixture torch made.

tests/testdata/hf_peft was made by real HF PEFT 0.21 + transformers 5.23 on
SmolLM2-135M (make_fixture.py there says how): rank 4 on all seven
projection types of layers 0, 1 and 29, `rank_pattern` o_proj 2,
`alpha_pattern` down_proj 16, random non-zero B, and the logits torch gives
for a fixed prompt with and without the adapter. Two DoRA adapters
(`use_dora=True`, magnitudes moved off their start) with their logits: all
seven projections of layers 0 and 29 with `rank_pattern` v_proj 2, and
HF's usual q/v-only choice with rsLoRA.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import peft
from peft import models

FIXTURE = pathlib.Path(__file__).parent / 'testdata' / 'hf_peft'
ADAPTER = FIXTURE / 'adapter'
PROJECTIONS = ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj',
               'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj',
               'mlp.down_proj')


@pytest.fixture(scope='module')
def smollm2():
  return models.load_smollm2()


@pytest.fixture(scope='module')
def logits():
  return np.load(FIXTURE / 'logits.npz')


@pytest.fixture(scope='module')
def loaded(smollm2):
  return models.load_hf_peft(ADAPTER, smollm2.config)


def _forward(pretrained, params, tokens):
  n = 4096  # the fixture keeps the leading 4096 vocabulary logits
  return np.asarray(pretrained.model.apply({'params': params}, tokens)
                    [0, :, :n])


def test_the_fixture_adapter_changes_the_logits(logits):
  # Otherwise a loader that dropped the adapter would pass.
  assert np.abs(logits['adapted'] - logits['base']).max() > 1.0


def test_loaded_adapter_reproduces_torch_logits_fused_and_under_surgery(
    smollm2, logits, loaded):
  tokens = jnp.asarray(logits['prompt'])[None]
  np.testing.assert_allclose(_forward(smollm2, smollm2.params, tokens),
                             logits['base'], atol=1e-4)
  params = peft.merge_params(smollm2.params, loaded.lora)
  fused = peft.fuse_params(params, loaded.specs)
  np.testing.assert_allclose(_forward(smollm2, fused, tokens),
                             logits['adapted'], atol=1e-4)
  with peft.lora(rules=loaded.rules) as report:
    adapted = _forward(smollm2, params, tokens)
  np.testing.assert_allclose(adapted, logits['adapted'], atol=1e-4)
  assert report.specs == loaded.specs


def test_specs_follow_rank_and_alpha_patterns_and_block_form(loaded):
  by_key = {s.key: s for s in loaded.specs}
  assert len(by_key) == 15  # 5 of our kernels on each of 3 layers
  q = by_key['layers_0/attn/q_einsum/lora_w']
  o = by_key['layers_0/attn/attn_vec_einsum/lora_w']
  down = by_key['layers_29/mlp/lora_linear']
  kv = by_key['layers_1/attn/kv_einsum/lora_w']
  assert (q.rank, q.scale) == (4, 2.0)   # lora_alpha 8 / r 4
  assert (o.rank, o.scale) == (2, 4.0)   # rank_pattern o_proj: 2
  assert (down.rank, down.scale) == (4, 4.0)  # alpha_pattern down_proj: 16
  assert (kv.rank, kv.scale) == (8, 2.0)  # k and v, rank 4 each, in blocks
  b = np.asarray(loaded.lora['layers_1']['attn']['kv_einsum']['lora_w']['b'])
  assert b.shape == (8, 2, 3, 64)
  assert not b[4:, 0].any() and not b[:4, 1].any()  # the zero blocks
  hf = safetensors.numpy.load_file(ADAPTER / 'adapter_model.safetensors')
  v_b = hf['base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight']
  np.testing.assert_array_equal(b[4:, 1].reshape(4, -1).T, v_b)


def test_round_trip_gives_the_same_tensors_and_config(loaded, tmp_path):
  written = models.save_hf_peft(tmp_path, loaded.lora, loaded.specs,
                                hf_config=loaded.hf_config)
  original = json.loads((ADAPTER / 'adapter_config.json').read_text())
  assert written == original
  assert json.loads((tmp_path / 'adapter_config.json').read_text()) == (
      original)
  want = safetensors.numpy.load_file(ADAPTER / 'adapter_model.safetensors')
  got = safetensors.numpy.load_file(tmp_path / 'adapter_model.safetensors')
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def _random_adapters(pretrained, rank, targets):
  tokens = jnp.ones((1, 2), jnp.int32)
  with peft.lora(rank=rank, alpha=6.0, targets=targets) as report:
    shapes = jax.eval_shape(pretrained.model.init, jax.random.key(0),
                            tokens)['params']
  lora = peft.split_params(shapes).lora
  leaves, tree = jax.tree.flatten(lora)
  rng = np.random.default_rng(0)
  lora = jax.tree.unflatten(tree, [
      jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32)
      for x in leaves])
  return lora, report.specs


def _fused_delta(pretrained, lora, specs):
  fused = peft.fuse_params(peft.merge_params(pretrained.params, lora), specs)
  return jax.tree.map(lambda f, b: np.asarray(f - b), fused,
                      pretrained.params)


def test_exporting_our_own_adapters_matches_the_hf_schema(smollm2, tmp_path):
  # Shared-A stacked adapters (k/v, gate/up) become two HF adapters that
  # share A; the torch-side check (make_fixture.py check-adapter) matched
  # logits to 7e-5 by hand, see the docs. Here: the keys, shapes and config
  # fields of the fixture's schema, and a reload giving the same deltas.
  lora, specs = _random_adapters(smollm2, 3, 'layers_(0|5)/.*')
  config = models.save_hf_peft(tmp_path, lora, specs)
  got = safetensors.numpy.load_file(tmp_path / 'adapter_model.safetensors')
  want = safetensors.numpy.load_file(ADAPTER / 'adapter_model.safetensors')
  shape_of = {n.replace('layers.1.', 'layers.N.'): v.shape
              for n, v in want.items() if '.layers.1.' in n}
  assert len(got) == 2 * 2 * len(PROJECTIONS)
  for name, value in got.items():
    generic = name.replace('layers.0.', 'layers.N.').replace(
        'layers.5.', 'layers.N.')
    expected = shape_of[generic]
    rank_axis = 0 if name.endswith('lora_A.weight') else 1
    assert value.shape[1 - rank_axis] == expected[1 - rank_axis], name
    assert value.shape[rank_axis] == 3, name
  fixture_config = json.loads((ADAPTER / 'adapter_config.json').read_text())
  for field in ('peft_type', 'task_type', 'bias', 'fan_in_fan_out',
                'use_rslora', 'modules_to_save'):
    assert config[field] == fixture_config[field], field
  assert (config['r'], config['lora_alpha']) == (3, 6.0)
  assert config['rank_pattern'] == {} and config['alpha_pattern'] == {}
  # Back in, the shared A is recognised: the same adapters, bit for bit.
  reloaded = models.load_hf_peft(tmp_path, smollm2.config)
  assert {s.key: s for s in reloaded.specs} == {s.key: s for s in specs}
  jax.tree.map(np.testing.assert_array_equal, reloaded.lora, lora)


def test_a_trained_block_form_exports_exactly_at_full_rank(
    smollm2, loaded, tmp_path):
  # Training fills the zero blocks; the export then writes k and v with
  # the shared A at rank 8, which is the same update.
  lora = jax.tree.map(lambda x: x + 0.01, loaded.lora)
  config = models.save_hf_peft(tmp_path, lora, loaded.specs,
                               hf_config=loaded.hf_config)
  got = safetensors.numpy.load_file(tmp_path / 'adapter_model.safetensors')
  k_a = got['base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight']
  assert k_a.shape == (8, 576)
  assert config['rank_pattern'][r'model\.layers\.0\.self_attn\.k_proj'] == 8
  assert config['rank_pattern']['o_proj'] == 2  # the original pattern stays
  reloaded = models.load_hf_peft(tmp_path, smollm2.config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               _fused_delta(smollm2, reloaded.lora, reloaded.specs),
               _fused_delta(smollm2, lora, loaded.specs))


def _copy_with_config(tmp_path, **changes):
  target = tmp_path / 'adapter'
  shutil.copytree(ADAPTER, target)
  config = json.loads((target / 'adapter_config.json').read_text())
  config.update(changes)
  (target / 'adapter_config.json').write_text(json.dumps(config))
  return target


@pytest.mark.parametrize('changes, match', [
    (dict(use_dora=True), r"the config sets use_dora=True but "
   r"model\.layers\.0\.mlp\.down_proj has no lora_magnitude_vector"),
  (dict(use_dora='yes'), r"use_dora='yes' is not a bool"),
    (dict(peft_type='IA3'), r"peft_type is 'IA3'.*Only LoRA"),
    (dict(bias='all'), r"bias='all' trains biases"),
    (dict(modules_to_save=['lm_head']), r"modules_to_save=\['lm_head'\]"),
    (dict(r=8), r'model\.layers\.0\.mlp\.down_proj has rank 4 but the '
     r'config says 8'),
    (dict(lora_alpha='eight'), r"lora_alpha='eight' is not a positive"),
])
def test_unsupported_or_inconsistent_configs_name_the_field(
    smollm2, tmp_path, changes, match):
  with pytest.raises(ValueError, match=match):
    models.load_hf_peft(_copy_with_config(tmp_path, **changes),
                        smollm2.config)


def test_bad_directories_and_tensors_are_clear_errors(smollm2, tmp_path):
  with pytest.raises(FileNotFoundError, match='has no adapter_config.json'):
    models.load_hf_peft(tmp_path, smollm2.config)
  target = _copy_with_config(tmp_path)
  tensors = safetensors.numpy.load_file(target / 'adapter_model.safetensors')
  tensors['base_model.model.model.embed_tokens.lora_embedding_A'] = (
      np.zeros((4, 8), np.float32))
  safetensors.numpy.save_file(tensors, target / 'adapter_model.safetensors')
  with pytest.raises(ValueError, match=r"lora_embedding_A' is an embedding "
                     'LoRA'):
    models.load_hf_peft(target, smollm2.config)
  (target / 'adapter_model.safetensors').write_bytes(b'\x10\x00')
  with pytest.raises(ValueError, match='truncated or corrupt'):
    models.load_hf_peft(target, smollm2.config)
  small = models.tiny_config()
  with pytest.raises(ValueError, match='is for layer 29 but the model has 2'):
    models.load_hf_peft(ADAPTER, small)


def test_exporting_an_adapter_on_another_module_is_refused(tmp_path):
  spec = peft.AdapterSpec(
      path=('encoder', 'proj'), layer_type='Dense', weight_name='kernel',
      adapter_name='lora', weight_shape=(4, 3), a_shape=(4, 2),
      b_shape=(2, 3), delta_str='ir,ro->io', rank=2)
  lora = {'encoder': {'proj': {'lora': {'a': jnp.ones((4, 2)),
                                        'b': jnp.ones((2, 3))}}}}
  with pytest.raises(ValueError, match=r"'encoder/proj/lora' is not on a "
                     'projection of the reference decoder'):
    models.save_hf_peft(tmp_path, lora, [spec])


# What transformers 5.23 writes when it re-saves SmolLM2's config.json: the
# rope under `rope_parameters`, no top-level `rope_theta`.
TRANSFORMERS_5_CONFIG = {
    'architectures': ['LlamaForCausalLM'], 'attention_bias': False,
    'bos_token_id': 1, 'eos_token_id': 2, 'head_dim': 64,
    'hidden_act': 'silu', 'hidden_size': 576, 'intermediate_size': 1536,
    'max_position_embeddings': 8192, 'mlp_bias': False,
    'model_type': 'llama', 'num_attention_heads': 9,
    'num_hidden_layers': 30, 'num_key_value_heads': 3,
    'rms_norm_eps': 1e-05,
    'rope_parameters': {'rope_theta': 100000.0, 'rope_type': 'default'},
    'tie_word_embeddings': True, 'vocab_size': 49152}


def test_a_transformers_5_config_keeps_its_rope_theta():
  config = models.DecoderConfig.from_hf_config(TRANSFORMERS_5_CONFIG)
  assert config.rope_theta == 100000.0
  assert config == models.DecoderConfig.from_hf_config(
      models.smollm2_135m().to_hf_config())


@pytest.mark.parametrize('changes, match', [
    (dict(rope_parameters={'rope_type': 'linear', 'factor': 2.0,
                           'rope_theta': 1e4}),
     r"rope_parameters=.*'linear'.*a linear rope"),
    (dict(rope_scaling={'type': 'dynamic', 'factor': 2.0}),
     r'rope_scaling=.*a dynamic rope'),
    (dict(rope_parameters={'full_attention': {'rope_type': 'default'}}),
     r'rope_parameters=.*per-layer rope'),
    (dict(rope_theta=10000.0), r"two rotary bases: \{'rope_theta': 10000\.0,"
     r" 'rope_parameters\.rope_theta': 100000\.0\}"),
])
def test_a_rope_the_decoder_cannot_run_is_refused(changes, match):
  with pytest.raises(ValueError, match=match):
    models.DecoderConfig.from_hf_config({**TRANSFORMERS_5_CONFIG, **changes})


def test_load_adapters_recognises_an_hf_peft_file_and_says_how_to_load_it():
  for path in (ADAPTER / 'adapter_model.safetensors', ADAPTER):
    with pytest.raises(ValueError, match=(
        r'is a Hugging Face PEFT adapter, not a peft adapter file\. Load its '
        r"directory with peft\.models\.load_hf_peft\('.*adapter', config\)")):
      peft.load_adapters(path)


def test_fan_in_fan_out_is_ignored_with_a_warning_as_hf_peft_does(
    smollm2, loaded, tmp_path):
  with pytest.warns(UserWarning, match='fan_in_fan_out=True, which is for '
                    'Conv1D'):
    again = models.load_hf_peft(
        _copy_with_config(tmp_path, fan_in_fan_out=True), smollm2.config)
  jax.tree.map(np.testing.assert_array_equal, again.lora, loaded.lora)


DORA = FIXTURE / 'adapter_dora'
DORA_QV = FIXTURE / 'adapter_dora_qv'


@pytest.fixture(scope='module')
def dora_logits():
  return np.load(FIXTURE / 'logits_dora.npz')


def _torch_logits_match(smollm2, loaded, want):
  """Under surgery and fused, our logits are torch's (to 2e-4: DoRA's norm
  adds float32 reductions that torch orders differently)."""
  tokens = jnp.asarray(np.load(FIXTURE / 'logits_dora.npz')['prompt'])[None]
  params = peft.merge_params(smollm2.params, loaded.lora)
  with peft.lora(rules=loaded.rules) as report:
    adapted = _forward(smollm2, params, tokens)
  assert report.specs == loaded.specs
  np.testing.assert_allclose(adapted, want, atol=2e-4)
  fused = peft.fuse_params(params, loaded.specs)
  np.testing.assert_allclose(_forward(smollm2, fused, tokens), want,
                             atol=2e-4)


def test_an_hf_dora_adapter_reproduces_torch_logits(smollm2, dora_logits,
                                                    logits):
  assert np.abs(dora_logits['adapted'] - logits['base']).max() > 1.0
  loaded = models.load_hf_peft(DORA, smollm2.config)
  by_key = {s.key: s for s in loaded.specs}
  assert len(by_key) == 10 and all(s.use_dora for s in loaded.specs)
  kv = by_key['layers_0/attn/kv_einsum/lora_w']
  assert (kv.rank, kv.magnitude_shape) == (6, (2, 3, 64))  # k 4 + v 2
  hf = safetensors.numpy.load_file(DORA / 'adapter_model.safetensors')
  m = np.asarray(loaded.lora['layers_0']['attn']['kv_einsum']['lora_w']['m'])
  prefix = 'base_model.model.model.layers.0.self_attn.'
  np.testing.assert_array_equal(
      m[1], hf[prefix + 'v_proj.lora_magnitude_vector'].reshape(3, 64))
  _torch_logits_match(smollm2, loaded, dora_logits['adapted'])


def test_dora_on_half_a_stacked_kernel_takes_its_norm_from_the_base(
    smollm2, dora_logits):
  with pytest.raises(ValueError, match=r"DoRA adapts "
                     r"\['model\.layers\.0\.self_attn\.v_proj'\] but not the "
                     r"other half of 'layers_0/attn/kv_einsum/lora_w'.*Pass "
                     r"the base params: load_hf_peft\(directory, config, "
                     r"params=params\)"):
    models.load_hf_peft(DORA_QV, smollm2.config)
  loaded = models.load_hf_peft(DORA_QV, smollm2.config,
                               params=smollm2.params)
  assert [s.use_rslora for s in loaded.specs] == [True] * 4
  # k has no HF adapter: its m is ||W_k|| over D, so k computes as before.
  w_k = np.asarray(smollm2.params['layers_0']['attn']['kv_einsum']['w'][0],
                   np.float64)  # (K, D, H)
  m = loaded.lora['layers_0']['attn']['kv_einsum']['lora_w']['m']
  np.testing.assert_allclose(m[0], np.sqrt((w_k ** 2).sum(axis=1)),
                             rtol=1e-6)
  _torch_logits_match(smollm2, loaded, dora_logits['adapted_qv'])


def test_an_hf_dora_adapter_round_trips_to_the_same_tensors_and_config(
    smollm2, tmp_path):
  loaded = models.load_hf_peft(DORA, smollm2.config)
  written = models.save_hf_peft(tmp_path, loaded.lora, loaded.specs,
                                hf_config=loaded.hf_config)
  assert written == json.loads((DORA / 'adapter_config.json').read_text())
  want = safetensors.numpy.load_file(DORA / 'adapter_model.safetensors')
  got = safetensors.numpy.load_file(tmp_path / 'adapter_model.safetensors')
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_our_dora_adapters_export_and_reload(smollm2, tmp_path):
  tokens = jnp.ones((1, 2), jnp.int32)
  with peft.lora(rank=3, alpha=6.0, targets='layers_(0|5)/.*',
                 use_dora=True) as report:
    shapes = jax.eval_shape(smollm2.model.init, jax.random.key(0),
                            tokens)['params']
  lora = peft.split_params(shapes).lora
  rng = np.random.default_rng(0)
  lora = jax.tree.map(
      lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype),
      lora)
  params = peft.init_dora_magnitudes(
      peft.merge_params(smollm2.params, lora), report.specs)
  lora = peft.split_params(params).lora
  config = models.save_hf_peft(tmp_path, lora, report.specs)
  assert config['use_dora'] is True
  got = safetensors.numpy.load_file(tmp_path / 'adapter_model.safetensors')
  name = 'base_model.model.model.layers.5.self_attn.k_proj.'
  assert got[name + 'lora_magnitude_vector'].shape == (192,)  # 3 heads x 64
  reloaded = models.load_hf_peft(tmp_path, smollm2.config)
  assert {s.key: s for s in reloaded.specs} == {s.key: s
                                                for s in report.specs}
  jax.tree.map(np.testing.assert_array_equal, reloaded.lora, lora)


def test_dora_file_errors_name_the_projection_and_the_fix(smollm2, tmp_path):
  target = tmp_path / 'dora'
  shutil.copytree(DORA, target)
  weights = target / 'adapter_model.safetensors'
  tensors = safetensors.numpy.load_file(weights)
  name = ('base_model.model.model.layers.0.self_attn.q_proj.'
          'lora_magnitude_vector')
  tensors[name] = tensors[name][:5]
  safetensors.numpy.save_file(tensors, weights)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj "
                     r"has lora_magnitude_vector \(5,\) but lora_B \(576, 4\)"
                     r"; DoRA keeps one magnitude per output row"):
    models.load_hf_peft(target, smollm2.config)
  config = json.loads((target / 'adapter_config.json').read_text())
  (target / 'adapter_config.json').write_text(json.dumps(
      {**config, 'use_dora': False}))
  with pytest.raises(ValueError, match=r"has a DoRA magnitude "
                     r"\(lora_magnitude_vector\) but the config does not set "
                     r"use_dora\. The config and the weights do not belong"):
    models.load_hf_peft(target, smollm2.config)


def test_exporting_dora_beside_lora_is_refused(smollm2, tmp_path):
  loaded = models.load_hf_peft(DORA, smollm2.config)
  plain = models.load_hf_peft(ADAPTER, smollm2.config)
  spec = next(s for s in plain.specs if s.key.startswith('layers_1/'))
  lora = {**loaded.lora, 'layers_1': plain.lora['layers_1']}
  with pytest.raises(ValueError, match=r"save_hf_peft: adapters \[.*\] are "
                     r"DoRA but \['layers_1/.*'\] are not; an HF PEFT adapter "
                     r"is DoRA or LoRA as a whole.*Export them as two "
                     r"adapters"):
    models.save_hf_peft(tmp_path, lora, [*loaded.specs, spec])
