"""Gemma 3 in peft.models, against transformers' numbers.

Two independent references, both made with transformers in a side venv:
- `testdata/gemma3/golden.json` (`scripts/make_gemma3_golden.py`): the real
  Gemma-3-270M GGUF read by transformers' own loader (dequantizer, norm
  shift, layer pattern, tokenizer); a prompt, a greedy continuation, and a
  796-token passage, longer than the 512-token sliding window.
- `testdata/gemma3/tiny_hf/` (`make_tiny_hf.py`): a tiny random
  `Gemma3ForCausalLM` directory and its logits, for `load_hf_dir`.
The GGUF is loaded once per session (tests/conftest.py's `gemma3`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft import models
from tests.helpers import padded_forward
from tests.helpers import perplexity

DATA = pathlib.Path(__file__).parent / 'testdata' / 'gemma3'
GOLDEN = json.loads((DATA / 'golden.json').read_text())
TINY_HF = DATA / 'tiny_hf'
TINY_LOGITS = np.load(DATA / 'tiny_hf_logits.npz')

# Both sides dequantize the same blocks to float32 and run float32 math; we
# saw max |diff| 2e-5 on logits of size ~20.
LOGIT_ATOL = 1e-3
PERPLEXITY_RTOL = 1e-3


LENGTH = len(GOLDEN['passage_ids'])


@pytest.fixture(scope='session')
def forward(gemma3):
  return padded_forward(gemma3, LENGTH)


# --- The real Gemma 3 270M -------------------------------------------------


def test_golden_fixture_is_for_the_installed_file():
  path = models.gemma3_gguf_path()
  assert hashlib.sha256(path.read_bytes()).hexdigest() == (
    GOLDEN['source']['gguf_sha256'])


def test_config_matches_transformers_reading_of_the_file(gemma3):
  assert gemma3.config == models.gemma3_270m()
  hf = dict(GOLDEN['source']['config'])
  # transformers keeps the float32 noise of the file's epsilon (1e-6 as
  # 9.99999997e-07); our loader rounds it away.
  hf['rms_norm_eps'] = float(f'{hf["rms_norm_eps"]:.7g}')
  assert models.DecoderConfig.from_hf_config(hf) == gemma3.config
  assert gemma3.config.layer_types() == hf['layer_types']


def test_prompt_logits_match_transformers(forward):
  logits = forward(GOLDEN['prompt_ids'])
  values, ids = jax.lax.top_k(logits[-1], 5)
  assert ids.tolist() == GOLDEN['prompt_last_top_ids']  # the, a, Paris...
  np.testing.assert_allclose(values, GOLDEN['prompt_last_top_logits'],
                             atol=LOGIT_ATOL, rtol=0)
  columns = jnp.asarray(GOLDEN['columns'])
  np.testing.assert_allclose(logits[:, columns],
                             GOLDEN['prompt_column_logits'],
                             atol=LOGIT_ATOL, rtol=0)


def test_passage_beyond_the_sliding_window_matches_transformers(forward):
  ids = GOLDEN['passage_ids']
  assert len(ids) > models.gemma3_270m().sliding_window
  logits = forward(ids)
  positions = jnp.asarray(GOLDEN['passage_positions'])
  columns = jnp.asarray(GOLDEN['columns'])
  np.testing.assert_allclose(logits[positions][:, columns],
                             GOLDEN['passage_column_logits'],
                             atol=LOGIT_ATOL, rtol=0)
  ours = perplexity(logits, ids)
  np.testing.assert_allclose(ours, GOLDEN['passage_perplexity'],
                             rtol=PERPLEXITY_RTOL)


def test_a_wrong_window_or_local_base_moves_the_passage(gemma3):
  # The golden passage is a real check of the window and the local base:
  # either mistake changes its perplexity by far more than the tolerance.
  ids = GOLDEN['passage_ids']
  tokens = jnp.asarray([ids])
  no_window = {'sliding_window': None, 'sliding_window_pattern': None}
  for change in (no_window, {'rope_local_theta': None}):
    config = dataclasses.replace(gemma3.config, **change)
    logits = models.Decoder(config=config).apply({'params': gemma3.params},
                                                 tokens)[0]
    wrong = perplexity(logits, ids)
    assert abs(wrong / GOLDEN['passage_perplexity'] - 1) > 0.01, change


def test_greedy_continuation_matches_transformers(gemma3):
  sampler = models.Sampler(model=gemma3.model)
  new = sampler(gemma3.params, [GOLDEN['prompt_ids']],
                max_new_tokens=len(GOLDEN['greedy_ids']))[0]
  assert new == GOLDEN['greedy_ids']  # ' the capital of the country of...'


# --- A Hugging Face Gemma 3 directory --------------------------------------


def test_load_hf_dir_matches_transformers_logits():
  pre = models.load_hf_dir(TINY_HF)
  assert pre.config == models.tiny_gemma3_config(
    query_pre_attn_scalar=24, final_logit_softcap=30.0)
  logits = pre.model.apply({'params': pre.params},
                           jnp.asarray(TINY_LOGITS['prompt'])[None])[0]
  np.testing.assert_allclose(logits, TINY_LOGITS['logits'], atol=1e-4,
                             rtol=0)


def test_save_hf_dir_round_trips_a_gemma3_checkpoint(tmp_path):
  pre = models.load_hf_dir(TINY_HF)
  models.save_hf_dir(tmp_path, config=pre.config, params=pre.params)
  hf = json.loads((tmp_path / 'config.json').read_text())
  original = json.loads((TINY_HF / 'config.json').read_text())
  for key in ('model_type', 'layer_types', 'rope_parameters',
              'sliding_window', 'query_pre_attn_scalar',
              'final_logit_softcapping', 'head_dim', 'rms_norm_eps'):
    assert hf[key] == original[key], key
  again = models.load_hf_dir(tmp_path)
  assert again.config == pre.config
  jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)


# --- Config ----------------------------------------------------------------


def test_transformers_4_and_5_configs_read_the_same():
  hf5 = json.loads((TINY_HF / 'config.json').read_text())
  hf4 = {k: v for k, v in hf5.items()
         if k not in ('rope_parameters', 'layer_types')}
  hf4.update(rope_theta=1e6, rope_local_base_freq=1e4,
             sliding_window_pattern=3)
  assert (models.DecoderConfig.from_hf_config(hf4)
          == models.DecoderConfig.from_hf_config(hf5))


def _tiny_hf(**changes):
  hf = json.loads((TINY_HF / 'config.json').read_text())
  hf.update(changes)
  return hf


@pytest.mark.parametrize('changes, match', [
  ({'layer_types': ['full_attention', 'sliding_attention',
                    'full_attention']},
   r'global layers at \[0, 2\], which is not every N-th layer'),
  ({'layer_types': ['sliding_attention']}, 'must list 3 entries'),
  ({'rope_parameters': {'full_attention': {'rope_type': 'linear',
                                           'factor': 8.0},
                        'sliding_attention': {'rope_theta': 1e4}}},
   "full_attention layers a 'linear' rope"),
  ({'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e6}},
   'one entry for each of'),
  ({'sliding_window': None}, "lacks 'sliding_window'"),
])
def test_gemma3_config_errors(changes, match):
  hf = _tiny_hf(**changes)
  if changes.get('sliding_window', 0) is None:
    del hf['sliding_window']
  with pytest.raises(ValueError, match=match):
    models.DecoderConfig.from_hf_config(hf)


def test_all_sliding_layers_read_as_no_pattern():
  config = models.DecoderConfig.from_hf_config(
    _tiny_hf(layer_types=['sliding_attention'] * 3))
  assert config.sliding_window_pattern is None
  assert [config.is_sliding(i) for i in range(3)] == [True] * 3


@pytest.mark.parametrize('changes, match', [
  ({'sliding_window': None},
   'sliding_window_pattern=3 needs a sliding_window'),
  ({'sliding_window': 0}, 'sliding_window must be a positive int or None'),
  ({'rope_local_theta': -1.0},
   'rope_local_theta must be a positive number or None; got -1.0'),
  ({'final_logit_softcap': float('nan')}, 'final_logit_softcap must be'),
  ({'qk_norm': 1}, 'qk_norm must be a bool; got 1'),
])
def test_decoder_config_rejects_bad_gemma3_values(changes, match):
  with pytest.raises(ValueError, match=match):
    models.tiny_gemma3_config(**changes)


@pytest.mark.parametrize('changes, match', [
  ({'qk_norm': False}, 'Gemma 3 options, which Hugging Face writes only as '
                       'a whole Gemma 3'),
  ({'attn_logit_softcap': 50.0}, 'does not apply an attention soft cap'),
])
def test_to_hf_config_refuses_what_transformers_would_run_differently(
    changes, match):
  with pytest.raises(ValueError, match=match):
    models.tiny_gemma3_config(**changes).to_hf_config()


# --- Decoder ---------------------------------------------------------------


def test_cached_decoding_equals_the_full_forward_past_the_window():
  config = models.tiny_gemma3_config(attn_logit_softcap=20.0,
                                     final_logit_softcap=15.0)
  model = models.Decoder(config=config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 320, (2, 11)),
                       jnp.int32)
  params = models.random_params(config, seed=1, scale=0.2)
  full = model.apply({'params': params}, tokens)
  cache = models.init_cache(config, 2, 16)
  chunks = []
  for start, stop in ((0, 5), (5, 6), (6, 11)):
    logits, cache = model.apply({'params': params}, tokens[:, start:stop],
                                cache, start, method=models.Decoder.decode)
    chunks.append(logits)
  # float32 sums in another order (chunked attention): logits near 4 move
  # by up to 2e-5.
  np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=5e-5)


def test_attention_soft_cap_and_window_change_the_output():
  config = models.tiny_gemma3_config()
  tokens = jnp.arange(10)[None] * 31 % 320
  params = models.random_params(config, seed=1, scale=0.5)

  def run(**changes):
    model = models.Decoder(config=dataclasses.replace(config, **changes))
    return np.asarray(model.apply({'params': params}, tokens))

  base = run()
  # One rotary base everywhere, so that only the window differs: positions
  # inside the first window see the same keys either way.
  windowed = run(rope_local_theta=None)
  unwindowed = run(sliding_window=None, sliding_window_pattern=None,
                   rope_local_theta=None)
  np.testing.assert_allclose(unwindowed[:, :4], windowed[:, :4], atol=1e-5)
  assert np.abs(unwindowed[:, 4:] - windowed[:, 4:]).max() > 1e-3
  assert np.abs(run(attn_logit_softcap=1.0) - base).max() > 1e-3
  capped = run(final_logit_softcap=2.0)
  np.testing.assert_allclose(capped, 2.0 * np.tanh(base / 2.0), atol=1e-5)
