"""`python -m peft finetune`: train LoRA adapters on your data or Shakespeare.

With `--data`, the examples are the user's JSONL rows or text files (see
`peft.models.load_examples`) and the loss covers only their targets
(completions, assistant turns); without it, windows of Shakespeare's plays.

The base stays frozen (in `--dtype`), gradients are taken with respect to
the adapters only, summed over `--grad-accum` micro-batches and divided by
their target tokens, and `peft.train_only_adapters` wraps AdamW on a
warm-up + cosine (or constant) schedule. Held-out perplexity is measured
before the first step (where B = 0, so it is the base model's) and every
`--eval-every` steps; every step and evaluation is a line of the metrics
JSONL (`metrics.MetricsLog`). `--save-every` and Ctrl-C write resumable
checkpoints (`checkpoints`); `--resume` continues one bit for bit. The
adapter file (`--out`) and a loss-curve PNG (`--plot`) are written, each
atomically, once training has finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peft
from peft import models
from peft._cli import adapt
from peft._cli import base as base_lib
from peft._cli import checkpoints
from peft._cli import forward as forward_lib
from peft._cli import interrupt
from peft._cli import mesh as mesh_lib
from peft._cli import metrics as metrics_lib
from peft._cli import parser as parser_lib
from peft._cli import scanning

CliError = base_lib.CliError


def total_steps(args: Any, examples: int) -> int:
  """The optimizer steps of the run: `--steps`, or `--epochs` passes over
  `examples` (each epoch drops its last partial step) capped by `--steps`.

  Example:
    >>> import argparse
    >>> args = argparse.Namespace(steps=None, epochs=2.5, batch_size=4,
    ...                           grad_accum=2)
    >>> total_steps(args, 100)  # 12 steps an epoch.
    30
  """
  if args.epochs is None:
    return args.steps or parser_lib.DEFAULT_STEPS
  per_epoch = examples // (args.batch_size * args.grad_accum)
  steps = max(1, math.ceil(args.epochs * per_epoch))
  return min(steps, args.steps) if args.steps else steps


def learning_rate(args: Any, steps: int) -> optax.Schedule:
  """Linear warm-up from a tenth of the peak, then cosine decay back to a
  tenth (or constant), over `steps`.

  Raises:
    CliError: the warm-up is longer than the run.
  """
  peak, low = args.learning_rate, args.learning_rate / 10
  warmup = (max(1, steps // 10) if args.warmup_steps is None
            else args.warmup_steps)
  if warmup > steps:
    raise CliError(f'--warmup-steps {warmup} exceeds the {steps} steps of the '
                   'run. Pass at most that many.')
  after = (optax.constant_schedule(peak) if args.lr_schedule == 'constant'
           else optax.cosine_decay_schedule(peak, max(steps - warmup, 1),
                                            alpha=low / peak))
  if not warmup:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(low, peak, warmup), after], [warmup])


def optimizer(schedule: optax.Schedule,
              weight_decay: float) -> optax.GradientTransformation:
  """AdamW on the adapters only, along `schedule`."""
  return peft.train_only_adapters(
      optax.adamw(schedule, weight_decay=weight_decay))


def compute_dtype(args: Any) -> Any:
  return jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32


def in_dtype(frozen: Any, dtype: Any) -> Any:
  """The frozen base with its float leaves in `dtype` (the compute dtype:
  the model's layers compute in their weights' dtype)."""
  def cast(leaf):
    floating = jnp.issubdtype(leaf.dtype, jnp.floating)
    return leaf.astype(dtype) if floating and leaf.dtype != dtype else leaf
  return jax.tree.map(cast, frozen)


def scan_layout(config: models.DecoderConfig, frozen: Any, lora: Any,
                use_dora: bool = False) -> Any:
  """`frozen` stacked for `--scan-layers`, once `lora` is known to stack.

  The adapters stay in the unrolled layout (checkpoints and the adapter
  file keep it); `model_params` stacks them inside the step, padded where
  a block lacks some (`scanning.every_block`), so their gradients come
  back unrolled.

  Raises:
    CliError: adapters that cannot stack (DoRA in some blocks only, or
      ranks that differ between blocks).
  """
  padded = scanning.every_block(lora, config, use_dora)
  try:
    jax.eval_shape(lambda lora: models.stack_layers(lora, config), padded)
  except ValueError as e:
    raise CliError(
        f'--scan-layers runs one block per loop step, so the blocks it runs '
        f'alike must carry adapters of the same shapes: {e} Drop '
        '--scan-layers, or adapt the blocks alike.') from e
  return models.stack_layers(frozen, config)


def model_params(model: models.Decoder, frozen: Any, lora: Any) -> Any:
  """What `model` runs on: `frozen` with `lora` merged in (padded and
  stacked, as `frozen` then is, for a scanning model)."""
  if model.scan_layers:
    lora = models.stack_layers(scanning.every_block(lora, model.config),
                               model.config)
  return peft.merge_params(frozen, lora)


def step_fn(model: models.Decoder, settings: adapt.Settings,
            tx: optax.GradientTransformation, seed: int):
  """A compiled optimizer step on the adapters alone.

  `step(lora, opt_state, frozen, tokens, weights, step)` takes `tokens`
  `(micro-batches, batch, length)` and their loss `weights`; the gradient
  of each micro-batch's summed NLL is added up and divided by all their
  target tokens, so any split of a batch into micro-batches gives the same
  step. Dropout draws from `seed`, the step and the micro-batch. On a mesh
  the inputs' shardings decide the program's (the adapters come back
  sharded as they went in).
  """
  key = jax.random.key(seed)

  def nll_sum(lora, frozen, tokens, weights, dropout_key):
    rngs = {'dropout': dropout_key} if settings.dropout else {}
    with settings.applied():
      logits = forward_lib.forward(
          model, {'params': model_params(model, frozen, lora)},
          tokens[:, :-1], rngs=rngs)
    return adapt.nll_sums(logits, tokens[:, 1:], weights)[0]

  grad_fn = jax.value_and_grad(nll_sum)

  @jax.jit
  def step(lora, opt_state, frozen, tokens, weights, step):
    step_key = jax.random.fold_in(key, step)
    if tokens.shape[0] == 1:  # No loop to compile.
      total, grads = grad_fn(lora, frozen, tokens[0], weights[0],
                             jax.random.fold_in(step_key, 0))
    else:
      def micro(carry, xs):
        total, grads = carry
        nll, g = grad_fn(lora, frozen, *xs[:2],
                         jax.random.fold_in(step_key, xs[2]))
        return (total + nll, jax.tree.map(jnp.add, grads, g)), None
      start = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, lora))
      (total, grads), _ = jax.lax.scan(
          micro, start, (tokens, weights, jnp.arange(tokens.shape[0])))
    count = jnp.maximum(jnp.sum(weights), 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, total / count

  return step


def save_plot(path: pathlib.Path, losses: list[float],
              evals: list[tuple[int, float]], title: str) -> None:
  """Writes the training and held-out loss curves as a PNG."""
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CliError('matplotlib is not installed, so the loss curve cannot be '
                   'drawn. Install it (pip install matplotlib).') from e
  fig = Figure(figsize=(7, 4), tight_layout=True)
  ax = fig.subplots()
  ax.plot(range(1, len(losses) + 1), losses, lw=1, label='train loss')
  ax.plot([s for s, _ in evals], [math.log(p) for _, p in evals], 'o-',
          label='held-out loss')
  ax.set(xlabel='step', ylabel='loss (nats / token)', title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, format='png', dpi=100)


def _outputs(args: Any) -> dict[str, pathlib.Path]:
  """Every output path, checked before any work; no two the same."""
  paths = {'--out': base_lib.output(args, 'adapters.safetensors',
                                    flag='--out'),
           '--plot': base_lib.output(args, 'loss.png', flag='--plot'),
           '--metrics': base_lib.output(args, 'metrics.jsonl',
                                        flag='--metrics'),
           '--checkpoint-dir': base_lib.output(args, 'checkpoints',
                                               flag='--checkpoint-dir',
                                               directory=True)}
  seen: dict[pathlib.Path, tuple[str, pathlib.Path]] = {}
  for flag, path in paths.items():
    other, first = seen.setdefault(path.resolve(), (flag, path))
    if other != flag:
      raise CliError(f'{other} and {flag} both name {str(first)!r}; one '
                     'output would overwrite the other. Pass two different '
                     'paths.')
  return paths


def _metadata(adapted: adapt.Adapted, args: Any, steps: int,
              evals: list[tuple[int, float]]) -> dict[str, Any]:
  """The adapter file's metadata (the final file's and checkpoints')."""
  return adapted.metadata(training={
      'steps': steps, 'batch_size': args.batch_size,
      'grad_accum': args.grad_accum, 'seq_len': args.seq_len,
      'learning_rate': args.learning_rate, 'dtype': args.dtype,
      'data': [str(p) for p in args.data] if args.data else 'shakespeare',
      'base_perplexity': evals[0][1], 'perplexity': evals[-1][1]})


