"""Each adapted layer call parses its equation once and plans A and B once.

Parsing and planning run at trace time; a model with hundreds of adapted
layers used to parse each call three or four times.
"""

import collections

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import pytest

import peft
from peft._core import einsum as _einsum
import peft.nnx as pnnx


@pytest.fixture
def counts(monkeypatch):
  seen = collections.Counter()
  parse = _einsum.EinsumEquation.parse.__func__
  plan = _einsum.EinsumEquation.lora_plan

  def counting_parse(cls, *args, **kwargs):
    seen['parse'] += 1
    return parse(cls, *args, **kwargs)

  def counting_plan(self, *args, **kwargs):
    seen['plan'] += 1
    return plan(self, *args, **kwargs)

  monkeypatch.setattr(_einsum.EinsumEquation, 'parse',
                      classmethod(counting_parse))
  monkeypatch.setattr(_einsum.EinsumEquation, 'lora_plan', counting_plan)
  return seen


def test_a_linen_einsum_call_parses_once_and_plans_once(counts):
  layer = peft.LoRAEinsum(
      rank=2, wrapped=nn.Einsum((4, 2, 3), 'btd,dnh->btnh'))
  x = jnp.ones((1, 5, 4))
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  counts.clear()
  jax.eval_shape(layer.apply, params, x)
  assert counts == {'parse': 1, 'plan': 1}


def test_a_linen_dense_call_plans_once(counts):
  layer = peft.LoRADense(rank=2, wrapped=nn.Dense(3))
  x = jnp.ones((1, 4))
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  counts.clear()
  jax.eval_shape(layer.apply, params, x)
  assert counts['plan'] == 1 and counts['parse'] <= 1


def test_an_nnx_linear_call_plans_once_and_parses_nothing(counts):
  layer = pnnx.LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0))
  counts.clear()
  layer(jnp.ones((1, 4)))
  assert counts == {'plan': 1}


def test_a_linen_conv_call_plans_once(counts):
  layer = peft.LoRAConv(rank=2, wrapped=nn.Conv(4, kernel_size=(3, 3)))
  x = jnp.ones((1, 8, 8, 5))
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  counts.clear()
  jax.eval_shape(layer.apply, params, x)
  assert counts == {'plan': 1}
