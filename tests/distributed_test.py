"""`finetune --mesh`, in one process and in two joined by jax.distributed.

The two-process runs are real: two `python -m peft finetune` processes on
this machine, four host-platform CPU devices each, joined through a
coordinator on a free loopback port, with gloo CPU collectives; one global
mesh of eight devices. The reference is the same run in this process on
its eight fake devices. Every process a test starts is ended by it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import peft
from peft._cli import adapt
from peft._cli import base as base_lib
from peft._cli import checkpoints
from peft._cli import mesh as mesh_lib
from tests.cli_test import DATA
from tests.cli_test import assert_one_line_error
from tests.cli_test import run_cli
from tests.helpers import assert_trees_close

# Eight examples a step: one per device of the mesh.
RUN = ('--tiny', *DATA, '--batch-size', '8', '--steps', '4', '--eval-every',
       '0', '--save-every', '2')
MESH = ('--mesh', 'data=2,fsdp=4')
# Two processes sum their gradients with gloo, one process with XLA's own
# CPU all-reduce: the same sums in another order, so the last bits differ
# (measured: 8e-7 on adapters of size 0.3).
TOL = dict(rtol=1e-5, atol=1e-5)
LAUNCH_TIMEOUT = 240  # s; a two-process tiny run takes about 20.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def processes(root: pathlib.Path, *argv: str, heartbeat: int = 30):
  """Starts two joined `finetune` processes; yields them; ends both.

  Process i runs in `root/p{i}` (its --workdir), with stdout and stderr in
  `root/p{i}.out` and `.err`.
  """
  port = free_port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'PYTHONUNBUFFERED': '1'}
  procs = []
  try:
    for i in range(2):
      (root / f'p{i}').mkdir(parents=True, exist_ok=True)
      command = [sys.executable, '-m', 'peft', 'finetune', *argv, *MESH,
                 '--workdir', str(root / f'p{i}'),
                 '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2',
                 '--process-id', str(i), '--heartbeat-timeout', str(heartbeat)]
      with open(root / f'p{i}.out', 'w') as out, open(
          root / f'p{i}.err', 'w') as err:
        procs.append(subprocess.Popen(command, stdout=out, stderr=err,
                                      env=env))
    yield procs
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()


def finish(root: pathlib.Path, procs) -> None:
  """Waits for both processes; fails with their stderr unless both end 0."""
  deadline = time.monotonic() + LAUNCH_TIMEOUT
  for proc in procs:
    proc.wait(timeout=max(deadline - time.monotonic(), 1))
  for i, proc in enumerate(procs):
    err = (root / f'p{i}.err').read_text()
    assert proc.returncode == 0, f'process {i}: {err[-3000:]}'


def step_losses(metrics: pathlib.Path) -> list[float]:
  rows = [json.loads(line) for line in metrics.read_text().splitlines()]
  return [r['loss'] for r in rows if 'loss' in r]


def files_under(path: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(path)) for p in path.rglob('*')
                if p.is_file())


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  """One two-process run of 4 steps, checkpointed at steps 2 and 4."""
  root = tmp_path_factory.mktemp('two')
  with processes(root, *RUN, '--checkpoint-dir', str(root / 'ckpt')) as procs:
    finish(root, procs)
  return root


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  """The same run in this process, on its 8 devices."""
  root = tmp_path_factory.mktemp('one')
  status, out, err = run_cli('finetune', *RUN, *MESH, '--workdir', root)
  assert status == 0, err
  return root


def test_remat_on_a_mesh_changes_no_number(one_process, tmp_path):
  # Remat's ordering ties read one element of sharded cotangents; the
  # training is the same to rounding (XLA orders the sums differently).
  status, _, err = run_cli('finetune', *RUN, *MESH, '--remat', '--workdir',
                           tmp_path)
  assert status == 0, err
  np.testing.assert_allclose(step_losses(tmp_path / 'metrics.jsonl'),
                             step_losses(one_process / 'metrics.jsonl'),
                             **TOL)
  assert_trees_close(load_file(tmp_path / 'adapters.safetensors'),
                     load_file(one_process / 'adapters.safetensors'), **TOL)


def test_two_processes_train_as_one_process_on_eight_devices(
    two_processes, one_process):
  np.testing.assert_allclose(step_losses(two_processes / 'p0/metrics.jsonl'),
                             step_losses(one_process / 'metrics.jsonl'),
                             **TOL)
  assert len(step_losses(one_process / 'metrics.jsonl')) == 4
  assert_trees_close(load_file(two_processes / 'p0/adapters.safetensors'),
                     load_file(one_process / 'adapters.safetensors'), **TOL)


def test_only_process_0_writes_and_prints(two_processes):
  assert files_under(two_processes / 'p0') == [
      'adapters.safetensors', 'loss.png', 'metrics.jsonl']
  assert files_under(two_processes / 'p1') == []
  # gloo's own C++ prints its connections ('[Gloo] Rank 1 is connected to
  # 1 peer ranks...', at times split over two lines by the other
  # process's output); the run prints nothing there.
  printed = (two_processes / 'p1.out').read_text().splitlines()
  assert [line for line in printed if not line.startswith('[Gloo]')
          and 'peer ranks' not in line] == []
  assert 'fine-tuned' in (two_processes / 'p0.out').read_text()
  assert files_under(two_processes / 'ckpt') == [
      f'step_0000000{s}/{name}' for s in (2, 4)
      for name in ('adapters.safetensors', 'optimizer.safetensors',
                   'state.json')]
  # The last checkpoint holds the final adapters, gathered whole.
  assert_trees_close(
      load_file(two_processes / 'ckpt/step_00000004/adapters.safetensors'),
      load_file(two_processes / 'p0/adapters.safetensors'))


def test_two_processes_resume_bit_identically(two_processes, tmp_path):
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(two_processes / 'ckpt/step_00000002',
                  ckpt / 'step_00000002')
  with processes(tmp_path, *RUN, '--checkpoint-dir', str(ckpt),
                 '--resume') as procs:
    finish(tmp_path, procs)
  assert 'resumed at step 2 of 4' in (tmp_path / 'p0.out').read_text()
  # The new --workdir's metrics start after the checkpoint's step.
  assert (step_losses(tmp_path / 'p0/metrics.jsonl')
          == step_losses(two_processes / 'p0/metrics.jsonl')[2:])
  assert_trees_close(load_file(tmp_path / 'p0/adapters.safetensors'),
                     load_file(two_processes / 'p0/adapters.safetensors'))


def wait_for_step(root: pathlib.Path, procs, step: int) -> None:
  """Until process 0's metrics show `step`; fails if a process ends."""
  metrics = root / 'p0/metrics.jsonl'
  deadline = time.monotonic() + LAUNCH_TIMEOUT
  while not (metrics.is_file() and f'"step": {step},' in metrics.read_text()):
    assert all(p.poll() is None for p in procs), (
        root / 'p0.err').read_text()[-3000:]
    assert time.monotonic() < deadline, 'training never began'
    time.sleep(0.2)


