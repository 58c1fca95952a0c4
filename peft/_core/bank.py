"""Many named adapters on one model: a bank, and which of them a call uses.

`AdapterBank.stack` puts several adapters of one model (from adapter
files, or from several surgeries) side by side: each kernel's A and B get
one more axis, the adapter's index, after any `nn.scan` stack axes. Ranks
may differ: each adapter's scale is folded into its B and its A and B are
padded with zero columns to the largest rank, which changes no update. A
kernel that only some adapters adapt gets zeros in the others.

Merged with the base params (`merge_params(base, bank.lora)`) and run
under the same surgery, a bank computes, in one jitted program:

* `with bank.active('french'):` the French adapter;
* `with bank.active(ids):` row `i` of the batch with adapter `ids[i]`
  (`-1`: the base model), which is what serving many adapters at once
  needs;
* `with bank.active(None):` the base model, exactly.

The surgery that runs a bank is `peft.lora(rank=bank.rank, ...)` with the
default alpha (scale 1: the adapters' own scales are in their B); another
scale is refused.

`bank.select('french')` gives back one adapter as `(lora, specs)`, to
fuse or save. An nnx model takes a bank with `peft.nnx.load_bank(model,
bank)` and selects with the same `bank.active(...)`.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
import contextlib
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from peft._core import active_adapter as _active
from peft._core import adapter_tree as _adapter_tree
from peft._core import combine as _combine
from peft._core import einsum as _einsum
from peft._core import kernel_init as _kernel_init
from peft._core import spec as _spec

_NAME = 'AdapterBank'


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class AdapterBank:
  """Named adapters of one model, stacked for one program to use any.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model, x = nn.Dense(3), jnp.ones((2, 4))
    >>> surgery = peft.lora(rank=2, b_init=nn.initializers.normal(1.0))
    >>> with surgery as report:
    ...   fr = model.init(jax.random.key(0), x)['params']
    ...   de = model.init(jax.random.key(1), x)['params']
    >>> bank = peft.AdapterBank.stack({
    ...     'fr': (peft.split_params(fr).lora, report.specs),
    ...     'de': (peft.split_params(de).lora, report.specs)})
    >>> bank.names, bank.lora['lora']['a'].shape  # (adapters, in, rank)
    (('fr', 'de'), (2, 4, 2))
    >>> base = peft.split_params(fr).original
    >>> params = peft.merge_params(base, bank.lora)
    >>> with surgery, bank.active(jnp.array([1, -1])):  # de, then the base
    ...   mixed = model.apply({'params': params}, x)
    >>> with surgery:
    ...   alone = model.apply({'params': peft.merge_params(
    ...       base, peft.split_params(de).lora)}, x)
    >>> bool(jnp.allclose(mixed[0], alone[0], atol=1e-6))
    True
    >>> bool((mixed[1] == model.apply({'params': base}, x)[1]).all())
    True

  Attributes:
    names: the adapters' names, in bank order (row ids index it).
    lora: the stacked adapters (a lora tree: A `(*stack, n, *a_shape)`).
    specs: the spec of one adapter of each kernel (rank `rank`, scale 1),
      as `select` returns them.
  """

  names: tuple[str, ...]
  lora: dict[str, Any]
  specs: tuple[_spec.AdapterSpec, ...]

  @classmethod
  def stack(cls, adapters: Mapping[str, Any]) -> AdapterBank:
    """Stacks named adapters of one model into a bank.

    Args:
      adapters: name -> `(lora tree, specs)`, e.g. what `load_adapters`
        returns, or `(split_params(params).lora, report.specs)`.

    Raises:
      ValueError: no adapters, or two adapters of one kernel that disagree
        on it (other models).
      TypeError: an entry that is no `(lora, specs)` pair.
    """
    named = _combine.check_named(adapters, None, _NAME)
    names = tuple(named)
    by_key = _combine.by_kernel(named, _NAME)
    out: dict[str, Any] = {}
    specs = []
    # One rank for all, so that one surgery (`peft.lora(rank=bank.rank)`)
    # runs the bank.
    rank = max(spec.rank for entries in by_key.values()
               for *_, spec in entries.values())
    for entries in by_key.values():
      first = next(iter(entries.values()))[3]
      spec = _combine.with_rank(first, rank)
      a_parts, b_parts = [], []
      for name in names:
        if name in entries:
          _, a, b, own = entries[name]
          a, b = _padded(a, jnp.asarray(b) * own.scale, own, rank)
        else:
          a, b = (jnp.zeros((*spec.stack_shape, *shape), jnp.float32)
                  for shape in (spec.a_shape, spec.b_shape))
        a_parts.append(a)
        b_parts.append(b)
      n = len(spec.stack_shape)
      dtype = jnp.result_type(*(a for _, a, _, _ in entries.values()))
      node = _adapter_tree.adapter_node(out, spec)
      node['a'] = jnp.stack(a_parts, axis=n).astype(dtype)
      node['b'] = jnp.stack(b_parts, axis=n).astype(dtype)
      specs.append(dataclasses.replace(spec, stack_shape=()))
    return cls(names=names, lora=out, specs=tuple(specs))

  @property
  def rank(self) -> int:
    """The rank of every adapter in the bank (the largest of the inputs)."""
    return self.specs[0].rank if self.specs else 0

  def index(self, name: str) -> int:
    """The bank index of adapter `name`.

    Raises:
      ValueError: an unknown name.
    """
    if name not in self.names:
      raise ValueError(f'{_NAME}: no adapter named {name!r}; the bank holds '
                       f'{list(self.names)}. Pass one of those.')
    return self.names.index(name)

  def ids(self, per_row: Sequence[str | None]) -> np.ndarray:
    """Row ids for `active` from a name (or None: the base) per row.

    Example:
      >>> bank = AdapterBank(names=('fr', 'de'), lora={}, specs=())
      >>> bank.ids(['de', None, 'fr'])
      array([ 1, -1,  0], dtype=int32)
    """
    return np.asarray([-1 if name is None else self.index(name)
                       for name in per_row], np.int32)

  @contextlib.contextmanager
  def active(self, selection: Any) -> Generator[None, None, None]:
    """Which adapter the LoRA layers apply in this block.

    Args:
      selection: a name (one adapter for the whole batch), `(batch,)`
        int ids (row `i` uses adapter `ids[i]`, -1 the base; traced arrays
        work), or None (no adapter: the base output, exactly).

    Raises:
      ValueError: an unknown name.
      TypeError: a selection of another type.
    """
    size = len(self.names)
    if selection is None:
      chosen = _active.Selection(size=size)
    elif isinstance(selection, str):
      chosen = _active.Selection(size=size, index=self.index(selection))
    elif hasattr(selection, 'shape') and jnp.issubdtype(
        selection.dtype, jnp.integer) and len(selection.shape) == 1:
      chosen = _active.Selection(size=size, ids=selection)
    else:
      raise TypeError(
          f'{_NAME}.active takes an adapter name, (batch,) int ids or None; '
          f'got {selection!r:.80}. Pass e.g. {self.names[0]!r} or '
          f'bank.ids([{self.names[0]!r}, None]).')
    with _active.selected(chosen):
      yield

  def select(self, name: str) -> tuple[dict[str, Any],
                                       tuple[_spec.AdapterSpec, ...]]:
    """One adapter of the bank as `(lora, specs)`, to fuse or save.

    Its update equals the stacked one's (the rank is the bank's, with zero
    columns where the adapter's own rank was smaller; scale 1).
    """
    i = self.index(name)
    out: dict[str, Any] = {}
    for spec in self.specs:
      node = _adapter_tree.adapter_dict(self.lora, spec, 'AdapterBank.select')
      n = np.ndim(node['a']) - len(spec.a_shape) - 1
      picked = _adapter_tree.adapter_node(out, spec)
      picked['a'] = jnp.take(node['a'], i, axis=n)
      picked['b'] = jnp.take(node['b'], i, axis=n)
    return out, self.specs


def _padded(a: Any, b: Any, spec: _spec.AdapterSpec, rank: int):
  """A and B of `spec` with zero columns up to `rank` on the rank axis."""
  a_axes, b_axes, _ = _einsum.split_delta(spec.delta_str)
  letter = _kernel_init.rank_letter(spec.delta_str)
  n = len(spec.stack_shape)
  pad = rank - spec.rank

  def one(x, axes):
    widths = [(0, 0)] * np.ndim(x)
    widths[n + axes.index(letter)] = (0, pad)
    return jnp.pad(jnp.asarray(x, jnp.float32), widths)
  return one(a, a_axes), one(b, b_axes)
