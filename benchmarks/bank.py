"""Serving several adapters at once: one mixed batch vs one call each.

A batch of `--batch` sequences whose rows use `--adapters` different LoRA
adapters (round robin; with `--base-rows`, that many rows use none) is run
three ways on the benchmark model (`benchmarks/model.py`), every way
compiled before timing, the three alternating in each round:

* `mixed`: one call with a `peft.AdapterBank` and per-row ids;
* `separate`: one call per adapter, each on that adapter's rows, with its
  own adapter params (one program for all: the shapes are the same);
* `base`: the plain model on the whole batch, without adapters (the floor).

It prints the median milliseconds per batch of each and the ratios
mixed / separate (below 1: the mixed batch is faster than the separate
calls) and mixed / base (the cost of serving adapters at all).

  .venv/bin/python -m benchmarks.bank
  .venv/bin/python -m benchmarks.bank --quick   # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import memory
from benchmarks import model as model_lib
import peft

QUICK = dict(vocab=256, d_model=64, layers=1, heads=2, kv_heads=1,
             head_dim=32, ffn=128)


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def measure(config: model_lib.Config, *, adapters: int, batch: int, seq: int,
            rank: int, rounds: int, base_rows: int = 0) -> dict[str, float]:
  """Median seconds per batch of `mixed`, `separate` and `base`."""
  if batch % adapters or base_rows >= batch:
    raise ValueError(f'--batch {batch} must be a multiple of --adapters '
                     f'{adapters} and above --base-rows {base_rows}.')
  model = model_lib.Decoder(config)
  tokens = model_lib.random_tokens(config, batch=batch, seq=seq)
  surgery = peft.lora(rank=rank)
  with surgery as report:
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  split = peft.split_params(model_lib.random_like(shapes, seed=0, scale=1.0))
  names = [f'adapter{i}' for i in range(adapters)]
  bank = peft.AdapterBank.stack({
      name: (model_lib.random_like(split.lora, seed=i + 1, scale=0.1),
             report.specs) for i, name in enumerate(names)})
  params = peft.merge_params(split.original, bank.lora)
  ids = np.arange(batch, dtype=np.int32) % adapters
  ids[batch - base_rows:] = -1

  @jax.jit
  def mixed(params, tokens, ids):
    with surgery, bank.active(ids):
      return model.apply({'params': params}, tokens)

  @jax.jit
  def one(params, tokens):
    with surgery:
      return model.apply({'params': params}, tokens)

  base = jax.jit(lambda p, t: model.apply({'params': p}, t))
  own = [peft.merge_params(split.original, bank.select(name)[0])
         for name in names]
  rows = [np.flatnonzero(ids == i) for i in range(adapters)]

  def separate():
    return [one(own[i], tokens[r]) for i, r in enumerate(rows) if len(r)]

  runs = {'mixed': lambda: mixed(params, tokens, jnp.asarray(ids)),
          'separate': separate,
          'base': lambda: base(split.original, tokens)}
  for run in runs.values():  # Compile (and warm) each.
    jax.block_until_ready(run())
  times: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      times[name].append(_timed(run))
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  memory.add_size_flags(parser)  # The model's, --batch, --seq, --rank.
  parser.set_defaults(batch=8)
  parser.add_argument('--adapters', type=int, default=4)
  parser.add_argument('--base-rows', type=int, default=0)
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--quick', action='store_true',
                      help='a tiny model and 3 rounds (for tests)')
  args = parser.parse_args(argv)
  config = (model_lib.Config(**QUICK) if args.quick
            else memory.config_from(args))
  rounds = 3 if args.quick else args.rounds
  seconds = measure(config, adapters=args.adapters, batch=args.batch,
                    seq=args.seq, rank=args.rank, rounds=rounds,
                    base_rows=args.base_rows)
  print(f'{args.adapters} adapters, batch {args.batch} x {args.seq}, rank '
        f'{args.rank}, {rounds} rounds ({jax.devices()[0].platform})')
  for name, s in seconds.items():
    print(f'{name:9s} {1e3 * s:9.2f} ms per batch')
  print(f'mixed / separate {seconds["mixed"] / seconds["separate"]:.3f}')
  print(f'mixed / base     {seconds["mixed"] / seconds["base"]:.3f}')


if __name__ == '__main__':
  main()
