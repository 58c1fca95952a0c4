"""What surgery records about each adapted layer.

An `AdapterSpec` is the contract between the LoRA wrappers (which write one
per adapted kernel when they run), fuse/unfuse (which need the delta
equation and the scale) and adapter checkpoints (which store the specs as
metadata so a file can be checked against a model before it is applied).
A spec is validated when it is built, so one read from a file, written by
hand or recorded by surgery holds values fuse can use (LoRA: Hu et al.
2021; rsLoRA: Kalajdzievski 2023).
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import re
import string
from typing import Any

from peft._core import einsum as _einsum
from peft._core import options as _options
from peft._core import params as _params
from peft._core import recorders as _recorders

# Re-exported: the scale is derived where the options are declared.
lora_scale = _options.lora_scale


# linen and nnx name the same layers differently, and a file names a layer
# as the framework that wrote it did: compare kinds, not class names.
_LAYER_KINDS = {'Dense': 'Linear', 'DenseGeneral': 'LinearGeneral'}


def layer_kind(layer_type: str) -> str:
  """The nnx name of a layer type, so linen and nnx specs compare equal.

  Example:
    >>> layer_kind('Dense'), layer_kind('DenseGeneral'), layer_kind('Embed')
    ('Linear', 'LinearGeneral', 'Embed')
  """
  return _LAYER_KINDS.get(layer_type, layer_type)


def canonical_equation(equation: str) -> str:
  """`equation` with its letters renamed in order of first use.

  Equations that differ only in the letters each writer picked have equal
  canonical forms.

  Example:
    >>> canonical_equation('cr,rde->cde'), canonical_equation('ar,rbc->abc')
    ('ab,bcd->acd', 'ab,bcd->acd')
  """
  names: dict[str, str] = {}
  return re.sub(
      '[A-Za-z]',
      lambda m: names.setdefault(m[0], string.ascii_letters[len(names)]),
      ''.join(equation.split()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterSpec:
  """One adapted kernel: where it lives and how its delta is formed.

  The base kernel is at `params[*path][weight_name]` and its adapter at
  `params[*path][adapter_name] == {'a': A, 'b': B}` (`{'a', 'b', 'm'}` for
  DoRA). The kernel's update is `scale * einsum(delta_str, A, B)`, shaped
  exactly like the kernel; DoRA then rescales the updated kernel by
  `m / ||W + update||` along `magnitude_axes`.

  Every field is checked when a spec is built (by surgery, `from_json` or
  by hand, `dataclasses.replace` included): alpha is None or finite and
  positive, rank a positive int equal to A's and B's rank axis, shapes
  tuples of positive ints, `delta_str` gives the kernel's shape from A and
  B, and `einsum_str` fits the kernel and splits it as `delta_str` does.
  So no spec can make fuse write a NaN, infinite or negated delta.

  Example:
    >>> import dataclasses
    >>> import peft
    >>> spec = peft.AdapterSpec(
    ...     path=('block', 'up'), layer_type='Dense', weight_name='kernel',
    ...     adapter_name='lora', weight_shape=(4, 8), a_shape=(4, 2),
    ...     b_shape=(2, 8), delta_str='ir,ro->io', rank=2, alpha=4.0)
    >>> spec.key, spec.scale  # scale = alpha / rank
    ('block/up/lora', 2.0)
    >>> peft.AdapterSpec.from_json(spec.to_json()) == spec  # file metadata
    True
    >>> dataclasses.replace(spec, rank=3)  # A and B have rank 2
    Traceback (most recent call last):
    ValueError: Adapter spec 'block/up/lora' ... but the kernel is (4, 8) and
    rank=3. ...

  Attributes:
    path: scope path of the adapted module, e.g. `('block', 'attn', 'q')`.
    layer_type: `'Dense'`, `'DenseGeneral'`, `'Einsum'`, `'Conv'`, `'Embed'`
      (their nnx names `'Linear'` and `'LinearGeneral'` match the first two;
      see `layer_kind`) or the class name of a registered custom layer.
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
    use_dora: whether the adapter is DoRA (Liu et al. 2024): its sub-tree
      holds a magnitude `'m'` beside A and B, and the adapted kernel is
      `m * V / ||V||` with `V = W + scale * delta` (see `peft._core.dora`).
    magnitude_axes: DoRA only: the kernel axes the magnitude keeps (those
      the layer's output keeps; the norm is over the others), ascending.
      `()` for LoRA.
    stack_shape: leading axes shared by the kernel, A and B when the layer
      is stacked by a lifted transform (`nn.scan`/`nn.vmap` over layers
      with `variable_axes={'params': 0}`); `()` for a plain layer. Surgery
      records the per-layer shapes; fuse and adapter files read the stack
      from the arrays.

  Raises:
    TypeError: the path, a name, a shape or an equation has the wrong
      type (a list path, a str shape).
    ValueError: a value is out of range or the shapes and equations
      disagree, or rank, alpha or use_rslora is bad in any way (the shared
      LoRA option check); the message names the field, the value and the
      adapter.
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
  use_dora: bool = False
  magnitude_axes: tuple[int, ...] = ()
  stack_shape: tuple[int, ...] = ()

  def __post_init__(self):
    # Specs also come from files and from users; a bad value would become a
    # NaN kernel, a negated delta or a misplaced one in fuse, so none is
    # built. Values are normalised (numpy ints to int, alpha to float) so a
    # spec is hashable and JSON-serialisable.
    path = _check_path(self.path)
    where = '/'.join((*path, str(self.adapter_name)))
    _check_name('layer_type', self.layer_type, where, "layer_type='Dense'")
    _check_name('weight_name', self.weight_name, where, "weight_name='kernel'")
    _check_adapter_name(self.adapter_name, where)
    shapes = {name: _check_shape(name, getattr(self, name), where,
                                 allow_empty=name == 'stack_shape')
              for name in ('weight_shape', 'a_shape', 'b_shape',
                           'stack_shape')}
    options = _options.check_lora_options(
        where, rank=self.rank, alpha=self.alpha, use_rslora=self.use_rslora,
        use_dora=self.use_dora)
    magnitude = _check_magnitude_axes(self, where, options['use_dora'],
                                      shapes['weight_shape'])
    for name, value in {'path': path, **shapes, **options,
                        'magnitude_axes': magnitude}.items():
      object.__setattr__(self, name, value)
    _check_layout(self, where)

  @property
  def options(self) -> _options.LoRAOptions:
    """The LoRA options this spec records (rank, alpha, use_rslora,
    use_dora).

    The spec keeps them as flat fields because they are the adapter
    file's JSON schema; the others (dropout, dtype, initializers) are
    training choices a file does not record, so they are the defaults.
    """
    return _options.LoRAOptions(rank=self.rank, alpha=self.alpha,
                                use_rslora=self.use_rslora,
                                use_dora=self.use_dora)

  @property
  def magnitude_shape(self) -> tuple[int, ...]:
    """Shape of the DoRA magnitude `m` (per layer): the kernel's shape
    along `magnitude_axes`; `()` for LoRA."""
    return tuple(self.weight_shape[i] for i in self.magnitude_axes)

  @property
  def scale(self) -> float:
    return self.options.scale

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

  def differences(self, other: AdapterSpec) -> dict[str, tuple[Any, Any]]:
    """The fields in which `other` describes another adapter than this one.

    linen and nnx record one adapter with different names, so `layer_type`
    is compared by `layer_kind`, `delta_str` and `einsum_str` up to the
    letters they use (`canonical_equation`), and `einsum_str` only when
    both record one (nnx's `LinearGeneral` records none; the delta equation
    and shapes already fix where A and B go). The rest must be equal.

    Example:
      >>> linen = AdapterSpec(
      ...     path=('up',), layer_type='Dense', weight_name='kernel',
      ...     adapter_name='lora', weight_shape=(3, 2), a_shape=(3, 1),
      ...     b_shape=(1, 2), delta_str='ir,ro->io', rank=1)
      >>> nnx = dataclasses.replace(linen, layer_type='Linear',
      ...                           delta_str='ar,rb->ab')
      >>> linen.differences(nnx)
      {}
      >>> linen.differences(dataclasses.replace(nnx, alpha=2.0))
      {'alpha': (None, 2.0)}

    Returns:
      `{field: (this spec's value, other's value)}`; empty when they match.
    """
    def same(name, mine, theirs):
      if name == 'layer_type':
        return layer_kind(mine) == layer_kind(theirs)
      if name == 'einsum_str' and (mine is None or theirs is None):
        return True
      if name in ('delta_str', 'einsum_str'):
        return canonical_equation(mine) == canonical_equation(theirs)
      return mine == theirs

    return {f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if not same(f.name, getattr(self, f.name),
                        getattr(other, f.name))}

  def to_json(self) -> dict[str, Any]:
    """A JSON-serialisable dict (lists for tuples)."""
    d = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> AdapterSpec:
    """Inverse of `to_json`; the spec is validated as when it is built."""
    if not isinstance(d, dict):
      raise TypeError(
          f'Adapter metadata must be a dict of AdapterSpec fields; got '
          f'{d!r:.80}. The file is corrupt or was not written by peft.'
      )
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(
          f'Adapter metadata has unknown fields {sorted(unknown)}; expected '
          f'{sorted(fields)}. The file was written by a newer peft or is '
          'corrupt.'
      )
    tupled: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**tupled)


