"""peft.nnx on a model written the way third-party nnx code is written.

A `__getattr__` that forwards to a config, a property, and blocks built
with `nnx.vmap` and run with `nnx.scan` (one kernel of shape
`(layers, in, out)`): surgery adapts them with stacked adapters, and fuse,
unfuse and adapter files handle the stack. Values are checked against an
independent `W + scale * A @ B` per layer.
"""

import os

from flax import nnx
import jax.numpy as jnp
import numpy as np

import peft.nnx as pnnx
from tests.helpers import assert_trees_close

LAYERS, D = 3, 4


class Block(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.lin(x))


class ScannedModel(nnx.Module):

  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs)
    self.config = {'width': D}

  def __getattr__(self, name):
    if name == 'width':
      return self.config['width']
    raise AttributeError(name)

  @property
  def depth(self):
    return LAYERS

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(x, self.blocks))


def _x():
  return jnp.asarray(np.random.default_rng(0).standard_normal((2, D)),
                     jnp.float32)


def _randomize(model):
  rng = np.random.default_rng(1)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, pnnx.LoRAParam):
      var[...] = jnp.asarray(0.3 * rng.standard_normal(var.shape),
                             jnp.float32)


def test_scanned_nnx_layers_get_stacked_adapters(tmp_path):
  x = _x()
  model = ScannedModel()
  plain = model(x)
  report = pnnx.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
  assert model.width == D and model.depth == LAYERS
  specs = {s.key: s for s in report.specs}
  assert specs['blocks/lin/lora'].stack_shape == (LAYERS,)
  assert model.blocks.lin.lora.a.shape == (LAYERS, D, 2)
  assert_trees_close(model(x), plain)  # B = 0: the base output

  _randomize(model)
  adapted = model(x)
  # Independent: fold A @ B into each layer of a fresh plain model.
  expected = ScannedModel()
  lin = model.blocks.lin
  expected.blocks.lin.kernel[...] = lin.kernel[...] + jnp.einsum(
      'lir,lro->lio', lin.lora.a[...], lin.lora.b[...])
  head = model.head
  expected.head.kernel[...] = head.kernel[...] + (
      head.lora.a[...] @ head.lora.b[...])
  np.testing.assert_allclose(adapted, expected(x), rtol=1e-5, atol=1e-5)

  file = os.fspath(tmp_path / 'stacked.safetensors')
  saved = pnnx.save_adapters(file, model)
  assert {s.stack_shape for s in saved} == {(LAYERS,), ()}
  fused = pnnx.fuse(model)
  assert type(model.blocks.lin) is nnx.Linear
  np.testing.assert_allclose(model(x), adapted, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.blocks.lin.kernel[...],
                             expected.blocks.lin.kernel[...], rtol=1e-6,
                             atol=1e-6)
  pnnx.unfuse(model, fused.specs, fused.adapters)
  np.testing.assert_allclose(model(x), adapted, rtol=1e-5, atol=1e-5)

  fresh = ScannedModel()
  pnnx.load_adapters(file, fresh)
  np.testing.assert_allclose(fresh(x), adapted, rtol=1e-5, atol=1e-5)
