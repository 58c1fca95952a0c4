"""`peft.combine_adapters`, checked against numpy's own sums and SVDs of
each kernel's update, on every layer kind."""

import functools

from flax import linen as nn
import jax
import numpy as np
import pytest

import peft
from tests.helpers import assert_trees_close
from tests.kernel_init_test import IDS
from tests.kernel_init_test import IMG
from tests.kernel_init_test import MATRICES
from tests.kernel_init_test import Layers
from tests.kernel_init_test import X

LAYERS = tuple(MATRICES)
WEIGHTS = {'fr': 0.7, 'de': -0.3}


@functools.lru_cache(maxsize=None)
def _adapters(name):
  """Two adapter sets of one model: other ranks, alphas and scale rules."""
  options = {'fr': dict(rank=2, alpha=4.0),
             'de': dict(rank=3, alpha=3.0, use_rslora=True)}[name]
  surgery = peft.lora(**options, targets=LAYERS,
                      b_init=nn.initializers.normal(0.5))
  with surgery as report:
    params = Layers().init(jax.random.key(len(name) + ord(name[0])), X, IDS,
                           IMG)['params']
  split = peft.split_params(params)
  return split.lora, report.specs, split.original


def _update(lora, spec):
  """`scale * delta(A, B)`, kernel-shaped, by numpy."""
  node = lora
  for key in spec.adapter_path:
    node = node[key]
  return spec.scale * np.einsum(spec.delta_str, np.asarray(node['a']),
                                np.asarray(node['b']))


def _specs_by_layer(specs):
  return {spec.path[0]: spec for spec in specs}


def _expected_updates(names=('fr', 'de')):
  out = {}
  for name in names:
    lora, specs, _ = _adapters(name)
    for layer, spec in _specs_by_layer(specs).items():
      out[layer] = out.get(layer, 0) + WEIGHTS[name] * _update(lora, spec)
  return out


def _combine(**kwargs):
  return peft.combine_adapters(
      {name: _adapters(name)[:2] for name in WEIGHTS}, WEIGHTS, **kwargs)


def test_concat_is_the_weighted_sum_of_the_updates():
  combined = _combine()
  expected = _expected_updates()
  specs = _specs_by_layer(combined.specs)
  assert set(specs) == set(LAYERS)
  for layer, spec in specs.items():
    assert (spec.rank, spec.scale) == (5, 1.0)
    np.testing.assert_allclose(_update(combined.lora, spec), expected[layer],
                               rtol=1e-5, atol=1e-6, err_msg=layer)
  assert combined.errors == dict.fromkeys((s.key for s in combined.specs),
                                          0.0)


def test_fused_combination_equals_base_plus_updates_under_jit():
  combined = _combine()
  base = _adapters('fr')[2]
  fused = jax.jit(lambda p: peft.fuse_params(p, combined.specs))(
      peft.merge_params(base, combined.lora))
  for layer, update in _expected_updates().items():
    weight = _specs_by_layer(combined.specs)[layer].weight_name
    np.testing.assert_allclose(
        fused[layer][weight], np.asarray(base[layer][weight]) + update,
        rtol=1e-5, atol=1e-5, err_msg=layer)


@pytest.mark.parametrize('rank', [1, 3])
def test_svd_is_the_best_low_rank_update_and_reports_its_error(rank):
  combined = _combine(method='svd', rank=rank)
  for layer, spec in _specs_by_layer(combined.specs).items():
    assert (spec.rank, spec.scale) == (rank, 1.0)
    m = MATRICES[layer](_expected_updates()[layer])
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    best = (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]
    np.testing.assert_allclose(MATRICES[layer](_update(combined.lora, spec)),
                               best, rtol=1e-4, atol=1e-5, err_msg=layer)
    error = np.sqrt(np.sum(s[..., rank:] ** 2) / np.sum(s ** 2))
    np.testing.assert_allclose(combined.errors[spec.key], error, rtol=1e-4,
                               atol=1e-6, err_msg=layer)
    assert combined.errors[spec.key] > 0.01


