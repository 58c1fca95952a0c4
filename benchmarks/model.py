"""A small Gemma-style decoder used by the benchmarks.

Pre-norm blocks of grouped-query attention and a gated feed-forward layer,
every projection an `nn.Einsum` (the way Gemma's own code writes them, so
LoRA surgery meets the same einsum equations there), rotary position
embeddings, and a tied output layer (`nn.Embed.attend`). With the defaults
(4 layers, d_model 512, vocabulary 8192) it holds about 20M params; every
size is a field of `Config` and a flag of `benchmarks/run.py`.

This is a benchmark fixture, not a reference implementation of Gemma: it
has the same layer shapes and einsums, not the same numerics.
"""

from __future__ import annotations

import dataclasses

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Model sizes.

  Attributes:
    vocab: vocabulary size (the embedding is tied to the output layer).
    d_model: residual width.
    layers: number of decoder blocks.
    heads: query heads.
    kv_heads: key/value heads (grouped-query attention); divides `heads`.
    head_dim: width of one head.
    ffn: hidden width of the gated feed-forward layer.
  """

  vocab: int = 8192
  d_model: int = 512
  layers: int = 4
  heads: int = 8
  kv_heads: int = 4
  head_dim: int = 64
  ffn: int = 2048

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f'Config.{field.name} must be a positive int; got {value!r}. '
            f'Pass e.g. --{field.name.replace("_", "-")} 8.'
        )
    if self.heads % self.kv_heads:
      raise ValueError(
          f'Config.heads ({self.heads}) must be a multiple of kv_heads '
          f'({self.kv_heads}). Pass e.g. --kv-heads 1 or --kv-heads '
          f'{self.heads}.'
      )

  def param_count(self) -> int:
    """Number of params of `Decoder(self)` (checked by the benchmark)."""
    d, h = self.d_model, self.head_dim
    block = (d * self.heads * h          # q
             + 2 * self.kv_heads * d * h  # k and v
             + self.heads * h * d         # o
             + 3 * d * self.ffn           # gate, up, down
             + 2 * d)                     # two norm scales
    return self.vocab * d + self.layers * block + d


def _rope(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotary position embedding on the last axis of `x` (`...TNH`)."""
  half = x.shape[-1] // 2
  freq = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = positions[:, None].astype(jnp.float32) * freq  # (T, half)
  sin = jnp.sin(angle)[:, None, :]
  cos = jnp.cos(angle)[:, None, :]
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate(
      [first * cos - second * sin, second * cos + first * sin], axis=-1)


class Attention(nn.Module):
  """Causal grouped-query attention with Gemma's einsum layouts."""

  config: Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    q = nn.Einsum((c.heads, c.d_model, c.head_dim), 'BTD,NDH->BTNH',
                  use_bias=False, name='q')(x)
    k, v = nn.Einsum((2, c.kv_heads, c.d_model, c.head_dim),
                     'BSD,CKDH->CBSKH', use_bias=False, name='kv')(x)
    positions = jnp.arange(x.shape[1])
    q, k = _rope(q, positions), _rope(k, positions)
    group = c.heads // c.kv_heads
    q = q.reshape(*q.shape[:2], c.kv_heads, group, c.head_dim)
    logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k) * c.head_dim ** -0.5
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v)
    out = out.reshape(*out.shape[:2], c.heads, c.head_dim)
    return nn.Einsum((c.heads, c.head_dim, c.d_model), 'BTNH,NHD->BTD',
                     use_bias=False, name='o')(out)


class FeedForward(nn.Module):
  """Gated feed-forward layer: `down(gelu(gate(x)) * up(x))`."""

  config: Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate, up = nn.Einsum((2, c.d_model, c.ffn), 'BTD,CDF->CBTF',
                         use_bias=False, name='gating')(x)
    return nn.Einsum((c.ffn, c.d_model), 'BTF,FD->BTD', use_bias=False,
                     name='linear')(jax.nn.gelu(gate) * up)


class Block(nn.Module):
  """Pre-norm residual block: attention, then the feed-forward layer."""

  config: Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + Attention(self.config, name='attn')(nn.RMSNorm(name='norm1')(x))
    return x + FeedForward(self.config, name='mlp')(
        nn.RMSNorm(name='norm2')(x))


class Decoder(nn.Module):
  """Tokens `(B, T)` to next-token logits `(B, T, vocab)`.

  Example:
    >>> cfg = Config(vocab=16, d_model=8, layers=1, heads=2, kv_heads=1,
    ...              head_dim=4, ffn=16)
    >>> tokens = jnp.zeros((1, 3), jnp.int32)
    >>> params = Decoder(cfg).init(jax.random.key(0), tokens)['params']
    >>> sorted(params['block0']['attn'])
    ['kv', 'o', 'q']
    >>> Decoder(cfg).apply({'params': params}, tokens).shape
    (1, 3, 16)
  """

  config: Config

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    c = self.config
    embed = nn.Embed(c.vocab, c.d_model, name='embed')
    x = embed(tokens) * jnp.sqrt(float(c.d_model))
    for i in range(c.layers):
      x = Block(c, name=f'block{i}')(x)
    return embed.attend(nn.RMSNorm(name='final_norm')(x))


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting `tokens[:, 1:]` from the logits."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:]).mean()


def random_tokens(config: Config, *, batch: int, seq: int,
                  seed: int = 0) -> jax.Array:
  """A `(batch, seq)` int32 batch from numpy's RNG (no XLA compile)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, config.vocab, (batch, seq)), jnp.int32)


def random_like(tree, *, seed: int, scale: float):
  """Random arrays shaped like `tree`'s leaves, from numpy's RNG.

  Float matrices get `scale * N(0, 1) / sqrt(shape[-2])` (the contracted
  axis of most kernels), float vectors (norm scales) get ones, integer
  arrays (quantized codes) uniform values of their dtype.

  Args:
    tree: a pytree of arrays or `jax.ShapeDtypeStruct`s.
    seed: numpy seed.
    scale: standard deviation before the fan-in division.

  Returns:
    A pytree of `jax.Array`s.
  """
  rng = np.random.default_rng(seed)

  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.integer):  # e.g. quantized codes
      info = jnp.iinfo(x.dtype)
      return jnp.asarray(rng.integers(info.min, info.max, x.shape), x.dtype)
    if len(x.shape) < 2:
      return jnp.asarray(np.ones(x.shape, np.float32), x.dtype)
    values = rng.standard_normal(x.shape, np.float32)
    return jnp.asarray(values * (scale / x.shape[-2] ** 0.5), x.dtype)

  return jax.tree.map(fill, tree)
