"""Where an adapter sits in a param tree, found from its `AdapterSpec`.

A spec names its module path and adapter key; the functions here find
(and validate) the adapter's A and B, the module dict its kernel lives in,
and the leading stack axes that `nn.scan`/`nn.vmap` add, with errors that
say which adapter and path are missing. Fusing (`fuse.py`), adapter files
(`checkpoint.py`), nnx and the quantized fuse all read adapters this way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any, NamedTuple

import numpy as np

from peft._core import dora as _dora
from peft._core import params as _params
from peft._core import spec as _spec

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


def module_at(tree: Params, spec: _spec.AdapterSpec, name: str) -> Params:
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


def adapter_dict(lora: Params, spec: _spec.AdapterSpec, name: str) -> Any:
  """What sits at `spec.adapter_path` in a lora tree, or a clear error."""
  node = lora
  for key in spec.adapter_path:
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(
          f'{name}: no adapter branch {spec.key!r} for its spec. Pass only '
          'the specs of the adapters in these params.'
      )
    node = node[key]
  return node


def adapter_and_spec(lora: Params, spec: _spec.AdapterSpec, name: str):
  """`(A, B, spec with its stack_shape)`, validated, from a lora tree.

  A and B may carry leading stack axes (`stacked_spec` reads them).
  """
  adapter = adapter_dict(lora, spec, name)
  keys = adapter_keys(spec)
  if not isinstance(adapter, Mapping) or set(adapter) != set(keys):
    got = sorted(adapter) if isinstance(adapter, Mapping) else adapter
    if isinstance(adapter, Mapping) and set(adapter) ^ set(keys) == {'m'}:
      dora = spec.use_dora
      raise ValueError(
          f'{name}: adapter {spec.key!r} is '
          f'{"DoRA" if dora else "LoRA"} (its spec says use_dora={dora}) '
          f'but the params hold keys {got!r}, '
          f'{"without" if dora else "with"} a DoRA magnitude m. Pass the '
          f'specs recorded with these params (use_dora={not dora} '
          'surgery made them).'
      )
    raise ValueError(
        f'{name}: adapter {spec.key!r} must be a dict with keys '
        f'{", ".join(keys[:-1])} and {keys[-1]}; got {adapter!r:.80}. Pass '
        'the params the adapters were trained in.'
    )
  a, b = adapter['a'], adapter['b']
  return a, b, stacked_spec(spec, a, b, name)


def adapter_keys(spec: _spec.AdapterSpec) -> tuple[str, ...]:
  """The keys of the adapter dict of `spec`: a, b (and m for DoRA)."""
  return ('a', 'b', _dora.MAGNITUDE) if spec.use_dora else ('a', 'b')


def get_magnitude(lora: Params, spec: _spec.AdapterSpec, name: str):
  """The DoRA magnitude of `spec` (with its stack axes), validated.

  `spec` carries its `stack_shape` (from `adapter_and_spec`).
  """
  m = adapter_dict(lora, spec, name)[_dora.MAGNITUDE]
  want = (*spec.stack_shape, *spec.magnitude_shape)
  if tuple(np.shape(m)) != want:
    raise ValueError(
        f'{name}: {spec.key + "/m"!r} has shape {tuple(np.shape(m))} but its '
        f'spec says {want} (the kernel {spec.weight_shape} along '
        f'magnitude_axes {spec.magnitude_axes}). The adapter and spec come '
        'from different models.'
    )
  return m


class AdapterArrays(NamedTuple):
  """An adapter's validated arrays: A, B, DoRA's m (None for LoRA), and
  its spec with the `stack_shape` read from them."""

  a: Any
  b: Any
  m: Any
  spec: _spec.AdapterSpec


def adapter_arrays(lora: Params, spec: _spec.AdapterSpec,
                   name: str) -> AdapterArrays:
  """A, B and (with `spec.use_dora`) m of `spec`, validated.

  Example:
    >>> import jax.numpy as jnp
    >>> spec = _spec.AdapterSpec(
    ...     path=('d',), layer_type='Dense', weight_name='kernel',
    ...     adapter_name='lora', weight_shape=(3, 2), a_shape=(3, 1),
    ...     b_shape=(1, 2), delta_str='ir,ro->io', rank=1)
    >>> lora = {'d': {'lora': {'a': jnp.ones((3, 1)), 'b': jnp.ones((1, 2))}}}
    >>> arrays = adapter_arrays(lora, spec, 'example')
    >>> arrays.a.shape, arrays.m, arrays.spec.stack_shape
    ((3, 1), None, ())
  """
  a, b, stacked = adapter_and_spec(lora, spec, name)
  m = get_magnitude(lora, stacked, name) if spec.use_dora else None
  return AdapterArrays(a, b, m, stacked)


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
  stack = a_shape[:max(n, 0)]
  # A's leading axes, which must be the spec's stack if it has one.
  stacked = n >= 0 and (not spec.stack_shape or stack == spec.stack_shape)
  for key, got, want in (('a', a_shape, spec.a_shape),
                         ('b', b_shape, spec.b_shape)):
    if not stacked or got != (*stack, *want):
      lead = f'{spec.stack_shape} + ' if spec.stack_shape else ''
      raise ValueError(
          f'{name}: {spec.key + "/" + key!r} has shape {got} but its spec says '
          f'{lead}{tuple(want)} (A is {a_shape}, B is {b_shape}; stacked '
          'layers must share their leading axes). The adapter and spec come '
          'from different models.'
      )
  return dataclasses.replace(spec, stack_shape=stack)


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
