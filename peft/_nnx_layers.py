"""LoRA layers for flax.nnx: the adapter, the standalone layer, the wrappers.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) learns a low-rank
update `W + scale * einsum(delta_str, A, B)` of a frozen kernel `W`; rsLoRA
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by
`alpha / sqrt(rank)` instead of `alpha / rank`.

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
and the delta equation used by fuse.
"""

from __future__ import annotations

from collections.abc import Sequence
import string
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype
from flax.typing import Initializer
import jax
import jax.numpy as jnp

from peft import _einsum
from peft import _spec

_LINEAR = _einsum.EinsumEquation.parse('...i,io->...o')
# A table lookup is a one-hot matmul: rows of A, then B.
_EMBED = _einsum.EinsumEquation.parse('...v,vf->...f')
default_a_init = nnx.initializers.kaiming_uniform()
default_b_init = nnx.initializers.zeros_init()


class LoRAParam(nnx.LoRAParam):
  """The variable type of peft's LoRA factors A and B.

  A subclass of `flax.nnx.LoRAParam` (itself an `nnx.Param`), so
  `nnx.state(model, LoRAParam)` holds the adapters alone and
  `nnx.Optimizer(model, tx, wrt=LoRAParam)` trains only them.
  """


def retype(module: nnx.Module, cls: type[nnx.Module]) -> nnx.Module:
  """A shallow copy of `module` as an instance of `cls`.

  Uses the pickle protocol nnx modules support (`__getstate__` then
  `__setstate__`): the copy holds the very same Variable objects, and
  attributes keep their pytree data/static status, so only the type changes.
  """
  new = cls.__new__(cls)
  new.__setstate__(module.__getstate__())
  return new


class LoRAAdapter(nnx.Module):
  """A and B of one adapted kernel, and the update they compute.

  The update is `scale * (dropout(x) @ A) @ B` for the adapted layer's
  equation `inputs,weights->outputs`; B starts at zero, so the update is
  exactly zero at init.

  Example:
    >>> adapter = LoRAAdapter((2, 1), (1, 3), 'ir,ro->io', alpha=2.0,
    ...                       rngs=nnx.Rngs(0))
    >>> adapter.a.shape, adapter.b.shape, adapter.rank, adapter.scale
    ((2, 1), (1, 3), 1, 2.0)
    >>> adapter.update(jnp.ones((5, 2)), '...i,io->...o').tolist()[0]
    [0.0, 0.0, 0.0]

  Args:
    a_shape: shape of A (input-side axes of the kernel, then the rank).
    b_shape: shape of B (the rank, then the other kernel axes).
    delta_str: `a,b->weights`, so `einsum(delta_str, A, B)` is shaped like
      the kernel.
    einsum_str: the adapted layer's equation, where it has a fixed one.
    alpha: scale numerator; `None` means `rank` (scale 1).
    use_rslora: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
    dropout: dropout rate on the adapter's input; off in eval mode
      (`model.eval()`) or with `deterministic=True`.
    deterministic: the initial mode of that dropout.
    dtype: compute dtype of the update (`None`: promote x, A and B).
    param_dtype: dtype of A and B.
    a_init: initializer of A.
    b_init: initializer of B.
    rngs: `params` keys for the initializers; a `dropout` (or `default`)
      stream when `dropout > 0`.
    where: where the adapter sits, quoted in errors.

  Raises:
    ValueError: a rank, alpha or dropout out of range, or a dropout without
      an rng stream for it.
  """

  def __init__(
      self,
      a_shape: Sequence[int],
      b_shape: Sequence[int],
      delta_str: str,
      *,
      einsum_str: str | None = None,
      alpha: float | None = None,
      use_rslora: bool = False,
      dropout: float = 0.0,
      deterministic: bool = False,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      a_init: Initializer = default_a_init,
      b_init: Initializer = default_b_init,
      rngs: nnx.Rngs | None,
      where: str = '',
  ):
    at = f' at {where!r}' if where else ''
    self.rank = _einsum.check_rank(tuple(a_shape)[-1], where=where)
    if alpha is not None and not alpha > 0:
      raise ValueError(
          f'LoRA alpha must be positive or None; got {alpha!r}{at}. Pass '
          'e.g. alpha=16.'
      )
    if not 0.0 <= dropout < 1.0:
      raise ValueError(
          f'LoRA dropout must be in [0, 1); got {dropout!r}{at}. Pass e.g. '
          'dropout=0.05.'
      )
    self.alpha = None if alpha is None else float(alpha)
    self.use_rslora = bool(use_rslora)
    self.delta_str = delta_str
    self.einsum_str = einsum_str
    self.dtype = dtype
    key = (lambda: rngs.params()) if rngs is not None else (lambda: None)
    self.a = LoRAParam(a_init(key(), tuple(a_shape), param_dtype))
    self.b = LoRAParam(b_init(key(), tuple(b_shape), param_dtype))
    drop = None
    if dropout > 0.0:
      try:
        drop = nnx.Dropout(dropout, deterministic=deterministic, rngs=rngs)
      except (KeyError, TypeError):
        raise ValueError(
            f'LoRA dropout={dropout!r}{at} needs an rng stream for its masks '
            f'but rngs={rngs!r:.60} has none. Pass rngs=nnx.Rngs(0) (or '
            'nnx.Rngs(params=0, dropout=1)).'
        ) from None
    self.dropout = drop

  @property
  def scale(self) -> float:
    """`alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA)."""
    return _spec.lora_scale(rank=self.rank, alpha=self.alpha,
                            use_rslora=self.use_rslora)

  def operands(self, x: jax.Array, *, drop: bool = True):
    """`(dropout(x), A, scale * B)`, cast to the compute dtype."""
    if drop and self.dropout is not None:
      x = self.dropout(x)
    x, a, b = dtypes.promote_dtype((x, self.a[...], self.b[...]),
                                   dtype=self.dtype)
    if self.scale != 1.0:
      b = b * jnp.asarray(self.scale, b.dtype)
    return x, a, b

  def update(self, x: jax.Array, einsum_str: str, *,
             precision: Any = None) -> jax.Array:
    """`scale * (dropout(x) @ A) @ B` for the layer equation `einsum_str`.

    Args:
      x: the adapted layer's input.
      einsum_str: the layer's `inputs,weights->outputs` equation (e.g.
        `'...i,io->...o'` for a linear layer).
      precision: passed to both products.
    """
    return self.plan(einsum_str).apply(*self.operands(x), precision=precision)

  def plan(self, einsum_str: str) -> _einsum.LoRAEinsumPlan:
    """The LoRA plan of `einsum_str` for this adapter's kernel and rank."""
    lhs, weights = self.delta_str.split('->')
    dims = dict(zip(lhs.replace(',', ''), (*self.a.shape, *self.b.shape)))
    eq = _einsum.EinsumEquation.parse(einsum_str, where='LoRAAdapter.plan')
    return eq.lora_plan(weight_shape=tuple(dims[c] for c in weights),
                        rank=self.rank, where='LoRAAdapter.plan')


