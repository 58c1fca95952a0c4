"""LoRA surgery on a whole model: a context manager and a wrapper module.

`with peft.lora(rank=8, targets=...) as report:` replaces every selected
layer by its LoRA wrapper while the model runs inside the block, without any
edit to the model's code; `report` lists what was adapted. `peft.LoRA(model=
..., rank=...)` does the same as a module that shares the model's scope, so
params keep their paths.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

from flax import linen as nn

from peft._core import options as _options
from peft._core import params as _params
from peft._core import report as _report
from peft._core import spec as _spec
from peft._linen import interceptors as _interceptors
from peft._linen import lora_layers as _lora_layers
from peft._linen import rules as _rules


@dataclasses.dataclass
class _SurgeryState(_interceptors.ReplaceState):
  report: _report.LoRAReport = dataclasses.field(
      default_factory=_report.LoRAReport)
  # (rule index, target index) pairs that selected at least one layer.
  used_targets: set[tuple[int, int]] = dataclasses.field(default_factory=set)
  recorder: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class LoRASurgery(_interceptors.ModuleInterceptor):
  """Wraps the layers selected by `rules` with LoRA while inside the block.

  Entering yields a fresh `LoRAReport`, filled as the model runs. On a clean
  exit, a target that selected no layer is an error listing the adaptable
  layers that did run. Layers already wrapped are left alone.

  Compiled functions: a jitted function called inside the block traces
  afresh for each surgery object (so the report is filled) and reuses that
  trace when the same object is entered again; create the surgery once and
  re-enter it in loops. With `share_traces=True` (what `peft.LoRA` uses)
  surgeries with equal rules share traces too.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((1, 4))
    >>> surgery = peft.lora(rank=2, targets='layers_0')  # a LoRASurgery
    >>> [rule.rank for rule in surgery.rules]
    [2]
    >>> with surgery as report:  # create once, enter as often as needed
    ...   params = model.init(jax.random.key(0), x)['params']
    >>> [s.key for s in report.specs]
    ['layers_0/lora']
    >>> with peft.lora(rank=2, targets='layers_9'):
    ...   _ = model.init(jax.random.key(0), x)
    Traceback (most recent call last):
    ValueError: LoRA target 'layers_9' (rule 0) matched no layer. ...

  Attributes:
    rules: the rules; the first rule that selects a layer decides its
      options.
    share_traces: key JAX's compile caches on the rules rather than on this
      object.
  """

  rules: tuple[_rules.LoRARule, ...] = ()
  share_traces: bool = False

  def jit_cache_key(self) -> Any:
    # Keyed on the object by default: a report is filled while layers are
    # traced, so a new `with peft.lora(...) as report` must trace again.
    return super().jit_cache_key() if self.share_traces else self

  def _new_state(self) -> _SurgeryState:
    self._refuse_nesting()
    state = _SurgeryState()
    state.recorder = _spec.recording_adapters()
    state.report.adapters = state.recorder.__enter__()
    return state

  def _entered(self, state: _SurgeryState) -> _report.LoRAReport:
    return state.report

  def _exited(self, state: _SurgeryState, *, failed: bool) -> None:
    state.recorder.__exit__(None, None, None)
    if not failed and state.report.seen:
      self._check_all_targets_used(state)

  def replace_module(self, module: nn.Module) -> nn.Module:
    if (isinstance(module, _lora_layers.LoRAWrapper) or module.scope is None
        or _lora_layers.is_being_adapted(module)):
      return module
    wrapper = _lora_layers.wrapper_type_for(module)
    if wrapper is None:  # Not a layer LoRA can adapt.
      return module
    state = self._state()
    path = _params.module_path(module)
    state.report.seen[path] = type(module).__name__
    for rule_index, rule in enumerate(self.rules):
      hits = rule.matching_targets(module, path)
      if hits:
        state.used_targets.update((rule_index, t) for t in hits)
        # Bind the wrapper directly to the layer's scope: this shares it
        # (params stay at the layer's path) and works even when the caller
        # is a setup-style module, where new submodules may not be created
        # (flax takes a Scope as parent).
        return wrapper.from_options(rule.options, wrapped=module,
                                    parent=module.scope, name=module.name)
    return module

  def _refuse_nesting(self) -> None:
    """Two LoRA surgeries at once cannot mean what they look like: the
    outer one sees every layer first and wraps it, so the inner one's rules
    would be silently ignored (and `peft.LoRA(model=peft.LoRA(...))` would
    nest params under 'model'). One surgery with ordered rules says it."""
    outer = [i for i in _interceptors.active_interceptors()
             if isinstance(i, LoRASurgery)]
    if outer:
      raise ValueError(
          f'A LoRA surgery ({describe_rules(self.rules)}) was entered '
          f'inside another ({describe_rules(outer[-1].rules)}): nested LoRA '
          'surgeries do not combine (the outer one wraps every layer '
          'first). Use one surgery whose rules go from specific to general,'
          ' e.g. peft.lora(rules=[peft.LoRARule(rank=2, targets=\'.*up\'), '
          'peft.LoRARule(rank=4)]); and do not enter peft.lora(...) around a '
          'peft.LoRA(...) model or wrap one peft.LoRA in another.'
      )

  def _check_all_targets_used(self, state: _SurgeryState) -> None:
    for rule_index, rule in enumerate(self.rules):
      for target_index, target in enumerate(rule.targets):
        if (rule_index, target_index) not in state.used_targets:
          raise _rules.unmatched_target(
              'LoRA', target, rule_index, _rules.layer_listing(
                  'Adaptable layers that ran', state.report.seen))


def describe_rules(rules: Sequence[_rules.LoRARule]) -> str:
  """`'rank=4; rank=2, targets=[up]'`: each rule's rank and targets."""
  def one(rule):
    targets = ', '.join(_rules.describe_target(t) for t in rule.targets)
    return f'rank={rule.rank}' + (f', targets=[{targets}]' if targets else '')
  return '; '.join(one(r) for r in rules)


