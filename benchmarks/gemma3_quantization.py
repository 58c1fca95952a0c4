"""Quantization error on the real Gemma 3 270M: kernels, logits, perplexity.

The pretrained Gemma 3 270M (the GGUF file of `peft.models.load_gemma3`,
dequantized to float32) is quantized with each `peft.QuantizationMethod`
and with independent anchors, then measured, in one process, against the
float32 model of the same run:

* kernel error: `||Q(W) - W||_F / ||W||_F` per quantized kernel (mean, max);
* logit error: `||logits_q - logits||_F / ||logits||_F` over a held-out
  Shakespeare passage (`passage_ids` of tests/testdata/gemma3/golden.json);
* the passage perplexity and the top-1 agreement with the float model.

Which kernels: the 90 attention and MLP einsum kernels that
`peft.quantization_axes` finds, each with the axes its equation contracts:
what `peft.quantize(params, method=m, axes=axes)` and the quantization
surgery quantize. The tied embedding is an `nn.Embed`, which they leave in
float. Rows `+emb` quantize it too, one channel (or NF4 blocks) per token,
along d_model, the axis the tied output projection contracts. Rows
`default` are `peft.quantize(params, method=m)` without `axes`: every array
with two or more axes, embedding included, reduced over all axes but the
last (so per-channel methods give the embedding one scale per feature
over the 262144 tokens).

Anchors, on the same kernels and axes:

* `nf4 anchor`: NF4 written here in NumPy from QLoRA's definition
  (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): blocks of 64
  along the contracted axes (flattened), absmax scale, the nearest of the
  16 levels built from N(0, 1) quantiles (sec. 3). `peft`'s NF4 must equal
  it exactly (asserted). `nf4 anchor dq` adds double quantization as
  bitsandbytes does it: the block scales, less their mean, in blocks of
  256 on bitsandbytes' signed 8-bit dynamic map.
* `gemma int4`: `gemma.peft.simulate_quantize(w, 'int4', axes)`, when
  `gemma` is importable (the integration venv).

  .venv/bin/python -m benchmarks.gemma3_quantization          # no gemma row
  .venv/bin/python -m benchmarks.gemma3_quantization --quick  # 128 tokens
  .venv-integration/bin/python -m benchmarks.gemma3_quantization  # recorded

The recorded run, in docs/quantization.md ("Error on real Gemma 3 270M"),
takes about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import time
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

import peft
from peft import models

GOLDEN = (pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'testdata'
          / 'gemma3' / 'golden.json')
EMBEDDING = 'embedder/embedding'
# The axis of the (vocab, d_model) embedding the tied output projection
# contracts: one channel, or one run of NF4 blocks, per token.
EMBEDDING_AXES = (1,)
NF4_BLOCK = 64
DQ_BLOCK = 256
QUICK_TOKENS = 128


# The anchor NF4 (NumPy, from the paper; no peft code).


def _normal_ppf(p: float) -> float:
  """The N(0, 1) quantile at `p`, by bisection on the erf-based CDF."""
  lo, hi = -10.0, 10.0
  for _ in range(200):
    mid = (lo + hi) / 2
    if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


def nf4_levels() -> np.ndarray:
  """QLoRA's 16 NF4 levels (sec. 3), float32, sorted.

  The quantiles of N(0, 1) at 8 (positive side) and 7 (negative side)
  probabilities evenly spaced from `delta` = (1/32 + 1/30) / 2 off the tail
  to 1/2, the two zeros merged into one, all divided by the largest so the
  levels span [-1, 1].
  """
  top = 1 - (1 / 32 + 1 / 30) / 2
  pos = [_normal_ppf(p) for p in np.linspace(top, 0.5, 9)[:-1]]
  neg = [-_normal_ppf(p) for p in np.linspace(top, 0.5, 8)[:-1]]
  levels = np.array(pos + [0.0] + neg) / _normal_ppf(top)
  return np.sort(levels).astype(np.float32)


def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`).

  For exponent i = 0..6: the 2**i midpoints of an even grid on [0.1, 1],
  times 10**(i - 6), with both signs; then 0 and 1. 256 sorted values.
  """
  values = [0.0, 1.0]
  for i in range(7):
    edges = np.linspace(0.1, 1, 2**i + 1)
    means = (edges[:-1] + edges[1:]) / 2 * 10.0**(i - 6)
    values += list(means) + list(-means)
  assert len(values) == 256, len(values)
  return np.sort(np.array(values)).astype(np.float32)


