"""The LoRA options: one frozen type, and the one check of each value.

`LoRAOptions` declares every LoRA option (rank, alpha, rsLoRA, DoRA,
dropout, the A/B dtype and initializers) with its default, and derives the
scale. Rules, the linen wrappers and adapters, the nnx layers and adapter
carry one `LoRAOptions`; every entry point that takes the options as keywords
(`peft.lora`, `peft.LoRA`, `LoRARule`, `LoRADense(rank=..., wrapped=...)`,
the nnx layers, `AdapterSpec` when a file is loaded) checks them with
`check_lora_options`, so one option gets one check and one message
everywhere: the option, the value, where it was given and a value that
works.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import errors as _errors


class _Bad(ValueError):
  """An option check failed.

  `expected` completes "<option> must be ...", `detail` says more after
  the bad value, `fix` is an example of a valid value.
  """

  def __init__(self, expected: str, fix: str, detail: str = ''):
    super().__init__(expected)
    self.expected, self.fix, self.detail = expected, fix, detail


def _is_real(value: Any) -> bool:
  # bool is an int, and numpy scalars are not Python floats: accept numbers,
  # refuse True/False and strings ('16' is a typo, not a number).
  return (isinstance(value, numbers.Real)
          and not isinstance(value, (bool, np.bool_)))


def _rank(value: Any) -> int:
  if (isinstance(value, (bool, np.bool_))
      or not isinstance(value, numbers.Integral) or value <= 0):
    raise _Bad('a positive int', 'rank=8')
  return int(value)


def _alpha(value: Any) -> float | None:
  if value is None:
    return None
  if not _is_real(value) or not math.isfinite(value) or value <= 0:
    raise _Bad('positive or None', 'alpha=16.0',
               ' (a finite number; None means alpha = rank, scale 1)')
  return float(value)


def _bool(fix: str) -> Callable[[Any], bool]:
  def check(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
      raise _Bad('a bool', fix)
    return bool(value)
  return check


def _optional_bool(fix: str) -> Callable[[Any], bool | None]:
  def check(value: Any) -> bool | None:
    return None if value is None else _bool(fix)(value)
  return check


def _dropout(value: Any) -> float:
  if not _is_real(value) or not 0.0 <= value < 1.0:
    raise _Bad('in [0, 1)', 'dropout=0.05', ' (a number)')
  return float(value)


def _float_dtype(fix: str, *, optional: bool) -> Callable[[Any], Any]:
  def check(value: Any) -> Any:
    if value is None and optional:
      return None
    try:
      dtype = jnp.dtype(value)
    except TypeError:
      dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      kind = 'None or a float dtype' if optional else 'a float dtype'
      raise _Bad(kind, fix, ' (adapters are trained by gradients)')
    return value
  return check


def _initializer(fix: str) -> Callable[[Any], Any]:
  def check(value: Any) -> Any:
    if not callable(value):
      raise _Bad('an initializer `(key, shape, dtype) -> array`', fix)
    return value
  return check


# Option name -> check returning the normalised value. `dtype` is the A/B
# dtype in linen and the compute dtype in nnx (where `param_dtype` is the
# A/B dtype); both must be float.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    'rank': _rank,
    'alpha': _alpha,
    'use_rslora': _bool('use_rslora=True'),
    'use_dora': _bool('use_dora=True'),
    'dropout': _dropout,
    'deterministic': _optional_bool('deterministic=True'),
    'dtype': _float_dtype('dtype=jnp.bfloat16', optional=True),
    'param_dtype': _float_dtype('param_dtype=jnp.float32', optional=True),
    'a_init': _initializer('a_init=nn.initializers.normal(0.02)'),
    'b_init': _initializer('b_init=nn.initializers.zeros'),
}


def check_lora_options(where: str, **options: Any) -> dict[str, Any]:
  """Checks the given LoRA options; returns them normalised.

  Only the options passed are checked, so each caller passes what it takes.
  `alpha` comes back as a float (or None), `rank` as an int.

  Example:
    >>> check_lora_options('LoRARule', rank=4, alpha=8)
    {'rank': 4, 'alpha': 8.0}
    >>> check_lora_options('LoRARule', alpha='16')
    Traceback (most recent call last):
    ...
    ValueError: LoRA alpha must be positive or None; got '16' at 'LoRARule' \
