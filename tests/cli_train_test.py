"""`finetune`'s training flags, checkpoints, metrics and `sample --chat`.

Every run is on the tiny random model, in-process except where a real
process is the point (Ctrl-C, the persistent compilation cache). Claims are
checked against values: resumed runs bit for bit against uninterrupted
ones, gradient accumulation against one big batch, the learning rates
against the schedule's formula, bfloat16 losses against the bfloat16 model
run by hand.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import peft
from peft import models
from peft._cli import base as base_lib
from peft._cli import checkpoints
from peft._cli import compile_cache
from peft._cli import metrics as metrics_lib
from peft._cli import xla_flags
from tests.cli_test import DATA
from tests.cli_test import assert_one_line_error
from tests.cli_test import run_cli

TINY = ('--tiny', *DATA)


def finetune(workdir, *argv):
  """Runs `finetune --tiny` in `workdir`; returns its stdout."""
  status, out, err = run_cli('finetune', *TINY, '--workdir', workdir, *argv)
  assert status == 0, err
  return out


def metrics(workdir):
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


def step_lines(workdir):
  return [m for m in metrics(workdir) if 'loss' in m]


def losses(workdir):
  return [m['loss'] for m in step_lines(workdir)]


def tensors(path):
  return load_file(str(path))


def assert_bitwise_equal(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def assert_close(a, b, tol):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=tol, atol=tol,
                               err_msg=key)


@pytest.fixture(scope='module')
def run6(tmp_path_factory):
  """6 steps, a checkpoint every 2 (the newest 2 kept), eval every 3."""
  workdir = tmp_path_factory.mktemp('run6')
  out = finetune(workdir, '--steps', '6', '--batch-size', '2',
                 '--save-every', '2', '--eval-every', '3')
  return workdir, out


def test_metrics_have_a_line_per_step_and_per_evaluation(run6):
  workdir, out = run6
  lines = metrics(workdir)
  assert [(m['step'], 'loss' in m) for m in lines] == [
      (0, False), (1, True), (2, True), (3, True), (3, False), (4, True),
      (5, True), (6, True), (6, False)]
  state = json.loads(
      (workdir / 'checkpoints/step_00000006/state.json').read_text())
  assert losses(workdir) == state['losses']
  evals = [m for m in lines if 'eval_loss' in m]
  assert [(m['step'], m['eval_perplexity']) for m in evals] == [
      tuple(e) for e in state['evals']]
  for m in evals:
    assert m['eval_loss'] == pytest.approx(math.log(m['eval_perplexity']))
  assert step_lines(workdir)[0]['tokens_per_s'] is None  # It compiled.
  assert all(m['tokens_per_s'] > 0 for m in step_lines(workdir)[1:])
  assert all(m['target_tokens'] == 2 * 32 for m in step_lines(workdir))
  assert f'{workdir / "metrics.jsonl"}' in out


def test_learning_rates_follow_warmup_then_cosine(run6):
  workdir, _ = run6
  # The default: 1 warm-up step (a tenth of 6, at least 1) from peak/10,
  # then cosine decay over the other 5 steps to peak/10.
  peak, low = 3e-3, 3e-4
  want = [low] + [low + (peak - low) * 0.5 * (1 + math.cos(math.pi * k / 5))
                  for k in range(5)]
  got = [m['lr'] for m in step_lines(workdir)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_constant_schedule_and_warmup_steps(tmp_path):
  finetune(tmp_path, '--steps', '4', '--batch-size', '2', '--warmup-steps',
           '2', '--lr-schedule', 'constant', '--learning-rate', '1e-2',
           '--eval-every', '0')
  np.testing.assert_allclose([m['lr'] for m in step_lines(tmp_path)],
                             [1e-3, 5.5e-3, 1e-2, 1e-2], rtol=1e-6)


def test_no_warmup_starts_at_the_peak(tmp_path):
  finetune(tmp_path, '--steps', '3', '--batch-size', '2', '--warmup-steps',
           '0', '--eval-every', '0')
  lrs = [m['lr'] for m in step_lines(tmp_path)]
  # The decay reaches its floor (peak/10) as the run ends, after step 3.
  want = [3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * k / 3))
          for k in range(3)]
  np.testing.assert_allclose(lrs, want, rtol=1e-6)


def test_checkpoints_keep_the_newest(run6):
  workdir, _ = run6
  names = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert names == ['step_00000004', 'step_00000006']
  # A checkpoint's adapters are an adapter file like the final one.
  assert_bitwise_equal(
      tensors(workdir / 'checkpoints/step_00000006/adapters.safetensors'),
      tensors(workdir / 'adapters.safetensors'))


def test_resume_ends_bit_identical_to_the_uninterrupted_run(run6, tmp_path):
  workdir, _ = run6
  shutil.copy(workdir / 'metrics.jsonl', tmp_path / 'metrics.jsonl')
  out = finetune(tmp_path, '--steps', '6', '--batch-size', '2',
                 '--save-every', '2', '--eval-every', '3', '--resume',
                 workdir / 'checkpoints/step_00000004')
  assert 'resumed at step 4 of 6' in out
  assert_bitwise_equal(tensors(tmp_path / 'adapters.safetensors'),
                       tensors(workdir / 'adapters.safetensors'))
  # The log keeps its first 4 steps and continues with the same values.
  assert losses(tmp_path) == losses(workdir)
  ours, theirs = metrics(tmp_path), metrics(workdir)
  for m in (*ours, *theirs):
    m.pop('tokens_per_s', None)
  assert ours == theirs


def test_resume_picks_the_newest_checkpoint(run6, tmp_path):
  workdir, _ = run6
  shutil.copytree(workdir / 'checkpoints', tmp_path / 'checkpoints')
  out = finetune(tmp_path, '--steps', '6', '--batch-size', '2',
                 '--save-every', '2', '--eval-every', '3', '--resume')
  assert 'resumed at step 6 of 6' in out
  assert_bitwise_equal(tensors(tmp_path / 'adapters.safetensors'),
                       tensors(workdir / 'adapters.safetensors'))


@pytest.mark.parametrize('change, match', [
    (('--learning-rate', '0.01'),
     r'from another run \(learning_rate: 0.003 there, 0.01 now\)'),
    (('--steps', '7'), r'steps: 6 there, 7 now'),
    (('--max-plays', '2'), r'data_digest: .* max_plays: 1 there, 2 now'),
])
def test_resume_refuses_another_runs_checkpoint(run6, tmp_path, change,
                                                match):
  workdir, _ = run6
  argv = ['--steps', '6', '--batch-size', '2', '--eval-every', '3',
          '--resume', workdir / 'checkpoints']
  for flag, value in zip(change[::2], change[1::2]):
    if flag in argv:
      argv[argv.index(flag) + 1] = value
    else:
      argv += [flag, value]
  status, out, err = run_cli('finetune', '--tiny', '--seq-len', '32',
                             '--eval-windows', '2', *(
                                 [] if '--max-plays' in argv
                                 else ['--max-plays', '1']),
                             '--workdir', tmp_path, *argv)
  assert_one_line_error(status, out, err, 1, match)
  assert not (tmp_path / 'adapters.safetensors').exists()


def _broken_checkpoint(run6, tmp_path, damage):
  workdir, _ = run6
  copy = tmp_path / 'step_00000004'
  shutil.copytree(workdir / 'checkpoints/step_00000004', copy)
  damage(copy)
  return copy


@pytest.mark.parametrize('damage, match', [
    (lambda p: (p / 'state.json').write_text('{'),
     r"cannot read state.json \(.*\)\. Resume from another checkpoint"),
    (lambda p: (p / 'state.json').write_text('{"format": "x"}'),
     r'is not a version-1 finetune checkpoint'),
    (lambda p: (p / 'optimizer.safetensors').write_bytes(
        (p.parent.parent / 'empty.safetensors').read_bytes()),
     r'the optimizer state does not fit'),
    (lambda p: (p / 'adapters.safetensors').unlink(),
     r'adapters.safetensors'),
])
def test_a_broken_checkpoint_is_named(run6, tmp_path, damage, match):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({'x': np.zeros(1, np.float32)}, str(tmp_path / 'empty.safetensors'))
  (tmp_path / 'sub').mkdir()
  broken = _broken_checkpoint(run6, tmp_path / 'sub', damage)
  status, out, err = run_cli(
      'finetune', *TINY, '--workdir', tmp_path, '--steps', '6',
      '--batch-size', '2', '--eval-every', '3', '--resume', broken)
  assert_one_line_error(status, out, err, 1, match)
  assert str(broken) in err


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path):
  status, out, err = run_cli('finetune', *TINY, '--workdir', tmp_path,
                             '--resume')
  assert_one_line_error(
      status, out, err, 1,
      rf"--checkpoint-dir '{re.escape(str(tmp_path))}/checkpoints' holds no "
      r'checkpoint .* drop --resume to start afresh')


@pytest.fixture(scope='module')
def batch4(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('batch4')
  finetune(workdir, '--steps', '3', '--batch-size', '4', '--eval-every', '0')
  return workdir


def assert_trains_like(workdir, expected, tol):
  """`workdir`'s run has `expected`'s losses and adapters, to `tol`."""
  np.testing.assert_allclose(losses(workdir), losses(expected), rtol=tol)
  assert_close(tensors(workdir / 'adapters.safetensors'),
               tensors(expected / 'adapters.safetensors'), tol)


def test_grad_accum_equals_one_bigger_batch(batch4, tmp_path):
  finetune(tmp_path, '--steps', '3', '--batch-size', '2', '--grad-accum', '2',
           '--eval-every', '0')
  assert_trains_like(tmp_path, batch4, 1e-5)
  assert all(m['target_tokens'] == 4 * 32 for m in step_lines(tmp_path))


def test_remat_changes_no_number(batch4, tmp_path):
  finetune(tmp_path, '--steps', '3', '--batch-size', '4', '--eval-every', '0',
           '--remat')
  assert_trains_like(tmp_path, batch4, 1e-6)


def test_scan_layers_trains_like_the_unrolled_blocks(batch4, tmp_path):
  # Same losses and adapters (float rounding apart), written unrolled.
  finetune(tmp_path, '--steps', '3', '--batch-size', '4', '--eval-every', '0',
           '--scan-layers', '--remat')
  assert_trains_like(tmp_path, batch4, 1e-5)
  evals = [m['eval_perplexity'] for m in metrics(tmp_path)
           if 'eval_perplexity' in m]
  expected = [m['eval_perplexity'] for m in metrics(batch4)
              if 'eval_perplexity' in m]
  assert len(evals) == 2  # Before the first step and after the last.
  np.testing.assert_allclose(evals, expected, rtol=1e-5)


def test_scan_layers_trains_adapters_of_some_blocks_like_unrolled(tmp_path):
  # Attention adapted in block 1 only, the MLP in block 0 only: the loop
  # runs zero adapters where a block has none, and saves only the real ones.
  argv = ('--steps', '3', '--batch-size', '4', '--eval-every', '0',
          '--targets', 'layers_1/attn/.*', 'layers_0/mlp')
  finetune(tmp_path / 'unrolled', *argv)
  finetune(tmp_path / 'scan', *argv, '--scan-layers')
  assert_trains_like(tmp_path / 'scan', tmp_path / 'unrolled', 1e-5)
  blocks = {k.split('/')[0] + '/' + k.split('/')[1]
            for k in tensors(tmp_path / 'scan/adapters.safetensors')}
  assert blocks == {'layers_1/attn', 'layers_0/mlp'}


def test_scan_layers_with_qlora_and_dropout_resumes_bit_identically(tmp_path):
  argv = ('--steps', '4', '--batch-size', '2', '--eval-every', '0',
          '--quantize', 'int8', '--dropout', '0.1')
  whole = tmp_path / 'whole'
  finetune(whole, *argv, '--scan-layers', '--save-every', '2')
  checkpoint = whole / 'checkpoints' / 'step_00000002'
  resumed = tmp_path / 'resumed'
  out = finetune(resumed, *argv, '--scan-layers', '--resume', checkpoint)
  assert 'resumed at step 2 of 4' in out
  assert_bitwise_equal(tensors(resumed / 'adapters.safetensors'),
                       tensors(whole / 'adapters.safetensors'))
  # Scanned dropout draws other masks than the unrolled model's, so an
  # unrolled run may not continue a scanned one.
  status, out, err = run_cli('finetune', *TINY, '--workdir', tmp_path / 'x',
                             *argv, '--resume', checkpoint)
  assert_one_line_error(status, out, err, 1,
                        'scan_layers: True there, False now')


@pytest.mark.parametrize('argv, match', [
    (('--targets', r'layers_0/attn/.*', '--use-dora'),
     r'--scan-layers with --use-dora needs every block adapted alike, but '
     r'layers_1 lacks attn/attn_vec_einsum/lora_w/a .*Pass --targets that '
     'select the same layers in every block, or drop --scan-layers'),
])
def test_scan_layers_errors(tmp_path, argv, match):
  status, out, err = run_cli('finetune', *TINY, '--workdir', tmp_path,
                             '--steps', '1', '--scan-layers', *argv)
  assert_one_line_error(status, out, err, 1, match)


def _first_batch(n_rows):
  """The tiny model's train windows of the first step (seed 0, 4 rows)."""
  base = base_lib.load_base(base_lib.TINY)
  train = base_lib.windows(base, split='train', length=33, max_plays=1)
  rows = next(models.batches(np.arange(len(train))[:, None], batch_size=n_rows,
                             seed=0))[:, 0]
  return base, train[rows]


