"""LoRA adapters: modules that compute only `scale * (x @ A @ B)`.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) learns a low-rank
update `W + scale * A @ B` of a frozen kernel `W`. The adapters here hold `A`
and `B` and compute the update's contribution; the wrappers in
`lora_layers.py` add it to the frozen layer's output. `B` starts at zero,
so an adapter outputs exact zeros at init. rsLoRA (Kalajdzievski 2023)
scales by `alpha / sqrt(rank)` instead of `alpha / rank`. With `use_dora`
(DoRA: Liu et al. 2024, https://arxiv.org/abs/2402.09353) the adapter also
holds the magnitude `m` and returns what turns the wrapped layer's output
into DoRA's (`peft._core.dora`); it needs that output and the kernel, so
only peft's wrappers can call a DoRA adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

from flax import linen as nn
from flax.typing import Array
from flax.typing import Dtype
from flax.typing import Initializer
import jax.numpy as jnp

from peft._core import active_adapter as _active
from peft._core import dora as _dora
from peft._core import einsum as _einsum
from peft._core import params as _params
from peft._core import spec as _spec
from peft._linen import interceptors as _interceptors
from peft._linen import lora_fields as _lora_fields
from peft._linen import registry as _registry

_DENSE = _einsum.EinsumEquation.parse('...i,io->...o')


@dataclasses.dataclass(frozen=True)
class DoRABase:
  """What a DoRA adapter needs of the wrapped layer's call.

  Attributes:
    equation: the layer's `inputs,weights->outputs` (the magnitude axes
      and how they lie in the output follow from it).
    kernel: the base kernel's value (float; per layer).
    output: the wrapped layer's output `y = x @ W + bias`.
    bias: the layer's bias (over the magnitude axes), or None.
  """

  equation: _einsum.EinsumEquation
  kernel: Array
  output: Array
  bias: Array | None


class LoRAAdapterBase(_lora_fields.LoRAFields):
  """Fields and helpers shared by every adapter.

  The LoRA options are `LoRAFields`'; `compute_dtype` and
  `kernel_partitioning` come from the wrapper that builds the adapter.
  """

  _: dataclasses.KW_ONLY
  compute_dtype: Dtype | None = None
  # The adapted kernel's partitioning box (`nn.Partitioned`, value dropped):
  # A and B inherit its axis names (see `delta_partition_names`).
  kernel_partitioning: nn.Partitioned | None = None

  @nn.nowrap
  def _ab(self, a_shape: Sequence[int], b_shape: Sequence[int],
          delta_str: str):
    a_init, b_init = self.options.a_init, self.options.b_init
    box = self.kernel_partitioning
    if box is not None:
      a_names, b_names = _einsum.delta_partition_names(delta_str, box.names)
      a_init = _boxed(a_init, box, a_names)
      b_init = _boxed(b_init, box, b_names)
    return (self._param('a', a_init, tuple(a_shape)),
            self._param('b', b_init, tuple(b_shape)))

  @nn.nowrap
  def _param(self, name: str, init: Initializer, shape: tuple[int, ...]):
    """`self.param(name, init, shape)`, without re-running `init` in apply.

    When the value exists, flax's `param` traces `init` (`jax.eval_shape`)
    only to compare shapes; for the adapters of a model that was most of
    the extra tracing time. We compare the shapes directly instead.
    """
    where = _params.module_path(self)
    banked = _active.expected_shape(shape)
    if not self.has_variable('params', name):
      if banked != shape:
        raise ValueError(
            f'LoRA param {name!r} at {where!r} does not exist, and a bank '
            'selection (AdapterBank.active) is in effect: a bank is not '
            'initialised by surgery. Init the adapters outside the '
            'selection, or stack existing ones with peft.AdapterBank.stack.')
      return self.param(name, init, shape, self.options.dtype)
    value = nn.meta.unbox(self.get_variable('params', name))
    if tuple(value.shape) != banked:
      bank = (f' (a bank of {banked[0]} adapters of {shape})'
              if banked != shape else '')
      raise ValueError(
          f'LoRA param {name!r} at {where!r} has shape {tuple(value.shape)} '
          f'but this layer with rank {self.options.rank} needs {banked}'
          f'{bank}. Pass the adapters made for this model and rank (or init '
          'new ones), and a bank\'s params only under its own active().'
      )
    return value

  @nn.nowrap
  def _require(self, field: str, what: str, example: str) -> None:
    """A required field left at its empty default is a clear error.

    The fields have defaults only so that the class hierarchy can be
    keyword-only; gemma.peft's adapters require them.
    """
    value = getattr(self, field)
    if value in (0, None) or (isinstance(value, Sequence) and not value):
      raise ValueError(
          f'{type(self).__name__} needs {field} ({what}); got {value!r} at '
          f'{_params.shown_path(_params.module_path(self))!r}. Pass '
          f'{type(self).__name__}(rank=..., {example}).'
      )

  @nn.nowrap
  def _drop(self, x: Array) -> Array:
    """Dropout on the adapter's input; off without a 'dropout' rng."""
    if self.options.dropout == 0.0:
      return x
    deterministic = self.options.deterministic
    if deterministic is None:
      deterministic = not self.has_rng('dropout')
    return nn.Dropout(rate=self.options.dropout, deterministic=deterministic)(x)

  @nn.nowrap
  def _einsum_update(self, eq: _einsum.EinsumEquation, inputs: Array,
                     weight_shape: Sequence[int]) -> Array:
    """`scale * einsum(plan.einsum_str, x, A, B)`, as `(x @ A) @ B`.

    `eq` is the adapted layer's `inputs,weights->outputs` equation.
    """
    plan = eq.lora_plan(weight_shape=weight_shape, rank=self.options.rank,
                        where=_params.module_path(self))
    self._check_dora(None)
    self._record_for_foreign_wrapper(eq, plan, weight_shape)
    return self._apply_plan(plan, inputs)

  @nn.nowrap
  def _apply_plan(self, plan: _einsum.LoRAEinsumPlan, inputs: Array,
                  dora: DoRABase | None = None) -> Array:
    """The update of a planned layer: A and B made (or read), then applied."""
    self._check_dora(dora)
    a, b = self._ab(plan.a_shape, plan.b_shape, plan.delta_str)
    update = self._selected(
        lambda x, a, b: plan.apply(*self._cast(x, a, b)), self._drop(inputs),
        a, b, batch_axis=plan.batch_axis)
    return self._dora_update(dora, plan, a, b, update)

  @nn.nowrap
  def _selected(self, update, inputs: Array, a: Array, b: Array, *,
                batch_axis=lambda ndim: 0) -> Array:
    """`update(inputs, A, B)` for the adapter(s) a bank selection picks
    (see `active_adapter`); the plain update without one."""
    selection = _active.current()
    if selection is not None and selection.size is not None and (
        self.scale != 1.0):
      raise ValueError(
          f'A bank selection (AdapterBank.active) is in effect, but the LoRA '
          f'layer at {_params.module_path(self)!r} has scale {self.scale} '
          '(alpha / rank); a bank holds its adapters\' scales in B. Run the '
          'bank under peft.lora(rank=bank.rank) with alpha left unset.')
    return _active.apply(update, inputs, a, b,
                         where=_params.module_path(self),
                         batch_axis=batch_axis)

  @nn.nowrap
  def _check_dora(self, dora: DoRABase | None) -> None:
    if self.options.use_dora and dora is None:
      raise ValueError(
          f'{type(self).__name__} at '
          f'{_params.shown_path(_params.module_path(self))!r} has '
          'use_dora=True, but DoRA rescales the wrapped layer\'s output, '
          'which an adapter called on its own does not see. Use peft\'s '
          'wrapper (peft.LoRADense(..., use_dora=True), LoRAEinsum, ...) '
          'or surgery (peft.lora(rank=..., use_dora=True)).'
      )

  @nn.nowrap
  def _dora_update(self, dora: DoRABase | None,
                   plan: _einsum.LoRAEinsumPlan, a: Array, b: Array,
                   update: Array) -> Array:
    """`update`, or with DoRA `(g - 1) * (y - bias) + g * update`.

    `g = m / stop_gradient(||W + scale * delta||)` over the output; `m`
    (made here, at `||W||`) sits beside A and B.
    """
    if dora is None:
      return update
    # Banks hold no DoRA adapters (AdapterBank.stack refuses them), so a
    # selection here is adapters_disabled().
    selection = _active.current()
    eq, kernel, y = dora.equation, dora.kernel, dora.output
    axes = eq.magnitude_axes

    def m_init(key, shape, dtype=jnp.float32):
      del key, shape
      return _dora.column_norm(kernel, axes).astype(dtype)

    box = self.kernel_partitioning
    if box is not None:
      m_init = _boxed(m_init, box, tuple(box.names[i] for i in axes))
    m = self._param(_dora.MAGNITUDE, m_init,
                    tuple(kernel.shape[i] for i in axes))
    if selection is not None:  # adapters_disabled(): the base output.
      return jnp.zeros_like(y)
    norm = _dora.weight_norm(kernel, a, b, self.scale,
                             delta_str=plan.delta_str, magnitude_axes=axes)
    g = eq.to_outputs(_dora.rescale(m, norm), y.ndim)
    y0 = y if dora.bias is None else y - eq.to_outputs(
        jnp.asarray(dora.bias), y.ndim).astype(y.dtype)
    return _dora.correction(y0, update, g, y.dtype)

  @nn.nowrap
  def _record_for_foreign_wrapper(self, eq: _einsum.EinsumEquation,
                                  plan: _einsum.LoRAEinsumPlan,
                                  weight_shape: Sequence[int]) -> None:
    """Records this adapter's spec when another library's wrapper calls it.

    peft's own wrappers record their adapters' specs. A gemma-style wrapper
    (a module with a `wrapped` einsum-like layer that calls this adapter
    directly) records nothing, so the adapter does, so that fuse, unfuse
    and adapter files work on its params. The kernel is the wrapped layer's
    weight; the adapter may sit in a submodule below that layer's scope.
    """
    parent = self.parent
    if not isinstance(parent, nn.Module) or getattr(
        type(parent), 'records_adapter_specs', False):
      return
    # The dataclass field itself: never a model's `__getattr__`.
    wrapped = vars(parent).get('wrapped')
    kind = _registry.einsum_kind_of(wrapped)
    if (kind is None or not isinstance(wrapped, nn.Module)
        or wrapped.scope is None):
      return
    kernel_path, own_path = tuple(wrapped.path), tuple(self.path)
    if own_path[:len(kernel_path)] != kernel_path:
      return  # not inside the wrapped layer's scope: no param path to name
    weight_name = kind.weight_name_of(wrapped)
    _spec.record_adapter(_spec.AdapterSpec(
        path=kernel_path, layer_type=type(wrapped).__name__,
        weight_name=weight_name,
        adapter_name='/'.join(own_path[len(kernel_path):]),
        weight_shape=tuple(int(d) for d in weight_shape),
        a_shape=plan.a_shape,
        b_shape=plan.b_shape, delta_str=plan.delta_str,
        einsum_str=eq.einsum_str, rank=self.options.rank,
        alpha=self.options.alpha, use_rslora=self.options.use_rslora))

  @nn.nowrap
  def _cast(self, x: Array, a: Array, b: Array):
    """Casts to the compute dtype and folds the scale into B (cheapest)."""
    if self.compute_dtype is None:
      x, a, b = nn.dtypes.promote_dtype(x, a, b)
    else:
      x, a, b = (t.astype(self.compute_dtype) for t in (x, a, b))
    if self.scale != 1.0:
      b = b * jnp.asarray(self.scale, b.dtype)
    return x, a, b


