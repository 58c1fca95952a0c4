"""DoRA: weight-decomposed low-rank adaptation, the math every API shares.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) splits the adapted
kernel into a direction and a magnitude: with `V = W + scale * delta(A, B)`
(LoRA's adapted kernel) it uses

    W' = m * V / ||V||

where the norm is taken per output feature of the layer: over the kernel
axes its output does not keep (the contracted ones), for each entry of the
axes it keeps (`EinsumEquation.magnitude_axes`: output features, and axes
the inputs, kernel and output share, such as experts). `m` is a trainable
vector of that shape, stored beside A and B as `'m'`
(`{'a': A, 'b': B, 'm': m}`), initialised to `||W||`, so that at init (B = 0)
`W' = W`.

As in the paper (section 4.3) and HF PEFT, `||V||` is a constant in the
backward pass (`jax.lax.stop_gradient`): gradients reach A and B through
`V` in the numerator only, which saves the memory of differentiating the
norm. The forward never forms `x @ W'`; with `y = x @ W + bias` (the
wrapped layer's output) and `g = m / ||V||` laid out over the output,

    out = y + (g - 1) * (y - bias) + g * scale * (x @ A) @ B
        = bias + g * (x @ W + scale * (x @ A) @ B)

so the bias is added after the rescaling. The norm itself needs `V`, a
kernel-sized elementwise pass per call (no matmul): that cost is DoRA's.

A fused kernel `m * V / ||V||` does not determine `W` (each column's norm
is lost), so fuse returns the norm too (`fused_kernel`) and unfuse needs it
back (`unfused_kernel`).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp

from peft._core import einsum as _einsum

# The magnitude's key in an adapter dict, beside 'a' and 'b'.
MAGNITUDE = 'm'


def norm_axes(ndim: int, magnitude_axes: Sequence[int], *,
              n_stack: int = 0) -> tuple[int, ...]:
  """Axes of a kernel (with `n_stack` leading stack axes) the norm sums.

  Example:
    >>> norm_axes(3, (1, 2)), norm_axes(2, (1,), n_stack=1)
    ((0,), (1,))
  """
  return tuple(i + n_stack for i in range(ndim) if i not in magnitude_axes)


def column_norm(kernel: jax.Array, magnitude_axes: Sequence[int], *,
                n_stack: int = 0) -> jax.Array:
  """`||kernel||` per output feature, in float32 (or wider).

  Example:
    >>> column_norm(jnp.array([[3., 0.], [4., 1.]]), (1,)).tolist()
    [5.0, 1.0]

  Args:
    kernel: the kernel, with `n_stack` leading stack axes.
    magnitude_axes: the kernel axes the norm keeps (per-layer indices).
    n_stack: how many leading stack axes the kernel has.

  Returns:
    An array over the stack and magnitude axes.
  """
  dtype = jnp.result_type(kernel, jnp.float32)
  k = jnp.asarray(kernel).astype(dtype)
  axes = norm_axes(k.ndim - n_stack, magnitude_axes, n_stack=n_stack)
  return jnp.sqrt(jnp.sum(k * k, axis=axes))


def _adapted(kernel, a, b, scale, delta_str: str, n_stack: int):
  """`V = W + scale * delta(A, B)` in float32 (or wider)."""
  dtype = jnp.result_type(kernel, a, b, jnp.float32)
  delta = _einsum.delta(_einsum.stacked_delta_str(delta_str, n_stack),
                        jnp.asarray(a).astype(dtype),
                        jnp.asarray(b).astype(dtype))
  return jnp.asarray(kernel).astype(dtype) + jnp.asarray(scale, dtype) * delta


def _safe(norm: jax.Array) -> jax.Array:
  # A zero column of V stays zero whatever it is scaled by: divide by 1.
  return jnp.where(norm > 0, norm, jnp.ones_like(norm))


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array,
                scale: float, *, delta_str: str,
                magnitude_axes: Sequence[int], n_stack: int = 0
                ) -> jax.Array:
  """`stop_gradient(||W + scale * delta(A, B)||)`: the norm DoRA divides by.

  Zero where a column of `V` is zero (`rescale` then leaves it at zero).

  Example:
    >>> w = jnp.array([[3., 0.], [4., 1.]])
    >>> a, b = jnp.zeros((2, 1)), jnp.zeros((1, 2))
    >>> weight_norm(w, a, b, 1.0, delta_str='ir,ro->io',
    ...             magnitude_axes=(1,)).tolist()
    [5.0, 1.0]
  """
  v = _adapted(kernel, a, b, scale, delta_str, n_stack)
  return jax.lax.stop_gradient(column_norm(v, magnitude_axes,
                                           n_stack=n_stack))


def rescale(m: jax.Array, norm: jax.Array) -> jax.Array:
  """`g = m / ||V||` (float32), 1 where a column of `V` is zero."""
  return jnp.asarray(m).astype(jnp.result_type(m, jnp.float32)) / _safe(norm)


def correction(y0: jax.Array, update: jax.Array, g: jax.Array,
               dtype) -> jax.Array:
  """`(g - 1) * y0 + g * update` in `dtype`: what DoRA adds to `y`.

  With `y = y0 + bias`, `y + correction` is `bias + g * (y0 + update)`;
  where `g` is exactly 1 and the update exactly 0 (DoRA at init, when `m`
  and the norm round alike) the correction is exactly 0.

  Example:
    >>> correction(jnp.ones(2), jnp.zeros(2), jnp.ones(2), jnp.float32)
    Array([0., 0.], dtype=float32)

  Args:
    y0: the wrapped layer's output without its bias.
    update: `scale * (x @ A) @ B`.
    g: `m / ||V||`, laid out to broadcast against `y0`.
    dtype: the layer's output dtype.
  """
  g = g.astype(dtype)
  return (g - 1) * y0.astype(dtype) + g * update.astype(dtype)


@functools.partial(jax.jit, static_argnames=('delta_str', 'magnitude_axes',
                                             'n_stack'))
def fused_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array,
                 m: jax.Array, scale: float, *, delta_str: str,
                 magnitude_axes: tuple[int, ...], n_stack: int = 0
                 ) -> tuple[jax.Array, jax.Array]:
  """`(m * V / ||V||` in the kernel's dtype, `||V||)`: DoRA folded in.

  The norm is what `unfused_kernel` needs to get `W` back.

  Example:
    >>> w = jnp.array([[3., 0.], [4., 1.]])
    >>> a, b = jnp.zeros((2, 1)), jnp.zeros((1, 2))
    >>> new, norm = fused_kernel(w, a, b, jnp.array([10., 2.]), 1.0,
    ...                          delta_str='ir,ro->io', magnitude_axes=(1,))
    >>> new.tolist(), norm.tolist()
    ([[6.0, 0.0], [8.0, 2.0]], [5.0, 1.0])
  """
  v = _adapted(kernel, a, b, scale, delta_str, n_stack)
  norm = column_norm(v, magnitude_axes, n_stack=n_stack)
  axes = norm_axes(v.ndim - n_stack, magnitude_axes, n_stack=n_stack)
  g = jnp.expand_dims(rescale(m, norm), axes)
  return (v * g).astype(kernel.dtype), norm


@functools.partial(jax.jit, static_argnames=('delta_str', 'magnitude_axes',
                                             'n_stack'))
def unfused_kernel(fused: jax.Array, a: jax.Array, b: jax.Array,
                   m: jax.Array, norm: jax.Array, scale: float, *,
                   delta_str: str, magnitude_axes: tuple[int, ...],
                   n_stack: int = 0) -> jax.Array:
  """Inverse of `fused_kernel`: `W = fused * ||V|| / m - scale * delta`.

  Where `m` is zero the fused column is zero and `V` is lost; such columns
  come back as NaN (callers check, see `lost_columns`).
  """
  dtype = jnp.result_type(fused, a, b, jnp.float32)
  axes = norm_axes(fused.ndim - n_stack, magnitude_axes, n_stack=n_stack)
  m = jnp.asarray(m).astype(dtype)
  norm = jnp.asarray(norm).astype(dtype)
  # V's column is zero where its norm is; lost (NaN) where m zeroed it.
  back = jnp.where(norm == 0, jnp.zeros_like(norm),
                   jnp.where(m != 0, norm / jnp.where(m != 0, m, 1), jnp.nan))
  v = fused.astype(dtype) * jnp.expand_dims(back, axes)
  delta = _einsum.delta(_einsum.stacked_delta_str(delta_str, n_stack),
                        jnp.asarray(a).astype(dtype),
                        jnp.asarray(b).astype(dtype))
  return (v - jnp.asarray(scale, dtype) * delta).astype(fused.dtype)


def lost_columns(m: jax.Array, norm: jax.Array) -> int:
  """How many columns a fuse zeroed for good (`m == 0`, `||V|| > 0`)."""
  return int(jnp.sum((jnp.asarray(m) == 0) & (jnp.asarray(norm) > 0)))
