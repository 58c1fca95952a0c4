"""Which adapter a LoRA layer applies: all of them off, one of a bank, or
one per batch row.

An adapter bank (`peft.AdapterBank`) stacks the A and B of several named
adapters along one more axis. Under a selection (`AdapterBank.active`),
every LoRA adapter module reads its bank and applies:

* one adapter (`bank.active('french')`): that adapter's A and B;
* one per row (`bank.active(ids)`, ids `(batch,)` ints, -1 for none): each
  row of the batch with its own adapter's A and B, in one program
  (gathered per row, then a batched `(x @ A) @ B`), rows with -1 getting no
  update, so they compute the base model's output;
* none (`bank.active(None)` or `peft.adapters_disabled()`): no update at
  all, so the output is the base model's, exactly.

The selection is a `contextvars.ContextVar`, so it is per thread and per
asyncio task, and it is read while tracing: under `jax.jit`, enter it
inside the traced function (ids may be traced arrays).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
import contextlib
import contextvars
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Selection:
  """What the LoRA adapters apply in a `selected` block.

  Attributes:
    size: adapters in the bank (the extra leading axis of A and B), or None
      for plain adapters.
    index: the one adapter to apply, or None.
    ids: `(batch,)` adapter index per row (-1: none), or None.
  """

  size: int | None
  index: int | None = None
  ids: Any = None

  @property
  def off(self) -> bool:
    return self.index is None and self.ids is None


_SELECTION: contextvars.ContextVar[Selection | None] = contextvars.ContextVar(
    'peft_adapter_selection', default=None)


def current() -> Selection | None:
  """The selection in effect, or None (adapters apply as usual)."""
  return _SELECTION.get()


@contextlib.contextmanager
def selected(selection: Selection) -> Generator[Selection, None, None]:
  """Makes `selection` the one the LoRA adapters read in this block."""
  token = _SELECTION.set(selection)
  try:
    yield selection
  finally:
    _SELECTION.reset(token)


@contextlib.contextmanager
def adapters_disabled() -> Generator[None, None, None]:
  """Every LoRA adapter adds nothing: the model computes its base output.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model, x = nn.Dense(3), jnp.ones((2, 4))
    >>> with peft.lora(rank=2, b_init=nn.initializers.ones):
    ...   params = model.init(jax.random.key(0), x)['params']
    ...   with peft.adapters_disabled():
    ...     off = model.apply({'params': params}, x)
    >>> base = peft.split_params(params).original
    >>> bool((off == model.apply({'params': base}, x)).all())
    True
  """
  with selected(Selection(size=None)):
    yield


def per_row() -> bool:
  """Whether the selection gives each batch row its own adapter."""
  selection = current()
  return selection is not None and selection.ids is not None


def expected_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape an adapter param has under the current selection."""
  selection = current()
  if selection is None or selection.size is None:
    return shape
  return (selection.size, *shape)


def apply(update: Callable[..., jax.Array], inputs: jax.Array, a: jax.Array,
          b: jax.Array, *, where: str,
          batch_axis: Callable[[int], int | None] = lambda ndim: 0
          ) -> jax.Array:
  """`update(inputs, A, B)` for the selected adapter(s).

  Args:
    update: the adapter's update of `inputs` from one A and one B.
    inputs: the adapted layer's input; with per-row ids its leading axis
      is the batch.
    a: A, with the bank axis first under a bank selection.
    b: B, likewise.
    where: the adapter's module path, for errors.
    batch_axis: the output axis of the input's batch axis, from the
      output's number of axes (None: the layer contracts the batch).

  Raises:
    ValueError: per-row ids whose number differs from the batch size, or a
      layer without a batch axis in its output.
  """
  selection = current()
  if selection is None:
    return update(inputs, a, b)
  banked = selection.size is not None
  if selection.off:
    one = (a[0], b[0]) if banked else (a, b)
    out = jax.eval_shape(update, inputs, *one)
    return jnp.zeros(out.shape, out.dtype)
  if selection.index is not None:
    return update(inputs, a[selection.index], b[selection.index])
  ids = jnp.asarray(selection.ids)
  if inputs.shape[:1] != ids.shape:
    raise ValueError(
        f'adapter ids {ids.shape} must give one adapter per row of the batch,'
        f' but the input of {where!r} has shape {inputs.shape} (batch '
        f'{inputs.shape[:1]}). Pass ids of shape (batch,), -1 for no adapter.')
  shape = jax.eval_shape(update, inputs[:1], a[0], b[0])
  axis = batch_axis(len(shape.shape))
  if axis is None or shape.shape[axis] != 1:
    raise ValueError(
        f'The layer at {where!r} does not keep the batch axis of its input '
        f'{inputs.shape} in its output {shape.shape}, so its rows cannot take'
        ' adapters of their own. Adapt it with one adapter per call (a name)'
        ' or leave it out of the surgery.')

  def one_row(x, a_row, b_row):
    return jnp.squeeze(update(x[None], a_row, b_row), axis)
  rows = jnp.clip(ids, 0, None)
  out = jax.vmap(one_row, out_axes=axis)(inputs, a[rows], b[rows])
  keep = (ids >= 0).astype(out.dtype)
  keep = keep.reshape([-1 if i == axis else 1 for i in range(out.ndim)])
  return out * keep