class LoRAEinsumAdapter(LoRAAdapterBase):
  """Computes `scale * einsum('inputs,a,b->outputs', x, A, B)`.

  The layer's `einsum_str` (`inputs,weights->outputs`) is rewritten so that A
  holds the weight axes shared with the inputs then the rank, and B the rank
  then the other weight axes (see `EinsumEquation.lora_plan`).

  Example:
    >>> import jax
    >>> adapter = LoRAEinsumAdapter(rank=2, einsum_str='BTD,DNH->BTNH',
    ...                             shape=(8, 4, 3))
    >>> x = jnp.ones((1, 5, 8))
    >>> params = adapter.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, params['params'])
    {'a': (8, 2), 'b': (2, 4, 3)}
    >>> float(jnp.abs(adapter.apply(params, x)).max())  # B starts at zero
    0.0

  Attributes:
    einsum_str: the adapted layer's `inputs,weights->outputs` equation.
    shape: the adapted kernel's shape.
  """

  einsum_str: str = ''
  shape: Sequence[int] = ()

  @nn.nowrap
  def equation(self) -> _einsum.EinsumEquation:
    return _einsum.EinsumEquation.parse(self.einsum_str,
                                        where=_params.module_path(self))

  @nn.compact
  def __call__(self, inputs: Array,
               plan: _einsum.LoRAEinsumPlan | None = None,
               dora: DoRABase | None = None) -> Array:
    """The update for `inputs`.

    Args:
      inputs: the adapted layer's input.
      plan: the LoRA plan of `einsum_str` for `shape` and this rank, when
        the caller has it (peft's wrappers parse each call once); `None`
        makes it here.
      dora: with `use_dora`, the wrapped layer's call (peft's wrappers
        pass it); the result then turns its output into DoRA's.
    """
    self._require('einsum_str', "the adapted layer's equation",
                  "einsum_str='BTD,DNH->BTNH'")
    self._require('shape', "the adapted kernel's shape", 'shape=layer.shape')
    if plan is not None:  # a peft wrapper, which records the spec itself
      return self._apply_plan(plan, inputs, dora)
    return self._einsum_update(self.equation(), inputs, self.shape)


