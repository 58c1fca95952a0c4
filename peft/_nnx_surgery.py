"""LoRA surgery on flax.nnx models: apply, fuse, unfuse, save and load.

`apply_lora` walks a model and replaces, in place, every layer the rules
select by its LoRA version (which shares the layer's variables), wherever
the model holds it: attributes, lists, dicts, `nnx.List`, `nnx.Dict`, and
several places at once for a shared layer. The rules are the linen ones
(`peft.LoRARule`: types, path regexes full-matched on `'a/b/c'`,
predicates, exclusions, per-rule rank); `LoRARule` here takes nnx types.

`fuse` folds each adapter into its kernel and puts the plain layer back;
`unfuse` undoes it. Adapter files use the linen format (`_checkpoint`).

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import os
from typing import Any, NamedTuple

from flax import nnx
import jax

from peft import _checkpoint
from peft import _fuse
from peft import _nnx_layers
from peft import _report
from peft import _rules
from peft import _spec

_ADAPTABLE = tuple(cls.base_type for cls in _nnx_layers.LORA_LAYERS)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _jit_delta(kernel, a, b, spec: _spec.AdapterSpec, sign: float):
  return _fuse.apply_delta(kernel, a, b, spec, sign)[0]


def _with_delta(kernel, a, b, spec: _spec.AdapterSpec, sign: float):
  """`kernel + sign * scale * delta` (float32 math, kernel's dtype)."""
  # The path does not enter the math; dropping it shares compilations.
  return _jit_delta(kernel, a, b, dataclasses.replace(spec, path=()), sign)


def _check_type_target(t: type, field: str) -> None:
  if not (issubclass(t, nnx.Module) and issubclass(t, _ADAPTABLE)):
    names = ', '.join(f'nnx.{c.__name__}' for c in _ADAPTABLE)
    raise TypeError(
        f'{field} names {t.__module__}.{t.__name__}, which peft.nnx cannot '
        f'adapt (it adapts {names}). Name one of those, or select layers '
        "by path regex such as '.*attn.*'."
    )


# The rule language is linen's: `peft.LoRARule` accepts nnx layer types.
LoRARule = _rules.LoRARule


def _make_rules(rules, **options) -> tuple[_rules.LoRARule, ...]:
  rules = _rules.make_rules(rules, **options)
  for rule in rules:
    for field in ('targets', 'exclude'):
      for t in getattr(rule, field):
        if isinstance(t, type):
          _check_type_target(t, field)
  return rules


def _selects(rule: _rules.LoRARule, module: nnx.Module,
             path: str) -> tuple[int, ...]:
  """Indices of `rule`'s targets selecting `module` (-1: the default)."""
  if any(_rules.target_matches(t, module, path) for t in rule.exclude):
    return ()
  if not rule.targets:
    return (-1,) if type(module) in _nnx_layers.EINSUM_LIKE else ()
  return tuple(i for i, t in enumerate(rule.targets)
               if _rules.target_matches(t, module, path))


# ---------------------------------------------------------------- the graph


def _children(node: Any):
  """`(key, child)` pairs of a module or container."""
  if isinstance(node, (nnx.List, list, tuple)):
    return list(enumerate(node))
  if isinstance(node, (nnx.Dict, dict)):
    return list(node.items())
  if isinstance(node, nnx.Module):
    return list(vars(node).items())
  return []


def _references(root: nnx.Module) -> dict[int, list[tuple[Any, Any]]]:
  """`id(module) -> [(holder, key), ...]` for every module under `root`."""
  refs: dict[int, list[tuple[Any, Any]]] = {}
  seen, stack = {id(root)}, [root]
  while stack:
    node = stack.pop()
    for key, child in _children(node):
      if isinstance(child, nnx.Module):
        refs.setdefault(id(child), []).append((node, key))
      if (isinstance(child, (nnx.Module, list, tuple, dict))
          and id(child) not in seen):
        seen.add(id(child))
        stack.append(child)
  return refs


def _check_replaceable(refs, module, where: str) -> None:
  for holder, key in refs.get(id(module), ()):
    if isinstance(holder, tuple):
      raise ValueError(
          f'The layer at {where!r} sits in a tuple (index {key!r}), which '
          'cannot be changed in place. Hold it in a list or nnx.List, or '
          'exclude it from the LoRA targets.'
      )


def _replace(refs, old: nnx.Module, new: nnx.Module) -> None:
  """Points every reference to `old` at `new`."""
  for holder, key in refs.get(id(old), ()):
    if isinstance(holder, (nnx.List, nnx.Dict, list, dict)):
      holder[key] = new
    else:
      setattr(holder, key, new)


def _modules(model: nnx.Module) -> list[tuple[tuple[str, ...], Any]]:
  """`(path, module)` for each module below the root, paths as strings."""
  return [(tuple(str(k) for k in path), m)
          for path, m in nnx.iter_modules(model) if path]


def _where(path: Sequence[str]) -> str:
  return '/'.join(path) or '<root>'


def _check_model(model: Any, name: str) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f'{name} takes a flax.nnx Module; got {type(model).__name__} '
        f'{model!r:.60}. For linen models use peft.lora / peft.LoRA.'
    )