def _nll(logits, tokens):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, tokens[:, 1:, None], -1)
  return -picked.mean()


def test_bfloat16_computes_in_bfloat16_and_keeps_adapters_float32(batch4,
                                                                  tmp_path):
  finetune(tmp_path, '--steps', '3', '--batch-size', '4', '--eval-every', '0',
           '--dtype', 'bfloat16', '--save-every', '3')
  base, tokens = _first_batch(4)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base.params)
  def logits(params, dtype):
    model = models.Decoder(config=base.config, dtype=dtype)
    return model.apply({'params': params}, tokens[:, :-1])

  logits = jax.jit(logits, static_argnums=1)
  by_hand = _nll(logits(bf16, jnp.bfloat16), tokens)
  in_float32 = _nll(logits(base.params, jnp.float32), tokens)
  first = losses(tmp_path)[0]  # B = 0: the base model's loss.
  assert first == pytest.approx(by_hand, rel=2e-3)
  assert first != losses(batch4)[0]  # It did not run in float32.
  assert losses(batch4)[0] == pytest.approx(in_float32, rel=1e-5)
  assert {a.dtype for a in tensors(tmp_path / 'adapters.safetensors').values()
          } == {np.dtype(np.float32)}
  state = tensors(tmp_path / 'checkpoints/step_00000003/optimizer.safetensors')
  assert {a.dtype for a in state.values() if a.ndim} == {np.dtype(np.float32)}
  assert all(np.isfinite(losses(tmp_path)))


