"""`peft.models._remat`: checkpointing whose recomputation runs in order.

Gradients are compared with those of the plain function, and XLA's
compiled temporary memory shows a stack of blocks holding one block's
activations at a time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft import models
from peft.models._remat import checkpoint_in_order

T, D, F, R = 64, 16, 256, 2


def _block(w, a, x):
  """A feed-forward block with a frozen `w` and a low-rank trainable `a`."""
  h = jnp.tanh(x @ w[0] + (x @ a[0]) @ a[1])
  return x + (h * jax.nn.sigmoid(h)) @ w[1]


def _params(layers, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32)
  ws = [(normal(D, F), normal(F, D)) for _ in range(layers)]
  adapters = [(normal(D, R), normal(R, F)) for _ in range(layers)]
  return ws, adapters, normal(T, D)


def _loss(block):
  def loss(adapters, ws, x):
    for w, a in zip(ws, adapters):
      x = block(w, a, x)
    return jnp.sum(x * x)
  return loss


def test_gradients_equal_the_plain_functions_under_jit():
  ws, adapters, x = _params(3)
  wrt = (0, 1, 2)
  expected = jax.jit(jax.grad(_loss(_block), wrt))(adapters, ws, x)
  got = jax.jit(jax.grad(_loss(checkpoint_in_order(_block, 1)), wrt))(
      adapters, ws, x)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # And eagerly, where the recomputed forward must match too.
  out = checkpoint_in_order(_block)(ws[0], adapters[0], x)
  np.testing.assert_array_equal(out, jax.jit(_block)(ws[0], adapters[0], x))


def test_only_differentiated_inputs_get_gradients():
  ws, adapters, x = _params(1)
  ordered = _loss(checkpoint_in_order(_block, 1))

  def dots(wrt):
    jaxpr = jax.make_jaxpr(jax.grad(ordered, wrt))(adapters, ws, x)
    return str(jaxpr).count('dot_general')

  # Frozen weights (argument 1) cost no weight-gradient products.
  assert dots((0,)) + 2 == dots((0, 1))


def test_closed_over_tracers_vmap_and_unused_outputs():
  c = jnp.float32(1.5)
  xs = jnp.linspace(0.1, 1, 12).reshape(3, 4)

  def loss(fn, c):
    # `fn` closes over `c`, returns an integer output and an unused one.
    def per_row(x):
      y, count, unused = fn(x)
      del unused
      return jnp.sum(jnp.sin(y) * count)
    return jnp.sum(jax.vmap(per_row)(xs))

  def body(c):
    return lambda x: (x * c, jnp.int32(2), x ** 3)

  plain = jax.grad(lambda c: loss(body(c), c))(c)
  ordered = jax.grad(lambda c: loss(checkpoint_in_order(body(c)), c))(c)
  np.testing.assert_allclose(ordered, plain, rtol=1e-6)


def _temp_mib(block, layers):
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        _params(layers))
  ws, adapters, x = shapes
  compiled = jax.jit(jax.grad(_loss(block))).lower(adapters, ws, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_a_stack_holds_one_blocks_activations_at_a_time():
  # Each extra block adds about two of its inputs' size (T x D: the saved
  # input and its cotangent), a fraction of one of its activations (T x F).
  residual = T * D * 4 / 2**20
  activations = T * F * 4 / 2**20
  ordered = checkpoint_in_order(_block, 1)
  per_block = (_temp_mib(ordered, 8) - _temp_mib(ordered, 4)) / 4
  assert per_block <= 3 * residual < activations / 4, per_block
  plain_per_block = (_temp_mib(_block, 8) - _temp_mib(_block, 4)) / 4
  assert plain_per_block >= 2 * activations, plain_per_block


def test_decoder_remat_with_lora_dropout_gives_the_same_gradients():
  # The recomputation draws the same dropout masks as the forward did.
  config = models.tiny_config()
  tokens = jnp.array([[1, 5, 9, 2, 7, 3]])
  surgery = peft.lora(4, dropout=0.5, targets=('.*attn/.*', '.*mlp'))

  def loss(p, remat, rngs):
    with surgery:
      logits = models.Decoder(config=config, remat=remat).apply(
          {'params': p}, tokens, rngs=rngs)
    return jnp.sum(logits ** 2)

  with surgery:
    shapes = jax.eval_shape(models.Decoder(config=config).init,
                            jax.random.key(0), tokens)['params']
  rng = np.random.default_rng(0)
  params = peft.split_params(jax.tree.map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
      shapes))

  def grads(remat, rngs):
    return jax.jit(jax.grad(lambda lora: loss(
        peft.merge_params(params.original, lora), remat, rngs)))(params.lora)

  dropout = {'dropout': jax.random.key(3)}
  plain, remat = grads(False, dropout), grads(True, dropout)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Dropout is on: without its rng the gradients differ.
  undropped = grads(False, {})
  assert not np.allclose(jax.tree.leaves(plain)[0],
                         jax.tree.leaves(undropped)[0])


@pytest.mark.parametrize('n_tied', [None, 1])
def test_hessian_vector_products_match(n_tied):
  # The backward rule is itself differentiable (jax.vjp of the traced
  # function), so second derivatives agree too.
  ws, adapters, x = _params(2)
  v = jax.tree.map(jnp.ones_like, adapters)

  def hvp(loss):
    g = lambda a: jax.grad(loss)(a, ws, x)
    return jax.grad(lambda a: sum(
        jnp.vdot(p, q) for p, q in zip(jax.tree.leaves(g(a)),
                                       jax.tree.leaves(v))))(adapters)

  expected = hvp(_loss(_block))
  got = hvp(_loss(checkpoint_in_order(_block, n_tied)))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    # Entries reach 300; float32 rounding differs in the last digits.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