class LoRADenseAdapter(LoRAAdapterBase):
  """Computes `scale * (x @ A @ B)` for a dense layer of `features` outputs.

  Example:
    >>> import jax
    >>> adapter = LoRADenseAdapter(rank=2, features=4)
    >>> params = adapter.init(jax.random.key(0), jnp.ones((3, 5)))
    >>> jax.tree.map(jnp.shape, params['params'])
    {'a': (5, 2), 'b': (2, 4)}
  """

  features: int = 0

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    self._require('features', 'the output size of the dense layer it adapts',
                  'features=dense.features')
    return self._einsum_update(_DENSE, inputs,
                               (inputs.shape[-1], self.features))


class LoRADenseGeneralAdapter(LoRAAdapterBase):
  """The LoRA update of `nn.DenseGeneral(features, axis, batch_dims)`.

  A holds the batch and contracted input axes then the rank; B the rank then
  the feature axes.

  Example:
    >>> import jax
    >>> adapter = LoRADenseGeneralAdapter(rank=2, features=(3, 4),
    ...                                   axis=(-2, -1), batch_dims=())
    >>> params = adapter.init(jax.random.key(0), jnp.ones((1, 5, 6)))
    >>> jax.tree.map(jnp.shape, params['params'])
    {'a': (5, 6, 2), 'b': (2, 3, 4)}
  """

  features: int | Sequence[int] = ()
  axis: int | Sequence[int] = -1
  batch_dims: Sequence[int] = ()

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    self._require('features', 'the output axes of the layer it adapts',
                  'features=layer.features')
    eq, shape = _einsum.dense_general_call(
        input_shape=inputs.shape, axis=as_tuple(self.axis),
        batch_dims=as_tuple(self.batch_dims),
        features=as_tuple(self.features))
    return self._einsum_update(eq, inputs, shape)


