"""LoRA as pure functions on plain arrays and pytrees.

For code that manages its own weights (no linen surgery): an adapter of a
2-D weight `W` of shape `(in, out)` is a dict `{'A': (in, rank), 'B': (rank,
out)}` and the adapted weight is `W + (alpha / rank) * A @ B` (LoRA: Hu et
al. 2021, https://arxiv.org/abs/2106.09685). `A` starts Gaussian and `B` at
zero, so a fresh adapter changes nothing.

The lower-case keys `{'a', 'b'}` that linen adapters use are accepted too,
so these functions also apply to the 2-D adapters of a param tree.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): an adapter with a
magnitude `'m'` of shape `(out,)` (`init_lora_adapter(..., use_dora=True)`
starts it at the weight's column norms) is used by `dora_linear` and
`merge_dora_weight`; the weight becomes `m * V / ||V||` with `V = W +
scale * A @ B`, the norm per output column and constant in the backward
pass (see `peft._core.dora`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import dora as _dora
from peft._core import einsum as _einsum
from peft._core import kernel_init as _kernel_init
from peft._core import options as _options

Adapter = Mapping[str, Any]


def _check_2d(weight: Any, name: str, where: str) -> tuple[int, int]:
  shape = np.shape(weight)
  if len(shape) != 2:
    raise ValueError(
        f'{where}: {name} must be 2-D (in, out); got shape {shape}. Reshape '
        'it to a matrix, or use surgery (peft.lora) for einsum/conv kernels.'
    )
  return shape


def _factors(adapter: Any, where: str) -> tuple[jax.Array, jax.Array]:
  """`(A, B)` of an adapter dict, validated."""
  if not is_adapter(adapter):
    raise ValueError(
        f"{where}: adapter must be a dict {{'A': (in, rank), 'B': (rank, "
        f"out)}}; got {adapter!r:.80}. Create one with init_lora_adapter."
    )
  a, b = ((adapter['A'], adapter['B']) if 'A' in adapter
          else (adapter['a'], adapter['b']))
  _, rank = _check_2d(a, 'A', where)
  rank_b, _ = _check_2d(b, 'B', where)
  if rank != rank_b or rank == 0:
    raise ValueError(
        f'{where}: A has shape {np.shape(a)} and B {np.shape(b)}; they need '
        'the same rank > 0 (A: (in, rank), B: (rank, out)).'
    )
  return jnp.asarray(a), jnp.asarray(b)


def init_lora_adapter(weight: Any, rank: int, init_std: float = 0.01,
                      dtype: Any = None, *,
                      key: jax.Array | None = None,
                      use_dora: bool = False) -> dict[str, Any]:
  """A fresh adapter for a 2-D `weight`: A Gaussian, B zeros.

  The RNG `key` is a required keyword argument (its `None` default only
  serves a clear error), so the positional order is the contract's
  `(weight, rank, init_std, dtype)`. At init the adapter's delta is exactly
  zero, so `merge_lora_weight(w, init_lora_adapter(w, r, key=k))` is `w`.

  Example:
    >>> adapter = init_lora_adapter(jnp.ones((5, 3)), 2,
    ...                             key=jax.random.key(0))
    >>> jax.tree.map(jnp.shape, adapter)
    {'A': (5, 2), 'B': (2, 3)}
    >>> float(jnp.abs(adapter['B']).max())
    0.0

  Args:
    weight: the frozen weight `(in, out)` (an array or anything with
      `.shape`/`.dtype`, e.g. `jax.ShapeDtypeStruct`).
    rank: the adapter rank (> 0).
    init_std: standard deviation of A (>= 0).
    dtype: dtype of A and B; default the weight's dtype.
    key: a `jax.random` key (required).
    use_dora: also return DoRA's magnitude `'m'`, the weight's column
      norms `(out,)` (so `dora_linear` starts at `x @ W`).

  Returns:
    `{'A': (in, rank) ~ N(0, init_std^2), 'B': zeros (rank, out)}` (and
    `'m'` with `use_dora`).

  Raises:
    TypeError: no `key`, or `weight` is an RNG key (pass `key=` by
      keyword).
    ValueError: `weight` is not 2-D, `rank` is not a positive int, or
      `init_std` is negative.
  """
  where = 'init_lora_adapter'
  w_dtype = getattr(weight, 'dtype', None)
  if w_dtype is not None and jnp.issubdtype(w_dtype, jax.dtypes.prng_key):
    raise TypeError(
        f'{where}: weight is an RNG key (dtype {w_dtype}). The signature is '
        'init_lora_adapter(weight, rank, init_std, dtype, *, key); pass the '
        'key by keyword: key=jax.random.key(0).'
    )
  if key is None:
    raise TypeError(
        f'{where}: key is required; got key=None. Pass an RNG key by '
        'keyword: init_lora_adapter(weight, rank, key=jax.random.key(0)).'
    )
  n_in, n_out = _check_2d(weight, 'weight', where)
  _einsum.check_rank(rank, where=where)
  if not init_std >= 0:
    raise ValueError(
        f'{where}: init_std must be >= 0; got {init_std!r}. Pass e.g. 0.01.'
    )
  if dtype is None:
    dtype = jnp.float32 if w_dtype is None else w_dtype
  _options.check_lora_options(where, use_dora=use_dora)
  a = init_std * jax.random.normal(key, (n_in, rank), jnp.float32)
  adapter = {'A': a.astype(dtype), 'B': jnp.zeros((rank, n_out), dtype)}
  if use_dora:
    adapter['m'] = _dora.column_norm(jnp.asarray(weight), (1,)).astype(dtype)
  return adapter


def _dora_operands(weight: Any, adapter: Any, alpha: Any, where: str):
  """`(W, A, B, m, scale)` of a DoRA adapter of a 2-D weight, validated."""
  keys = set(adapter) if isinstance(adapter, Mapping) else set()
  if 'm' not in keys:
    raise ValueError(
        f"{where}: adapter must be a DoRA adapter {{'A', 'B', 'm'}}; got "
        f'{sorted(keys) if keys else adapter!r:.80}. Create one with '
        'init_lora_adapter(..., use_dora=True).'
    )
  a, b = _factors({k: v for k, v in adapter.items() if k != 'm'}, where)
  n_in, n_out = _check_2d(weight, 'weight', where)
  m = jnp.asarray(adapter['m'])
  if (a.shape[0], b.shape[1], m.shape) != (n_in, n_out, (n_out,)):
    raise ValueError(
        f'{where}: weight {(n_in, n_out)} does not fit A {a.shape}, B '
        f'{b.shape} and m {m.shape}. Expected A (in, rank), B (rank, out), '
        'm (out,).'
    )
  return jnp.asarray(weight), a, b, m, _scale(alpha, a.shape[1], where)


def dora_linear(x: jax.Array, frozen_weight: jax.Array, adapter: Adapter,
                alpha: float = 1.0) -> jax.Array:
  """DoRA: `(x @ W + scale * (x @ A) @ B) * m / ||W + scale * A @ B||`.

  The norm is per output column and a constant in the backward pass
  (`stop_gradient`, as the paper's section 4.3); `frozen_weight` is
  frozen. `W + scale * A @ B` is formed only for its norm.

  Example:
    >>> w = jnp.array([[3., 0.], [4., 1.]])
    >>> adapter = init_lora_adapter(w, 1, key=jax.random.key(0),
    ...                             use_dora=True)
    >>> adapter['m'].tolist()  # the column norms: at init, x @ W
    [5.0, 1.0]
    >>> dora_linear(jnp.array([[1., 1.]]), w, adapter).tolist()
    [[7.0, 1.0]]

  Args:
    x: inputs `(..., in)`.
    frozen_weight: `(in, out)`.
    adapter: `{'A': (in, rank), 'B': (rank, out), 'm': (out,)}`.
    alpha: LoRA alpha; the scale is `alpha / rank` (`None`: 1).

  Returns:
    `(..., out)`.

  Raises:
    ValueError: no `'m'`, or a shape does not fit.
  """
  w, a, b, m, scale = _dora_operands(frozen_weight, adapter, alpha,
                                     'dora_linear')
  w = jax.lax.stop_gradient(w)
  if np.shape(x)[-1:] != (w.shape[0],):
    raise ValueError(
        f'dora_linear: x {np.shape(x)} does not fit the weight {w.shape}. '
        'Expected x (..., in).'
    )
  norm = _dora.weight_norm(w, a, b, scale, delta_str='ir,ro->io',
                           magnitude_axes=(1,))
  g = _dora.rescale(m, norm).reshape((1,) * (np.ndim(x) - 1) + m.shape)
  return (x @ w + scale * ((x @ a) @ b)) * g.astype(
      jnp.result_type(x, w))


def merge_dora_weight(weight: jax.Array, adapter: Adapter,
                      alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """DoRA folded in: `(m * V / ||V||, ||V||)` with `V = W + scale * A @ B`.

  The norm is what `unmerge_dora_weight` needs: the merged weight alone
  does not give `W` back.

  Example:
    >>> w = jnp.array([[3., 0.], [4., 1.]])
    >>> adapter = {'A': jnp.zeros((2, 1)), 'B': jnp.zeros((1, 2)),
    ...            'm': jnp.array([10., 2.])}
    >>> merged, norm = merge_dora_weight(w, adapter)
    >>> merged.tolist(), norm.tolist()
    ([[6.0, 0.0], [8.0, 2.0]], [5.0, 1.0])
    >>> unmerge_dora_weight(merged, adapter, norm).tolist()
    [[3.0, 0.0], [4.0, 1.0]]

  Raises:
    ValueError: no `'m'`, or a shape does not fit.
  """
  w, a, b, m, scale = _dora_operands(weight, adapter, alpha,
                                     'merge_dora_weight')
  return _dora.fused_kernel(w, a, b, m, scale, delta_str='ir,ro->io',
                            magnitude_axes=(1,))


def unmerge_dora_weight(merged: jax.Array, adapter: Adapter,
                        norm: jax.Array, alpha: float = 1.0) -> jax.Array:
  """Inverse of `merge_dora_weight`, given the norm it returned.

  Example:
    >>> adapter = {'A': jnp.ones((2, 1)), 'B': jnp.ones((1, 2)),
    ...            'm': jnp.array([1., 2.])}
    >>> w = jnp.array([[1., 0.], [0., 1.]])
    >>> merged, norm = merge_dora_weight(w, adapter)
    >>> bool(jnp.allclose(unmerge_dora_weight(merged, adapter, norm), w))
    True

  Raises:
    ValueError: no `'m'`, a shape does not fit, or `m` has a zero where the
      norm does not (that column was zeroed and is lost).
  """
  where = 'unmerge_dora_weight'
  w, a, b, m, scale = _dora_operands(merged, adapter, alpha, where)
  if np.shape(norm) != m.shape:
    raise ValueError(
        f'{where}: norm has shape {np.shape(norm)}; expected {m.shape}, the '
        'norm merge_dora_weight returned.'
    )
  if not isinstance(m, jax.core.Tracer) and _dora.lost_columns(m, norm):
    raise ValueError(
        f'{where}: m has {_dora.lost_columns(m, norm)} zero entries, so '
        'merge_dora_weight zeroed those columns and W cannot be restored. '
        'Keep the original weight instead.'
    )
  return _dora.unfused_kernel(w, a, b, m, jnp.asarray(norm), scale,
                              delta_str='ir,ro->io', magnitude_axes=(1,))


def principal_lora_adapter(
    weight: Any, rank: int, alpha: float | None = 1.0, *,
    method: str = 'pissa') -> tuple[dict[str, jax.Array], jax.Array]:
  """PiSSA or OLoRA for a 2-D weight: `(adapter, residual weight)`.

  PiSSA (Meng et al. 2024) takes A and B from the weight's top `rank`
  singular directions, OLoRA (Büyükakyüz 2024) from a QR; the residual is
  `weight - (alpha / rank) * A @ B`, so `merge_lora_weight(residual,
  adapter, alpha)` is `weight` to float rounding. Train the adapter over
  the residual, as `peft.init_from_kernels` does for a whole model.

  Example:
    >>> w = jnp.array([[3., 0.], [0., 1.], [0., 0.]])
    >>> adapter, residual = principal_lora_adapter(w, 1)
    >>> residual.tolist()  # the top singular direction went to the adapter
    [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    >>> bool(jnp.allclose(merge_lora_weight(residual, adapter), w))
    True

  Args:
    weight: the weight `(in, out)`.
    rank: the adapter rank (at most `min(in, out)`).
    alpha: LoRA alpha; the scale is `alpha / rank` (`None`: 1).
    method: `'pissa'` or `'olora'`.

  Returns:
    `({'A': (in, rank), 'B': (rank, out)}, residual)`, in the weight's
    dtype.

  Raises:
    ValueError: `weight` is not 2-D, a bad rank, alpha or method.
  """
  where = 'principal_lora_adapter'
  n_in, n_out = _check_2d(weight, 'weight', where)
  _einsum.check_rank(rank, where=where)
  checked = _kernel_init.check_method(method, where)
  _kernel_init.check_rank_fits(rank, n_in, n_out, method=method,
                               what='the adapter', where=where)
  scale = _scale(alpha, rank, where)
  weight = jnp.asarray(weight)
  a, b = _kernel_init.factor_matrices(weight, rank, scale, method=checked)
  a, b = a.astype(weight.dtype), b.astype(weight.dtype)
  residual = _einsum.add_delta(weight, a, b, -scale, delta_str='ir,ro->io')
  return {'A': a, 'B': b}, residual


def lora_delta(adapter: Adapter, alpha: float = 1.0) -> jax.Array:
  """`(alpha / rank) * A @ B`, shaped like the adapted weight.

  Example:
    >>> lora_delta({'A': jnp.ones((2, 1)), 'B': jnp.array([[1., 2.]])},
    ...            alpha=2.0).tolist()
    [[2.0, 4.0], [2.0, 4.0]]

  Args:
    adapter: `{'A': (in, rank), 'B': (rank, out)}`.
    alpha: LoRA alpha; the scale is `alpha / rank` (`None`: 1).

  Returns:
    The `(in, out)` update.

  Raises:
    ValueError: the adapter is malformed or its shapes disagree.
  """
  a, b = _factors(adapter, 'lora_delta')
  return _scale(alpha, a.shape[1], 'lora_delta') * _einsum.delta(
      'ir,ro->io', a, b)


def lora_linear(x: jax.Array, frozen_weight: jax.Array, adapter: Adapter,
                alpha: float = 1.0) -> jax.Array:
  """`x @ W + (alpha / rank) * (x @ A) @ B`, without forming `A @ B`.

  `frozen_weight` is wrapped in `jax.lax.stop_gradient`: gradients reach
  only the adapter (and `x`).

  Example:
    >>> w = jnp.eye(2)
    >>> adapter = {'A': jnp.ones((2, 1)), 'B': jnp.array([[1., 0.]])}
    >>> lora_linear(jnp.array([[1., 2.]]), w, adapter).tolist()
    [[4.0, 2.0]]

  Args:
    x: inputs `(..., in)`.
    frozen_weight: `(in, out)`.
    adapter: `{'A': (in, rank), 'B': (rank, out)}`.
    alpha: LoRA alpha; the scale is `alpha / rank` (`None`: 1).

  Returns:
    `(..., out)`.

  Raises:
    ValueError: a shape does not fit (`x`'s last axis, `W`, `A`, `B`).
  """
  where = 'lora_linear'
  a, b = _factors(adapter, where)
  n_in, n_out = _check_2d(frozen_weight, 'frozen_weight', where)
  if (np.shape(x)[-1:] != (n_in,) or a.shape[0] != n_in
      or b.shape[1] != n_out):
    raise ValueError(
        f'{where}: shapes do not fit: x {np.shape(x)}, weight '
        f'{(n_in, n_out)}, A {a.shape}, B {b.shape}. Expected x (..., in), '
        'weight (in, out), A (in, rank), B (rank, out).'
    )
  w = jax.lax.stop_gradient(frozen_weight)
  return x @ w + _scale(alpha, a.shape[1], where) * ((x @ a) @ b)


def _scale(alpha: Any, rank: int, where: str) -> Any:
  """`alpha / rank`, with `alpha` checked as everywhere in peft (finite,
  > 0, not a string) unless it is an array (e.g. traced under `jax.jit`)."""
  if isinstance(alpha, (jax.Array, np.ndarray)):
    return alpha / rank
  _options.check_lora_options(where, alpha=alpha)
  return 1.0 if alpha is None else float(alpha) / rank


def _add_delta(weight, adapter, alpha, sign, where):
  n_in, n_out = _check_2d(weight, 'weight', where)
  a, b = _factors(adapter, where)
  if (a.shape[0], b.shape[1]) != (n_in, n_out):
    raise ValueError(
        f'{where}: weight {(n_in, n_out)} does not fit A {a.shape} and B '
        f'{b.shape}. Expected A (in, rank), B (rank, out).'
    )
  return _einsum.add_delta(jnp.asarray(weight), a, b,
                           sign * _scale(alpha, a.shape[1], where),
                           delta_str='ir,ro->io')


def merge_lora_weight(weight: jax.Array, adapter: Adapter,
                      alpha: float = 1.0) -> jax.Array:
  """`W + (alpha / rank) * A @ B` in >= float32, cast to `W`'s dtype.

  Example:
    >>> merge_lora_weight(jnp.zeros((1, 2)), {'A': jnp.ones((1, 1)),
    ...                   'B': jnp.array([[1., 2.]])}).tolist()
    [[1.0, 2.0]]

  Raises:
    ValueError: `weight` is not 2-D or does not fit the adapter.
  """
  return _add_delta(weight, adapter, alpha, 1.0, 'merge_lora_weight')


def unmerge_lora_weight(weight: jax.Array, adapter: Adapter,
                        alpha: float = 1.0) -> jax.Array:
  """Inverse of `merge_lora_weight`: `W - (alpha / rank) * A @ B`.

  Example:
    >>> unmerge_lora_weight(jnp.ones((1, 2)), {'A': jnp.ones((1, 1)),
    ...                     'B': jnp.array([[1., 2.]])}).tolist()
    [[0.0, -1.0]]

  Raises:
    ValueError: `weight` is not 2-D or does not fit the adapter.
  """
  return _add_delta(weight, adapter, alpha, -1.0, 'unmerge_lora_weight')


def is_adapter(node: Any) -> bool:
  """Whether `node` is an adapter dict (`{'A', 'B'}` or `{'a', 'b'}`).

  Example:
    >>> is_adapter({'A': 1, 'B': 2}), is_adapter({'kernel': 1})
    (True, False)
  """
  return isinstance(node, Mapping) and set(node) in ({'A', 'B'}, {'a', 'b'})


def tree_lora_delta(adapters: Any, alpha: float = 1.0, *,
                    is_leaf: Callable[[Any], bool] | None = None) -> Any:
  """Replaces every adapter in a pytree by its `lora_delta`.

  Example:
    >>> tree = {'q': {'A': jnp.ones((3, 1)), 'B': jnp.ones((1, 2))},
    ...         'v': {'A': jnp.ones((3, 2)), 'B': jnp.ones((2, 4))}}
    >>> jax.tree.map(jnp.shape, tree_lora_delta(tree))
    {'q': (3, 2), 'v': (3, 4)}

  Args:
    adapters: a pytree whose adapter nodes are `{'A', 'B'}` dicts.
    alpha: LoRA alpha for every adapter.
    is_leaf: which nodes are adapters; default `is_adapter`.

  Returns:
    The same structure with each adapter replaced by its delta.

  Raises:
    ValueError: a leaf of the tree is not inside an adapter (the tree holds
      something else), or an adapter is malformed.
  """
  is_leaf = is_leaf or is_adapter

  def delta(path, node):
    if not is_leaf(node):
      raise ValueError(
          f'tree_lora_delta: the leaf at '
          f'{jax.tree_util.keystr(path)!r} is not inside an adapter dict '
          "{'A', 'B'}. Pass only adapters, or an is_leaf that marks them."
      )
    return lora_delta(node, alpha)

  return jax.tree_util.tree_map_with_path(delta, adapters, is_leaf=is_leaf)