class _Throughput:
  """Tokens per second of the steps after the first (which compiles),
  not counting evaluations and checkpoint writes."""

  def __init__(self):
    self.began = time.perf_counter()
    self.started = self.first_step = 0.0
    self.tokens = 0
    self.paused = 0.0

  def stepped(self, tokens: int, first: bool) -> float:
    if first:
      self.started = time.perf_counter()
      self.first_step = self.started - self.began
    else:
      self.tokens += tokens
    busy = time.perf_counter() - self.started - self.paused
    return self.tokens / max(busy, 1e-9)

  @contextlib.contextmanager
  def pause(self):
    began = time.perf_counter()
    try:
      yield
    finally:
      self.paused += time.perf_counter() - began


def run(args: Any) -> dict[str, Any]:
  """Fine-tunes adapters; returns the perplexities and output paths.

  In a multi-process run every process calls it; process 0 alone prints
  and writes (see `mesh`).
  """
  mesh_lib.initialize(args)  # Before any other JAX work.
  if mesh_lib.is_writer():
    return _run(args)
  with open(os.devnull, 'w') as quiet, contextlib.redirect_stdout(quiet):
    return _run(args)


def _run(args: Any) -> dict[str, Any]:
  paths = _outputs(args)
  base = base_lib.load_base(base_lib.source_of(args))
  base_lib.check_seq_len(base, args.seq_len)
  train, held = base_lib.training_data(base, args)
  per_step = args.batch_size * args.grad_accum
  if len(train) < per_step:
    more = '--data' if args.data else 'more --max-plays'
    raise CliError(
        f'--batch-size {args.batch_size} x --grad-accum {args.grad_accum} '
        f'exceeds the {len(train)} training examples of {args.seq_len + 1} '
        f'tokens. Pass a smaller batch or {more}.')
  steps = total_steps(args, len(train))
  schedule = learning_rate(args, steps)
  if args.data:
    print(base_lib.describe_data(train, held))
  adapted = adapt.initial(base, args)
  report = peft.LoRAReport(adapters={s.key: s for s in adapted.specs})
  summary = report.summary(  # Counted on the float base.
      peft.merge_params(base.params, adapted.lora)).splitlines()[-2:]
  print(f'base {base.source}: ' + '; '.join(summary))

  dtype = compute_dtype(args)
  tx = optimizer(schedule, args.weight_decay)
  frozen = in_dtype(adapted.frozen, dtype)
  placement = None
  if args.mesh:
    placement = mesh_lib.build(args.mesh, frozen, adapted.specs,
                               adapted.lora)
    _check_batch(args, placement)
    adapted = adapted.with_lora(mesh_lib.put(adapted.lora, placement.lora))
  model = models.Decoder(config=base.config, dtype=dtype, remat=args.remat,
                         scan_layers=args.scan_layers)
  if args.scan_layers:
    frozen = scan_layout(base.config, frozen, adapted.lora,
                         adapted.settings.use_dora)
  if placement:
    placement = placement.with_frozen(frozen)
    frozen = mesh_lib.put(frozen, placement.frozen)
  signature = checkpoints.signature(args, base, train, steps)
  # From here the run holds the base once, as `frozen`: where that is a
  # copy (cast, stacked or quantized), the float, unrolled original goes.
  if any(a is not b for a, b in zip(jax.tree.leaves(frozen),
                                    jax.tree.leaves(base.params))):
    base_lib.release(base.source)
  base = dataclasses.replace(base, params={})
  adapted = dataclasses.replace(adapted, base=base, frozen={})
  run = _Run(args=args, paths=paths, base=base, adapted=adapted,
             model=model, frozen=frozen, train=train, held=held,
             steps=steps, schedule=schedule, tx=tx, placement=placement,
             signature=signature)
  step = step_fn(model, run.surgery, tx, args.seed)
  # From here a first Ctrl-C stops after the next step, with a checkpoint.
  with interrupt.stop_requests() as stop_requested:
    progress = _start(run)
    progress = _train(run, progress, step, stop_requested)
  results = _finish(run, progress)
  mesh_lib.leave()  # All leave once process 0 has written the outputs.
  return results