class LoRAConvAdapter(LoRAAdapterBase):
  """The LoRA update of an `nn.Conv`: a rank-channel conv A, then 1x1 B.

  A has the wrapped kernel's window, strides, padding and dilations and
  `rank` output channels; B projects the rank channels to `features`. The
  delta `einsum('...ir,ro->...io', A, B)` is a kernel of the wrapped shape.

  Example:
    >>> import jax
    >>> adapter = LoRAConvAdapter(rank=2, features=4, kernel_size=(3, 3))
    >>> params = adapter.init(jax.random.key(0), jnp.ones((1, 8, 8, 5)))
    >>> jax.tree.map(jnp.shape, params['params'])
    {'a': (3, 3, 5, 2), 'b': (2, 4)}
  """

  features: int = 0
  kernel_size: int | Sequence[int] = ()
  strides: Any = 1
  padding: Any = 'SAME'
  input_dilation: Any = 1
  kernel_dilation: Any = 1

  @nn.compact
  def __call__(self, inputs: Array,
               plan: _einsum.LoRAEinsumPlan | None = None,
               dora: DoRABase | None = None) -> Array:
    """The update for `inputs`.

    Args:
      inputs: the conv's input.
      plan: `conv_plan(...)` of this kernel and rank when the caller (peft's
        `LoRAConv`) has made it; `None` makes it here.
      dora: with `use_dora`, the conv's call (as `LoRAEinsumAdapter`).
    """
    window = as_tuple(self.kernel_size)
    if plan is None:
      plan = conv_plan(window, inputs.shape[-1], self.features,
                       self.options.rank, where=_params.module_path(self))
    self._check_dora(dora)
    a, b = self._ab(plan.a_shape, plan.b_shape, plan.delta_str)

    def update(x, a, b):
      x, a, b = self._cast(x, a, b)
      # Reuse flax's own conv (padding modes, unbatched inputs) on our A.
      conv_a = nn.Conv(
          features=self.options.rank, kernel_size=window,
          strides=self.strides, padding=self.padding,
          input_dilation=self.input_dilation,
          kernel_dilation=self.kernel_dilation, use_bias=False,
          dtype=x.dtype, parent=None)
      with _interceptors.suspended():  # conv_a is ours, not the model's
        low_rank = conv_a.apply({'params': {'kernel': a}}, x)
      return jnp.einsum('...r,ro->...o', low_rank, b)
    return self._dora_update(dora, plan, a, b,
                             self._selected(update, self._drop(inputs), a, b))


