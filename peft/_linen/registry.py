"""Which layer types compute `einsum(eq, x, W)`, and how to read their calls.

Surgery, fuse and quantization never look at layer names: they ask this
registry how a module type computes its output. `nn.Dense`, `nn.DenseGeneral`
and `nn.Einsum` are registered here; a model's own Einsum-like layer joins
with `register_einsum_layer`, after which LoRA, quantization and fuse treat it
like the built-ins without any edit to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import inspect
from typing import Any

from flax import linen as nn
import jax

from peft._core import einsum as _einsum
from peft._core import params as _params

_WeightName = str | Callable[[nn.Module], str]


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
class EinsumLayerKind:
  """How one module type computes `einsum(eq, x, W)`.

  Attributes:
    module_type: the registered class (subclasses match too).
    weight_name: the kernel's param name, or a function of the module for
      layers whose param name is configurable.
    read_call: `(module, args, kwargs) -> (einsum_str, inputs)`.
    weight_shape: `(module, equation, inputs) -> kernel shape`.
  """

  module_type: type[nn.Module]
  weight_name: _WeightName
  read_call: Callable[[Any, tuple[Any, ...], dict[str, Any]],
                      tuple[str, jax.Array]]
  weight_shape: Callable[[Any, _einsum.EinsumEquation, jax.Array],
                         Sequence[int]]

  def describe(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> LayerCall:
    """Reads one call of `module` as an einsum."""
    where = _params.module_path(module)
    einsum_str, inputs = self.read_call(module, args, kwargs)
    equation = _einsum.EinsumEquation.parse(einsum_str, where=where)
    shape = equation.check_weight_shape(
        self.weight_shape(module, equation, inputs), where=where)
    if callable(self.weight_name):
      # A configurable name means several such layers may share one scope,
      # so each adapter is named after its kernel to keep them apart.
      weight_name = self.weight_name(module)
      adapter_name = f'lora_{weight_name}'
    else:
      weight_name, adapter_name = self.weight_name, 'lora'
    return LayerCall(equation=equation, inputs=inputs,
                     weight_name=weight_name, weight_shape=shape,
                     adapter_name=adapter_name)


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
  """Registers a ready-made `EinsumLayerKind` (e.g. for a wrapper type)."""
  if not isinstance(kind, EinsumLayerKind):
    raise TypeError(
        f'register_einsum_kind expects an EinsumLayerKind; got {kind!r}. '
        'For a plain layer class use register_einsum_layer.'
    )
  _REGISTRY[kind.module_type] = kind
  return kind


def _bound_arguments(module, args, kwargs) -> dict[str, Any]:
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
) -> EinsumLayerKind:
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
    >>> einsum_kind_of(MyEinsum(shape=(2, 3))) is kind
    True

  Args:
    module_type: the layer class.
    weight_name: the kernel's param name, or `module -> name`.
    einsum_str_arg: the `__call__` argument holding the equation (default:
      the first argument).
    inputs_arg: the `__call__` argument holding the input array (default:
      the second argument).
    shape_attr: the attribute holding the kernel shape.

  Returns:
    The registered kind.

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

  return register_einsum_kind(EinsumLayerKind(
      module_type=module_type, weight_name=weight_name, read_call=read_call,
      weight_shape=weight_shape))


def _first_arg(module, args, kwargs):
  return _bound_arguments(module, args, kwargs)['inputs']


def _dense_general(module, inputs):
  return _einsum.dense_general_call(
      input_shape=inputs.shape, axis=_as_tuple(module.axis),
      batch_dims=_as_tuple(module.batch_dims),
      features=_as_tuple(module.features))


def _dense_general_call(module, args, kwargs):
  x = _first_arg(module, args, kwargs)
  return _dense_general(module, x)[0].einsum_str, x


def _einsum_call(module, args, kwargs):
  arguments = _bound_arguments(module, args, kwargs)
  einsum_str = nn.merge_param('einsum_str', module.einsum_str,
                              arguments['einsum_str'])
  return einsum_str, arguments['inputs']


def _as_tuple(x) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, Sequence) else (x,)


_REGISTRY[nn.Dense] = EinsumLayerKind(
    module_type=nn.Dense, weight_name='kernel',
    read_call=lambda m, a, k: ('...i,io->...o', _first_arg(m, a, k)),
    weight_shape=lambda m, eq, x: (x.shape[-1], m.features),
)
_REGISTRY[nn.DenseGeneral] = EinsumLayerKind(
    module_type=nn.DenseGeneral, weight_name='kernel',
    read_call=_dense_general_call,
    weight_shape=lambda m, eq, x: _dense_general(m, x)[1],
)
_REGISTRY[nn.Einsum] = EinsumLayerKind(
    module_type=nn.Einsum, weight_name='kernel', read_call=_einsum_call,
    weight_shape=lambda m, eq, x: tuple(m.shape),
)
