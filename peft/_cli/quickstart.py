"""`python -m peft quickstart`: the README's loop on a small MLP, in seconds.

Wraps a two-layer MLP with LoRA, trains only the adapters to fit
`sin(3x)`, fuses them and checks that the plain model on the fused params
matches the adapted model.
"""

from __future__ import annotations

from typing import Any

from peft._cli import base as base_lib
from peft._cli import forward as forward_lib


def run(args: Any) -> dict[str, Any]:
  """Wraps a small model, trains its adapters, fuses, checks, summarizes."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import peft  # pylint: disable=g-import-not-at-top

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.tanh(nn.Dense(64, name='hidden')(x))
      return nn.Dense(1, name='out')(h)

  model, x = Mlp(), jnp.linspace(-1.0, 1.0, 128)[:, None]
  target = jnp.sin(3 * x)
  base = model.init(jax.random.key(0), x)['params']
  surgery = peft.lora(rank=args.rank, targets='.*')
  with surgery as report:
    fresh = model.init(jax.random.key(1), x)['params']
  params = peft.merge_params(base, peft.split_params(fresh).lora)

  def predict(p) -> jax.Array:
    return forward_lib.forward(model, {'params': p}, x)

  def loss_fn(p):
    with surgery:
      return jnp.mean((predict(p) - target) ** 2)

  tx = peft.train_only_adapters(optax.adam(args.learning_rate))
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  first = float(loss_fn(params))
  for _ in range(args.steps):
    params, opt_state, _ = step(params, opt_state)
  last = float(loss_fn(params))
  fused = peft.fuse_params(params, report.specs)
  with surgery:
    adapted = predict(params)
  gap = float(jnp.abs(predict(fused) - adapted).max())
  print(report.summary(params))
  print(f'loss {first:.4f} -> {last:.4f} after {args.steps} adapter steps')
  print(f'fused plain model vs adapted model: max |diff| = {gap:.2e}')
  if not (last < first and gap < 1e-4):
    raise base_lib.CliError(
        f'quickstart check failed: loss {first:.4g} -> {last:.4g}, fused gap '
        f'{gap:.2g}. Try more --steps or another --learning-rate.')
  return {'first_loss': first, 'last_loss': last, 'gap': gap}
