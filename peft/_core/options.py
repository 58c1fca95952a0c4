"""The one place that checks LoRA option values, for linen and nnx alike.

Every entry point that takes LoRA options (`peft.lora`, `peft.LoRA`,
`LoRARule`, the linen wrappers and adapters, the nnx layers and adapter,
`AdapterSpec` when a file is loaded) calls `check_lora_options`, so one
option gets one check and one message everywhere: the option, the value,
where it was given and a value that works.
"""

from __future__ import annotations

from collections.abc import Callable
import math
import numbers
from typing import Any

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
