"""The CLI's forward pass: `model.apply` typed as returning an array."""

from __future__ import annotations

from typing import Any, cast

from flax import linen as nn
import jax


def forward(model: nn.Module, variables: Any, *args: Any,
            rngs: Any = None) -> jax.Array:
  """`model.apply(variables, *args, rngs=rngs)`: the output, an array.

  Without `mutable`, `apply` returns the output alone; flax's return type
  also allows an `(output, variables)` pair, which never comes back here
  since this takes no `mutable`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> dense, x = nn.Dense(2), jnp.ones((1, 3))
    >>> variables = dense.init(jax.random.key(0), x)
    >>> y = forward(dense, variables, x)
    >>> y.shape, bool((y == dense.apply(variables, x)).all())
    ((1, 2), True)

  Args:
    model: the linen model.
    variables: its variables, e.g. `{'params': params}`.
    *args: the model's call arguments.
    rngs: the rngs for `apply` (e.g. `{'dropout': key}`), or None.

  Returns:
    The model's output.
  """
  return cast(jax.Array, model.apply(variables, *args, rngs=rngs))