def test_epochs_count_whole_steps_and_max_steps_caps_them(tmp_path):
  base = base_lib.load_base(base_lib.TINY)
  n = len(base_lib.windows(base, split='train', length=33, max_plays=1))
  out = finetune(tmp_path, '--epochs', '0.5', '--batch-size', '4',
                 '--eval-every', '0')
  want = math.ceil(0.5 * (n // 4))
  assert f'{want} steps: 0.5 epochs of {n} examples, {n // 4} steps each' in (
      out)
  assert len(step_lines(tmp_path)) == want
  finetune(tmp_path, '--epochs', '3', '--max-steps', '2', '--batch-size', '4',
           '--eval-every', '0')
  assert len(step_lines(tmp_path)) == 2


@pytest.mark.parametrize('argv, code, match', [
    (('--grad-accum', '0'), 2,
     r"argument --grad-accum: expected a whole number >= 1; got '0'"),
    (('--epochs', '-1'), 2, r"argument --epochs: expected a number in"),
    (('--dtype', 'float16'), 2, r"invalid choice: 'float16'"),
    (('--steps', '4', '--warmup-steps', '5'), 1,
     r'--warmup-steps 5 exceeds the 4 steps of the run'),
    (('--batch-size', '500', '--grad-accum', '9'), 1,
     r'--batch-size 500 x --grad-accum 9 exceeds the \d+ training examples'),
    (('--metrics', 'same', '--plot', 'same'), 1,
     r"--plot and --metrics both name 'same'"),
])
def test_training_flag_errors(tmp_path, argv, code, match):
  status, out, err = run_cli('finetune', *TINY, '--workdir', tmp_path, *argv)
  assert_one_line_error(status, out, err, code, match)


def test_metrics_log_keeps_the_lines_before_a_resume(tmp_path):
  path = tmp_path / 'm.jsonl'
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n'
                  '{"step": 3, "lo')  # Cut short by a Ctrl-C.
  with metrics_lib.MetricsLog(path, resume_after=1) as log:
    log.write(step=2, loss=float('nan'))
  assert path.read_text() == ('{"step": 1, "loss": 3.0}\n'
                              '{"step": 2, "loss": "nan"}\n')


def test_sample_chat_answers_the_message_in_the_chat_template(tmp_path):
  status, out, err = run_cli('sample', '--tiny', '--chat', 'Hi there',
                             '--max-new-tokens', '5')
  assert status == 0, err
  base = base_lib.load_base(base_lib.TINY)
  tok = base.tokenizer
  ids = tok.encode_chat('Hi there')
  assert ids[:1] == [1]  # The template's <|im_start|>, a special id.
  model = jax.jit(lambda p, t: models.Decoder(config=base.config).apply(
      {'params': p}, t))
  buffer = np.zeros((1, 64), np.int32)
  buffer[0, :len(ids)] = ids
  new = []
  for i in range(len(ids), len(ids) + 5):
    token = int(jnp.argmax(model(base.params, jnp.asarray(buffer))[0, i - 1]))
    if token in tok.stop_ids:
      break
    buffer[0, i] = token
    new.append(token)
  assert out == f'--- base (greedy) ---\n> Hi there\n{tok.decode(new)}\n'


@pytest.mark.parametrize('argv, match', [
    (('--chat', 'Hi', '--prompt', 'x'),
     r"--chat 'Hi' and --prompt both give the prompts"),
    (('--chat', 'Hi', '--data', 'rows.jsonl'),
     r'--chat MESSAGE and --data both give the prompts'),
])
def test_sample_chat_conflicts(argv, match):
  assert_one_line_error(*run_cli('sample', '--tiny', *argv), 1, match)


def _cli_process(workdir, *argv, env=None):
  command = [sys.executable, '-m', 'peft', 'finetune', *TINY, '--workdir',
             str(workdir), *(str(a) for a in argv)]
  return subprocess.Popen(command, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=workdir,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1',
                               **(env or {})})


