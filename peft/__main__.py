"""The main job: `python -m peft <command>` (see `--help`)."""

import argparse
import sys


def _quickstart(args: argparse.Namespace) -> int:
  """Wrap a small model, train its adapters, fuse, check, summarize."""
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

  def loss_fn(p):
    with surgery:
      return jnp.mean((model.apply({'params': p}, x) - target) ** 2)

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
    adapted = model.apply({'params': params}, x)
  gap = float(jnp.abs(model.apply({'params': fused}, x) - adapted).max())
  print(report.summary(params))
  print(f'loss {first:.4f} -> {last:.4f} after {args.steps} adapter steps')
  print(f'fused plain model vs adapted model: max |diff| = {gap:.2e}')
  return 0 if last < first and gap < 1e-4 else 1


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m peft', description=(
      'Parameter-efficient fine-tuning for JAX/Flax.'))
  commands = parser.add_subparsers(dest='command', required=True)
  quick = commands.add_parser('quickstart', help=_quickstart.__doc__)
  quick.add_argument('--rank', type=int, default=4)
  quick.add_argument('--steps', type=int, default=200)
  quick.add_argument('--learning-rate', type=float, default=3e-2)
  quick.set_defaults(run=_quickstart)
  args = parser.parse_args(argv)
  return args.run(args)


if __name__ == '__main__':
  sys.exit(main())