def _check_batch(args: Any, placement: mesh_lib.Placement) -> None:
  ways = placement.batch_ways
  if args.batch_size % ways:
    raise CliError(
        f'--batch-size {args.batch_size} does not split over the {ways} '
        'devices of --mesh\'s data and fsdp axes. Pass a multiple of '
        f'{ways}.')


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class _Run:
  """What a training run is: its flags, outputs, model, data and schedule."""

  args: Any
  paths: dict[str, pathlib.Path]
  base: base_lib.Base
  adapted: adapt.Adapted
  model: models.Decoder  # The trained model (`frozen` is in its layout).
  frozen: Any  # The frozen base in the compute dtype (stacked: scan_layout).
  train: models.Examples
  held: models.Examples
  steps: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  placement: mesh_lib.Placement | None  # With --mesh.
  signature: dict[str, Any]  # See `checkpoints.signature`.

  @property
  def surgery(self) -> adapt.Settings:
    """The surgery `model` runs: `adapted.settings` (which files record),
    or for a scanning model the same at the loop body's paths."""
    if not self.model.scan_layers:
      return self.adapted.settings
    return scanning.body_settings(self.adapted.settings, self.adapted.specs,
                                  self.base.config)

  def perplexity(self, lora: Any) -> float:
    return adapt.perplexity(self.base.config, self.surgery,
                            model_params(self.model, self.frozen, lora),
                            self.held.tokens, self.held.weights,
                            scan_layers=self.model.scan_layers)

  def host(self, tree: Any) -> Any:
    """`tree` whole on the host (a collective on a mesh)."""
    return mesh_lib.gather(tree) if self.placement else tree

  def init_opt_state(self, lora: Any) -> Any:
    """The optimizer's initial state, on the mesh as `lora` is (if any)."""
    if not self.placement:
      return jax.jit(self.tx.init)(lora)
    shardings = self._opt_shardings(self.placement)
    return jax.jit(self.tx.init, out_shardings=shardings)(lora)

  def _opt_shardings(self, placement: mesh_lib.Placement) -> Any:
    return mesh_lib.like_params(
        jax.eval_shape(self.tx.init, self.adapted.lora), self.adapted.lora,
        placement.lora, placement.replicated())

  def on_mesh(self, lora: Any, opt_state: Any) -> tuple[Any, Any]:
    """Host adapters and optimizer state put on the mesh (if any)."""
    if not self.placement:
      return lora, opt_state
    return (mesh_lib.put(lora, self.placement.lora),
            mesh_lib.put(opt_state, self._opt_shardings(self.placement)))

  def save_checkpoint(self, progress: checkpoints.Progress) -> pathlib.Path:
    """Writes a checkpoint (process 0; every process must call it)."""
    progress = dataclasses.replace(progress, lora=self.host(progress.lora),
                                   opt_state=self.host(progress.opt_state))
    root = self.paths['--checkpoint-dir']
    if not mesh_lib.is_writer():
      return checkpoints.path_of(root, progress.step)
    return checkpoints.save(
        root, progress, self.adapted,
        self.signature, _metadata(self.adapted, self.args, self.steps,
                                  list(progress.evals)),
        keep=self.args.keep_checkpoints)


