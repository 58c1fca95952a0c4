"""Weight quantization: simulated (for training) and real (for storage).

Each method maps a float kernel to a few bits per weight plus float scales:

* `INT8`, `INT4`: symmetric absmax integers, one scale per channel (the
  kernel axes an einsum contracts are reduced; see
  `get_axis_to_reduce_from_einsum_str`).
* `Q4_0`, `Q4_0_TRANSPOSE`: llama.cpp's 4-bit block format: blocks of 32
  along the last (resp. second-to-last) axis, whatever the contraction (the
  method names the layout), a float16 scale per block set by the block's
  largest-magnitude value, codes -8..7.
* `SFP8`: gemma.cpp's 8-bit switched floating point (sign, then a 3-bit
  mantissa down to 2**-7 and a 2-bit one below), one scale per channel.
* `NF4`: 4-bit NormalFloat of QLoRA (Dettmers et al. 2023,
  https://arxiv.org/abs/2305.14314): 16 quantiles of N(0, 1), absmax scale
  per block of 64 along the contraction, as QLoRA blocks along the input
  features (the contracted axes, flattened; no double quantization).

Any shape quantizes: a blocked run whose length is not a multiple of the
block size ends in a short block, scaled as if zero-padded (the padding
codes are not stored, and `dequantize` returns the original shape).

`simulate_quantize` quantizes and dequantizes in float with a
straight-through (identity) gradient, for quantization-aware training.
`quantize_array` stores the codes: int8 for INT8, two 4-bit codes per uint8
for the 4-bit methods (`jnp.int4` takes a full byte per value on CPU), a
uint8 code for SFP8. `dequantize(quantize_array(w))` equals
`simulate_quantize(w)`: both run the same encode and decode.

Weights must be finite (and, for Q4_0's float16 scales, at most 8 * 65504
in magnitude). Concrete arrays that are not raise a `ValueError`; traced
ones (under `jax.jit`, `jax.grad`) cannot be checked without a host
transfer, so there a channel or block holding such a value dequantizes to
NaN: the fault shows in outputs and losses instead of passing as numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import enum
import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import einsum as _einsum
from peft._core import errors as _errors


class QuantizationMethod(enum.StrEnum):
  """Quantization methods; `QuantizationMethod('int8')` ignores case.

  Example:
    >>> QuantizationMethod('Q4_0'), QuantizationMethod.NF4.value
    (<QuantizationMethod.Q4_0: 'q4_0'>, 'nf4')
  """

  NONE = enum.auto()
  INT4 = enum.auto()
  INT8 = enum.auto()
  Q4_0 = enum.auto()
  Q4_0_TRANSPOSE = enum.auto()
  SFP8 = enum.auto()
  NF4 = enum.auto()

  @classmethod
  def _missing_(cls, value):
    if isinstance(value, str):
      for member in cls:
        if member.value == value.lower():
          return member
    raise ValueError(_unknown_method(value, where=''))


def _unknown_method(value: object, *, where: str) -> str:
  at = _errors.at(where)
  names = ', '.join(m.name for m in QuantizationMethod)
  return (f'Unknown quantization method {value!r}{at}. Pass one of {names} '
          '(a QuantizationMethod or its name, any case).')


def parse_method(method: object, *, where: str = '') -> QuantizationMethod:
  """`method` as a `QuantizationMethod`; an unknown one lists the valid."""
  if isinstance(method, QuantizationMethod):
    return method
  try:
    return QuantizationMethod(method)
  except ValueError:
    raise ValueError(_unknown_method(method, where=where)) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Scheme:
  bits: int
  block_size: int | None = None  # None: one scale per channel.
  # The axis a block method blocks when the method fixes it (Q4_0's
  # layouts); None blocks the contracted axes, flattened (NF4).
  block_axis: int | None = None
  # The largest |x| whose scale the scale dtype holds (None: float32's).
  max_abs: float | None = None


# Q4_0 keeps d = -peak / 8 in float16: |peak| / 8 must not pass its max.
_Q4_0_MAX_ABS = 8 * float(np.finfo(np.float16).max)

_SCHEMES = {
    QuantizationMethod.INT8: _Scheme(bits=8),
    QuantizationMethod.INT4: _Scheme(bits=4),
    QuantizationMethod.Q4_0: _Scheme(bits=4, block_size=32, block_axis=-1,
                                     max_abs=_Q4_0_MAX_ABS),
    QuantizationMethod.Q4_0_TRANSPOSE: _Scheme(
        bits=4, block_size=32, block_axis=-2, max_abs=_Q4_0_MAX_ABS),
    QuantizationMethod.SFP8: _Scheme(bits=8),
    QuantizationMethod.NF4: _Scheme(bits=4, block_size=64),
}


def _normal_float_levels() -> np.ndarray:
  """The 16 NF4 levels: 8 positive and 7 negative quantiles of N(0, 1) and 0.

  The quantiles are taken at probabilities evenly spaced from 1/2 to
  `1 - delta`, `delta` halfway between 1/30 and 1/32, then divided by the
  largest so the levels span [-1, 1] with an exact zero (QLoRA, sec. 3).
  """
  top = 1 - (1 / 30 + 1 / 32) / 2
  ppf = statistics.NormalDist().inv_cdf
  pos = [ppf(p) for p in np.linspace(top, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(top, 0.5, 8)[:-1]]
  return np.sort(np.array(pos + [0.0] + neg) / ppf(top)).astype(np.float32)


def _sfp8_magnitudes() -> np.ndarray:
  """The 128 SFP8 magnitudes: 0, then 2-bit mantissas on 2**-23..2**-8 and
  3-bit mantissas on 2**-7..2**0 (largest 1.875); the smallest 2-bit value
  is given up for the zero."""
  small = [(1 + m / 4) * 2.0**e for e in range(-23, -7) for m in range(4)]
  large = [(1 + m / 8) * 2.0**e for e in range(-7, 1) for m in range(8)]
  return np.array([0.0] + small[1:] + large, np.float32)


NF4_LEVELS = _normal_float_levels()
SFP8_MAGNITUDES = _sfp8_magnitudes()
_NF4_MID = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
_SFP8_MID = (SFP8_MAGNITUDES[1:] + SFP8_MAGNITUDES[:-1]) / 2


def _reduce_axes(axis_to_reduce, shape, where: str) -> tuple[int, ...]:
  ndim = len(shape)
  if axis_to_reduce is None:
    return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))
  axes = ((axis_to_reduce,) if isinstance(axis_to_reduce, int)
          else tuple(axis_to_reduce))
  if not all(isinstance(a, int) and -ndim <= a < ndim for a in axes) or len(
      {a % ndim for a in axes}) != len(axes):
    raise ValueError(
        f'axis_to_reduce {axis_to_reduce!r} does not name distinct axes of '
        f'an array of shape {tuple(shape)}{where}. Pass ints in '
        f'[{-ndim}, {ndim}), e.g. the contracted kernel axes.'
    )
  return tuple(sorted(a % ndim for a in axes))


def _block_axes(scheme: _Scheme, method, shape, reduced,
                where: str) -> tuple[int, ...]:
  """The axes a block method's blocks run along (flattened, in order)."""
  if scheme.block_axis is None:
    return reduced
  ndim, axis = len(shape), scheme.block_axis
  if ndim < -axis:
    raise ValueError(
        f'{method.name} blocks axis {axis}, but the array of shape '
        f'{tuple(shape)}{where} has only {ndim} axes. Use a per-channel '
        'method (INT8, INT4, SFP8) or NF4 for it.'
    )
  return (axis % ndim,)