def test_ctrl_c_writes_a_checkpoint_that_resumes_bit_identically(tmp_path):
  from tests.cli_test import sigint_not_ignored  # pylint: disable=g-import-not-at-top

  argv = ('--steps', '200', '--batch-size', '2', '--eval-every', '0')
  stopped = tmp_path / 'stopped'
  stopped.mkdir()
  (stopped / 'adapters.safetensors').write_bytes(b'old adapters')
  (stopped / 'loss.png').write_bytes(b'old plot')
  with sigint_not_ignored():
    proc = _cli_process(stopped, *argv)
  try:
    # Once step 0 is printed, training has begun: signal during step 1.
    for line in proc.stdout:
      if line.startswith('step 0'):
        break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 130, err
  found = re.search(r'interrupted at step (\d+); checkpoint in (\S+); go on '
                    r'with the same command and --resume\n$', err)
  assert found, err
  assert err.startswith('Ctrl-C: stopping after this step to write a '
                        'checkpoint (Ctrl-C again to quit without one)\n')
  step = int(found[1])
  assert 1 <= step < 200
  assert pathlib.Path(found[2]) == (
      stopped / f'checkpoints/step_{step:08d}')
  assert (stopped / 'adapters.safetensors').read_bytes() == b'old adapters'
  assert (stopped / 'loss.png').read_bytes() == b'old plot'
  assert sorted(os.listdir(stopped)) == [
      'adapters.safetensors', 'checkpoints', 'loss.png', 'metrics.jsonl']
  assert len(step_lines(stopped)) == step

  out = finetune(stopped, *argv, '--resume')
  assert f'resumed at step {step} of 200' in out
  whole = tmp_path / 'whole'
  finetune(whole, *argv)
  assert_bitwise_equal(tensors(stopped / 'adapters.safetensors'),
                       tensors(whole / 'adapters.safetensors'))
  assert losses(stopped) == losses(whole)


