"""LoRA wrappers: `wrapped(x) + scale * adapter(x)`.

Each wrapper shares its wrapped layer's scope (see `ScopeSharingWrapper`), so
the frozen kernel stays at its original path and the adapter sits beside it:
`{'kernel': W, 'bias': b, 'lora': {'a': A, 'b': B}}`. B starts at zero, so at
init the wrapper's output equals the wrapped layer's output bit for bit.
Every call records an `AdapterSpec` (path, shapes, delta equation, scale) for
fuse/unfuse and adapter checkpoints. With `use_dora=True` (DoRA: Liu et al.
2024) the adapter also holds a magnitude `'m'` and the output becomes
`bias + m / ||V|| * (x @ W + scale * x @ A @ B)` (see `peft._core.dora`);
at init it equals the wrapped layer's to float rounding. Over a quantized
base (QDoRA) `W` is the kernel the base computes with (dequantized).

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

import contextvars
from typing import Any, ClassVar, TypeVar

from flax import linen as nn
from flax.typing import Array
import numpy as np

from peft._core import einsum as _einsum
from peft._core import spec as _spec
from peft._linen import lora_adapters as _lora_adapters
from peft._linen import lora_fields as _lora_fields
from peft._linen import registry as _registry
from peft._linen import rules as _rules
from peft._linen import shared_scope as _shared_scope
from peft._quant import layers as _quant_layers

_A = TypeVar('_A', bound=_lora_adapters.LoRAAdapterBase)

# ids of the layers a LoRA wrapper is calling right now (this thread/task).
_WRAPPED_BY_LORA: contextvars.ContextVar[frozenset[int]] = (
    contextvars.ContextVar('peft_wrapped_by_lora', default=frozenset()))


def is_being_adapted(module: nn.Module) -> bool:
  """Whether a LoRA wrapper is calling `module` or a wrapper of it.

  Then the layer already has an adapter; nested surgery must not add one.
  """
  marked = _WRAPPED_BY_LORA.get()
  return any(id(m) in marked for m in _rules.wrapped_chain(module))


class LoRAWrapper(_shared_scope.ScopeSharingWrapper, _lora_fields.LoRAFields):
  """What all LoRA wrappers share: `wrapped` and the LoRA option fields.

  The options (rank, alpha, use_rslora, dropout, deterministic, dtype,
  a_init, b_init) are `peft.LoRAOptions`' and are checked when the wrapper
  is built; `.options` holds them checked, `from_options(options,
  wrapped=...)` builds a wrapper from them. `alpha=None` means `rank`
  (scale 1, as gemma.peft).

  peft's wrappers record their adapters' `AdapterSpec`s themselves
  (`records_adapter_specs`); adapters called by other wrappers record their
  own.
  """

  records_adapter_specs: ClassVar[bool] = True

  @nn.nowrap
  def _call_wrapped(self, method: str, *args, **kwargs):
    """Calls the wrapped layer; surgery inside must not adapt it again."""
    chain = _rules.wrapped_chain(self.wrapped)
    token = _WRAPPED_BY_LORA.set(
        _WRAPPED_BY_LORA.get() | {id(m) for m in chain})
    try:
      return getattr(self.wrapped, method)(*args, **kwargs)
    finally:
      _WRAPPED_BY_LORA.reset(token)

  @nn.nowrap
  def _adapter(self, adapter_type: type[_A], *, compute_dtype,
               weight_name: str, **fields: Any) -> _A:
    """An adapter of `adapter_type` with this wrapper's options."""
    return adapter_type.from_options(
        self.options, compute_dtype=compute_dtype,
        kernel_partitioning=self._kernel_partitioning(weight_name), **fields)

  @nn.nowrap
  def _kernel_partitioning(self, weight_name: str) -> nn.Partitioned | None:
    """The kernel's sharding metadata, so A and B can inherit it."""
    if not self.has_variable('params', weight_name):
      return None
    kernel = self.get_variable('params', weight_name)
    if isinstance(kernel, nn.Partitioned):
      return kernel.replace(value=None)
    return None

  @nn.nowrap
  def _call_base(self, *args, **kwargs) -> tuple[Array, dict[str, Array]]:
    """The wrapped layer's output, and the float kernels it computed with.

    The kernels (weight name -> array) come from a quantized base
    (`peft.quantized`, `peft.simulate_quantization` or a QLoRA layer): the
    dequantized or simulated kernel its einsum used. A float base reports
    none; its kernel is the param.
    """
    with _quant_layers.computed_kernels() as computed:
      y = self._call_wrapped('__call__', *args, **kwargs)
    return y, computed

  @nn.nowrap
  def _dora_base(self, equation: _einsum.EinsumEquation, weight_name: str,
                 y: Array, computed: dict[str, Array]
                 ) -> _lora_adapters.DoRABase | None:
    """What the DoRA adapter needs of this call (None without DoRA).

    The kernel is the one the base computed with: over a quantized base
    (QDoRA) the dequantized (or simulated) kernel the base reported in
    `computed`, so `||V||` and the magnitude's init see what the layer
    computes, and nothing is dequantized twice.

    Raises:
      ValueError: no kernel, or a bias that is not shaped like the
        kernel's output-side axes.
    """
    if not self.options.use_dora:
      return None
    kernel = (nn.meta.unbox(self.get_variable('params', weight_name))
              if self.has_variable('params', weight_name) else None)
    if kernel is not None and weight_name in computed and (
        np.shape(computed[weight_name]) == np.shape(kernel)):
      kernel = computed[weight_name]
    if kernel is None:
      raise ValueError(
          f'DoRA at {self.where!r} found no kernel {weight_name!r} in the '
          f'scope of {type(self.wrapped).__name__}. Register the layer with '
          'its kernel\'s param name (peft.register_einsum_layer).'
      )
    axes = equation.magnitude_axes
    want = tuple(np.shape(kernel)[i] for i in axes)
    bias = None
    if self.has_variable('params', 'bias'):
      bias = nn.meta.unbox(self.get_variable('params', 'bias'))
      if tuple(np.shape(bias)) != want:
        raise ValueError(
            f'DoRA at {self.where!r}: the bias of '
            f'{type(self.wrapped).__name__} has shape '
            f'{tuple(np.shape(bias))}, but DoRA adds the bias after '
            f'rescaling and needs it over the output features {want} '
            f'(kernel axes {axes} of {equation.einsum_str!r}). Use LoRA '
            '(use_dora=False) for this layer.'
        )
    return _lora_adapters.DoRABase(equation=equation, kernel=kernel,
                                   output=y, bias=bias)

  @nn.nowrap
  def _record(self, *, layer_type: str, weight_name: str, adapter_name: str,
              weight_shape, a_shape, b_shape, delta_str: str,
              equation: _einsum.EinsumEquation,
              einsum_str: str | None = None) -> None:
    dora = self.options.use_dora
    _spec.record_adapter(_spec.AdapterSpec(
        path=tuple(self.path), layer_type=layer_type,
        weight_name=weight_name, adapter_name=adapter_name,
        weight_shape=tuple(weight_shape), a_shape=tuple(a_shape),
        b_shape=tuple(b_shape), delta_str=delta_str, einsum_str=einsum_str,
        rank=self.options.rank, alpha=self.options.alpha,
        use_rslora=self.options.use_rslora, use_dora=dora,
        magnitude_axes=equation.magnitude_axes if dora else ()))


