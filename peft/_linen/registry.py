"""Which layer types compute `einsum(eq, x, W)`, and how to read their calls.

Surgery, fuse and quantization never look at layer names: they ask this
registry how a module type computes its output. `nn.Dense`, `nn.DenseGeneral`
and `nn.Einsum` are registered here; a model's own Einsum-like layer joins
with `register_einsum_layer`, after which LoRA, quantization and fuse treat it
like the built-ins without any edit to the model.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
import dataclasses
import inspect
from typing import Any, cast

from flax import linen as nn
import jax

from peft._core import einsum as _einsum
from peft._core import params as _params

_WeightName = str | Callable[[nn.Module], str]
# `(module, args, kwargs) -> (einsum_str, inputs)`.
_ReadCall = Callable[[Any, tuple[Any, ...], dict[str, Any]],
                     tuple[str, jax.Array]]
# `(module, equation, inputs) -> kernel shape`.
_WeightShape = Callable[[Any, _einsum.EinsumEquation, jax.Array],
                        Sequence[int]]


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of an einsum-like layer, seen as `einsum(equation, x, W)`.

  Attributes:
    equation: the validated forward equation.
    inputs: the array `x` the weight is contracted with.
    weight_name: the kernel's param name in the layer's scope.
    weight_shape: the kernel's shape.
    adapter_name: the name of the LoRA sub-tree placed beside the kernel.
  """

  equation: _einsum.EinsumEquation
  inputs: jax.Array
  weight_name: str
  weight_shape: tuple[int, ...]
  adapter_name: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class EinsumLayerKind(abc.ABC):
  """How one module type computes `einsum(eq, x, W)`: the registry's protocol.

  Surgery, quantization and fuse see a registered layer only through its
  kind. A kind answers two questions, and its answers agree: for any call,
  `describe(module, args, kwargs).weight_name == weight_name_of(module)`.
  Subclasses are frozen keyword-only dataclasses; register one with
  `register_einsum_kind` (plain layer classes: `register_einsum_layer`).

  Example:
    >>> import jax.numpy as jnp
    >>> class Scaled(nn.Module):  # computes 2 * x @ kernel
    ...   features: int
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     w = self.param('kernel', nn.initializers.ones,
    ...                    (x.shape[-1], self.features))
    ...     return 2 * x @ w
    >>> @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class ScaledKind(EinsumLayerKind):
    ...   def weight_name_of(self, module):
    ...     return 'kernel'
    ...   def describe(self, module, args, kwargs):
    ...     (x,) = args
    ...     return LayerCall(
    ...         equation=_einsum.EinsumEquation.parse('bi,io->bo'), inputs=x,
    ...         weight_name=self.weight_name_of(module),
    ...         weight_shape=(x.shape[-1], module.features),
    ...         adapter_name='lora')
    >>> kind = ScaledKind(module_type=Scaled)  # register_einsum_kind(kind)
    >>> call = kind.describe(Scaled(3), (jnp.ones((1, 2)),), {})
    >>> call.equation.einsum_str, call.weight_name, call.weight_shape
    ('bi,io->bo', 'kernel', (2, 3))

  Attributes:
    module_type: the registered class (subclasses match too).
  """

  module_type: type[nn.Module]

  @abc.abstractmethod
  def weight_name_of(self, module: nn.Module) -> str:
    """The param name of `module`'s kernel in its scope.

    Args:
      module: an instance of `module_type` (or of a subclass).

    Returns:
      The name `describe` reports as `LayerCall.weight_name` for `module`.
    """

  @abc.abstractmethod
  def describe(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> LayerCall:
    """Reads one call `module(*args, **kwargs)` as an einsum.

    Args:
      module: the called layer, an instance of `module_type`.
      args: the call's positional arguments.
      kwargs: the call's keyword arguments.

    Returns:
      The call's equation, inputs, kernel name and shape and adapter name;
      its `weight_name` is `weight_name_of(module)`.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class _KernelKind(EinsumLayerKind):
  """A kind whose kernel name is fixed or a function of the module.

  Holds the one adapter naming rule: a configurable name means several such
  layers may share one scope, so each adapter is named `lora_<weight name>`
  to keep them apart; a fixed name gives the adapter `lora`.

  Attributes:
    weight_name: the kernel's param name, or a function of the module for
      layers whose param name is configurable.
  """

  weight_name: _WeightName = 'kernel'

  def weight_name_of(self, module: nn.Module) -> str:
    if callable(self.weight_name):
      return self.weight_name(module)
    return self.weight_name

  def _layer_call(self, module: nn.Module,
                  equation: _einsum.EinsumEquation, inputs: jax.Array,
                  weight_shape: Sequence[int]) -> LayerCall:
    """The `LayerCall` of `module` once its equation and shape are known."""
    shape = equation.check_weight_shape(
        weight_shape, where=_params.module_path(module))
    weight_name = self.weight_name_of(module)
    adapter_name = (f'lora_{weight_name}' if callable(self.weight_name)
                    else 'lora')
    return LayerCall(equation=equation, inputs=inputs,
                     weight_name=weight_name, weight_shape=shape,
                     adapter_name=adapter_name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CallReadingKind(_KernelKind):
  """A kind that reads the equation string and the inputs from each call.

  `nn.Dense`, `nn.Einsum` and every `register_einsum_layer` class use it:
  `describe` reads `(einsum_str, inputs)` with `read_call`, parses the
  string once and asks `weight_shape` for the kernel's shape.

  Example:
    >>> import jax.numpy as jnp
    >>> kind = einsum_kind_of(nn.Einsum((4, 3), 'bd,dh->bh'))
    >>> type(kind).__name__, kind.weight_name_of(nn.Einsum((4, 3)))
    ('CallReadingKind', 'kernel')
    >>> call = kind.describe(nn.Einsum((4, 3), 'bd,dh->bh'),
    ...                      (jnp.ones((2, 4)),), {})
    >>> call.equation.einsum_str, call.weight_shape, call.adapter_name
    ('bd,dh->bh', (4, 3), 'lora')

  Attributes:
    weight_name: the kernel's param name, or a function of the module for
      layers whose param name is configurable (the adapter is then named
      `lora_<weight name>`, else `lora`).
    read_call: `(module, args, kwargs) -> (einsum_str, inputs)`.
    weight_shape: `(module, equation, inputs) -> kernel shape`.
  """

  read_call: _ReadCall
  weight_shape: _WeightShape

  def describe(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> LayerCall:
    einsum_str, inputs = self.read_call(module, args, kwargs)
    equation = _einsum.EinsumEquation.parse(
        einsum_str, where=_params.module_path(module))
    return self._layer_call(module, equation, inputs,
                            self.weight_shape(module, equation, inputs))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseGeneralKind(_KernelKind):
  """The kind of `nn.DenseGeneral`: its equation follows from the call.

  `describe` derives the equation and the kernel shape together from the
  input's shape and the layer's `axis`, `batch_dims` and `features`, with
  one `dense_general_call` and no string to parse.

  Example:
    >>> import jax.numpy as jnp
    >>> layer = nn.DenseGeneral((2, 3), axis=-1)
    >>> call = einsum_kind_of(layer).describe(layer, (jnp.ones((5, 4)),), {})
    >>> call.equation.einsum_str, call.weight_name, call.weight_shape
    ('ab,bcd->acd', 'kernel', (4, 2, 3))
  """

  def describe(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> LayerCall:
    layer = cast(nn.DenseGeneral, module)
    inputs = _first_arg(layer, args, kwargs)
    equation, shape = _einsum.dense_general_call(
        input_shape=inputs.shape, axis=_as_tuple(layer.axis),
        batch_dims=_as_tuple(layer.batch_dims),
        features=_as_tuple(layer.features))
    return self._layer_call(layer, equation, inputs, shape)


_REGISTRY: dict[type[nn.Module], EinsumLayerKind] = {}


def einsum_kind_of(module: object) -> EinsumLayerKind | None:
  """The registered kind for `module`'s type (closest base class wins)."""
  for cls in type(module).__mro__:
    if cls in _REGISTRY:
      return _REGISTRY[cls]
  return None


def registered_einsum_types() -> tuple[type[nn.Module], ...]:
  """All module types registered as einsum-like, built-ins first."""
  return tuple(_REGISTRY)


def register_einsum_kind(kind: EinsumLayerKind) -> EinsumLayerKind:
  """Registers a ready-made `EinsumLayerKind` (e.g. for a wrapper type).

  Registering a kind for a type already registered replaces the old kind.

  Args:
    kind: the kind; `einsum_kind_of` returns it for instances of
      `kind.module_type` and of its subclasses (unless a closer base has a
      kind of its own).

  Returns:
    `kind`.

  Raises:
    TypeError: `kind` is not an `EinsumLayerKind`.
  """
  if not isinstance(kind, EinsumLayerKind):
    raise TypeError(
        f'register_einsum_kind expects an EinsumLayerKind; got {kind!r}. '
        'For a plain layer class use register_einsum_layer.'
    )
  _REGISTRY[kind.module_type] = kind
  return kind


def _bound_arguments(module: nn.Module, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> dict[str, Any]:
  sig = inspect.signature(type(module).__call__)
  bound = sig.bind(module, *args, **kwargs)
  bound.apply_defaults()
  return bound.arguments


def register_einsum_layer(
    module_type: type[nn.Module],
    *,
    weight_name: _WeightName = 'w',
    einsum_str_arg: str | None = None,
    inputs_arg: str | None = None,
    shape_attr: str = 'shape',
) -> CallReadingKind:
  """Registers a model's own Einsum-like layer for LoRA and quantization.

  After registration, surgery adapts calls of `module_type` like
  `nn.Einsum`: the kernel stays at its path and the adapter sits beside it.
  When `weight_name` is a function of the module (for layers whose param
  name is configurable, e.g. two layers sharing one scope), each adapter is
  named `lora_<weight name>` so they stay apart; otherwise it is `lora`.

  Example:
    >>> import jax.numpy as jnp
    >>> class MyEinsum(nn.Module):
    ...   shape: tuple[int, ...]
    ...   @nn.compact
    ...   def __call__(self, eqn, x):
    ...     w = self.param('w', nn.initializers.normal(), self.shape)
    ...     return jnp.einsum(eqn, x, w)
    >>> kind = register_einsum_layer(MyEinsum, weight_name='w')
    >>> layer = MyEinsum(shape=(2, 3))
    >>> einsum_kind_of(layer) is kind
    True
    >>> call = kind.describe(layer, ('bi,io->bo', jnp.ones((4, 2))), {})
    >>> call.equation.einsum_str, call.weight_name, call.weight_shape
    ('bi,io->bo', 'w', (2, 3))

  Args:
    module_type: the layer class.
    weight_name: the kernel's param name, or `module -> name`.
    einsum_str_arg: the `__call__` argument holding the equation (default:
      the first argument).
    inputs_arg: the `__call__` argument holding the input array (default:
      the second argument).
    shape_attr: the attribute holding the kernel shape.

  Returns:
    The registered kind, a `CallReadingKind`.

  Raises:
    TypeError: `module_type` is not a linen Module class, or its `__call__`
      has too few arguments for the defaults.
  """
  if not (isinstance(module_type, type) and issubclass(module_type,
                                                       nn.Module)):
    raise TypeError(
        f'register_einsum_layer expects a flax.linen Module class; got '
        f'{module_type!r}. Pass the class itself, e.g. MyEinsum.'
    )
  params = list(inspect.signature(module_type.__call__).parameters)[1:]
  if einsum_str_arg is None or inputs_arg is None:
    if len(params) < 2:
      raise TypeError(
          f'{module_type.__name__}.__call__ takes {params!r}; the defaults '
          'expect (einsum_str, inputs). Pass einsum_str_arg= and inputs_arg='
          ' naming its arguments.'
      )
  eq_arg = einsum_str_arg or params[0]
  x_arg = inputs_arg or params[1]
  for arg in (eq_arg, x_arg):
    if arg not in params:
      raise TypeError(
          f'{module_type.__name__}.__call__ has no argument {arg!r}; it '
          f'takes {params!r}. Name one of those.'
      )

  def read_call(module, args, kwargs):
    arguments = _bound_arguments(module, args, kwargs)
    return arguments[eq_arg], arguments[x_arg]

  def weight_shape(module, equation, inputs):
    del equation, inputs
    return getattr(module, shape_attr)

  kind = CallReadingKind(module_type=module_type, weight_name=weight_name,
                         read_call=read_call, weight_shape=weight_shape)
  register_einsum_kind(kind)
  return kind


def _first_arg(module, args, kwargs):
  return _bound_arguments(module, args, kwargs)['inputs']


def _einsum_call(module, args, kwargs):
  arguments = _bound_arguments(module, args, kwargs)
  einsum_str = nn.merge_param('einsum_str', module.einsum_str,
                              arguments['einsum_str'])
  return einsum_str, arguments['inputs']


def _as_tuple(x) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, Sequence) else (x,)


register_einsum_kind(CallReadingKind(
    module_type=nn.Dense, weight_name='kernel',
    read_call=lambda m, a, k: ('...i,io->...o', _first_arg(m, a, k)),
    weight_shape=lambda m, eq, x: (x.shape[-1], m.features),
))
register_einsum_kind(DenseGeneralKind(module_type=nn.DenseGeneral,
                                      weight_name='kernel'))
register_einsum_kind(CallReadingKind(
    module_type=nn.Einsum, weight_name='kernel', read_call=_einsum_call,
    weight_shape=lambda m, eq, x: tuple(m.shape),
))
