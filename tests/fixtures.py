"""Small test models, one place for the whole suite.

They cover each adaptable layer type, a module called twice, nested modules
built in `setup`, and a custom Einsum layer (called as `layer(eqn, x)`) whose
feed-forward block calls two such layers inside one shared scope.
"""

import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import peft

VOCAB, D, HEADS, HEAD_DIM, FFN = 11, 8, 2, 4, 6


class Zoo(nn.Module):
  """Embed -> DenseGeneral -> Einsum -> Conv -> Dense -> tied attend."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, D, dtype=self.dtype, name='embed')
    x = embed(tokens)
    q = nn.DenseGeneral((HEADS, HEAD_DIM), dtype=self.dtype, name='q')(x)
    x = x + nn.Einsum((HEADS, HEAD_DIM, D), 'BTNH,NHD->BTD',
                      dtype=self.dtype, name='out')(q)
    x = x + nn.Conv(D, kernel_size=(3,), dtype=self.dtype, name='conv')(x)
    x = nn.Dense(D, dtype=self.dtype, name='mlp')(jax.nn.gelu(x))
    return embed.attend(x)


class CalledTwice(nn.Module):
  """One Dense applied twice: both calls must share one adapter."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(x.shape[-1], name='shared')
    return dense(jnp.tanh(dense(x)))


class Block(nn.Module):
  def setup(self):
    self.inner = nn.Dense(D, name='inner')

  def __call__(self, x):
    return x + self.inner(x)


class Nested(nn.Module):
  """Layers built in `setup`, two levels deep."""

  def setup(self):
    self.blocks = [Block(name=f'block{i}') for i in range(2)]
    self.head = nn.Dense(3)

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return self.head(x)


class MyEinsum(nn.Module):
  """A model's own einsum layer, as LLM codebases write them."""

  shape: tuple[int, ...]
  weight_name: str = 'w'

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param(self.weight_name, nn.initializers.normal(), self.shape)
    return jnp.einsum(eqn, x, w)


peft.register_einsum_layer(MyEinsum, weight_name=lambda m: m.weight_name)


class SharedScopeFeedForward(nn.Module):
  """Two custom einsums whose params land in this one scope."""

  def setup(self):
    self.gating_layer = MyEinsum((2, D, FFN), weight_name='gating_einsum')
    self.linear_layer = MyEinsum((FFN, D), weight_name='linear')
    nn.share_scope(self, self.gating_layer)
    nn.share_scope(self, self.linear_layer)

  def __call__(self, x):
    gate_up = self.gating_layer('...D,CDF->C...F', x)
    gate, up = gate_up[0], gate_up[1]
    return self.linear_layer('...F,FD->...D', jax.nn.gelu(gate) * up)


class CustomModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + MyEinsum((D, D), name='proj')('btd,de->bte', x)
    return x + SharedScopeFeedForward(name='mlp')(x)


class _Config:
  """A plain config object, as third-party models carry one."""

  num_layers = 2
  width = D


class ThirdPartyStyle(nn.Module):
  """Written the way gemma's Transformer is, not the way peft would like.

  Blocks built in `setup`, a `__getattr__` that forwards to the config, a
  property, `__call__` compiled by flax's `nn.jit` (its own trace cache)
  and a second method (`encode`) that runs the same layers.
  """

  config: _Config = _Config()

  def setup(self):
    self.blocks = [Block(name=f'layer_{i}')
                   for i in range(self.config.num_layers)]
    self.head = nn.Dense(3, name='head')

  def __getattr__(self, name):
    if name == 'width':
      return self.config.width
    return super().__getattr__(name)

  @property
  def depth(self) -> int:
    return self.config.num_layers

  def encode(self, x):
    for block in self.blocks:
      x = block(x)
    return x

  @functools.partial(nn.jit, static_argnames=('self',))
  def __call__(self, x):
    return self.head(self.encode(x))


class ScanBlock(nn.Module):
  """One layer for `nn.scan`: `(carry, _) -> (carry, None)`."""

  @nn.compact
  def __call__(self, x, _):
    x = x + nn.Dense(D, name='up')(jnp.tanh(x))
    return x, None


class Scanned(nn.Module):
  """Layers stacked by `nn.scan` (params get a leading layer axis)."""

  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(ScanBlock, variable_axes={'params': 0},
                    split_rngs={'params': True}, length=self.num_layers)
    x, _ = stack(name='layers')(x, None)
    return nn.Dense(2, name='head')(x)


class Remat(nn.Module):
  """Blocks under `nn.remat`, as memory-saving training code writes them."""

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.remat(Block)(name=f'block{i}')(x)
    return x


class Vmapped(nn.Module):
  """One Dense per ensemble member through `nn.vmap` over params."""

  @nn.compact
  def __call__(self, x):
    ensemble = nn.vmap(nn.Dense, variable_axes={'params': 0},
                       split_rngs={'params': True}, in_axes=0, out_axes=0)
    return ensemble(D, name='members')(x)


# Test data comes from numpy's RNG: eager jax.random calls would each
# trigger an XLA compile, which dominates small tests.


def tokens(batch: int = 2, length: int = 5) -> jax.Array:
  rng = np.random.default_rng(1)
  return jnp.asarray(rng.integers(0, VOCAB, (batch, length)), jnp.int32)


def features(shape=(2, 5, D), dtype=jnp.float32) -> jax.Array:
  rng = np.random.default_rng(2)
  return jnp.asarray(rng.standard_normal(shape), dtype)


def randomize_adapters(params, seed: int = 3, scale: float = 0.3):
  """Replaces every adapter leaf by random values (B no longer zero)."""
  rng = np.random.default_rng(seed)

  def randomize(path, leaf):
    if any(str(getattr(p, 'key', '')).startswith('lora') for p in path):
      values = scale * rng.standard_normal(leaf.shape)
      return jnp.asarray(values, dtype=leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(randomize, params)


def random_params(init, *args, seed=0, scale=0.3):
  """Random `init(*args)['params']` (adapters too) without compiling init."""
  shapes = jax.eval_shape(init, *args)['params']
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(scale * rng.standard_normal(x.shape, np.float32), x.dtype)
      for x in leaves])