def lora(
    rank: int | None = None,
    *,
    targets: Any = None,
    exclude: Any = None,
    alpha: float | None = None,
    use_rslora: bool | None = None,
    use_dora: bool | None = None,
    dropout: float | None = None,
    deterministic: bool | None = None,
    dtype: Any = None,
    a_init: Any = None,
    b_init: Any = None,
    rules: Sequence[_rules.LoRARule] | None = None,
) -> LoRASurgery:
  """A context manager that adds LoRA to the selected layers of any model.

  Guarantee: at init (B = 0) the adapted model's output equals the
  unmodified model's on the same base params. Base params keep their paths;
  each adapter sits beside its kernel under `'lora'`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import peft
    >>> class Mlp(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2, name='out')(nn.relu(nn.Dense(8, name='up')(x)))
    >>> x = jnp.ones((1, 4))
    >>> with peft.lora(rank=2, targets='up') as report:
    ...   params = Mlp().init(jax.random.key(0), x)['params']
    >>> jax.tree.map(jnp.shape, params['up']['lora'])
    {'a': (4, 2), 'b': (2, 8)}
    >>> [s.key for s in report.specs]
    ['up/lora']

  Args:
    rank: LoRA rank (for a single rule).
    targets: layer types, path regexes (full match on `'a/b/c'`) or
      predicates; `None` selects every einsum-like layer.
    exclude: layers never to adapt (same forms).
    alpha: scale numerator; `None` means `rank` (scale 1).
    use_rslora: scale by `alpha / sqrt(rank)`.
    use_dora: DoRA, a trained magnitude per output feature (see
      `peft.LoRAOptions`).
    dropout: adapter-input dropout rate; applies when a 'dropout' rng is
      passed to `apply`.
    deterministic: force dropout off (True) or on (False).
    dtype: dtype of the adapter params (default float32).
    a_init: initializer of A.
    b_init: initializer of B.
    rules: several `LoRARule`s instead of the single-rule options.

  Returns:
    The surgery; `with` it yields a `LoRAReport`.

  Raises:
    ValueError: no rank, both `rules` and options, bad option values.
    TypeError: a target that is not a type, regex or predicate.
  """
  return LoRASurgery(rules=_rules.make_rules(
      rules, rank=rank, targets=targets, exclude=exclude, alpha=alpha,
      use_rslora=use_rslora, use_dora=use_dora, dropout=dropout,
      deterministic=deterministic, dtype=dtype, a_init=a_init,
      b_init=b_init))


class LoRA(nn.Module):
  """Wraps a whole model with LoRA surgery (like gemma's `gm.nn.LoRA`).

  Shares the model's scope, so params keep their paths; attribute access and
  kauldron's `__kontext_keys__` are forwarded to the model.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = LoRA(model=nn.Dense(3), rank=2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> sorted(params)
    ['bias', 'kernel', 'lora']
    >>> model.features  # forwarded to the wrapped model
    3

  Attributes:
    model: the model to adapt.
    rank: LoRA rank (single-rule form).
    targets: see `peft.lora`.
    exclude: see `peft.lora`.
    alpha: see `peft.lora`.
    use_rslora: see `peft.lora`.
    use_dora: see `peft.lora`.
    dropout: see `peft.lora`.
    deterministic: see `peft.lora`.
    dtype: see `peft.lora`.
    a_init: see `peft.lora`.
    b_init: see `peft.lora`.
    rules: several `LoRARule`s instead of the single-rule fields.
  """

  _: dataclasses.KW_ONLY
  model: nn.Module
  rank: int | None = None
  targets: Any = None
  exclude: Any = None
  alpha: float | None = None
  use_rslora: bool | None = None
  use_dora: bool | None = None
  dropout: float | None = None
  deterministic: bool | None = None
  dtype: Any = None
  a_init: Any = None
  b_init: Any = None
  rules: Sequence[_rules.LoRARule] | None = None

  def __post_init__(self):
    # Bad options fail here, where the model is built, not at first call.
    self.surgery()
    super().__post_init__()
    if self.scope is not None:
      nn.share_scope(self, self.model)

  def surgery(self) -> LoRASurgery:
    options = dict(rank=self.rank, alpha=self.alpha,
                   use_rslora=self.use_rslora, use_dora=self.use_dora,
                   dropout=self.dropout,
                   deterministic=self.deterministic, dtype=self.dtype,
                   a_init=self.a_init, b_init=self.b_init)
    # Checked here too so that errors name this module, not the rule.
    _options.check_lora_options(
        'LoRA', **{k: v for k, v in options.items() if v is not None})
    rules = lora(targets=self.targets, exclude=self.exclude,
                 rules=self.rules, **options).rules
    # A new surgery per call: equal ones share compiled traces.
    return LoRASurgery(rules=rules, share_traces=True)

  def __call__(self, *args, **kwargs):
    with self.surgery():
      return self.model(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    if name.startswith('__') or name in ('model', 'scope', 'parent'):
      raise AttributeError(name)
    try:
      return super().__getattr__(name)
    except AttributeError:
      return getattr(self.model, name)

  def __kontext_keys__(self) -> dict[str, str]:
    own = getattr(self.model, '__kontext_keys__', None)
    if own is not None:
      return own()
    # kauldron is optional (its users have it); the venv checked lacks it.
    # pyrefly: ignore[missing-import]
    from kauldron import kontext  # pylint: disable=g-import-not-at-top

    return kontext.get_keypaths(self.model)
