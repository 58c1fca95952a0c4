"""Fuse LoRA adapters into their kernels, and undo it.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) computes a layer with
`W + scale * einsum(delta_str, A, B)`. `fuse_params` folds that update into
each kernel, as described by the `AdapterSpec`s surgery recorded (or a
checkpoint stored), so the unmodified model serves the adapted one at zero
overhead; `unfuse_params` subtracts it again and puts the adapters back.
A DoRA adapter (Liu et al. 2024) folds its magnitude in as well: the kernel
becomes `m * V / ||V||` with `V = W + scale * delta` (`peft._core.dora`).
"""

from __future__ import annotations

from collections.abc import Sequence
import typing
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import adapter_tree as _adapter_tree
from peft._core import dora as _dora
from peft._core import einsum as _einsum
from peft._core import fuse_ledger as _fuse_ledger
from peft._core import params as _params
from peft._core import spec as _spec
from peft._quant import numerics as _numerics

Params = _params.Params
_path = _params.fmt_path


def get_kernel(original: Params, spec: _spec.AdapterSpec, name: str, *,
               dequantize: bool = False):
  """The kernel of `spec`, whose leading axes may be a layer stack.

  A `QuantizedArray` kernel is refused, or with `dequantize` read as the
  float32 kernel a quantized base computes with.
  """
  module = _adapter_tree.module_at(original, spec, name)
  if spec.weight_name not in module:
    raise ValueError(
        f'{name}: adapter {spec.key!r} adapts {spec.weight_name!r}, which is '
        f'not in the params at {_path(spec.path)!r} (they have '
        f'{sorted(module)!r}). Pass the specs recorded for these params.'
    )
  kernel = module[spec.weight_name]
  if _numerics.is_quantized(kernel) and dequantize:
    kernel = kernel.dequantize(jnp.float32)
  if _numerics.is_quantized(kernel):
    raise TypeError(
        f'{name}: kernel {_path((*spec.path, spec.weight_name))!r} is a '
        f'{kernel.method.name} QuantizedArray; adding a float delta to it '
        'needs a dequantize and a re-quantize. Use '
        'peft.fuse_into_quantized(params, specs), which does both and '
        'reports the re-quantization error.'
    )
  shape, want = tuple(np.shape(kernel)), tuple(spec.weight_shape)
  if shape[len(shape) - len(want):] != want:
    raise ValueError(
        f'{name}: kernel {_path((*spec.path, spec.weight_name))!r} has shape '
        f'{tuple(np.shape(kernel))} but adapter {spec.key!r} expects '
        f'{want}. The params and specs do not match.'
    )
  if not jnp.issubdtype(jnp.result_type(kernel), jnp.floating):
    raise TypeError(
        f'{name}: kernel {_path((*spec.path, spec.weight_name))!r} has dtype '
        f'{jnp.result_type(kernel)}; only float kernels can take a LoRA '
        'delta. Dequantize it first.'
    )
  return kernel


def apply_delta(kernel, a, b, spec: _spec.AdapterSpec, sign: float, *,
                with_error: bool = False):
  """`kernel + sign * scale * delta`: `_einsum.add_delta` for one spec."""
  delta_str = _einsum.stacked_delta_str(spec.delta_str,
                                        len(spec.stack_shape))
  return _einsum.add_delta(jnp.asarray(kernel), jnp.asarray(a),
                           jnp.asarray(b), sign * spec.scale,
                           delta_str=delta_str, with_error=with_error)


