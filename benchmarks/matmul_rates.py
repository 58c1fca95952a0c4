"""Lone float32 matmul rates of the SmolLM2 step's shapes, XLA and torch.

The ceiling argument in docs/benchmarks.md ("Why not 0.8x torch") needs
them: a step of F FLOPs cannot beat F / (the fastest lone matmul's rate).
Each shape `m x k x n` (tokens x in x out at batch 4 x 128) runs as one
jitted `a @ b` (XLA:CPU) or `torch.matmul` on torch's 2 threads, median of
`--reps` calls after a warm-up, in GFLOP/s (2 m k n per call).

  python -m benchmarks.matmul_rates [--reps 20]
      [--torch-python .venv-torch/bin/python]

The torch side runs in its own interpreter (`--torch-python`), since
torch is not a dependency of ours.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import json
import statistics
import sys
import time

# (m, k, n): the unembedding, the FFN's up/gate and down projections, the
# attention's output projection, at 512 tokens.
SHAPES = ((512, 576, 49152), (512, 576, 1536), (512, 1536, 576),
          (512, 576, 576))


def gflops(m: int, k: int, n: int, seconds: float) -> float:
  """The rate of one `m x k` by `k x n` product taking `seconds`.

  Example:
    >>> gflops(1000, 1000, 1000, 0.01)
    200.0
  """
  return 2 * m * k * n / seconds / 1e9


def _median_s(call: Callable[[], None], reps: int) -> float:
  call()  # Warm-up (and, for XLA, the compile).
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _jax_rates(reps: int) -> list[float]:
  # pylint: disable=g-import-not-at-top
  from peft._cli import xla_flags
  xla_flags.apply()
  import jax
  import numpy as np
  # pylint: enable=g-import-not-at-top
  rates = []
  product = jax.jit(lambda a, b: a @ b)
  for m, k, n in SHAPES:
    rng = np.random.default_rng(0)
    a = jax.device_put(rng.standard_normal((m, k), np.float32))
    b = jax.device_put(rng.standard_normal((k, n), np.float32))
    seconds = _median_s(
        lambda a=a, b=b: product(a, b).block_until_ready(), reps)
    rates.append(gflops(m, k, n, seconds))
  return rates


def _torch_rates(reps: int) -> list[float]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  rates = []
  for m, k, n in SHAPES:
    a, b = torch.randn(m, k), torch.randn(k, n)
    with torch.no_grad():
      seconds = _median_s(lambda a=a, b=b: torch.matmul(a, b), reps)
    rates.append(gflops(m, k, n, seconds))
  return rates


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--reps', type=int, default=20)
  parser.add_argument('--torch-python', default=None,
                      help='an interpreter with torch for the torch side')
  parser.add_argument('--side', choices=('jax', 'torch'), default=None,
                      help=argparse.SUPPRESS)  # A child's one side.
  args = parser.parse_args(argv)
  if args.side:
    rates = (_jax_rates if args.side == 'jax' else _torch_rates)(args.reps)
    print(json.dumps({'rates': rates}))
    return
  # pylint: disable-next=g-import-not-at-top
  from benchmarks import procstats
  sides = {'xla': (sys.executable, 'jax')}
  if args.torch_python:
    sides['torch'] = (args.torch_python, 'torch')
  results = {
      name: procstats.run_child(
          [python, '-m', 'benchmarks.matmul_rates', '--side', side,
           '--reps', str(args.reps)])['rates']
      for name, (python, side) in sides.items()}
  print('shape (m x k x n)     ' + ''.join(f'{n:>10}' for n in results)
        + '  GFLOP/s')
  for i, (m, k, n) in enumerate(SHAPES):
    print(f'{m} x {k} x {n:<8}'.ljust(22)
          + ''.join(f'{r[i]:10.1f}' for r in results.values()))
  print(json.dumps({'shapes': SHAPES, **results}))


if __name__ == '__main__':
  main()