def test_a_second_run_compiles_from_the_persistent_cache(tmp_path):
  cache = tmp_path / 'cache'
  argv = ('--steps', '2', '--batch-size', '2', '--eval-every', '0')
  # Every program is cached, however long it took to compile: a program
  # that compiled under the CLI's 0.2 s threshold in the first run could
  # cross it in the second on a loaded machine, and be written then.
  env = {compile_cache.ENV: str(cache),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}

  def run():
    proc = _cli_process(tmp_path, *argv, env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return sorted(p.name for p in cache.iterdir())

  first = run()
  assert first  # The step, the evaluation and the init were written.
  mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  time.sleep(0.01)
  assert run() == first  # All found: nothing new was compiled.
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes


# Compiles the tiny model's LoRA gradient (8 layers, 512 tokens) with and
# without remat after `xla_flags.apply()`, as `python -m peft` starts, and
# prints XLA's temporary bytes of each.
_TEMPS = """
import json
from peft._cli import xla_flags
xla_flags.apply()
import dataclasses, jax, jax.numpy as jnp, optax
import peft
from peft import models
config = dataclasses.replace(models.tiny_config(), n_layers=8)
frozen = models.random_params(config)
tokens = jnp.zeros((1, 513), jnp.int32)
temps = {}
for remat in (False, True):
  model = models.Decoder(config=config, remat=remat)
  surgery = peft.lora(4, targets=('.*attn/.*', '.*mlp'))
  with surgery:
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens[:, :1])
  lora = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      peft.split_params(shapes['params']).lora)
  def loss(lora, frozen, t):
    with surgery:
      logits = model.apply({'params': peft.merge_params(frozen, lora)},
                           t[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, t[:, 1:]).mean()
  compiled = jax.jit(jax.grad(loss)).lower(lora, frozen, tokens).compile()
  temps[remat] = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps([temps[False], temps[True]]))
"""


def _temps(xla_flags_env):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(xla_flags_env)
  proc = subprocess.run([sys.executable, '-c', _TEMPS], env=env, text=True,
                        capture_output=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.splitlines()[-1])


def test_the_cli_xla_flags_cut_memory_and_remat_cuts_it_under_either():
  # XLA:CPU's concurrency-optimized scheduler keeps more alive at once;
  # the CLI turns it off (peft._cli.xla_flags).
  plain, remat = _temps({})
  assert remat < 0.4 * plain, (plain, remat)
  # A user's own value wins. Remat still cuts memory under that scheduler:
  # each block's recomputation waits for its cotangent by a data
  # dependency (peft.models._remat), which no scheduler can reorder.
  on = {'XLA_FLAGS': '--xla_cpu_enable_concurrency_optimized_scheduler=true'}
  plain_on, remat_on = _temps(on)
  assert plain_on > 1.2 * plain, (plain, plain_on)
  assert remat_on < 0.4 * plain_on, (plain_on, remat_on)


def test_xla_flags_apply_keeps_the_users_values():
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  xla_flags.apply(environ)
  assert environ['XLA_FLAGS'] == (
      '--xla_force_host_platform_device_count=8 '
      '--xla_cpu_enable_concurrency_optimized_scheduler=false')
  environ = {}
  xla_flags.apply(environ)
  xla_flags.apply(environ)  # idempotent
  assert environ['XLA_FLAGS'] == (
      '--xla_cpu_enable_concurrency_optimized_scheduler=false')


def test_compile_cache_settings():
  assert compile_cache.directory({'XDG_CACHE_HOME': '/c', 'HOME': '/h'}) == (
      pathlib.Path('/c/peft/jax'))
  # The suite's own cache (tests/conftest.py) is configured, so it stays.
  ours = jax.config.jax_compilation_cache_dir
  assert compile_cache.enable({'PEFT_COMPILATION_CACHE': '/x'}) == (
      pathlib.Path(ours))
  assert jax.config.jax_compilation_cache_dir == ours
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    assert compile_cache.enable({'PEFT_COMPILATION_CACHE': 'off'}) is None
    assert compile_cache.enable({'JAX_COMPILATION_CACHE_DIR': '/theirs'}) == (
        pathlib.Path('/theirs'))  # JAX reads its own variable.
    assert jax.config.jax_compilation_cache_dir is None
    assert compile_cache.enable({'PEFT_COMPILATION_CACHE': '/x'}) == (
        pathlib.Path('/x'))
    assert jax.config.jax_compilation_cache_dir == '/x'
  finally:
    jax.config.update('jax_compilation_cache_dir', ours)


def test_checkpoint_digest_names_the_data():
  a = models.Examples(np.zeros((2, 3), np.int32), np.ones((2, 2), np.float32),
                      ('a', 'b'))
  b = models.Examples(np.zeros((2, 3), np.int32), np.zeros((2, 2), np.float32),
                      ('a', 'b'))
  assert checkpoints.data_digest(a) != checkpoints.data_digest(b)
  assert checkpoints.data_digest(a) == checkpoints.data_digest(a.take([0, 1]))


def test_decoder_remat_gives_the_same_gradients():
  config = models.tiny_config()
  tokens = jnp.array([[1, 5, 9, 2, 7]])

  def loss(p, remat):
    model = models.Decoder(config=config, remat=remat)
    with peft.lora(4, targets=('.*attn/.*', '.*mlp')):
      return jnp.sum(model.apply({'params': p}, tokens) ** 2)

  def init(key):
    with peft.lora(4, targets=('.*attn/.*', '.*mlp')):
      return models.Decoder(config=config, remat=True).init(key, tokens)

  # Random values in the params' shapes (B != 0), with no init to compile.
  rng = np.random.default_rng(0)
  adapted = jax.tree.map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
      jax.eval_shape(init, jax.random.key(1))['params'])
  plain = jax.jit(jax.grad(lambda p: loss(p, False)))(adapted)
  remat = jax.jit(jax.grad(lambda p: loss(p, True)))(adapted)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Each block is a checkpointed call (peft.models._remat), so the
  # gradient recomputes it rather than keeping its activations.
  jaxpr = str(jax.make_jaxpr(lambda p: loss(p, True))(adapted))
  assert jaxpr.count('custom_vjp_call') == config.n_layers
  plain_jaxpr = str(jax.make_jaxpr(lambda p: loss(p, False))(adapted))
  assert 'custom_vjp_call' not in plain_jaxpr


