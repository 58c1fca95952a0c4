"""Quantization surgery: run a model's layers quantized, without edits.

`simulate_quantization(method)` runs the selected einsum-like layers with
simulated quantization (QAT: quantize-dequantize with a straight-through
gradient); `quantized()` runs them on the `QuantizedArray`s that
`peft.quantize` stored at their kernel paths. Layers are selected with the
rule language of LoRA surgery (type, path regex, predicate, exclusions),
never by layer names. Nest with LoRA as `with peft.quantized(),
peft.lora(...)` for QLoRA (either order gives LoRA over the quantized base).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import linen as nn
import jax

from peft._core import params as _params
from peft._linen import interceptors as _interceptors
from peft._linen import registry as _registry
from peft._linen import rules as _rules
from peft._quant import layers as _ql
from peft._quant import numerics as q


@dataclasses.dataclass
class _State(_interceptors.ReplaceState):
  recorder: Any = None
  kernels: dict[str, Any] = dataclasses.field(default_factory=dict)
  seen: dict[str, str] = dataclasses.field(default_factory=dict)
  used_targets: set[int] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizationSurgery(_interceptors.ModuleInterceptor):
  """Wraps the selected einsum-like layers with quantized wrappers.

  Entering yields a dict, filled as the model runs, from each wrapped
  kernel's path to the axes its scales reduce (what `peft.quantize` takes
  as `axes=`). On a clean exit, a target that selected no layer is an error.
  `simulate_quantization` and `quantized` build one.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((1, 4))
    >>> variables = model.init(jax.random.key(0), x)
    >>> surgery = peft.QuantizationSurgery(method='int4', targets='layers_0')
    >>> with surgery as kernels:  # = peft.simulate_quantization('int4', ...)
    ...   y = model.apply(variables, x)
    >>> kernels
    {'layers_0/kernel': (0,)}
    >>> err = float(jnp.abs(y - model.apply(variables, x)).max())
    >>> 0 < err < 0.1  # int4 rounding of layers_0's kernel
    True

  Attributes:
    method: the quantization method (`None` for Int layers: as stored).
    simulate: `SimulateQuantized*` (True) or `Int*` (False) wrappers.
    targets: layer types, path regexes (full match) or predicates, as in
      `peft.lora`; empty selects every einsum-like layer.
    exclude: layers never to wrap (same forms).
  """

  method: q.QuantizationMethod | str | None = None
  simulate: bool = True
  targets: Any = ()
  exclude: Any = ()

  def __post_init__(self):
    if self.method is not None or self.simulate:
      object.__setattr__(self, 'method', q.parse_method(
          self.method, where=type(self).__name__))
    for field in ('targets', 'exclude'):
      value = _rules.normalize_targets(getattr(self, field), field=field)
      einsum_types = _registry.registered_einsum_types()
      for t in value:
        if isinstance(t, type) and not issubclass(t, einsum_types):
          raise TypeError(
              f'Quantization {field} names {t.__name__}, which is not an '
              'einsum-like layer (Dense, DenseGeneral, Einsum or a layer '
              'registered with peft.register_einsum_layer). Target those.'
          )
      object.__setattr__(self, field, value)

  def jit_cache_key(self) -> Any:
    # The dict it yields is filled while layers are traced, so each surgery
    # object traces afresh (as `peft.lora` does).
    return self

  def _new_state(self) -> _State:
    state = _State()
    state.recorder = _ql.recording_kernels()
    state.kernels = state.recorder.__enter__()
    return state

  def _entered(self, state: _State) -> dict[str, Any]:
    return state.kernels

  def _exited(self, state: _State, *, failed: bool) -> None:
    state.recorder.__exit__(None, None, None)
    if failed or not state.seen:
      return
    for i, target in enumerate(self.targets):
      if i not in state.used_targets:
        raise _rules.unmatched_target(
            'Quantization', target, None, _rules.layer_listing(
                'Einsum-like layers that ran', state.seen))

  def replace_module(self, module: nn.Module) -> nn.Module:
    # The root module has no parent scope to share: quantize layers inside.
    if (module.scope is None or not module.path
        or isinstance(module, _ql.QuantizedEinsumLike)
        or _registry.einsum_kind_of(module) is None):
      return module
    state = self._state()
    path = _params.module_path(module)
    state.seen[path] = type(module).__name__
    hits = _rules.selected_targets(self.targets, self.exclude, module, path,
                                   by_default=True)
    if not hits:
      return module
    state.used_targets.update(hits)
    # Bound straight to the layer's scope (shared; works in setup-style
    # parents, where new submodules may not be created).
    return _ql.wrapper_for(module, simulate=self.simulate, method=self.method,
                           parent=module.scope, name=module.name)


def simulate_quantization(method: q.QuantizationMethod | str, *,
                          targets: Any = None,
                          exclude: Any = None) -> QuantizationSurgery:
  """A context manager running selected layers with simulated quantization.

  Quantization-aware training: kernels stay float, the forward uses
  `simulate_quantize(kernel)` with one scale per output channel, and the
  gradient passes straight through. Combine with LoRA by entering it
  inside: `with peft.simulate_quantization('int4'), peft.lora(rank=8):`
  makes LoRA wrap the quantized layers, so only base kernels are quantized,
  never the adapters.

  Example:
    >>> import jax.numpy as jnp
    >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)
    >>> with simulate_quantization('int4', targets='.*_2') as kernels:
    ...   y = model.apply(params, x)
    >>> kernels
    {'layers_2/kernel': (0,)}

  Args:
    method: a `QuantizationMethod` or its name.
    targets: layer types, module-path regexes (full match) or predicates;
      `None` selects every einsum-like layer.
    exclude: layers never to quantize (same forms).

  Returns:
    The surgery; `with` it yields `{kernel path: reduced axes}`.
  """
  return QuantizationSurgery(method=method, simulate=True,
                             targets=targets, exclude=exclude)


def quantized(method: q.QuantizationMethod | str | None = None, *,
              targets: Any = None, exclude: Any = None) -> QuantizationSurgery:
  """A context manager running selected layers on quantized params.

  Inside, each selected layer reads the `QuantizedArray` that
  `peft.quantize` stored at its kernel's path. For QLoRA enter LoRA
  inside, `with peft.quantized(), peft.lora(rank=8):`: LoRA then wraps the
  Int layers (they are registered einsum-like layers), the base stays
  quantized and only the adapters train.

  Example:
    >>> import jax.numpy as jnp
    >>> import peft
    >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> qparams = peft.quantize(params, method='int8')
    >>> qparams['layers_0']['kernel'].values.dtype
    dtype('int8')
    >>> with quantized('int8'):
    ...   y = model.apply({'params': qparams}, x)
    >>> y.shape
    (1, 2)

  Args:
    method: the expected method (`None`: whatever is stored; INT4 at init).
    targets: as in `simulate_quantization`.
    exclude: as in `simulate_quantization`.

  Returns:
    The surgery; `with` it yields `{kernel path: reduced axes}`.
  """
  return QuantizationSurgery(method=method, simulate=False, targets=targets,
                             exclude=exclude)


def quantization_axes(model: nn.Module, *args, targets: Any = None,
                      exclude: Any = None, **kwargs) -> dict[str, Any]:
  """`{kernel path: axes}` of the einsum-like layers `model(*args)` runs.

  The axes are those each layer's equation contracts, i.e. what the
  simulated-quantization wrappers reduce; pass the result as
  `peft.quantize(params, method=..., axes=...)` so real and simulated
  quantization agree. Runs `model.init` abstractly (no compute).

  Example:
    >>> import jax.numpy as jnp
    >>> model = nn.Sequential([nn.Einsum((4, 2, 3), 'btd,dnh->btnh')])
    >>> quantization_axes(model, jnp.ones((1, 5, 4)))
    {'layers_0/kernel': (0,)}
  """
  with simulate_quantization(q.QuantizationMethod.NONE, targets=targets,
                             exclude=exclude) as kernels:
    jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  return dict(kernels)
