"""The LoRA options as linen dataclass fields, declared once for all modules.

peft's linen wrappers and adapters take the options as keywords, as
gemma.peft's do (`LoRADense(rank=4, wrapped=dense)`), so they must be
dataclass fields. `LoRAFields` declares them once, with `LoRAOptions`'
defaults, checks them when a module is built and exposes the checked
`LoRAOptions` as `.options`; `from_options` builds a module from one.
"""

from __future__ import annotations

from typing import Any, Self

from flax import linen as nn
from flax.typing import Dtype
from flax.typing import Initializer

from peft._core import options as _options

_default = _options.LoRAOptions.default


class LoRAFields(nn.Module):
  """The fields of `LoRAOptions` on a linen module, and `.options`.

  A field list that differs from `LoRAOptions.names()` fails a test, so a
  new option is added in `LoRAOptions` and here, nowhere else.

  Example:
    >>> import peft
    >>> from flax import linen as nn
    >>> layer = peft.LoRADense(rank=4, alpha=8, wrapped=nn.Dense(3))
    >>> layer.options.scale
    2.0
    >>> same = peft.LoRADense.from_options(layer.options, wrapped=nn.Dense(3))
    >>> same.options == layer.options
    True

  Attributes:
    rank: LoRA rank.
    alpha: see `peft.LoRAOptions`.
    use_rslora: see `peft.LoRAOptions`.
    use_dora: see `peft.LoRAOptions`; needs a peft wrapper (LoRADense,
      ...), which sees the wrapped layer's kernel and output.
    dropout: see `peft.LoRAOptions`; applies only when the model runs with
      a `'dropout'` rng and `deterministic` is not True.
    deterministic: see `peft.LoRAOptions`.
    dtype: dtype of A and B; the update is computed in the adapted layer's
      output dtype.
    a_init: initializer of A.
    b_init: initializer of B.
  """

  rank: int
  alpha: float | None = _default('alpha')
  use_rslora: bool = _default('use_rslora')
  use_dora: bool = _default('use_dora')
  dropout: float = _default('dropout')
  deterministic: bool | None = _default('deterministic')
  dtype: Dtype | None = _default('dtype')
  a_init: Initializer = _default('a_init')
  b_init: Initializer = _default('b_init')

  def __post_init__(self):
    # Checked at construction (`LoRADense(alpha=-1.0)` fails here, naming
    # the class), and kept: the module's dataclass fields are frozen.
    object.__setattr__(self, '_lora_options', _options.LoRAOptions.checked(
        type(self).__name__,
        **{name: getattr(self, name) for name in _options.LoRAOptions.names()}
    ))
    super().__post_init__()

  @property
  def options(self) -> _options.LoRAOptions:
    """The checked options of this module."""
    return vars(self)['_lora_options']

  @property
  def scale(self) -> float:
    """`alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA)."""
    return self.options.scale

  @classmethod
  def from_options(cls, options: _options.LoRAOptions,
                   **fields: Any) -> Self:
    """This module with `options` and its other `fields` (e.g. `wrapped=`)."""
    return cls(**options.values(), **fields)