@jax.jit
def _value_stats(x):
  """(NaN count, Inf count, first non-finite index, max finite |x|, index
  of the max): a few scalars, so checking costs one small transfer."""
  flat = jnp.ravel(x).astype(jnp.float32)
  finite = jnp.isfinite(flat)
  mag = jnp.where(finite, jnp.abs(flat), 0.0)
  return (jnp.sum(jnp.isnan(flat)), jnp.sum(jnp.isinf(flat)),
          jnp.argmin(finite), jnp.max(mag), jnp.argmax(mag))


def _check_values(x, method, scheme: _Scheme, where: str) -> None:
  """Rejects weights the method cannot encode, for concrete arrays only.

  A traced array (inside jit, grad, scan: e.g. `simulate_quantize` in a
  training step) has no values to read, and reading them would cost a
  host sync per step; `_encode` turns its bad channels or blocks into NaN.
  """
  if isinstance(x, jax.core.Tracer) or not math.prod(np.shape(x)):
    return
  shape = tuple(np.shape(x))
  index = lambda i: tuple(int(k) for k in np.unravel_index(int(i), shape))
  n_nan, n_inf, first, peak, peak_at = jax.device_get(_value_stats(x))
  if n_nan or n_inf:
    raise ValueError(
        f'{method.name} cannot quantize the array of shape {shape}{where}: '
        f'it holds {int(n_nan)} NaN and {int(n_inf)} Inf (the first at index '
        f'{index(first)}). Quantization needs finite weights: find where '
        'they diverged, or replace them (e.g. jnp.nan_to_num) first.'
    )
  if scheme.max_abs is not None and peak > scheme.max_abs:  # Q4_0's only.
    raise ValueError(
        f'{method.name} keeps each block scale (largest |x| / 8) in float16,'
        f' so |x| must be at most {scheme.max_abs:.0f}; the array of shape '
        f'{shape}{where} has |x| = {float(peak):.4g} at index '
        f'{index(peak_at)}. Scale the weights down, or use NF4 or a '
        'per-channel method (float32 scales).'
    )