LONG_RUN = ('--tiny', *DATA, '--batch-size', '8', '--steps', '100000',
            '--eval-every', '0')


def test_ctrl_c_in_one_process_stops_both_with_one_checkpoint(tmp_path):
  from tests.cli_test import sigint_not_ignored  # pylint: disable=g-import-not-at-top

  ckpt = tmp_path / 'ckpt'
  with sigint_not_ignored(), processes(
      tmp_path, *LONG_RUN, '--checkpoint-dir', str(ckpt)) as procs:
    wait_for_step(tmp_path, procs, 2)
    procs[1].send_signal(signal.SIGINT)  # Not the writer.
    for proc in procs:
      proc.wait(timeout=LAUNCH_TIMEOUT)
  assert [p.returncode for p in procs] == [130, 130]
  (saved,) = checkpoints.step_dirs(ckpt)
  step = int(saved.name.removeprefix('step_'))
  err = (tmp_path / 'p0.err').read_text()
  assert f'interrupted at step {step}; checkpoint in {saved}' in err, err
  assert len(step_losses(tmp_path / 'p0/metrics.jsonl')) == step


@pytest.mark.parametrize('dies', [1, 0])
def test_a_dead_process_ends_the_other(tmp_path, dies):
  heartbeat = 5
  with processes(tmp_path, *LONG_RUN, heartbeat=heartbeat) as procs:
    wait_for_step(tmp_path, procs, 2)
    procs[dies].kill()
    killed = time.monotonic()
    other = procs[1 - dies]
    other.wait(timeout=heartbeat + 60)
    took = time.monotonic() - killed
  assert other.returncode != 0
  assert took < heartbeat + 60
  err = (tmp_path / f'p{1 - dies}.err').read_text()
  # JAX's coordination service notices the silence (the heartbeat), or
  # gloo the broken connection in the middle of a collective: either ends
  # the process with its message.
  assert 'another task died' in err or 'gloo::' in err, err[-3000:]