def _nearest(x: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray,
                                                     np.ndarray]:
  """Index of the `grid` value nearest each float32 `x`, and ties.

  Midpoints are exact (float64); a value on one goes to the lower side.
  `ties` marks values within one float32 ulp of a midpoint, where a
  float32 implementation may round either way.
  """
  g = grid.astype(np.float64)
  mid = (g[1:] + g[:-1]) / 2
  x64 = x.astype(np.float64)
  ulp = np.spacing(np.abs(x)).astype(np.float64)
  ties = (np.searchsorted(mid, x64 - ulp, side='left')
          != np.searchsorted(mid, x64 + ulp, side='left'))
  return np.searchsorted(mid, x64, side='left'), ties


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
  """(..., n) -> (..., ceil(n / size), size), zero-padded."""
  x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % size)])
  return x.reshape(*x.shape[:-1], -1, size)


def _absmax_quantize(x: np.ndarray, grid: np.ndarray, size: int):
  """Blockwise absmax quantization of the last axis onto `grid` ([-1, 1]).

  Returns codes and ties (`_nearest`), both (..., blocks, size), and the
  absmax (..., blocks, 1).
  """
  blocks = _blocks(x, size)
  absmax = np.abs(blocks).max(axis=-1, keepdims=True)
  codes, ties = _nearest(blocks / np.where(absmax > 0, absmax, 1), grid)
  return codes, ties, absmax


def _double_quantize(absmax: np.ndarray) -> np.ndarray:
  """The block scales after bitsandbytes' double quantization.

  The scales (flattened in order), less their mean, quantized absmax-wise
  in blocks of 256 to the 8-bit dynamic map; then dequantized and the
  mean added back.
  """
  flat = absmax.ravel()
  offset = flat.mean(dtype=np.float32)
  grid = dynamic_map()
  codes, _, scale2 = _absmax_quantize(flat - offset, grid, DQ_BLOCK)
  back = (grid[codes] * scale2).ravel()[:flat.size] + offset
  return back.reshape(absmax.shape).astype(np.float32)


def nf4_anchor(w: Any, axes: tuple[int, ...], *, double_quant: bool = False,
               with_ties: bool = False) -> Any:
  """NF4 round trip of `w` (QLoRA), blocks of 64 along `axes` flattened.

  The contracted `axes` move last (in order) and are flattened; each run
  is cut into blocks of 64, a short last block padded with zeros; each
  value becomes the nearest NF4 level times its block's absmax. With
  `double_quant`, the absmax values are first double-quantized
  (`_double_quantize`); the 4-bit codes do not change. With `with_ties`,
  returns `(round trip, ties)`, `ties` marking the values that lie within
  a float32 ulp of a midpoint between two levels.
  """
  w = np.asarray(w, np.float32)
  axes = tuple(sorted(a % w.ndim for a in axes))
  order = [a for a in range(w.ndim) if a not in axes] + list(axes)
  moved = np.transpose(w, order)
  runs = moved.reshape(*moved.shape[:w.ndim - len(axes)], -1)
  codes, ties, absmax = _absmax_quantize(runs, nf4_levels(), NF4_BLOCK)
  if double_quant:
    absmax = _double_quantize(absmax)

  def unblock(x):
    x = x.reshape(*runs.shape[:-1], -1)[..., :runs.shape[-1]]
    return np.transpose(x.reshape(moved.shape), np.argsort(order))

  out = unblock(nf4_levels()[codes] * absmax)
  return (out, unblock(ties)) if with_ties else out


# The model and its measurements.


