"""`python -m peft`, run in-process on the tiny random model.

One fine-tuning run (a few steps) is shared by the module; the other
commands use its adapter file. Results are checked against independent
computations: the plain decoder and `peft.lora` surgery applied by hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft import models
from peft.__main__ import main
from peft._cli import base as base_lib
from peft._cli import interrupt

# Small data: one play per split, 2 windows of 32 predicted tokens.
DATA = ('--max-plays', '1', '--seq-len', '32', '--eval-windows', '2')
TARGETS = ('.*attn/.*', '.*mlp')  # The CLI's default --targets.
COMMANDS = ('finetune', 'merge', 'sample', 'eval', 'summary', 'demo',
            'quickstart', 'export')

peft.register_einsum_layer(models.Einsum, weight_name=lambda m: m.weight_name)


def run_cli(*argv):
  """`main(argv)` with stdout and stderr captured: (status, out, err)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main([str(a) for a in argv])
  return status, out.getvalue(), err.getvalue()


def perplexities(out):
  return {m[1]: float(m[2]) for m in re.finditer(
      r'^(.+): held-out perplexity ([\d.]+)', out, re.M)}


def tree_of_files(directory):
  return {p.relative_to(directory): p.read_bytes()
          for p in sorted(pathlib.Path(directory).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with adapters from 6 steps on the tiny model."""
  workdir = tmp_path_factory.mktemp('cli')
  status, out, err = run_cli('finetune', '--tiny', '--workdir', workdir, *DATA,
                             '--steps', '6', '--batch-size', '2',
                             '--eval-every', '3')
  assert status == 0, err
  return workdir, out


@pytest.fixture(scope='module')
def tiny():
  """The tiny base (params, tokenizer) and its held-out windows."""
  from peft._cli import base as base_lib  # pylint: disable=g-import-not-at-top

  base = base_lib.load_base(base_lib.TINY)
  held = models.shakespeare_windows(
      base.tokenizer.encode, length=33, split='held_out', max_plays=1,
      eos_id=base.tokenizer.eos_id)[:2]
  return base, held


@pytest.fixture(scope='module')
def forward():
  """Independent jitted forwards: the plain decoder, and it under LoRA."""
  model = models.Decoder(config=models.tiny_config())
  plain = jax.jit(lambda p, t: model.apply({'params': p}, t))

  def adapted_fn(p, t):
    with peft.lora(8, targets=TARGETS, alpha=16.0):
      return model.apply({'params': p}, t)
  return plain, jax.jit(adapted_fn)


def reference_perplexity(logits, windows):
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  targets = windows[:, 1:]
  picked = np.take_along_axis(logp, targets[..., None], -1)
  return math.exp(-picked.mean())


@pytest.mark.parametrize('command', (None, *COMMANDS))
def test_help(command):
  status, out, _ = run_cli(*([command] if command else []), '--help')
  assert status == 0
  assert out.startswith('usage: python -m peft')
  if command in ('finetune', 'summary'):
    assert all(f in out for f in ('--targets', '--rank', '--alpha',
                                  '--dropout', '--quantize', '--use-dora'))
  if command is None:
    assert all(c in out for c in COMMANDS)


def test_finetune_writes_adapters_that_load(trained, tiny, forward):
  workdir, out = trained
  loaded = peft.load_adapters(workdir / 'adapters.safetensors')
  meta = loaded.metadata['peft_cli']
  assert meta['settings'] == {'targets': list(TARGETS), 'rank': 8,
                              'alpha': 16.0, 'dropout': 0.0, 'quantize': None,
                              'use_dora': False, 'kernels': []}
  assert meta['base']['source'] == 'tiny'
  assert len(loaded.specs) == 10  # 2 layers x (q, kv, out, gate/up, down)
  b = [x for p, x in jax.tree_util.tree_leaves_with_path(loaded.lora)
       if p[-1].key == 'b']
  assert len(b) == 10 and all(float(jnp.abs(x).max()) > 0 for x in b)
  assert (workdir / 'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert re.findall(r'^step (\d+)', out, re.M) == ['0', '3', '6']
  # Step 0 is the base model: its perplexity is the plain decoder's.
  base, held = tiny
  logits = forward[0](base.params, jnp.asarray(held[:, :-1]))
  step0 = float(re.search(r'step 0 \(base\): held-out perplexity ([\d.]+)',
                          out)[1])
  np.testing.assert_allclose(step0, reference_perplexity(logits, held),
                             rtol=1e-4)
  assert meta['training']['perplexity'] < meta['training']['base_perplexity']


def test_eval_matches_independent_perplexities(trained, tiny, forward):
  workdir, _ = trained
  base, held = tiny
  plain, adapted = forward
  status, out, err = run_cli('eval', '--tiny', '--workdir', workdir, *DATA,
                             '--adapters', workdir / 'adapters.safetensors',
                             '--compare')
  assert status == 0, err
  got = perplexities(out)
  assert list(got) == ['base', 'fine-tuned']
  lora = peft.load_adapters(workdir / 'adapters.safetensors').lora
  tokens = jnp.asarray(held[:, :-1])
  want_base = reference_perplexity(plain(base.params, tokens), held)
  want_tuned = reference_perplexity(
      adapted(peft.merge_params(base.params, lora), tokens), held)
  np.testing.assert_allclose(got['base'], want_base, rtol=1e-4)
  np.testing.assert_allclose(got['fine-tuned'], want_tuned, rtol=1e-4)
  assert math.isfinite(got['fine-tuned'])
  assert got['fine-tuned'] < got['base']


@pytest.mark.parametrize('name', ('merged', 'merged.safetensors'))
def test_merge_plain_model_reproduces_adapted_logits(trained, tiny, forward,
                                                     name):
  workdir, _ = trained
  base, held = tiny
  plain, adapted = forward
  status, out, err = run_cli('merge', '--tiny', '--workdir', workdir, *DATA,
                             '--adapters', workdir / 'adapters.safetensors',
                             '--out', workdir / name)
  assert status == 0, err
  diff = float(re.search(r'max \|logit diff\| = (\S+)', out)[1])
  assert diff < 1e-4
  if name == 'merged':
    merged = models.load_hf_dir(workdir / name).params
  else:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    merged = {}
    for key, value in load_file(workdir / name).items():
      *parents, leaf = key.split('/')
      node = merged
      for k in parents:
        node = node.setdefault(k, {})
      node[leaf] = value
  assert jax.tree.structure(merged) == jax.tree.structure(base.params)
  lora = peft.load_adapters(workdir / 'adapters.safetensors').lora
  tokens = jnp.asarray(held[:, :-1])
  want = adapted(peft.merge_params(base.params, lora), tokens)
  got = plain(jax.tree.map(jnp.asarray, merged), tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(want - plain(base.params, tokens)).max()) > 1e-3
  status, out, _ = run_cli('eval', '--tiny', *DATA, '--merged',
                           workdir / name)
  assert status == 0 and 'merged' in perplexities(out)


def greedy(fn, params, tokenizer, prompt, n):
  """Greedy decoding by full forward passes, without a cache.

  The forward runs on a (2, 32) buffer, the shape the eval tests compile
  (the model is causal, so the padding after the prompt is never seen).
  """
  ids = tokenizer.encode(prompt)
  buffer = np.zeros((2, 32), np.int32)
  buffer[:, :len(ids)] = ids
  end = len(ids) + n
  for i in range(len(ids), end):
    token = int(jnp.argmax(fn(params, jnp.asarray(buffer))[0, i - 1]))
    if token == tokenizer.eos_id:
      end = i
      break
    buffer[:, i] = token
  return tokenizer.decode(buffer[0, len(ids):end].tolist())


def test_sample_greedy_is_deterministic_and_exact(trained, tiny, forward):
  workdir, _ = trained
  base, _ = tiny
  argv = ('sample', '--tiny', '--adapters', workdir / 'adapters.safetensors',
          '--prompt', 'ROMEO:\\nWhat light', '--max-new-tokens', '6',
          '--compare')
  status, out, err = run_cli(*argv)
  assert status == 0, err
  assert run_cli(*argv)[1] == out
  lora = peft.load_adapters(workdir / 'adapters.safetensors').lora
  prompt = 'ROMEO:\nWhat light'
  plain, adapted = forward
  want_base = greedy(plain, base.params, base.tokenizer, prompt, 6)
  want_tuned = greedy(adapted, peft.merge_params(base.params, lora),
                      base.tokenizer, prompt, 6)
  assert out == (f'--- base (greedy) ---\n{prompt}{want_base}\n'
                 f'--- fine-tuned (greedy) ---\n{prompt}{want_tuned}\n')


def test_summary_lists_layers_and_counts(tiny):
  base, _ = tiny
  status, out, err = run_cli('summary', '--tiny', '--targets', '.*mlp',
                             '--rank', '2')
  assert status == 0, err
  rows = re.findall(r'^(layers_\d/\S+ \[\w+\])', out, re.M)
  assert rows == [f'layers_{i}/mlp [{w}]' for i in (0, 1)
                  for w in ('gating_einsum', 'linear')]
  # gate/up: A (64, 2) + B (2, 2, 128); down: A (128, 2) + B (2, 64).
  trainable = 2 * (64 * 2 + 2 * 2 * 128 + 128 * 2 + 2 * 64)
  frozen = sum(x.size for x in jax.tree.leaves(base.params))
  assert f'{trainable:,} trainable (adapters), {frozen:,} frozen' in out


def test_qlora_finetune_and_merge(tmp_path, tiny, forward):
  status, out, err = run_cli('finetune', '--tiny', '--workdir', tmp_path,
                             *DATA, '--steps', '2', '--batch-size', '2',
                             '--quantize', 'int8', '--targets', '.*attn/q.*',
                             '.*mlp')
  assert status == 0, err
  path = tmp_path / 'adapters.safetensors'
  meta = peft.load_adapters(path).metadata['peft_cli']
  assert meta['settings']['quantize'] == 'int8'
  status, out, err = run_cli('summary', '--tiny', '--adapters', path)
  assert status == 0 and '6 adapted layers' in out and '(int8)' in out
  status, out, err = run_cli('merge', '--tiny', '--workdir', tmp_path, *DATA,
                             '--adapters', path)
  assert status == 0, err
  assert float(re.search(r'max \|logit diff\| = (\S+)', out)[1]) < 1e-4


def test_qdora_finetune_eval_compare_and_merge(tmp_path, tiny):
  status, out, err = run_cli('finetune', '--tiny', '--workdir', tmp_path,
                             *DATA, '--steps', '2', '--batch-size', '2',
                             '--quantize', 'int8', '--use-dora',
                             '--targets', '.*attn/q.*', '.*mlp')
  assert status == 0, err
  path = tmp_path / 'adapters.safetensors'
  loaded = peft.load_adapters(path)
  assert loaded.metadata['peft_cli']['settings']['use_dora'] is True
  assert len(loaded.specs) == 6 and all(s.use_dora for s in loaded.specs)
  m = [x for p, x in jax.tree_util.tree_leaves_with_path(loaded.lora)
       if p[-1].key == 'm']
  assert len(m) == 6
  # --compare's base is the int8 base itself: B = 0 and m back at ||W_q||,
  # so it is the plain model on the int8 kernels.
  status, out, err = run_cli('eval', '--tiny', '--workdir', tmp_path, *DATA,
                             '--adapters', path, '--compare')
  assert status == 0, err
  got = perplexities(out)
  assert list(got) == ['base (int8)', 'fine-tuned']
  base, held = tiny
  model = models.Decoder(config=base.config)
  tokens = jnp.asarray(held[:, :-1])
  qbase = peft.quantize(base.params, method='int8',
                        axes=peft.quantization_axes(model, tokens[:, :1]))
  with peft.quantized('int8'):
    logits = model.apply({'params': qbase}, tokens)
  np.testing.assert_allclose(got['base (int8)'],
                             reference_perplexity(logits, held), rtol=1e-4)
  assert got['fine-tuned'] != pytest.approx(got['base (int8)'], rel=1e-6)
  status, out, err = run_cli('merge', '--tiny', '--workdir', tmp_path, *DATA,
                             '--adapters', path)
  assert status == 0, err
  assert float(re.search(r'max \|logit diff\| = (\S+)', out)[1]) < 1e-4


def test_quickstart_still_works():
  status, out, err = run_cli('quickstart', '--steps', '40')
  assert status == 0, err
  assert 'fused plain model vs adapted model' in out


# Errors: one line on stderr, a non-zero status, nothing overwritten.


def assert_one_line_error(status, out, err, code, match):
  assert status == code, (out, err)
  assert err.count('\n') == 1 and 'Traceback' not in err, err
  assert re.search(match, err), err


@pytest.mark.parametrize('argv, match', [
    (('finetune', '--rank', '0'),
     r"argument --rank: expected a whole number >= 1; got '0'"),
    (('finetune', '--dropout', '1.5'),
     r"argument --dropout: expected a number in \[0, 1\); got '1.5'"),
    (('finetune', '--targets', '(attn'), r"'\(attn' is not a valid regex"),
    (('finetune', '--quantize', 'int3'), r"invalid choice: 'int3'"),
    (('sample', '--temperature', '-1'), r'expected a number in \[0, inf\)'),
    (('eval', '--adapters', 'a', '--merged', 'b'), r'not allowed with'),
    (('merge', '--tiny'), r'required: --adapters'),
    (('finetune', '--tiny', '--hf-dir', 'x'), r'not allowed with'),
    (('train',), r"invalid choice: 'train'"),
])
def test_bad_flags(argv, match):
  assert_one_line_error(*run_cli(*argv), 2, match)


@pytest.mark.parametrize('argv, match', [
    (('eval', '--tiny', '--adapters', 'nowhere.safetensors'),
     r"--adapters 'nowhere.safetensors': no such file"),
    (('sample', '--tiny', '--merged', 'nowhere'),
     r"--merged 'nowhere': no such file or directory"),
    (('eval', '--hf-dir', 'nowhere'), r"--hf-dir '.*nowhere' is not a dir"),
    (('summary', '--gguf', 'nowhere.gguf'), r"--gguf '.*nowhere.gguf' is not"),
    (('eval', '--tiny', '--seq-len', '300'),
     r'--seq-len 300 exceeds the context of this model \(256 tokens\)'),
    (('eval', '--tiny', '--max-plays', '1', '--eval-windows', '100000'),
     r'--eval-windows 100000 exceeds the \d+ held-out windows'),
    (('summary', '--tiny', '--targets', '.*attn/q_einsum', '.*nothing'),
     r"--targets '.\*nothing' matches no layer. The adaptable layers are "
     r'embedder, layers_N/attn/q_einsum, .*layers_N/mlp'),
])
def test_errors_in_the_run(argv, match):
  assert_one_line_error(*run_cli(*argv), 1, match)


def test_nf4_quantizes_a_model_whose_widths_are_not_multiples_of_64():
  # The tiny model's 16-wide heads used to be refused; NF4 now pads its
  # last block (issue 12).
  status, out, err = run_cli('summary', '--tiny', '--quantize', 'nf4')
  assert status == 0, err
  assert re.search(r'frozen base in memory: [\d.]+ MiB \(nf4\) instead of',
                   out), out


def test_failed_finetune_overwrites_nothing(tmp_path):
  out = tmp_path / 'adapters.safetensors'
  out.write_bytes(b'old adapters')
  before = tree_of_files(tmp_path)
  result = run_cli('finetune', '--tiny', '--workdir', tmp_path, *DATA,
                   '--steps', '1', '--targets', '.*nothing')
  assert_one_line_error(*result, 1, r'matches no layer')
  assert tree_of_files(tmp_path) == before
  assert sorted(os.listdir(tmp_path)) == ['adapters.safetensors']


@pytest.mark.parametrize('damage, match', [
    (lambda data: b'not safetensors at all', r'is not a valid adapter file'),
    (lambda data: data[:len(data) // 2], r'is not a valid adapter file'),
    (lambda data: data[:-4] + bytes(4), r'fail their SHA-256 check'),
])
def test_corrupt_adapter_file(trained, tmp_path, damage, match):
  workdir, _ = trained
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(damage((workdir / 'adapters.safetensors').read_bytes()))
  merged = tmp_path / 'merged'
  merged.mkdir()
  (merged / 'config.json').write_text('{"old": true}')
  before = tree_of_files(tmp_path)
  result = run_cli('merge', '--tiny', *DATA, '--adapters', bad, '--out',
                   merged)
  assert_one_line_error(*result, 1, match)
  assert tree_of_files(tmp_path) == before
  assert sorted(os.listdir(tmp_path)) == ['bad.safetensors', 'merged']


def test_failed_merge_check_overwrites_nothing(trained, tmp_path):
  workdir, _ = trained
  out = tmp_path / 'merged.safetensors'
  out.write_bytes(b'old merged model')
  result = run_cli('merge', '--tiny', *DATA, '--adapters',
                   workdir / 'adapters.safetensors', '--out', out,
                   '--atol', '1e-30')
  assert_one_line_error(*result, 1, r'the merged model differs from the '
                        r'adapted one by .* > --atol 1e-30; .* not written')
  assert out.read_bytes() == b'old merged model'
  assert os.listdir(tmp_path) == ['merged.safetensors']


def _tiny_hf_dir(path, **overrides):
  from peft._cli import base as base_lib  # pylint: disable=g-import-not-at-top

  config = models.tiny_config(**overrides)
  rng = np.random.default_rng(5)
  tensors = {n: 0.02 * rng.standard_normal(s).astype(np.float32)
             for n, s in models.hf_shapes(config).items()}
  models.save_hf_dir(path, config=config,
                     params=models.params_from_hf(tensors, config),
                     tokenizer=base_lib.tiny_tokenizer())
  return path


def test_mismatched_adapter_files(trained, tmp_path):
  workdir, _ = trained
  adapters = workdir / 'adapters.safetensors'
  other = _tiny_hf_dir(tmp_path / 'other', n_layers=1)
  assert_one_line_error(
      *run_cli('eval', '--hf-dir', other, *DATA, '--adapters', adapters), 1,
      r"was trained on another model \('tiny'\); its config differs from "
      r".* in \{'n_layers': \(2, 1\)\}")
  same_shape = _tiny_hf_dir(tmp_path / 'same_shape')
  assert_one_line_error(
      *run_cli('eval', '--hf-dir', same_shape, *DATA, '--adapters', adapters),
      1, r"was trained on the weights of 'tiny' \(fingerprint \w+\) but "
      r"'hf:.*same_shape' holds other weights")

  # Valid files whose adapters do not fit the surgery they claim.
  loaded = peft.load_adapters(adapters)
  lora = {k: v for k, v in loaded.lora.items() if k == 'layers_0'}
  specs = [s for s in loaded.specs if s.path[0] == 'layers_0']
  fewer = tmp_path / 'fewer.safetensors'
  peft.save_adapters(fewer, lora, specs, metadata=loaded.metadata)
  assert_one_line_error(
      *run_cli('eval', '--tiny', *DATA, '--adapters', fewer), 1,
      r'does not hold the expected adapters: missing \[.layers_1/attn/')
  meta = json.loads(json.dumps(loaded.metadata))
  meta['peft_cli']['settings']['rank'] = 4
  claims_rank_4 = tmp_path / 'rank4.safetensors'
  peft.save_adapters(claims_rank_4, loaded.lora, loaded.specs, metadata=meta)
  assert_one_line_error(
      *run_cli('summary', '--tiny', '--adapters', claims_rank_4), 1,
      r"differs from the expected spec: .*'rank': \(8, 4\)")
  bare = tmp_path / 'bare.safetensors'
  peft.save_adapters(bare, loaded.lora, loaded.specs)
  assert_one_line_error(
      *run_cli('sample', '--tiny', '--adapters', bare), 1,
      r"holds adapters but not the 'peft_cli' metadata")


def test_extra_or_missing_config_fields_are_named(trained, tmp_path):
  workdir, _ = trained
  loaded = peft.load_adapters(workdir / 'adapters.safetensors')
  meta = json.loads(json.dumps(loaded.metadata))
  config = meta['peft_cli']['base']['config']
  config['rope_scaling'] = 2.0
  del config['max_len']
  odd = tmp_path / 'odd.safetensors'
  peft.save_adapters(odd, loaded.lora, loaded.specs, metadata=meta)
  assert_one_line_error(
      *run_cli('eval', '--tiny', *DATA, '--adapters', odd), 1,
      r"its config differs from 'tiny' in \{'max_len': \(<absent>, 256\), "
      r"'rope_scaling': \(2\.0, <absent>\)\} \(file, base\)")


def test_files_from_before_the_gemma3_config_fields_still_load(trained,
                                                              tmp_path):
  workdir, _ = trained
  loaded = peft.load_adapters(workdir / 'adapters.safetensors')
  meta = json.loads(json.dumps(loaded.metadata))
  config = meta['peft_cli']['base']['config']
  for name in ('qk_norm', 'post_norms', 'sliding_window',
               'sliding_window_pattern', 'rope_local_theta',
               'attn_logit_softcap', 'final_logit_softcap'):
    del config[name]
  older = tmp_path / 'older.safetensors'
  peft.save_adapters(older, loaded.lora, loaded.specs, metadata=meta)
  status, out, err = run_cli('summary', '--tiny', '--adapters', older)
  assert status == 0, err
  assert 'trainable' in out, out


# Outputs that cannot be written fail before any work.


@pytest.fixture
def read_only(tmp_path):
  """An empty directory no one can write in, root included."""
  path = tmp_path / 'read_only'
  path.mkdir()
  if os.geteuid() != 0:
    path.chmod(0o555)
    undo = [lambda: path.chmod(0o755)]
  elif shutil.which('chattr') and subprocess.run(
      ['chattr', '+i', path], capture_output=True).returncode == 0:
    # Root writes through permission bits, not into an immutable directory.
    undo = [lambda: subprocess.run(['chattr', '-i', path], check=True)]
  else:
    pytest.skip('root writes through permission bits, and chattr +i (an '
                'immutable directory) is unavailable here')
  try:
    try:
      (path / 'probe').mkdir()
    except OSError:
      pass
    else:
      pytest.skip(f'could not make {path} read-only')
    yield path
  finally:
    undo[0]()


@pytest.mark.parametrize('argv, match', [
    (('finetune', '--workdir', '{ro}'),
     r"--workdir '{ro}': cannot write 'adapters.safetensors' in '{ro}' "
     r'\(.+\)\. Make it writable, or pass another --workdir \(or --out\)\.'),
    (('finetune', '--out', '{ro}/a.safetensors'),
     r"--out '{ro}/a.safetensors': cannot write 'a.safetensors' in '{ro}' "
     r'\(.+\)\. Make it writable, or pass another --out\.'),
    (('finetune', '--workdir', '{tmp}', '--plot', '{ro}/loss.png'),
     r"--plot '{ro}/loss.png': cannot write 'loss.png' in '{ro}'"),
    (('finetune', '--workdir', '{ro}/new'),
     r"--workdir '{ro}/new': cannot create the directory '{ro}/new' \(.+\)\. "
     r'Pass a path in a writable directory, or another --workdir \(or '
     r'--out\)\.'),
    (('merge', '--workdir', '{ro}', '--adapters', 'nowhere.safetensors'),
     r"--workdir '{ro}': cannot write 'merged' in '{ro}'"),
    (('merge', '--out', '{ro}/m.safetensors', '--adapters', 'nowhere'),
     r"--out '{ro}/m.safetensors': cannot write 'm.safetensors' in '{ro}'"),
    (('merge', '--out', '{ro}', '--adapters', 'nowhere.safetensors'),
     r"--out '{ro}': cannot replace the old directory '{ro}' \(.+\)\. Make "
     r'it writable, or pass another --out\.'),
    (('demo', '--workdir', '{ro}'),
     r"--workdir '{ro}': cannot write 'adapters.safetensors' in '{ro}' "
     r'\(.+\)\. Make it writable, or pass another --workdir\.'),
])
def test_unwritable_output_fails_before_any_work(read_only, argv, match):
  ro = str(read_only)
  argv = [a.format(ro=ro, tmp=read_only.parent) for a in argv]
  # A missing --adapters file would fail the run, were outputs checked later.
  status, out, err = run_cli(argv[0], '--tiny', *argv[1:])
  assert_one_line_error(status, out, err, 1,
                        match.format(ro=re.escape(ro)))
  assert out == ''  # No model loaded, no step taken.
  assert os.listdir(read_only) == []


@pytest.mark.parametrize('argv, match', [
    (('finetune', '--out', '{tmp}'),
     r"--out '{tmp}': '{tmp}' is a directory where a file must go. Pass "
     r'another --out\.'),
    (('merge', '--adapters', 'nowhere', '--out', '{tmp}/file'),
     r"--out '{tmp}/file': '{tmp}/file' is a file where a directory must "
     r'go. Pass another --out\.'),
    (('finetune', '--workdir', '{tmp}/file'),
     r"--workdir '{tmp}/file': '{tmp}/file' is a file where a directory "
     r'must go. Pass another --workdir \(or --out\)\.'),
    (('finetune', '--workdir', '{tmp}', '--out', '{tmp}/x', '--plot',
      '{tmp}/../{name}/x'),
     r"--out and --plot both name '{tmp}/x'; one output would overwrite the "
     r'other. Pass two different paths\.'),
])
def test_misplaced_output_fails_before_any_work(tmp_path, argv, match):
  (tmp_path / 'file').write_text('old')
  tmp = str(tmp_path)
  argv = [a.format(tmp=tmp, name=tmp_path.name) for a in argv]
  status, out, err = run_cli(argv[0], '--tiny', *argv[1:])
  assert_one_line_error(status, out, err, 1,
                        match.format(tmp=re.escape(tmp)))
  assert out == ''
  assert tree_of_files(tmp_path) == {pathlib.Path('file'): b'old'}


# Broken base checkpoints: one line naming the file and the fix.


def _damage(path, damage):
  path.write_bytes(damage(path.read_bytes()))


@pytest.mark.parametrize('file, damage, match', [
    ('config.json', lambda data: data[:len(data) // 2],
     r"'{d}/config.json' is not valid JSON \(.+\). Fix or regenerate"),
    ('config.json', lambda data: b'\x80' + data,
     r"'{d}/config.json' is not valid JSON \(.+\). Fix or regenerate"),
    ('config.json', None, r"no config.json in '{d}'. Pass a Hugging Face"),
    ('model.safetensors', None, r"no \*.safetensors file in '{d}'"),
    ('model.safetensors', lambda data: data[:len(data) // 2],
     r"'{d}/model.safetensors' is not a readable safetensors file \(.+\); it "
     r'is truncated or corrupt. Save or copy the weights again\.'),
    ('model.safetensors', lambda data: data[:7],
     r"'{d}/model.safetensors' is not a readable safetensors file"),
    ('tokenizer.json', lambda data: data[:len(data) // 2],
     r"'{d}/tokenizer.json' is not a readable tokenizer file \(.+\). Replace "
     r"it with the model's own tokenizer.json\."),
])
@pytest.mark.parametrize('flag', ('--hf-dir', '--merged'))
def test_broken_checkpoint_dir(tmp_path, file, damage, match, flag):
  directory = _tiny_hf_dir(tmp_path / 'hf')
  if damage is None:
    (directory / file).unlink()
  else:
    _damage(directory / file, damage)
  model = ['--tiny'] if flag == '--merged' else []
  result = run_cli('eval', *model, *DATA, flag, directory)
  assert_one_line_error(*result, 1, match.format(d=re.escape(str(directory))))


def _tiny_gguf(path):
  import gguf  # pylint: disable=g-import-not-at-top

  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_block_count(1)
  writer.add_tensor('token_embd.weight', np.ones((8, 4), np.float32))
  writer.add_tensor('output_norm.weight', np.ones((4,), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.mark.parametrize('damage, match', [
    (lambda data: data[:len(data) // 2],
     r"'{f}' is a truncated or corrupt GGUF file \(.+\). Download or convert "
     r'it again\.'),
    (lambda data: data[:24], r"'{f}' is a truncated or corrupt GGUF file"),
    (lambda data: b'XXXX' + data[4:],
     r"'{f}' is not a GGUF file: it starts with b'XXXX', not b'GGUF'. Pass a "
     r'.gguf file written by llama.cpp\.'),
    (lambda data: b'', r"'{f}' is not a GGUF file: it starts with b''"),
])
def test_broken_gguf_file(tmp_path, damage, match):
  path = _tiny_gguf(tmp_path / 'model.gguf')
  _damage(path, damage)
  assert_one_line_error(*run_cli('summary', '--gguf', path), 1,
                        match.format(f=re.escape(str(path))))


# Ctrl-C: status 130, one line, every output whole.


class Exited(Exception):
  """What `interrupt` raises here instead of ending the test process."""


@pytest.fixture
def exits(monkeypatch):
  """Fakes the process exit; records the workdir at that moment."""
  seen = {}

  def hard_exit(status):
    seen['status'] = status
    seen['files'] = tree_of_files(seen['dir'])
    raise Exited

  monkeypatch.setattr(interrupt, '_hard_exit', hard_exit)
  monkeypatch.setattr(interrupt._State, 'ending', False)
  monkeypatch.setattr(interrupt._State, 'pending', False)
  monkeypatch.setattr(interrupt._State, 'scratch', set())
  return seen


def sigint():
  interrupt._on_sigint(signal.SIGINT, None)


def test_interrupt_while_writing_keeps_old_output(tmp_path, exits, capfd):
  exits['dir'] = tmp_path
  out = tmp_path / 'adapters.safetensors'
  out.write_bytes(b'old')
  with pytest.raises(Exited), base_lib.staged(out) as tmp:
    tmp.write_bytes(b'half writ')
    sigint()
  # The handler itself removed the scratch: `os._exit` runs no `finally`.
  assert exits == {'dir': tmp_path, 'status': 130,
                   'files': {pathlib.Path(out.name): b'old'}}
  assert capfd.readouterr().err.endswith(': interrupted\n')


@pytest.mark.parametrize('as_dir', (False, True))
def test_interrupt_during_the_swap_waits_for_it(tmp_path, exits, monkeypatch,
                                                as_dir, capfd):
  exits['dir'] = tmp_path
  out = tmp_path / 'merged'
  if as_dir:
    out.mkdir()
    (out / 'old.txt').write_text('old')
  else:
    out.write_text('old')
  replace = os.replace

  def interrupted_replace(src, dst):
    replace(src, dst)
    sigint()  # Between the renames that swap a directory.

  monkeypatch.setattr(os, 'replace', interrupted_replace)
  with pytest.raises(Exited), base_lib.staged(out) as tmp:
    if as_dir:
      tmp.mkdir()
      (tmp / 'new.txt').write_text('new')
    else:
      tmp.write_text('new')
  new = pathlib.Path('merged/new.txt' if as_dir else 'merged')
  assert exits['files'] == {new: b'new'}
  assert capfd.readouterr().err.count('interrupted') == 1


def test_keyboard_interrupt_between_renames_keeps_old_dir(tmp_path,
                                                         monkeypatch):
  # In-process callers of `main` get Python's KeyboardInterrupt instead.
  out = tmp_path / 'merged'
  out.mkdir()
  (out / 'old.txt').write_text('old')
  replace, calls = os.replace, []

  def interrupted_replace(src, dst):
    replace(src, dst)
    calls.append(dst)
    if len(calls) == 1:  # Right after the old output is moved aside.
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt), base_lib.staged(out) as tmp:
    tmp.mkdir()
    (tmp / 'new.txt').write_text('new')
    monkeypatch.setattr(os, 'replace', interrupted_replace)
  monkeypatch.undo()
  assert tree_of_files(tmp_path) == {pathlib.Path('merged/old.txt'): b'old'}
  assert os.listdir(tmp_path) == ['merged']


def test_install_for_cli_leaves_other_programs_alone():
  before = signal.getsignal(signal.SIGINT)
  interrupt.install_for_cli()  # This process is pytest.
  assert signal.getsignal(signal.SIGINT) is before


def test_interrupt_in_process(monkeypatch):
  from peft._cli import quickstart  # pylint: disable=g-import-not-at-top

  def run(args):
    raise KeyboardInterrupt

  monkeypatch.setattr(quickstart, 'run', run)
  assert run_cli('quickstart') == (
      130, '', 'python -m peft quickstart: interrupted\n')


@contextlib.contextmanager
def sigint_not_ignored():
  """Children get SIGINT even if this process ignores it (a background job)."""
  ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  if ignored:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    yield
  finally:
    if ignored:
      signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupted_cli(workdir, marker, delay=0.0):
  """Runs `finetune` in a process; SIGINT once `marker` shows (+ `delay`).

  `-X importtime` marks each finished import on stderr, so the signal lands
  in a known phase: while an import runs, or (on stdout) while training.

  Returns:
    (status, stdout, stderr without the import-time lines).
  """
  argv = [sys.executable, '-X', 'importtime', '-m', 'peft', 'finetune',
          '--tiny', '--workdir', workdir, *DATA, '--batch-size', '2',
          '--steps', '1000000', '--eval-every', '0']
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  with sigint_not_ignored():
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            cwd=workdir)
  lines, seen = queue.Queue(), {'stdout': [], 'stderr': []}

  def read(name):
    for line in getattr(proc, name):
      seen[name].append(line)
      lines.put((name, line))
    lines.put((name, None))

  readers = [threading.Thread(target=read, args=(n,), daemon=True)
             for n in seen]
  for reader in readers:
    reader.start()
  try:
    stream, pattern = marker
    while True:
      name, line = lines.get(timeout=120)
      assert line is not None, f'{marker} never came: {seen}'
      if name == stream and re.search(pattern, line):
        break
    if delay:
      threading.Event().wait(delay)
    proc.send_signal(signal.SIGINT)
    closed = 0
    while closed < 2:  # Until the process closes stdout and stderr.
      name, line = lines.get(timeout=30)
      closed += line is None
      if name == 'stdout' and line is not None:  # It carried on.
        seen['stderr'].append(f'carried on after SIGINT: {line}')
        proc.kill()
        break
    status = proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  for reader in readers:
    reader.join(timeout=10)
  err = ''.join(line for line in seen['stderr']
                if not line.startswith('import time:'))
  return status, ''.join(seen['stdout']), err


def _imported(module):
  return ('stderr', rf'^import time:.*\|\s*{re.escape(module)}$')


@pytest.mark.parametrize('marker, delay', [
    pytest.param(_imported('site'), 0.2, id='0.2s-after-start'),
    pytest.param(_imported('jax._src.core'), 0.0, id='importing-jax'),
    pytest.param(_imported('peft._cli.base'), 0.0, id='importing-the-cli'),
    # Once training has begun, Ctrl-C writes a checkpoint first
    # (tests/cli_train_test.py).
])
def test_ctrl_c_exits_130_with_one_line(tmp_path, marker, delay):
  (tmp_path / 'adapters.safetensors').write_bytes(b'old adapters')
  (tmp_path / 'loss.png').write_bytes(b'old plot')
  before = tree_of_files(tmp_path)
  status, out, err = interrupted_cli(tmp_path, marker, delay)
  assert (status, err) == (130, 'python -m peft finetune: interrupted\n'), (
      out, err)
  assert tree_of_files(tmp_path) == before
  assert sorted(os.listdir(tmp_path)) == ['adapters.safetensors', 'loss.png']