def _start(run: _Run) -> checkpoints.Progress:
  """Step 0 (fresh adapters, evaluated) or the `--resume` checkpoint."""
  args, adapted = run.args, run.adapted
  if args.resume:
    found = checkpoints.find(args.resume, run.paths['--checkpoint-dir'])
    progress = checkpoints.load(found, adapted,
                                jax.eval_shape(run.tx.init, adapted.lora),
                                run.signature)
    lora, opt_state = run.on_mesh(progress.lora, progress.opt_state)
    progress = dataclasses.replace(progress, lora=lora, opt_state=opt_state)
    print(f'resumed at step {progress.step} of {run.steps} from {found}')
  else:
    progress = checkpoints.Progress(
        step=0, lora=adapted.lora,
        opt_state=run.init_opt_state(adapted.lora), losses=(),
        evals=((0, run.perplexity(adapted.lora)),))
    quantized = f', {args.quantize}' if args.quantize else ''
    start = 'init adapters' if args.init_adapters else 'base'
    print(f'step 0 ({start}{quantized}): held-out perplexity '
          f'{progress.evals[0][1]:.2f}')
  if args.epochs is not None:
    per_step = args.batch_size * args.grad_accum
    print(f'{run.steps} steps: {args.epochs:g} epochs of {len(run.train)} '
          f'examples, {len(run.train) // per_step} steps each')
  return progress


