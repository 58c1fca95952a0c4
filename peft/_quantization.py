"""Weight quantization: simulated (for training) and real (for storage).

Each method maps a float kernel to a few bits per weight plus float scales:

* `INT8`, `INT4`: symmetric absmax integers, one scale per channel (the
  kernel axes an einsum contracts are reduced; see
  `get_axis_to_reduce_from_einsum_str`).
* `Q4_0`, `Q4_0_TRANSPOSE`: llama.cpp's 4-bit block format: blocks of 32
  along the last (resp. second-to-last) axis, a float16 scale per block
  set by the block's largest-magnitude value, codes -8..7.
* `SFP8`: gemma.cpp's 8-bit switched floating point (sign, then a 3-bit
  mantissa down to 2**-7 and a 2-bit one below), one scale per channel.
* `NF4`: 4-bit NormalFloat of QLoRA (Dettmers et al. 2023,
  https://arxiv.org/abs/2305.14314): 16 quantiles of N(0, 1), absmax scale
  per block of 64 along the last axis (no double quantization).

`simulate_quantize` quantizes and dequantizes in float with a
straight-through (identity) gradient, for quantization-aware training.
`quantize_array` stores the codes: int8 for INT8, two 4-bit codes per uint8
for the 4-bit methods (`jnp.int4` takes a full byte per value on CPU), a
uint8 code for SFP8. `dequantize(quantize_array(w))` equals
`simulate_quantize(w)`: both run the same encode and decode.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import enum
import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from peft import _einsum


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
  at = f' at {where!r}' if where else ''
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
  block_axis: int = -1


_SCHEMES = {
    QuantizationMethod.INT8: _Scheme(bits=8),
    QuantizationMethod.INT4: _Scheme(bits=4),
    QuantizationMethod.Q4_0: _Scheme(bits=4, block_size=32),
    QuantizationMethod.Q4_0_TRANSPOSE: _Scheme(bits=4, block_size=32,
                                               block_axis=-2),
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


def _check_blocks(scheme: _Scheme, method, shape, where: str) -> int:
  ndim, axis = len(shape), scheme.block_axis
  if ndim < -axis:
    raise ValueError(
        f'{method.name} blocks axis {axis}, but the array of shape '
        f'{tuple(shape)}{where} has only {ndim} axes. Use a per-channel '
        'method (INT8, INT4, SFP8) for it.'
    )
  if shape[axis] % scheme.block_size:
    raise ValueError(
        f'{method.name} quantizes blocks of {scheme.block_size} along axis '
        f'{axis}, but that axis of shape {tuple(shape)}{where} has size '
        f'{shape[axis]}. Use a kernel whose axis {axis} is a multiple of '
        f'{scheme.block_size}, or a per-channel method (INT8, INT4, SFP8).'
    )
  return axis % ndim


def _to_blocks(x: jax.Array, axis: int, size: int) -> jax.Array:
  x = jnp.moveaxis(x, axis, -1)
  return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _from_blocks(xb: jax.Array, axis: int) -> jax.Array:
  return jnp.moveaxis(xb.reshape(*xb.shape[:-2], -1), -1, axis)


def _safe(scale: jax.Array) -> jax.Array:
  return jnp.where(scale > 0, scale, 1.0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _encode(x, method, axes):
  """float32 `x` -> (unpacked codes, scales)."""
  scheme = _SCHEMES[method]
  if scheme.block_size is None:
    absmax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    if method is QuantizationMethod.SFP8:
      scale = absmax / SFP8_MAGNITUDES[-1]
      idx = jnp.searchsorted(_SFP8_MID, jnp.abs(x) / _safe(scale),
                             method='scan_unrolled')
      return (idx + 128 * (x < 0)).astype(jnp.uint8), scale
    qmax = 2**(scheme.bits - 1) - 1
    scale = absmax / qmax
    q = jnp.clip(jnp.round(x / _safe(scale)), -qmax, qmax)
    if scheme.bits == 8:
      return q.astype(jnp.int8), scale
    return (q + 8).astype(jnp.uint8), scale
  xb = _to_blocks(x, axes, scheme.block_size)
  if method is QuantizationMethod.NF4:
    absmax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    codes = jnp.searchsorted(_NF4_MID, xb / _safe(absmax),
                             method='scan_unrolled')
    return (_from_blocks(codes.astype(jnp.uint8), axes),
            jnp.moveaxis(absmax[..., 0], -1, axes))
  # Q4_0: d = (value of largest magnitude) / -8; codes floor(x / d + 8.5).
  peak = jnp.take_along_axis(
      xb, jnp.argmax(jnp.abs(xb), axis=-1, keepdims=True), axis=-1)
  d = peak / -8.0
  inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
  codes = jnp.clip(jnp.floor(xb * inv + 8.5), 0, 15).astype(jnp.uint8)
  return (_from_blocks(codes, axes),
          jnp.moveaxis(d[..., 0], -1, axes).astype(jnp.float16))


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
  cb = _to_blocks(codes, axes, scheme.block_size)
  sb = jnp.moveaxis(scales, axes, -1)[..., None].astype(jnp.float32)
  if method is QuantizationMethod.NF4:
    xb = jnp.asarray(NF4_LEVELS)[cb] * sb
  else:
    xb = (cb.astype(jnp.float32) - 8.0) * sb
  return _from_blocks(xb, axes)


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
  """Validates; returns (method, axes) where axes is the block axis or the
  reduced axes."""
  at = f' at {where!r}' if where else ''
  if not hasattr(x, 'dtype') or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f'Quantization expects a floating-point array; got '
        f'{getattr(x, "dtype", type(x).__name__)}{at}. Pass a float kernel.'
    )
  method = parse_method(method, where=where)
  if method is QuantizationMethod.NONE:
    return method, None
  scheme = _SCHEMES[method]
  if scheme.block_size is not None:
    return method, _check_blocks(scheme, method, x.shape, at)
  return method, _reduce_axes(axis_to_reduce, x.shape, at)


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
  train through its quantized weights.

  Example:
    >>> w = jnp.array([[0.5, -1.0], [0.24, 0.3]])
    >>> simulate_quantize(w, 'int4', axis_to_reduce=0)
    Array([[ 0.5       , -1.        ],
           [ 0.21428573,  0.2857143 ]], dtype=float32)
    >>> jax.grad(lambda w: simulate_quantize(w, 'int4').sum())(w)
    Array([[1., 1.],
           [1., 1.]], dtype=float32)

  Args:
    x: a float array.
    method: a `QuantizationMethod` or its name.
    axis_to_reduce: per-channel methods (INT8, INT4, SFP8) share one scale
      over these axes (`None`: all axes but the last). Block methods block a
      fixed axis and ignore it.
    where: a location quoted in error messages.

  Returns:
    An array of `x`'s shape and dtype.

  Raises:
    ValueError: unknown method, bad axes, or a block axis that is not a
      multiple of the block size.
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

  Attributes:
    values: int8 codes (INT8), uint8 codes (SFP8) or two 4-bit codes per
      uint8 along the last axis (INT4, Q4_0, Q4_0_TRANSPOSE, NF4).
    scales: float32 per channel or block (float16 for Q4_0).
    method: the quantization method.
    shape: the original shape.
    dtype: the original dtype, restored by `dequantize`.
    axes: the reduced axes (per-channel methods) or the block axis.
  """

  values: jax.Array
  scales: jax.Array
  method: QuantizationMethod
  shape: tuple[int, ...]
  dtype: np.dtype
  axes: tuple[int, ...] | int

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held: codes plus scales."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in (self.values, self.scales))

  def dequantize(self, dtype=None) -> jax.Array:
    """The float array (in `dtype`, default the original dtype)."""
    codes = self.values
    if _SCHEMES[self.method].bits == 4:
      codes = _unpack_nibbles(codes, self.shape[-1])
    x = _decode(codes, self.scales, self.method, self.axes)
    return x.astype(self.dtype if dtype is None else dtype)

  def __repr__(self) -> str:
    arr = lambda a: f'{np.dtype(a.dtype).name}{list(np.shape(a))}'
    return (f'QuantizedArray(method={self.method.name}, shape={self.shape}, '
            f'dtype={np.dtype(self.dtype).name}, values={arr(self.values)}, '
            f'scales={arr(self.scales)})')


def quantize_array(x: jax.Array, method: QuantizationMethod | str,
                   axis_to_reduce: int | Sequence[int] | None = None, *,
                   where: str = '') -> QuantizedArray:
  """Quantizes `x` for storage (see `simulate_quantize` for the arguments).

  Example:
    >>> w = jnp.linspace(-1.0, 1.0, 64 * 8).reshape(8, 64)
    >>> q = quantize_array(w, 'nf4')
    >>> q
    QuantizedArray(method=NF4, shape=(8, 64), dtype=float32, \
values=uint8[8, 32], scales=float32[8, 1])
    >>> q.nbytes, w.nbytes
    (288, 2048)
    >>> bool(jnp.all(q.dequantize() == simulate_quantize(w, 'nf4')))
    True

  Raises:
    ValueError: as `simulate_quantize`; also for method NONE.
    TypeError: `x` is not floating point.
  """
  method, axes = _prepare(x, method, axis_to_reduce, where)
  if method is QuantizationMethod.NONE:
    raise ValueError(
        f'quantize_array needs a real method; got NONE'
        f'{f" at {where!r}" if where else ""}. Keep the float array, or pass'
        ' e.g. method="int8".'
    )
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
