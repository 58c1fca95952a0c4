"""Fuse LoRA adapters into their kernels, and undo it.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) computes a layer with
`W + scale * einsum(delta_str, A, B)`. `fuse_params` folds that update into
each kernel, as described by the `AdapterSpec`s surgery recorded (or a
checkpoint stored), so the unmodified model serves the adapted one at zero
overhead; `unfuse_params` subtracts it again and puts the adapters back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft import _einsum
from peft import _fuse_ledger
from peft import _params
from peft import _quantization
from peft import _spec

Params = _params.Params
_path = _params.fmt_path


def check_specs(adapters: Any, name: str) -> tuple[_spec.AdapterSpec, ...]:
  """Validates specs (a sequence, or a dict `spec.key -> spec`)."""
  if isinstance(adapters, Mapping):
    for key, spec in adapters.items():
      if getattr(spec, 'key', None) != key:
        raise ValueError(
            f'{name}: adapters maps {key!r} to {spec!r:.80}, whose key is '
            'not that. Pass report.specs or a dict spec.key -> spec.'
        )
    adapters = tuple(adapters.values())
  if isinstance(adapters, (_spec.AdapterSpec, str)) or not (
      isinstance(adapters, Sequence)):
    raise TypeError(
        f'{name}: adapters must be a sequence of AdapterSpec; got '
        f'{adapters!r:.80}. Pass report.specs (from `with peft.lora(...) as '
        'report`) or the specs returned by load_adapters.'
    )
  seen = set()
  for spec in adapters:
    if not isinstance(spec, _spec.AdapterSpec):
      raise TypeError(
          f'{name}: adapters must hold AdapterSpec; got {spec!r:.80}. '
          'Build specs with AdapterSpec.from_json for JSON dicts.'
      )
    if spec.key in seen:
      raise ValueError(
          f'{name}: two specs for the adapter {spec.key!r}. Pass each '
          'adapted kernel once.'
      )
    seen.add(spec.key)
    # Each spec's equations and shapes were checked when it was built
    # (`AdapterSpec.__post_init__`).
  return tuple(adapters)


def _branch(tree: Params, spec: _spec.AdapterSpec, name: str) -> Params:
  """The module dict at `spec.path`, or a clear error."""
  node = tree
  for i, key in enumerate(spec.path):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(
          f'{name}: adapter {spec.key!r} expects a module at '
          f'{_path(spec.path)!r}, but {_path(spec.path[:i + 1])!r} is missing '
          'from the base params. The specs belong to another model; pass the '
          'specs recorded for these params.'
      )
    node = node[key]
  return node


def get_adapter(lora: Params, spec: _spec.AdapterSpec, name: str):
  """Validated `(A, B)` of `spec` from a lora tree (see `adapter_and_spec`)."""
  a, b, _ = adapter_and_spec(lora, spec, name)
  return a, b


def adapter_node(tree: dict[str, Any],
                 spec: _spec.AdapterSpec) -> dict[str, Any]:
  """The dict at `spec.adapter_path` in `tree`, made on the way if missing."""
  node = tree
  for key in spec.adapter_path:
    node = node.setdefault(key, {})
  return node


def adapter_and_spec(lora: Params, spec: _spec.AdapterSpec, name: str):
  """`(A, B, spec with its stack_shape)`, validated, from a lora tree.

  A and B may carry leading stack axes (`stacked_spec` reads them).
  """
  node = lora
  for key in spec.adapter_path:
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(
          f'{name}: no adapter branch {spec.key!r} for its spec. Pass only '
          'the specs of the adapters in these params.'
      )
    node = node[key]
  adapter = node
  if not isinstance(adapter, Mapping) or set(adapter) != {'a', 'b'}:
    raise ValueError(
        f'{name}: adapter {spec.key!r} must be a dict with keys a and b; got '
        f'{adapter!r:.80}. Pass the params the adapters were trained in.'
    )
  a, b = adapter['a'], adapter['b']
  return a, b, stacked_spec(spec, a, b, name)


def stacked_spec(spec: _spec.AdapterSpec, a, b,
                 name: str) -> _spec.AdapterSpec:
  """`spec` with `stack_shape` read from A and B (see `AdapterSpec`).

  Layers stacked by `nn.scan`/`nn.vmap` give A, B and the kernel the same
  leading axes; a spec recorded inside the transform has per-layer shapes.

  Raises:
    ValueError: A or B does not have the spec's shape after the same
      leading axes.
  """
  a_shape, b_shape = tuple(np.shape(a)), tuple(np.shape(b))
  n = len(a_shape) - len(spec.a_shape)
  stack = a_shape[:n] if n >= 0 else None
  if spec.stack_shape and stack != spec.stack_shape:
    stack = None
  for key, got, want in (('a', a_shape, spec.a_shape),
                         ('b', b_shape, spec.b_shape)):
    if stack is None or got != (*stack, *want):
      lead = f'{spec.stack_shape} + ' if spec.stack_shape else ''
      raise ValueError(
          f'{name}: {spec.key + "/" + key!r} has shape {got} but its spec says '
          f'{lead}{tuple(want)} (A is {a_shape}, B is {b_shape}; stacked '
          'layers must share their leading axes). The adapter and spec come '
          'from different models.'
      )
  return dataclasses.replace(spec, stack_shape=stack)


def _get_kernel(original: Params, spec: _spec.AdapterSpec, name: str):
  """The kernel of `spec`, whose leading axes may be a layer stack."""
  module = _branch(original, spec, name)
  if spec.weight_name not in module:
    raise ValueError(
        f'{name}: adapter {spec.key!r} adapts {spec.weight_name!r}, which is '
        f'not in the params at {_path(spec.path)!r} (they have '
        f'{sorted(module)!r}). Pass the specs recorded for these params.'
    )
  kernel = module[spec.weight_name]
  if _quantization.is_quantized(kernel):
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


def check_covered(lora: Params, specs, name: str) -> None:
  """Every adapter branch in `lora` has a spec."""
  keys = {s.key for s in specs}

  def walk(tree: Params, path: tuple[str, ...]):
    for key, value in tree.items():
      if _params.is_adapter_key(key):
        if _path((*path, key)) not in keys:
          fix = ('Pass the specs of every adapter (report.specs), or drop '
                 'the branch with split_params.')
          if _path((*path[1:], key)) in keys:
            fix = (f'The specs start below {path[0]!r}: pass '
                   f'variables[{path[0]!r}], not the whole variables dict.')
          raise ValueError(
              f'{name}: the params hold adapter {_path((*path, key))!r} but '
              f'no AdapterSpec describes it. {fix}'
          )
      elif isinstance(value, Mapping):
        walk(value, (*path, key))

  walk(lora, ())


def apply_delta(kernel, a, b, spec: _spec.AdapterSpec, sign: float, *,
                with_error: bool = False):
  """`kernel + sign * scale * delta`: `_einsum.add_delta` for one spec."""
  delta_str = _einsum.stacked_delta_str(spec.delta_str,
                                        len(spec.stack_shape))
  return _einsum.add_delta(jnp.asarray(kernel), jnp.asarray(a),
                           jnp.asarray(b), sign * spec.scale,
                           delta_str=delta_str, with_error=with_error)


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
  unknown. The record is per process and weak (see `peft._fuse_ledger`).

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
                    with_error: bool):
  """Copies `base` and adds `sign * delta` to each spec's kernel.

  Returns the new tree and the largest round-off (None without
  `with_error`: measuring it costs a second pass over every kernel).
  """
  out = _to_dict(base)
  error = jnp.zeros((), jnp.float32) if with_error else None
  # kernel path -> (the kernel as given, the (A, B) applied to it).
  applied: dict[tuple[str, ...], tuple[Any, list[tuple[Any, Any]]]] = {}
  for spec in specs:
    # Read from `out`: several adapters of one kernel add up.
    kernel = _get_kernel(out, spec, name)
    a, b, spec = adapter_and_spec(lora, spec, name)
    original, pairs = applied.setdefault((*spec.path, spec.weight_name),
                                         (kernel, []))
    check_ledger(original, a, b, spec, fusing=sign > 0, name=name)
    if np.shape(kernel) != (*spec.stack_shape, *spec.weight_shape):
      raise ValueError(
          f'{name}: kernel {_path((*spec.path, spec.weight_name))!r} has shape '
          f'{np.shape(kernel)} but its adapter {spec.key!r} is stacked '
          f'{spec.stack_shape}; a stacked kernel needs the same leading axes '
          'as its A and B. The params and specs do not match.'
      )
    new = apply_delta(kernel, a, b, spec, sign, with_error=with_error)
    if with_error:
      new, err = new
      error = jnp.maximum(error, err.astype(jnp.float32))
    check_finite(new, spec, name)
    pairs.append((a, b))
    _branch(out, spec, name)[spec.weight_name] = new
  for path, (original, pairs) in applied.items():
    node = out
    for key in path:
      node = node[key]
    _fuse_ledger.record(original, node, pairs, fusing=sign > 0)
  return out, error


def _to_dict(tree: Params) -> dict[str, Any]:
  return {k: _to_dict(v) if isinstance(v, Mapping) else v
          for k, v in tree.items()}


def fuse_params(params: Params, adapters: Sequence[_spec.AdapterSpec], *,
                return_error: bool = False):
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
  specs = check_specs(adapters, 'fuse_params')
  original, lora = _params.split_params(params)
  check_covered(lora, specs, 'fuse_params')
  fused, error = _update_kernels(original, lora, specs, 1.0, 'fuse_params',
                                 with_error=return_error)
  fused = _params.like(params, fused)
  return (fused, error) if return_error else fused


def unfuse_params(fused: Params, lora: Params,
                  adapters: Sequence[_spec.AdapterSpec], *,
                  return_error: bool = False):
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
  specs = check_specs(adapters, 'unfuse_params')
  base, stray = _params.split_params(fused)
  if stray:
    raise ValueError(
        f'unfuse_params: the fused params hold adapter branches '
        f'{_leaf_paths(stray)[:3]!r}. Pass the tree fuse_params returned.'
    )
  _params.check_mapping(lora, 'lora')
  check_covered(lora, specs, 'unfuse_params')
  base, error = _update_kernels(base, lora, specs, -1.0, 'unfuse_params',
                                with_error=return_error)
  params = _params.merge_params(_params.like(fused, base), lora)
  return (params, error) if return_error else params


def _leaf_paths(tree: Params) -> list[str]:
  return [jax.tree_util.keystr(p, simple=True, separator='/')
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
