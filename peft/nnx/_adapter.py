"""The LoRA adapter of flax.nnx: A and B of one kernel, and a standalone layer.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) learns a low-rank
update `W + scale * einsum(delta_str, A, B)` of a frozen kernel `W`; rsLoRA
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by
`alpha / sqrt(rank)` instead of `alpha / rank`. `LoRAAdapter` holds A and B
as `LoRAParam`s and computes the update `(x @ A) @ B * scale` for the
adapted layer's equation; the layers of `_nnx_layers` each hold one. `LoRA`
is the standalone layer of `flax.nnx`'s API, built on the same adapter.
With `use_dora` (DoRA: Liu et al. 2024, https://arxiv.org/abs/2402.09353)
the adapter also holds the magnitude `m` (a `LoRAParam`, started at the
kernel's per-output-feature norm) and computes DoRA's correction of the
layer's output (`peft._core.dora`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype
import jax
import jax.numpy as jnp
import numpy as np

from peft._core import active_adapter as _active
from peft._core import dora as _dora
from peft._core import einsum as _einsum
from peft._core import errors as _errors
from peft._core import options as _options

LINEAR = _einsum.EinsumEquation.parse('...i,io->...o')


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


# The nnx layers name the A/B dtype `param_dtype` and the compute dtype
# `dtype` (nnx's convention); `LoRAOptions.dtype` is the A/B dtype.
def nnx_options(where: str, *, param_dtype: Any = None,
                **values: Any) -> _options.LoRAOptions:
  """`LoRAOptions` from nnx-style keywords (`param_dtype` is A/B's dtype).

  Example:
    >>> nnx_options('LoRALinear', rank=2, param_dtype=jnp.bfloat16).dtype
    <class 'jax.numpy.bfloat16'>

  Args:
    where: who received the options, quoted in errors.
    param_dtype: dtype of A and B (`None`: the adapted layer's).
    **values: the other `LoRAOptions` (rank, alpha, ...). `dtype` is not
      one: in nnx it is the compute dtype.

  Raises:
    ValueError: a bad value, or `dtype` among `values`.
  """
  if 'dtype' in values:
    raise ValueError(
        f'{where}: in peft.nnx the dtype of A and B is param_dtype; got '
        f'dtype={values["dtype"]!r} among the LoRA options. Pass '
        'param_dtype=... (the update is computed in the layer\'s dtype).'
    )
  # Checked under its nnx name, so the message says what the user wrote.
  _options.check_lora_options(where, param_dtype=param_dtype)
  return _options.LoRAOptions.checked(where, dtype=param_dtype, **values)


class LoRAAdapter(nnx.Module):
  """A and B of one adapted kernel, and the update they compute.

  The update is `scale * (dropout(x) @ A) @ B` for the adapted layer's
  equation `inputs,weights->outputs`; B starts at zero, so the update is
  exactly zero at init. The LoRA options are one `LoRAOptions`
  (`adapter.options`), given as `options=` or as keywords.

  Example:
    >>> adapter = LoRAAdapter((2, 1), (1, 3), 'ir,ro->io', alpha=2.0,
    ...                       rngs=nnx.Rngs(0))
    >>> adapter.a.shape, adapter.b.shape, adapter.rank, adapter.scale
    ((2, 1), (1, 3), 1, 2.0)
    >>> adapter.update(jnp.ones((5, 2)), '...i,io->...o').tolist()[0]
    [0.0, 0.0, 0.0]
    >>> import peft
    >>> options = peft.LoRAOptions(rank=1, alpha=4.0)
    >>> LoRAAdapter((2, 1), (1, 3), 'ir,ro->io', options=options,
    ...             rngs=nnx.Rngs(0)).scale
    4.0

  Args:
    a_shape: shape of A (input-side axes of the kernel, then the rank).
    b_shape: shape of B (the rank, then the other kernel axes).
    delta_str: `a,b->weights`, so `einsum(delta_str, A, B)` is shaped like
      the kernel.
    options: the `LoRAOptions`; its rank must be A's last axis, its
      `dtype` is the dtype of A and B (`None`: float32), and
      `deterministic=None` starts dropout on.
    einsum_str: the adapted layer's equation, where it has a fixed one.
    dtype: compute dtype of the update (`None`: promote x, A and B).
    rngs: `params` keys for the initializers; a `dropout` (or `default`)
      stream when `dropout > 0`.
    where: where the adapter sits, quoted in errors.
    stack_shape: leading layer axes of a kernel built under `nnx.vmap` (run
      by `nnx.scan`); A and B get them too, each layer initialised alone.
    kernel: with `use_dora`, the adapted kernel (with the stack axes);
      `m` starts at its norm.
    magnitude_axes: with `use_dora`, the kernel axes the layer's output
      keeps (`EinsumEquation.magnitude_axes`), per layer.
    **option_values: instead of `options`, the LoRA options as keywords
      (alpha, use_rslora, dropout, deterministic, param_dtype, a_init,
      b_init); the rank is A's last axis.

  Raises:
    ValueError: a rank, alpha or dropout out of range, a rank that is not
      A's, both `options` and keywords, a dropout without an rng stream
      for it, or `use_dora` without the kernel.
  """

  def __init__(
      self,
      a_shape: Sequence[int],
      b_shape: Sequence[int],
      delta_str: str,
      *,
      options: _options.LoRAOptions | None = None,
      einsum_str: str | None = None,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs | None,
      where: str = '',
      stack_shape: Sequence[int] = (),
      kernel: jax.Array | None = None,
      magnitude_axes: Sequence[int] = (),
      **option_values: Any,
  ):
    where = where or type(self).__name__
    rank = tuple(a_shape)[-1]
    if options is None:
      option_values.setdefault('param_dtype', jnp.float32)
      options = nnx_options(where, rank=rank, **option_values)
    elif option_values:
      raise ValueError(
          f'{where}: pass options=LoRAOptions(...) or option keywords, not '
          f'both; got options and {sorted(option_values)}. Use '
          'options.replace(...) to change some.'
      )
    elif options.rank != rank:
      raise ValueError(
          f'{where}: options.rank={options.rank} but A {tuple(a_shape)} has '
          f'rank {rank}. Make A and B with the options\' rank.'
      )
    self.options = options
    self.delta_str = delta_str
    self.einsum_str = einsum_str
    self.dtype = dtype
    # Leading layer axes of A and B (and the kernel) under nnx.vmap.
    self.stack_shape = tuple(stack_shape)
    param_dtype = jnp.float32 if options.dtype is None else options.dtype
    key = (lambda: rngs.params()) if rngs is not None else (lambda: None)
    self.a = LoRAParam(_stacked_init(options.a_init, key(), self.stack_shape,
                                     tuple(a_shape), param_dtype))
    self.b = LoRAParam(_stacked_init(options.b_init, key(), self.stack_shape,
                                     tuple(b_shape), param_dtype))
    self.magnitude_axes = tuple(magnitude_axes) if options.use_dora else ()
    if options.use_dora:
      if kernel is None:
        raise ValueError(
            f'{where}: use_dora=True needs the adapted kernel (DoRA rescales '
            'the layer\'s output by m / ||W + scale * BA||); got none. Use '
            'a LoRA layer (peft.nnx.LoRALinear(..., use_dora=True)) or '
            'peft.nnx.apply_lora(model, rank=..., use_dora=True).'
        )
      self.m = LoRAParam(_dora.column_norm(
          kernel, self.magnitude_axes,
          n_stack=len(self.stack_shape)).astype(param_dtype))
    drop = None
    if options.dropout > 0.0:
      try:
        drop = nnx.Dropout(options.dropout,
                           deterministic=bool(options.deterministic),
                           rngs=rngs)
      except (KeyError, TypeError):
        raise ValueError(
            f'LoRA dropout={options.dropout!r}{_errors.at(where)} needs an '
            f'rng stream for its masks but rngs={rngs!r:.60} has none. Pass '
            'rngs=nnx.Rngs(0) (or nnx.Rngs(params=0, dropout=1)).'
        ) from None
    self.dropout = drop
    # Adapters stacked in A and B by `peft.nnx.load_bank` (0: one adapter).
    self.bank_size = 0

  @property
  def rank(self) -> int:
    return self.options.rank

  @property
  def alpha(self) -> float | None:
    return self.options.alpha

  @property
  def use_rslora(self) -> bool:
    return self.options.use_rslora

  @property
  def scale(self) -> float:
    """`alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA)."""
    return self.options.scale

  def operands(self, x: jax.Array, *, drop: bool = True):
    """`(dropout(x), A, scale * B)`, cast to the compute dtype.

    Under `peft.adapters_disabled()` B is zeros, so the layer computes its
    base output exactly. A bank's A and B (`load_bank`) keep their bank
    axis; `selected` picks from it.

    Raises:
      ValueError: a bank selection on an adapter that holds no bank of its
        size, or a bank without a selection.
    """
    selection = _active.current()
    size = None if selection is None else selection.size
    if size != (self.bank_size or None):
      held = (f'holds a bank of {self.bank_size} adapters'
              if self.bank_size else 'holds one adapter')
      given = ('no bank selection' if size is None
               else f'a selection of a bank of {size}')
      raise ValueError(
          f'The nnx LoRA adapter of kernel {self.delta_str!r} {held}, but '
          f'{given} is in effect. Load the bank with peft.nnx.load_bank and '
          'call the model under that bank\'s active(...).')
    if drop and self.dropout is not None:
      x = self.dropout(x)
    x, a, b = dtypes.promote_dtype((x, self.a[...], self.b[...]),
                                   dtype=self.dtype)
    if selection is not None and selection.off and size is None:  # Disabled.
      return x, a, jnp.zeros_like(b)
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
    return self.selected(
        lambda x, a, b: plan.apply(x, a, b, precision=precision), x,
        batch_axis=plan.batch_axis)

  def selected(self, update: Any, x: jax.Array, *, drop: bool = True,
               ids: bool = False,
               batch_axis: Any = lambda ndim: 0) -> jax.Array:
    """`update(x, A, scale * B)` (after `operands`) for the adapter(s) a
    bank selection picks; the plain update without one (see
    `peft._core.active_adapter`). Under per-row ids no dropout applies (it
    cannot run per row). `ids=True`: `x` are token ids, passed as they
    are (A and B are cast as for a float input of A's dtype)."""
    if ids:
      _, a, b = self.operands(self.a[...], drop=False)
    else:
      x, a, b = self.operands(x, drop=drop and not _active.per_row())
    return _active.apply(update, x, a, b, where=self.delta_str,
                         batch_axis=batch_axis)

  def dora_correction(self, eq: _einsum.EinsumEquation, kernel: jax.Array,
                      y: jax.Array, bias: jax.Array | None,
                      update: jax.Array) -> jax.Array:
    """What turns `y` (the layer's output) into DoRA's: `y + this`.

    `(g - 1) * (y - bias) + g * update` with `g = m / ||W + scale * BA||`
    (the norm held constant in the backward pass), laid out over the
    output of `eq`; see `peft._core.dora`. Zeros under
    `peft.adapters_disabled()`: the layer's base output.
    """
    if _active.current() is not None:  # Disabled (operands refuses banks).
      return jnp.zeros_like(y)
    axes = self.magnitude_axes
    norm = _dora.weight_norm(kernel, self.a[...], self.b[...], self.scale,
                             delta_str=self.delta_str, magnitude_axes=axes)
    g = eq.to_outputs(_dora.rescale(self.m[...], norm), y.ndim)
    y0 = y if bias is None else y - eq.to_outputs(
        jnp.asarray(bias), y.ndim).astype(y.dtype)
    return _dora.correction(y0, update, g, y.dtype)

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
    **options: `LoRAAdapter` options (`options=LoRAOptions(...)`, or
      alpha, use_rslora, dropout, deterministic, param_dtype, a_init,
      b_init) and its compute `dtype`.
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
