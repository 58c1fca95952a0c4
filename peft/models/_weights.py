"""Hugging Face Llama tensor names <-> the reference decoder's params.

Every loader funnels into `params_from_hf`: a GGUF file is first renamed to
Hugging Face names (and its q/k rows un-permuted), then converted here. The
layouts (HF linear weights are `(out, in)`):

  model.embed_tokens.weight                (V, D)  embedder/embedding
  model.layers.N.input_layernorm.weight    (D,)    layers_N/pre_attention_norm
  model.layers.N.self_attn.q_proj.weight   (N*H, D) -> q_einsum/w (N, D, H)
  model.layers.N.self_attn.{k,v}_proj      (K*H, D) -> kv_einsum/w (2, K, D, H)
  model.layers.N.self_attn.o_proj.weight   (D, N*H) -> attn_vec_einsum (N, H, D)
  model.layers.N.post_attention_layernorm  (D,)    layers_N/pre_ffw_norm
  model.layers.N.mlp.{gate,up}_proj        (F, D)  -> gating_einsum (2, D, F)
  model.layers.N.mlp.down_proj             (D, F)  -> linear (F, D)
  model.norm.weight                        (D,)    final_norm/scale
  lm_head.weight                           (V, D)  unembedder (untied only)

Gemma 3 renames the norms around each branch (`post_attention_layernorm` is
then the norm *after* attention, `pre_feedforward_layernorm` the one before
the feed-forward) and adds `self_attn.{q,k}_norm` (H,): `_norm_names` keeps
that table in one place for both directions.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from peft.models._config import DecoderConfig
from peft.models._decoder import Decoder
from peft.models._tokenizer import Tokenizer

Params = dict[str, Any]

# Tensors some exporters write that carry no weights.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pretrained:
  """What a loader returns: config, params for `Decoder`, and a tokenizer.

  Attributes:
    config: the model's hyper-parameters.
    params: the `Decoder` params tree (without the `'params'` wrapper).
    tokenizer: the model's tokenizer, when the checkpoint carries one.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from peft import models
    >>> config = models.tiny_config()
    >>> tensors = {name: np.zeros(shape, np.float32)  # HF-named weights
    ...            for name, shape in models.hf_shapes(config).items()}
    >>> pre = models.Pretrained(config=config,
    ...                         params=models.params_from_hf(tensors, config))
    >>> pre.model.config == config, pre.tokenizer is None
    (True, True)
    >>> tokens = jnp.array([[1, 2, 3]])
    >>> jax.eval_shape(lambda p: pre.model.apply({'params': p}, tokens),
    ...                pre.params).shape
    (1, 3, 320)
  """

  config: DecoderConfig
  params: Params
  tokenizer: Tokenizer | None = None

  @property
  def model(self) -> Decoder:
    """`Decoder(config=self.config)`."""
    return Decoder(config=self.config)


def _norm_names(config: DecoderConfig) -> dict[str, tuple[str, ...]]:
  """Per-layer HF norm name suffix -> its path in the layer's params."""
  names: dict[str, tuple[str, ...]]
  if config.post_norms:
    names = {'input_layernorm': ('pre_attention_norm',),
             'post_attention_layernorm': ('post_attention_norm',),
             'pre_feedforward_layernorm': ('pre_ffw_norm',),
             'post_feedforward_layernorm': ('post_ffw_norm',)}
  else:
    names = {'input_layernorm': ('pre_attention_norm',),
             'post_attention_layernorm': ('pre_ffw_norm',)}
  if config.qk_norm:
    names.update({'self_attn.q_norm': ('attn', '_query_norm'),
                  'self_attn.k_norm': ('attn', '_key_norm')})
  return names


def layer_norm_shapes(config: DecoderConfig) -> dict[tuple[str, ...],
                                                     tuple[int, ...]]:
  """Path (within a layer's params) -> shape of each norm scale a layer has.

  QK-norm scales are per head (`head_dim`); the others span `d_model`.
  """
  return {path: ((config.head_dim,) if path[0] == 'attn'
                 else (config.d_model,))
          for path in _norm_names(config).values()}