(a finite number; None means alpha = rank, scale 1). Pass e.g. alpha=16.0.

  Args:
    where: who received the options (a class name or a module path),
      quoted in errors.
    **options: option name -> value; names outside the LoRA options fail.

  Returns:
    The options, normalised.

  Raises:
    ValueError: a value of the wrong type or out of range, or an unknown
      option name.
  """
  out = {}
  at = _errors.at(where)
  for name, value in options.items():
    check = _CHECKS.get(name)
    if check is None:
      raise ValueError(
          f'{name!r}{at} is not a LoRA option; known: {sorted(_CHECKS)}.')
    try:
      out[name] = check(value)
    except _Bad as bad:
      raise ValueError(
          f'LoRA {name} must be {bad.expected}; got {value!r}{at}'
          f'{bad.detail}. Pass e.g. {bad.fix}.'
      ) from None
  return out


def lora_scale(*, rank: int, alpha: float | None, use_rslora: bool) -> float:
  """The factor applied to `x @ A @ B`.

  `alpha=None` means `alpha=rank`, so the default scale is 1 (as gemma.peft).
  With rsLoRA (Kalajdzievski 2023) the scale is `alpha / sqrt(rank)`.

  Example:
    >>> lora_scale(rank=8, alpha=16.0, use_rslora=False)
    2.0
    >>> lora_scale(rank=4, alpha=None, use_rslora=True)
    2.0
  """
  alpha = float(rank if alpha is None else alpha)
  return alpha / (math.sqrt(rank) if use_rslora else rank)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAOptions:
  """How to adapt a layer: every LoRA option, checked when built.

  LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) adds
  `scale * x @ A @ B` to a frozen layer; rsLoRA (Kalajdzievski 2023,
  https://arxiv.org/abs/2312.03732) uses `scale = alpha / sqrt(rank)`;
  DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) adds a trained
  magnitude per output feature (`use_dora`, see `peft._core.dora`).
  This is the one declaration of the options and their defaults: a
  `LoRARule` carries one, peft's linen wrappers and adapters and the nnx
  layers build theirs from it (`LoRADense.from_options(options, wrapped=
  ...)`), and the keyword forms (`peft.lora(rank=8)`, `LoRADense(rank=8,
  wrapped=...)`) build one.

  Example:
    >>> options = LoRAOptions(rank=8, alpha=16)
    >>> options.alpha, options.scale  # alpha normalised to a float
    (16.0, 2.0)
    >>> options.replace(use_rslora=True).scale  # 16 / sqrt(8)
    5.656854249492381
    >>> LoRAOptions.checked('my_layer', rank=0)
    Traceback (most recent call last):
    ...
    ValueError: LoRA rank must be a positive int; got 0 at 'my_layer'. \
Pass e.g. rank=8.

  Attributes:
    rank: LoRA rank (a positive int).
    alpha: scale numerator; `None` means `rank` (scale 1, as gemma.peft).
    use_rslora: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
    use_dora: DoRA: the kernel becomes `m * V / ||V||` with `V = W +
      scale * delta(A, B)`, the norm per output feature (over the kernel
      axes the layer's output does not keep) and held constant in the
      backward pass (as the paper's section 4.3 and HF PEFT). The
      magnitude `m` sits beside A and B as `'m'`, starts at `||W||`, so
      at init the output equals the base's to float rounding (not
      always bit for bit: it divides by a norm). Each call computes
      `||V||`, a kernel-sized pass. Dense, DenseGeneral, Einsum,
      registered einsum layers and Conv take it; Embed and quantized
      bases raise.
    dropout: dropout rate on the adapter's input, in [0, 1). linen applies
      it only when the model runs with a `'dropout'` rng; nnx until
      `model.eval()`.
    deterministic: force that dropout off (True) or on (False); `None`
      lets linen decide from the rng (nnx starts it on).
    dtype: dtype of A and B (float). `None`: linen's default (float32);
      in nnx the adapted layer's `param_dtype`. The update is computed in
      the adapted layer's dtype.
    a_init: initializer of A, `(key, shape, dtype) -> array`.
    b_init: initializer of B (zeros, so a new adapter is a no-op).
  """

  rank: int
  alpha: float | None = None
  use_rslora: bool = False
  use_dora: bool = False
  dropout: float = 0.0
  deterministic: bool | None = None
  dtype: Any = jnp.float32
  a_init: Callable[..., Any] = jax.nn.initializers.kaiming_uniform()
  b_init: Callable[..., Any] = jax.nn.initializers.zeros

  def __post_init__(self):
    for name, value in check_lora_options(
        type(self).__name__, **self.values()).items():
      object.__setattr__(self, name, value)

  @classmethod
  def checked(cls, where: str, **values: Any) -> LoRAOptions:
    """`LoRAOptions(**values)`, with errors naming `where`.

    Args:
      where: who received the options (a class name or a module path).
      **values: option name -> value; `rank` is required.

    Raises:
      ValueError: a bad value, an unknown option or no rank.
    """
    if 'rank' not in values:
      raise ValueError(
          f'LoRA needs a rank; got none{_errors.at(where)}. Pass e.g. '
          'rank=8.')
    # linen builds a module (so its options) again at every clone, many
    # times per trace: the same values are checked once. The key holds
    # each value's type, so `alpha=True` never finds `alpha=1`'s entry.
    try:
      key = (cls, where, tuple((k, type(v), v) for k, v in values.items()))
      hash(key)
    except TypeError:  # an unhashable value: check it every time
      key = None
    options = _CHECKED.get(key) if key is not None else None
    if options is None:
      options = cls(**check_lora_options(where, **values))
      if key is not None and len(_CHECKED) < _MAX_CHECKED:
        _CHECKED[key] = options
    return options

  @classmethod
  def names(cls) -> tuple[str, ...]:
    """The option names, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def default(cls, name: str) -> Any:
    """The default of option `name` (no default for `rank`)."""
    return _FIELDS[name].default

  def values(self) -> dict[str, Any]:
    """Option name -> value (the keywords `LoRAOptions` takes)."""
    return {name: getattr(self, name) for name in self.names()}

  def replace(self, **changes: Any) -> LoRAOptions:
    """A copy with `changes`, checked."""
    return dataclasses.replace(self, **changes)

  @property
  def scale(self) -> float:
    """`alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA."""
    return lora_scale(rank=self.rank, alpha=self.alpha,
                      use_rslora=self.use_rslora)


_FIELDS = {f.name: f for f in dataclasses.fields(LoRAOptions)}
# `LoRAOptions.checked` results by (class, where, typed values).
_CHECKED: dict[Any, LoRAOptions] = {}
_MAX_CHECKED = 4096
