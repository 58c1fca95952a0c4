"""LoRA versions of the flax.nnx layers (Linear, LinearGeneral, Einsum, Conv,
Embed).

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) learns a low-rank
update `W + scale * einsum(delta_str, A, B)` of a frozen kernel `W`; the
adapter holding A and B is `_nnx_adapter.LoRAAdapter`.

Each LoRA layer here subclasses the nnx layer it adapts (`LoRALinear` is an
`nnx.Linear`), keeps that layer's variables under their own names and adds
one attribute, `lora`, holding A and B as `LoRAParam`s. So a plain layer's
state loads into its LoRA version, `nnx.state(model, LoRAParam)` holds the
adapters alone, and their paths (`'<layer path>/lora/a'`) are those of the
linen adapters and adapter checkpoints. B starts at zero, so at init a LoRA
layer's output equals the plain layer's output bit for bit.

A and B come from the one einsum parser (`_einsum`): every adapted kernel is
the weight of an equation `inputs,weights->outputs` (Conv: the einsum of a
window patch; Embed: a one-hot matmul), which fixes the shapes of A and B
and the delta equation used by fuse. With `use_dora=True` (DoRA: Liu et al.
2024) the adapter holds a magnitude `m` too and the output becomes
`bias + m / ||V|| * (x @ W + scale * x @ A @ B)` (`peft._core.dora`); at
init it equals the plain layer's to float rounding. Embed refuses DoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
import typing
from typing import Any

from flax import nnx
from flax.typing import Dtype
import jax
import jax.numpy as jnp

from peft._core import active_adapter as _active
from peft._core import einsum as _einsum
from peft._core import options as _options
from peft._core import spec as _spec
from peft.nnx import _adapter as _nnx_adapter
from peft.nnx._adapter import LoRAAdapter
from peft.nnx._adapter import retype

_LINEAR = _nnx_adapter.LINEAR
# The LoRA options a LoRA layer takes beside the nnx layer's own keywords:
# all but `dtype`, which is the nnx layer's (compute) dtype; A and B take
# the layer's `param_dtype`.
_LAYER_OPTIONS = tuple(n for n in _options.LoRAOptions.names()
                       if n != 'dtype')


def _layout(delta_str: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Which kernel axis each axis of A and of B is (-1: the rank axis)."""
  a_axes, b_axes, weights = _einsum.split_delta(delta_str)
  return (tuple(weights.find(c) for c in a_axes),
          tuple(weights.find(c) for c in b_axes))


if typing.TYPE_CHECKING:

  class _NnxLayer(nnx.Module):
    """What `_LoRALayer` uses of the nnx layer class it is mixed into."""

    dtype: Dtype | None
    param_dtype: Dtype

    def __init__(self, *args: Any, rngs: nnx.Rngs, **kwargs: Any) -> None:
      ...

else:
  _NnxLayer = object  # At run time the nnx layer comes second in the MRO.


