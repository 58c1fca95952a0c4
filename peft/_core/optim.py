"""Optax helpers to train only the adapters (optionally biases and scales),
and LoRA+ (a larger learning rate for B than for A).

LoRA (Hu et al. 2021) freezes the pretrained weights and trains only the
adapters. `train_only_adapters` wraps any optax optimizer so that every
other param gets a zero update and, because the frozen params are masked
out of the inner optimizer, no optimizer state: Adam's moments cost memory
proportional to the adapters, not to the model.

The leanest alternative is to differentiate only the adapters: split the
params with `split_params`, take `jax.grad` with respect to the lora tree
and give a plain optimizer that tree. The helpers here suit training code
that handles the whole param tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from peft._core import params as _params

TRAINABLE = 'trainable'
FROZEN = 'frozen'


def _key_name(entry: Any) -> Any:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def adapter_mask(params: Any, *, train_vectors: bool = False) -> Any:
  """A tree of bools like `params`: True where a param should train.

  True for every leaf inside an adapter branch (a key `'lora'` or
  `'lora_*'`) and, with `train_vectors=True`, for every 1-D param (biases,
  norm scales), as in BitFit-style recipes. False elsewhere.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3),
    ...                     'lora': {'a': jnp.ones((2, 1)),
    ...                              'b': jnp.ones((1, 3))}}}
    >>> adapter_mask(params)
    {'dense': {'bias': False, 'kernel': False, 'lora': {'a': True, 'b': True}}}
    >>> adapter_mask(params, train_vectors=True)['dense']['bias']
    True

  Args:
    params: the param tree (dict or FrozenDict), base and adapters merged.
    train_vectors: also train 1-D params.

  Returns:
    A tree of Python bools with the structure of `params`.
  """

  def trainable(path, leaf) -> bool:
    if any(_params.is_adapter_key(_key_name(k)) for k in path):
      return True
    return bool(train_vectors and np.ndim(leaf) == 1)

  return jax.tree_util.tree_map_with_path(trainable, params)


def adapter_labels(params: Any, *, train_vectors: bool = False) -> Any:
  """`adapter_mask` as `'trainable'`/`'frozen'` labels for multi_transform.

  Example:
    >>> import jax.numpy as jnp
    >>> adapter_labels({'w': jnp.ones((2, 2)), 'lora': {'a': jnp.ones(2)}})
    {'lora': {'a': 'trainable'}, 'w': 'frozen'}
  """
  mask = adapter_mask(params, train_vectors=train_vectors)
  return jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)


def _trainable_labels(params: Any, *, mask: Any, train_vectors: bool,
                      name: str) -> Any:
  """`'trainable'`/`'frozen'` per leaf; an error when nothing trains."""
  if mask is None:
    tree = adapter_mask(params, train_vectors=train_vectors)
  else:
    tree = mask(params) if callable(mask) else mask
  flags = jax.tree.leaves(tree)
  if not any(bool(f) for f in flags):
    raise ValueError(
        f'{name}: no param is trainable (the mask is all False; the params '
        'hold no branch named "lora" or "lora_*"). Pass params merged with '
        'their adapters (merge_params), or train_vectors=True / a mask.'
    )
  return jax.tree.map(lambda m: TRAINABLE if m else FROZEN, tree)


def train_only_adapters(
    tx: optax.GradientTransformation,
    *,
    train_vectors: bool = False,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `tx` so only adapter params are updated and hold state.

  Built on `optax.multi_transform`: trainable params go through `tx`, the
  rest through `optax.set_to_zero()`, so `optax.apply_updates` leaves the
  frozen params bit-identical and `tx` keeps no state for them.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'dense': {'kernel': jnp.ones((64, 64)),
    ...                     'lora': {'a': jnp.ones((64, 1)),
    ...                              'b': jnp.ones((1, 64))}}}
    >>> tx = train_only_adapters(optax.adam(1e-2))
    >>> state = tx.init(params)
    >>> sum(x.size for x in jax.tree.leaves(state))  # moments + count
    257
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> float(jnp.abs(updates['dense']['kernel']).max())
    0.0

  Args:
    tx: the optimizer for the adapters (e.g. `optax.adamw(1e-3)`).
    train_vectors: also train 1-D params (biases, norm scales).
    mask: which params train, overriding the default `adapter_mask`: a tree
      of bools like the params, or a function `params -> tree of bools`.

  Returns:
    An optax transformation over the whole param tree.

  Raises:
    TypeError: `tx` is not an optax transformation.
    ValueError: (at `init`) nothing would train, e.g. the params hold no
      adapter branches.
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(
        f'train_only_adapters: tx must be an optax GradientTransformation; '
        f'got {tx!r:.80}. Pass e.g. optax.adam(1e-3).'
    )

  def labels(params):
    return _trainable_labels(params, mask=mask, train_vectors=train_vectors,
                             name='train_only_adapters')

  return optax.multi_transform(
      {TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


LORA_B = 'lora_b'


def _is_lora_b(path: Any) -> bool:
  """Whether `path` is a B factor: key `'b'` right below an adapter key."""
  keys = [_key_name(k) for k in path]
  return (len(keys) >= 2 and keys[-1] == 'b'
          and _params.is_adapter_key(keys[-2]))


def lora_plus(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    *,
    ratio: float = 16.0,
    train_vectors: bool = False,
    mask: Any | Callable[[Any], Any] | None = None,
    **optimizer_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """LoRA+: the adapters' B factors learn `ratio` times faster than A.

  LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354) shows that
  with one learning rate for A and B, B learns too slowly in wide models,
  and trains B with a learning rate `ratio` (about 16) times A's. As
  `train_only_adapters`, every param outside the adapters gets a zero
  update and no optimizer state; A (and, with `train_vectors`, the 1-D
  params) use `learning_rate`, B uses `ratio * learning_rate`, each with
  its own state of `optimizer`.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'kernel': jnp.ones((2, 2)),
    ...           'lora': {'a': jnp.ones((2, 1)), 'b': jnp.ones((1, 2))}}
    >>> tx = lora_plus(optax.sgd, learning_rate=0.1, ratio=4.0)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates['lora']['a'].ravel().tolist(), updates['lora']['b'].ravel(
    ...     ).tolist(), float(jnp.abs(updates['kernel']).max())
    ([-0.1, -0.1], [-0.4, -0.4], 0.0)

  Args:
    optimizer: an optax optimizer factory taking `learning_rate`, e.g.
      `optax.adamw`.
    learning_rate: A's learning rate, a number or an optax schedule.
    ratio: B's learning rate over A's (LoRA+'s lambda; the paper suggests
      16).
    train_vectors: also train 1-D params (biases, norm scales), at A's
      rate.
    mask: which params train, as in `train_only_adapters`; B factors among
      them (key `'b'` under an adapter key) get the larger rate.
    **optimizer_kwargs: passed to `optimizer` (e.g. `weight_decay=0.01`).

  Returns:
    An optax transformation over the whole param tree (or an nnx state of
    `peft.nnx.LoRAParam`s, as `nnx.Optimizer(..., wrt=LoRAParam)` gives).

  Raises:
    ValueError: `ratio` is not a finite number > 0, or (at `init`)
      nothing would train.
    TypeError: `optimizer` does not build an optax transformation.
  """
  if (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
      or not np.isfinite(ratio) or ratio <= 0):
    raise ValueError(
        f'lora_plus: ratio must be a finite number > 0; got {ratio!r}. Pass '
        'e.g. ratio=16.0 (B learns 16 times faster than A).'
    )
  if callable(learning_rate):
    schedule = learning_rate
    b_rate: float | optax.Schedule = lambda count: ratio * schedule(count)
  else:
    b_rate = ratio * learning_rate
  transforms = {}
  for label, rate in ((TRAINABLE, learning_rate), (LORA_B, b_rate)):
    tx = optimizer(learning_rate=rate, **optimizer_kwargs)
    if not isinstance(tx, optax.GradientTransformation):
      raise TypeError(
          f'lora_plus: optimizer(learning_rate=...) must return an optax '
          f'GradientTransformation; {optimizer!r:.60} returned {tx!r:.60}. '
          'Pass an optax factory such as optax.adamw.'
      )
    transforms[label] = tx

  def labels(params):
    tree = _trainable_labels(params, mask=mask, train_vectors=train_vectors,
                             name='lora_plus')
    return jax.tree_util.tree_map_with_path(
        lambda path, label: LORA_B if label == TRAINABLE and _is_lora_b(path)
        else label, tree)

  return optax.multi_transform(
      {**transforms, FROZEN: optax.set_to_zero()}, labels)
