"""Layers that compute with a quantized kernel.

`SimulateQuantized*` keep a float kernel and compute with
`simulate_quantize(kernel)` (quantization-aware training: the gradient
passes straight through to the float kernel). `Int*` read the kernel that
`peft.quantize` stored at the same path as a `QuantizedArray` and compute
with its dequantized value, so the base stays quantized in memory. Both
read the layer's call through the einsum-layer registry, so they serve
`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum` and any registered layer, and
pass the kernel axes the equation contracts to the quantizer: per-channel
methods reduce them, NF4 blocks along them (as QLoRA), whatever their
length.

Both families join the registry themselves, so LoRA can wrap them (QLoRA).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, cast

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peft._core import recorders as _recorders
from peft._linen import registry as _registry
from peft._linen import shared_scope as _shared_scope
from peft._quant import numerics as q

_BUILTIN = (nn.Dense, nn.DenseGeneral, nn.Einsum)


class QuantizedEinsumLike(_shared_scope.ScopeSharingWrapper, abc.ABC):
  """Base of the quantized wrappers: runs `einsum(eq, x, f(kernel)) + bias`.

  The kernel and bias stay at the wrapped layer's path. At init they are
  created as the wrapped layer creates them (same initializers, same rngs).
  An abstract base (linen Modules take `abc.ABC` as a mixin): a subclass
  chooses `f` by overriding `_method` and `_kernel`.
  """

  _generic_wrapper = 'the *EinsumLike wrapper'

  def __post_init__(self):
    self._method()  # Validates early.
    super().__post_init__()

  @nn.nowrap
  @abc.abstractmethod
  def _method(self) -> q.QuantizationMethod | None:
    """The validated quantization method (`None`: the stored one's).

    Raises:
      ValueError: the configured method is not one peft knows.
    """

  @nn.nowrap
  @abc.abstractmethod
  def _kernel(self, stored: Any, call: _registry.LayerCall) -> jax.Array:
    """The float kernel to compute with, from the stored param.

    Args:
      stored: the param at `call.weight_name` (an array or a
        `QuantizedArray`).
      call: the wrapped layer's call.

    Returns:
      The kernel `einsum(call.equation, x, kernel)` computes with, of shape
      `call.weight_shape`.
    """

  @nn.nowrap
  def _at(self, name: str) -> str:
    return f'{self.where}/{name}'

  @nn.nowrap
  def _axes(self, call: _registry.LayerCall) -> tuple[int, ...] | None:
    return call.equation.reduction_axes or None

  @nn.compact
  def __call__(self, *args, **kwargs) -> jax.Array:
    kind = _registry.einsum_kind_of(self.wrapped)
    if kind is None:
      raise TypeError(
          f'{type(self).__name__} cannot quantize '
          f'{type(self.wrapped).__name__} at {self.where!r}: it is not a '
          'registered einsum-like layer. Call peft.register_einsum_layer '
          'first.'
      )
    call = kind.describe(self.wrapped, args, kwargs)
    for seen in _AXES.open_dicts():
      seen[self._at(call.weight_name)] = self._axes(call)
    self._ensure_params(call, args, kwargs)
    kernel = self._kernel(self.get_variable('params', call.weight_name), call)
    for seen in _COMPUTED.open_dicts()[-1:]:
      seen[call.weight_name] = kernel
    return self._einsum(call, kernel)

  @nn.nowrap
  def _ensure_params(self, call, args, kwargs) -> None:
    """At init, creates the float params exactly as the wrapped layer does."""
    if self.has_variable('params', call.weight_name):
      return
    if not self.is_initializing():
      raise ValueError(
          f'No param {call.weight_name!r} at {self.where!r} for '
          f'{type(self).__name__}. Pass the params the model was initialized'
          ' with (quantized with peft.quantize for Int layers).'
      )
    layer = self.wrapped
    if not isinstance(layer, _BUILTIN):
      layer(*args, **kwargs)  # A custom layer creates its own params.
      return
    init, bias_init = layer.kernel_init, layer.bias_init
    if isinstance(layer, nn.DenseGeneral):  # flax inits these flattened.
      init = _as_matrix_init(init, len(np.atleast_1d(layer.features)))
      bias_init = _flat_init(bias_init)
    self.param(call.weight_name, init, call.weight_shape, layer.param_dtype)
    if layer.use_bias:
      bias_shape, _ = _bias_layout(call, 0)
      self.param('bias', bias_init, bias_shape, layer.param_dtype)

  @nn.nowrap
  def _einsum(self, call: _registry.LayerCall, kernel: jax.Array) -> jax.Array:
    layer = self.wrapped
    x = call.inputs
    if isinstance(layer, _BUILTIN):
      bias = self.get_variable('params', 'bias') if layer.use_bias else None
      x, promoted, bias = layer.promote_dtype(x, kernel, bias,
                                              dtype=layer.dtype)
      assert promoted is not None  # Only a None stays None.
      kernel = promoted
      precision = layer.precision
    else:
      bias, precision = None, None
      x, kernel = nn.dtypes.promote_dtype(x, kernel)
    y = jnp.einsum(call.equation.einsum_str, x, kernel, precision=precision)
    if bias is not None:
      _, broadcast = _bias_layout(call, y.ndim)
      y = y + jnp.reshape(bias, broadcast)
    return y


def _bias_layout(call: _registry.LayerCall, out_ndim: int):
  """The bias shape (output axes that come from the kernel, in output order)
  and its broadcast shape against an output of rank `out_ndim`."""
  eq = call.equation
  dims = dict(zip(eq.weights, call.weight_shape))
  head, dots, tail = eq.outputs.partition('...')
  n_dots = max(out_ndim - len(head) - len(tail), 0) if dots else 0
  letters = list(head) + [''] * n_dots + list(tail)
  return (tuple(dims[c] for c in letters if c in dims),
          tuple(dims.get(c, 1) for c in letters))


def _as_matrix_init(init, n_out: int):
  def matrix_init(rng, shape, dtype):
    flat = (int(np.prod(shape[:-n_out])), int(np.prod(shape[-n_out:])))
    return jnp.reshape(init(rng, flat, dtype), shape)
  return matrix_init


def _flat_init(init):
  return lambda rng, shape, dtype: jnp.reshape(
      init(rng, (int(np.prod(shape)),), dtype), shape)


class SimulateQuantizedEinsumLike(QuantizedEinsumLike):
  """Quantization-aware training for any registered einsum-like layer.

  Computes with `simulate_quantize(kernel, method, axes)`, `axes` being the
  kernel axes the layer's equation contracts (one scale per output
  channel, or NF4 blocks along them); the float kernel stays at its path
  and gets straight-through gradients. With method NONE the output equals
  the wrapped layer's.

  Example:
    >>> layer = SimulateQuantizedEinsumLike(
    ...     wrapped=nn.Einsum((4, 2, 3), 'btd,dnh->btnh'), method='int8')
    >>> x = jnp.ones((1, 5, 4))
    >>> params = layer.init(jax.random.key(0), x)['params']
    >>> jax.tree.map(jnp.shape, params)
    {'bias': (2, 3), 'kernel': (4, 2, 3)}
    >>> layer.apply({'params': params}, x).shape
    (1, 5, 2, 3)

  Attributes:
    method: a `QuantizationMethod` or its name.
  """

  method: q.QuantizationMethod | str = q.QuantizationMethod.NONE

  @nn.nowrap
  def _method(self) -> q.QuantizationMethod:
    return q.parse_method(self.method, where=type(self).__name__)

  @nn.nowrap
  def _kernel(self, stored, call):
    name = self._at(call.weight_name)
    if q.is_quantized(stored):
      raise TypeError(
          f'{type(self).__name__} at {self.where!r} found a QuantizedArray at'
          f' {name!r}; simulated quantization trains a float kernel. Use '
          'peft.quantized (Int layers) for quantized params, or dequantize.'
      )
    return q.simulate_quantize(stored, self._method(), self._axes(call),
                               where=name)


class SimulateQuantizedDense(SimulateQuantizedEinsumLike):
  """Quantization-aware `nn.Dense` (see `SimulateQuantizedEinsumLike`).

  Example:
    >>> dense = SimulateQuantizedDense(wrapped=nn.Dense(3), method='int4')
    >>> params = dense.init(jax.random.key(0), jnp.ones((1, 2)))['params']
    >>> jax.tree.map(jnp.shape, params)
    {'bias': (3,), 'kernel': (2, 3)}
  """

  _expects = nn.Dense


class SimulateQuantizedEinsum(SimulateQuantizedEinsumLike):
  """Quantization-aware `nn.Einsum` (see `SimulateQuantizedEinsumLike`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> einsum = nn.Einsum((4, 2, 3), 'btd,dnh->btnh')
    >>> layer = peft.SimulateQuantizedEinsum(wrapped=einsum, method='int4')
    >>> x = jnp.ones((1, 5, 4))
    >>> params = layer.init(jax.random.key(0), x)['params']  # float kernel
    >>> loss = lambda m: lambda p: m.apply({'params': p}, x).sum()
    >>> float(loss(layer)(params)) != float(loss(einsum)(params))  # int4
    True
    >>> grad, float_grad = (jax.grad(loss(m))(params)['kernel']
    ...                     for m in (layer, einsum))
    >>> bool(jnp.all(grad == float_grad))  # straight-through gradient
    True
  """

  _expects = nn.Einsum


class SimulateQuantizedDenseGeneral(SimulateQuantizedEinsumLike):
  """Quantization-aware `nn.DenseGeneral` (see `SimulateQuantizedEinsumLike`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> dense = nn.DenseGeneral((2, 3))
    >>> layer = peft.SimulateQuantizedDenseGeneral(wrapped=dense,
    ...                                            method='int8')
    >>> x = jnp.ones((1, 4))
    >>> params = layer.init(jax.random.key(0), x)['params']
    >>> jax.tree.map(jnp.shape, params)  # the float layer's params
    {'bias': (2, 3), 'kernel': (4, 2, 3)}
    >>> y = layer.apply({'params': params}, x)
    >>> err = float(jnp.abs(y - dense.apply({'params': params}, x)).max())
    >>> y.shape, 0 < err < 0.01  # int8 rounding
    ((1, 2, 3), True)
  """

  _expects = nn.DenseGeneral


_INT_DTYPES = {np.dtype(jnp.int4): q.QuantizationMethod.INT4,
               np.dtype(jnp.int8): q.QuantizationMethod.INT8}


class IntEinsumLike(QuantizedEinsumLike):
  """Computes with the `QuantizedArray` stored at the kernel's path.

  Params come from `peft.quantize(float_params, method=...)`; the kernel is
  dequantized inside the forward only, so it stays quantized in memory. At
  init the layer stores a freshly quantized kernel.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> dense = nn.Dense(64)
    >>> x = jnp.ones((1, 16))
    >>> params = dense.init(jax.random.key(0), x)['params']
    >>> qkernel = peft.quantize_array(params['kernel'], 'nf4')
    >>> qparams = {**params, 'kernel': qkernel}
    >>> qparams['kernel']  # One short block of 16 inputs per output.
    QuantizedArray(method=NF4, shape=(16, 64), dtype=float32, \
values=uint8[16, 32], scales=float32[64, 1])
    >>> y = peft.IntEinsumLike(wrapped=dense).apply({'params': qparams}, x)
    >>> want = x @ peft.dequantize(qparams['kernel']) + params['bias'][None]
    >>> bool(jnp.allclose(y, want, rtol=1e-6))
    True

  Attributes:
    method: the expected method; `None` accepts the stored one (and uses
      `dtype`'s, else INT4, at init).
    dtype: `jnp.int4` or `jnp.int8`, as in gemma.peft: the method when
      `method` is None.
  """

  method: q.QuantizationMethod | str | None = None
  dtype: Any = None

  @nn.nowrap
  def _method(self) -> q.QuantizationMethod | None:
    where = type(self).__name__
    if self.method is not None:
      return q.parse_method(self.method, where=where)
    if self.dtype is None:
      return None
    try:
      return _INT_DTYPES[np.dtype(self.dtype)]
    except (KeyError, TypeError):
      raise ValueError(
          f'{where} dtype must be jnp.int4 or jnp.int8; got {self.dtype!r}. '
          'Pass method=... for other quantization methods.'
      ) from None

  @nn.nowrap
  def _ensure_params(self, call, args, kwargs) -> None:
    super()._ensure_params(call, args, kwargs)
    stored = self.get_variable('params', call.weight_name)
    if self.is_initializing() and not q.is_quantized(stored):
      method = self._method() or q.QuantizationMethod.INT4
      self.put_variable('params', call.weight_name, q.quantize_array(
          stored, method, self._axes(call), where=self._at(call.weight_name)))

  @nn.nowrap
  def _kernel(self, stored, call):
    name = self._at(call.weight_name)
    if not q.is_quantized(stored):
      raise TypeError(
          f'{type(self).__name__} expects a QuantizedArray at {name!r}; got '
          f'{getattr(stored, "dtype", type(stored).__name__)}'
          f'{list(np.shape(stored))}. Quantize the params first: '
          'peft.quantize(params, method=...).'
      )
    method = self._method()
    if method is not None and stored.method is not method:
      raise ValueError(
          f'{type(self).__name__} at {self.where!r} expects {method.name} '
          f'but {name!r} was quantized with {stored.method.name}. Pass '
          f'method={stored.method.name!r}, or re-quantize the params.'
      )
    if stored.shape != call.weight_shape:
      raise ValueError(
          f'The QuantizedArray at {name!r} has shape {stored.shape} but the '
          f'layer needs {call.weight_shape}. The params belong to another '
          'model.'
      )
    return stored.dequantize()


class IntDense(IntEinsumLike):
  """`nn.Dense` over a quantized kernel (see `IntEinsumLike`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> dense = nn.Dense(3)
    >>> x = jnp.ones((1, 4))
    >>> params = dense.init(jax.random.key(0), x)['params']
    >>> qparams = peft.quantize(params, method='int8')  # the bias stays float
    >>> qparams['kernel']
    QuantizedArray(method=INT8, shape=(4, 3), dtype=float32, \
values=int8[4, 3], scales=float32[1, 3])
    >>> y = peft.IntDense(wrapped=dense).apply({'params': qparams}, x)
    >>> float(jnp.abs(y - dense.apply({'params': params}, x)).max()) < 0.01
    True
  """

  _expects = nn.Dense


class IntEinsum(IntEinsumLike):
  """`nn.Einsum` over a quantized kernel (see `IntEinsumLike`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> einsum = nn.Einsum((4, 2, 3), 'btd,dnh->btnh', use_bias=False)
    >>> layer = peft.IntEinsum(wrapped=einsum, method='nf4')
    >>> x = jnp.ones((1, 5, 4))
    >>> params = layer.init(jax.random.key(0), x)['params']  # stored as NF4
    >>> params['kernel']  # NF4 blocks run along the contracted axis d
    QuantizedArray(method=NF4, shape=(4, 2, 3), dtype=float32, \
values=uint8[4, 2, 2], scales=float32[2, 3, 1])
    >>> y = layer.apply({'params': params}, x)
    >>> float_params = {'kernel': params['kernel'].dequantize()}
    >>> bool(jnp.allclose(y, einsum.apply({'params': float_params}, x)))
    True
  """

  _expects = nn.Einsum


class IntDenseGeneral(IntEinsumLike):
  """`nn.DenseGeneral` over a quantized kernel (see `IntEinsumLike`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> dense = nn.DenseGeneral((2, 3))
    >>> x = jnp.ones((1, 4))
    >>> params = dense.init(jax.random.key(0), x)['params']
    >>> # One scale per output (2, 3): reduce the contracted axis 0 only.
    >>> qparams = peft.quantize(params, method='int8', axes={'kernel': (0,)})
    >>> qparams['kernel'].scales.shape
    (1, 2, 3)
    >>> y = peft.IntDenseGeneral(wrapped=dense).apply({'params': qparams}, x)
    >>> err = float(jnp.abs(y - dense.apply({'params': params}, x)).max())
    >>> y.shape, err < 0.01
    ((1, 2, 3), True)
  """

  _expects = nn.DenseGeneral


_SIMULATED: dict[type[nn.Module], type[SimulateQuantizedEinsumLike]] = {
    nn.Dense: SimulateQuantizedDense,
    nn.Einsum: SimulateQuantizedEinsum,
    nn.DenseGeneral: SimulateQuantizedDenseGeneral}
_INT: dict[type[nn.Module], type[IntEinsumLike]] = {
    nn.Dense: IntDense, nn.Einsum: IntEinsum,
    nn.DenseGeneral: IntDenseGeneral}


def wrapper_for(module: nn.Module, *, simulate: bool, method,
                **kwargs) -> QuantizedEinsumLike:
  """The quantized wrapper of `module` (the typed one for built-ins)."""
  table = _SIMULATED if simulate else _INT
  generic = SimulateQuantizedEinsumLike if simulate else IntEinsumLike
  return table.get(type(module), generic)(wrapped=module, method=method,
                                          **kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _WrapperKind(_registry.EinsumLayerKind):
  """Describes a quantized wrapper's call as its wrapped layer's call.

  The wrapper shares the wrapped layer's scope and computes the same
  einsum, so both answers are the wrapped layer's kind's: LoRA can wrap a
  quantized layer (QLoRA) like the layer itself.

  Example:
    >>> import jax.numpy as jnp
    >>> dense = nn.Dense(3)
    >>> layer = SimulateQuantizedDense(wrapped=dense, method='int8')
    >>> kind = _registry.einsum_kind_of(layer)
    >>> kind.weight_name_of(layer)
    'kernel'
    >>> call = kind.describe(layer, (jnp.ones((1, 2)),), {})
    >>> call.equation.einsum_str, call.weight_shape
    ('...i,io->...o', (2, 3))
  """

  @staticmethod
  def _inner(module: nn.Module) -> tuple[_registry.EinsumLayerKind,
                                         nn.Module]:
    """The wrapped layer's kind and the wrapped layer."""
    wrapper = cast(QuantizedEinsumLike, module)
    inner = _registry.einsum_kind_of(wrapper.wrapped)
    if inner is None:
      raise TypeError(
          f'{type(wrapper.wrapped).__name__} at {wrapper.where!r} is not a '
          'registered einsum-like layer. Call peft.register_einsum_layer '
          'first.'
      )
    return inner, wrapper.wrapped

  def weight_name_of(self, module: nn.Module) -> str:
    inner, wrapped = self._inner(module)
    return inner.weight_name_of(wrapped)

  def describe(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> _registry.LayerCall:
    inner, wrapped = self._inner(module)
    return inner.describe(wrapped, args, kwargs)


# Registered here, so LoRA can wrap the quantized wrappers.
_registry.register_einsum_kind(_WrapperKind(module_type=QuantizedEinsumLike))


# Open recorders in this thread/task: kernel path -> reduced axes.
_AXES: _recorders.Recorders[tuple[int, ...] | None] = _recorders.Recorders(
    'peft_quantized_kernels')
# Open recorders: weight name -> the float kernel a wrapper computed with.
_COMPUTED: _recorders.Recorders[jax.Array] = _recorders.Recorders(
    'peft_computed_kernels')


def recording_kernels() -> contextlib.AbstractContextManager[
    dict[str, tuple[int, ...] | None]]:
  """Collects `{kernel path: reduced axes}` of the wrappers run inside."""
  return _AXES.open()


def computed_kernels() -> contextlib.AbstractContextManager[
    dict[str, jax.Array]]:
  """Collects `{weight name: float kernel}` of the wrappers run inside.

  The kernel is the one the wrapper's einsum used: the dequantized
  `QuantizedArray`, or `simulate_quantize(kernel)`. DoRA over a quantized
  base (QDoRA) opens one around its base call, so its norm and its
  magnitude's init use the kernel the base computes with, without a second
  dequantization. Only the innermost open dict gets the reports: it belongs
  to the layer whose call is running.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import peft
    >>> layer = SimulateQuantizedDense(wrapped=nn.Dense(2), method='int8')
    >>> x = jnp.ones((1, 3))
    >>> params = layer.init(jax.random.key(0), x)
    >>> with computed_kernels() as seen:
    ...   _ = layer.apply(params, x)
    >>> want = peft.simulate_quantize(params['params']['kernel'], 'int8', 0)
    >>> bool(jnp.all(seen['kernel'] == want))
    True
  """
  return _COMPUTED.open()