class _LoRALayer(_NnxLayer):
  """What the LoRA layers share: the `lora` adapter beside the kernel.

  A subclass sets `base_type` (the nnx layer it adapts), `weight_name` and
  `_equation` (the einsum its kernel is the weight of), and lists that nnx
  layer after this class in its bases. The adapter is the only attribute it
  adds to the base layer.
  """

  base_type: type[nnx.Module] = nnx.Module
  weight_name = 'kernel'
  # Whether `_equation` is the layer's actual forward equation.
  records_einsum = False
  supports_dora = True

  def __init__(self, *args, rngs: nnx.Rngs, **kwargs):
    """Builds the nnx layer from `*args, **kwargs`, then its adapter.

    A and B take the layer's `param_dtype`; the update is computed in its
    `dtype`.

    Args:
      *args: the nnx layer's positional arguments.
      rngs: keys for the layer, A, B and dropout.
      **kwargs: `rank=` and the other LoRA options (alpha, use_rslora,
        dropout, deterministic, a_init, b_init: see `peft.LoRAOptions`;
        dropout is off after `model.eval()`), and the nnx layer's keyword
        arguments (dtype, param_dtype, ...).
    """
    lora = {k: kwargs.pop(k) for k in _LAYER_OPTIONS if k in kwargs}
    where = type(self).__name__
    options = _nnx_adapter.nnx_options(where, **lora)
    super().__init__(*args, rngs=rngs, **kwargs)  # `base_type`'s.
    self._check_base(where)
    self._add_lora(options, compute_dtype=None, einsum_str=None, rngs=rngs,
                   where=where)

  @classmethod
  def from_module(cls, module: nnx.Module, *, rngs: nnx.Rngs | None,
                  dtype: Dtype | None = None,
                  param_dtype: Dtype | None = None,
                  einsum_str: str | None = None, **options: Any) -> Any:
    """A LoRA version of `module` that shares its variables.

    The result holds `module`'s own Variable objects (the kernel is not
    copied) plus a fresh adapter; `module` itself is left unchanged.

    Example:
      >>> linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> layer = LoRALinear.from_module(linear, rank=1, alpha=2.0,
      ...                                rngs=nnx.Rngs(1))
      >>> layer.kernel is linear.kernel, layer.lora.scale
      (True, 2.0)

    Args:
      module: a layer of exactly this class's `base_type`.
      rngs: keys for the initializers (and dropout).
      dtype: compute dtype of the update (`None`: the layer's `dtype`).
      param_dtype: dtype of A and B (`None`: the layer's `param_dtype`).
      einsum_str: `nnx.Einsum` only: the equation the layer is called
        with, when it was built without one.
      **options: `rank=` and the other LoRA options (alpha, use_rslora,
        dropout, deterministic, a_init, b_init; see `peft.LoRAOptions`).
        Dropout starts on unless `deterministic=True`; `model.eval()`
        turns it off.

    Returns:
      The LoRA layer.

    Raises:
      TypeError: `module` is not exactly a `base_type`.
      ValueError: the layer cannot be adapted (see the subclass) or an
        option is out of range.
    """
    where = type(module).__name__
    return cls.adapt(
        module, _nnx_adapter.nnx_options(where, param_dtype=param_dtype,
                                         **options),
        where=where, compute_dtype=dtype, einsum_str=einsum_str, rngs=rngs)

  @classmethod
  def adapt(cls, module: nnx.Module, options: _options.LoRAOptions, *,
            where: str, rngs: nnx.Rngs | None,
            compute_dtype: Dtype | None = None,
            einsum_str: str | None = None) -> Any:
    """A LoRA version of `module` with `options`; what surgery calls.

    `from_module` with the options given as one `LoRAOptions`, and `where`
    (the layer's model path) named in errors.

    Example:
      >>> import peft
      >>> linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> layer = LoRALinear.adapt(linear, peft.LoRAOptions(rank=2),
      ...                          where='mlp/up', rngs=nnx.Rngs(1))
      >>> layer.lora.a.shape, layer.lora.options.rank
      ((2, 2), 2)

    Args:
      module: a layer of exactly this class's `base_type`.
      options: the LoRA options; `dtype=None` means the layer's
        `param_dtype`.
      where: the layer's path (or name), quoted in errors.
      rngs: keys for the initializers (and dropout).
      compute_dtype: compute dtype of the update (`None`: the layer's).
      einsum_str: as in `from_module`.

    Raises:
      TypeError, ValueError: as `from_module`.
    """
    if type(module) is not cls.base_type:
      raise TypeError(
          f'{cls.__name__} adapts nnx.{cls.base_type.__name__}; got '
          f'{type(module).__name__} at {where!r}. Pick the LoRA class of '
          'that layer type (peft.nnx.lora_class_for).'
      )
    layer = retype(module, cls)
    layer._check_base(where)
    layer._add_lora(options, compute_dtype=compute_dtype,
                    einsum_str=einsum_str, rngs=rngs, where=where)
    return layer

  def _check_base(self, where: str) -> None:
    """Raises if this layer's configuration cannot take an adapter."""

  def _equation(self, einsum_str: str | None,
                where: str) -> _einsum.EinsumEquation:
    raise NotImplementedError

  def kernel_variable(self) -> nnx.Variable:
    """The adapted kernel's Variable (`kernel`, or `embedding` for Embed).

    Example:
      >>> layer = LoRALinear(2, 3, rank=1, rngs=nnx.Rngs(0))
      >>> layer.kernel_variable() is layer.kernel
      True
    """
    return getattr(self, self.weight_name)

  def _add_lora(self, options: _options.LoRAOptions, *, compute_dtype,
                einsum_str, rngs, where) -> None:
    eq = self._equation(einsum_str, where)
    stack, weight_shape = _split_stack(self.kernel_variable().shape, eq)
    plan = eq.lora_plan(weight_shape=weight_shape, rank=options.rank,
                        where=where)
    if options.dtype is None:
      options = options.replace(dtype=self.param_dtype)
    if options.use_dora and not self.supports_dora:
      raise ValueError(
          f'DoRA (use_dora=True) does not support the nnx.'
          f'{self.base_type.__name__} at {where!r}: a table lookup has no '
          'contracted axis to take the per-feature norm over. Exclude it '
          'from the DoRA rule, or give it a rule with use_dora=False.'
      )
    self.lora = LoRAAdapter(
        plan.a_shape, plan.b_shape, plan.delta_str, options=options,
        einsum_str=eq.einsum_str if self.records_einsum else None,
        dtype=self.dtype if compute_dtype is None else compute_dtype,
        where=where, stack_shape=stack, rngs=rngs,
        kernel=self.kernel_variable()[...] if options.use_dora else None,
        magnitude_axes=eq.magnitude_axes)

  def adapter_spec(self, path: Sequence[Any] = ()) -> _spec.AdapterSpec:
    """The `AdapterSpec` of this layer's adapter at model path `path`.

    Layers stacked by `nnx.vmap` (run under `nnx.scan`) carry the stack in
    `stack_shape`; the other shapes are per layer.
    """
    lora = self.lora
    stack = lora.stack_shape
    n = len(stack)
    return _spec.AdapterSpec(
        path=tuple(str(p) for p in path),
        layer_type=self.base_type.__name__, weight_name=self.weight_name,
        adapter_name='lora',
        weight_shape=tuple(self.kernel_variable().shape[n:]),
        a_shape=tuple(lora.a.shape[n:]), b_shape=tuple(lora.b.shape[n:]),
        delta_str=lora.delta_str, einsum_str=lora.einsum_str,
        rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora,
        use_dora=lora.options.use_dora, magnitude_axes=lora.magnitude_axes,
        stack_shape=stack)

  def _add_update(self, y: jax.Array, inputs: jax.Array,
                  eq: _einsum.EinsumEquation) -> jax.Array:
    """`y + scale * einsum(inputs, A, B)` for the layer's equation `eq`."""
    plan = eq.lora_plan(weight_shape=self.kernel_variable().shape,
                        rank=self.lora.rank)
    if _layout(plan.delta_str) != _layout(self.lora.delta_str):
      raise ValueError(
          f'{type(self).__name__} was adapted for einsum '
          f'{self.lora.einsum_str!r} (delta {self.lora.delta_str!r}) but '
          f'is called with {eq.einsum_str!r}, which splits the kernel '
          'differently. Call it with one equation, or adapt it with '
          'from_module(..., einsum_str=<the equation you call>).'
      )
    update = self.lora.apply_plan(plan, inputs,
                                  precision=getattr(self, 'precision', None))
    return self._dora_or_lora(y, eq, update)

  def _dora_or_lora(self, y: jax.Array, eq: _einsum.EinsumEquation,
                    update: jax.Array) -> jax.Array:
    """`y + update`, or with DoRA `y` rescaled (see `LoRAAdapter`).

    Raises:
      ValueError: DoRA on a layer whose bias is not over the output
        features (DoRA adds the bias after the rescaling).
    """
    if not self.lora.options.use_dora:
      return y + update.astype(y.dtype)
    kernel = self.kernel_variable()[...]
    bias = getattr(self, 'bias', None)
    bias = None if bias is None else bias[...]
    want = tuple(kernel.shape[i] for i in eq.magnitude_axes)
    if bias is not None and tuple(bias.shape) != want:
      raise ValueError(
          f'DoRA on {type(self).__name__}: the bias has shape '
          f'{tuple(bias.shape)}, but DoRA adds the bias after rescaling and '
          f'needs it over the output features {want} (kernel axes '
          f'{eq.magnitude_axes} of {eq.einsum_str!r}). Use use_dora=False '
          'for this layer.'
      )
    return y + self.lora.dora_correction(eq, kernel, y, bias, update)