def test_the_finetune_guide_commands_run_as_written(tmp_path, monkeypatch):
  # docs/finetune.md's commands, with --tiny appended, after its Python
  # block wrote the data file.
  text = (pathlib.Path(__file__).parent.parent / 'docs/finetune.md'
          ).read_text()
  python = re.search(r'```python\n(.*?)```', text, re.S)[1]
  commands = re.findall(r'^\.venv/bin/python -m peft (.*)$', text, re.M)
  assert len(commands) == 4
  monkeypatch.chdir(tmp_path)
  exec(compile(python, 'finetune.md', 'exec'), {})  # noqa: S102
  outs = []
  for command in commands:
    status, out, err = run_cli(*shlex.split(command), '--tiny')
    assert status == 0, (command, err)
    outs.append(out)
  assert '4 steps: 4 epochs of 6 examples, 1 steps each' in outs[0]
  assert 'resumed at step 4 of 4' in outs[1]
  names = sorted(os.listdir(tmp_path / 'out/capitals/checkpoints'))
  assert names == ['step_00000002', 'step_00000004']
  assert len(step_lines(tmp_path / 'out/capitals')) == 4
  assert 'exact match' in outs[2]
  assert outs[3].startswith('--- fine-tuned (greedy) ---\n> What is the '
                            'capital of Peru?\n')


