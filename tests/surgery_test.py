"""Whole-model surgery: rules, reports, the LoRA wrapper module."""

import re

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from tests import fixtures
from tests.helpers import assert_trees_close


def _shapes(model, x, surgery=None):
  """Param shapes from tracing only (no XLA compile)."""
  init = lambda: jax.eval_shape(model.init, jax.random.key(0), x)['params']
  if surgery is None:
    return jax.tree.map(lambda s: s.shape, init())
  with surgery as report:
    shapes = jax.tree.map(lambda s: s.shape, init())
  return shapes, report


def _adapted(shapes, prefix=()):
  """Paths of the modules holding an adapter."""
  found = []
  for key, value in shapes.items():
    if key.startswith('lora'):
      found.append('/'.join(prefix))
    elif isinstance(value, dict):
      found += _adapted(value, prefix + (key,))
  return sorted(found)


def test_default_targets_every_einsum_like_layer_not_embed_or_conv():
  shapes, report = _shapes(fixtures.Zoo(), fixtures.tokens(),
                           peft.lora(rank=2))
  assert _adapted(shapes) == ['mlp', 'out', 'q']
  assert sorted(report.seen) == ['conv', 'embed', 'mlp', 'out', 'q']


def test_base_params_keep_their_paths():
  x = fixtures.tokens()
  plain = _shapes(fixtures.Zoo(), x)
  adapted, _ = _shapes(fixtures.Zoo(), x,
                       peft.lora(rank=2, targets=(nn.Embed, nn.Conv,
                                                  '.*')))
  base_only, _ = peft_split(adapted)
  assert base_only == plain
  assert _adapted(adapted) == ['conv', 'embed', 'mlp', 'out', 'q']


def peft_split(shapes):
  base = jax.tree_util.tree_map_with_path(lambda p, s: s, shapes)
  lora = {}
  for name in list(base):
    for key in [k for k in base[name] if k.startswith('lora')]:
      lora.setdefault(name, {})[key] = base[name].pop(key)
  return base, lora


@pytest.mark.parametrize('targets, expected', [
    ('q|out', ['out', 'q']),
    (nn.DenseGeneral, ['q']),
    ((nn.Dense, 'out'), ['mlp', 'out']),
    (lambda m: getattr(m, 'features', None) == fixtures.D, ['conv', 'embed',
                                                            'mlp']),
])
def test_targets(targets, expected):
  shapes, _ = _shapes(fixtures.Zoo(), fixtures.tokens(),
                      peft.lora(rank=2, targets=targets))
  assert _adapted(shapes) == expected


def test_exclude_and_per_rule_rank_first_rule_wins():
  rules = [peft.LoRARule(rank=4, targets='q'),
           peft.LoRARule(rank=1, targets='.*', exclude=(nn.Embed, 'conv'))]
  shapes, report = _shapes(fixtures.Zoo(), fixtures.tokens(),
                           peft.lora(rules=rules))
  assert _adapted(shapes) == ['mlp', 'out', 'q']
  assert shapes['q']['lora']['a'] == (fixtures.D, 4)
  assert shapes['mlp']['lora']['a'] == (fixtures.D, 1)
  assert {s.key: s.rank for s in report.specs} == {
      'q/lora': 4, 'out/lora': 1, 'mlp/lora': 1}


def test_target_matching_nothing_lists_existing_paths():
  with pytest.raises(ValueError, match=re.compile(
      r"target 'attn' \(rule 0\) matched no layer.*\n  conv \(Conv\)\n  "
      r'embed \(Embed\)', re.S)):
    _shapes(fixtures.Zoo(), fixtures.tokens(),
            peft.lora(rank=2, targets='attn'))


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(), ValueError, 'LoRA needs a rank'),
    (dict(rank=2, rules=[peft.LoRARule(rank=2)]), ValueError,
     r"either rules=\[...\] or single-rule options.*\['rank'\]"),
    (dict(rules=['q']), TypeError, "rules must hold peft.LoRARule.*'q'"),
    (dict(rank=2, targets='('), ValueError, r"'\(', which is not a valid "
     'regex'),
    (dict(rank=2, targets=nn.LayerNorm), TypeError,
     'names LayerNorm, which peft cannot adapt'),
    (dict(rank=2, targets=3), TypeError, 'targets entries must be.*got 3'),
    (dict(rank=2, alpha=-1.0), ValueError, 'alpha must be positive.*-1.0'),
    (dict(rank=2, dropout=1.0), ValueError, r'dropout must be in \[0, 1\)'),
    (dict(rank=-2), ValueError, 'rank must be a positive int; got -2'),
])
def test_rule_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    peft.lora(**kwargs)


