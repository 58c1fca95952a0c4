"""LoRA+ (`peft.lora_plus`): B learns `ratio` times faster than A, checked
against optimizers run by hand on the A and B subtrees."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft
import peft.nnx as pnnx


def _params():
  keys = jax.random.split(jax.random.key(0), 5)
  return {
      'up': {'kernel': jax.random.normal(keys[0], (4, 8)),
             'bias': jax.random.normal(keys[1], (8,)),
             'lora': {'a': jax.random.normal(keys[2], (4, 2)),
                      'b': jax.random.normal(keys[3], (2, 8))}},
      'norm': {'scale': jax.random.normal(keys[4], (4,))},
  }


def _grads(params, seed):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _run(tx, params, steps=3):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(steps):
    updates, state = step(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_sgd_steps_are_lr_for_a_and_ratio_times_lr_for_b():
  params = _params()
  tx = peft.lora_plus(optax.sgd, learning_rate=0.1, ratio=16.0)
  grads = _grads(params, 0)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['up']['lora']['a'],
                             -0.1 * grads['up']['lora']['a'], rtol=1e-6)
  np.testing.assert_allclose(updates['up']['lora']['b'],
                             -1.6 * grads['up']['lora']['b'], rtol=1e-6)
  for frozen in (updates['up']['kernel'], updates['up']['bias'],
                 updates['norm']['scale']):
    assert not jnp.any(frozen)


def test_adamw_with_a_schedule_equals_two_separate_adamws():
  params = _params()
  schedule = optax.linear_schedule(1e-2, 1e-3, 3)
  got = _run(peft.lora_plus(optax.adamw, schedule, ratio=4.0,
                            weight_decay=0.1), params)
  # By hand: one adamw on A at the schedule, one on B at 4x the schedule.
  a_tx = optax.adamw(schedule, weight_decay=0.1)
  b_tx = optax.adamw(lambda c: 4.0 * schedule(c), weight_decay=0.1)
  a, b = params['up']['lora']['a'], params['up']['lora']['b']
  a_state, b_state = a_tx.init(a), b_tx.init(b)
  for i in range(3):
    g = _grads(params, i)['up']['lora']
    ua, a_state = a_tx.update(g['a'], a_state, a)
    ub, b_state = b_tx.update(g['b'], b_state, b)
    a, b = a + ua, b + ub
  np.testing.assert_allclose(got['up']['lora']['a'], a, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got['up']['lora']['b'], b, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got['up']['kernel'], params['up']['kernel'])


def test_vectors_train_at_as_rate():
  params = _params()
  tx = peft.lora_plus(optax.sgd, 0.5, ratio=2.0, train_vectors=True)
  grads = _grads(params, 0)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['up']['bias'], -0.5 * grads['up']['bias'],
                             rtol=1e-6)
  np.testing.assert_allclose(updates['norm']['scale'],
                             -0.5 * grads['norm']['scale'], rtol=1e-6)


def test_it_trains_an_nnx_model_through_nnx_optimizer():
  model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
  pnnx.apply_lora(model, rank=2, b_init=nnx.initializers.ones,
                  rngs=nnx.Rngs(1))
  layer = model.layers[0]
  a0, b0 = layer.lora.a[...], layer.lora.b[...]
  optimizer = nnx.Optimizer(model, peft.lora_plus(optax.sgd, 0.1, ratio=8.0),
                            wrt=pnnx.LoRAParam)
  x = jnp.ones((3, 4))

  def loss(model):
    return jnp.sum(model(x) ** 2)

  grads = nnx.grad(loss, argnums=nnx.DiffState(0, pnnx.LoRAParam))(model)
  optimizer.update(model, grads)
  g = nnx.to_pure_dict(grads)['layers'][0]['lora']
  np.testing.assert_allclose(layer.lora.a[...], a0 - 0.1 * g['a'], rtol=1e-5)
  np.testing.assert_allclose(layer.lora.b[...], b0 - 0.8 * g['b'], rtol=1e-5)


@pytest.mark.parametrize('ratio', [0, -1.0, float('inf'), '16', True])
def test_a_bad_ratio_is_an_error(ratio):
  with pytest.raises(ValueError, match=r'lora_plus: ratio must be a finite '
                     r'number > 0; got .*Pass e\.g\. ratio=16\.0'):
    peft.lora_plus(optax.sgd, 0.1, ratio=ratio)


def test_an_optimizer_that_is_not_optax_is_an_error():
  with pytest.raises(TypeError, match=r'must return an optax '
                     r'GradientTransformation.*optax\.adamw'):
    peft.lora_plus(lambda learning_rate: learning_rate, 0.1)


def test_params_without_adapters_are_an_error_naming_lora_plus():
  tx = peft.lora_plus(optax.sgd, 0.1)
  with pytest.raises(ValueError, match=r'lora_plus: no param is trainable'):
    tx.init({'kernel': jnp.ones((2, 2))})