def test_adapters_from_one_mesh_load_onto_others_and_one_device(
    two_processes):
  base = base_lib.load_base(base_lib.TINY)
  adapted, _ = adapt.load(base, str(two_processes / 'p0/adapters.safetensors'))
  tokens = np.asarray(base.tokenizer.encode('ROMEO: what light')[:8])[None]
  tokens = np.repeat(tokens, 8, axis=0)
  logits = adapt.logits_fn(base.config, adapted.settings)
  alone = np.asarray(logits(adapted.params, tokens))
  # The adapters are not the zero update: a wrong load would show.
  base_logits = np.asarray(logits(
      peft.merge_params(adapted.frozen, adapt.without_adapters(adapted.lora)),
      tokens))
  assert np.abs(alone - base_logits).max() > 1e-3
  for axes in ((('fsdp', 8),), (('data', 2), ('fsdp', 2), ('model', 2)),
               (('fsdp', 2), ('model', 4))):
    placement = mesh_lib.build(axes, adapted.frozen, adapted.specs,
                               adapted.lora)
    params = peft.merge_params(
        mesh_lib.put(adapted.frozen, placement.frozen),
        mesh_lib.put(adapted.lora, placement.lora))
    np.testing.assert_allclose(np.asarray(logits(params, tokens)), alone,
                               rtol=1e-5, atol=1e-5, err_msg=str(axes))


def test_adapters_take_their_kernels_partitioning():
  from peft import models  # pylint: disable=g-import-not-at-top

  base = models.random_params(models.tiny_config())
  surgery = peft.lora(rank=4, targets=('.*attn/.*', '.*mlp'))
  with surgery as report:
    jax.eval_shape(models.Decoder(config=models.tiny_config()).init,
                   jax.random.key(0), np.zeros((1, 4), np.int32))
  lora = {}
  for spec in report.specs:
    node = lora
    for key in spec.path:
      node = node.setdefault(key, {})
    node[spec.adapter_name] = {'a': np.zeros(spec.a_shape, np.float32),
                               'b': np.zeros(spec.b_shape, np.float32)}
  placement = mesh_lib.build((('fsdp', 2), ('model', 4)), base, report.specs,
                             lora)
  specs = jax.tree.map(lambda s: tuple(s.spec), placement.frozen)
  layer = specs['layers_0']
  assert specs['embedder']['embedding'] == ('model', 'fsdp')
  assert layer['attn']['q_einsum']['w'] == ('model', 'fsdp', None)
  assert layer['attn']['kv_einsum']['w'] == (None, None, 'fsdp', None)
  assert layer['mlp']['linear'] == ('model', 'fsdp')
  assert layer['pre_ffw_norm']['scale'] == (None,)
  adapters = jax.tree.map(lambda s: tuple(s.spec), placement.lora)['layers_0']
  # A: the kernel's input-side names, then the whole rank axis; B: rank,
  # then the output side. kv's 2 heads stay whole: 4 does not divide 2.
  assert adapters['attn']['q_einsum']['lora_w'] == {
      'a': ('fsdp', None), 'b': (None, 'model', None)}
  assert adapters['attn']['attn_vec_einsum']['lora_w'] == {
      'a': ('model', None, None), 'b': (None, 'fsdp')}
  assert adapters['attn']['kv_einsum']['lora_w'] == {
      'a': ('fsdp', None), 'b': (None, None, None, None)}
  assert adapters['mlp'] == {
      'lora_gating_einsum': {'a': ('fsdp', None), 'b': (None, None, 'model')},
      'lora_linear': {'a': ('model', None), 'b': (None, 'fsdp')}}


