"""SmolLM2-135M loaded by our GGUF loader against transformers' numbers.

`tests/testdata/smollm2_golden.json` was written by `scripts/make_golden.py`
with transformers' Llama reading the same GGUF file (its own dequantizer,
un-permute and tokenizer). The GGUF is loaded once per session.
"""

from __future__ import annotations

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

GOLDEN = json.loads(
  (pathlib.Path(__file__).parent / 'testdata' / 'smollm2_golden.json')
  .read_text())

# Both sides dequantize the same Q4_1 blocks to float32 and run float32
# math; we saw max |diff| ~ 7e-5 on logits of size ~40.
LOGIT_ATOL = 1e-3
PERPLEXITY_RTOL = 1e-2


@pytest.fixture(scope='session')
def smollm2():
  return models.load_smollm2()


LENGTH = max(len(GOLDEN['chat_ids']), len(GOLDEN['passage_ids']))


@pytest.fixture(scope='session')
def forward(smollm2):
  return padded_forward(smollm2, LENGTH)


def test_golden_fixture_is_for_the_installed_file():
  path = models.smollm2_gguf_path()
  assert hashlib.sha256(path.read_bytes()).hexdigest() == (
    GOLDEN['source']['gguf_sha256'])


def test_config_and_tokenizer_match_transformers(smollm2):
  assert smollm2.config == models.smollm2_135m()
  tok = smollm2.tokenizer
  assert tok.encode_chat(GOLDEN['chat_question']) == GOLDEN['chat_ids']
  assert tok.encode(GOLDEN['passage']) == GOLDEN['passage_ids']
  assert tok.decode(GOLDEN['passage_ids']) == GOLDEN['passage']
  assert tok.eos_id == tok.token_to_id('<|im_end|>') == 2


def test_logits_match_transformers(smollm2, forward):
  logits = forward(GOLDEN['chat_ids'])
  assert logits.dtype == jnp.float32
  values, ids = jax.lax.top_k(logits[-1], 5)
  assert ids.tolist() == GOLDEN['chat_last_top_ids']
  np.testing.assert_allclose(values, GOLDEN['chat_last_top_logits'],
                             atol=LOGIT_ATOL, rtol=0)
  np.testing.assert_allclose(logits[:, jnp.asarray(GOLDEN['chat_columns'])],
                             GOLDEN['chat_column_logits'], atol=LOGIT_ATOL,
                             rtol=0)


def test_perplexity_matches_transformers(smollm2, forward):
  ids = GOLDEN['passage_ids']
  logits = forward(ids)
  ours = perplexity(logits, ids)
  np.testing.assert_allclose(ours, GOLDEN['passage_perplexity'],
                             rtol=PERPLEXITY_RTOL)
  assert ours < 60  # q/k rows left permuted by llama.cpp give ~126.


def test_greedy_answer_is_paris_and_matches_transformers(smollm2):
  sampler = models.Sampler(model=smollm2.model, tokenizer=smollm2.tokenizer)
  new = sampler(smollm2.params, [GOLDEN['chat_ids']], max_new_tokens=30,
                eos_id=smollm2.tokenizer.eos_id)[0]
  expected = [t for t in GOLDEN['greedy_ids'] if t != 2]
  assert new[:len(expected)] == expected
  answer = smollm2.tokenizer.decode(new)
  assert 'Paris' in answer, answer


@pytest.mark.parametrize('text', [
  'Plain ASCII, with punctuation: "quotes" & more!',
  'Accents: naïve café, Straße, déjà vu.',
  'CJK 日本語 and emoji 🎭🌹',
  'Numbers 1599 and  double  spaces\n\ttabs',
])
def test_tokenizer_round_trip(smollm2, text):
  tok = smollm2.tokenizer
  assert tok.decode(tok.encode(text)) == text


def test_tokenizer_splits_digits_one_by_one(smollm2):
  tok = smollm2.tokenizer
  assert [tok.decode([i]) for i in tok.encode('1599')] == ['1', '5', '9', '9']


def test_held_out_shakespeare_perplexity_is_sane(smollm2, forward):
  windows = models.shakespeare_windows(
    smollm2.tokenizer.encode, length=LENGTH, split='held_out', max_plays=1)
  assert windows.shape[1] == LENGTH and len(windows) > 100
  text = smollm2.tokenizer.decode(windows[0])
  assert ':\n' in text  # 'SPEAKER:' blocks.
  ids = windows[len(windows) // 2].tolist()
  ppl = perplexity(forward(ids), ids)
  assert 2 < ppl < 200, ppl
