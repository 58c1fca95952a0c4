"""Autoregressive sampling with a key/value cache, compiled once per shape.

Prompts are right-padded into one `(batch, max_len)` buffer. A single
forward pass over the buffer fills the cache (prefill); then a
`lax.while_loop` samples one token per step, each step running the decoder
on one token against the cache. Prompts of different lengths share the
loop: until a row's prompt is used up, the step keeps the prompt's token
instead of the sampled one. Temperature, top-k, seed and end token are
traced values, so the jitted function is traced once per `(batch, max_len)`
and reused after; any model surgery active then (interceptors) is baked
in: build a new `Sampler` under a new one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft.models._decoder import Decoder
from peft.models._decoder import init_cache
from peft.models._tokenizer import Tokenizer

# Stop ids are traced as one padded vector of this length, so that any set
# of up to this many (Gemma's chat stops at <eos> and <end_of_turn>) shares
# the compiled loop.
MAX_STOP_IDS = 8


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _stop_ids(eos_id: int | Sequence[int] | None, vocab: int) -> list[int]:
  """`eos_id` as a list of ids, checked against the vocabulary."""
  if eos_id is None:
    return []
  ids = [eos_id] if isinstance(eos_id, (int, np.integer)) else list(eos_id)
  bad = [i for i in ids if isinstance(i, bool)
         or not isinstance(i, (int, np.integer)) or not 0 <= i < vocab]
  if bad or len(ids) > MAX_STOP_IDS:
    raise ValueError(
      f'eos_id must be a token id in [0, {vocab}), or a list of at most '
      f'{MAX_STOP_IDS} of them; got {eos_id!r}. Pass e.g. '
      'eos_id=tokenizer.stop_ids.')
  return [int(i) for i in ids]


class Sampler:
  """Greedy, temperature and top-k sampling for a `Decoder`.

  Args:
    model: the decoder (or any module with the same `decode` method).
    tokenizer: needed only by `generate_text`.
    cache_dtype: dtype of the key/value cache.

  Example:
    >>> from peft.models import Decoder, tiny_config
    >>> model = Decoder(config=tiny_config())
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1), int))
    >>> sampler = Sampler(model=model)
    >>> out = sampler(params['params'], [[1, 2, 3], [4]], max_new_tokens=5)
    >>> [len(o) for o in out]
    [5, 5]
  """

  def __init__(self, *, model: Decoder, tokenizer: Tokenizer | None = None,
               cache_dtype: Any = jnp.float32):
    self.model = model
    self.tokenizer = tokenizer
    self.cache_dtype = cache_dtype
    self._sample = jax.jit(self._sample_impl)

  def __call__(self, params, prompts: Sequence[Sequence[int]], *,
               max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0,
               eos_id: int | Sequence[int] | None = None,
               max_len: int | None = None) -> list[list[int]]:
    """Samples up to `max_new_tokens` after each prompt.

    Args:
      params: the decoder's params (without the `'params'` wrapper).
      prompts: token ids, one non-empty list per row.
      max_new_tokens: how many tokens to add at most.
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_k: sample only among the `top_k` likeliest tokens.
      seed: seed of the sampling key.
      eos_id: stop a row after this token, or after any of these tokens
        (it is not returned).
      max_len: the buffer length (one compile per batch size and max_len);
        default: the longest prompt plus `max_new_tokens`, rounded up to a
        multiple of 32.

    Returns:
      The new tokens of each row.
    """
    prompts = [[int(t) for t in p] for p in prompts]
    vocab = self.model.config.vocab_size
    if not prompts or any(not p for p in prompts):
      raise ValueError(
        f'Sampler needs at least one prompt and no empty prompt; got '
        f'lengths {[len(p) for p in prompts]!r}. Start each prompt with at '
        'least one token (e.g. BOS).')
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
      raise ValueError(
        f'prompt token {bad[0]!r} is outside the vocabulary [0, {vocab}). '
        'Encode prompts with the model\'s tokenizer.')
    if isinstance(max_new_tokens, bool) or not (
        isinstance(max_new_tokens, int) and max_new_tokens >= 1):
      raise ValueError(
        f'max_new_tokens must be a positive int; got {max_new_tokens!r}.')
    if temperature < 0:
      raise ValueError(f'temperature must be >= 0 (0 is greedy); got '
                       f'{temperature!r}.')
    if top_k is not None and not 1 <= top_k <= vocab:
      raise ValueError(f'top_k must be in [1, {vocab}] or None; got '
                       f'{top_k!r}.')
    stop_ids = _stop_ids(eos_id, vocab)
    longest = max(len(p) for p in prompts)
    if max_len is None:
      max_len = _round_up(longest + max_new_tokens, 32)
    if max_len < longest + 1:
      raise ValueError(
        f'max_len={max_len!r} leaves no room to sample after the longest '
        f'prompt ({longest} tokens). Pass max_len > {longest}.')
    if max_len > self.model.config.max_len:
      raise ValueError(
        f'max_len={max_len!r} exceeds the model\'s context of '
        f'{self.model.config.max_len} tokens. Shorten the prompts or '
        'max_new_tokens.')
    buffer = np.zeros((len(prompts), max_len), np.int32)
    for row, prompt in enumerate(prompts):
      buffer[row, :len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    stops = np.minimum(lengths + max_new_tokens, max_len).astype(np.int32)
    tokens = self._sample(
      params, jnp.asarray(buffer), jnp.asarray(lengths), jnp.asarray(stops),
      jax.random.key(seed, impl='rbg'), jnp.float32(temperature),
      jnp.int32(top_k or 0),
      jnp.asarray(stop_ids + [-1] * (MAX_STOP_IDS - len(stop_ids)),
                  jnp.int32))
    tokens = np.asarray(tokens)
    out = []
    for row in range(len(prompts)):
      new = tokens[row, lengths[row]:stops[row]].tolist()
      ends = [i for i, t in enumerate(new) if t in stop_ids]
      out.append(new[:ends[0]] if ends else new)
    return out

  def generate_text(self, params, prompts: Sequence[str], *,
                    chat: bool = False, **kwargs) -> list[str]:
    """Like `__call__` on text; `chat` wraps each prompt as a user turn.

    Stops at the tokenizer's `stop_ids` (its end-of-sequence token, and
    the end of a turn where it has one) unless `eos_id` is given.
    """
    if self.tokenizer is None:
      raise ValueError('generate_text needs Sampler(tokenizer=...); got '
                       'None. Pass the model\'s tokenizer.')
    if isinstance(prompts, str):
      raise TypeError(f'generate_text takes a list of prompts; got the str '
                      f'{prompts!r:.60}. Wrap it in a list.')
    tok = self.tokenizer
    ids = [tok.encode_chat(p) if chat else tok.encode(p) for p in prompts]
    kwargs.setdefault('eos_id', tok.stop_ids)
    return [tok.decode(new) for new in self(params, ids, **kwargs)]

  def _sample_impl(self, params, tokens, lengths, stops, key, temperature,
                   top_k, stop_ids):
    model = self.model
    batch, max_len = tokens.shape
    cache = init_cache(model.config, batch, max_len, self.cache_dtype)
    variables = {'params': params}
    logits, cache = model.apply(variables, tokens, cache, 0,
                                method='decode')
    start = jnp.min(lengths)
    last = jnp.take(logits, start - 1, axis=1)

    def keep_top_k(logits):  # k is traced: no recompile per top_k.
      ranked = jnp.sort(logits, axis=-1)
      kth = jax.lax.dynamic_index_in_dim(ranked, logits.shape[-1] - top_k,
                                         axis=-1)
      return jnp.where(logits < kth, -jnp.inf, logits)

    def choose(logits, key):
      logits = jax.lax.cond(top_k > 0, keep_top_k, lambda x: x, logits)
      scaled = logits / jnp.maximum(temperature, 1e-6)
      sampled = jax.random.categorical(key, scaled, axis=-1)
      greedy = jnp.argmax(logits, axis=-1)
      return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    def cond(state):
      i, _, _, _, _, done = state
      return (i < max_len) & ~jnp.all(done)

    def body(state):
      i, tokens, cache, logits, key, done = state
      key, step_key = jax.random.split(key)
      in_prompt = i < lengths
      token = jnp.where(in_prompt, tokens[:, i], choose(logits, step_key))
      token = jnp.where(done, 0, token)
      tokens = tokens.at[:, i].set(token)
      stopped = jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
      done = done | (~in_prompt & stopped) | (i + 1 >= stops)
      logits, cache = model.apply(variables, token[:, None], cache, i,
                                  method='decode')
      return i + 1, tokens, cache, logits[:, 0], key, done

    done = jnp.zeros((batch,), bool)
    state = (start, tokens, cache, last, key, done)
    return jax.lax.while_loop(cond, body, state)[1]