def _split_stack(kernel_shape, eq: _einsum.EinsumEquation):
  """`(stack axes, per-layer shape)` of a kernel, from its einsum.

  A layer built under `nnx.vmap` (to be run by `nnx.scan`) holds a kernel
  with leading layer axes beyond the equation's weight axes.
  """
  n = len(kernel_shape) - len(eq.weights)
  if n <= 0:
    return (), tuple(kernel_shape)
  return tuple(kernel_shape[:n]), tuple(kernel_shape[n:])


class LoRALinear(_LoRALayer, nnx.Linear):
  """`nnx.Linear` plus `scale * x @ A @ B`; state compatible with Linear.

  Takes `nnx.Linear`'s arguments plus `rank=` and the LoRA options (see
  `__init__`); `from_module` adapts an existing layer. A and B use the
  layer's `dtype` (compute) and `param_dtype`. At init the output equals
  the plain layer's output exactly, and a plain `nnx.Linear` state (same
  `kernel`/`bias` names) loads into it with `nnx.update`.

  Example:
    >>> layer = LoRALinear(2, 3, rank=1, rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer)))
    {'bias': (3,), 'kernel': (2, 3), 'lora': {'a': (2, 1), 'b': (1, 3)}}
    >>> plain = nnx.Linear(2, 3, rngs=nnx.Rngs(1))
    >>> nnx.update(layer, nnx.state(plain))
    >>> x = jnp.ones((1, 2))
    >>> bool((layer(x) == plain(x)).all())
    True
  """

  base_type = nnx.Linear
  records_einsum = True

  def _equation(self, einsum_str, where):
    del einsum_str, where
    return _LINEAR

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding=out_sharding)
    return self._add_update(y, inputs, _LINEAR)