_SPEC_FIX = 'The spec is corrupt; rebuild it with surgery (report.specs).'


def _check_path(path: Any) -> tuple[str, ...]:
  if not isinstance(path, tuple) or not all(
      isinstance(p, str) and p for p in path):
    raise TypeError(
        f'AdapterSpec path must be a tuple of non-empty str (module names); '
        f"got {path!r}. Pass e.g. path=('block', 'attn', 'q')."
    )
  if any('/' in p for p in path):
    # Keys, tensor names and files join the path with '/'.
    raise ValueError(
        f'AdapterSpec module path {path!r} holds a "/", which adapter keys '
        'and files use to join paths. Rename the module.'
    )
  return path


def _check_name(name: str, value: Any, where: str, fix: str) -> None:
  if not isinstance(value, str) or not value:
    raise TypeError(
        f'AdapterSpec {name} must be a non-empty str; got {value!r} at '
        f'{where!r}. Pass e.g. {fix}.'
    )


def _check_adapter_name(value: Any, where: str) -> None:
  _check_name('adapter_name', value, where, "adapter_name='lora'")
  parts = value.split('/')
  # split/merge/fuse find adapters by their branch name: any other name
  # would be taken for a base param (a file could overwrite the kernel).
  if not all(parts) or not _params.is_adapter_key(parts[-1]):
    raise ValueError(
        f"AdapterSpec adapter_name must end in an adapter branch ('lora' or "
        f"'lora_<weight>', below submodules as in '_LoRAEinsum_0/lora'); got "
        f'{value!r} at {where!r}. {_SPEC_FIX}'
    )