class LoRA(LoRAAdapter):
  """A standalone LoRA layer: `x @ A @ B * scale`, plus `base_module(x)`.

  Guarantee: at init the output equals `base_module(x)` exactly (or zeros
  without a base module), since B starts at zero.

  Example:
    >>> layer = LoRA(2, 1, 3, rngs=nnx.Rngs(0))
    >>> layer.a.shape, layer.b.shape
    ((2, 1), (1, 3))
    >>> linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> wrapper = LoRA(2, 1, 3, base_module=linear, rngs=nnx.Rngs(1))
    >>> x = jnp.ones((5, 2))
    >>> bool((wrapper(x) == linear(x)).all())
    True

  Args:
    in_features: size of the input's last axis.
    rank: LoRA rank.
    out_features: size of the output's last axis.
    base_module: a module called as `base_module(x, *args, **kwargs)` whose
      output the update is added to.
    **options: `LoRAAdapter` options (alpha, use_rslora, dropout,
      deterministic, dtype, param_dtype, a_init, b_init).
    rngs: as `LoRAAdapter`.
  """

  def __init__(self, in_features: int, rank: int, out_features: int, *,
               base_module: Any = None, rngs: nnx.Rngs | None, **options):
    plan = _LINEAR.lora_plan(weight_shape=(in_features, out_features),
                             rank=rank, where='LoRA')
    super().__init__(plan.a_shape, plan.b_shape, plan.delta_str,
                     einsum_str=_LINEAR.einsum_str, rngs=rngs, **options)
    self.in_features = in_features
    self.out_features = out_features
    self.base_module = base_module

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    update = self.update(x, _LINEAR.einsum_str)
    if self.base_module is None:
      return update
    y = self.base_module(x, *args, **kwargs)
    return y + update.astype(y.dtype)


