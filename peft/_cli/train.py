"""`python -m peft finetune`: train LoRA adapters on your data or Shakespeare.

With `--data`, the examples are the user's JSONL rows or text files (see
`peft.models.load_examples`) and the loss covers only their targets
(completions, assistant turns); without it, windows of Shakespeare's plays.

The base stays frozen: gradients are taken with respect to the adapters
only (no work is spent on the base weights' gradients), and
`peft.train_only_adapters` wraps AdamW. Held-out perplexity is measured
before the first step (where B = 0, so it is the base model's) and every
`--eval-every` steps. Outputs, written only once training has finished,
each atomically: the adapter file (`--out`) and a loss-curve PNG (`--plot`).
"""

from __future__ import annotations

import math
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
from peft._cli import forward as forward_lib

CliError = base_lib.CliError


def _step_fn(adapted: adapt.Adapted, tx: optax.GradientTransformation,
             seed: int):
  """A compiled training step on the adapters alone."""
  model, settings = adapted.base.model, adapted.settings
  key = jax.random.key(seed)

  def loss_fn(lora, frozen, batch, weights, step):
    rngs = ({'dropout': jax.random.fold_in(key, step)} if settings.dropout
            else {})
    with settings.applied():
      logits = forward_lib.forward(
          model, {'params': peft.merge_params(frozen, lora)}, batch[:, :-1],
          rngs=rngs)
    return adapt.mean_nll(logits, batch[:, 1:], weights)

  @jax.jit
  def step(lora, opt_state, frozen, batch, weights, step):
    loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, batch, weights,
                                              step)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return step


def optimizer(args: Any) -> optax.GradientTransformation:
  """AdamW with a short warm-up and a cosine decay, on adapters only."""
  warmup = max(1, args.steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=args.learning_rate / 10, peak_value=args.learning_rate,
      warmup_steps=warmup, decay_steps=max(args.steps, warmup + 1),
      end_value=args.learning_rate / 10)
  return peft.train_only_adapters(
      optax.adamw(schedule, weight_decay=args.weight_decay))


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


def run(args: Any) -> dict[str, Any]:
  """Fine-tunes adapters; returns the perplexities and output paths."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  out = base_lib.output(args, 'adapters.safetensors', flag='--out')
  plot = base_lib.output(args, 'loss.png', flag='--plot')
  if out.resolve() == plot.resolve():
    raise CliError(f'--out and --plot both name {str(out)!r}; one output '
                   'would overwrite the other. Pass two different paths.')
  base = base_lib.load_base(base_lib.source_of(args))
  base_lib.check_seq_len(base, args.seq_len)
  train, held = base_lib.training_data(base, args)
  if len(train) < args.batch_size:
    more = '--data' if args.data else 'more --max-plays'
    raise CliError(
        f'--batch-size {args.batch_size} exceeds the {len(train)} training '
        f'examples of {args.seq_len + 1} tokens. Pass a smaller batch or '
        f'{more}.')
  if args.data:
    print(base_lib.describe_data(train, held))
  adapted = adapt.initial(base, args)
  report = peft.LoRAReport(adapters={s.key: s for s in adapted.specs})
  counted = peft.merge_params(base.params, adapted.lora)  # Float base.
  summary = report.summary(counted).splitlines()[-2:]
  print(f'base {base.source}: ' + '; '.join(summary))

  def perplexity(lora):
    return adapt.perplexity(base.config, adapted.settings,
                            peft.merge_params(adapted.frozen, lora),
                            held.tokens, held.weights)

  tx = optimizer(args)
  step = _step_fn(adapted, tx, args.seed)
  lora, opt_state = adapted.lora, jax.jit(tx.init)(adapted.lora)
  evals = [(0, perplexity(lora))]
  quantized = f', {args.quantize}' if args.quantize else ''
  start = 'init adapters' if args.init_adapters else 'base'
  print(f'step 0 ({start}{quantized}): held-out perplexity '
        f'{evals[0][1]:.2f}')
  # Shuffled example indices; each batch gathers tokens and loss weights.
  stream = models.batches(np.arange(len(train))[:, None],
                          batch_size=args.batch_size, seed=args.seed)
  tokens_per_step = args.batch_size * args.seq_len
  losses: list[float] = []
  began = time.perf_counter()
  # The first step includes the compile: the throughput counts from its end.
  started = first_step = rate = 0.0
  done = 0  # Tokens trained on since the first step.
  eval_seconds = 0.0  # Excluded from the throughput.
  # No bar where stderr is not a terminal: a log would fill with redraws.
  with tqdm(range(1, args.steps + 1), desc='finetune', unit='step',
            mininterval=1.0, disable=None) as bar:
    for i in bar:
      rows = next(stream)[:, 0]
      lora, opt_state, loss = step(
          lora, opt_state, adapted.frozen, jnp.asarray(train.tokens[rows]),
          jnp.asarray(train.weights[rows]), np.int32(i))
      losses.append(float(loss))
      if not math.isfinite(losses[-1]):
        raise CliError(f'the training loss is {losses[-1]} at step {i}. Lower '
                       f'--learning-rate (now {args.learning_rate}).')
      if i == 1:
        started = time.perf_counter()
        first_step = started - began
      else:
        done += tokens_per_step
      rate = done / max(time.perf_counter() - started - eval_seconds, 1e-9)
      bar.set_postfix(loss=f'{losses[-1]:.3f}', tok_s=f'{rate:.0f}',
                      refresh=False)
      if i == args.steps or (args.eval_every and i % args.eval_every == 0):
        eval_started = time.perf_counter()
        evals.append((i, perplexity(lora)))
        eval_seconds += time.perf_counter() - eval_started
        bar.write(f'step {i}: train loss {losses[-1]:.3f}, held-out '
                  f'perplexity {evals[-1][1]:.2f}')
  print(f'{args.steps} steps in {time.perf_counter() - began:.0f} s (the '
        f'first, which compiles, took {first_step:.0f} s; {rate:.0f} '
        'tokens/s after it)')

  trained = adapted.with_lora(lora)
  meta = trained.metadata(training={
      'steps': args.steps, 'batch_size': args.batch_size,
      'seq_len': args.seq_len, 'learning_rate': args.learning_rate,
      'data': [str(p) for p in args.data] if args.data else 'shakespeare',
      'base_perplexity': evals[0][1], 'perplexity': evals[-1][1]})
  title = (f'LoRA rank {adapted.settings.rank} on '
           f'{base.source.split(":")[-1]} '
           f'({args.steps} steps)')
  with base_lib.staged(out) as out_tmp, base_lib.staged(plot) as plot_tmp:
    save_plot(plot_tmp, losses, evals, title)
    peft.save_adapters(out_tmp, trained.lora, trained.specs, metadata=meta)
  print(f'held-out perplexity: base {evals[0][1]:.2f} -> fine-tuned '
        f'{evals[-1][1]:.2f}')
  print(f'wrote {out} and {plot}')
  return {'base_perplexity': evals[0][1], 'perplexity': evals[-1][1],
          'adapters': str(out), 'plot': str(plot), 'losses': losses}
