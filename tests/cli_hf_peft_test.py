"""The main job with Hugging Face PEFT adapters: read, train on, export.

An HF PEFT directory for the tiny model is written by `save_hf_peft` with
random non-zero B and per-kernel ranks (tests/hf_peft_test.py checks the
format itself against a directory torch made).
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import peft
from peft import models
from peft._cli import base as base_lib
from tests.cli_test import DATA
from tests.cli_test import assert_one_line_error
from tests.cli_test import perplexities
from tests.cli_test import reference_perplexity
from tests.cli_test import run_cli
from tests.cli_test import tiny  # noqa: F401  (a fixture)


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """An HF PEFT adapter for the tiny model: rank 2 on attention, 4 on the
  MLP, alpha 8, random B."""
  config = models.tiny_config()
  rules = [peft.LoRARule(rank=2, alpha=8.0, targets='.*attn/.*'),
           peft.LoRARule(rank=4, alpha=8.0, targets='.*mlp')]
  with peft.lora(rules=rules) as report:
    shapes = jax.eval_shape(models.Decoder(config=config).init,
                            jax.random.key(0), jnp.ones((1, 2), jnp.int32))
  lora = peft.split_params(shapes['params']).lora
  leaves, tree = jax.tree.flatten(lora)
  rng = np.random.default_rng(0)
  lora = jax.tree.unflatten(tree, [
      jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32)
      for x in leaves])
  directory = tmp_path_factory.mktemp('hf') / 'adapter'
  models.save_hf_peft(directory, lora, report.specs, base_model='tiny')
  return directory


def _perplexity(argv, name):
  status, out, err = run_cli(*argv)
  assert status == 0, err
  return perplexities(out)[name]


def test_eval_sample_summary_and_merge_take_an_hf_directory(hf_dir,
                                                            tmp_path):
  base = _perplexity(('eval', '--tiny', *DATA), 'base')
  adapted = _perplexity(('eval', '--tiny', *DATA, '--adapters', hf_dir),
                        'fine-tuned')
  assert abs(adapted - base) > 1e-3 * base  # the adapter does something
  status, out, err = run_cli('sample', '--tiny', '--adapters', hf_dir,
                             '--max-new-tokens', '4', '--compare')
  assert status == 0, err
  status, out, err = run_cli('summary', '--tiny', '--adapters', hf_dir)
  assert status == 0, err
  assert 'layers_1/mlp' in out
  status, out, err = run_cli('merge', '--tiny', *DATA, '--adapters', hf_dir,
                             '--out', tmp_path / 'merged')
  assert status == 0, err
  assert re.search(r'max \|logit diff\| = .* ok', out), out
  merged = _perplexity(('eval', '--tiny', *DATA, '--merged',
                        tmp_path / 'merged'), 'merged')
  assert merged == pytest.approx(adapted, rel=1e-4)


def test_finetune_continues_an_hf_adapter_and_export_writes_one_back(
    hf_dir, tmp_path):
  status, out, err = run_cli(
      'finetune', '--tiny', *DATA, '--init-adapters', hf_dir, '--steps', '2',
      '--batch-size', '2', '--workdir', tmp_path)
  assert status == 0, err
  start = perplexities(out)
  file = tmp_path / 'adapters.safetensors'
  meta = peft.load_adapters(file).metadata['peft_cli']
  hf_config = json.loads((hf_dir / 'adapter_config.json').read_text())
  assert meta['hf_peft_config'] == hf_config
  assert meta['settings']['targets'] == [] and meta['settings']['kernels']
  # It started from the HF adapter, not from fresh ones.
  assert start['step 0 (init adapters)'] == pytest.approx(_perplexity(
      ('eval', '--tiny', *DATA, '--adapters', hf_dir), 'fine-tuned'),
      rel=1e-5)

  out_dir = tmp_path / 'exported'
  status, out, err = run_cli('export', '--adapters', file, '--format',
                             'hf-peft', out_dir)
  assert status == 0, err
  written = json.loads((out_dir / 'adapter_config.json').read_text())
  for field in ('r', 'lora_alpha', 'target_modules', 'base_model_name_or_path'):
    assert written[field] == hf_config[field], field
  got = safetensors.numpy.load_file(out_dir / 'adapter_model.safetensors')
  want = safetensors.numpy.load_file(hf_dir / 'adapter_model.safetensors')
  assert sorted(got) == sorted(want)
  assert all(got[k].shape == want[k].shape for k in want)
  assert any(not np.array_equal(got[k], want[k]) for k in want)  # trained
  # The export is the trained adapters: evaluating it gives the file's
  # perplexity.
  assert _perplexity(('eval', '--tiny', *DATA, '--adapters', out_dir),
                     'fine-tuned') == pytest.approx(_perplexity(
                         ('eval', '--tiny', *DATA, '--adapters', file),
                         'fine-tuned'), rel=1e-5)


def test_export_of_fresh_adapters_writes_the_hf_layout(tmp_path):
  status, _, err = run_cli('finetune', '--tiny', *DATA, '--steps', '1',
                           '--batch-size', '2', '--rank', '3',
                           '--workdir', tmp_path)
  assert status == 0, err
  status, out, err = run_cli('export', '--adapters',
                             tmp_path / 'adapters.safetensors', '--format',
                             'hf-peft', tmp_path / 'hf')
  assert status == 0, err
  assert 'r=3, lora_alpha=16' in out
  tensors = safetensors.numpy.load_file(
      tmp_path / 'hf' / 'adapter_model.safetensors')
  assert tensors['base_model.model.model.layers.0.self_attn.k_proj.lora_A'
                 '.weight'].shape == (3, 64)
  assert tensors['base_model.model.model.layers.1.mlp.down_proj.lora_B'
                 '.weight'].shape == (64, 3)


@pytest.mark.parametrize('argv, match', [
    (('finetune', '--tiny', '--init-adapters', '{hf}', '--rank', '4'),
     r"--init-adapters '.*' brings its own surgery, so --rank would not "
     'apply'),
    (('finetune', '--tiny', '--init-adapters', '{hf}', '--use-dora'),
     r"so --use-dora would not apply"),
    (('eval', '--tiny', '--adapters', '{bad}'),
     r"--adapters '.*': HF PEFT adapter '.*': the config sets use_dora=True "
     r"but model\.layers\.0\..* has no lora_magnitude_vector"),
    (('export', '--adapters', 'nowhere.safetensors', '--format', 'hf-peft',
      '{tmp}/out'), r"--adapters 'nowhere.safetensors': no such file"),
    (('eval', '--hf-dir', '{small}', '--adapters', '{hf}'),
     r'is for layer 1 but the model has 1'),
])
def test_hf_adapter_errors_are_one_line(hf_dir, tmp_path, argv, match):
  bad = tmp_path / 'bad'
  bad.mkdir()
  for f in hf_dir.iterdir():
    (bad / f.name).write_bytes(f.read_bytes())
  config = json.loads((bad / 'adapter_config.json').read_text())
  (bad / 'adapter_config.json').write_text(json.dumps({**config,
                                                       'use_dora': True}))
  tiny_base = base_lib.load_base(base_lib.TINY)
  small_config = models.DecoderConfig.from_hf_config(
      {**tiny_base.config.to_hf_config(), 'num_hidden_layers': 1})
  small = tmp_path / 'small'
  small_params = {k: v for k, v in tiny_base.params.items() if k != 'layers_1'}
  models.save_hf_dir(small, config=small_config, params=small_params,
                     tokenizer=tiny_base.tokenizer)
  names = {'hf': hf_dir, 'bad': bad, 'tmp': tmp_path, 'small': small}
  argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
  assert_one_line_error(*run_cli(*argv), 1, match)


@pytest.fixture(scope='module')
def hf_dora_dir(tmp_path_factory):
  """An HF PEFT DoRA adapter for the tiny model on q and v only (HF's usual
  choice, one half of the stacked kv kernel): random B, m moved off
  ||W||."""
  base = base_lib.load_base(base_lib.TINY)
  with peft.lora(rank=2, alpha=4.0, targets='.*attn/(q|kv)_einsum',
                 use_dora=True) as report:
    shapes = jax.eval_shape(base.model.init, jax.random.key(0),
                            jnp.ones((1, 2), jnp.int32))
  rng = np.random.default_rng(1)
  lora = jax.tree.map(
      lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
      peft.split_params(shapes['params']).lora)
  params = peft.init_dora_magnitudes(peft.merge_params(base.params, lora),
                                     report.specs)
  lora = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 1.2 if p[-1].key == 'm' else x,
      peft.split_params(params).lora)
  directory = tmp_path_factory.mktemp('hf_dora') / 'adapter'
  models.save_hf_peft(directory, lora, report.specs, base_model='tiny')
  weights = directory / 'adapter_model.safetensors'
  tensors = {k: v for k, v in safetensors.numpy.load_file(weights).items()
             if '.k_proj.' not in k}
  safetensors.numpy.save_file(tensors, weights, metadata={'format': 'pt'})
  return directory


def test_an_hf_dora_adapter_evaluates_continues_and_exports(
    hf_dora_dir, tmp_path, tiny):  # noqa: F811
  base, held = tiny
  loaded = models.load_hf_peft(hf_dora_dir, base.config, params=base.params)
  with peft.lora(rules=loaded.rules):
    logits = base.model.apply(
        {'params': peft.merge_params(base.params, loaded.lora)},
        jnp.asarray(held[:, :-1]))
  adapted = _perplexity(('eval', '--tiny', *DATA, '--adapters', hf_dora_dir),
                        'fine-tuned')
  assert adapted == pytest.approx(reference_perplexity(logits, held),
                                  rel=1e-4)
  status, out, err = run_cli(
      'finetune', '--tiny', *DATA, '--init-adapters', hf_dora_dir,
      '--steps', '1', '--batch-size', '2', '--workdir', tmp_path)
  assert status == 0, err
  file = tmp_path / 'adapters.safetensors'
  assert peft.load_adapters(file).metadata['peft_cli']['settings'][
      'use_dora'] is True
  out_dir = tmp_path / 'exported'
  status, out, err = run_cli('export', '--adapters', file, '--format',
                             'hf-peft', out_dir)
  assert status == 0, err
  assert json.loads((out_dir / 'adapter_config.json').read_text())[
      'use_dora'] is True
  got = safetensors.numpy.load_file(out_dir / 'adapter_model.safetensors')
  assert sum(k.endswith('lora_magnitude_vector') for k in got) == 2 * 3
