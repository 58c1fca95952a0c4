"""Adapter files for flax.nnx models: `save_adapters`, `load_adapters`.

The files use the linen format (`peft/_core/checkpoint.py`), so the same
validation applies, and a file written for a linen model loads into the
identical nnx model and back: specs are matched by
`AdapterSpec.differences` (a Dense is a Linear; equations up to their
letters).
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

from flax import nnx

from peft._core import adapter_tree as _adapter_tree
from peft._core import checkpoint as _checkpoint
from peft._core import params as _params
from peft._core import spec as _spec
from peft.nnx import _fuse as _nnx_fuse
from peft.nnx import _surgery as surgery


def save_adapters(path: str | os.PathLike[str], model: nnx.Module, *,
                  metadata: Mapping[str, Any] | None = None
                  ) -> tuple[_spec.AdapterSpec, ...]:
  """Saves only the adapters of `model`, in peft's adapter file format.

  The file is the one linen models write (`peft.save_adapters`): A and B
  as safetensors keyed `'<path>/lora/a'`, the specs and `metadata` in the
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
      `peft.save_adapters`.
  """
  layers = _nnx_fuse.adapted_layers(model, 'save_adapters', 'apply_lora')
  specs = tuple(m.adapter_spec(p) for p, m in layers)
  _checkpoint.save_adapters(path, _nnx_fuse.lora_tree(layers), specs,
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
    _nnx_fuse.attach(model, loaded.specs, loaded.lora, subtract=False,
                     name='load_adapters', dropout=dropout,
                     deterministic=deterministic, rngs=rngs)
    return loaded
  values = []
  for (p, layer), spec in zip(layers, expected):
    a, b, m, _ = _adapter_tree.adapter_arrays(loaded.lora, spec,
                                              'load_adapters')
    pairs = [(layer.lora.a, a), (layer.lora.b, b)]
    if spec.use_dora:
      pairs.append((layer.lora.m, m))
    for var, new in pairs:
      if new.dtype != var.dtype:
        raise ValueError(
            f'load_adapters: {spec.key!r} in {os.fspath(path)!r} is '
            f'{new.dtype} but the model holds {var.dtype} at '
            f'{_params.fmt_path(p)!r}. Apply LoRA with '
            f'param_dtype={new.dtype} (or '
            'save the adapters in the model\'s dtype).'
        )
      values.append((var, new))
  for var, new in values:
    var[...] = new
  return loaded


def load_bank(model: nnx.Module, bank: Any) -> None:
  """Puts a `peft.AdapterBank`'s stacked adapters into `model`'s LoRA layers.

  The model must be adapted as the bank's adapters were (the same layers,
  `rank=bank.rank`, alpha unset so the scale is 1: the bank holds each
  adapter's scale in its B). Afterwards the model runs under
  `bank.active(...)` only: one adapter by name, one per batch row (ids),
  or none (None), as a linen model does. Nothing changes on error.

  Example:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> import peft, peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = peft.nnx.apply_lora(model, rank=1, rngs=nnx.Rngs(0))
    >>> file = os.path.join(tempfile.mkdtemp(), 'x.safetensors')
    >>> _ = save_adapters(file, model)
    >>> x = peft.load_adapters(file)
    >>> bank = peft.AdapterBank.stack({'x': x, 'y': x})
    >>> peft.nnx.load_bank(model, bank)
    >>> model.layers[0].lora.a.shape  # (adapters, in, rank)
    (2, 2, 1)
    >>> with bank.active(jnp.array([1, -1])):
    ...   model(jnp.ones((2, 2))).shape
    (2, 3)

  Raises:
    ValueError: the model has no LoRA layers, or they differ from the
      bank's adapters (paths, shapes, rank, scale, DoRA).
  """
  name = 'load_bank'
  surgery.check_model(model, name)
  layers = surgery.lora_layers(model)
  if not layers:
    raise ValueError(f'{name}: the model has no LoRA layers. Adapt it first: '
                     'peft.nnx.apply_lora(model, rank=bank.rank, ...).')
  by_key = {spec.key: spec for spec in bank.specs}
  values = []
  for path, layer in layers:
    spec = layer.adapter_spec(path)
    theirs = by_key.pop(spec.key, None)
    if theirs is None:
      raise ValueError(f'{name}: the model\'s adapter {spec.key!r} is not in '
                       f'the bank (it holds {sorted(s.key for s in bank.specs)}'
                       '). Stack adapters made for this model.')
    mine = (spec.a_shape, spec.b_shape, spec.scale, spec.use_dora)
    want = (theirs.a_shape, theirs.b_shape, 1.0, False)
    if mine != want:
      raise ValueError(
          f'{name}: the adapter {spec.key!r} has A {spec.a_shape}, B '
          f'{spec.b_shape}, scale {spec.scale}, DoRA {spec.use_dora}; the '
          f'bank needs {want[0]}, {want[1]}, scale 1 and no DoRA. Adapt the '
          f'model with peft.nnx.apply_lora(model, rank={bank.rank}) and '
          'alpha unset.')
    node = _adapter_tree.adapter_dict(bank.lora, theirs, name)
    values.append((layer.lora, node['a'], node['b']))
  if by_key:
    raise ValueError(f'{name}: the bank adapts {sorted(by_key)}, which the '
                     'model does not. Adapt the same layers the bank\'s '
                     'adapters were made for.')
  for lora, a, b in values:
    lora.a.set_value(a)  # A new shape: the bank axis.
    lora.b.set_value(b)
    lora.bank_size = len(bank.names)