def test_weight_decay_is_decoupled_adamw(tmp_path):
  # After one step from the same init, AdamW's decay moves each adapter by
  # -lr * decay * its initial value, beside the same Adam update.
  from peft._cli import adapt  # pylint: disable=g-import-not-at-top

  argv = ('--steps', '1', '--batch-size', '2', '--eval-every', '0',
          '--warmup-steps', '1')
  finetune(tmp_path / 'plain', *argv)
  finetune(tmp_path / 'decay', *argv, '--weight-decay', '0.5')
  base = base_lib.load_base(base_lib.TINY)
  settings = adapt.Settings(targets=('.*attn/.*', '.*mlp'), rank=8,
                            alpha=16.0)
  fresh = adapt.adapt(base, settings)  # finetune's init (seed 0).
  peft.save_adapters(tmp_path / 'init.safetensors', fresh.lora, fresh.specs)
  init = tensors(tmp_path / 'init.safetensors')
  plain = tensors(tmp_path / 'plain/adapters.safetensors')
  decay = tensors(tmp_path / 'decay/adapters.safetensors')
  lr = 3e-4  # The first step's: a tenth of the peak.
  for key in init:
    # The difference of two float32 values near 0.1: a few ulps (7e-9).
    np.testing.assert_allclose(decay[key] - plain[key],
                               -lr * 0.5 * init[key], atol=4e-8, err_msg=key)
  assert any(np.abs(init[k]).max() > 0 for k in init)