class LoRAEinsumLike(LoRAWrapper):
  """LoRA for any einsum-like layer known to the layer registry.

  Works for `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum` and any layer added
  with `peft.register_einsum_layer` (e.g. a model's own `Einsum` called as
  `layer(eqn, x)`); the call signature is the wrapped layer's.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> dense = nn.Dense(4)
    >>> lora = LoRAEinsumLike(rank=2, wrapped=dense)
    >>> x = jnp.ones((1, 3))
    >>> params = lora.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, params['params'])
    {'bias': (4,), 'kernel': (3, 4), 'lora': {'a': (3, 2), 'b': (2, 4)}}
  """

  _generic_wrapper = 'LoRAEinsumLike'

  @nn.compact
  def __call__(self, *args, **kwargs) -> Array:
    kind = _registry.einsum_kind_of(self.wrapped)
    if kind is None:
      raise TypeError(
          f'{type(self).__name__} cannot adapt {type(self.wrapped).__name__} '
          f'at {self.where!r}: it is not a registered einsum-like layer. '
          'Call peft.register_einsum_layer(YourLayer, weight_name=...) first.'
      )
    y, computed = self._call_base(*args, **kwargs)
    call = kind.describe(self.wrapped, args, kwargs)
    # One parse (in `describe`) and one plan per call, passed on.
    plan = call.equation.lora_plan(weight_shape=call.weight_shape,
                                   rank=self.options.rank, where=self.where)
    adapter = self._adapter(
        _lora_adapters.LoRAEinsumAdapter, name=call.adapter_name,
        compute_dtype=y.dtype, weight_name=call.weight_name,
        einsum_str=call.equation.einsum_str, shape=call.weight_shape)
    update = adapter(call.inputs, plan=plan, dora=self._dora_base(
        call.equation, call.weight_name, y, computed))
    self._record(
        layer_type=type(self.wrapped).__name__, weight_name=call.weight_name,
        adapter_name=call.adapter_name, weight_shape=call.weight_shape,
        a_shape=plan.a_shape, b_shape=plan.b_shape,
        delta_str=plan.delta_str, equation=call.equation,
        einsum_str=call.equation.einsum_str)
    return y + update


