"""The one base class for modules that wrap a layer and share its scope.

A wrapper is transparent for parameters: the wrapped layer's params stay at
their original path and anything the wrapper adds (a LoRA adapter, a
quantization scale) sits beside them, so a base checkpoint loads unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from flax import linen as nn


class ScopeSharingWrapper(nn.Module):
  """Wraps `wrapped` and shares its scope.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> class Twice(ScopeSharingWrapper):
    ...   def __call__(self, x):
    ...     return 2 * self.wrapped(x)
    >>> class Model(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return Twice(wrapped=nn.Dense(3, name='proj'))(x)
    >>> params = Model().init(jax.random.key(0), jnp.ones((1, 2)))['params']
    >>> jax.tree.map(jnp.shape, params)
    {'proj': {'bias': (3,), 'kernel': (2, 3)}}

  Attributes:
    wrapped: the layer being wrapped.
  """

  _: dataclasses.KW_ONLY
  wrapped: nn.Module

  # Subclasses named after one layer type (gemma.peft's `LoRADense`, ...)
  # accept only that type; the error points to the generic wrapper.
  _expects: ClassVar[type[nn.Module]] = nn.Module
  _generic_wrapper: ClassVar[str] = 'the generic wrapper'

  def __post_init__(self):
    if not isinstance(self.wrapped, self._expects):
      raise TypeError(
          f'{type(self).__name__}.wrapped must be a {self._expects.__name__};'
          f' got {type(self.wrapped).__name__}. Use {self._generic_wrapper} '
          'for other registered layers.'
      )
    super().__post_init__()
    if self.scope is not None:
      nn.share_scope(self, self.wrapped)

  def __repr__(self) -> str:
    # The default dataclass repr walks `wrapped` and its parents, which
    # recurses through the interceptor; keep it short and finite.
    fields = [
        f'{f.name}={getattr(self, f.name)!r}'
        for f in dataclasses.fields(self)
        if f.init and f.name not in ('wrapped', 'parent', 'name', '_')
    ]
    fields.append(f'wrapped={type(self.wrapped).__name__}')
    return f'{type(self).__name__}({", ".join(fields)})'

  @property
  def where(self) -> str:
    """The module path as 'a/b/c', for error messages."""
    path = self.wrapped.path if self.wrapped.scope is not None else ()
    return '/'.join(path) or type(self.wrapped).__name__