def test_custom_metrics_and_checkpoint_paths(tmp_path):
  finetune(tmp_path, '--steps', '2', '--batch-size', '2', '--eval-every', '0',
           '--save-every', '1', '--keep-checkpoints', '1', '--metrics',
           tmp_path / 'logs/run.jsonl', '--checkpoint-dir', tmp_path / 'ck')
  lines = (tmp_path / 'logs/run.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [0, 1, 2, 2]
  assert not (tmp_path / 'metrics.jsonl').exists()
  assert [p.name for p in (tmp_path / 'ck').iterdir()] == ['step_00000002']
  out = finetune(tmp_path, '--steps', '2', '--batch-size', '2',
                 '--eval-every', '0', '--checkpoint-dir', tmp_path / 'ck',
                 '--resume', '--metrics', tmp_path / 'logs/run.jsonl')
  assert 'resumed at step 2 of 2' in out


@pytest.mark.parametrize('argv, kept', [
    ((), True),  # float32: the run's frozen base is the loaded one.
    (('--dtype', 'bfloat16'), False),  # A cast copy: the original goes.
    (('--scan-layers',), False),  # A stacked copy.
])
def test_a_run_holding_a_copy_of_the_base_frees_the_loaded_one(
    tmp_path, argv, kept):
  base_lib.load_base(base_lib.TINY)
  finetune(tmp_path, '--steps', '1', '--batch-size', '2', '--eval-every',
           '0', *argv)
  loaded = base_lib._BASES  # pylint: disable=protected-access
  assert (base_lib.TINY in loaded) is kept
