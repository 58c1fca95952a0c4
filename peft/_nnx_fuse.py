"""Fuse, unfuse, save and load the LoRA adapters of a flax.nnx model.

`fuse` folds each adapter into its kernel (float32 math, cast back) and puts
the plain layer back; `unfuse` undoes it. Adapter files use the linen format
(`_checkpoint`), so the same validation applies, and a file written for a
linen model loads into the identical nnx model and back: specs are matched
by `AdapterSpec.differences` (a Dense is a Linear; equations up to their
letters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import os
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from peft import _checkpoint
from peft import _fuse
from peft import _fuse_ledger
from peft import _nnx_adapter
from peft import _nnx_layers
from peft import _nnx_surgery as surgery
from peft import _spec


@functools.partial(jax.jit, static_argnums=(3, 4))
def _jit_delta(kernel, a, b, spec: _spec.AdapterSpec, sign: float):
  return _fuse.apply_delta(kernel, a, b, spec, sign)


def _with_delta(kernel, a, b, spec: _spec.AdapterSpec, sign: float, *,
                name: str):
  """`kernel + sign * scale * delta` (float32 math, kernel's dtype), with
  linen's guards (a finite result, no second fuse of one adapter, no
  unfuse of a base kernel)."""
  _fuse.check_ledger(kernel, a, b, spec, fusing=sign > 0, name=name)
  # The path does not enter the math; dropping it shares compilations.
  value = _jit_delta(kernel, a, b, dataclasses.replace(spec, path=()), sign)
  _fuse.check_finite(value, spec, name)
  _fuse_ledger.record(kernel, value, [(a, b)], fusing=sign > 0)
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


def _put(tree: dict[str, Any], spec: _spec.AdapterSpec, a, b) -> None:
  _fuse.adapter_node(tree, spec).update(a=a, b=b)


def _adapter_tree(layers) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, layer in layers:
    _put(tree, layer.adapter_spec(path), layer.lora.a[...], layer.lora.b[...])
  return tree



def _adapted_layers(model: nnx.Module, name: str, fix: str):
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
  layers = _adapted_layers(model, 'fuse', 'apply_lora (or load_adapters)')
  fused = FusedAdapters(tuple(m.adapter_spec(p) for p, m in layers),
                        _adapter_tree(layers))
  refs = surgery.references(model)
  # Every kernel is computed (and checked) before any layer is replaced, so
  # an error leaves the model as it was.
  values = [_with_delta(layer._kernel()[...], layer.lora.a[...],
                        layer.lora.b[...], spec, 1.0, name='fuse')
            for (_, layer), spec in zip(layers, fused.specs)]
  for (_, layer), value in zip(layers, values):
    kernel = layer._kernel()
    plain = _nnx_adapter.retype(layer, layer.base_type)
    del plain.lora
    setattr(plain, layer.weight_name, kernel.replace(value))
    surgery.replace_references(refs, layer, plain)
  return fused


def _attach(model, specs, adapters, *, subtract: bool, name: str,
            **options) -> None:
  """Builds LoRA layers from `specs` and adapter arrays, in place."""
  specs = _fuse.check_specs(specs, name)
  surgery.check_model(model, name)
  by_path = dict(surgery.all_modules(model))
  refs = surgery.references(model)
  new_layers = []
  for spec in specs:
    module = by_path.get(spec.path)
    cls = _nnx_layers.lora_class_for(module)
    kind = _spec.layer_kind(spec.layer_type)  # a linen file says 'Dense'
    if cls is None or cls.base_type.__name__ != kind:
      raise ValueError(
          f'{name}: adapter {spec.key!r} is for an nnx.{kind} at '
          f'{surgery.path_str(spec.path)!r}, but the model holds '
          f'{"no module" if module is None else type(module).__name__} '
          'there. Use the model the adapters were made for (fused, or '
          'without LoRA).'
      )
    a, b = _fuse.get_adapter(adapters, spec, name)
    surgery.check_replaceable(refs, module, surgery.path_str(spec.path))
    layer = cls._adapt(
        module, where=surgery.path_str(spec.path), rank=spec.rank,
        alpha=spec.alpha,
        use_rslora=spec.use_rslora, dtype=None, param_dtype=a.dtype,
        a_init=nnx.initializers.zeros, b_init=nnx.initializers.zeros,
        einsum_str=spec.einsum_str if cls is _nnx_layers.LoRAEinsum else None,
        **options)
    # Set after construction: a stacked layer initialises A and B per layer.
    layer.lora.a[...] = jnp.asarray(a)
    layer.lora.b[...] = jnp.asarray(b)
    diff = layer.adapter_spec(spec.path).differences(spec)
    if diff:
      raise ValueError(
          f'{name}: adapter {spec.key!r} does not fit the layer at '
          f'{surgery.path_str(spec.path)!r}: {diff!r} (layer, adapter). Use '
          'the model the adapters were made for.'
      )
    if subtract:
      kernel = layer._kernel()
      value = _with_delta(kernel[...], a, b, spec, -1.0, name=name)
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
  _attach(model, specs, adapters, subtract=True, name='unfuse',
          dropout=dropout, deterministic=deterministic, rngs=rngs)


# --------------------------------------------------------------- checkpoints


def save_adapters(path: str | os.PathLike[str], model: nnx.Module, *,
                  metadata: Mapping[str, Any] | None = None
                  ) -> tuple[_spec.AdapterSpec, ...]:
  """Saves only the adapters of `model`, in peft's adapter file format.

  The file is the one linen models write (`peft._checkpoint`): A and B as
  safetensors keyed `'<path>/lora/a'`, the specs and `metadata` in the
  header. Written atomically.

  Example:
    >>> import os, tempfile
    >>> import peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = peft.nnx.apply_lora(model, rank=1, rngs=nnx.Rngs(0))
    >>> file = os.path.join(tempfile.mkdtemp(), 'a.safetensors')
    >>> [s.key for s in save_adapters(file, model)]
    ['layers/0/lora']

  Returns:
    The specs written.

  Raises:
    ValueError: the model has no LoRA layer; see also
      `peft._checkpoint.save_adapters`.
  """
  layers = _adapted_layers(model, 'save_adapters', 'apply_lora')
  specs = tuple(m.adapter_spec(p) for p, m in layers)
  _checkpoint.save_adapters(path, _adapter_tree(layers), specs,
                            metadata=metadata)
  return specs


def load_adapters(path: str | os.PathLike[str], model: nnx.Module, *,
                  dropout: float = 0.0, deterministic: bool = False,
                  rngs: nnx.Rngs | None = None
                  ) -> _checkpoint.LoadedAdapters:
  """Loads adapters saved by `save_adapters` (linen or nnx) into `model`.

  If `model` has LoRA layers, the file must hold exactly their adapters
  (same paths, ranks, shapes, dtypes) and their A and B are overwritten. If
  it has none, LoRA layers are built from the file's specs (an unmodified
  base model becomes the adapted one). Nothing changes on error.

  Example:
    >>> import os, tempfile
    >>> import peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = peft.nnx.apply_lora(model, rank=1, rngs=nnx.Rngs(0))
    >>> file = os.path.join(tempfile.mkdtemp(), 'a.safetensors')
    >>> _ = save_adapters(file, model)
    >>> base = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = load_adapters(file, base)
    >>> type(base.layers[0]).__name__
    'LoRALinear'

  Args:
    path: the adapter file.
    model: the model to load into.
    dropout: dropout rate of layers built from the file.
    deterministic: their initial dropout mode.
    rngs: rng streams for dropout (needed only when `dropout > 0`).

  Returns:
    The `LoadedAdapters(lora, specs, metadata)` read from the file.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is corrupt, or its adapters do not fit the model.
  """
  surgery.check_model(model, 'load_adapters')
  layers = surgery.lora_layers(model)
  expected = tuple(m.adapter_spec(p) for p, m in layers)
  loaded = _checkpoint.load_adapters(path, expected=expected or None)
  if not layers:
    _attach(model, loaded.specs, loaded.lora, subtract=False,
            name='load_adapters', dropout=dropout,
            deterministic=deterministic, rngs=rngs)
    return loaded
  values = []
  for (p, layer), spec in zip(layers, expected):
    a, b = _fuse.get_adapter(loaded.lora, spec, 'load_adapters')
    for var, new in ((layer.lora.a, a), (layer.lora.b, b)):
      if new.dtype != var.dtype:
        raise ValueError(
            f'load_adapters: {spec.key!r} in {os.fspath(path)!r} is '
            f'{new.dtype} but the model holds {var.dtype} at '
            f'{surgery.path_str(p)!r}. Apply LoRA with '
            f'param_dtype={new.dtype} (or '
            'save the adapters in the model\'s dtype).'
        )
      values.append((var, new))
  for var, new in values:
    var[...] = new
  return loaded