class LoRADense(LoRAEinsumLike):
  """Wraps `nn.Dense`: `dense(x) + scale * x @ A @ B`.

  At init the output equals `dense(x)` exactly (B is zero).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> lora = LoRADense(rank=2, wrapped=nn.Dense(4))
    >>> params = lora.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> jax.tree.map(jnp.shape, params['params']['lora'])
    {'a': (3, 2), 'b': (2, 4)}
  """

  _expects = nn.Dense


class LoRAEinsum(LoRAEinsumLike):
  """Wraps `nn.Einsum`: `einsum(x) + scale * einsum('inputs,a,b->outputs')`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = nn.Einsum(shape=(8, 2, 4), einsum_str='BTD,DNH->BTNH')
    >>> lora = LoRAEinsum(rank=3, wrapped=layer)
    >>> params = lora.init(jax.random.key(0), jnp.ones((1, 5, 8)))
    >>> jax.tree.map(jnp.shape, params['params']['lora'])
    {'a': (8, 3), 'b': (3, 2, 4)}
  """

  _expects = nn.Einsum


class LoRADenseGeneral(LoRAEinsumLike):
  """Wraps `nn.DenseGeneral` (several axes, batch_dims).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = nn.DenseGeneral(features=(2, 4), axis=-1)
    >>> lora = LoRADenseGeneral(rank=3, wrapped=layer)
    >>> params = lora.init(jax.random.key(0), jnp.ones((1, 5, 8)))
    >>> jax.tree.map(jnp.shape, params['params']['lora'])
    {'a': (8, 3), 'b': (3, 2, 4)}
  """

  _expects = nn.DenseGeneral