def _lora_layers(model: nnx.Module):
  return [(p, m) for p, m in _modules(model) if _nnx_layers.is_lora_layer(m)]


def adapter_specs(model: nnx.Module) -> tuple[_spec.AdapterSpec, ...]:
  """The `AdapterSpec` of every LoRA layer in `model`.

  Example:
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = apply_lora(model, rank=1, rngs=nnx.Rngs(0))
    >>> [s.key for s in adapter_specs(model)]
    ['layers/0/lora']
  """
  _check_model(model, 'adapter_specs')
  return tuple(m.adapter_spec(p) for p, m in _lora_layers(model))


# ------------------------------------------------------------------ surgery


def apply_lora(
    model: nnx.Module,
    *,
    rank: int | None = None,
    targets: Any = None,
    exclude: Any = None,
    alpha: float | None = None,
    use_rslora: bool | None = None,
    dropout: float | None = None,
    deterministic: bool | None = None,
    param_dtype: Any = None,
    a_init: Any = None,
    b_init: Any = None,
    rules: Sequence[_rules.LoRARule] | None = None,
    rngs: nnx.Rngs,
) -> _report.LoRAReport:
  """Replaces the selected layers of `model` by LoRA layers, in place.

  Guarantee: right after, the model computes exactly what it did (B is
  zero), its base variables are the same objects at the same paths, and
  `nnx.state(model, peft.nnx.LoRAParam)` holds the new adapters. Layers that
  already have LoRA, and modules inside them, are left alone. Nothing
  changes unless every target selects a layer.

  Example:
    >>> class Mlp(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(2, 3, rngs=rngs)
    ...     self.out = nnx.Linear(3, 2, rngs=rngs)
    >>> model = Mlp(nnx.Rngs(0))
    >>> report = apply_lora(model, rank=2, targets='up', rngs=nnx.Rngs(1))
    >>> [s.key for s in report.specs], type(model.up).__name__
    (['up/lora'], 'LoRALinear')

  Args:
    model: the nnx model (its root is never replaced).
    rank: LoRA rank (single-rule form).
    targets: nnx layer types, path regexes (full match on `'a/b/c'`, list
      indices as numbers) or predicates; `None` selects every Linear,
      LinearGeneral and Einsum.
    exclude: layers never to adapt (same forms).
    alpha: scale numerator (`None`: `rank`, i.e. scale 1).
    use_rslora: scale by `alpha / sqrt(rank)`.
    dropout: adapter-input dropout rate (off after `model.eval()`).
    deterministic: start dropout off (True) or on (False, the default).
    param_dtype: dtype of A and B (default float32). Each update is
      computed in its layer's `dtype`.
    a_init: initializer of A.
    b_init: initializer of B.
    rules: several rules (`peft.nnx.LoRARule`, or `peft.LoRARule` with
      regex or predicate targets) instead of the single-rule options; the
      first rule that selects a layer decides its options.
    rngs: keys for A (and dropout streams).

  Returns:
    A `LoRAReport`: `report.specs` lists what was adapted, `report.seen`
    every adaptable layer.

  Raises:
    TypeError: `model` is not an nnx Module, or a type target is not an
      adaptable nnx layer.
    ValueError: no rank, both rules and options, bad option values, a
      target that selects no layer (the message lists the adaptable
      layers), nothing selected at all, or a selected layer that cannot
      be adapted or replaced (an Einsum without equation, a grouped conv, a
      layer held in a tuple).
  """
  _check_model(model, 'apply_lora')
  rule_set = _make_rules(
      rules, rank=rank, targets=targets, exclude=exclude, alpha=alpha,
      use_rslora=use_rslora, dropout=dropout, deterministic=deterministic,
      dtype=param_dtype, a_init=a_init, b_init=b_init)
  modules = _modules(model)
  # Never adapt inside a LoRA layer or adapter (peft's or flax's own).
  inside = {p for p, m in modules if isinstance(
      m, (_nnx_layers.LoRAAdapter, *_nnx_layers.LORA_LAYERS, nnx.LoRA))}
  report = _report.LoRAReport()
  chosen, used = [], set()
  for path, module in modules:
    if (_nnx_layers.lora_class_for(module) is None
        or any(path[:i] in inside for i in range(1, len(path)))):
      continue
    where = _where(path)
    report.seen[where] = type(module).__name__
    for rule_index, rule in enumerate(rule_set):
      hits = _selects(rule, module, where)
      if hits:
        used.update((rule_index, t) for t in hits)
        chosen.append((path, module, rule))
        break
  _check_used(rule_set, used, report, model)
  refs = _references(model)
  new_layers = []
  for path, module, rule in chosen:
    _check_replaceable(refs, module, _where(path))
    cls = _nnx_layers.lora_class_for(module)
    layer = cls._adapt(
        module, where=_where(path), rank=rule.rank, alpha=rule.alpha,
        use_rslora=rule.use_rslora, dropout=rule.dropout,
        deterministic=bool(rule.deterministic), dtype=None,
        param_dtype=rule.dtype, a_init=rule.a_init, b_init=rule.b_init,
        einsum_str=None, rngs=rngs)
    new_layers.append((module, layer))
    spec = layer.adapter_spec(path)
    report.adapters[spec.key] = spec
  for module, layer in new_layers:
    _replace(refs, module, layer)
  return report