def _rel(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@dataclasses.dataclass
class Row:
  name: str
  kernels: str
  kernel_err: list[float] = dataclasses.field(default_factory=list)
  emb_err: float | None = None
  logit_err: float | None = None
  ppl: float | None = None
  top1: float | None = None
  seconds: float = 0.0
  note: str = ''


class Bench:
  """The float model, its passage logits and the quantized-row runner."""

  def __init__(self, pre: models.Pretrained, tokens: np.ndarray):
    self.model = pre.model
    self.params = pre.params
    self.flat = traverse_util.flatten_dict(pre.params, sep='/')
    self.tokens = jnp.asarray(tokens, jnp.int32)[None]
    self.axes = peft.quantization_axes(self.model, self.tokens[:, :4])
    self._logits = jax.jit(
        lambda p, t: self.model.apply({'params': p}, t)[0])
    self._stats = jax.jit(_stats)
    self.ref = self._logits(self.params, self.tokens)

  def stats(self, params) -> tuple[float, float, float]:
    logits = self._logits(params, self.tokens)
    err, nll, top1 = self._stats(logits, self.ref, self.tokens[0])
    return float(err), math.exp(float(nll)), float(top1)

  def row(self, name: str, kernels: str, new: dict[str, Any], *,
          note: str = '', start: float | None = None) -> Row:
    """Measures params whose leaves at `new`'s paths are replaced."""
    start = time.perf_counter() if start is None else start
    row = Row(name=name, kernels=kernels, note=note)
    row.kernel_err = [_rel(new[k], self.flat[k]) for k in self.axes]
    if EMBEDDING in new:
      row.emb_err = _rel(new[EMBEDDING], self.flat[EMBEDDING])
    params = traverse_util.unflatten_dict({**self.flat, **new}, sep='/')
    row.logit_err, row.ppl, row.top1 = self.stats(params)
    row.seconds = time.perf_counter() - start
    return row


def _stats(logits, ref, tokens):
  err = jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref)
  logp = jax.nn.log_softmax(logits[:-1], axis=-1)
  nll = -jnp.mean(jnp.take_along_axis(logp, tokens[1:, None], axis=-1))
  top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(ref, -1))
  return err, nll, top1


def _ours(bench: Bench, method: str, route: str) -> Row:
  """`peft.quantize` + `peft.dequantize` by one of the three routes."""
  start = time.perf_counter()
  if route == 'default':
    quantized = peft.quantize(bench.params, method=method)
  else:
    axes = dict(bench.axes)
    if route == '+emb':
      axes[EMBEDDING] = EMBEDDING_AXES
    quantized = peft.quantize(bench.params, method=method, axes=axes)
  flat = traverse_util.flatten_dict(peft.dequantize(quantized), sep='/')
  new = {k: v for k, v in flat.items() if v is not bench.flat[k]}
  kernels = {'kernels': 'einsum', '+emb': 'einsum+emb',
             'default': 'all>=2D'}[route]
  return bench.row(method, kernels, new, start=start)


def _anchor_rows(bench: Bench) -> list[Row]:
  """The NumPy NF4, plain (checked against peft's) and double-quantized."""
  start = time.perf_counter()
  plain, dq = {}, {}
  differ = ties = 0
  for path, axes in bench.axes.items():
    w = np.asarray(bench.flat[path])
    plain[path], tie = nf4_anchor(w, axes, with_ties=True)
    ours = np.asarray(peft.simulate_quantize(bench.flat[path], 'nf4', axes))
    mismatch = ours != plain[path]
    # Equal but where a value sits on a midpoint to float32 precision.
    assert not np.any(mismatch & ~tie), (
        f'peft NF4 differs from the anchor at {path!r} in '
        f'{int(np.sum(mismatch & ~tie))} values that are not ties')
    differ += int(np.sum(mismatch))
    ties += int(np.sum(tie))
    dq[path] = nf4_anchor(w, axes, double_quant=True)
  weights = sum(bench.flat[k].size for k in bench.axes)
  note = (f'== peft nf4 but {differ} of {weights} values, all ties '
          f'({ties} ties in all)')
  rows = [bench.row('nf4 anchor', 'einsum', plain, start=start, note=note)]
  rows.append(bench.row('nf4 anchor dq', 'einsum', dq,
                        note='scales double-quantized'))
  return rows


def _gemma_row(bench: Bench) -> Row:
  """gemma.peft's INT4 on the same kernels and axes, if gemma imports."""
  try:
    from gemma import peft as gemma_peft  # pylint: disable=g-import-not-at-top
  except ImportError:
    return Row(name='gemma int4', kernels='einsum',
               note='n/a (gemma not installed)')
  start = time.perf_counter()
  new, flips, at_half = {}, 0, 0
  for path, axes in bench.axes.items():
    w = bench.flat[path]
    new[path] = gemma_peft.simulate_quantize(w, 'int4', axis_to_reduce=axes)
    # Codes that differ from ours, and how many of those values sit within
    # 1e-4 of a step of a half step (x * (7 / max) vs x / (max / 7)).
    step = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 7
    ours = peft.simulate_quantize(w, 'int4', axes)
    flip = jnp.abs(new[path] - ours) > step / 2
    half = jnp.abs(jnp.abs(w / step) % 1 - 0.5) < 1e-4
    flips += int(jnp.sum(flip))
    at_half += int(jnp.sum(flip & half))
  weights = sum(bench.flat[k].size for k in bench.axes)
  return bench.row('gemma int4', 'einsum', new, start=start,
                   note=f'codes differ from peft int4 in {flips} of '
                        f'{weights} values, {at_half} at a half step')


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  return f'{cpu}, {os.cpu_count()} CPUs, {platform.system()}'


