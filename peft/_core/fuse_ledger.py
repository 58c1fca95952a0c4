"""Whether a kernel array is fused: what fuse/unfuse remember of it.

A fused kernel is a plain array; nothing in it says whether a delta was
added. Fusing the same adapter twice (`merge_params(fused, lora)` then
`fuse_params`) or unfusing a kernel that was never fused gives wrong
weights without any error. So fuse and unfuse note, for the very arrays
they read and return, which are base and which are fused, and with which
adapter arrays; a later call on one of those arrays is checked.

The record is weak (a kernel the user drops drops its entry) and per
process. For a DoRA adapter the record of a fused kernel also holds the
per-column norm `||W + s*BA||` that the fused kernel no longer determines;
unfuse needs it. Arrays it never saw (loaded from a checkpoint, returned by a
jitted function, copied) are unknown and not checked; nor are tracers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple
import weakref

import jax

FUSED, BASE = 'fused', 'base'


class _Entry(NamedTuple):
  kernel: weakref.ref
  state: str
  # (A, B) of each adapter the kernel holds (fused) or was read for (base).
  adapters: tuple[tuple[weakref.ref, weakref.ref], ...]
  # Per adapter: the DoRA norm fused into the kernel (None for LoRA).
  norms: tuple[Any, ...] = ()


_ENTRIES: dict[int, _Entry] = {}


def _entry(kernel: Any) -> _Entry | None:
  entry = _ENTRIES.get(id(kernel))
  return entry if entry is not None and entry.kernel() is kernel else None


def state(kernel: Any) -> str | None:
  """`'fused'`, `'base'` or None (unknown) for a kernel array."""
  entry = _entry(kernel)
  return None if entry is None else entry.state


def _remember(kernel: Any, kernel_state: str,
              adapters: Sequence[tuple[Any, Any]],
              norms: Sequence[Any] = ()) -> None:
  if isinstance(kernel, jax.core.Tracer):
    return
  key = id(kernel)
  try:
    ref = weakref.ref(kernel, lambda _: _ENTRIES.pop(key, None))
    refs = tuple((weakref.ref(a), weakref.ref(b)) for a, b in adapters)
  except TypeError:  # Not weak-referenceable (a Python scalar...).
    return
  _ENTRIES[key] = _Entry(ref, kernel_state, refs, tuple(norms))


def dora_norm(kernel: Any, a: Any, b: Any) -> Any:
  """The DoRA norm fused with adapter `(a, b)` into `kernel`, or None.

  Known only for a kernel `fuse_params` (or nnx `fuse`) returned in this
  process, with those very A and B arrays.
  """
  entry = _entry(kernel)
  if entry is None or entry.state != FUSED:
    return None
  for (ra, rb), norm in zip(entry.adapters, entry.norms):
    if ra() is a and rb() is b:
      return norm
  return None


def check(kernel: Any, a: Any, b: Any, *, fusing: bool, where: str,
          adapter: str, name: str) -> None:
  """Refuses a second fuse of the same adapter and an unfuse of a base.

  Args:
    kernel: the kernel as the caller passed it (before any delta).
    a: A of the adapter about to be added or subtracted.
    b: its B.
    fusing: adding (fuse) rather than subtracting (unfuse).
    where: the kernel's path, for the message.
    adapter: the adapter's key, for the message.
    name: the calling function, for the message.
  """
  entry = _entry(kernel)
  if entry is None:
    return
  holds = any(ra() is a and rb() is b for ra, rb in entry.adapters)
  if fusing and entry.state == FUSED and holds:
    raise ValueError(
        f'{name}: kernel {where!r} already has adapter {adapter!r} fused (it '
        'is what fuse_params returned); fusing it again would add the delta '
        'twice. Fuse the base params (split_params(params).original merged '
        'with the adapters), or unfuse_params first.'
    )
  if not fusing and entry.state == BASE:
    raise ValueError(
        f'{name}: kernel {where!r} is a base kernel (fuse_params read it, or '
        'unfuse_params returned it), not a fused one; unfusing it would '
        'subtract a delta that was never added. Pass the params that '
        'fuse_params returned.'
    )


def record(original: Any, result: Any, adapters: Sequence[tuple[Any, Any]],
           *, fusing: bool, norms: Sequence[Any] = ()) -> None:
  """Notes that `result` is `original` with `adapters` added (or removed).

  A known `original` keeps its state: a fused kernel that takes a second,
  different adapter is still the fused one for its first. `norms` (one per
  adapter, None for LoRA) are the DoRA norms a fuse folded in.
  """
  before, after = (BASE, FUSED) if fusing else (FUSED, BASE)
  if state(original) is None:
    _remember(original, before, adapters)
  _remember(result, after, adapters, norms if fusing else ())
