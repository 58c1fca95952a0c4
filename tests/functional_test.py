"""The functional LoRA API on plain arrays and pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft._core import functional as F
from tests.helpers import assert_trees_close


def _np(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _adapter(n_in=5, rank=2, n_out=3, seed=0):
  return {'A': jnp.asarray(_np(seed, (n_in, rank))),
          'B': jnp.asarray(_np(seed + 1, (rank, n_out)))}


def test_init_shapes_values_and_determinism():
  w = jnp.ones((5, 3), jnp.bfloat16)
  adapter = F.init_lora_adapter(w, 4, 0.5, key=jax.random.key(0))
  assert adapter['A'].shape == (5, 4) and adapter['B'].shape == (4, 3)
  assert adapter['A'].dtype == adapter['B'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(adapter['B'], np.zeros((4, 3)))
  # A ~ N(0, 0.5^2): the same key gives the same draw, scaled by init_std.
  again = F.init_lora_adapter(w, 4, init_std=1.0, dtype=jnp.float32,
                              key=jax.random.key(0))
  np.testing.assert_allclose(np.asarray(adapter['A'], np.float32),
                             0.5 * np.asarray(again['A']), rtol=1e-2)
  assert float(jnp.std(again['A'])) > 0.3


def test_init_large_draw_has_the_requested_std():
  adapter = F.init_lora_adapter(jax.ShapeDtypeStruct((512, 8), jnp.float32),
                                8, 0.01, key=jax.random.key(1))
  np.testing.assert_allclose(float(jnp.std(adapter['A'])), 0.01, rtol=0.05)
  assert abs(float(jnp.mean(adapter['A']))) < 1e-3


def test_fresh_adapter_changes_nothing():
  w = jnp.asarray(_np(0, (5, 3)))
  adapter = F.init_lora_adapter(w, 2, key=jax.random.key(0))
  np.testing.assert_array_equal(F.merge_lora_weight(w, adapter), w)
  x = jnp.asarray(_np(1, (4, 5)))
  np.testing.assert_array_equal(F.lora_linear(x, w, adapter), x @ w)


@pytest.mark.parametrize('alpha', [1.0, 4.0])
def test_lora_delta_value(alpha):
  adapter = _adapter(rank=2)
  expected = (alpha / 2) * (np.asarray(adapter['A'], np.float64)
                            @ np.asarray(adapter['B'], np.float64))
  np.testing.assert_allclose(F.lora_delta(adapter, alpha), expected,
                             rtol=1e-5)


def test_lowercase_keys_of_linen_adapters_work_too():
  upper = _adapter()
  lower = {'a': upper['A'], 'b': upper['B']}
  np.testing.assert_array_equal(F.lora_delta(lower, 2.0),
                                F.lora_delta(upper, 2.0))


def test_lora_linear_equals_the_merged_weight():
  w, x, adapter = jnp.asarray(_np(5, (5, 3))), jnp.asarray(_np(6, (2, 4, 5))), (
      _adapter())
  y = F.lora_linear(x, w, adapter, alpha=3.0)
  merged = np.asarray(w, np.float64) + 1.5 * (
      np.asarray(adapter['A'], np.float64) @ np.asarray(adapter['B']))
  np.testing.assert_allclose(y, np.asarray(x, np.float64) @ merged,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      y, x @ F.merge_lora_weight(w, adapter, 3.0), rtol=1e-4, atol=1e-5)


def test_lora_linear_gradients_reach_only_the_adapter():
  w, x, adapter = jnp.asarray(_np(5, (5, 3))), jnp.asarray(_np(6, (4, 5))), (
      _adapter())
  gw, ga = jax.grad(lambda w, a: F.lora_linear(x, w, a).sum(),
                    argnums=(0, 1))(w, adapter)
  np.testing.assert_array_equal(gw, np.zeros_like(w))
  # d/dB sum((x @ A) @ B) / rank = (x @ A).T @ 1 / rank.
  np.testing.assert_allclose(
      ga['B'], (x @ adapter['A']).T @ np.ones((4, 3)) / 2, rtol=1e-5)


def test_merge_unmerge_round_trip_and_bfloat16():
  adapter = _adapter()
  w = jnp.asarray(_np(7, (5, 3)))
  back = F.unmerge_lora_weight(F.merge_lora_weight(w, adapter, 2.0), adapter,
                               2.0)
  np.testing.assert_allclose(back, w, atol=1e-6)
  w16 = w.astype(jnp.bfloat16)
  merged = F.merge_lora_weight(w16, adapter, 2.0)
  assert merged.dtype == jnp.bfloat16
  exact = np.asarray(w16, np.float32) + np.asarray(adapter['A']) @ np.asarray(
      adapter['B'])
  np.testing.assert_array_equal(np.asarray(merged),
                                exact.astype(jnp.bfloat16))


def test_under_jit():
  adapter, w = _adapter(), jnp.asarray(_np(7, (5, 3)))
  merged = jax.jit(F.merge_lora_weight)(w, adapter)
  np.testing.assert_allclose(merged, F.merge_lora_weight(w, adapter),
                             rtol=1e-6)


def test_tree_lora_delta():
  tree = {'layers': [_adapter(seed=0), _adapter(4, 1, 2, seed=3)],
          'head': {'a': jnp.ones((2, 1)), 'b': jnp.ones((1, 2))}}
  deltas = F.tree_lora_delta(tree, alpha=2.0)
  expected = {'layers': [F.lora_delta(tree['layers'][0], 2.0),
                         F.lora_delta(tree['layers'][1], 2.0)],
              'head': jnp.full((2, 2), 2.0)}
  assert_trees_close(deltas, expected)


def test_tree_lora_delta_custom_is_leaf():
  tree = {'q': {'down': jnp.ones((2, 1)), 'up': jnp.ones((1, 3))}}
  is_leaf = lambda n: isinstance(n, dict) and 'down' in n
  with pytest.raises(ValueError, match=r"adapter must be a dict .*'down'"):
    F.tree_lora_delta(tree, is_leaf=is_leaf)
  with pytest.raises(ValueError, match=r"leaf at \"\['q'\]\['down'\]\" is "
                     r"not inside an adapter"):
    F.tree_lora_delta(tree)


def test_init_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r'weight must be 2-D .*got shape '
                     r'\(2, 3, 4\)'):
    F.init_lora_adapter(jnp.ones((2, 3, 4)), 2, key=key)
  with pytest.raises(ValueError, match=r"rank must be a positive int; got 0 "
                     r"at 'init_lora_adapter'"):
    F.init_lora_adapter(jnp.ones((2, 3)), 0, key=key)
  with pytest.raises(ValueError, match=r'init_std must be >= 0; got -1.0'):
    F.init_lora_adapter(jnp.ones((2, 3)), 2, -1.0, key=key)
  with pytest.raises(TypeError, match=r'weight is an RNG key.*pass the key '
                     r'by keyword'):
    F.init_lora_adapter(key, jnp.ones((2, 3)), 2)
  with pytest.raises(TypeError, match=r'key is required; got key=None'):
    F.init_lora_adapter(jnp.ones((2, 3)), 2)


@pytest.mark.parametrize('call, match', [
    (lambda: F.lora_delta({'A': jnp.ones((2, 2))}),
     r"lora_delta: adapter must be a dict \{'A'"),
    (lambda: F.lora_delta({'A': jnp.ones((2, 2)), 'B': jnp.ones((3, 2))}),
     r'A has shape \(2, 2\) and B \(3, 2\); they need the same rank'),
    (lambda: F.lora_delta({'A': jnp.ones((2, 0)), 'B': jnp.ones((0, 2))}),
     r'same rank > 0'),
    (lambda: F.lora_delta({'A': jnp.ones(2), 'B': jnp.ones((1, 2))}),
     r'A must be 2-D \(in, out\); got shape \(2,\)'),
    (lambda: F.lora_linear(jnp.ones((4, 3)), jnp.ones((5, 3)), _adapter()),
     r'lora_linear: shapes do not fit: x \(4, 3\), weight \(5, 3\)'),
    (lambda: F.lora_linear(jnp.ones((4, 5)), jnp.ones((5, 2)), _adapter()),
     r'weight \(5, 2\), A \(5, 2\), B \(2, 3\)'),
    (lambda: F.merge_lora_weight(jnp.ones((4, 3)), _adapter()),
     r'merge_lora_weight: weight \(4, 3\) does not fit A \(5, 2\)'),
    (lambda: F.unmerge_lora_weight(jnp.ones((5, 3, 1)), _adapter()),
     r'unmerge_lora_weight: weight must be 2-D'),
])
def test_shape_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