def _to_blocks(x: jax.Array, axes: tuple[int, ...], size: int) -> jax.Array:
  """(..., axes) -> (kept..., blocks, size): `axes` moved last, flattened
  and zero-padded to whole blocks."""
  kept = [a for a in range(x.ndim) if a not in axes]
  x = jnp.transpose(x, kept + list(axes))
  x = x.reshape(*x.shape[:len(kept)], -1)
  pad = -x.shape[-1] % size
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _from_blocks(xb: jax.Array, axes: tuple[int, ...],
                 shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `_to_blocks`: drops the padding, restores `shape`."""
  kept = [a for a in range(len(shape)) if a not in axes]
  order = kept + list(axes)
  x = xb.reshape(*xb.shape[:-2], -1)[..., :math.prod(shape[a] for a in axes)]
  x = x.reshape([shape[a] for a in order])
  return jnp.transpose(x, np.argsort(order).tolist())


def _safe(scale: jax.Array) -> jax.Array:
  return jnp.where(scale > 0, scale, 1.0)


def _poison(scale: jax.Array, bad: jax.Array) -> jax.Array:
  # A NaN scale makes its whole channel or block dequantize to NaN.
  return jnp.where(bad, jnp.nan, scale).astype(scale.dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _encode(x, method, axes):
  """float32 `x` -> (unpacked codes of `x`'s shape, scales).

  Codes are computed with non-finite values read as 0 (so they are
  well-defined); the scale of a channel or block that held one, or a
  value its scale cannot carry, is NaN.
  """
  scheme = _SCHEMES[method]
  if scheme.block_size is None:
    bad = ~jnp.all(jnp.isfinite(x), axis=axes, keepdims=True)
    x = jnp.where(jnp.isfinite(x), x, 0.0)
    absmax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    if method is QuantizationMethod.SFP8:
      scale = absmax / SFP8_MAGNITUDES[-1]
      idx = jnp.searchsorted(_SFP8_MID, jnp.abs(x) / _safe(scale),
                             method='scan_unrolled')
      return (idx + 128 * (x < 0)).astype(jnp.uint8), _poison(scale, bad)
    qmax = 2**(scheme.bits - 1) - 1
    scale = absmax / qmax
    q = jnp.clip(jnp.round(x / _safe(scale)), -qmax, qmax)
    codes = q.astype(jnp.int8) if scheme.bits == 8 else (q + 8).astype(
        jnp.uint8)
    return codes, _poison(scale, bad)
  xb = _to_blocks(x, axes, scheme.block_size)
  bad = ~jnp.all(jnp.isfinite(xb), axis=-1)
  xb = jnp.where(jnp.isfinite(xb), xb, 0.0)
  if method is QuantizationMethod.NF4:
    absmax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    codes = jnp.searchsorted(_NF4_MID, xb / _safe(absmax),
                             method='scan_unrolled')
    return (_from_blocks(codes.astype(jnp.uint8), axes, x.shape),
            _poison(absmax[..., 0], bad))
  # Q4_0: d = (value of largest magnitude) / -8; codes floor(x / d + 8.5).
  peak = jnp.take_along_axis(
      xb, jnp.argmax(jnp.abs(xb), axis=-1, keepdims=True), axis=-1)
  d = peak / -8.0
  inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
  codes = jnp.clip(jnp.floor(xb * inv + 8.5), 0, 15).astype(jnp.uint8)
  if scheme.max_abs is not None:  # Q4_0's float16 block scales.
    bad = bad | (jnp.abs(peak[..., 0]) > scheme.max_abs)
  return (_from_blocks(codes, axes, x.shape),
          _poison(d[..., 0].astype(jnp.float16), bad))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _decode(codes, scales, method, axes) -> jax.Array:
  """(unpacked codes, scales) -> float32."""
  scheme = _SCHEMES[method]
  if scheme.block_size is None:
    if method is QuantizationMethod.SFP8:
      mag = jnp.asarray(SFP8_MAGNITUDES)[codes & 127]
      return jnp.where(codes >= 128, -mag, mag) * scales
    q = codes.astype(jnp.float32) - (8 if scheme.bits == 4 else 0)
    return q * scales
  # The padding codes decode to junk that `_from_blocks` drops.
  cb = _to_blocks(codes, axes, scheme.block_size)
  sb = scales[..., None].astype(jnp.float32)
  if method is QuantizationMethod.NF4:
    xb = jnp.asarray(NF4_LEVELS)[cb] * sb
  else:
    xb = (cb.astype(jnp.float32) - 8.0) * sb
  return _from_blocks(xb, axes, codes.shape)


@jax.jit
def _pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8 codes < 16 -> two per byte along the last axis (padded if odd)."""
  if codes.shape[-1] % 2:
    pad = [(0, 0)] * (codes.ndim - 1) + [(0, 1)]
    codes = jnp.pad(codes, pad)
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


@functools.partial(jax.jit, static_argnums=1)
def _unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
  pairs = jnp.stack([packed & 15, packed >> 4], axis=-1)
  return pairs.reshape(*packed.shape[:-1], -1)[..., :n]


def _prepare(x, method, axis_to_reduce, where: str):
  """Validates; returns (method, axes): the reduced axes (per-channel
  methods) or the axes blocks run along."""
  at = _errors.at(where)
  if not hasattr(x, 'dtype') or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f'Quantization expects a floating-point array; got '
        f'{getattr(x, "dtype", type(x).__name__)}{at}. Pass a float kernel.'
    )
  method = parse_method(method, where=where)
  if method is QuantizationMethod.NONE:
    return method, None
  scheme = _SCHEMES[method]
  axes = _reduce_axes(axis_to_reduce, x.shape, at)
  if scheme.block_size is not None:
    axes = _block_axes(scheme, method, x.shape, axes, at)
  _check_values(x, method, scheme, at)
  return method, axes


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _fake_quant(x, method, axes):
  codes, scales = _encode(x.astype(jnp.float32), method, axes)
  return _decode(codes, scales, method, axes).astype(x.dtype)


@_fake_quant.defjvp
def _fake_quant_jvp(method, axes, primals, tangents):
  (x,), (dx,) = primals, tangents
  return _fake_quant(x, method, axes), dx  # Straight-through: identity.


def simulate_quantize(x: jax.Array, method: QuantizationMethod | str,
                      axis_to_reduce: int | Sequence[int] | None = None, *,
                      where: str = '') -> jax.Array:
  """Quantizes then dequantizes `x` in float; the gradient is the identity.

  Guarantee: the value equals `dequantize(quantize_array(x, ...))`, while
  `jax.grad` sees the identity (straight-through estimator), so a model can
  train through its quantized weights. Any shape works (see the module
  docstring on short blocks).

  Example:
    >>> w = jnp.array([[0.5, -1.0], [0.24, 0.3]])
    >>> simulate_quantize(w, 'int4', axis_to_reduce=0)
    Array([[ 0.5       , -1.        ],
           [ 0.21428573,  0.2857143 ]], dtype=float32)
    >>> jax.grad(lambda w: simulate_quantize(w, 'int4').sum())(w)
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
    >>> simulate_quantize(jnp.ones((40, 3)), 'nf4').shape  # a short block
    (40, 3)

  Args:
    x: a float array.
    method: a `QuantizationMethod` or its name.
    axis_to_reduce: the kernel axes the layer contracts (`None`: all axes
      but the last, as in a Dense kernel `(in, out)`). Per-channel methods
      (INT8, INT4, SFP8) share one scale over them; NF4 blocks along them
      (flattened); Q4_0 and Q4_0_TRANSPOSE block the axis their name fixes.
    where: a location quoted in error messages.

  Returns:
    An array of `x`'s shape and dtype. For traced `x` (under `jax.jit`,
    `jax.grad`), a channel or block holding a NaN or infinite value, or a
    Q4_0 block with a value beyond +-524032, comes out all NaN.

  Raises:
    ValueError: unknown method, bad axes, an array with too few axes for
      Q4_0_TRANSPOSE, or a concrete `x` holding NaN or infinite values (or,
      for Q4_0, `|x|` above 524032, where its float16 scale overflows).
    TypeError: `x` is not floating point.
  """
  method, axes = _prepare(x, method, axis_to_reduce, where)
  if method is QuantizationMethod.NONE:
    return x
  return _fake_quant(x, method, axes)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=['values', 'scales'],
    meta_fields=['method', 'shape', 'dtype', 'axes'])
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedArray:
  """A quantized array: codes, scales and how to read them (a pytree).

  Built by `quantize_array` (or `peft.quantize` on a param tree); read back
  by `dequantize`. Codes and scales are its pytree leaves, so it passes
  through `jax.jit` and sits in param trees like any array.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import peft
    >>> w = jnp.array([[1.0, -2.0], [0.5, 4.0]])  # (in, out)
    >>> q = peft.quantize_array(w, 'int8')  # one scale per output column
    >>> q.values.tolist(), (q.scales * 127).tolist()  # scale: absmax / 127
    ([[127, -64], [64, 127]], [[1.0, 4.0]])
    >>> jax.jit(lambda q: q.dequantize())(q).tolist()
    [[1.0, -2.0157...], [0.5039..., 4.0]]

  Attributes:
    values: int8 codes (INT8), uint8 codes (SFP8) or two 4-bit codes per
      uint8 along the last axis (INT4, Q4_0, Q4_0_TRANSPOSE, NF4), one code
      per element of `shape` (a short block's padding is not stored).
    scales: float32 (float16 for Q4_0). Per-channel methods: `shape` with
      the reduced axes set to 1. Block methods: `(kept axes..., blocks)`,
      blocks running along `axes` flattened, the last one possibly short.
    method: the quantization method.
    shape: the original shape.
    dtype: the original dtype, restored by `dequantize`.
    axes: the reduced axes (per-channel methods) or the axes blocks run
      along; passing them as `axis_to_reduce` quantizes alike again.
  """

  values: jax.Array
  scales: jax.Array
  method: QuantizationMethod
  shape: tuple[int, ...]
  dtype: np.dtype
  axes: tuple[int, ...]

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held: codes plus scales."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in (self.values, self.scales))

  def scale_axes(self) -> tuple[int | None, ...]:
    """Per axis of `scales`, the axis of `shape` it runs along, or None
    for the blocks axis of a block method (what a sharding of the float
    array says of the scales: docs/sharding.md).

    Example:
      >>> w = jnp.ones((64, 8))  # (in, out)
      >>> quantize_array(w, 'int8').scale_axes()  # scales (1, 8)
      (0, 1)
      >>> quantize_array(w, 'nf4').scale_axes()  # scales (8, 1): out, blocks
      (1, None)
    """
    if _SCHEMES[self.method].block_size is None:
      return tuple(range(self.ndim))  # Reduced axes kept, of size 1.
    kept = [i for i in range(self.ndim) if i not in self.axes]
    return (*kept, None)

  def dequantize(self, dtype=None) -> jax.Array:
    """The float array (in `dtype`, default the original dtype)."""
    codes = self.values
    if _SCHEMES[self.method].bits == 4:
      codes = _unpack_nibbles(codes, self.shape[-1])
    x = _decode(codes, self.scales, self.method, self.axes)
    return x.astype(self.dtype if dtype is None else dtype)

  def __repr__(self) -> str:
    # Leaves may be anything after a `jax.tree.map` (shapes, specs...).
    def arr(a):
      if hasattr(a, 'dtype') and hasattr(a, 'shape'):
        return f'{np.dtype(a.dtype).name}{list(np.shape(a))}'
      return repr(a)
    return (f'QuantizedArray(method={self.method.name}, shape={self.shape}, '
            f'dtype={np.dtype(self.dtype).name}, values={arr(self.values)}, '
            f'scales={arr(self.scales)})')


