"""The LoRA adapter of flax.nnx: A and B of one kernel, and a standalone layer.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) learns a low-rank
update `W + scale * einsum(delta_str, A, B)` of a frozen kernel `W`; rsLoRA
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by
`alpha / sqrt(rank)` instead of `alpha / rank`. `LoRAAdapter` holds A and B
as `LoRAParam`s and computes the update `(x @ A) @ B * scale` for the
adapted layer's equation; the layers of `_nnx_layers` each hold one. `LoRA`
is the standalone layer of `flax.nnx`'s API, built on the same adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype
from flax.typing import Initializer
import jax
import jax.numpy as jnp
import numpy as np

from peft._core import einsum as _einsum
from peft._core import errors as _errors
from peft._core import options as _options
from peft._core import spec as _spec

LINEAR = _einsum.EinsumEquation.parse('...i,io->...o')
default_a_init = nnx.initializers.kaiming_uniform()
default_b_init = nnx.initializers.zeros_init()


class LoRAParam(nnx.LoRAParam):
  """The variable type of peft's LoRA factors A and B.

  A subclass of `flax.nnx.LoRAParam` (itself an `nnx.Param`), so
  `nnx.state(model, LoRAParam)` holds the adapters alone and
  `nnx.Optimizer(model, tx, wrt=LoRAParam)` trains only them.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> _ = peft.nnx.apply_lora(model, rank=1, rngs=nnx.Rngs(1))
    >>> type(model.layers[0].lora.a).__name__
    'LoRAParam'
    >>> adapters = nnx.state(model, peft.nnx.LoRAParam)  # no kernel, no bias
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(adapters))
    {'layers': {0: {'lora': {'a': (2, 1), 'b': (1, 3)}}}}
  """


_M = TypeVar('_M', bound=nnx.Module)


def retype(module: nnx.Module, cls: type[_M]) -> _M:
  """A shallow copy of `module` as an instance of `cls`.

  Uses the pickle protocol nnx modules support (`__getstate__` then
  `__setstate__`): the copy holds the very same Variable objects, and
  attributes keep their pytree data/static status, so only the type changes.
  """
  new = cls.__new__(cls)
  new.__setstate__(module.__getstate__())
  return new


def _stacked_init(init, key, stack, shape, dtype):
  """`init(key, shape)` once per stacked layer (fan-in stays per layer)."""
  if not stack:
    return init(key, shape, dtype)
  n = int(np.prod(stack))
  keys = jax.random.split(key, n) if key is not None else [None] * n
  values = [init(k, shape, dtype) for k in keys]
  return jnp.stack(values).reshape((*stack, *shape))


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
    stack_shape: leading layer axes of a kernel built under `nnx.vmap` (run
      by `nnx.scan`); A and B get them too, each layer initialised alone.

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
      stack_shape: Sequence[int] = (),
  ):
    at = _errors.at(where)
    options = _options.check_lora_options(
        where or type(self).__name__, rank=tuple(a_shape)[-1],
        alpha=alpha, use_rslora=use_rslora, dropout=dropout,
        deterministic=deterministic, dtype=dtype, param_dtype=param_dtype,
        a_init=a_init, b_init=b_init)
    self.rank = options['rank']
    self.alpha = options['alpha']
    self.use_rslora = options['use_rslora']
    self.delta_str = delta_str
    self.einsum_str = einsum_str
    self.dtype = dtype
    # Leading layer axes of A and B (and the kernel) under nnx.vmap.
    self.stack_shape = tuple(stack_shape)
    key = (lambda: rngs.params()) if rngs is not None else (lambda: None)
    self.a = LoRAParam(_stacked_init(a_init, key(), self.stack_shape,
                                     tuple(a_shape), param_dtype))
    self.b = LoRAParam(_stacked_init(b_init, key(), self.stack_shape,
                                     tuple(b_shape), param_dtype))
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
    return self.apply_plan(self.plan(einsum_str), x, precision=precision)

  def apply_plan(self, plan: _einsum.LoRAEinsumPlan, x: jax.Array, *,
                 precision: Any = None) -> jax.Array:
    """`update` for a plan the caller has made (one per layer call).

    Example:
      >>> adapter = LoRAAdapter((2, 1), (1, 3), 'ir,ro->io',
      ...                       rngs=nnx.Rngs(0))
      >>> plan = adapter.plan('...i,io->...o')
      >>> adapter.apply_plan(plan, jnp.ones((5, 2))).shape
      (5, 3)
    """
    return plan.apply(*self.operands(x), precision=precision)

  def plan(self, einsum_str: str) -> _einsum.LoRAEinsumPlan:
    """The LoRA plan of `einsum_str` for this adapter's kernel and rank."""
    a_axes, b_axes, weights = _einsum.split_delta(self.delta_str)
    dims = dict(zip(a_axes + b_axes, (*self.a.shape, *self.b.shape)))
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
    plan = LINEAR.lora_plan(weight_shape=(in_features, out_features),
                             rank=rank, where='LoRA')
    super().__init__(plan.a_shape, plan.b_shape, plan.delta_str,
                     einsum_str=LINEAR.einsum_str, rngs=rngs, **options)
    self.in_features = in_features
    self.out_features = out_features
    self.base_module = base_module

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    update = self.update(x, LINEAR.einsum_str)
    if self.base_module is None:
      return update
    y = self.base_module(x, *args, **kwargs)
    return y + update.astype(y.dtype)
