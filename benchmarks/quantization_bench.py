"""Param bytes and forward time of a small model per quantization method.

For each method the base params are quantized (`peft.quantize`) and the
model runs under `peft.quantized()` (Int layers: dequantize in the forward)
and under `peft.simulate_quantization()` (QAT). Forward times are medians
of interleaved runs (float, int, simulated, float, ...) measured in the
same process, reported relative to the float model.

  python benchmarks/quantization_bench.py --dim 512 --layers 4
"""

from __future__ import annotations

import argparse
import statistics
import time

from flax import linen as nn
import jax
import jax.numpy as jnp

import peft
from peft._quant import numerics as q
from peft._quant import tree as qtree


class Block(nn.Module):
  """A pre-norm MLP block with a multi-head projection (Dense + Einsum)."""

  dim: int
  head_dim: int = 64

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    heads = self.dim // self.head_dim
    h = nn.DenseGeneral((heads, self.head_dim), name='split')(h)
    h = nn.Einsum((heads, self.head_dim, self.dim), '...nh,nhd->...d',
                  name='merge')(jax.nn.gelu(h))
    up = nn.Dense(4 * self.dim, name='up')(nn.LayerNorm()(x + h))
    return x + h + nn.Dense(self.dim, name='down')(jax.nn.gelu(up))


class Model(nn.Module):
  dim: int
  layers: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = Block(self.dim, name=f'block{i}')(x)
    return x


def _forward(model, surgery_fn):
  @jax.jit
  def run(params, x):
    if surgery_fn is None:
      return model.apply({'params': params}, x)
    with surgery_fn():
      return model.apply({'params': params}, x)
  return run


def _time(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=15)
  args = parser.parse_args()

  model = Model(dim=args.dim, layers=args.layers)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.dim))
  params = jax.jit(model.init)(jax.random.key(0), x)['params']
  axes = peft.quantization_axes(model, x)
  float_fwd = _forward(model, None)
  float_bytes = qtree.param_bytes(params)
  reference = float_fwd(params, x)
  print(f'device={jax.devices()[0].platform} dim={args.dim} '
        f'layers={args.layers} batch={args.batch}x{args.seq} '
        f'kernels={len(axes)} float32 params={float_bytes / 2**20:.2f} MiB')
  print(f'{"method":>15} {"MiB":>7} {"bytes":>6} {"int fwd":>8} '
        f'{"sim fwd":>8} {"rel err":>8}')
  for method in q.QuantizationMethod:
    if method is q.QuantizationMethod.NONE:
      continue
    # Every method takes every kernel shape (short blocks are padded).
    # Eager, not jitted, so bad weights raise instead of turning to NaN.
    qparams = qtree.quantize(params, method=method, axes=axes)
    int_fwd = _forward(model, lambda m=method: peft.quantized(m))
    sim_fwd = _forward(model, lambda m=method: peft.simulate_quantization(m))
    runs = {'float': (float_fwd, params), 'int': (int_fwd, qparams),
            'sim': (sim_fwd, params)}
    for fn, p in runs.values():  # Compile outside the timed loop.
      jax.block_until_ready(fn(p, x))
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # Interleaved, so drift hits all alike.
      for name, (fn, p) in runs.items():
        times[name].append(_time(fn, p, x))
    median = {k: statistics.median(v) for k, v in times.items()}
    out = int_fwd(qparams, x)
    err = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
    nbytes = qtree.param_bytes(qparams)
    print(f'{method.name:>15} {nbytes / 2**20:7.2f} '
          f'{nbytes / float_bytes:6.3f} '
          f'{median["int"] / median["float"]:7.2f}x '
          f'{median["sim"] / median["float"]:7.2f}x {err:8.4f}')
  print('bytes: quantized params / float32 params (LayerNorms, biases stay '
        'float); fwd: median time / median float time.')


if __name__ == '__main__':
  main()
