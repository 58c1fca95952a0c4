"""Training only the adapters with optax."""

import functools

from flax import core as flax_core
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft
from peft._core import fuse as _fuse
from peft._core import optim as _optim
from peft._core import params as _params
from tests import fixtures
from tests.helpers import assert_trees_close


def _params_tree(n_base: int, seed: int = 0):
  """A base kernel of n_base x n_base plus fixed-size adapters and vectors."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))
  return {
      'big': {'kernel': f(n_base, n_base), 'bias': f(n_base)},
      'proj': {'kernel': f(4, 6), 'bias': f(6), 'lora': {'a': f(4, 2),
                                                          'b': f(2, 6)}},
      'mlp': {'w1': f(6, 4), 'lora_w1': {'a': f(6, 1), 'b': f(1, 4)}},
      'norm': {'scale': f(6)},
  }


def _size(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


ADAPTER_SIZE = 4 * 2 + 2 * 6 + 6 * 1 + 1 * 4  # 30


def test_adapter_mask_values():
  mask = _optim.adapter_mask(_params_tree(3))
  assert mask == {
      'big': {'kernel': False, 'bias': False},
      'proj': {'kernel': False, 'bias': False,
               'lora': {'a': True, 'b': True}},
      'mlp': {'w1': False, 'lora_w1': {'a': True, 'b': True}},
      'norm': {'scale': False}}
  with_vectors = _optim.adapter_mask(_params_tree(3), train_vectors=True)
  assert with_vectors['big'] == {'kernel': False, 'bias': True}
  assert with_vectors['norm'] == {'scale': True}
  assert with_vectors['proj']['lora'] == {'a': True, 'b': True}


def test_adapter_mask_and_labels_on_frozen_dict():
  params = flax_core.freeze(_params_tree(3))
  mask = _optim.adapter_mask(params)
  assert isinstance(mask, flax_core.FrozenDict)
  assert mask['mlp']['lora_w1']['a'] and not mask['mlp']['w1']
  labels = _optim.adapter_labels(params)
  assert labels['proj']['lora']['b'] == 'trainable'
  assert labels['proj']['kernel'] == 'frozen'


@pytest.mark.parametrize('n_base', [8, 64])
def test_adam_state_is_proportional_to_the_adapters_not_the_model(n_base):
  params = _params_tree(n_base)
  state = _optim.train_only_adapters(optax.adam(1e-3)).init(params)
  # Adam keeps mu and nu per trainable element, plus one step count.
  assert _size(state) == 2 * ADAPTER_SIZE + 1
  full = optax.adam(1e-3).init(params)
  assert _size(full) == 2 * _size(params) + 1


def test_train_vectors_adds_state_for_biases_and_scales():
  params = _params_tree(8)
  tx = _optim.train_only_adapters(optax.adam(1e-3), train_vectors=True)
  vectors = 8 + 6 + 6  # big/bias, proj/bias, norm/scale
  assert _size(tx.init(params)) == 2 * (ADAPTER_SIZE + vectors) + 1


def _train_steps(tx, params, n=3):
  """`n` steps of constant gradients 0.5, in one compiled function."""
  @jax.jit
  def run(params):
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    state = tx.init(params)
    for _ in range(n):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params
  return run(params)


def test_frozen_params_stay_bit_identical_and_adapters_train_as_plain_adam():
  params = _params_tree(8)
  tx = optax.adamw(0.1, weight_decay=0.5)
  trained = _train_steps(_optim.train_only_adapters(tx), params)
  original, lora = _params.split_params(params)
  trained_original, trained_lora = _params.split_params(trained)
  assert_trees_close(trained_original, original)  # exact
  assert_trees_close(trained_lora, _train_steps(tx, lora), atol=1e-7)
  assert np.abs(np.asarray(trained_lora['proj']['lora']['a'] -
                           lora['proj']['lora']['a'])).min() > 0.1


def test_optax_masked_and_multi_transform_compose_the_same_way():
  params = _params_tree(8)
  mask = _optim.adapter_mask(params)
  frozen = jax.tree.map(lambda m: not m, mask)
  tx = optax.adam(0.1)
  via_masked = optax.chain(optax.masked(tx, mask),
                           optax.masked(optax.set_to_zero(), frozen))
  via_multi = optax.multi_transform(
      {'trainable': tx, 'frozen': optax.set_to_zero()},
      _optim.adapter_labels(params))
  expected = _train_steps(_optim.train_only_adapters(tx), params)
  assert_trees_close(_train_steps(via_masked, params), expected)
  assert_trees_close(_train_steps(via_multi, params), expected)


def test_explicit_mask_tree_and_callable():
  params = _params_tree(8)
  only_norm = jax.tree.map(lambda _: False, params)
  only_norm['norm']['scale'] = True
  for mask in (only_norm, lambda p: only_norm):
    tx = _optim.train_only_adapters(optax.sgd(1.0), mask=mask)
    trained = _train_steps(tx, params, n=1)
    np.testing.assert_array_equal(trained['norm']['scale'],
                                  params['norm']['scale'] - 0.5)
    np.testing.assert_array_equal(trained['proj']['lora']['a'],
                                  params['proj']['lora']['a'])


def test_errors():
  with pytest.raises(TypeError, match=r'tx must be an optax '
                     r'GradientTransformation; got <function adam'):
    _optim.train_only_adapters(optax.adam)
  tx = _optim.train_only_adapters(optax.adam(1e-3))
  with pytest.raises(ValueError, match=r'no param is trainable .*"lora_\*"'):
    tx.init({'dense': {'kernel': jnp.ones((2, 2))}})


def test_can_fine_tune_then_serve_the_fused_plain_model():
  """Adapters learn a low-rank change of a frozen model; fused == adapted."""
  model = fixtures.Nested()
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (32, fixtures.D), np.float32))
  surgery = functools.partial(peft.lora, rank=2)
  with surgery() as report:
    teacher = fixtures.random_params(model.init, jax.random.key(0), x,
                                     scale=0.5)
    fresh = fixtures.random_params(model.init, jax.random.key(0), x, seed=1)
  # The student: the teacher's frozen base, fresh adapters with B = 0.
  params = _params.merge_params(
      _params.split_params(teacher).original,
      jax.tree_util.tree_map_with_path(
          lambda p, v: jnp.zeros_like(v) if p[-1].key == 'b' else v,
          _params.split_params(fresh).lora))

  def apply(params, x):
    with surgery():
      return model.apply({'params': params}, x)

  target = apply(teacher, x)
  loss = lambda p: jnp.mean((apply(p, x) - target) ** 2)
  tx = _optim.train_only_adapters(optax.adam(0.05))

  @jax.jit
  def train(params):
    def step(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), value
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                       length=60)
    return params, losses, loss(params)

  trained, losses, final = train(params)
  assert float(losses[0]) > 0.05
  assert float(final) < 0.01 * float(losses[0])  # ~0.001 observed
  assert_trees_close(_params.split_params(trained).original,
                     _params.split_params(params).original)
  fused = _fuse.fuse_params(trained, report.specs)
  np.testing.assert_allclose(model.apply({'params': fused}, x),
                             apply(trained, x), rtol=1e-4, atol=1e-5)