def test_custom_einsum_layers_in_one_shared_scope():
  x = fixtures.features()
  plain = _shapes(fixtures.CustomModel(), x)
  shapes, report = _shapes(fixtures.CustomModel(), x, peft.lora(rank=2))
  assert plain == {'proj': {'w': (8, 8)},
                   'mlp': {'gating_einsum': (2, 8, 6), 'linear': (6, 8)}}
  assert shapes['mlp']['lora_gating_einsum'] == {'a': (8, 2),
                                                 'b': (2, 2, 6)}
  assert shapes['mlp']['lora_linear'] == {'a': (6, 2), 'b': (2, 8)}
  assert shapes['proj']['lora_w'] == {'a': (8, 2), 'b': (2, 8)}
  assert sorted(s.key for s in report.specs) == [
      'mlp/lora_gating_einsum', 'mlp/lora_linear', 'proj/lora_w']


def test_custom_model_values_at_init_and_fused():
  x = fixtures.features()
  model = fixtures.CustomModel()
  surgery = peft.lora(rank=2)
  with surgery as report:
    params = jax.jit(model.init)(jax.random.key(0), x)['params']
  base, _ = peft_split(params)
  plain = jax.jit(model.apply)

  @jax.jit
  def adapted(p):
    with surgery:
      return model.apply({'params': p}, x)

  assert_trees_close(adapted(params), plain({'params': base}, x))
  params = fixtures.randomize_adapters(params)
  fused, _ = peft_split(params)
  for spec in report.specs:
    scope = params
    for k in spec.path:
      scope = scope[k]
    ab = scope[spec.adapter_name]
    target = fused
    for k in spec.path:
      target = target[k]
    target[spec.weight_name] = target[spec.weight_name] + spec.scale * (
        jnp.einsum(spec.delta_str, ab['a'], ab['b']))
  np.testing.assert_allclose(adapted(params), plain({'params': fused}, x),
                             rtol=1e-5, atol=1e-5)


def test_nested_surgery_is_refused_rather_than_half_applied():
  # The outer surgery wraps every layer first, so an inner one could only
  # be ignored; issue 12 made that silent case an error (options_test.py
  # has the cases and the one-surgery fix).
  x = fixtures.features((2, fixtures.D))
  with pytest.raises(ValueError, match='nested LoRA surgeries do not '
                     'combine'):
    with peft.lora(rank=2), peft.lora(rank=3):
      _shapes(fixtures.Nested(), x)


def test_wrapper_module_shares_scope_and_forwards():
  class Model(nn.Module):
    width: int = 3
    def __kontext_keys__(self):
      return {'x': 'batch.x'}
    @nn.compact
    def __call__(self, x):
      return nn.Dense(self.width, name='proj')(x)

  model = peft.LoRA(model=Model(), rank=2)
  x = jnp.ones((1, 4))
  shapes = _shapes(model, x)
  assert shapes == {'proj': {'bias': (3,), 'kernel': (4, 3),
                             'lora': {'a': (4, 2), 'b': (2, 3)}}}
  assert model.width == 3
  assert model.__kontext_keys__() == {'x': 'batch.x'}
  with pytest.raises(AttributeError):
    _ = model.no_such_attribute


def test_summary_lists_layers_and_counts():
  x = fixtures.tokens()
  surgery = peft.lora(rank=2, targets=('q', 'mlp'))
  with surgery as report:
    params = jax.eval_shape(fixtures.Zoo().init, jax.random.key(0), x)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        params['params'])
  text = report.summary(params)
  assert re.search(r'q \[kernel\] +DenseGeneral +\(8, 2, 4\) +\(8, 2\) +'
                   r'\(2, 2, 4\) +2 +1\n', text)
  assert re.search(r'mlp \[kernel\] +Dense +\(8, 8\)', text)
  trainable, total = peft.count_params(params)
  assert trainable == 8 * 2 + 2 * 8 + 8 * 2 + 2 * 8
  assert f'{trainable} trainable of {total} (' in text
  assert '2 adapted layers' in text
  text = peft.render_params(params)
  assert "'lora': {'a':" in text and "'embed':" in text
  assert 'treescope' in peft.render_params(params, as_html=True)


def test_adapters_inherit_kernel_partitioning():
  part = nn.with_partitioning
  init = nn.initializers.lecun_normal()

  class Sharded(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(10, 4, embedding_init=part(init, ('vocab', 'embed')),
                   name='emb')(tokens)
      x = nn.Dense(6, kernel_init=part(init, ('embed', 'mlp')), name='d')(x)
      return nn.Einsum((6, 2, 3), 'btd,dnh->btnh', name='q',
                       kernel_init=part(init, ('mlp', 'heads', None)))(x)

  with peft.lora(rank=2, targets=(nn.Embed, '.*')):
    boxes = jax.eval_shape(Sharded().init, jax.random.key(0),
                           jnp.ones((1, 3), jnp.int32))['params']
  names = jax.tree.map(
      lambda b: b.names if isinstance(b, nn.Partitioned) else None, boxes,
      is_leaf=lambda b: isinstance(b, nn.Partitioned))
  assert names['d']['lora'] == {'a': ('embed', None), 'b': (None, 'mlp')}
  assert names['emb']['lora'] == {'a': ('vocab', None),
                                  'b': (None, 'embed')}
  assert names['q']['lora'] == {'a': ('mlp', None),
                                'b': (None, 'heads', None)}
