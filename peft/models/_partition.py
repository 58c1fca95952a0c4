"""Logical axis names of the decoder's params, for sharding them on a mesh.

`Decoder` declares its weights without partitioning boxes, so a pretrained
checkpoint loads as plain arrays. This table says what each weight axis
is (`'vocab'`, `'embed'`, `'heads'`, `'kv_heads'`, `'kv'`, `'mlp'`, or
`None` for a small axis that stays whole), keyed by the weight's name in
the param tree. A mesh's rules then map names to mesh axes, as flax's
`nn.logical_to_mesh_axes` does for boxed params (see docs/sharding.md).
A scanning Decoder's stacked blocks (`stack_layers`) have one more axis in
front, the block's index, named `None`: each device holds its slice of
every block, as it does unrolled. A quantized kernel (`peft.QuantizedArray`,
a QLoRA base) is one leaf here, named as its float kernel; its codes and
scales then follow that kernel's sharding (`peft.quantized_shardings`).
"""

from __future__ import annotations

from typing import Any

import jax

from peft._quant import numerics as _numerics
from peft.models import _scan

AxisNames = tuple[str | None, ...]

# Weight name (the last key of its path, and the module before it for the
# attention einsums' shared name `w`) -> the names of its axes.
_BY_NAME: dict[tuple[str, ...], AxisNames] = {
    ('embedding',): ('vocab', 'embed'),
    ('q_einsum', 'w'): ('heads', 'embed', 'kv'),
    ('kv_einsum', 'w'): (None, 'kv_heads', 'embed', 'kv'),
    ('attn_vec_einsum', 'w'): ('heads', 'kv', 'embed'),
    ('gating_einsum',): (None, 'embed', 'mlp'),
    ('linear',): ('mlp', 'embed'),
    ('scale',): (None,),  # RMSNorm scales: small, replicated.
}


def _names(path: tuple[str, ...], shape: tuple[int, ...]) -> AxisNames:
  for suffix, names in _BY_NAME.items():
    if path[-len(suffix):] == suffix and len(names) == len(shape):
      return names
  raise ValueError(
      f'The param {"/".join(path)!r} of shape {shape} is not a weight of '
      'peft.models.Decoder, so it has no axis names. Pass the params of a '
      'Decoder (as its loaders return them).')


def partition_names(params: Any) -> Any:
  """The logical axis names of each of a `Decoder`'s params.

  Example:
    >>> from peft import models
    >>> params = models.random_params(models.tiny_config())
    >>> names = models.partition_names(params)
    >>> names['layers_0']['attn']['q_einsum']['w']
    ('heads', 'embed', 'kv')
    >>> names['embedder']['embedding'], names['final_norm']['scale']
    (('vocab', 'embed'), (None,))
    >>> config = models.tiny_config()
    >>> stacked = models.stack_layers(params, config)
    >>> models.partition_names(stacked)[
    ...     'scanned_layers']['layers_0']['attn']['q_einsum']['w']
    (None, 'heads', 'embed', 'kv')
    >>> import peft
    >>> qlora_base = peft.quantize(params, method='int4')
    >>> models.partition_names(qlora_base)['layers_0']['mlp']['linear']
    ('mlp', 'embed')

  Args:
    params: the decoder's params (arrays or `jax.ShapeDtypeStruct`s), with
      the blocks unrolled or stacked, float or quantized.

  Returns:
    A tree like `params` with a tuple of names (one per axis) per leaf, and
    per `QuantizedArray` (a prefix of `params` there).

  Raises:
    ValueError: a param that is no weight of the decoder.
  """
  def names(path, leaf):
    keys = tuple(str(getattr(k, 'key', k)) for k in path)
    shape = tuple(leaf.shape)
    if keys[0] != _scan.SCANNED:
      return _names(keys, shape)
    # The block's index leads, whole. A stacked QuantizedArray's `shape`
    # is still one block's (only its codes and scales are stacked).
    block = shape if _numerics.is_quantized(leaf) else shape[1:]
    return (None, *_names(keys, block))
  return jax.tree_util.tree_map_with_path(names, params,
                                          is_leaf=_numerics.is_quantized)