def test_svd_above_the_update_rank_is_exact():
  lora, specs, _ = _adapters('fr')  # Rank 2.
  combined = peft.combine_adapters({'fr': (lora, specs)}, method='svd',
                                   rank=3)
  for layer, spec in _specs_by_layer(combined.specs).items():
    assert spec.rank == 3
    np.testing.assert_allclose(
        _update(combined.lora, spec),
        _update(lora, _specs_by_layer(specs)[layer]), rtol=1e-4, atol=1e-5)
    assert combined.errors[spec.key] < 1e-3


def test_kernels_of_only_some_adapters_get_their_sum():
  fr_lora, fr_specs, _ = _adapters('fr')
  de_lora, de_specs, _ = _adapters('de')
  dense_only = tuple(s for s in de_specs if s.path == ('dense',))
  combined = peft.combine_adapters(
      {'fr': (fr_lora, fr_specs),
       'de': ({'dense': de_lora['dense']}, dense_only)}, WEIGHTS)
  specs = _specs_by_layer(combined.specs)
  assert specs['dense'].rank == 5 and specs['conv'].rank == 2
  np.testing.assert_allclose(_update(combined.lora, specs['conv']),
                             _expected_updates(('fr',))['conv'], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(_update(combined.lora, specs['dense']),
                             _expected_updates()['dense'], rtol=1e-5,
                             atol=1e-6)


def test_files_in_and_out(tmp_path):
  loaded = {}
  for name in WEIGHTS:
    lora, specs, _ = _adapters(name)
    peft.save_adapters(tmp_path / f'{name}.safetensors', lora, specs)
    loaded[name] = peft.load_adapters(tmp_path / f'{name}.safetensors')
  combined = peft.combine_adapters(loaded, WEIGHTS)
  assert_trees_close(combined.lora, _combine().lora)
  peft.save_adapters(tmp_path / 'both.safetensors', combined.lora,
                     combined.specs)
  back = peft.load_adapters(tmp_path / 'both.safetensors')
  assert back.specs == combined.specs
  assert_trees_close(back.lora, jax.tree.map(np.asarray, combined.lora))


def _other_model_adapters():
  class Wider(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(7, name='dense')(x)
  with peft.lora(rank=2) as report:
    params = Wider().init(jax.random.key(0), X)['params']
  return peft.split_params(params).lora, report.specs


@pytest.mark.parametrize('call, error, match', [
    (lambda a: peft.combine_adapters(a, method='mean'), ValueError,
     r"combine_adapters: method must be 'concat' or 'svd'; got 'mean'"),
    (lambda a: peft.combine_adapters(a, method='svd'), ValueError,
     r"LoRA rank must be a positive int; got None at "
     r"'combine_adapters\(method=svd\)'\. Pass e\.g\. rank=8\."),
    (lambda a: peft.combine_adapters(a, rank=2), ValueError,
     r"rank=2 is for method='svd'; 'concat' keeps the sum of the ranks"),
    (lambda a: peft.combine_adapters({}), ValueError,
     r'adapters must be a non-empty dict name -> \(lora, specs\)'),
    (lambda a: peft.combine_adapters(a, {'fr': 1.0}), ValueError,
     r"weights must name the adapters \['de', 'fr'\]; got \['fr'\]"),
    (lambda a: peft.combine_adapters(a, {'fr': 1.0, 'de': float('nan')}),
     ValueError, r"the weight of 'de' must be a finite number; got nan"),
    (lambda a: peft.combine_adapters({**a, 'de': a['de'][0]}), TypeError,
     r"adapters\['de'\] must be \(lora, specs\)"),
    (lambda a: peft.combine_adapters({**a, 'de': _other_model_adapters()}),
     ValueError,
     r"adapter 'dense/lora' of 'de' has weight_shape=\(5, 7\), but an "
     r"earlier adapter of that kernel \(among \['de', 'fr'\]\) has \(5, 6\)\. "
     r'Use adapters made for the same model'),
    (lambda a: peft.combine_adapters(a, method='svd', rank=6), ValueError,
     r"combine_adapters: the combined adapter 'dense/lora' has rank 6, but "
     r"its kernel is a 5x6 matrix, so method='svd' gives at most rank 5"),
])
def test_errors(call, error, match):
  adapters = {name: _adapters(name)[:2] for name in WEIGHTS}
  with pytest.raises(error, match=match):
    call(adapters)