class LoRALinearGeneral(_LoRALayer, nnx.LinearGeneral):
  """`nnx.LinearGeneral` (several axes, batch axes) plus its LoRA update.

  A holds the batch and contracted kernel axes then the rank; B the rank
  then the output feature axes. Takes `nnx.LinearGeneral`'s arguments plus
  `rank=` and the LoRA options; `from_module` adapts an existing layer.

  Example:
    >>> layer = nnx.eval_shape(lambda: LoRALinearGeneral(
    ...     (2, 3), (4, 5), axis=(1, -1), rank=2, rngs=nnx.Rngs(0)))
    >>> layer.lora.a.shape, layer.lora.b.shape, layer.lora.delta_str
    ((2, 3, 2), (2, 4, 5), 'abr,rcd->abcd')
  """

  base_type = nnx.LinearGeneral

  def _call_equation(self, input_shape: Sequence[int]):
    eq, _ = _einsum.dense_general_call(
        input_shape=input_shape, axis=self.axis,
        batch_dims=tuple(self.batch_axis), features=self.out_features)
    return eq

  def _equation(self, einsum_str, where):
    del einsum_str, where
    # The split of the kernel does not depend on where the axes sit in the
    # input, so plan for inputs (*batch, *in_features).
    n_batch = len(self.batch_axis)
    shape = (*self.batch_axis.values(), *self.in_features)
    eq, _ = _einsum.dense_general_call(
        input_shape=shape,
        axis=tuple(range(n_batch, n_batch + len(self.in_features))),
        batch_dims=tuple(range(n_batch)), features=self.out_features)
    return eq

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding=out_sharding)
    return self._add_update(y, inputs, self._call_equation(inputs.shape))


