"""What surgery records about each adapted layer.

An `AdapterSpec` is the contract between the LoRA wrappers (which write one
per adapted kernel when they run), fuse/unfuse (which need the delta
equation and the scale) and adapter checkpoints (which store the specs as
metadata so a file can be checked against a model before it is applied).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import contextvars
import dataclasses
import math
from typing import Any


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
class AdapterSpec:
  """One adapted kernel: where it lives and how its delta is formed.

  The base kernel is at `params[*path][weight_name]` and its adapter at
  `params[*path][adapter_name] == {'a': A, 'b': B}`. The kernel's update is
  `scale * einsum(delta_str, A, B)`, shaped exactly like the kernel.

  Attributes:
    path: scope path of the adapted module, e.g. `('block', 'attn', 'q')`.
    layer_type: `'Dense'`, `'DenseGeneral'`, `'Einsum'`, `'Conv'`, `'Embed'`
      or the class name of a registered custom layer.
    weight_name: the base kernel's param name (`'kernel'`, `'embedding'`...).
    adapter_name: the adapter's sub-tree name (`'lora'` or `'lora_<w>'`).
    weight_shape: the base kernel's shape.
    a_shape: shape of A.
    b_shape: shape of B.
    delta_str: `a,b->weights` equation of the delta.
    einsum_str: the layer's forward equation, when it has one.
    rank: LoRA rank.
    alpha: LoRA alpha (`None` means `rank`).
    use_rslora: whether the scale is `alpha / sqrt(rank)`.
    stack_shape: leading axes shared by the kernel, A and B when the layer
      is stacked by a lifted transform (`nn.scan`/`nn.vmap` over layers
      with `variable_axes={'params': 0}`); `()` for a plain layer. Surgery
      records the per-layer shapes; fuse and adapter files read the stack
      from the arrays.
  """

  path: tuple[str, ...]
  layer_type: str
  weight_name: str
  adapter_name: str
  weight_shape: tuple[int, ...]
  a_shape: tuple[int, ...]
  b_shape: tuple[int, ...]
  delta_str: str
  einsum_str: str | None = None
  rank: int
  alpha: float | None = None
  use_rslora: bool = False
  stack_shape: tuple[int, ...] = ()

  @property
  def scale(self) -> float:
    return lora_scale(rank=self.rank, alpha=self.alpha,
                      use_rslora=self.use_rslora)

  @property
  def key(self) -> str:
    """`'path/to/module/adapter_name'`, unique per adapter in a model."""
    return '/'.join((*self.path, self.adapter_name))

  @property
  def adapter_path(self) -> tuple[str, ...]:
    """Keys from the params root to the adapter's `{'a', 'b'}` dict.

    `adapter_name` is usually one key beside the kernel (`'lora'`); under a
    gemma-style wrapper that nests its adapter in a submodule it is a
    relative path such as `'_LoRAEinsum_0/lora'`.
    """
    return (*self.path, *self.adapter_name.split('/'))

  def unstacked(self) -> AdapterSpec:
    """This spec without `stack_shape` (what surgery records per layer)."""
    return dataclasses.replace(self, stack_shape=())

  def to_json(self) -> dict[str, Any]:
    """A JSON-serialisable dict (lists for tuples)."""
    d = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> AdapterSpec:
    """Inverse of `to_json`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(
          f'Adapter metadata has unknown fields {sorted(unknown)}; expected '
          f'{sorted(fields)}. The file was written by a newer peft or is '
          'corrupt.'
      )
    tupled = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**tupled)


# Open recorders in the current thread/task; wrappers report into all of them.
_RECORDERS: contextvars.ContextVar[tuple[dict[str, AdapterSpec], ...]] = (
    contextvars.ContextVar('peft_adapter_recorders', default=()))


@contextlib.contextmanager
def recording_adapters() -> Iterator[dict[str, AdapterSpec]]:
  """Collects the `AdapterSpec` of every LoRA layer that runs inside.

  Example:
    >>> with recording_adapters() as seen:
    ...   pass  # run a LoRA-wrapped model here
    >>> seen
    {}

  Yields:
    A dict `spec.key -> spec`, filled as adapted layers run.
  """
  seen: dict[str, AdapterSpec] = {}
  token = _RECORDERS.set(_RECORDERS.get() + (seen,))
  try:
    yield seen
  finally:
    _RECORDERS.reset(token)


def record_adapter(spec: AdapterSpec) -> None:
  """Reports `spec` to every open recorder; a conflicting re-report fails."""
  for seen in _RECORDERS.get():
    previous = seen.setdefault(spec.key, spec)
    if previous != spec:
      raise ValueError(
          f'The adapter at {spec.key!r} was called with two different '
          f'layouts: {previous} and then {spec}. A LoRA layer must be called '
          'with one einsum equation and kernel shape; use separate layers.'
      )
