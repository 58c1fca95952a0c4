"""Quantizing a whole param tree: `peft.quantize` and `param_bytes`.

`quantize(params, ...)` replaces the selected kernels of a param tree by
`QuantizedArray`s at their own paths, selected by path regex, predicate,
an `axes` map or shape (never by layer names), so the `Int*` layers of
`peft.quantized()` find them where the float layers kept them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import params as _params
from peft._quant import numerics as q


def _is_float(x: Any) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)


def quantize(params: Any, *, method: q.QuantizationMethod | str,
             checkpoint_kernel_key: str | None = None,
             in_place_keys: bool = False,
             targets: str | Callable[[str, Any], bool] | None = None,
             axes: Mapping[str, Any] | Callable[[str, Any], Any] | None = None,
             min_size: int = 1) -> Any:
  """Replaces the selected kernels of `params` by `QuantizedArray`s.

  A kernel keeps its path, so the `Int*` layers (`peft.quantized`) find it
  where the float layer kept it. Which float leaves are quantized: those
  named `checkpoint_kernel_key` (if given), then those `targets` selects;
  without `targets`, the keys of an `axes` map, else every leaf with
  `ndim >= 2` and `size >= min_size` but biases (flax's `'bias'` keys;
  exclude embeddings with `targets`). `axes=quantization_axes(model, x)`
  selects exactly the kernels of the model's einsum-like layers.

  Example:
    >>> params = {'dense': {'kernel': jnp.ones((4, 8)), 'bias': jnp.ones(8)},
    ...           'embed': {'embedding': jnp.ones((10, 4))}}
    >>> qp = quantize(params, method='int8', targets='dense/.*')
    >>> qp['dense']['kernel']
    QuantizedArray(method=INT8, shape=(4, 8), dtype=float32, \
values=int8[4, 8], scales=float32[1, 8])
    >>> qp['embed']['embedding'].shape  # not selected: stays float
    (10, 4)

  Args:
    params: a param tree (dicts of arrays).
    method: a `QuantizationMethod` or its name; NONE returns `params`.
    checkpoint_kernel_key: gemma.peft's argument: only leaves with this key
      (e.g. 'w'). `None`: any key.
    in_place_keys: accepted for gemma.peft compatibility; kernels always
      stay at their own key here, which is what the Int layers read.
    targets: a regex full-matched against leaf paths like 'block/q/kernel',
      or a predicate `(path, leaf) -> bool`.
    axes: per-kernel contracted axes: a map `{path: axes}` (see
      `quantization_axes`) or `(path, leaf) -> axes`. Per-channel methods
      reduce them, NF4 blocks along them. Missing: all axes but the last.
    min_size: smallest kernel size quantized by the shape rule.

  Returns:
    The tree with quantized kernels (other leaves unchanged).

  Raises:
    ValueError: unknown method, a bad regex, `targets`/`axes` that select
      no float leaf, or a kernel holding NaN or Inf (or too large for
      Q4_0's float16 scales); the message names the kernel's path.
    TypeError: `targets` or `axes` of the wrong kind.
  """
  del in_place_keys  # Kernels never move; see the docstring.
  method = q.parse_method(method, where='quantize')
  if method is q.QuantizationMethod.NONE:
    return params
  select = _selector(targets, axes, checkpoint_kernel_key, min_size)
  done = []

  def visit(path, leaf):
    key = _params.keypath_str(path)
    if q.is_quantized(leaf) or not _is_float(leaf) or not select(key, leaf):
      return leaf
    done.append(key)
    leaf_axes = (axes.get(key) if isinstance(axes, Mapping)
                 else axes(key, leaf) if axes is not None else None)
    return q.quantize_array(leaf, method, leaf_axes, where=key)

  out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=q.is_quantized)
  missing = sorted(set(axes) - set(done)) if isinstance(axes, Mapping) else []
  if (targets is not None or checkpoint_kernel_key or isinstance(
      axes, Mapping)) and (not done or (targets is None and missing)):
    paths = [_params.keypath_str(p) for p, x
             in jax.tree_util.tree_leaves_with_path(params) if _is_float(x)]
    raise ValueError(
        f'quantize: the selection (targets={targets!r}, '
        f'checkpoint_kernel_key={checkpoint_kernel_key!r}, axes keys '
        f'{missing[:3] or "ok"}) does not match the float leaves of params, '
        f'which are {paths[:6]}. Fix the regex/keys to match these paths.'
    )
  return out


def _selector(targets, axes, kernel_key, min_size):
  if isinstance(targets, str):
    try:
      pattern = re.compile(targets)
    except re.error as e:
      raise ValueError(
          f'quantize: targets {targets!r} is not a valid regex ({e}). Pass '
          "e.g. targets='.*/kernel'."
      ) from None
    rule = lambda path, leaf: pattern.fullmatch(path) is not None
  elif callable(targets):
    rule = lambda path, leaf: bool(targets(path, leaf))
  elif targets is not None:
    raise TypeError(
        f'quantize: targets must be a path regex or a predicate (path, leaf)'
        f' -> bool; got {targets!r}.'
    )
  elif isinstance(axes, Mapping):
    rule = lambda path, leaf: path in axes
  else:
    rule = lambda path, leaf: (leaf.ndim >= 2 and leaf.size >= min_size
                               and not path.endswith('bias'))
  if axes is not None and not (isinstance(axes, Mapping) or callable(axes)):
    raise TypeError(
        f'quantize: axes must be a map {{path: axes}} or a function (path, '
        f'leaf) -> axes; got {axes!r}. See peft.quantization_axes.'
    )
  def select(path: str, leaf) -> bool:
    if kernel_key is not None and path.rsplit('/', 1)[-1] != kernel_key:
      return False
    return rule(path, leaf)
  return select


def param_bytes(params: Any) -> int:
  """Bytes held by the arrays of a tree (quantized codes and scales too).

  Example:
    >>> w = jnp.ones((64, 64))
    >>> param_bytes(w), param_bytes(quantize(w, method='int8'))
    (16384, 4352)
  """
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(params))
