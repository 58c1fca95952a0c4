"""Dicts that layers report into while a model runs, per thread/task.

Several parts of peft learn about a model by running it: LoRA surgery
collects each adapter's `AdapterSpec`, quantization surgery each kernel's
axes, DoRA the float kernel a quantized base computed with. Each keeps one
`Recorders`: `with recorders.open() as seen:` opens a dict, layers that run
inside report into it, and nested opens stack. A `ContextVar` holds the
stack, so threads and asyncio tasks never see each other's dicts.
"""

from __future__ import annotations

from collections.abc import Generator
import contextlib
import contextvars
from typing import Generic, TypeVar

_V = TypeVar('_V')


class Recorders(Generic[_V]):
  """A stack of open `{key: value}` dicts in the current thread/task.

  Example:
    >>> seen_by = Recorders[int]('example')
    >>> with seen_by.open() as outer:
    ...   with seen_by.open() as inner:
    ...     for seen in seen_by.open_dicts():
    ...       seen['layer'] = 1
    ...     seen_by.open_dicts()[-1]['only_inner'] = 2
    >>> outer, inner
    ({'layer': 1}, {'layer': 1, 'only_inner': 2})
  """

  def __init__(self, name: str):
    self._stack: contextvars.ContextVar[tuple[dict[str, _V], ...]] = (
        contextvars.ContextVar(name, default=()))

  @contextlib.contextmanager
  def open(self) -> Generator[dict[str, _V], None, None]:
    """Opens a dict for reports until the block ends, and yields it."""
    seen: dict[str, _V] = {}
    token = self._stack.set(self._stack.get() + (seen,))
    try:
      yield seen
    finally:
      self._stack.reset(token)

  def open_dicts(self) -> tuple[dict[str, _V], ...]:
    """The open dicts, outermost first (empty when none is open)."""
    return self._stack.get()