def hf_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name a Hugging Face checkpoint of `config` holds, by shape.

  Example:
    >>> from peft.models import tiny_config
    >>> shapes = hf_shapes(tiny_config())
    >>> shapes['model.layers.1.self_attn.k_proj.weight']
    (32, 64)
  """
  c = config
  shapes: dict[str, tuple[int, ...]] = {
    'model.embed_tokens.weight': (c.vocab_size, c.d_model),
    'model.norm.weight': (c.d_model,)}
  if not c.tie_embeddings:
    shapes['lm_head.weight'] = (c.vocab_size, c.d_model)
  norm_shapes = layer_norm_shapes(c)
  for i in range(c.n_layers):
    p = f'model.layers.{i}.'
    for suffix, path in _norm_names(c).items():
      shapes[f'{p}{suffix}.weight'] = norm_shapes[path]
    shapes.update({
      p + 'self_attn.q_proj.weight': (c.n_heads * c.head_dim, c.d_model),
      p + 'self_attn.k_proj.weight': (c.n_kv_heads * c.head_dim, c.d_model),
      p + 'self_attn.v_proj.weight': (c.n_kv_heads * c.head_dim, c.d_model),
      p + 'self_attn.o_proj.weight': (c.d_model, c.n_heads * c.head_dim),
      p + 'mlp.gate_proj.weight': (c.ffn_dim, c.d_model),
      p + 'mlp.up_proj.weight': (c.ffn_dim, c.d_model),
      p + 'mlp.down_proj.weight': (c.d_model, c.ffn_dim),
    })
  return shapes


def _check_tensors(tensors: Mapping[str, Any], config: DecoderConfig,
                   source: str) -> None:
  expected = hf_shapes(config)
  names = {n for n in tensors if not n.endswith(_IGNORED_SUFFIXES)}
  if config.tie_embeddings:
    names.discard('lm_head.weight')  # Some exporters save the tied copy.
  missing = sorted(set(expected) - names)
  if missing:
    raise ValueError(
      f'{source} lacks {len(missing)} tensor(s) the config needs, e.g. '
      f'{missing[:3]!r}. Check that the config (n_layers, tie_embeddings) '
      'matches the checkpoint.')
  unexpected = sorted(names - set(expected))
  if unexpected:
    raise ValueError(
      f'{source} has {len(unexpected)} tensor(s) the reference decoder has '
      f'no place for, e.g. {unexpected[:3]!r}. It runs bias-free Llama/Gemma '
      'checkpoints; use one, or drop those tensors if they are unused.')
  for name, shape in expected.items():
    got = tuple(np.shape(tensors[name]))
    if got != shape:
      raise ValueError(
        f'tensor {name!r} in {source} has shape {got!r} but the config '
        f'needs {shape!r}. Fix the config (d_model, head counts, head_dim, '
        'ffn_dim, vocab_size) to match the checkpoint.')


def random_params(config: DecoderConfig, *, seed: int = 0,
                  scale: float = 0.02) -> Params:
  """Random params for a `Decoder` of `config`, drawn with numpy.

  Every weight is `scale` times a standard normal draw and every norm
  weight of the Hugging Face layout is 1, as a fresh checkpoint. It needs
  no XLA compile: an uncompiled `Decoder.init` spends seconds on CPU
  compiling its initializers, which dominates small tests and benchmarks.

  Example:
    >>> import jax.numpy as jnp
    >>> from peft.models import Decoder, tiny_config
    >>> params = random_params(tiny_config())
    >>> Decoder(config=tiny_config()).apply(
    ...     {'params': params}, jnp.zeros((1, 3), jnp.int32)).shape
    (1, 3, 320)
    >>> same = random_params(tiny_config())  # Deterministic in `seed`.
    >>> bool((same['embedder']['embedding'] ==
    ...       params['embedder']['embedding']).all())
    True
  """
  rng = np.random.default_rng(seed)
  tensors = {
    name: (np.ones(shape, np.float32) if name.endswith('norm.weight')
           else scale * rng.standard_normal(shape).astype(np.float32))
    for name, shape in hf_shapes(config).items()}
  return params_from_hf(tensors, config)


def params_from_hf(tensors: Mapping[str, Any], config: DecoderConfig, *,
                   dtype: Any = jnp.float32,
                   source: str = 'the checkpoint') -> Params:
  """`Decoder` params from Hugging Face-named `(out, in)` tensors.

  Args:
    tensors: name -> array, as in a Llama/Gemma `*.safetensors`.
    config: the model's hyper-parameters.
    dtype: dtype of the returned params.
    source: where the tensors came from, for error messages.

  Raises:
    ValueError: a tensor is missing, unexpected, or mis-shaped.

  Example:
    >>> from peft.models import tiny_config
    >>> cfg = tiny_config()
    >>> hf = {n: np.zeros(s, np.float32) for n, s in hf_shapes(cfg).items()}
    >>> params = params_from_hf(hf, cfg)
    >>> params['layers_0']['attn']['kv_einsum']['w'].shape
    (2, 2, 64, 16)
  """
  _check_tensors(tensors, config, source)
  c = config

  def get(name):
    return np.asarray(tensors[name], dtype=np.float32)

  def heads(w, n):  # (n*H, D) -> (n, D, H)
    return w.reshape(n, c.head_dim, c.d_model).transpose(0, 2, 1)

  params: dict[str, Any] = {
    'embedder': {'embedding': get('model.embed_tokens.weight')},
    'final_norm': {'scale': get('model.norm.weight')}}
  if not c.tie_embeddings:
    params['unembedder'] = {'embedding': get('lm_head.weight')}
  for i in range(c.n_layers):
    p = f'model.layers.{i}.'
    o = get(p + 'self_attn.o_proj.weight')
    layer: dict[str, Any] = {
      'attn': {
        'q_einsum': {'w': heads(get(p + 'self_attn.q_proj.weight'),
                                c.n_heads)},
        'kv_einsum': {'w': np.stack([
          heads(get(p + 'self_attn.k_proj.weight'), c.n_kv_heads),
          heads(get(p + 'self_attn.v_proj.weight'), c.n_kv_heads)])},
        'attn_vec_einsum': {
          'w': o.reshape(c.d_model, c.n_heads, c.head_dim).transpose(1, 2, 0)},
      },
      'mlp': {
        'gating_einsum': np.stack([get(p + 'mlp.gate_proj.weight').T,
                                   get(p + 'mlp.up_proj.weight').T]),
        'linear': get(p + 'mlp.down_proj.weight').T,
      },
    }
    params[f'layers_{i}'] = layer
    for suffix, path in _norm_names(c).items():
      node = layer
      for key in path:
        node = node.setdefault(key, {})
      node['scale'] = get(f'{p}{suffix}.weight')
  return _to_jax(params, dtype)


def _to_jax(tree: Any, dtype: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _to_jax(v, dtype) for k, v in tree.items()}
  return jnp.asarray(tree, dtype=dtype)


def params_to_hf(params: Mapping[str, Any],
                 config: DecoderConfig) -> dict[str, np.ndarray]:
  """The inverse of `params_from_hf`: Hugging Face-named numpy arrays.

  Example:
    >>> from peft.models import tiny_config
    >>> cfg = tiny_config()
    >>> hf = {n: np.ones(s, np.float32) for n, s in hf_shapes(cfg).items()}
    >>> sorted(params_to_hf(params_from_hf(hf, cfg), cfg)) == sorted(hf)
    True
  """
  c = config

  def get(tree, *path):
    for key in path:
      if not isinstance(tree, Mapping) or key not in tree:
        raise ValueError(
          f'params lack {"/".join(path)!r} (no {key!r}); pass the Decoder '
          'params tree of this config (without the "params" wrapper).')
      tree = tree[key]
    return np.asarray(tree)

  def flat(w):  # (n, D, H) -> (n*H, D)
    return w.transpose(0, 2, 1).reshape(-1, c.d_model)

  hf = {'model.embed_tokens.weight': get(params, 'embedder', 'embedding'),
        'model.norm.weight': get(params, 'final_norm', 'scale')}
  if not c.tie_embeddings:
    hf['lm_head.weight'] = get(params, 'unembedder', 'embedding')
  for i in range(c.n_layers):
    p, layer = f'model.layers.{i}.', f'layers_{i}'
    kv = get(params, layer, 'attn', 'kv_einsum', 'w')
    gate_up = get(params, layer, 'mlp', 'gating_einsum')
    o = get(params, layer, 'attn', 'attn_vec_einsum', 'w')
    for suffix, path in _norm_names(c).items():
      hf[f'{p}{suffix}.weight'] = get(params, layer, *path, 'scale')
    hf.update({
      p + 'self_attn.q_proj.weight': flat(get(params, layer, 'attn',
                                              'q_einsum', 'w')),
      p + 'self_attn.k_proj.weight': flat(kv[0]),
      p + 'self_attn.v_proj.weight': flat(kv[1]),
      p + 'self_attn.o_proj.weight': o.transpose(2, 0, 1).reshape(
        c.d_model, -1),
      p + 'mlp.gate_proj.weight': gate_up[0].T,
      p + 'mlp.up_proj.weight': gate_up[1].T,
      p + 'mlp.down_proj.weight': get(params, layer, 'mlp', 'linear').T,
    })
  hf = {k: np.ascontiguousarray(v) for k, v in hf.items()}
  _check_tensors(hf, config, 'params')
  return hf
