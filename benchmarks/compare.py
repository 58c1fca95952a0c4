"""The same LoRA forward and training step with `gemma.peft` and `qwix`.

Both libraries are optional (`pip install gemma qwix`); when one is missing
or fails on the benchmark model, `run.py` records the error instead of a
number. Each library adapts the same projections of the same model with the
same base params and rank; its adapters come from its own init (B made
non-zero). The step has the same shape as peft's `lora_step`: gradients of
the adapters only, Adam (`optax.adam`, as each library's docs use), the base
a separate argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks import model as model_lib
from benchmarks import steps as steps_lib


@dataclasses.dataclass(frozen=True)
class Library:
  """One library's LoRA, as functions of `(base, adapters, tokens)`.

  Attributes:
    name: e.g. 'gemma.peft'.
    version: the installed version.
    make_forward: returns a fresh `forward(base, adapters, tokens)`.
    make_step: returns a fresh `step(adapters, opt_state, base, tokens)`.
    adapters: the initial adapter tree.
    opt_state: the initial optimizer state.
  """

  name: str
  version: str
  make_forward: Any
  make_step: Any
  adapters: Any
  opt_state: Any


def _step_maker(make_forward, tx):
  def make_step():
    forward = make_forward()

    def step(adapters, opt_state, base, tokens):
      def loss_fn(adapters):
        logits = forward(base, adapters, tokens)
        return model_lib.next_token_loss(logits, tokens)
      loss, grads = jax.value_and_grad(loss_fn)(adapters)
      updates, opt_state = tx.update(grads, opt_state, adapters)
      return optax.apply_updates(adapters, updates), opt_state, loss
    return step
  return make_step


def _library(name, version, make_forward, adapters) -> Library:
  adapters = model_lib.random_like(adapters, seed=1, scale=0.1)
  tx = optax.adam(steps_lib.LEARNING_RATE)
  return Library(name=name, version=version, make_forward=make_forward,
                 make_step=_step_maker(make_forward, tx), adapters=adapters,
                 opt_state=jax.jit(tx.init)(adapters))


def gemma_peft(decoder: model_lib.Decoder, tokens: jax.Array, *,
               rank: int) -> Library:
  """`gemma`'s `gm.nn.LoRA` (float32 adapters) around the decoder."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top

  from gemma import gm  # pylint: disable=g-import-not-at-top
  from gemma import peft as gpeft  # pylint: disable=g-import-not-at-top

  wrapped = gm.nn.LoRA(rank=rank, model=decoder, dtype=jnp.float32)
  shapes = jax.eval_shape(wrapped.init, jax.random.key(1), tokens)['params']

  def make_forward():
    def forward(base, adapters, tokens):
      params = gpeft.merge_params(base, adapters)
      return wrapped.apply({'params': params}, tokens)
    return forward

  return _library('gemma.peft', importlib.metadata.version('gemma'),
                  make_forward, gpeft.split_params(shapes).lora)


def _split_by_name(tree, marker: str):
  """`(without, with)`: leaves whose key contains `marker` go to `with`."""
  without, with_ = {}, {}
  for key, value in tree.items():
    if isinstance(value, dict):
      a, b = _split_by_name(value, marker)
      if a:
        without[key] = a
      if b:
        with_[key] = b
    elif marker in key:
      with_[key] = value
    else:
      without[key] = value
  return without, with_


def _join(a, b):
  out = dict(a)
  for key, value in b.items():
    out[key] = _join(out[key], value) if key in out else value
  return out


def qwix_lora(decoder: model_lib.Decoder, tokens: jax.Array, *,
              rank: int) -> Library:
  """`qwix.apply_lora_to_model` on the decoder's projections."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top

  import qwix  # pylint: disable=g-import-not-at-top

  provider = qwix.LoraProvider(module_path=steps_lib.TARGETS, rank=rank,
                               alpha=float(rank))
  wrapped = qwix.apply_lora_to_model(decoder, provider)
  shapes = jax.eval_shape(wrapped.init, jax.random.key(1), tokens)['params']
  shapes = jax.tree.map(lambda x: x, shapes)  # plain dicts
  _, adapters = _split_by_name(shapes, '_lora_')

  def make_forward():
    def forward(base, adapters, tokens):
      return wrapped.apply({'params': _join(base, adapters)}, tokens)
    return forward

  return _library('qwix', importlib.metadata.version('qwix'), make_forward,
                  adapters)


LIBRARIES = {'gemma.peft': gemma_peft, 'qwix': qwix_lora}