def _check_shape(name: str, value: Any, where: str, *,
                 allow_empty: bool) -> tuple[int, ...]:
  ints = isinstance(value, tuple) and all(
      isinstance(d, numbers.Integral) and not isinstance(d, bool)
      for d in value)
  if not ints or (not value and not allow_empty) or min(value, default=1) < 1:
    raise (ValueError if ints else TypeError)(
        f'AdapterSpec {name} must be a tuple of positive ints; got {value!r} '
        f'at {where!r}. {_SPEC_FIX}'
    )
  return tuple(int(d) for d in value)


# Layouts (equations, shapes, rank) that passed `_check_layout`. The checks
# read only these values (`where` only names the spec in errors), and
# surgery records the same few layouts for every layer at every trace, so
# each is parsed and planned once per process, not once per layer call.
_VALID_LAYOUTS: set[tuple[Any, ...]] = set()
_MAX_VALID_LAYOUTS = 4096


def _check_layout(spec: AdapterSpec, where: str) -> None:
  key = (spec.delta_str, spec.einsum_str, spec.weight_shape, spec.a_shape,
         spec.b_shape, spec.rank, spec.use_dora, spec.magnitude_axes)
  if key in _VALID_LAYOUTS:
    return
  _check_delta(spec, where)
  _check_einsum(spec, where)
  if len(_VALID_LAYOUTS) < _MAX_VALID_LAYOUTS:
    _VALID_LAYOUTS.add(key)


def _check_delta(spec: AdapterSpec, where: str) -> None:
  """`einsum(delta_str, A, B)` is a rank-`rank` delta shaped like the kernel.

  Checked without jax: the letters of `delta_str` give every axis a size.
  """
  delta_str, a_shape, b_shape = spec.delta_str, spec.a_shape, spec.b_shape
  try:
    eq = _einsum.EinsumEquation.parse(delta_str, where=where)
  except (TypeError, ValueError) as e:
    raise type(e)(
        f'AdapterSpec delta_str must be an equation a,b->kernel; got '
        f'{delta_str!r} at {where!r} ({e}). {_SPEC_FIX}'
    ) from e
  a, b, kernel = eq.inputs, eq.weights, eq.outputs
  rank_axes = sorted((set(a) | set(b)) - set(kernel))
  if ('...' in a + kernel or len(set(a)) != len(a) or len(rank_axes) != 1
      or rank_axes[0] not in a or rank_axes[0] not in b):
    raise ValueError(
        f'AdapterSpec delta_str {delta_str!r} at {where!r} must name each '
        'axis of A, B and the kernel once, with exactly one axis (the rank) '
        f'in both A and B and not in the kernel. {_SPEC_FIX}'
    )
  at = (f'Adapter spec {where!r} (delta_str {delta_str!r}): A {a_shape} and '
        f'B {b_shape}')
  sizes: dict[str, int] = {}
  for axes, shape in ((a, a_shape), (b, b_shape)):
    if len(axes) != len(shape):
      raise ValueError(
          f'{at} do not fit the delta equation: {axes!r} names '
          f'{len(axes)} axes. {_SPEC_FIX}'
      )
    for c, d in zip(axes, shape):
      if sizes.setdefault(c, d) != d:
        raise ValueError(
            f'{at} do not fit the delta equation: axis {c!r} is both '
            f'{sizes[c]} and {d}. {_SPEC_FIX}'
        )
  delta = tuple(sizes[c] for c in kernel)
  if delta != spec.weight_shape or sizes[rank_axes[0]] != spec.rank:
    raise ValueError(
        f'{at} give a delta of shape {delta} and rank axes '
        f'[{sizes[rank_axes[0]]}], but the kernel is {spec.weight_shape} and '
        f'rank={spec.rank}. {_SPEC_FIX}'
    )