def _check_used(rule_set, used, report, model) -> None:
  adapted = [_where(p) for p, _ in _lora_layers(model)]
  seen = '\n'.join(f'  {p} ({t})' for p, t in report.seen.items())
  listing = (f'Adaptable layers:\n{seen or "  (none)"}\n'
             f'Layers that already have LoRA: {adapted or "none"}.')
  root = _nnx_layers.lora_class_for(model)
  if root is not None:
    listing += (f' The root (an nnx.{root.base_type.__name__}) cannot be '
                f'replaced in place; use peft.nnx.{root.__name__}.'
                'from_module(layer, ...).')
  for rule_index, rule in enumerate(rule_set):
    for target_index, target in enumerate(rule.targets):
      if (rule_index, target_index) not in used:
        raise ValueError(
            f'LoRA target {_rules.describe_target(target)} (rule '
            f'{rule_index}) selected no layer. {listing}\nFix the target '
            '(regexes must match the whole path, e.g. "layers/0/attn").'
        )
  if not used:
    raise ValueError(
        f'apply_lora selected no layer in {type(model).__name__}. {listing}'
        '\nName the layers to adapt with targets=...'
    )


# ------------------------------------------------------------ fuse/unfuse


class FusedAdapters(NamedTuple):
  """What `fuse` took out of the model, for `unfuse`.

  Attributes:
    specs: the `AdapterSpec` of every fused adapter.
    adapters: `{path...: {'lora': {'a': A, 'b': B}}}`, the layout of linen
      adapter trees and of `load_adapters(...).lora`.
  """

  specs: tuple[_spec.AdapterSpec, ...]
  adapters: dict[str, Any]


def _put(tree: dict[str, Any], spec: _spec.AdapterSpec, a, b) -> None:
  node = tree
  for key in (*spec.path, spec.adapter_name):
    node = node.setdefault(key, {})
  node.update(a=a, b=b)


def _adapter_tree(layers) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, layer in layers:
    _put(tree, layer.adapter_spec(path), layer.lora.a[...], layer.lora.b[...])
  return tree