def test_tensor_parallel_run_trains_as_one_device(tmp_path, one_process):
  status, _, err = run_cli('finetune', *RUN, '--mesh', 'fsdp=2,model=4',
                           '--workdir', tmp_path / 'tp')
  assert status == 0, err
  status, _, err = run_cli('finetune', *RUN, '--workdir', tmp_path / 'single')
  assert status == 0, err
  single = step_losses(tmp_path / 'single/metrics.jsonl')
  for other in (tmp_path / 'tp', one_process):
    np.testing.assert_allclose(step_losses(other / 'metrics.jsonl'), single,
                               **TOL)
    assert_trees_close(load_file(other / 'adapters.safetensors'),
                       load_file(tmp_path / 'single/adapters.safetensors'),
                       **TOL)


@pytest.mark.parametrize('argv, axes', [
    (('--scan-layers',), 'fsdp=2,model=4'),
    (('--quantize', 'int4'), 'fsdp=2,model=4'),
    (('--quantize', 'nf4', '--scan-layers'), 'data=2,fsdp=4'),
])
def test_scanning_or_qlora_run_on_a_mesh_trains_as_on_one_device(
    tmp_path, argv, axes):
  status, _, err = run_cli('finetune', *RUN, *argv, '--mesh', axes,
                           '--workdir', tmp_path / 'mesh')
  assert status == 0, err
  status, _, err = run_cli('finetune', *RUN, *argv, '--workdir',
                           tmp_path / 'single')
  assert status == 0, err
  np.testing.assert_allclose(step_losses(tmp_path / 'mesh/metrics.jsonl'),
                             step_losses(tmp_path / 'single/metrics.jsonl'),
                             **TOL)
  assert_trees_close(load_file(tmp_path / 'mesh/adapters.safetensors'),
                     load_file(tmp_path / 'single/adapters.safetensors'),
                     **TOL)


def test_stacked_blocks_split_each_block_as_unrolled():
  from peft import models  # pylint: disable=g-import-not-at-top

  config = models.tiny_config()
  base = models.random_params(config)
  placement = mesh_lib.build((('fsdp', 2), ('model', 4)), base, [], {})
  stacked = placement.with_frozen(models.stack_layers(base, config))
  unrolled_mlp = placement.frozen['layers_1']['mlp']
  stacked_mlp = stacked.frozen['scanned_layers']['layers_0']['mlp']
  for name in ('gating_einsum', 'linear'):
    # The block's index leads, whole; each block's axes split as unrolled.
    assert tuple(stacked_mlp[name].spec) == (None, *unrolled_mlp[name].spec)
  assert tuple(unrolled_mlp['linear'].spec) == ('model', 'fsdp')
  assert stacked.frozen['embedder'] == placement.frozen['embedder']


@pytest.mark.parametrize('method', ['int8', 'int4', 'nf4'])
def test_quantized_kernels_split_as_their_float_kernels(method):
  from peft import models  # pylint: disable=g-import-not-at-top

  config = models.tiny_config()
  base = models.random_params(config)
  axes = (('fsdp', 2), ('model', 4))
  floats = mesh_lib.build(axes, base, [], {}).frozen['layers_1']['mlp']
  placement = mesh_lib.build(axes, peft.quantize(base, method=method), [], {})
  quantized = placement.frozen['layers_1']['mlp']
  # Per-channel scales keep the kernel's axes (the reduced ones of size 1,
  # whole); NF4's are (kept axes, blocks), the blocks whole.
  scales = {'int8': {'gating_einsum': (None, None, 'model'),
                     'linear': (None, 'fsdp')},
            'nf4': {'gating_einsum': ('model', None),
                    'linear': ('fsdp', None)}}
  scales['int4'] = scales['int8']
  for name in ('gating_einsum', 'linear'):
    assert quantized[name].values.spec == floats[name].spec, name
    assert tuple(quantized[name].scales.spec) == scales[method][name], name
  stacked = placement.with_frozen(
      models.stack_layers(peft.quantize(base, method=method), config))
  linear = stacked.frozen['scanned_layers']['layers_0']['mlp']['linear']
  assert tuple(linear.values.spec) == (None, 'model', 'fsdp')
  assert tuple(linear.scales.spec) == (None, *scales[method]['linear'])