def _check_magnitude_axes(spec: AdapterSpec, where: str, use_dora: bool,
                          weight_shape: tuple[int, ...]) -> tuple[int, ...]:
  """`magnitude_axes` as ascending kernel axes; `()` unless DoRA."""
  value = spec.magnitude_axes
  ints = isinstance(value, tuple) and all(
      isinstance(d, numbers.Integral) and not isinstance(d, bool)
      for d in value)
  axes = tuple(int(d) for d in value) if ints else None
  if axes is None or (not use_dora and axes) or (use_dora and (
      list(axes) != sorted(set(axes))
      or not all(0 <= d < len(weight_shape) for d in axes))):
    want = (f'ascending kernel axes in [0, {len(weight_shape)})' if use_dora
            else '() (the adapter is not DoRA)')
    raise (ValueError if ints else TypeError)(
        f'AdapterSpec magnitude_axes must be {want}; got {value!r} at '
        f'{where!r}. {_SPEC_FIX}'
    )
  return axes


def _check_einsum(spec: AdapterSpec, where: str) -> None:
  """`einsum_str` fits the kernel and splits it as `delta_str` does."""
  if spec.einsum_str is None:
    return
  try:
    eq = _einsum.EinsumEquation.parse(spec.einsum_str, where=where)
    eq.check_weight_shape(spec.weight_shape, where=where)
  except (TypeError, ValueError) as e:
    raise type(e)(
        f'AdapterSpec einsum_str must be None or the layer\'s equation '
        f'inputs,weights->outputs; got {spec.einsum_str!r} at {where!r} '
        f'({e}). {_SPEC_FIX}'
    ) from e
  plan = eq.lora_plan(weight_shape=spec.weight_shape, rank=spec.rank,
                      where=where)
  if canonical_equation(plan.delta_str) != canonical_equation(spec.delta_str):
    raise ValueError(
        f'AdapterSpec einsum_str {spec.einsum_str!r} at {where!r} splits the '
        f'kernel as {plan.delta_str!r}, but delta_str is '
        f'{spec.delta_str!r}. {_SPEC_FIX}'
    )
  if spec.use_dora and spec.magnitude_axes != eq.magnitude_axes:
    raise ValueError(
        f'AdapterSpec magnitude_axes {spec.magnitude_axes!r} at {where!r} '
        f'are not the kernel axes the output of einsum_str '
        f'{spec.einsum_str!r} keeps, {eq.magnitude_axes!r}. {_SPEC_FIX}'
    )


# Open recorders in the current thread/task; wrappers report into all of them.
_RECORDERS: _recorders.Recorders[AdapterSpec] = _recorders.Recorders(
    'peft_adapter_recorders')


def recording_adapters() -> contextlib.AbstractContextManager[
    dict[str, AdapterSpec]]:
  """Collects the `AdapterSpec` of every LoRA layer that runs inside.

  Example:
    >>> with recording_adapters() as seen:
    ...   pass  # run a LoRA-wrapped model here
    >>> seen
    {}

  Returns:
    A context manager yielding a dict `spec.key -> spec`, filled as adapted
    layers run.
  """
  return _RECORDERS.open()


def record_adapter(spec: AdapterSpec) -> None:
  """Reports `spec` to every open recorder; a conflicting re-report fails."""
  for seen in _RECORDERS.open_dicts():
    previous = seen.setdefault(spec.key, spec)
    if previous != spec:
      raise ValueError(
          f'The adapter at {spec.key!r} was called with two different '
          f'layouts: {previous} and then {spec}. A LoRA layer must be called '
          'with one einsum equation and kernel shape; use separate layers.'
      )