def fuse(model: nnx.Module) -> FusedAdapters:
  """Folds every LoRA layer into a plain layer, in place.

  Each LoRA layer is replaced by its plain nnx layer whose kernel is
  `W + scale * einsum(delta_str, A, B)`, computed in float32 (or wider) and
  cast back to the kernel's dtype; the model then computes what the
  adapted model computed, with no LoRA overhead, and its graph is that of
  the unmodified model.

  Example:
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = apply_lora(model, rank=1, rngs=nnx.Rngs(0))
    >>> fused = fuse(model)
    >>> type(model.layers[0]).__name__, [s.key for s in fused.specs]
    ('Linear', ['layers/0/lora'])

  Returns:
    The specs and adapter arrays taken out (for `unfuse`).

  Raises:
    ValueError: the model has no LoRA layer.
  """
  _check_model(model, 'fuse')
  layers = _lora_layers(model)
  if not layers:
    raise ValueError(
        f'fuse found no LoRA layer in {type(model).__name__}. Call '
        'apply_lora (or load_adapters) first.'
    )
  fused = FusedAdapters(tuple(m.adapter_spec(p) for p, m in layers),
                        _adapter_tree(layers))
  refs = _references(model)
  for (_, layer), spec in zip(layers, fused.specs):
    kernel = layer._kernel()
    value = _with_delta(kernel[...], layer.lora.a[...], layer.lora.b[...],
                        spec, 1.0)
    plain = _nnx_layers.retype(layer, layer.base_type)
    del plain.lora
    setattr(plain, layer.weight_name, kernel.replace(value))
    _replace(refs, layer, plain)
  return fused


def _attach(model, specs, adapters, *, subtract: bool, name: str,
            **options) -> None:
  """Builds LoRA layers from `specs` and adapter arrays, in place."""
  specs = _fuse.check_specs(specs, name)
  _check_model(model, name)
  by_path = dict(_modules(model))
  refs = _references(model)
  new_layers = []
  for spec in specs:
    module = by_path.get(spec.path)
    cls = _nnx_layers.lora_class_for(module)
    if cls is None or cls.base_type.__name__ != spec.layer_type:
      raise ValueError(
          f'{name}: adapter {spec.key!r} is for an nnx.{spec.layer_type} at '
          f'{_where(spec.path)!r}, but the model holds '
          f'{"no module" if module is None else type(module).__name__} '
          'there. Use the model the adapters were made for (fused, or '
          'without LoRA).'
      )
    a, b = _fuse.get_adapter(adapters, spec, name)
    _check_replaceable(refs, module, _where(spec.path))
    layer = cls._adapt(
        module, where=_where(spec.path), rank=spec.rank, alpha=spec.alpha,
        use_rslora=spec.use_rslora, dtype=None, param_dtype=a.dtype,
        a_init=lambda *_, v=a: v, b_init=lambda *_, v=b: v,
        einsum_str=spec.einsum_str if cls is _nnx_layers.LoRAEinsum else None,
        **options)
    got = layer.adapter_spec(spec.path)
    if got != spec:
      raise ValueError(
          f'{name}: adapter {spec.key!r} does not fit the layer at '
          f'{_where(spec.path)!r}: the layer needs {got} but the adapter '
          f'is {spec}. Use the model the adapters were made for.'
      )
    if subtract:
      kernel = layer._kernel()
      value = _with_delta(kernel[...], a, b, spec, -1.0)
      setattr(layer, layer.weight_name, kernel.replace(value))
    new_layers.append((module, layer))
  for module, layer in new_layers:
    _replace(refs, module, layer)


def unfuse(model: nnx.Module, specs: Sequence[_spec.AdapterSpec],
           adapters: Mapping[str, Any], *, dropout: float = 0.0,
           deterministic: bool = False,
           rngs: nnx.Rngs | None = None) -> None:
  """Inverse of `fuse`: subtracts the deltas and puts the LoRA layers back.

  Example:
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = apply_lora(model, rank=1, rngs=nnx.Rngs(0))
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
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = apply_lora(model, rank=1, rngs=nnx.Rngs(0))
    >>> file = os.path.join(tempfile.mkdtemp(), 'a.safetensors')
    >>> [s.key for s in save_adapters(file, model)]
    ['layers/0/lora']

  Returns:
    The specs written.

  Raises:
    ValueError: the model has no LoRA layer; see also
      `peft._checkpoint.save_adapters`.
  """
  _check_model(model, 'save_adapters')
  layers = _lora_layers(model)
  if not layers:
    raise ValueError(
        f'save_adapters found no LoRA layer in {type(model).__name__}. Call '
        'apply_lora first.'
    )
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
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = apply_lora(model, rank=1, rngs=nnx.Rngs(0))
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
  _check_model(model, 'load_adapters')
  layers = _lora_layers(model)
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
            f'{_where(p)!r}. Apply LoRA with param_dtype={new.dtype} (or '
            'save the adapters in the model\'s dtype).'
        )
      values.append((var, new))
  for var, new in values:
    var[...] = new
  return loaded