def test_dora_magnitudes_take_their_kernels_names_and_train_on_a_mesh(
    tmp_path):
  from peft import models  # pylint: disable=g-import-not-at-top

  base = models.random_params(models.tiny_config())
  with peft.lora(rank=4, targets=('.*attn/.*', '.*mlp'),
                 use_dora=True) as report:
    shapes = jax.eval_shape(models.Decoder(config=models.tiny_config()).init,
                            jax.random.key(0), np.zeros((1, 4), np.int32))
  lora = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                      peft.split_params(shapes['params']).lora)
  placement = mesh_lib.build((('fsdp', 2), ('model', 4)), base, report.specs,
                             lora)
  names = jax.tree.map(lambda s: tuple(s.spec), placement.lora)['layers_0']
  # m: the kernel's names along the output features (q: heads x head_dim;
  # out: embed; gate/up: the 2 slots x mlp; down: embed).
  assert names['attn']['q_einsum']['lora_w']['m'] == ('model', None)
  assert names['attn']['attn_vec_einsum']['lora_w']['m'] == ('fsdp',)
  assert names['mlp']['lora_gating_einsum']['m'] == (None, 'model')
  assert names['mlp']['lora_linear']['m'] == ('fsdp',)
  dora = ('--use-dora', '--steps', '2')
  for mesh in ((), ('--mesh', 'fsdp=2,model=4')):
    status, _, err = run_cli('finetune', *RUN, *dora, *mesh, '--workdir',
                             tmp_path / ('tp' if mesh else 'single'))
    assert status == 0, err
  np.testing.assert_allclose(step_losses(tmp_path / 'tp/metrics.jsonl'),
                             step_losses(tmp_path / 'single/metrics.jsonl'),
                             **TOL)
  assert_trees_close(load_file(tmp_path / 'tp/adapters.safetensors'),
                     load_file(tmp_path / 'single/adapters.safetensors'),
                     **TOL)


@pytest.mark.parametrize('argv, code, match', [
    (('--mesh', 'data=2,rows=4'), 2,
     r"argument --mesh: mesh axis 'rows' is not one of data, fsdp, model; "
     r'write e.g. data=2,fsdp=4'),
    (('--mesh', 'data=0'), 2,
     r"mesh axis 'data' has size '0', not a positive int"),
    (('--mesh', 'data'), 2, r"mesh axis 'data' has no size"),
    (('--mesh', 'data=2,data=4'), 2, r"mesh axis 'data' is given twice"),
    (('--mesh', 'data=3'), 1,
     r'--mesh data=3 has 3 devices but the run has 8 \(1 process\(es\) of '
     r'8\)\. Give axis sizes that multiply to 8\.'),
    (('--mesh', 'data=2,fsdp=4', '--batch-size', '4'), 1,
     r"--batch-size 4 does not split over the 8 devices of --mesh's data and "
     r'fsdp axes\. Pass a multiple of 8\.'),
    (('--coordinator', '127.0.0.1:1'), 1,
     r'--num-processes, --process-id missing: a multi-process run needs '
     r'--coordinator, --num-processes and --process-id together'),
    (('--coordinator', '127.0.0.1:1', '--num-processes', '2',
      '--process-id', '2'), 1,
     r'--process-id 2 is not below --num-processes 2'),
    (('--coordinator', '127.0.0.1:1', '--num-processes', '2',
      '--process-id', '1'), 1, r'a multi-process run needs --mesh'),
    # This process has run JAX already: too late to join others.
    (('--coordinator', '127.0.0.1:1', '--num-processes', '2',
      '--process-id', '1', '--mesh', 'data=8'), 1,
     r"cannot join the processes at --coordinator '127.0.0.1:1': "
     r'jax.distributed.initialize\(\) must be called before'),
])
def test_mesh_and_process_errors(tmp_path, argv, code, match):
  jax.devices()  # JAX has started in this process.
  assert_one_line_error(*run_cli('finetune', '--tiny', *DATA, '--workdir',
                                 tmp_path, *argv), code, match)