def dora_kernel(kernel, a, b, m, spec: _spec.AdapterSpec, *, fusing: bool,
                name: str, with_error: bool = False):
  """`(m * V / ||V||, ||V||, error)` (fuse) or `(W, None, error)` (unfuse)
  for DoRA.

  Unfuse reads the norm that fuse folded into this very kernel array from
  the fuse ledger: the fused kernel, A, B and m alone do not determine it.
  `error` is the largest `|new - exact|` against the same computation on
  the kernel in float32 (0.0 without `with_error`).

  Raises:
    ValueError: unfusing a kernel whose norm is not known (it was not
      returned by a fuse in this process: loaded, copied, or traced under
      `jax.jit`), or whose column was zeroed by a zero magnitude.
  """
  where = _path((*spec.path, spec.weight_name))
  kwargs = dict(delta_str=spec.delta_str, magnitude_axes=spec.magnitude_axes,
                n_stack=len(spec.stack_shape))
  norm = None if fusing or isinstance(kernel, jax.core.Tracer) else (
      _fuse_ledger.dora_norm(kernel, a, b))
  kernel, a, b, m = (jnp.asarray(x) for x in (kernel, a, b, m))
  if not fusing:
    if norm is None:
      raise ValueError(
          f'{name}: kernel {where!r} holds the DoRA adapter {spec.key!r}, '
          'whose unfuse needs the per-column norm ||W + scale * delta|| that '
          'the fused kernel no longer determines. fuse records it only for '
          'the very array it returned, in this process, outside jax.jit; '
          'this kernel is another (loaded, copied or traced). Unfuse the '
          'params fuse returned, or keep the base params and fuse them '
          'again.'
      )
    lost = _dora.lost_columns(m, norm)
    if lost:
      raise ValueError(
          f'{name}: kernel {where!r}: DoRA adapter {spec.key!r} has {lost} '
          'zero entries in its magnitude m, so fuse zeroed those columns and '
          'the base kernel cannot be restored from them. Keep the base '
          'params (split_params(params).original) instead of unfusing.'
      )

  def compute(k):
    if fusing:
      return _dora.fused_kernel(k, a, b, m, spec.scale, **kwargs)
    return _dora.unfused_kernel(k, a, b, m, norm, spec.scale, **kwargs), None

  new, fused_norm = compute(kernel)
  error = 0.0
  if with_error:
    exact = compute(kernel.astype(jnp.float32))[0]
    error = jnp.max(jnp.abs(new.astype(jnp.float32) - exact), initial=0.0)
  return new, fused_norm, error


def check_finite(kernel, spec: _spec.AdapterSpec, name: str) -> None:
  """A fused/unfused kernel that became inf or NaN is an error.

  Only concrete arrays are checked: under `jax.jit` the values are not
  known (check the output of the compiled function instead).
  """
  if isinstance(kernel, jax.core.Tracer):
    return
  bad = int(np.size(kernel) - jnp.isfinite(kernel).sum())
  if bad:
    raise ValueError(
        f'{name}: kernel {_path((*spec.path, spec.weight_name))!r} '
        f'({jnp.result_type(kernel)} {tuple(np.shape(kernel))}) has {bad} '
        f'non-finite values after adding adapter {spec.key!r} (scale '
        f'{spec.scale:g}). The delta overflows the kernel dtype or the '
        'adapter holds NaN/inf: fuse into float32 params (cast the kernels '
        'first), or check the trained A and B.'
    )


def fuse_state(kernel) -> str | None:
  """`'fused'`, `'base'` or None (unknown) for a kernel array.

  `fuse_params` marks the kernels it returns as fused and those it read as
  base; `unfuse_params` the reverse; a second fuse of the same adapter
  arrays into a fused kernel, and an unfuse of a base kernel, are errors.
  Kernels from anywhere else (a checkpoint, a jitted function, a copy) are
  unknown. The record is per process and weak (see `peft._core.fuse_ledger`).

  Example:
    >>> import peft
    >>> spec = peft.AdapterSpec(
    ...     path=('d',), layer_type='Dense', weight_name='kernel',
    ...     adapter_name='lora', weight_shape=(1, 1), a_shape=(1, 1),
    ...     b_shape=(1, 1), delta_str='ir,ro->io', rank=1)
    >>> params = {'d': {'kernel': jnp.ones((1, 1)),
    ...                 'lora': {'a': jnp.ones((1, 1)), 'b': jnp.ones((1, 1))}}}
    >>> fused = fuse_params(params, [spec])
    >>> fuse_state(fused['d']['kernel']), fuse_state(params['d']['kernel'])
    ('fused', 'base')
    >>> fuse_state(jnp.ones((1, 1))) is None
    True
  """
  return _fuse_ledger.state(kernel)


def check_ledger(kernel, a, b, spec: _spec.AdapterSpec, *, fusing: bool,
                 name: str) -> None:
  """`_fuse_ledger.check` for the kernel of `spec`."""
  _fuse_ledger.check(kernel, a, b, fusing=fusing, adapter=spec.key,
                     where=_path((*spec.path, spec.weight_name)), name=name)


