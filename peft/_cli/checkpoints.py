"""Resumable `finetune` checkpoints: everything a run needs to go on.

A checkpoint is a directory `step_NNNNNNNN` in `--checkpoint-dir`, written
atomically (`base.staged`), holding:

* `adapters.safetensors`: the adapters, with the same metadata as the final
  adapter file, so `eval --adapters` and `merge` take a checkpoint's too;
* `optimizer.safetensors`: the optimizer state's leaves, in the order of
  `jax.tree.leaves` (the tree's shape comes from the optimizer itself);
* `state.json`: the step, the losses and evaluations so far, and the run's
  `signature` (every flag that changes the numbers, the base model's
  fingerprint and a digest of the training examples).

The data position is the step: the batches are a seeded stream that
`resume` replays up to it. So a run resumed from step k, with the same
flags, computes the same steps on the same values as an uninterrupted run,
and ends bit-identical to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np
import safetensors.numpy

import peft
from peft._cli import adapt
from peft._cli import base as base_lib

CliError = base_lib.CliError

FORMAT = 'peft-cli-train-checkpoint'
VERSION = 1
ADAPTERS = 'adapters.safetensors'
OPTIMIZER = 'optimizer.safetensors'
STATE = 'state.json'
_NAME = re.compile(r'step_(\d{8})')

# The finetune flags that change what a run computes. A resumed run must
# repeat them; outputs, checkpointing and --remat (the same math, only
# recomputed) may change.
RUN_FLAGS = ('data', 'eval_data', 'val_fraction', 'skip_bad_rows', 'seq_len',
             'eval_windows', 'max_plays', 'targets', 'rank', 'alpha',
             'dropout', 'quantize', 'use_dora', 'init_adapters', 'steps',
             'epochs', 'batch_size', 'grad_accum', 'learning_rate',
             'warmup_steps', 'lr_schedule', 'weight_decay', 'dtype',
             'eval_every', 'seed')

# Flags that change what a run computes, added since checkpoints were first
# written: a signature records one only when it is not its default, so older
# checkpoints (which lack it) still fit runs that leave it so.
# --scan-layers draws other dropout masks than the unrolled blocks.
OPTIONAL_FLAGS = {'scan_layers': False}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Progress:
  """Where a run stands after `step` optimizer steps.

  Attributes:
    step: optimizer steps done.
    lora: the adapters.
    opt_state: the optimizer state.
    losses: the training loss of each step so far.
    evals: `(step, held-out perplexity)` of each evaluation so far.
  """

  step: int
  lora: Any
  opt_state: Any
  losses: tuple[float, ...]
  evals: tuple[tuple[int, float], ...]


def data_digest(examples: Any) -> str:
  """A digest of the training examples' tokens and loss weights.

  Example:
    >>> from peft import models
    >>> ex = models.Examples(np.arange(6).reshape(2, 3),
    ...                      np.ones((2, 2), np.float32), ('a', 'b'))
    >>> data_digest(ex) == data_digest(ex.take([1, 0]))  # Another order.
    False
  """
  digest = hashlib.sha256()
  for array in (examples.tokens, examples.weights):
    array = np.ascontiguousarray(array)
    digest.update(f'{array.dtype}{array.shape}'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def signature(args: Any, base: base_lib.Base, train: Any,
              steps: int) -> dict[str, Any]:
  """What must be equal for a checkpoint to continue this run (of `steps`
  optimizer steps in all)."""
  flags = {name: getattr(args, name) for name in RUN_FLAGS}
  flags['steps'] = steps
  for name, default in OPTIONAL_FLAGS.items():
    if getattr(args, name) != default:
      flags[name] = getattr(args, name)
  flags = json.loads(json.dumps(flags))  # Tuples as lists, as read back.
  return {'base': base.source, 'fingerprint': base.fingerprint,
          'data_digest': data_digest(train), **flags}


def step_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  """The complete checkpoints in `root`, oldest first.

  Example:
    >>> import tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ('step_00000020', 'step_00000003', '.step_x', 'notes'):
    ...   (root / name).mkdir()
    >>> [p.name for p in step_dirs(root)]
    ['step_00000003', 'step_00000020']
  """
  if not root.is_dir():
    return []
  found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
  return sorted(found, key=lambda p: p.name)


def path_of(root: pathlib.Path, step: int) -> pathlib.Path:
  """The checkpoint directory of `step` in `root`."""
  return root / f'step_{step:08d}'


def save(root: pathlib.Path, progress: Progress, adapted: adapt.Adapted,
         run: dict[str, Any], metadata: dict[str, Any], *,
         keep: int) -> pathlib.Path:
  """Writes `progress` as `root/step_NNNNNNNN`; keeps the newest `keep`.

  Returns:
    The checkpoint's directory.
  """
  path = path_of(root, progress.step)
  leaves = jax.tree.leaves(progress.opt_state)
  with base_lib.staged(path) as tmp:
    tmp.mkdir()
    peft.save_adapters(tmp / ADAPTERS, progress.lora, adapted.specs,
                       metadata=metadata)
    safetensors.numpy.save_file(
        {f'{i:05d}': np.asarray(leaf) for i, leaf in enumerate(leaves)},
        str(tmp / OPTIMIZER))
    state = {'format': FORMAT, 'version': VERSION, 'step': progress.step,
             'losses': list(progress.losses),
             'evals': [list(e) for e in progress.evals], 'signature': run}
    (tmp / STATE).write_text(json.dumps(state, indent=1))
  for old in step_dirs(root)[:-keep]:
    shutil.rmtree(old, ignore_errors=True)
  return path


def find(resume: str, root: pathlib.Path) -> pathlib.Path:
  """The checkpoint `--resume` names: a step directory, or the newest one in
  a directory (for a bare `--resume`, `root`: the run's `--checkpoint-dir`).

  Raises:
    CliError: there is none.
  """
  given = resume != 'latest'
  path = pathlib.Path(resume) if given else root
  if (path / STATE).is_file():
    return path
  found = step_dirs(path)
  if not found:
    where = (f'--resume {resume!r}' if given
             else f'--checkpoint-dir {str(path)!r}')
    raise CliError(
        f'{where} holds no checkpoint (a step_NNNNNNNN directory with '
        f'{STATE}). Pass the --checkpoint-dir of the run to resume, or drop '
        '--resume to start afresh.')
  return found[-1]


def _read_state(path: pathlib.Path) -> dict[str, Any]:
  where = f'--resume {str(path)!r}'
  try:
    state = json.loads((path / STATE).read_text())
  except (OSError, ValueError) as e:
    raise CliError(f'{where}: cannot read {STATE} ({e}). Resume from '
                   'another checkpoint.') from None
  if (not isinstance(state, dict) or state.get('format') != FORMAT
      or state.get('version') != VERSION):
    raise CliError(f'{where} is not a version-{VERSION} finetune checkpoint. '
                   'Pass a directory written by finetune --save-every.')
  return state


def load(path: pathlib.Path, adapted: adapt.Adapted, opt_state_shapes: Any,
         run: dict[str, Any]) -> Progress:
  """Reads the checkpoint at `path`, checked against this run.

  Args:
    path: a step directory (from `find`).
    adapted: this run's surgery (the adapters must fit it).
    opt_state_shapes: this run's optimizer state, or its shapes.
    run: this run's `signature`.

  Raises:
    CliError: the checkpoint is unreadable or belongs to another run (the
      differing flags are named).
  """
  where = f'--resume {str(path)!r}'
  state = _read_state(path)
  theirs = {**OPTIONAL_FLAGS, **state.get('signature', {})}
  run = {**OPTIONAL_FLAGS, **run}
  differ = sorted(k for k in {*run, *theirs} if run.get(k) != theirs.get(k))
  if differ:
    shown = ', '.join(f'{k}: {theirs.get(k)!r} there, {run.get(k)!r} now'
                      for k in differ)
    raise CliError(
        f'{where} is from another run ({shown}). Resume with the flags it was '
        'made with, or drop --resume to start afresh.')
  try:
    lora = peft.load_adapters(path / ADAPTERS, expected=adapted.specs).lora
    tensors = safetensors.numpy.load_file(str(path / OPTIMIZER))
  except (OSError, ValueError) as e:
    raise CliError(f'{where}: {e}') from None
  expected = jax.tree.leaves(opt_state_shapes)
  leaves = [tensors.get(f'{i:05d}') for i in range(len(expected))]
  if len(tensors) != len(expected) or any(
      leaf is None or leaf.shape != want.shape or leaf.dtype != want.dtype
      for leaf, want in zip(leaves, expected)):
    raise CliError(f'{where}: the optimizer state does not fit this run\'s '
                   'optimizer. Resume from a checkpoint of this run.')
  treedef = jax.tree.structure(opt_state_shapes)
  return Progress(
      step=int(state['step']), lora=lora,
      opt_state=jax.tree.unflatten(treedef, leaves),
      losses=tuple(float(x) for x in state['losses']),
      evals=tuple((int(s), float(p)) for s, p in state['evals']))