def quantize_array(x: jax.Array, method: QuantizationMethod | str,
                   axis_to_reduce: int | Sequence[int] | None = None, *,
                   where: str = '') -> QuantizedArray:
  """Quantizes `x` for storage (see `simulate_quantize` for the arguments).

  Example:
    >>> w = jnp.linspace(-1.0, 1.0, 64 * 8).reshape(64, 8)  # (in, out)
    >>> q = quantize_array(w, 'nf4')  # blocks of 64 along `in`
    >>> q
    QuantizedArray(method=NF4, shape=(64, 8), dtype=float32, \
values=uint8[64, 4], scales=float32[8, 1])
    >>> q.nbytes, w.nbytes
    (288, 2048)
    >>> bool(jnp.all(q.dequantize() == simulate_quantize(w, 'nf4')))
    True
    >>> short = quantize_array(w[:40], 'nf4')  # one short block of 40
    >>> short.scales.shape, short.dequantize().shape
    ((8, 1), (40, 8))

  Raises:
    ValueError: as `simulate_quantize`; also for method NONE.
    TypeError: `x` is not floating point.
  """
  method, axes = _prepare(x, method, axis_to_reduce, where)
  if method is QuantizationMethod.NONE:
    raise ValueError(
        f'quantize_array needs a real method; got NONE'
        f'{_errors.at(where)}. Keep the float array, or pass'
        ' e.g. method="int8".'
    )
  assert axes is not None  # `_prepare` gives every real method its axes.
  codes, scales = _encode(jnp.asarray(x, jnp.float32), method, axes)
  if _SCHEMES[method].bits == 4:
    codes = _pack_nibbles(codes)
  return QuantizedArray(values=codes, scales=scales, method=method,
                        shape=tuple(x.shape), dtype=np.dtype(x.dtype),
                        axes=axes)


