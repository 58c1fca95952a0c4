"""The functions the benchmarks time: forwards and training steps.

`run.py` (speed, compile time) and `memory.py` (peak memory) build their
steps here, so both measure the same code. Every builder returns a fresh
Python function on each call, so tracing and compiling it again is never a
cache hit.

Two LoRA training steps are built:

* `lora_step`: gradients of the adapters only (the base params are a
  separate, non-differentiated argument), Adam via
  `peft.train_only_adapters` on the adapter tree; the base is never copied.
* `lora_tree_step`: the README's pattern, gradients of the whole merged
  tree and `peft.train_only_adapters` zeroing the frozen part; simpler to
  write, but each step still writes a new copy of the base params.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import optax

from benchmarks import model as model_lib
import peft

# The projections every LoRA variant adapts (all of the model's einsums).
TARGETS = r'.*/(q|kv|o|gating|linear)'
LEARNING_RATE = 1e-4


@dataclasses.dataclass(frozen=True)
class LoRASetup:
  """Adapters for one rank: the surgery, its specs and random A/B values.

  Attributes:
    surgery: the `peft.lora(...)` context manager.
    specs: the `AdapterSpec`s it recorded (for fuse).
    adapters: the adapter branches only (`split_params(...).lora`), with
      random non-zero B so no variant runs on zeros.
  """

  surgery: Any
  specs: tuple[peft.AdapterSpec, ...]
  adapters: Any


def init_base(decoder: model_lib.Decoder, tokens: jax.Array) -> Any:
  """Random base params from numpy's RNG (no XLA compile).

  They stand in for a pretrained checkpoint; speed does not depend on the
  values.
  """
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), tokens)['params']
  return model_lib.random_like(shapes, seed=0, scale=1.0)


def init_lora(decoder: model_lib.Decoder, tokens: jax.Array, *, rank: int,
              context: Callable[[], Any] | None = None,
              seed: int = 1, use_dora: bool = False) -> LoRASetup:
  """Records the adapters of `rank` and fills them from numpy's RNG.

  Args:
    decoder: the model.
    tokens: a batch (only its shape is used).
    rank: LoRA rank.
    context: an extra context manager factory entered outside the LoRA
      surgery (e.g. `peft.quantized` for QLoRA).
    seed: numpy seed of the adapter values.
    use_dora: DoRA adapters (a magnitude beside A and B; random values
      around 1, which time as the trained ones do).

  Returns:
    The setup.
  """
  surgery = peft.lora(rank, targets=TARGETS, use_dora=use_dora)
  init = lambda: decoder.init(jax.random.key(seed), tokens)['params']
  if context is None:
    with surgery as report:
      shapes = jax.eval_shape(init)
  else:
    with context(), surgery as report:
      shapes = jax.eval_shape(init)
  adapters = model_lib.random_like(peft.split_params(shapes).lora,
                                   seed=seed, scale=0.1)
  if use_dora:  # magnitudes near 1, never 0
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: 1.0 + abs(x) if getattr(
            path[-1], 'key', None) == 'm' else x, adapters)
  return LoRASetup(surgery=surgery, specs=report.specs, adapters=adapters)


def adapter_optimizer() -> optax.GradientTransformation:
  return peft.train_only_adapters(optax.adam(LEARNING_RATE))


def _train_step(loss_fn, tx, trained, opt_state):
  """One optimizer update of `trained` on `loss_fn(trained)`."""
  loss, grads = jax.value_and_grad(loss_fn)(trained)
  updates, opt_state = tx.update(grads, opt_state, trained)
  return optax.apply_updates(trained, updates), opt_state, loss


def make_forward(decoder: model_lib.Decoder) -> Callable[..., jax.Array]:
  """`forward(params, tokens) -> logits` of the plain model."""
  def forward(params, tokens):
    return decoder.apply({'params': params}, tokens)
  return forward


def make_lora_forward(decoder, surgery,
                      context: Callable[[], Any] | None = None):
  """`forward(base, adapters, tokens) -> logits` under LoRA surgery."""
  def forward(base, adapters, tokens):
    params = peft.merge_params(base, adapters)
    if context is None:
      with surgery:
        return decoder.apply({'params': params}, tokens)
    with context(), surgery:
      return decoder.apply({'params': params}, tokens)
  return forward


def make_lora_step(decoder, surgery, tx,
                   context: Callable[[], Any] | None = None):
  """`step(adapters, opt_state, base, tokens)`: grads of adapters only.

  Donate `adapters` and `opt_state` (argnums 0 and 1).
  """
  forward = make_lora_forward(decoder, surgery, context)

  def step(adapters, opt_state, base, tokens):
    def loss_fn(adapters):
      return model_lib.next_token_loss(forward(base, adapters, tokens), tokens)
    return _train_step(loss_fn, tx, adapters, opt_state)
  return step


def make_lora_tree_step(decoder, surgery, tx):
  """`step(params, opt_state, tokens)`: grads of the whole merged tree."""
  def step(params, opt_state, tokens):
    def loss_fn(params):
      with surgery:
        logits = decoder.apply({'params': params}, tokens)
      return model_lib.next_token_loss(logits, tokens)
    return _train_step(loss_fn, tx, params, opt_state)
  return step


def make_first_norm_step(decoder, tx):
  """`step(norm, opt_state, base, tokens)`: trains block0's `norm1` only.

  The backward pass runs through the whole frozen model, as LoRA's must,
  but nothing else is trained: the memory floor of any method that trains
  something in the first layer. Donate `norm` and `opt_state`.
  """
  def step(norm, opt_state, base, tokens):
    def loss_fn(norm):
      params = {**base, 'block0': {**base['block0'], 'norm1': norm}}
      logits = decoder.apply({'params': params}, tokens)
      return model_lib.next_token_loss(logits, tokens)
    return _train_step(loss_fn, tx, norm, opt_state)
  return step


def make_full_step(decoder, tx):
  """`step(params, opt_state, tokens)`: full fine-tuning."""
  def step(params, opt_state, tokens):
    def loss_fn(params):
      logits = decoder.apply({'params': params}, tokens)
      return model_lib.next_token_loss(logits, tokens)
    return _train_step(loss_fn, tx, params, opt_state)
  return step


def quantization_api() -> str | None:
  """None if peft exports its quantization API, else what is missing."""
  missing = [n for n in ('quantize', 'quantized', 'quantization_axes')
             if not hasattr(peft, n)]
  if missing:
    return f'peft does not export {", ".join(missing)} yet'
  return None


def quantize_base(decoder, base, tokens, method: str):
  """The base params with the adapted kernels quantized by `method`."""
  axes = peft.quantization_axes(decoder, tokens, targets=TARGETS)
  return peft.quantize(base, method=method, axes=axes)
