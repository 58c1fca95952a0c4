"""LoRA surgery on flax.nnx models: find layers and adapt them in place.

`apply_lora` walks a model and replaces, in place, every layer the rules
select by its LoRA version (which shares the layer's variables), wherever
the model holds it: attributes, lists, dicts, `nnx.List`, `nnx.Dict`, and
several places at once for a shared layer. The rules are the linen ones
(`peft.LoRARule`: types, path regexes full-matched on `'a/b/c'`,
predicates, exclusions, per-rule rank); `LoRARule` here takes nnx types.

Fuse/unfuse are in `_fuse.py`, adapter files in `_files.py`.

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from peft._core import params as _params
from peft._core import report as _report
from peft._core import spec as _spec
from peft._linen import rules as _rules
from peft.nnx import _adapter as _nnx_adapter
from peft.nnx import _layers as _nnx_layers

_ADAPTABLE = tuple(cls.base_type for cls in _nnx_layers.LORA_LAYERS)


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
  return _rules.selected_targets(
      rule.targets, rule.exclude, module, path,
      by_default=type(module) in _nnx_layers.EINSUM_LIKE)


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


def references(root: nnx.Module) -> dict[int, list[tuple[Any, Any]]]:
  """`id(module) -> [(holder, key), ...]` for every module under `root`."""
  refs: dict[int, list[tuple[Any, Any]]] = {}
  seen = {id(root)}
  stack: list[Any] = [root]  # Modules, lists, tuples and dicts.
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


def check_replaceable(refs, module, where: str) -> None:
  for holder, key in refs.get(id(module), ()):
    if isinstance(holder, tuple):
      raise ValueError(
          f'The layer at {where!r} sits in a tuple (index {key!r}), which '
          'cannot be changed in place. Hold it in a list or nnx.List, or '
          'exclude it from the LoRA targets.'
      )


def replace_references(refs, old: nnx.Module, new: nnx.Module) -> None:
  """Points every reference to `old` at `new`."""
  for holder, key in refs.get(id(old), ()):
    if isinstance(holder, (nnx.List, nnx.Dict, list, dict)):
      holder[key] = new
    else:
      setattr(holder, key, new)


def all_modules(model: nnx.Module) -> list[tuple[tuple[str, ...], Any]]:
  """`(path, module)` for each module below the root, paths as strings."""
  return [(tuple(str(k) for k in path), m)
          for path, m in nnx.iter_modules(model) if path]


def check_model(model: Any, name: str) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f'{name} takes a flax.nnx Module; got {type(model).__name__} '
        f'{model!r:.60}. For linen models use peft.lora / peft.LoRA.'
    )


def lora_layers(model: nnx.Module):
  return [(p, m) for p, m in all_modules(model) if _nnx_layers.is_lora_layer(m)]


def adapter_specs(model: nnx.Module) -> tuple[_spec.AdapterSpec, ...]:
  """The `AdapterSpec` of every LoRA layer in `model`.

  Example:
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = apply_lora(model, rank=1, rngs=nnx.Rngs(0))
    >>> [s.key for s in adapter_specs(model)]
    ['layers/0/lora']
  """
  check_model(model, 'adapter_specs')
  return tuple(m.adapter_spec(p) for p, m in lora_layers(model))


# ------------------------------------------------------------------ surgery


def apply_lora(
    model: nnx.Module,
    *,
    rank: int | None = None,
    targets: Any = None,
    exclude: Any = None,
    alpha: float | None = None,
    use_rslora: bool | None = None,
    use_dora: bool | None = None,
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
    use_dora: DoRA, a trained magnitude per output feature (see
      `peft.LoRAOptions`).
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
  check_model(model, 'apply_lora')
  rule_set = _make_rules(
      rules, rank=rank, targets=targets, exclude=exclude, alpha=alpha,
      use_rslora=use_rslora, use_dora=use_dora, dropout=dropout,
      deterministic=deterministic, dtype=param_dtype, a_init=a_init,
      b_init=b_init)
  modules = all_modules(model)
  # Never adapt inside a LoRA layer or adapter (peft's or flax's own).
  inside = {p for p, m in modules if isinstance(
      m, (_nnx_adapter.LoRAAdapter, *_nnx_layers.LORA_LAYERS, nnx.LoRA))}
  report = _report.LoRAReport()
  chosen, used = [], set()
  for path, module in modules:
    cls = _nnx_layers.lora_class_for(module)
    if cls is None or any(path[:i] in inside for i in range(1, len(path))):
      continue
    where = _params.fmt_path(path)
    report.seen[where] = type(module).__name__
    for rule_index, rule in enumerate(rule_set):
      hits = _selects(rule, module, where)
      if hits:
        used.update((rule_index, t) for t in hits)
        chosen.append((path, where, module, cls, rule))
        break
  _check_used(rule_set, used, report, model)
  refs = references(model)
  new_layers = []
  for path, where, module, cls, rule in chosen:
    check_replaceable(refs, module, where)
    layer = cls.adapt(module, rule.options, where=where, rngs=rngs)
    new_layers.append((module, layer))
    spec = layer.adapter_spec(path)
    report.adapters[spec.key] = spec
  for module, layer in new_layers:
    replace_references(refs, module, layer)
  return report


def _check_used(rule_set, used, report, model) -> None:
  adapted = [_params.fmt_path(p) for p, _ in lora_layers(model)]
  listing = (_rules.layer_listing('Adaptable layers', report.seen)
             + f'\nLayers that already have LoRA: {adapted or "none"}.')
  root = _nnx_layers.lora_class_for(model)
  if root is not None:
    listing += (f' The root (an nnx.{root.base_type.__name__}) cannot be '
                f'replaced in place; use peft.nnx.{root.__name__}.'
                'from_module(layer, ...).')
  for rule_index, rule in enumerate(rule_set):
    for target_index, target in enumerate(rule.targets):
      if (rule_index, target_index) not in used:
        raise _rules.unmatched_target('LoRA', target, rule_index, listing)
  if not used:
    raise ValueError(
        f'apply_lora selected no layer in {type(model).__name__}. {listing}'
        '\nName the layers to adapt with targets=...'
    )
