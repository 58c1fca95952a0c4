"""A small, readable Llama/Gemma-family decoder in Flax linen.

It is written the way production LLM code is (einsum layers, stacked
key/value projections, a gated feed-forward whose two kernels share one
scope, tied embeddings), so that model surgery can adapt it without edits.
Rotary position embeddings follow Su et al. 2021 in the rotate-half layout
of Hugging Face's Llama; attention is grouped-query (Ainslie et al. 2023).

`Decoder.__call__` runs a whole sequence; `Decoder.decode` runs a chunk
against a key/value cache made by `init_cache`, which is what sampling uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from peft.models import _remat
from peft.models import _scan
from peft.models import _scan_loop
from peft.models._config import DecoderConfig

Array = jax.Array
Cache = dict[str, dict[str, Array]]

_DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


class Einsum(nn.Module):
  """A weight applied by an einsum equation given at call time.

  The layer owns one weight `self.param(weight_name, initializer, shape)`
  and returns `jnp.einsum(eqn, x, w)`.

  Attributes:
    shape: the weight's shape.
    weight_name: the weight's param name.
    initializer: initializer of the weight.
    dtype: the weight's dtype.

  Example:
    >>> layer = Einsum(shape=(3, 4))
    >>> x = jnp.ones((2, 3))
    >>> params = layer.init(jax.random.key(0), 'bd,df->bf', x)
    >>> jax.tree.map(jnp.shape, params)
    {'params': {'w': (3, 4)}}
    >>> layer.apply(params, 'bd,df->bf', x).shape
    (2, 4)
  """

  _: dataclasses.KW_ONLY
  shape: tuple[int, ...]
  weight_name: str = 'w'
  initializer: nn.initializers.Initializer = _DEFAULT_INIT
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, eqn: str, x: Array) -> Array:
    operands = eqn.split('->')[0].split(',')
    if len(operands) != 2:
      raise ValueError(
        f'Einsum at {"/".join(self.path)!r} needs a two-operand '
        f"equation 'inputs,weights->outputs'; got {eqn!r}.")
    weight_spec = operands[1].strip()
    if '...' not in weight_spec and len(weight_spec) != len(self.shape):
      raise ValueError(
        f'Einsum at {"/".join(self.path)!r}: the weight term '
        f'{weight_spec!r} of {eqn!r} has {len(weight_spec)} axes but the '
        f'weight has shape {self.shape!r}. Make the equation match the '
        'shape.')
    w = self.param(self.weight_name, self.initializer, self.shape, self.dtype)
    return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):
  """Root-mean-square layer norm (Zhang & Sennrich 2019), in float32.

  `y = x / sqrt(mean(x**2) + eps) * scale`, or `* (1 + scale)` when
  `add_one` (Gemma's convention, where `scale` starts at 0).

  Example:
    >>> norm = RMSNorm()
    >>> x = jnp.array([[3.0, 4.0]])
    >>> y = norm.apply(norm.init(jax.random.key(0), x), x)
    >>> [round(float(v), 3) for v in y[0]]
    [0.849, 1.131]
  """

  _: dataclasses.KW_ONLY
  eps: float = 1e-5
  add_one: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.add_one else nn.initializers.ones
    scale = self.param('scale', init, (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    if self.add_one:
      scale = 1.0 + scale
    return (x * scale).astype(self.dtype)


def rope_angles(positions: Array, head_dim: int, theta: float) -> Array:
  """Rotation angles `(..., head_dim // 2)` for integer `positions`.

  Frequency `i` turns at `theta ** (-2 i / head_dim)` radians per position.

  Example:
    >>> rope_angles(jnp.array([0, 2]), 4, 100.0).tolist()
    [[0.0, 0.0], [2.0, 0.2]]
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponents)
  inv_freq = inv_freq.reshape((1,) * positions.ndim + inv_freq.shape)
  return positions[..., None].astype(jnp.float32) * inv_freq


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotates `x` of shape (B, T, heads, H) by its positions (B, T).

  Rotate-half layout: feature `i` pairs with feature `i + H/2`. The dot
  product of a rotated query and key depends only on their distance.

  Example:
    >>> x = jnp.ones((1, 1, 1, 4))
    >>> y = apply_rope(x, jnp.array([[0]]), 10.0)
    >>> bool(jnp.all(y == x))
    True
  """
  angles = rope_angles(positions, x.shape[-1], theta)[:, :, None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return rotated.astype(x.dtype)


def causal_mask(query_positions: Array, key_positions: Array,
                window: int | None = None) -> Array:
  """`(B, T, S)` booleans: query `t` may see key `s` iff `s <= t`.

  With a `window`, also iff `t - s < window` (a sliding-window layer).

  Example:
    >>> p = jnp.arange(4)[None]
    >>> causal_mask(p, p, window=2)[0].astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
  """
  distance = query_positions[:, :, None] - key_positions[:, None, :]
  mask = distance >= 0
  if window is not None:
    mask = mask & (distance < window)
  return mask


def soft_cap(x: Array, cap: float | None) -> Array:
  """`cap * tanh(x / cap)`: squashes `x` into (-cap, cap); `x` if no cap.

  Example:
    >>> soft_cap(jnp.array([0.0, 1e6]), 30.0).tolist()
    [0.0, 30.0]
  """
  return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nn.Module):
  """Causal grouped-query self-attention with rotary positions.

  Query heads `g * G ... g * G + G - 1` share key/value head `g`, where
  `G = n_heads // n_kv_heads`. With `config.qk_norm` (Gemma 3) queries and
  keys are RMS-normalised per head (`_query_norm`, `_key_norm`, gemma's
  names) before the rotation; a `sliding` layer sees only the last
  `config.sliding_window` positions and rotates by its own base.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft import models
    >>> attn = models.Attention(config=models.tiny_config())  # 4 q, 2 kv heads
    >>> x = jax.random.normal(jax.random.key(1), (1, 3, 64))
    >>> positions = jnp.arange(3)[None]
    >>> params = attn.init(jax.random.key(0), x, positions)['params']
    >>> jax.tree.map(jnp.shape, params)
    {'attn_vec_einsum': {'w': (4, 16, 64)}, 'kv_einsum': {'w': (2, 2, 64, 16)},
     'q_einsum': {'w': (4, 64, 16)}}
    >>> y, _ = attn.apply({'params': params}, x, positions)
    >>> y2, _ = attn.apply({'params': params}, x.at[:, 2].set(0.), positions)
    >>> bool(jnp.allclose(y[:, :2], y2[:, :2]))  # causal: 2 is not seen
    True

  Attributes:
    config: the model's hyper-parameters.
    layer: this layer's index, which says whether it slides.
    dtype: the computation dtype.
  """

  _: dataclasses.KW_ONLY
  config: DecoderConfig
  layer: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.q_einsum = Einsum(
      shape=(c.n_heads, c.d_model, c.head_dim), dtype=self.param_dtype)
    self.kv_einsum = Einsum(
      shape=(2, c.n_kv_heads, c.d_model, c.head_dim), dtype=self.param_dtype)
    self.attn_vec_einsum = Einsum(
      shape=(c.n_heads, c.head_dim, c.d_model), dtype=self.param_dtype)
    if c.qk_norm:
      norm = dict(eps=c.norm_eps, add_one=c.norm_add_one, dtype=self.dtype,
                  param_dtype=self.param_dtype)
      self._query_norm = RMSNorm(**norm)
      self._key_norm = RMSNorm(**norm)

  def __call__(
    self,
    x: Array,
    positions: Array,
    cache: dict[str, Array] | None = None,
    start_index: Array | int = 0,
  ) -> tuple[Array, dict[str, Array] | None]:
    """Attends `x` (B, T, D) at `positions` (B, T).

    With a `cache` (`{'k', 'v'}` of shape (B, L, K, H)), the new keys and
    values are written at slots `start_index ... start_index + T - 1` and
    the queries attend to every slot up to their own position.

    Returns:
      The output (B, T, D) and the updated cache (or None).
    """
    c = self.config
    q = self.q_einsum('BTD,NDH->BTNH', x)
    k, v = self.kv_einsum('BSD,CKDH->CBSKH', x)
    if c.qk_norm:
      q, k = self._query_norm(q), self._key_norm(k)
    theta = c.rope_base(self.layer)
    q = apply_rope(q, positions, theta) * c.query_scale
    k = apply_rope(k, positions, theta)
    key_positions = positions
    if cache is not None:
      index = (0, start_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype),
                                       index)
      v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype),
                                       index)
      cache = {'k': k, 'v': v}
      slots = jnp.arange(k.shape[1])[None, :]
      key_positions = jnp.broadcast_to(slots, (x.shape[0], k.shape[1]))

    b, t, n, h = q.shape
    groups = n // c.n_kv_heads
    q = q.reshape(b, t, c.n_kv_heads, groups, h)
    logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k.astype(q.dtype))
    logits = soft_cap(logits.astype(jnp.float32), c.attn_logit_softcap)
    window = c.sliding_window if c.is_sliding(self.layer) else None
    mask = causal_mask(positions, key_positions, window)[:, None, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    encoded = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v.astype(self.dtype))
    encoded = encoded.reshape(b, t, n, h)
    return self.attn_vec_einsum('BTNH,NHD->BTD', encoded), cache


_ACTIVATION_FNS = {
  'silu': jax.nn.silu,
  'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  'gelu': lambda x: jax.nn.gelu(x, approximate=False),
}


class FeedForward(nn.Module):
  """Gated feed-forward: `linear(act(x @ gate) * (x @ up))`.

  The gate and up kernels are stacked in one `(2, D, F)` weight; both
  einsum layers share this module's scope, so the params read
  `{'gating_einsum': (2, D, F), 'linear': (F, D)}`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft import models
    >>> ffw = models.FeedForward(config=models.tiny_config())  # D 64, F 128
    >>> x = jnp.ones((1, 3, 64))
    >>> params = ffw.init(jax.random.key(0), x)['params']
    >>> jax.tree.map(jnp.shape, params)
    {'gating_einsum': (2, 64, 128), 'linear': (128, 64)}
    >>> ffw.apply({'params': params}, x).shape
    (1, 3, 64)
  """

  _: dataclasses.KW_ONLY
  config: DecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.gating = Einsum(shape=(2, c.d_model, c.ffn_dim),
                         weight_name='gating_einsum', dtype=self.param_dtype)
    self.down = Einsum(shape=(c.ffn_dim, c.d_model), weight_name='linear',
                       dtype=self.param_dtype)
    nn.share_scope(self, self.gating)
    nn.share_scope(self, self.down)

  def __call__(self, x: Array) -> Array:
    gate_up = self.gating('...D,CDF->...CF', x)
    act = _ACTIVATION_FNS[self.config.activation]
    hidden = act(gate_up[..., 0, :]) * gate_up[..., 1, :]
    return self.down('...F,FD->...D', hidden)


class Block(nn.Module):
  """Pre-norm transformer block: attention then feed-forward, residual.

  With `config.post_norms` (Gemma 2/3) each branch's output is normalised
  too (`post_attention_norm`, `post_ffw_norm`) before it joins the residual.

  Returns `(x, cache)`; with a cache (one layer's entry of `init_cache`)
  the output is the same and the cache holds this chunk's keys and values.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft import models
    >>> config = models.tiny_config()
    >>> block = models.Block(config=config)
    >>> x = jax.random.normal(jax.random.key(1), (1, 3, 64))
    >>> positions = jnp.arange(3)[None]
    >>> params = block.init(jax.random.key(0), x, positions)['params']
    >>> sorted(params)
    ['attn', 'mlp', 'pre_attention_norm', 'pre_ffw_norm']
    >>> y, _ = block.apply({'params': params}, x, positions)
    >>> cache = models.init_cache(config, 1, 8)['layers_0']
    >>> y_cached, cache = block.apply({'params': params}, x, positions, cache)
    >>> bool(jnp.allclose(y, y_cached, atol=1e-5)), cache['k'].shape
    (True, (1, 8, 2, 16))
  """

  _: dataclasses.KW_ONLY
  config: DecoderConfig
  layer: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    norm = dict(eps=c.norm_eps, add_one=c.norm_add_one, dtype=self.dtype,
                param_dtype=self.param_dtype)
    self.pre_attention_norm = RMSNorm(**norm)
    self.attn = Attention(config=c, layer=self.layer, dtype=self.dtype,
                          param_dtype=self.param_dtype)
    self.pre_ffw_norm = RMSNorm(**norm)
    self.mlp = FeedForward(config=c, dtype=self.dtype,
                           param_dtype=self.param_dtype)
    if c.post_norms:
      self.post_attention_norm = RMSNorm(**norm)
      self.post_ffw_norm = RMSNorm(**norm)

  def __call__(self, x, positions, cache=None, start_index=0):
    h, cache = self.attn(self.pre_attention_norm(x), positions, cache,
                         start_index)
    if self.config.post_norms:
      h = self.post_attention_norm(h)
    x = x + h
    h = self.mlp(self.pre_ffw_norm(x))
    if self.config.post_norms:
      h = self.post_ffw_norm(h)
    return x + h, cache


class Decoder(nn.Module):
  """Decoder-only language model; logits are float32 (B, T, vocab).

  Params: `embedder` (the tied `nn.Embed`), `layers_0 ... layers_{n-1}`,
  `final_norm`, and `unembedder` when embeddings are untied.

  Attributes:
    config: the model's hyper-parameters.
    dtype: the computation dtype (norms and softmax run in float32).
    param_dtype: the dtype `init` gives params.
    remat: recompute each block's activations in the backward pass instead
      of keeping them (gradient checkpointing): less memory for training,
      one more forward pass of compute. Outputs and gradients are the same.
      Blocks are recomputed one at a time, in the backward's order
      (`peft.models._remat`), not all up front as `nn.remat`'s may be; the
      model then supports reverse-mode differentiation, not `jax.jvp`.
    scan_layers: run the blocks as one loop (`peft.models._scan_loop`, a
      period of the sliding-window pattern per step) on params in
      `stack_layers`' layout: a program with one block in it, so about a
      quarter of the trace and cache-load time of SmolLM2's training step,
      for 1.03-1.09x the unrolled step's time (docs/benchmarks.md). 16-bit
      params and residuals cross the loop bitwise, since XLA:CPU would
      convert whole stacks to float32 each step. With `remat`, each step
      of the loop is recomputed in the backward loop. In 16-bit dtypes,
      reverse-mode differentiation only (no `jax.jvp`). Outputs and
      gradients are the unrolled model's (to float rounding); dropout draws
      other masks. A surgery inside sees each block's layers under the
      paths of the first period's (`layers_0/...`), so it must treat all
      blocks alike. `init` and `decode` need the unrolled model.

  Example:
    >>> from peft.models import tiny_config
    >>> model = Decoder(config=tiny_config())
    >>> tokens = jnp.array([[1, 2, 3]])
    >>> params = model.init(jax.random.key(0), tokens)['params']
    >>> sorted(params['layers_0']['mlp'])
    ['gating_einsum', 'linear']
    >>> model.apply({'params': params}, tokens).shape
    (1, 3, 320)
    >>> from peft.models import stack_layers
    >>> scanning = Decoder(config=tiny_config(), scan_layers=True)
    >>> stacked = stack_layers(params, tiny_config())
    >>> logits = scanning.apply({'params': stacked}, tokens)
    >>> bool(jnp.allclose(logits, model.apply({'params': params}, tokens),
    ...                   atol=1e-5))
    True
  """

  _: dataclasses.KW_ONLY
  config: DecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  def setup(self):
    c = self.config
    embed = dict(num_embeddings=c.vocab_size, features=c.d_model,
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=_DEFAULT_INIT)
    self.embedder = nn.Embed(**embed)
    if not c.tie_embeddings:
      self.unembedder = nn.Embed(**embed)
    block = _remat.remat(Block) if self.remat else Block
    count = 0 if self.scan_layers else c.n_layers  # Scanned: `_scanned`'s.
    self.layers = [
      block(config=c, layer=i, dtype=self.dtype, param_dtype=self.param_dtype)
      for i in range(count)
    ]
    self.final_norm = RMSNorm(eps=c.norm_eps, add_one=c.norm_add_one,
                              dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, tokens: Array, positions: Array | None = None) -> Array:
    """Logits (B, T, vocab) for `tokens` (B, T), causally masked.

    `positions` (B, T) default to `0 ... T-1`.
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = self._run(tokens, positions, None, 0)
    return logits

  def decode(self, tokens: Array, cache: Cache,
             start_index: Array | int) -> tuple[Array, Cache]:
    """Runs `tokens` (B, T) at positions `start_index ...` against `cache`.

    Returns:
      Logits (B, T, vocab) and the cache with these tokens' keys/values.
    """
    if self.scan_layers:
      raise ValueError(
          'Decoder.decode: a scan_layers=True Decoder runs whole sequences '
          'only. Decode with Decoder(scan_layers=False) on '
          'unstack_layers(params, config).')
    positions = start_index + jnp.arange(tokens.shape[1])
    positions = jnp.broadcast_to(positions, tokens.shape)
    return self._run(tokens, positions, cache, start_index)

  def _run(self, tokens: Array, positions: Array, cache: Cache | None,
           start_index: Array | int) -> tuple[Array, Cache]:
    """Logits and the updated cache (`{}` without one)."""
    c = self.config
    x = self.embedder(tokens)
    if c.scale_embeddings:
      x = x * jnp.sqrt(jnp.asarray(c.d_model, self.dtype))
    new_cache: Cache = {}
    if self.scan_layers:
      x = self._scanned(x, positions)
    for i, layer in enumerate(self.layers):
      name = f'layers_{i}'
      x, layer_cache = layer(x, positions,
                             None if cache is None else cache[name],
                             start_index)
      if layer_cache is not None:  # Given a cache, each layer updates it.
        new_cache[name] = layer_cache
    x = self.final_norm(x)
    unembed = self.embedder if c.tie_embeddings else self.unembedder
    logits = unembed.attend(x).astype(jnp.float32)
    return soft_cap(logits, c.final_logit_softcap), new_cache

  def _scanned(self, x: Array, positions: Array) -> Array:
    """`x` through all blocks, as a scan over `stack_layers`' params."""
    c = self.config
    period = _scan.layer_period(c)
    if self.is_initializing() or _scan.SCANNED not in self.variables.get(
        'params', {}):
      raise ValueError(
          'Decoder(scan_layers=True) runs on stacked block params '
          f'(params[{_scan.SCANNED!r}]), which these params lack. Init the '
          'unrolled Decoder (scan_layers=False) and pass '
          'stack_layers(params, config).')
    stacked = self.variables['params'][_scan.SCANNED]
    groups = jax.tree.leaves(stacked)[0].shape[0]
    if groups * period != c.n_layers:
      raise ValueError(
          f'Decoder(scan_layers=True): the stacked params hold {groups} x '
          f'{period} blocks, the config {c.n_layers}. Stack the params with '
          'stack_layers(params, config) of this config.')
    # A separate root module, applied per step: the scan's body must be a
    # pure function of that step's params, which a bound submodule is not.
    body_model = _Period(config=c, period=period, dtype=self.dtype,
                         param_dtype=self.param_dtype, parent=None)
    key = self.make_rng('dropout') if self.has_rng('dropout') else None

    def step(x, params, g, consts):
      positions, key = consts
      rngs = {} if key is None else {'dropout': jax.random.fold_in(key, g)}
      out = body_model.apply({'params': params}, x, positions, rngs=rngs)
      return cast(Array, out)  # No `mutable`: the output alone.
    return _scan_loop.scan(step, x, stacked, (positions, key),
                           remat=self.remat)


class _Period(nn.Module):
  """One step of a scanning Decoder: blocks `layers_0 ... layers_{P-1}`."""

  _: dataclasses.KW_ONLY
  config: DecoderConfig
  period: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array) -> Array:
    for j in range(self.period):
      x, _ = Block(config=self.config, layer=j, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f'layers_{j}')(
                       x, positions)
    return x


def init_cache(config: DecoderConfig, batch_size: int, max_len: int,
               dtype: Any = jnp.float32) -> Cache:
  """A zeroed key/value cache for `Decoder.decode`.

  Example:
    >>> from peft.models import tiny_config
    >>> cache = init_cache(tiny_config(), 2, 8)
    >>> cache['layers_0']['k'].shape
    (2, 8, 2, 16)
  """
  shape = (batch_size, max_len, config.n_kv_heads, config.head_dim)
  return {
    f'layers_{i}': {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
    for i in range(config.n_layers)
  }