class LoRAEmbedAdapter(LoRAAdapterBase):
  """The LoRA update of an `nn.Embed`: rows of A, then `@ B`.

  `attend(query)` gives the matching update of `Embed.attend` (tied output
  layers): `query @ (A @ B).T`. Dropout applies to the looked-up rows of A
  (token ids cannot be dropped out), except under per-row bank ids.

  Example:
    >>> import jax
    >>> adapter = LoRAEmbedAdapter(rank=2, num_embeddings=10, features=4)
    >>> params = adapter.init(jax.random.key(0), jnp.array([1, 2]))
    >>> jax.tree.map(jnp.shape, params['params'])
    {'a': (10, 2), 'b': (2, 4)}
  """

  num_embeddings: int = 0
  features: int = 0

  def setup(self):
    if self.options.use_dora:
      raise ValueError(
          f'DoRA (use_dora=True) does not support the Embed at '
          f'{_params.shown_path(_params.module_path(self))!r}: a table '
          'lookup has no contracted axis to take the per-feature norm over '
          '(and attend would need the transposed one). Exclude the Embed '
          'from the DoRA rule, or give it a LoRA rule with use_dora=False.'
      )
    plan = self.plan()
    self.a, self.b = self._ab(plan.a_shape, plan.b_shape, plan.delta_str)

  @nn.nowrap
  def plan(self) -> _einsum.LoRAEinsumPlan:
    """The LoRA plan of this table (A `(ids, rank)`, B `(rank, features)`).
    """
    return embed_plan(self.num_embeddings, self.features, self.options.rank,
                      where=_params.module_path(self))

  def __call__(self, inputs: Array) -> Array:
    # Per-row bank ids run `update` under `jax.vmap`, where no flax module
    # (the dropout) may be called: serving runs without dropout.
    per_row = _active.per_row()

    def update(ids, a, b):
      rows = jnp.take(a, ids, axis=0)
      rows, _, b = self._cast(rows if per_row else self._drop(rows), a, b)
      return rows @ b
    return self._selected(update, inputs, self.a, self.b)

  def attend(self, query: Array) -> Array:
    def update(query, a, b):
      query, a, b = self._cast(query, a, b)
      return (query @ b.T) @ a.T
    return self._selected(update, query, self.a, self.b)


def _boxed(init: Initializer, box: nn.Partitioned, names) -> Initializer:
  """`init`, returning its value in a copy of `box` with `names`."""
  def boxed_init(key, shape, dtype=jnp.float32):
    return box.replace(value=init(key, shape, dtype), names=names)
  return boxed_init


def conv_plan(window: Sequence[int], in_features: int, features: int,
              rank: int, *, where: str) -> _einsum.LoRAEinsumPlan:
  """The LoRA plan of a conv kernel `(*window, in_features, features)`.

  From the one conv equation (`einsum.conv_equation`) that nnx's LoRA conv
  uses too: A is `(*window, in, rank)`, B `(rank, out)`.
  """
  return _einsum.conv_equation(len(window), where=where).lora_plan(
      weight_shape=(*window, in_features, features), rank=rank, where=where)


def embed_plan(num_embeddings: int, features: int, rank: int, *,
               where: str) -> _einsum.LoRAEinsumPlan:
  """The LoRA plan of an embedding table: A `(ids, rank)`, B `(rank, f)`."""
  return _einsum.EMBED.lora_plan(weight_shape=(num_embeddings, features),
                                 rank=rank, where=where)


def as_tuple(x) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, Sequence) else (x,)