def _gguf_types() -> str:
  """How the GGUF file stores the tensors the float32 params come from."""
  import gguf  # pylint: disable=g-import-not-at-top

  counts = collections.Counter(
      t.tensor_type.name
      for t in gguf.GGUFReader(str(models.gemma3_gguf_path())).tensors
      if len(t.shape) >= 2)
  return ', '.join(f'{n} {k}' for k, n in sorted(counts.items()))


def _fmt(x: float | None, spec: str) -> str:
  return '-' if x is None else format(x, spec)


def _print_table(rows: list[Row]) -> None:
  head = (f'| {"method":<14} | {"kernels":<10} | {"kernel err mean":>15} | '
          f'{"max":>7} | {"emb err":>7} | {"logit err":>9} | '
          f'{"perplexity":>10} | {"top-1":>6} | {"s":>5} | note |')
  print(head)
  print('|' + '|'.join('-' * (len(c)) for c in head.split('|')[1:-1]) + '|')
  for r in rows:
    mean = float(np.mean(r.kernel_err)) if r.kernel_err else None
    top = float(np.max(r.kernel_err)) if r.kernel_err else None
    print(f'| {r.name:<14} | {r.kernels:<10} | {_fmt(mean, ".4f"):>15} | '
          f'{_fmt(top, ".4f"):>7} | {_fmt(r.emb_err, ".4f"):>7} | '
          f'{_fmt(r.logit_err, ".4f"):>9} | {_fmt(r.ppl, ".3f"):>10} | '
          f'{_fmt(r.top1, ".4f"):>6} | {r.seconds:5.1f} | {r.note} |')


OURS = ('int8', 'int4', 'q4_0', 'q4_0_transpose', 'sfp8', 'nf4')
# The default route for the issue's three methods only.
DEFAULT = ('int8', 'int4', 'nf4')


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help=f'the first {QUICK_TOKENS} passage tokens only')
  parser.add_argument('--tokens', type=int, default=None,
                      help='passage tokens to use (default: all)')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  golden = json.loads(GOLDEN.read_text())
  tokens = np.array(golden['passage_ids'])
  limit = args.tokens or (QUICK_TOKENS if args.quick else None)
  tokens = tokens[:limit]

  pre = models.load_gemma3()
  loaded = time.perf_counter() - start
  bench = Bench(pre, tokens)
  err, ppl, top1 = bench.stats(bench.params)
  assert err == 0.0 and top1 == 1.0, (err, top1)
  base = Row(name='float32', kernels='none', logit_err=0.0, ppl=ppl,
             top1=top1, seconds=time.perf_counter() - start - loaded)

  print(f'Gemma 3 270M, {datetime.date.today()}, {_machine()}, '
        f'jax {jax.__version__} ({jax.devices()[0].platform}), '
        f'python {platform.python_version()}')
  print(f'{len(tokens)} passage tokens; {len(bench.axes)} einsum kernels, '
        f'{sum(bench.flat[k].size for k in bench.axes) / 1e6:.1f}M weights; '
        f'embedding {bench.flat[EMBEDDING].shape}; tokenizer '
        f'{"loaded" if pre.tokenizer else "not loaded (ids from golden)"}; '
        f'load {loaded:.1f} s')
  print(f'the float32 params dequantize the GGUF file: its 2-D tensors are '
        f'{_gguf_types()}')
  if limit is None:
    print(f'transformers float32 perplexity on this file (golden.json): '
          f'{golden["passage_perplexity"]:.3f}')
  rows = [base]
  for route, methods in (('kernels', OURS), ('+emb', OURS),
                         ('default', DEFAULT)):
    for method in methods:
      rows.append(_ours(bench, method, route))
      print(f'  {route:>7} {method}: {rows[-1].seconds:.1f} s', flush=True)
  rows += _anchor_rows(bench)
  rows.append(_gemma_row(bench))
  print()
  _print_table(rows)
  print(f'\ntotal {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
  main()