def _update_kernels(base, lora, specs, sign: float, name: str, *,
                    with_error: bool) -> tuple[dict[str, Any], jax.Array]:
  """Copies `base` and adds `sign * delta` to each spec's kernel.

  Returns the new tree and the largest round-off (0 without `with_error`:
  measuring it costs a second pass over every kernel).
  """
  out = _params.to_dict(base)
  error = jnp.zeros((), jnp.float32)
  _check_dora_alone(specs, name)
  # kernel path -> (the kernel as given, the (A, B) applied to it, norms).
  applied: dict[tuple[str, ...],
                tuple[Any, list[tuple[Any, Any]], list[Any]]] = {}
  for spec in specs:
    # Read from `out`: several adapters of one kernel add up.
    kernel = get_kernel(out, spec, name)
    a, b, spec = _adapter_tree.adapter_and_spec(lora, spec, name)
    original, pairs, norms = applied.setdefault(
        (*spec.path, spec.weight_name), (kernel, [], []))
    check_ledger(original, a, b, spec, fusing=sign > 0, name=name)
    if np.shape(kernel) != (*spec.stack_shape, *spec.weight_shape):
      raise ValueError(
          f'{name}: kernel {_path((*spec.path, spec.weight_name))!r} has shape '
          f'{np.shape(kernel)} but its adapter {spec.key!r} is stacked '
          f'{spec.stack_shape}; a stacked kernel needs the same leading axes '
          'as its A and B. The params and specs do not match.'
      )
    norm = None
    if spec.use_dora:
      m = _adapter_tree.get_magnitude(lora, spec, name)
      new, norm, err = dora_kernel(kernel, a, b, m, spec, fusing=sign > 0,
                                   name=name, with_error=with_error)
      error = jnp.maximum(error, err)
    else:
      new = apply_delta(kernel, a, b, spec, sign, with_error=with_error)
      if with_error:
        new, err = new
        error = jnp.maximum(error, err.astype(jnp.float32))
    check_finite(new, spec, name)
    pairs.append((a, b))
    norms.append(norm)
    module = _adapter_tree.module_at(out, spec, name)
    assert isinstance(module, dict)  # `to_dict` made every module a dict.
    module[spec.weight_name] = new
  for path, (original, pairs, norms) in applied.items():
    node = out
    for key in path:
      node = node[key]
    _fuse_ledger.record(original, node, pairs, fusing=sign > 0, norms=norms)
  return out, error


def _check_dora_alone(specs, name: str) -> None:
  """A DoRA adapter rescales its whole kernel: it must be the only one."""
  by_kernel: dict[tuple[str, ...], list[_spec.AdapterSpec]] = {}
  for spec in specs:
    by_kernel.setdefault((*spec.path, spec.weight_name), []).append(spec)
  for path, group in by_kernel.items():
    if len(group) > 1 and any(s.use_dora for s in group):
      raise ValueError(
          f'{name}: kernel {_path(path)!r} has several adapters '
          f'{[s.key for s in group]!r}, one of them DoRA. A DoRA adapter '
          'rescales the whole kernel, so it must be the kernel\'s only '
          'adapter; fuse the others first, or adapt it once.'
      )


@typing.overload
def fuse_params(params: Params, adapters: Sequence[_spec.AdapterSpec], *,
                return_error: Literal[False] = False) -> Params:
  ...


@typing.overload
def fuse_params(params: Params, adapters: Sequence[_spec.AdapterSpec], *,
                return_error: Literal[True]) -> tuple[Params, jax.Array]:
  ...


@typing.overload
def fuse_params(params: Params, adapters: Sequence[_spec.AdapterSpec], *,
                return_error: bool) -> Params | tuple[Params, jax.Array]:
  ...


