"""Fuse and unfuse the LoRA adapters of a flax.nnx model, in place.

`fuse` folds each adapter into its kernel (float32 math, cast back) and puts
the plain layer back; `unfuse` undoes it. `adapted_layers`, `lora_tree` and
`attach` are shared with the adapter files (`_files.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from peft._core import adapter_tree as _adapter_tree
from peft._core import dora as _dora
from peft._core import fuse as _fuse
from peft._core import fuse_ledger as _fuse_ledger
from peft._core import params as _params
from peft._core import spec as _spec
from peft.nnx import _adapter as _nnx_adapter
from peft.nnx import _layers as _nnx_layers
from peft.nnx import _surgery as surgery


@functools.partial(jax.jit, static_argnums=(3, 4))
def _jit_delta(kernel, a, b, spec: _spec.AdapterSpec, sign: float):
  return _fuse.apply_delta(kernel, a, b, spec, sign)


def _with_delta(kernel, a, b, spec: _spec.AdapterSpec, sign: float, *,
                name: str, m=None):
  """`kernel + sign * scale * delta` (float32 math, kernel's dtype), with
  linen's guards (a finite result, no second fuse of one adapter, no
  unfuse of a base kernel); DoRA's `m * V / ||V||` and back given `m`."""
  _fuse.check_ledger(kernel, a, b, spec, fusing=sign > 0, name=name)
  norm = None
  if spec.use_dora:
    value, norm, _ = _fuse.dora_kernel(kernel, a, b, m, spec,
                                       fusing=sign > 0, name=name)
  else:
    # The path does not enter the math; dropping it shares compilations.
    value = _jit_delta(kernel, a, b, dataclasses.replace(spec, path=()),
                       sign)
  _fuse.check_finite(value, spec, name)
  _fuse_ledger.record(kernel, value, [(a, b)], fusing=sign > 0,
                      norms=[norm])
  return value


# ------------------------------------------------------------ fuse/unfuse


class FusedAdapters(NamedTuple):
  """What `fuse` took out of the model, for `unfuse`.

  A named tuple, so `unfuse(model, *fused)` puts the adapters back.

  Example:
    >>> import os, tempfile
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft, peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = peft.nnx.apply_lora(model, rank=1, rngs=nnx.Rngs(1))
    >>> fused = peft.nnx.fuse(model)
    >>> [s.key for s in fused.specs], jax.tree.map(jnp.shape, fused.adapters)
    (['layers/0/lora'], {'layers': {'0': {'lora': {'a': (2, 1), 'b': (1, 3)}}}})
    >>> # The linen layout: peft's linen functions take it as it is.
    >>> path = os.path.join(tempfile.mkdtemp(), 'adapters.safetensors')
    >>> peft.save_adapters(path, fused.adapters, fused.specs)
    >>> peft.nnx.unfuse(model, *fused)
    >>> type(model.layers[0]).__name__
    'LoRALinear'

  Attributes:
    specs: the `AdapterSpec` of every fused adapter.
    adapters: `{path...: {'lora': {'a': A, 'b': B}}}`, the layout of linen
      adapter trees and of `load_adapters(...).lora`.
  """

  specs: tuple[_spec.AdapterSpec, ...]
  adapters: dict[str, Any]


def lora_tree(layers) -> dict[str, Any]:
  """The linen-layout tree `{path: {'lora': {'a', 'b'}}}` of `layers`
  (and `'m'` for DoRA)."""
  tree: dict[str, Any] = {}
  for path, layer in layers:
    node = _adapter_tree.adapter_node(tree, layer.adapter_spec(path))
    node.update(a=layer.lora.a[...], b=layer.lora.b[...])
    if layer.lora.options.use_dora:
      node[_dora.MAGNITUDE] = layer.lora.m[...]
  return tree



def adapted_layers(model: nnx.Module, name: str, fix: str):
  """`(path, layer)` of every LoRA layer in `model`; raises if there is none."""
  surgery.check_model(model, name)
  layers = surgery.lora_layers(model)
  if not layers:
    raise ValueError(
        f'{name} found no LoRA layer in {type(model).__name__}. Call {fix} '
        'first.'
    )
  return layers

