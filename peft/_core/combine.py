"""Several adapters of one model combined into one, with weights.

The combined update of each kernel is `sum_i w_i * scale_i * delta(A_i,
B_i)`. Two forms:

* `'concat'`: A and B of all adapters side by side along the rank axis
  (each B times `w_i * scale_i`), scale 1. Exact; the rank is the sum.
* `'svd'`: the best rank-`rank` approximation of the combined update in
  the Frobenius norm (Eckart-Young), found without forming the kernel-sized
  update: with `A = [A_i]`, `B = [w_i s_i B_i]` and QR factorisations
  `A = Qa Ra`, `B^T = Qb Rb`, the update is `Qa (Ra Rb^T) Qb^T`, so the SVD
  of the small `Ra Rb^T` gives it. The relative error
  `||update - approximation|| / ||update||` of each kernel is reported.

A kernel that only some adapters adapt gets the sum of those.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math
import numbers
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from peft._core import adapter_tree as _adapter_tree
from peft._core import einsum as _einsum
from peft._core import kernel_init as _kernel_init
from peft._core import spec as _spec

Method = Literal['concat', 'svd']
_NAME = 'combine_adapters'


class CombinedAdapters(NamedTuple):
  """What `combine_adapters` returns (a named tuple).

  Example:
    >>> import jax.numpy as jnp
    >>> import peft
    >>> spec = peft.AdapterSpec(
    ...     path=('d',), layer_type='Dense', weight_name='kernel',
    ...     adapter_name='lora', weight_shape=(3, 2), a_shape=(3, 1),
    ...     b_shape=(1, 2), delta_str='ir,ro->io', rank=1)
    >>> lora = {'d': {'lora': {'a': jnp.ones((3, 1)), 'b': jnp.ones((1, 2))}}}
    >>> both, specs, errors = peft.combine_adapters(
    ...     {'x': (lora, [spec]), 'y': (lora, [spec])})
    >>> both['d']['lora']['a'].shape, specs[0].rank, errors
    ((3, 2), 2, {'d/lora': 0.0})

  Attributes:
    lora: the combined adapters (a lora tree, as `split_params` gives).
    specs: their specs (scale 1: `alpha == rank`).
    errors: adapter key -> relative Frobenius error of its update (0 for
      `'concat'`, and for `'svd'` where the rank holds the whole update).
  """

  lora: dict[str, Any]
  specs: tuple[_spec.AdapterSpec, ...]
  errors: dict[str, float]


# The fields that say which kernel an adapter adapts and how; adapters of
# one kernel in different files must agree on them (rank and alpha may
# differ).
_KERNEL_FIELDS = ('path', 'layer_type', 'weight_name', 'weight_shape',
                  'delta_str', 'einsum_str')


def combine_adapters(adapters: Mapping[str, Any],
                     weights: Mapping[str, float] | None = None, *,
                     method: Method = 'concat',
                     rank: int | None = None) -> CombinedAdapters:
  """One adapter from several of the same model, weighted.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model, x = nn.Dense(4), jnp.ones((2, 3))
    >>> with peft.lora(rank=2, b_init=nn.initializers.normal(1.0)) as report:
    ...   params = model.init(jax.random.key(0), x)['params']
    ...   other = model.init(jax.random.key(1), x)['params']
    >>> french = (peft.split_params(params).lora, report.specs)
    >>> german = (peft.split_params(other).lora, report.specs)
    >>> both = peft.combine_adapters({'fr': french, 'de': german},
    ...                              {'fr': 0.5, 'de': 0.5})
    >>> both.specs[0].rank, both.lora['lora']['a'].shape, both.errors
    (4, (3, 4), {'lora': 0.0})
    >>> low = peft.combine_adapters({'fr': french, 'de': german},
    ...                             method='svd', rank=1)
    >>> low.specs[0].rank, 0 < low.errors['lora'] < 1
    (1, True)

  Args:
    adapters: name -> `(lora tree, specs)`, e.g. what `load_adapters`
      returns (its metadata is ignored) or `(split_params(p).lora,
      report.specs)`.
    weights: name -> weight of that adapter's update (default 1 each);
      any finite number, negative to subtract one.
    method: `'concat'` (exact, ranks add up) or `'svd'` (rank `rank`).
    rank: the rank of every combined adapter, for `'svd'` only.

  Returns:
    `CombinedAdapters(lora, specs, errors)`; save them with
    `save_adapters(path, lora, specs)`.

  Raises:
    ValueError: no adapters, weights for other names, a bad weight,
      method or rank, two adapters of one kernel that disagree on it, or a
      rank larger than a kernel allows.
    TypeError: an entry that is no `(lora, specs)` pair.
  """
  named = _check_inputs(adapters, weights, method, rank)
  out: dict[str, Any] = {}
  new_specs, errors = [], {}
  for key, by_name in by_kernel(named, _NAME).items():
    entries = [(weight * spec.scale, a, b, spec)
               for weight, a, b, spec in by_name.values()]
    a_m, b_m = _stacked_factors(entries)
    if method == 'svd':
      assert rank is not None  # `_check_inputs` made sure.
      a_m, b_m, errors[key] = _truncate(a_m, b_m, rank, entries[0][3])
    else:
      errors[key] = 0.0
    spec = with_rank(entries[0][3], a_m.shape[-1])
    a, b = _kernel_init.from_matrices(a_m, b_m, spec)
    dtype = jnp.result_type(*(e[1] for e in entries))
    node = _adapter_tree.adapter_node(out, spec)
    node['a'], node['b'] = a.astype(dtype), b.astype(dtype)
    new_specs.append(dataclasses.replace(spec, stack_shape=()))
  return CombinedAdapters(out, tuple(new_specs), errors)


def _check_inputs(adapters: Any, weights: Any, method: Any, rank: Any
                  ) -> dict[str, tuple[float, Any, tuple[_spec.AdapterSpec,
                                                         ...]]]:
  if method not in ('concat', 'svd'):
    raise ValueError(f"{_NAME}: method must be 'concat' or 'svd'; got "
                     f"{method!r}. Pass method='concat' (exact) or "
                     "method='svd' with a rank.")
  if method == 'svd':
    _einsum.check_rank(rank, where=f'{_NAME}(method=svd)')
  elif rank is not None:
    raise ValueError(f"{_NAME}: rank={rank!r} is for method='svd'; 'concat' "
                     'keeps the sum of the ranks. Drop rank or pass '
                     "method='svd'.")
  return check_named(adapters, weights, _NAME)


def check_named(adapters: Any, weights: Any, name: str
                ) -> dict[str, tuple[float, Any, tuple[_spec.AdapterSpec,
                                                       ...]]]:
  """`{adapter name: (weight, lora, specs)}` from a dict of `(lora, specs)`
  pairs and one of weights (None: 1 each), checked; errors say `name`."""
  if not isinstance(adapters, Mapping) or not adapters:
    raise ValueError(f'{name}: adapters must be a non-empty dict name -> '
                     f'(lora, specs); got {adapters!r:.80}. Pass e.g. '
                     "{'french': peft.load_adapters('fr.safetensors')}.")
  weights = dict.fromkeys(adapters, 1.0) if weights is None else weights
  if not isinstance(weights, Mapping) or set(weights) != set(adapters):
    got = sorted(weights) if isinstance(weights, Mapping) else weights
    raise ValueError(f'{name}: weights must name the adapters '
                     f'{sorted(adapters)}; got {got!r}. Give one weight per '
                     'adapter, or none for 1 each.')
  named = {}
  for key, entry in adapters.items():
    weight = weights[key]
    if (not isinstance(weight, numbers.Real) or isinstance(weight, bool)
        or not math.isfinite(weight)):
      raise ValueError(f'{name}: the weight of {key!r} must be a finite '
                       f'number; got {weight!r}. Pass e.g. 0.5.')
    if not isinstance(entry, tuple) or len(entry) < 2:
      raise TypeError(f'{name}: adapters[{key!r}] must be (lora, specs); '
                      f'got {entry!r:.80}. Pass what load_adapters returns, '
                      'or (split_params(params).lora, report.specs).')
    specs = _adapter_tree.check_specs(entry[1], f'{name}: {key!r}')
    for spec in specs:
      if spec.use_dora:
        raise ValueError(
            f'{name}: adapter {spec.key!r} of {key!r} is DoRA (use_dora); '
            'its magnitude rescales the whole kernel, so DoRA adapters do '
            'not add up or stack as LoRA updates do. Pass LoRA adapters, or '
            'fuse the DoRA one into the base first.')
    named[key] = (float(weight), entry[0], specs)
  return named


def by_kernel(named: Mapping[str, tuple[float, Any, Any]], name: str
              ) -> dict[str, dict[str, tuple[float, Any, Any,
                                             _spec.AdapterSpec]]]:
  """The adapters of `check_named`'s result grouped by kernel: adapter key
  -> {adapter name: (weight, A, B, spec with its stack_shape)}, checked to
  agree on each kernel; errors say `name`."""
  out: dict[str, dict[str, tuple[float, Any, Any, _spec.AdapterSpec]]] = {}
  for key, (weight, lora, specs) in named.items():
    for spec in specs:
      a, b, spec = _adapter_tree.adapter_and_spec(lora, spec, name)
      entries = out.setdefault(spec.key, {})
      if entries:
        check_same_kernel(next(iter(entries.values()))[3], spec, key, named,
                          name)
      entries[key] = (weight, a, b, spec)
  return out


def check_same_kernel(first: _spec.AdapterSpec, spec: _spec.AdapterSpec,
                      key: str, named: Mapping[str, Any], name: str) -> None:
  """Two adapters of one kernel (in adapters `key` and an earlier one of
  `named`) must agree on it; errors say `name`."""
  for field in (*_KERNEL_FIELDS, 'stack_shape'):
    if getattr(first, field) != getattr(spec, field):
      raise ValueError(
          f'{name}: adapter {spec.key!r} of {key!r} has {field}='
          f'{getattr(spec, field)!r}, but an earlier adapter of that kernel '
          f'(among {sorted(named)}) has {getattr(first, field)!r}. Use '
          'adapters made for the same model.')


def _stacked_factors(entries) -> tuple[jax.Array, jax.Array]:
  """`[A_i]` and `[c_i B_i]` side by side on the rank axis, as matrices."""
  a_parts, b_parts = [], []
  for coefficient, a, b, spec in entries:
    a_m, b_m = _kernel_init.to_matrices(a, b, spec)
    a_parts.append(a_m)
    b_parts.append(coefficient * b_m)
  return (jnp.concatenate(a_parts, axis=-1),
          jnp.concatenate(b_parts, axis=-2))


def _truncate(a_m: jax.Array, b_m: jax.Array, rank: int,
              spec: _spec.AdapterSpec) -> tuple[jax.Array, jax.Array, float]:
  """The best rank-`rank` factors of `a_m @ b_m`, and the relative error."""
  n_rows, n_cols = a_m.shape[-2], b_m.shape[-1]
  _kernel_init.check_rank_fits(
      rank, n_rows, n_cols, method="method='svd'", where=_NAME,
      what=f'the combined adapter {spec.key!r}')
  qa, ra = jnp.linalg.qr(a_m)
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b_m, -1, -2))
  u, s, vt = jnp.linalg.svd(ra @ jnp.swapaxes(rb, -1, -2),
                            full_matrices=False)
  kept = min(rank, s.shape[-1])
  root = jnp.sqrt(s[..., :kept])
  a_new = (qa @ u[..., :kept]) * root[..., None, :]
  b_new = root[..., :, None] * (vt[..., :kept, :] @ jnp.swapaxes(qb, -1, -2))
  total = float(jnp.sum(s ** 2))
  error = math.sqrt(max(total - float(jnp.sum(s[..., :kept] ** 2)), 0.0)
                    / total) if total > 0 else 0.0
  pad = rank - kept  # The update's rank is below `rank`: zero columns.
  if pad:
    a_new = jnp.pad(a_new, [(0, 0)] * (a_new.ndim - 1) + [(0, pad)])
    b_new = jnp.pad(b_new, [(0, 0)] * (b_new.ndim - 2) + [(0, pad), (0, 0)])
  return a_new, b_new, error


def with_rank(spec: _spec.AdapterSpec, rank: int) -> _spec.AdapterSpec:
  """`spec` with rank `rank` and scale 1 (the weights are in B)."""
  a_axes, b_axes, _ = _einsum.split_delta(spec.delta_str)
  letter = _kernel_init.rank_letter(spec.delta_str)
  return dataclasses.replace(
      spec, rank=rank, alpha=float(rank), use_rslora=False,
      a_shape=_kernel_init.with_rank(spec.a_shape, a_axes, letter, rank),
      b_shape=_kernel_init.with_rank(spec.b_shape, b_axes, letter, rank))