class LoRAEinsum(_LoRALayer, nnx.Einsum):
  """`nnx.Einsum` plus `scale * einsum('inputs,a,b->outputs', x, A, B)`.

  A holds the kernel axes shared with the inputs then the rank, B the rank
  then the other kernel axes. Takes `nnx.Einsum`'s arguments plus `rank=`
  and the LoRA options; `from_module` adapts an existing layer, and takes
  the equation it is called with when that differs from its `einsum_str`.

  Example:
    >>> layer = nnx.eval_shape(lambda: LoRAEinsum(
    ...     'btd,ndh->btnh', (2, 8, 4), rank=3, rngs=nnx.Rngs(0)))
    >>> layer.lora.a.shape, layer.lora.b.shape, layer.lora.delta_str
    ((8, 3), (3, 2, 4), 'dr,rnh->ndh')
  """

  base_type = nnx.Einsum
  records_einsum = True

  def _equation(self, einsum_str, where):
    einsum_str = einsum_str or self.einsum_str
    if einsum_str is None:
      raise ValueError(
          f'The nnx.Einsum at {where!r} has no einsum_str, so the shapes of '
          'A and B are unknown. Pass the equation it is called with: '
          "LoRAEinsum.from_module(layer, einsum_str='...', ...), or exclude "
          'it from the LoRA targets.'
      )
    return _einsum.EinsumEquation.parse(einsum_str, where=where)

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
               out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, einsum_str, out_sharding=out_sharding)
    eq = _einsum.EinsumEquation.parse(einsum_str or self.einsum_str)
    return self._add_update(y, inputs, eq)


class LoRAConv(_LoRALayer, nnx.Conv):
  """`nnx.Conv` plus `scale * B(A(x))`: a rank-channel conv A, then 1x1 B.

  A has the kernel's window, strides, padding and dilations (flax's own
  conv code runs it) and `rank` output channels; B maps them to the output
  channels. The delta `einsum('...ir,ro->...io', A, B)` is a kernel of the
  adapted shape. Grouped and masked convolutions are not supported. Takes
  `nnx.Conv`'s arguments plus `rank=` and the LoRA options; `from_module`
  adapts an existing layer.

  Example:
    >>> layer = nnx.eval_shape(lambda: LoRAConv(5, 4, (3, 3), rank=2,
    ...                                         rngs=nnx.Rngs(0)))
    >>> layer.lora.a.shape, layer.lora.b.shape, layer.lora.delta_str
    ((3, 3, 5, 2), (2, 4), 'abir,ro->abio')
  """

  base_type = nnx.Conv

  def _check_base(self, where):
    if self.feature_group_count != 1 or self.mask is not None:
      raise ValueError(
          f'LoRAConv cannot adapt the conv at {where!r}: it is grouped '
          f'(feature_group_count={self.feature_group_count!r}) or masked '
          f'(mask is {"set" if self.mask is not None else "None"}). '
          'Exclude it from the LoRA targets.'
      )

  def _equation(self, einsum_str, where):
    del einsum_str
    return _einsum.conv_equation(len(self.kernel_size), where=where)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding=out_sharding)

    # A runs through nnx.Conv's own code (padding modes, batch axes) on a
    # shallow copy of this layer that holds A as its kernel. Split here and
    # merged in `conv_update`, so that it also runs under the per-row
    # `jax.vmap` of a bank (a module may not change inside a transform).
    rank_conv = retype(self, nnx.Conv)
    rank_conv.kernel = nnx.Param(jnp.zeros(
        (*self.kernel_size, self.in_features, self.lora.rank)))
    rank_conv.kernel_shape = (*self.kernel_size, self.in_features,
                              self.lora.rank)
    rank_conv.bias = nnx.data(None)
    rank_conv.use_bias = False
    rank_conv.out_features = self.lora.rank
    graph, state = nnx.split(rank_conv)

    def conv_update(x, a, b):
      conv = nnx.merge(graph, state)
      conv.kernel = nnx.Param(a)
      conv.dtype = a.dtype
      return jnp.einsum('...r,ro->...o', conv(x), b,
                        precision=self.precision)
    update = self.lora.selected(conv_update, inputs)
    return self._dora_or_lora(
        y, _einsum.conv_equation(len(self.kernel_size)), update)