class LoRAConv(LoRAWrapper):
  """Wraps `nn.Conv`: `conv(x) + scale * B(A(x))`.

  A is a conv with `rank` output channels and the wrapped kernel's window,
  strides, padding and dilations; B is a 1x1 projection to the output
  channels, so the delta is a kernel of the wrapped shape. Grouped
  convolutions are not supported.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> lora = LoRAConv(rank=2, wrapped=nn.Conv(4, kernel_size=(3, 3)))
    >>> params = lora.init(jax.random.key(0), jnp.ones((1, 8, 8, 5)))
    >>> jax.tree.map(jnp.shape, params['params']['lora'])
    {'a': (3, 3, 5, 2), 'b': (2, 4)}
  """

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    conv = self.wrapped
    if conv.feature_group_count != 1:
      raise ValueError(
          f'LoRAConv cannot adapt the grouped conv at {self.where!r} '
          f'(feature_group_count={conv.feature_group_count!r}). Exclude it '
          'from the LoRA targets.'
      )
    y, computed = self._call_base(inputs)
    adapter = self._adapter(
        _lora_adapters.LoRAConvAdapter, name='lora', compute_dtype=y.dtype,
        weight_name='kernel', features=conv.features,
        kernel_size=conv.kernel_size, strides=conv.strides,
        padding=conv.padding, input_dilation=conv.input_dilation,
        kernel_dilation=conv.kernel_dilation)
    window = _lora_adapters.as_tuple(conv.kernel_size)
    # One plan per call, for the adapter and the spec.
    plan = _lora_adapters.conv_plan(window, inputs.shape[-1], conv.features,
                                    self.options.rank, where=self.where)
    equation = _einsum.conv_equation(len(window), where=self.where)
    update = adapter(inputs, plan=plan, dora=self._dora_base(
        equation, 'kernel', y, computed))
    self._record(
        layer_type='Conv', weight_name='kernel', adapter_name='lora',
        weight_shape=(*window, inputs.shape[-1], conv.features),
        a_shape=plan.a_shape, b_shape=plan.b_shape,
        delta_str=plan.delta_str, equation=equation)
    return y + update


class LoRAEmbed(LoRAWrapper):
  """Wraps `nn.Embed`: lookup of A rows then `@ B`, added to the embedding.

  `attend` is adapted too, so a tied output layer (`embed.attend(x)`) sees
  the same updated table: `attend(q) = q @ (E + scale * A @ B).T`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> lora = LoRAEmbed(rank=2, wrapped=nn.Embed(10, 4))
    >>> params = lora.init(jax.random.key(0), jnp.array([1, 2]))
    >>> jax.tree.map(jnp.shape, params['params'])
    {'embedding': (10, 4), 'lora': {'a': (10, 2), 'b': (2, 4)}}
  """

  def setup(self):
    embed = self.wrapped
    if self.options.use_dora:
      raise ValueError(
          f'DoRA (use_dora=True) does not support the Embed at '
          f'{self.where!r}: a table lookup has no contracted axis to take '
          'the per-feature norm over (and attend would need the transposed '
          'one). Exclude the Embed from the DoRA rule, or give it a LoRA '
          'rule with use_dora=False.'
      )
    _ = embed.embedding  # runs the Embed's setup, so its param exists
    # Named by the attribute (setup), so no `name=`.
    self.lora = self._adapter(
        _lora_adapters.LoRAEmbedAdapter, compute_dtype=embed.dtype,
        weight_name='embedding', num_embeddings=embed.num_embeddings,
        features=embed.features)

  @nn.nowrap
  def _record_embed(self) -> None:
    embed = self.wrapped
    plan = self.lora.plan()
    self._record(
        layer_type='Embed', weight_name='embedding', adapter_name='lora',
        weight_shape=(embed.num_embeddings, embed.features),
        a_shape=plan.a_shape, b_shape=plan.b_shape,
        delta_str=plan.delta_str, equation=_einsum.EMBED)

  def __call__(self, inputs: Array) -> Array:
    y = self._call_wrapped('__call__', inputs)
    self._record_embed()
    return y + self.lora(inputs).astype(y.dtype)

  def attend(self, query: Array) -> Array:
    y = self._call_wrapped('attend', query)
    self._record_embed()
    return y + self.lora.attend(query).astype(y.dtype)


def wrapper_type_for(module: nn.Module) -> type[LoRAWrapper] | None:
  """The LoRA wrapper class that adapts `module`, or None.

  Which layers can be adapted is `rules.is_adaptable`'s answer; this only
  picks the wrapper: Conv and Embed have their own, the rest are
  einsum-like.
  """
  if not _rules.is_adaptable(module):
    return None
  if isinstance(module, nn.Embed):
    return LoRAEmbed
  if isinstance(module, nn.Conv):
    return LoRAConv
  return LoRAEinsumLike