def fuse_params(params: Params, adapters: Sequence[_spec.AdapterSpec], *,
                return_error: bool = False
                ) -> Params | tuple[Params, jax.Array]:
  """Folds every adapter into its kernel; returns plain params.

  Each kernel becomes `W + scale * einsum(spec.delta_str, A, B)`, computed in
  float32 (or the kernel's/adapter's dtype if wider) and cast back to the
  kernel's dtype. The result has no adapter branches, so the unmodified
  model loads it and computes what the adapted model computed. Works under
  `jax.jit` with `adapters` static, e.g.
  `jax.jit(functools.partial(fuse_params, adapters=specs))`, or
  `jax.jit(fuse_params, static_argnames='adapters')` given a tuple.

  Example:
    >>> import peft
    >>> spec = peft.AdapterSpec(
    ...     path=('dense',), layer_type='Dense', weight_name='kernel',
    ...     adapter_name='lora', weight_shape=(2, 2), a_shape=(2, 1),
    ...     b_shape=(1, 2), delta_str='ir,ro->io', rank=1)
    >>> params = {'dense': {'kernel': jnp.zeros((2, 2)), 'lora': {
    ...     'a': jnp.array([[1.], [2.]]), 'b': jnp.array([[3., 4.]])}}}
    >>> fused = fuse_params(params, [spec])
    >>> fused['dense']['kernel'].tolist()
    [[3.0, 4.0], [6.0, 8.0]]

  Args:
    params: base params with adapter branches (what the adapted model was
      trained with).
    adapters: the `AdapterSpec` of every adapter in `params`: `report.specs`
      (from `with peft.lora(...) as report`), `report.adapters`, or the
      specs returned by `load_adapters`.
    return_error: also return the largest absolute round-off of the cast
      back to the kernels' dtypes (a float32 scalar; 0 in float32 kernels
      up to float32 rounding).

  Returns:
    The fused params, or `(fused, max_abs_error)` with `return_error=True`.

  Raises:
    TypeError: `adapters` is not a sequence of AdapterSpec, or a kernel is
      not floating point.
    ValueError: a spec's module, kernel or adapter is missing, a shape
      disagrees with its spec, a spec is inconsistent, or an adapter branch
      has no spec.
  """
  specs = _adapter_tree.check_specs(adapters, 'fuse_params')
  original, lora = _params.split_params(params)
  _adapter_tree.check_covered(lora, specs, 'fuse_params')
  fused, error = _update_kernels(original, lora, specs, 1.0, 'fuse_params',
                                 with_error=return_error)
  fused = _params.like(params, fused)
  return (fused, error) if return_error else fused


@typing.overload
def unfuse_params(fused: Params, lora: Params,
                  adapters: Sequence[_spec.AdapterSpec], *,
                  return_error: Literal[False] = False) -> Params:
  ...


@typing.overload
def unfuse_params(fused: Params, lora: Params,
                  adapters: Sequence[_spec.AdapterSpec], *,
                  return_error: Literal[True]) -> tuple[Params, jax.Array]:
  ...


@typing.overload
def unfuse_params(fused: Params, lora: Params,
                  adapters: Sequence[_spec.AdapterSpec], *,
                  return_error: bool) -> Params | tuple[Params, jax.Array]:
  ...


def unfuse_params(fused: Params, lora: Params,
                  adapters: Sequence[_spec.AdapterSpec], *,
                  return_error: bool = False
                  ) -> Params | tuple[Params, jax.Array]:
  """Inverse of `fuse_params`: subtracts the deltas, puts the adapters back.

  `unfuse_params(fuse_params(p, specs), split_params(p).lora, specs)` equals
  `p` up to the rounding of the kernels' dtype (exact in the adapters).

  Example:
    >>> import peft
    >>> spec = peft.AdapterSpec(
    ...     path=('dense',), layer_type='Dense', weight_name='kernel',
    ...     adapter_name='lora', weight_shape=(1, 2), a_shape=(1, 1),
    ...     b_shape=(1, 2), delta_str='ir,ro->io', rank=1)
    >>> lora = {'dense': {'lora': {'a': jnp.ones((1, 1)),
    ...                            'b': jnp.array([[1., 2.]])}}}
    >>> params = unfuse_params({'dense': {'kernel': jnp.ones((1, 2))}},
    ...                        lora, [spec])
    >>> params['dense']['kernel'].tolist()
    [[0.0, -1.0]]

  Args:
    fused: params returned by `fuse_params` (no adapter branches).
    lora: the adapter branches that were fused (`split_params(p).lora`).
    adapters: their specs.
    return_error: also return the largest absolute round-off of the cast
      back to the kernels' dtypes.

  Returns:
    Base params with the adapter branches merged in, or `(params, error)`.

  Raises:
    TypeError, ValueError: as `fuse_params`; also when `fused` still holds
      adapter branches or `lora` holds anything else.
  """
  specs = _adapter_tree.check_specs(adapters, 'unfuse_params')
  base, stray = _params.split_params(fused)
  if stray:
    raise ValueError(
        f'unfuse_params: the fused params hold adapter branches '
        f'{_leaf_paths(stray)[:3]!r}. Pass the tree fuse_params returned.'
    )
  _params.check_mapping(lora, 'lora')
  _adapter_tree.check_covered(lora, specs, 'unfuse_params')
  base, error = _update_kernels(base, lora, specs, -1.0, 'unfuse_params',
                                with_error=return_error)
  params = _params.merge_params(_params.like(fused, base), lora)
  return (params, error) if return_error else params


def _leaf_paths(tree: Params) -> list[str]:
  return [_params.keypath_str(p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