def _layout(delta_str: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Which kernel axis each axis of A and of B is (-1: the rank axis)."""
  eq = _einsum.EinsumEquation.parse(delta_str)
  return (tuple(eq.outputs.find(c) for c in eq.inputs),
          tuple(eq.outputs.find(c) for c in eq.weights))


class _LoRALayer:
  """What the LoRA layers share: the `lora` adapter beside the kernel.

  A subclass sets `base_type` (the nnx layer it adapts), `weight_name` and
  `_equation` (the einsum its kernel is the weight of). The adapter is the
  only attribute it adds to the base layer.
  """

  base_type: type[nnx.Module] = nnx.Module
  weight_name = 'kernel'
  # Whether `_equation` is the layer's actual forward equation.
  records_einsum = False

  def __init__(self, *args, rank: int, alpha: float | None = None,
               use_rslora: bool = False, dropout: float = 0.0,
               deterministic: bool = False, a_init: Initializer =
               default_a_init, b_init: Initializer = default_b_init,
               rngs: nnx.Rngs, **kwargs):
    """Builds the nnx layer from `*args, **kwargs`, then its adapter.

    A and B take the layer's `dtype` (compute) and `param_dtype`.

    Args:
      *args: the nnx layer's positional arguments.
      rank: LoRA rank.
      alpha: scale numerator (`None`: `rank`, i.e. scale 1).
      use_rslora: scale by `alpha / sqrt(rank)`.
      dropout: adapter-input dropout rate (off after `model.eval()`).
      deterministic: initial dropout mode.
      a_init: initializer of A (random by default).
      b_init: initializer of B (zeros by default).
      rngs: keys for the layer, A, B and dropout.
      **kwargs: the nnx layer's keyword arguments (dtype, param_dtype, ...).
    """
    self.base_type.__init__(self, *args, rngs=rngs, **kwargs)
    self._check_base(type(self).__name__)
    self._add_lora(
        rank=rank, alpha=alpha, use_rslora=use_rslora, dropout=dropout,
        deterministic=deterministic, dtype=None, param_dtype=None,
        a_init=a_init, b_init=b_init, einsum_str=None, rngs=rngs,
        where=type(self).__name__)

  @classmethod
  def from_module(cls, module: nnx.Module, *, rank: int,
                  alpha: float | None = None, use_rslora: bool = False,
                  dropout: float = 0.0, deterministic: bool = False,
                  dtype: Dtype | None = None,
                  param_dtype: Dtype | None = None,
                  a_init: Initializer = default_a_init,
                  b_init: Initializer = default_b_init,
                  einsum_str: str | None = None,
                  rngs: nnx.Rngs | None) -> Any:
    """A LoRA version of `module` that shares its variables.

    The result holds `module`'s own Variable objects (the kernel is not
    copied) plus a fresh adapter; `module` itself is left unchanged.

    Args:
      module: a layer of exactly this class's `base_type`.
      rank: LoRA rank.
      alpha: scale numerator (`None`: `rank`, i.e. scale 1).
      use_rslora: scale by `alpha / sqrt(rank)`.
      dropout: adapter-input dropout rate.
      deterministic: initial dropout mode (`model.eval()` sets True).
      dtype: compute dtype of the update (`None`: the layer's `dtype`).
      param_dtype: dtype of A and B (`None`: the layer's `param_dtype`).
      a_init: initializer of A.
      b_init: initializer of B.
      einsum_str: `nnx.Einsum` only: the equation the layer is called
        with, when it was built without one.
      rngs: keys for the initializers (and dropout).

    Returns:
      The LoRA layer.

    Raises:
      TypeError: `module` is not exactly a `base_type`.
      ValueError: the layer cannot be adapted (see the subclass) or an
        option is out of range.
    """
    return cls._adapt(
        module, where=type(module).__name__, rank=rank, alpha=alpha,
        use_rslora=use_rslora, dropout=dropout, deterministic=deterministic,
        dtype=dtype, param_dtype=param_dtype, a_init=a_init, b_init=b_init,
        einsum_str=einsum_str, rngs=rngs)

  @classmethod
  def _adapt(cls, module: nnx.Module, *, where: str, **options) -> Any:
    """`from_module`, naming `where` (a model path) in errors."""
    if type(module) is not cls.base_type:
      raise TypeError(
          f'{cls.__name__} adapts nnx.{cls.base_type.__name__}; got '
          f'{type(module).__name__} at {where!r}. Pick the LoRA class of '
          'that layer type (peft.nnx.lora_class_for).'
      )
    layer = retype(module, cls)
    layer._check_base(where)
    layer._add_lora(where=where, **options)
    return layer

  def _check_base(self, where: str) -> None:
    """Raises if this layer's configuration cannot take an adapter."""

  def _equation(self, einsum_str: str | None,
                where: str) -> _einsum.EinsumEquation:
    raise NotImplementedError

  def _kernel(self) -> nnx.Variable:
    return getattr(self, self.weight_name)

  def _add_lora(self, *, rank, dtype, param_dtype, einsum_str, where,
                **options) -> None:
    eq = self._equation(einsum_str, where)
    plan = eq.lora_plan(weight_shape=self._kernel().shape, rank=rank,
                        where=where)
    self.lora = LoRAAdapter(
        plan.a_shape, plan.b_shape, plan.delta_str,
        einsum_str=eq.einsum_str if self.records_einsum else None,
        dtype=self.dtype if dtype is None else dtype,
        param_dtype=self.param_dtype if param_dtype is None else param_dtype,
        where=where, **options)

  def adapter_spec(self, path: Sequence[Any] = ()) -> _spec.AdapterSpec:
    """The `AdapterSpec` of this layer's adapter at model path `path`."""
    lora = self.lora
    return _spec.AdapterSpec(
        path=tuple(str(p) for p in path),
        layer_type=self.base_type.__name__, weight_name=self.weight_name,
        adapter_name='lora', weight_shape=tuple(self._kernel().shape),
        a_shape=tuple(lora.a.shape), b_shape=tuple(lora.b.shape),
        delta_str=lora.delta_str, einsum_str=lora.einsum_str,
        rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora)

  def _add_update(self, y: jax.Array, inputs: jax.Array,
                  eq: _einsum.EinsumEquation) -> jax.Array:
    """`y + scale * einsum(inputs, A, B)` for the layer's equation `eq`."""
    plan = eq.lora_plan(weight_shape=self._kernel().shape,
                        rank=self.lora.rank)
    if _layout(plan.delta_str) != _layout(self.lora.delta_str):
      raise ValueError(
          f'{type(self).__name__} was adapted for einsum '
          f'{self.lora.einsum_str!r} (delta {self.lora.delta_str!r}) but '
          f'is called with {eq.einsum_str!r}, which splits the kernel '
          'differently. Call it with one equation, or adapt it with '
          'from_module(..., einsum_str=<the equation you call>).'
      )
    update = self.lora.update(inputs, eq.einsum_str,
                              precision=getattr(self, 'precision', None))
    return y + update.astype(y.dtype)


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
    window = ''.join(c for c in string.ascii_lowercase if c not in 'ior')
    n = len(self.kernel_size)
    if n > len(window):
      raise ValueError(
          f'The conv at {where!r} has {n} spatial axes; LoRAConv supports '
          f'at most {len(window)}. Exclude it from the LoRA targets.'
      )
    w = window[:n]
    # Per output position a conv is this einsum over a window patch.
    return _einsum.EinsumEquation.parse(f'{w}i,{w}io->o', where=where)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding=out_sharding)
    x, a, b = self.lora.operands(inputs)
    # A runs through nnx.Conv's own code (padding modes, batch axes) on a
    # shallow copy of this layer that holds A as its kernel.
    rank_conv = retype(self, nnx.Conv)
    rank_conv.kernel = a
    rank_conv.kernel_shape = a.shape
    rank_conv.bias = nnx.data(None)
    rank_conv.use_bias = False
    rank_conv.out_features = self.lora.rank
    rank_conv.dtype = a.dtype
    low_rank = rank_conv(x)
    update = jnp.einsum('...r,ro->...o', low_rank, b,
                        precision=self.precision)
    return y + update.astype(y.dtype)


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

  def _equation(self, einsum_str, where):
    del einsum_str, where
    return _EMBED

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding=out_sharding)
    if self.num_embeddings == 1:  # nnx.Embed broadcasts its single row.
      inputs = jnp.zeros_like(inputs)
    rows = jnp.take(self.lora.a[...], inputs, axis=0)
    rows, _, b = self.lora.operands(rows)
    return y + (rows @ b).astype(y.dtype)

  def attend(self, query: jax.Array, out_sharding=None) -> jax.Array:
    y = super().attend(query, out_sharding=out_sharding)
    query, a, b = self.lora.operands(query, drop=False)
    return y + ((query @ b.T) @ a.T).astype(y.dtype)


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
  """Whether `module` is one of the LoRA layers above."""
  return isinstance(module, _LoRALayer)