def _train(run: _Run, progress: checkpoints.Progress, step: Any,
           stop_requested: Any) -> checkpoints.Progress:
  """The optimizer steps after `progress`, logged, evaluated, checkpointed.

  On a stop request (Ctrl-C) it writes a checkpoint and ends the process.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  args, train = run.args, run.train
  per_step = args.batch_size * args.grad_accum
  lora, opt_state = progress.lora, progress.opt_state
  losses, evals = list(progress.losses), list(progress.evals)

  def now(i):
    return checkpoints.Progress(step=i, lora=lora, opt_state=opt_state,
                                losses=tuple(losses), evals=tuple(evals))

  lr_at = jax.jit(run.schedule)  # One compile, not one per jnp op per step.
  lr_at(0)  # Compiled now, outside the timed steps.
  # Shuffled example indices, `per_step` at a time: the data position is
  # the step, so a resumed run replays the stream up to it.
  stream = models.batches(np.arange(len(train))[:, None],
                          batch_size=per_step, seed=args.seed)
  for _ in range(progress.step):
    next(stream)
  shape = (args.grad_accum, args.batch_size)
  timer = _Throughput()
  rate = 0.0
  metrics = (metrics_lib.MetricsLog(
      run.paths['--metrics'],
      resume_after=progress.step if args.resume else None)
      if mesh_lib.is_writer() else metrics_lib.NullLog())
  if not args.resume:
    metrics.write(step=0, eval_loss=math.log(evals[0][1]),
                  eval_perplexity=evals[0][1])
  # No bar where stderr is not a terminal: a log would fill with redraws.
  with metrics, tqdm(range(progress.step + 1, run.steps + 1),
                     initial=progress.step, total=run.steps, desc='finetune',
                     unit='step', mininterval=1.0,
                     disable=None if mesh_lib.is_writer() else True) as bar:
    for i in bar:
      rows = next(stream)[:, 0]
      weights = train.weights[rows]
      lora, opt_state, loss = step(
          lora, opt_state, run.frozen, *_batch(run, rows.reshape(shape)),
          np.int32(i))
      losses.append(float(loss))
      if not math.isfinite(losses[-1]):
        raise CliError(f'the training loss is {losses[-1]} at step {i}. Lower '
                       f'--learning-rate (now {args.learning_rate}).')
      first = i == progress.step + 1
      rate = timer.stepped(per_step * args.seq_len, first=first)
      # The first step's time is mostly its compile: no rate for it.
      metrics.write(step=i, loss=losses[-1], lr=float(lr_at(i - 1)),
                    tokens_per_s=None if first else round(rate, 1),
                    target_tokens=int(weights.sum()))
      bar.set_postfix(loss=f'{losses[-1]:.3f}', tok_s=f'{rate:.0f}',
                      refresh=False)
      with timer.pause():
        if i == run.steps or (args.eval_every and i % args.eval_every == 0):
          evals.append((i, run.perplexity(lora)))
          metrics.write(step=i, eval_loss=math.log(evals[-1][1]),
                        eval_perplexity=evals[-1][1])
          bar.write(f'step {i}: train loss {losses[-1]:.3f}, held-out '
                    f'perplexity {evals[-1][1]:.2f}')
        saved = None
        if args.save_every and i % args.save_every == 0:
          saved = run.save_checkpoint(now(i))
        if mesh_lib.any_process(stop_requested()):  # All stop together.
          saved = saved or run.save_checkpoint(now(i))
          metrics.close()
          mesh_lib.leave()  # Process 0 has written the checkpoint.
          interrupt.end_after_stop(
              f' at step {i}; checkpoint in {saved}; go on with the same '
              'command and --resume')
  print(f'{run.steps - progress.step} steps in '
        f'{time.perf_counter() - timer.began:.0f} s (the first, which '
        f'compiles, took {timer.first_step:.0f} s; {rate:.0f} tokens/s after '
        'it)')
  return now(run.steps)


def _batch(run: _Run, rows: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """The tokens and loss weights of the examples `rows` (micro-batches,
  batch); on a mesh this process reads only its own devices' rows."""
  data = run.train
  if not run.placement:
    return (jnp.asarray(data.tokens[rows]), jnp.asarray(data.weights[rows]))
  def part(array):
    def index(where):  # (micro-batches, rows, positions) slices.
      return array[rows[where[:2]]][..., where[2]]
    return run.placement.put_batch(index, (*rows.shape, array.shape[-1]))
  return part(data.tokens), part(data.weights)


def _finish(run: _Run, progress: checkpoints.Progress) -> dict[str, Any]:
  """Writes the adapter file and the plot; returns the run's results."""
  evals, losses = list(progress.evals), list(progress.losses)
  adapted = run.adapted
  lora = run.host(progress.lora)
  meta = _metadata(adapted, run.args, run.steps, evals)
  title = (f'LoRA rank {adapted.settings.rank} on '
           f'{run.base.source.split(":")[-1]} ({run.steps} steps)')
  out, plot = run.paths['--out'], run.paths['--plot']
  if mesh_lib.is_writer():
    with base_lib.staged(out) as out_tmp, base_lib.staged(plot) as plot_tmp:
      save_plot(plot_tmp, losses, evals, title)
      peft.save_adapters(out_tmp, lora, adapted.specs, metadata=meta)
  print(f'held-out perplexity: base {evals[0][1]:.2f} -> fine-tuned '
        f'{evals[-1][1]:.2f}')
  print(f'wrote {out}, {plot} and {run.paths["--metrics"]}')
  return {'base_perplexity': evals[0][1], 'perplexity': evals[-1][1],
          'adapters': str(out), 'plot': str(plot),
          'metrics': str(run.paths['--metrics']), 'losses': losses,
          'steps': run.steps}