def is_quantized(x: object) -> bool:
  return isinstance(x, QuantizedArray)


def dequantize(tree, dtype=None):
  """Replaces every `QuantizedArray` in `tree` by its float array.

  Example:
    >>> q = quantize_array(jnp.array([[1.0, -2.0], [0.5, 4.0]]), 'int8')
    >>> dequantize({'kernel': q})['kernel'].tolist()
    [[1.0, -2.0], [0.5039370059967041, 4.0]]
  """
  return jax.tree.map(
      lambda x: x.dequantize(dtype) if is_quantized(x) else x, tree,
      is_leaf=is_quantized)


def get_axis_to_reduce_from_einsum_str(
    einsum_str: str) -> tuple[int, ...] | None:
  """The kernel axes a per-channel quantizer reduces for `einsum_str`.

  These are the weight axes contracted with the inputs, for any valid
  `inputs,weights->outputs` equation (`None` if none is contracted).

  Example:
    >>> get_axis_to_reduce_from_einsum_str('BTNH,NHD->BTD')
    (0, 1)
    >>> get_axis_to_reduce_from_einsum_str('...H,HF->...F')
    (0,)

  Raises:
    ValueError, TypeError: `einsum_str` is not such an equation.
  """
  axes = _einsum.EinsumEquation.parse(einsum_str).reduction_axes
  return axes or None
