"""Shardings of a quantized base from the shardings of its float params.

A QLoRA base is the float base with some kernels replaced by
`QuantizedArray`s (`peft.quantize`), each holding codes and scales where
the float tree held one array. `quantized_shardings` turns the float
params' shardings (however they were made: `nn.logical_to_mesh_sharding`,
hand-written `NamedSharding`s) into shardings for that tree, so each
device holds a slice of the quantized base as it would of the float one
(docs/sharding.md).
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from peft._quant import numerics


def quantized_shardings(shardings: Any, params: Any) -> Any:
  """Shardings for `params` (quantized by `peft.quantize`) from those of
  the float params.

  Where `params` holds a `QuantizedArray`, its codes take the float
  kernel's `PartitionSpec` and its scales the entries of the kernel axes
  they run along (`QuantizedArray.scale_axes`; a block method's blocks
  axis is whole). 4-bit codes pack pairs along the last axis, so a split
  of it keeps each pair on one device. An axis the mesh does not divide
  (a packed axis of odd half-size, a scale axis of size 1) stays whole.
  A sharding that is not a `NamedSharding` (one device, replicated)
  serves codes and scales alike. Other leaves keep their sharding.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import peft
    >>> mesh = jax.make_mesh((2,), ('model',))
    >>> params = {'up': {'kernel': jnp.ones((64, 32))}}  # (embed, mlp)
    >>> floats = {'up': {'kernel': NamedSharding(mesh, P(None, 'model'))}}
    >>> qlora_base = peft.quantize(params, method='int4')
    >>> shardings = peft.quantized_shardings(floats, qlora_base)
    >>> q = shardings['up']['kernel']
    >>> q.values.spec, q.scales.spec  # codes (64, 16), scales (1, 32)
    (P(None, 'model'), P(None, 'model'))
    >>> placed = jax.device_put(qlora_base, shardings)
    >>> placed['up']['kernel'].values.addressable_shards[0].data.shape
    (64, 8)

  Args:
    shardings: a tree like the float params, with a sharding per leaf.
    params: the params with some kernels quantized (arrays or
      `jax.ShapeDtypeStruct`s), or one `QuantizedArray`.

  Returns:
    A tree like `params`: per `QuantizedArray`, one with the shardings of
    its codes and scales for leaves (what `jax.device_put` and `jax.jit`'s
    shardings take).

  Raises:
    ValueError: `shardings` is not a tree like `params` (naming the path
      where they differ).
  """
  def one(leaf, sharding):
    if not numerics.is_quantized(leaf):
      return sharding
    return _of_quantized(sharding, leaf)
  try:
    return jax.tree.map(one, params, shardings,
                        is_leaf=numerics.is_quantized)
  except ValueError as e:
    raise ValueError(
        f'quantized_shardings: `shardings` is not a tree like `params`: {e}'
        '\nPass the float params\' shardings, one per leaf of the params '
        'as they were before peft.quantize.') from None


def _of_quantized(sharding: Any, q: numerics.QuantizedArray) -> Any:
  if isinstance(sharding, NamedSharding):
    values_shape = tuple(q.values.shape)
    spec = tuple(sharding.spec) + (None,) * (len(values_shape) -
                                             len(sharding.spec))
    lead = spec[:len(values_shape) - q.ndim]  # A stacked block's index.
    kernel = spec[len(lead):]
    scale_spec = (*lead, *(None if i is None else kernel[i]
                           for i in q.scale_axes()))
    values = _fitted(sharding, spec, values_shape)
    scales = _fitted(sharding, scale_spec, tuple(q.scales.shape))
  else:
    values = scales = sharding
  # The same pytree node with shardings for leaves.
  return jax.tree.unflatten(jax.tree.structure(q), [values, scales])


def _fitted(like: NamedSharding, spec: tuple[Any, ...],
            shape: tuple[int, ...]) -> NamedSharding:
  """`spec` on `like`'s mesh, each entry kept only where it divides."""
  def ways(entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(like.mesh.shape[n] for n in names)
  fitted = [e if e is not None and size % ways(e) == 0 else None
            for e, size in zip(spec, shape)]
  return NamedSharding(like.mesh, PartitionSpec(*fitted),
                       memory_kind=like.memory_kind)