def fuse(model: nnx.Module) -> FusedAdapters:
  """Folds every LoRA layer into a plain layer, in place.

  Each LoRA layer is replaced by its plain nnx layer whose kernel is
  `W + scale * einsum(delta_str, A, B)`, computed in float32 (or wider) and
  cast back to the kernel's dtype; the model then computes what the
  adapted model computed, with no LoRA overhead, and its graph is that of
  the unmodified model.

  Example:
    >>> import peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = peft.nnx.apply_lora(model, rank=1, rngs=nnx.Rngs(0))
    >>> fused = fuse(model)
    >>> type(model.layers[0]).__name__, [s.key for s in fused.specs]
    ('Linear', ['layers/0/lora'])

  Returns:
    The specs and adapter arrays taken out (for `unfuse`).

  Raises:
    ValueError: the model has no LoRA layer.
  """
  layers = adapted_layers(model, 'fuse', 'apply_lora (or load_adapters)')
  fused = FusedAdapters(tuple(m.adapter_spec(p) for p, m in layers),
                        lora_tree(layers))
  refs = surgery.references(model)
  # Every kernel is computed (and checked) before any layer is replaced, so
  # an error leaves the model as it was.
  values = [_with_delta(layer.kernel_variable()[...], layer.lora.a[...],
                        layer.lora.b[...], spec, 1.0, name='fuse',
                        m=layer.lora.m[...] if spec.use_dora else None)
            for (_, layer), spec in zip(layers, fused.specs)]
  for (_, layer), value in zip(layers, values):
    kernel = layer.kernel_variable()
    plain = _nnx_adapter.retype(layer, layer.base_type)
    del plain.lora
    setattr(plain, layer.weight_name, kernel.replace(value))
    surgery.replace_references(refs, layer, plain)
  return fused


def attach(model, specs, adapters, *, subtract: bool, name: str,
           dropout: float, deterministic: bool,
           rngs: nnx.Rngs | None) -> None:
  """Builds LoRA layers from `specs` and adapter arrays, in place."""
  specs = _adapter_tree.check_specs(specs, name)
  surgery.check_model(model, name)
  by_path = dict(surgery.all_modules(model))
  refs = surgery.references(model)
  new_layers = []
  for spec in specs:
    module = by_path.get(spec.path)
    cls = _nnx_layers.lora_class_for(module)
    kind = _spec.layer_kind(spec.layer_type)  # a linen file says 'Dense'
    if module is None or cls is None or cls.base_type.__name__ != kind:
      raise ValueError(
          f'{name}: adapter {spec.key!r} is for an nnx.{kind} at '
          f'{_params.fmt_path(spec.path)!r}, but the model holds '
          f'{"no module" if module is None else type(module).__name__} '
          'there. Use the model the adapters were made for (fused, or '
          'without LoRA).'
      )
    a, b, m, _ = _adapter_tree.adapter_arrays(adapters, spec, name)
    surgery.check_replaceable(refs, module, _params.fmt_path(spec.path))
    # A and B are set below; zeros make no random numbers for them.
    lora_options = spec.options.replace(
        dtype=a.dtype, a_init=nnx.initializers.zeros,
        b_init=nnx.initializers.zeros, dropout=dropout,
        deterministic=deterministic)
    layer = cls.adapt(
        module, lora_options, where=_params.fmt_path(spec.path), rngs=rngs,
        einsum_str=spec.einsum_str if cls is _nnx_layers.LoRAEinsum else None)
    # Set after construction: a stacked layer initialises A and B per layer.
    layer.lora.a[...] = jnp.asarray(a)
    layer.lora.b[...] = jnp.asarray(b)
    if m is not None:
      layer.lora.m[...] = jnp.asarray(m)
    diff = layer.adapter_spec(spec.path).differences(spec)
    if diff:
      raise ValueError(
          f'{name}: adapter {spec.key!r} does not fit the layer at '
          f'{_params.fmt_path(spec.path)!r}: {diff!r} (layer, adapter). Use '
          'the model the adapters were made for.'
      )
    if subtract:
      kernel = layer.kernel_variable()
      value = _with_delta(kernel[...], a, b, spec, -1.0, name=name, m=m)
      setattr(layer, layer.weight_name, kernel.replace(value))
    new_layers.append((module, layer))
  for module, layer in new_layers:
    surgery.replace_references(refs, module, layer)


def unfuse(model: nnx.Module, specs: Sequence[_spec.AdapterSpec],
           adapters: Mapping[str, Any], *, dropout: float = 0.0,
           deterministic: bool = False,
           rngs: nnx.Rngs | None = None) -> None:
  """Inverse of `fuse`: subtracts the deltas and puts the LoRA layers back.

  Example:
    >>> import peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = peft.nnx.apply_lora(model, rank=1, rngs=nnx.Rngs(0))
    >>> fused = fuse(model)
    >>> unfuse(model, *fused)
    >>> type(model.layers[0]).__name__
    'LoRALinear'

  Args:
    model: the fused model (plain layers at the specs' paths).
    specs: `fuse(model).specs`.
    adapters: `fuse(model).adapters`.
    dropout: adapter dropout rate of the restored layers.
    deterministic: their initial dropout mode.
    rngs: rng streams for dropout (needed only when `dropout > 0`).

  Raises:
    TypeError: `specs` is not a sequence of AdapterSpec.
    ValueError: a spec does not fit the layer at its path, or an adapter is
      missing or misshaped.
  """
  attach(model, specs, adapters, subtract=True, name='unfuse',
          dropout=dropout, deterministic=deterministic, rngs=rngs)
