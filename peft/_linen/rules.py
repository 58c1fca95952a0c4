"""Which layer gets which adapter: the one place that validates rules.

A `LoRARule` selects layers by type, by module-path regex or by predicate,
minus exclusions, and carries the LoRA options (rank, alpha, ...) for the
layers it selects. Several rules may be given; the first that selects a
layer wins, so specific rules go before general ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import re
from typing import Any

from flax import linen as nn
from flax import nnx

from peft._core import options as _options
from peft._core import params as _params
from peft._linen import registry as _registry

# A target: a layer type (isinstance), a regex full-matched against the
# module path 'a/b/c', or a predicate `module -> bool`.
Target = type | str | Callable[[nn.Module], bool]


def adaptable_types() -> tuple[type[Any], ...]:
  """Layer types LoRA can wrap: linen's (the einsum registry, Conv, Embed)
  and flax.nnx's (for `peft.nnx`)."""
  return (*_registry.registered_einsum_types(), nn.Conv, nn.Embed,
          nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)


def is_adaptable(module: object) -> bool:
  """Whether LoRA can wrap `module` (a registered or built-in layer)."""
  return isinstance(module, (nn.Conv, nn.Embed)) or (
      _registry.einsum_kind_of(module) is not None)


def describe_target(target: Target) -> str:
  if isinstance(target, type):
    return target.__name__
  if isinstance(target, re.Pattern):
    return repr(target.pattern)
  return getattr(target, '__name__', repr(target))


def normalize_targets(value: Any, *, field: str) -> tuple[Any, ...]:
  """Targets as a tuple, regexes compiled; bad entries raise."""
  if value is None:
    return ()
  items = (tuple(value) if isinstance(value, (list, tuple, set, frozenset))
           else (value,))
  out: list[type | re.Pattern[str] | Callable[..., Any]] = []
  for t in items:
    if isinstance(t, type):
      if not issubclass(t, adaptable_types()):
        names = ', '.join(c.__name__ for c in adaptable_types())
        raise TypeError(
            f'{field} names {t.__name__}, which peft cannot adapt (known: '
            f'{names}). Register it with peft.register_einsum_layer first, '
            'or target its path with a regex.'
        )
      out.append(t)
    elif isinstance(t, str):
      try:
        out.append(re.compile(t))
      except re.error as e:
        raise ValueError(
            f'{field} holds {t!r}, which is not a valid regex ({e}). Pass a '
            "module-path regex such as '.*attn.*'."
        ) from None
    elif isinstance(t, re.Pattern) or callable(t):
      out.append(t)
    else:
      raise TypeError(
          f'{field} entries must be a layer type, a path regex or a '
          f'predicate; got {t!r}. E.g. targets=(nn.Dense, ".*mlp.*").'
      )
  return tuple(out)


def wrapped_chain(module: Any) -> list[Any]:
  """`module`, then what it wraps, and so on (wrappers expose `.wrapped`)."""
  chain = []
  while module is not None and all(module is not m for m in chain):
    chain.append(module)
    # The field itself, never `getattr`: a model's `__getattr__` (gemma's
    # Transformer has one) would answer for a missing attribute.
    module = vars(module).get('wrapped') if hasattr(module, '__dict__') else (
        None)
  return chain


def target_matches(target: Any, module: nn.Module | nnx.Module,
                   path: str) -> bool:
  """Whether `target` selects `module` (linen or nnx) at `path`.

  A type target also matches a wrapper of that type (e.g. `nn.Dense` selects
  the int8 wrapper of a Dense), so rules read the same on a quantized model.
  """
  if isinstance(target, type):
    return any(isinstance(m, target) for m in wrapped_chain(module))
  if isinstance(target, re.Pattern):
    return target.fullmatch(path) is not None
  return bool(target(module))


def selected_targets(targets: Sequence[Any], exclude: Sequence[Any],
                     module: Any, path: str, *,
                     by_default: bool) -> tuple[int, ...]:
  """The one selection rule: indices of `targets` that select `module`.

  Empty when an `exclude` entry matches `module` or no target does. With no
  targets, `(-1,)` (every layer of the default kind) if `by_default`, else
  empty. LoRA rules (linen and nnx) and the quantization surgery select
  layers with this, so the forms of a target mean the same everywhere.

  Example:
    >>> dense = nn.Dense(2)
    >>> selected_targets(normalize_targets(['.*q', nn.Dense], field='t'), (),
    ...                  dense, 'attn/q', by_default=True)
    (0, 1)
    >>> selected_targets((), (nn.Dense,), dense, 'attn/q', by_default=True)
    ()
  """
  if any(target_matches(t, module, path) for t in exclude):
    return ()
  if not targets:
    return (-1,) if by_default else ()
  return tuple(i for i, t in enumerate(targets)
               if target_matches(t, module, path))