class LoRAEmbed(_LoRALayer, nnx.Embed):
  """`nnx.Embed` plus `scale * A[ids] @ B`; `attend` is adapted too.

  A tied output layer (`embed.attend(q)`) sees the same updated table:
  `attend(q) = q @ (E + scale * A @ B).T`. Dropout applies to the looked-up
  rows of A (token ids cannot be dropped out), not in `attend`. Takes
  `nnx.Embed`'s arguments plus `rank=` and the LoRA options; `from_module`
  adapts an existing layer.

  Example:
    >>> layer = nnx.eval_shape(lambda: LoRAEmbed(10, 4, rank=2,
    ...                                          rngs=nnx.Rngs(0)))
    >>> layer.lora.a.shape, layer.lora.b.shape
    ((10, 2), (2, 4))
  """

  base_type = nnx.Embed
  weight_name = 'embedding'
  supports_dora = False

  def _equation(self, einsum_str, where):
    del einsum_str, where
    return _einsum.EMBED

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding=out_sharding)
    if self.num_embeddings == 1:  # nnx.Embed broadcasts its single row.
      inputs = jnp.zeros_like(inputs)
    drop = self.lora.dropout if not _active.per_row() else None

    def lookup(ids, a, b):
      rows = jnp.take(a, ids, axis=0)
      return (rows if drop is None else drop(rows)) @ b
    update = self.lora.selected(lookup, inputs, ids=True)
    return y + update.astype(y.dtype)

  def attend(self, query: jax.Array, out_sharding=None) -> jax.Array:
    y = super().attend(query, out_sharding=out_sharding)
    update = self.lora.selected(lambda q, a, b: (q @ b.T) @ a.T, query,
                                drop=False)
    return y + update.astype(y.dtype)


LORA_LAYERS: tuple[type[_LoRALayer], ...] = (
    LoRALinear, LoRALinearGeneral, LoRAEinsum, LoRAConv, LoRAEmbed)
# Adapted when no target is given (Conv and Embed only when named).
EINSUM_LIKE = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def lora_class_for(module: object) -> type[_LoRALayer] | None:
  """The LoRA class adapting `module`'s exact type, or None.

  Subclasses of the nnx layers are not adapted: their own code would be
  lost.

  Example:
    >>> lora_class_for(nnx.Linear(2, 3, rngs=nnx.Rngs(0))).__name__
    'LoRALinear'
  """
  for cls in LORA_LAYERS:
    if type(module) is cls.base_type:
      return cls
  return None


def is_lora_layer(module: object) -> bool:
  """Whether `module` is one of the LoRA layers above.

  Example:
    >>> from flax import nnx
    >>> import peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> peft.nnx.is_lora_layer(model.layers[0])
    False
    >>> _ = peft.nnx.apply_lora(model, rank=1, rngs=nnx.Rngs(1))
    >>> layer = model.layers[0]  # a LoRALinear, still an nnx.Linear
    >>> peft.nnx.is_lora_layer(layer), isinstance(layer, nnx.Linear)
    (True, True)
  """
  return isinstance(module, _LoRALayer)