def layer_listing(title: str, seen: dict[str, str]) -> str:
  """`title:` then one `  path (Type)` line per layer, for error messages.

  Example:
    >>> print(layer_listing('Adaptable layers that ran', {'mlp': 'Dense'}))
    Adaptable layers that ran:
      mlp (Dense)
  """
  rows = '\n'.join(f'  {_params.shown_path(p)} ({t})'
                   for p, t in sorted(seen.items()))
  return f'{title}:\n{rows or "  (none)"}'


def unmatched_target(kind: str, target: Any, rule_index: int | None,
                     listing: str) -> ValueError:
  """The error for a target that selected no layer (LoRA or quantization).

  Example:
    >>> print(unmatched_target('LoRA', 'attn', 0, 'Layers: (none)'))
    LoRA target 'attn' (rule 0) matched no layer. Layers: (none)
    Fix the target (regexes must match the whole path, e.g. "layers/0/attn").
  """
  rule = '' if rule_index is None else f' (rule {rule_index})'
  return ValueError(
      f'{kind} target {describe_target(target)}{rule} matched no layer. '
      f'{listing}\nFix the target (regexes must match the whole path, e.g. '
      '"layers/0/attn").'
  )


@dataclasses.dataclass(frozen=True, kw_only=True, init=False)
class LoRARule:
  """Selects layers and says how to adapt them.

  Takes the LoRA options as keywords (`rank=4, alpha=8`) or as one
  `options=peft.LoRAOptions(...)`; either way the rule carries one checked
  `LoRAOptions`, and `rule.rank`, `rule.alpha`, ... read from it.

  Example:
    >>> rule = LoRARule(rank=4, targets='.*attn.*', exclude=nn.Embed)
    >>> rule.rank, [t.pattern for t in rule.targets]
    (4, ['.*attn.*'])
    >>> rule.options == _options.LoRAOptions(rank=4)
    True

  Attributes:
    targets: layer types, path regexes (full match on `'a/b/c'`) or
      predicates; a layer matching any is selected. `None` selects every
      einsum-like layer (Dense, DenseGeneral, Einsum, registered layers);
      Conv and Embed are adapted only when a target names them.
    exclude: same forms; a layer matching any is never selected.
    options: the `LoRAOptions` of the selected layers (rank, alpha,
      use_rslora, use_dora, dropout, deterministic, dtype, a_init, b_init).
  """

  targets: tuple[Any, ...]
  exclude: tuple[Any, ...]
  options: _options.LoRAOptions

  def __init__(self, *, targets: Any = None, exclude: Any = (),
               options: _options.LoRAOptions | None = None,
               **option_values: Any):
    if options is None:
      options = _options.LoRAOptions.checked('LoRARule', **option_values)
    elif option_values:
      raise ValueError(
          f'LoRARule takes options=LoRAOptions(...) or option keywords, not '
          f'both; got options and {sorted(option_values)}. Use '
          'options.replace(...) to change some.'
      )
    elif not isinstance(options, _options.LoRAOptions):
      raise TypeError(
          f'LoRARule options must be a peft.LoRAOptions; got {options!r:.80}.'
          ' Pass options=peft.LoRAOptions(rank=8, ...).'
      )
    object.__setattr__(self, 'options', options)
    object.__setattr__(self, 'targets', normalize_targets(
        targets, field='targets'))
    object.__setattr__(self, 'exclude', normalize_targets(
        exclude, field='exclude'))

  def __getattr__(self, name: str) -> Any:
    # The options are declared once, in LoRAOptions; `rule.rank` reads the
    # rule's. The field itself is read from `vars`, so that a half-built
    # rule (unpickling) cannot recurse here.
    options = vars(self).get('options')
    if options is None or name not in _options.LoRAOptions.names():
      raise AttributeError(name)
    return getattr(options, name)

  def matching_targets(self, module: nn.Module, path: str) -> tuple[int, ...]:
    """Indices of the targets that select `module` (empty: not selected).

    With no explicit targets, index -1 stands for "every einsum-like layer".
    """
    if not is_adaptable(module):
      return ()
    return selected_targets(
        self.targets, self.exclude, module, path,
        by_default=_registry.einsum_kind_of(module) is not None)


def make_rules(rules: Sequence[LoRARule] | None, **options) -> tuple[LoRARule,
                                                                    ...]:
  """Rules from either explicit `rules` or the options of a single rule."""
  given = {k: v for k, v in options.items() if v is not None}
  if rules:
    if given:
      raise ValueError(
          f'Pass either rules=[...] or single-rule options, not both; got '
          f'rules and {sorted(given)}. Move the options into a LoRARule.'
      )
    for r in rules:
      if not isinstance(r, LoRARule):
        raise TypeError(
            f'rules must hold peft.LoRARule objects; got {r!r}. Build one '
            'with peft.LoRARule(rank=..., targets=...).'
        )
    return tuple(rules)
  if 'rank' not in given:
    raise ValueError(
        'LoRA needs a rank; got none. Pass rank=8 (or rules=[LoRARule(...)])'
        '.'
    )
  return (LoRARule(**given),)
