"""One check per LoRA option, the same at every entry point (linen, nnx),
and surgeries that cannot combine refuse to nest."""

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
import peft.nnx as pnnx

X = jnp.ones((1, 4))

# (option, bad value, what the message says is expected).
BAD_OPTIONS = [
    ('alpha', float('inf'), r'alpha must be positive or None; got inf'),
    ('alpha', float('nan'), r'alpha must be positive or None; got nan'),
    ('alpha', -1.0, r'alpha must be positive or None; got -1\.0'),
    ('alpha', 0, r'alpha must be positive or None; got 0 '),
    ('alpha', '16', r"alpha must be positive or None; got '16'"),
    ('alpha', True, r'alpha must be positive or None; got True'),
    ('dropout', '0.1', r"dropout must be in \[0, 1\); got '0.1'"),
    ('dropout', 1.0, r'dropout must be in \[0, 1\); got 1\.0'),
    ('dropout', -0.1, r'dropout must be in \[0, 1\); got -0\.1'),
    ('dropout', float('nan'), r'dropout must be in \[0, 1\); got nan'),
    ('use_rslora', 'yes', r"use_rslora must be a bool; got 'yes'"),
    ('use_rslora', 1, r'use_rslora must be a bool; got 1 at'),
    ('dtype', jnp.int32, r'dtype must be None or a float dtype; got'),
    ('dtype', 'int8', r"dtype must be None or a float dtype; got 'int8'"),
    ('a_init', 3, r'a_init must be an initializer'),
]
BAD_RANKS = [('4', r"rank must be a positive int; got '4'"),
             (2.0, r'rank must be a positive int; got 2\.0'),
             (True, r'rank must be a positive int; got True'),
             (0, r'rank must be a positive int; got 0')]


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='out')(nn.relu(nn.Dense(8, name='up')(x)))


def _linen_entry_points(options):
  """Every linen way to give LoRA options, each building as far as the
  first check."""
  rank = options.pop('rank', 2)
  return {
      'peft.lora': lambda: peft.lora(rank, **options),
      'LoRARule': lambda: peft.LoRARule(rank=rank, **options),
      'LoRADense': lambda: peft.LoRADense(
          rank=rank, wrapped=nn.Dense(3), **options),
      'LoRADenseAdapter': lambda: peft.LoRADenseAdapter(
          features=3, rank=rank, **options),
      'peft.LoRA': lambda: peft.LoRA(model=Mlp(), rank=rank, **options),
  }


def _nnx_entry_points(options):
  rank = options.pop('rank', 2)
  if 'dtype' in options:  # the nnx A/B dtype is `param_dtype`
    options['param_dtype'] = options.pop('dtype')
  return {
      'LoRALinear': lambda: pnnx.LoRALinear(
          4, 3, rank=rank, rngs=nnx.Rngs(0),
          **{k: v for k, v in options.items() if k != 'param_dtype'}),
      'LoRALinear.from_module': lambda: pnnx.LoRALinear.from_module(
          nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=rank, rngs=nnx.Rngs(1),
          **options),
      'nnx.LoRA': lambda: pnnx.LoRA(4, rank, 3, rngs=nnx.Rngs(0), **options),
      'apply_lora': lambda: pnnx.apply_lora(
          nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=rank, rngs=nnx.Rngs(1),
          **options),
  }


@pytest.mark.parametrize('option, value, match', BAD_OPTIONS)
def test_a_bad_option_gets_one_message_at_every_linen_entry_point(
    option, value, match):
  for where, build in _linen_entry_points({option: value}).items():
    with pytest.raises(ValueError, match=match) as e:
      build()
    assert 'Pass e.g.' in str(e.value), where


@pytest.mark.parametrize('option, value, match', BAD_OPTIONS)
def test_a_bad_option_gets_one_message_at_every_nnx_entry_point(
    option, value, match):
  for where, build in _nnx_entry_points({option: value}).items():
    if option == 'dtype' and where == 'LoRALinear':
      continue  # LoRALinear takes the layer's own dtype, checked by nnx
    with pytest.raises(ValueError, match=match.replace(
        'dtype must', r'(param_)?dtype must')) as e:
      build()
    assert 'Pass e.g.' in str(e.value), where


@pytest.mark.parametrize('rank, match', BAD_RANKS)
def test_a_bad_rank_gets_one_message_everywhere(rank, match):
  points = {**_linen_entry_points({'rank': rank}),
            **_nnx_entry_points({'rank': rank})}
  for where, build in points.items():
    with pytest.raises(ValueError, match=match):
      build()
    del where


def test_the_message_names_where_the_option_was_given():
  with pytest.raises(ValueError, match=r"got -1\.0 at 'LoRADense'"):
    peft.LoRADense(rank=2, alpha=-1.0, wrapped=nn.Dense(3))
  with pytest.raises(ValueError, match=r"got -1\.0 at 'LoRARule'"):
    peft.LoRARule(rank=2, alpha=-1.0)
  with pytest.raises(ValueError, match=r"got inf at 'LoRALinear'"):
    pnnx.LoRALinear(4, 3, rank=2, alpha=float('inf'), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"got 'yes' at 'LoRA'"):
    peft.LoRA(model=Mlp(), rank=2, use_rslora='yes')


def test_numpy_scalars_are_accepted_and_normalised():
  rule = peft.LoRARule(rank=np.int64(4), alpha=np.float32(8.0),
                       use_rslora=np.bool_(True), dropout=np.float64(0.1))
  assert (type(rule.rank), type(rule.alpha), rule.alpha) == (int, float, 8.0)
  assert rule.use_rslora is True and type(rule.dropout) is float


def test_a_large_finite_alpha_keeps_a_fresh_adapter_a_no_op():
  # alpha=inf used to give inf * 0 = NaN outputs at init; a large finite
  # alpha keeps B = 0 exact.
  model = Mlp()
  base = model.init(jax.random.key(0), X)['params']
  with peft.lora(rank=2, alpha=1e30):
    params = peft.merge_params(
        base, peft.split_params(model.init(jax.random.key(1), X)['params'])
        .lora)
    out = model.apply({'params': params}, X)
  np.testing.assert_array_equal(out, model.apply({'params': base}, X))


@pytest.mark.parametrize('make', [
    pytest.param(lambda: peft.LoRA(model=peft.LoRA(model=Mlp(), rank=2),
                                   rank=2), id='LoRA(LoRA(model))'),
    pytest.param(lambda: peft.LoRA(model=Mlp(), rank=2),
                 id='LoRA-module-inside-lora()'),
])
def test_a_lora_model_inside_another_surgery_is_refused(make):
  def run():
    with peft.lora(rank=4):
      return make().init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r'was entered inside another \('
                     r'rank=4\): nested LoRA surgeries do not combine'):
    run()
  with pytest.raises(ValueError, match='nested LoRA surgeries'):
    peft.LoRA(model=peft.LoRA(model=Mlp(), rank=2), rank=2).init(
        jax.random.key(0), X)


def test_nested_lora_contexts_are_refused_with_the_one_surgery_fix():
  with pytest.raises(ValueError, match=(
      r"\(rank=2, targets=\['up'\]\) was entered inside another \(rank=4\)"
      r'.*peft\.lora\(rules=\[peft\.LoRARule')):
    with peft.lora(rank=4):
      with peft.lora(rank=2, targets='up'):
        pass
  # The refused entry left nothing behind: the outer context still works
  # and, once it is closed, none is active.
  with peft.lora(rank=4) as report:
    with pytest.raises(ValueError, match='nested'):
      with peft.lora(rank=2):
        pass
    Mlp().init(jax.random.key(0), X)
  assert sorted(s.key for s in report.specs) == ['out/lora', 'up/lora']
  plain = Mlp().init(jax.random.key(0), X)['params']
  assert 'lora' not in plain['up']


def test_the_one_surgery_fix_does_what_the_nesting_meant():
  rules = [peft.LoRARule(rank=2, targets='up'), peft.LoRARule(rank=4)]
  with peft.lora(rules=rules):
    params = Mlp().init(jax.random.key(0), X)['params']
  assert params['up']['lora']['a'].shape == (4, 2)
  assert params['out']['lora']['a'].shape == (8, 4)


def test_quantization_still_nests_with_lora():
  # Only two LoRA surgeries conflict; QLoRA nests a quantization surgery.
  with peft.quantized('int8'), peft.lora(rank=2) as report:
    Mlp().init(jax.random.key(0), X)
  assert len(report.specs) == 2


@pytest.mark.parametrize('alpha, match', [
    (float('inf'), r"alpha must be positive or None; got inf at 'lora_delta'"),
    ('2', r"got '2' at 'lora_delta'"),
    (-1.0, r'got -1\.0'),
])
def test_the_functional_api_checks_alpha_the_same_way(alpha, match):
  adapter = {'A': jnp.ones((2, 1)), 'B': jnp.ones((1, 3))}
  with pytest.raises(ValueError, match=match):
    peft.lora_delta(adapter, alpha=alpha)
  with pytest.raises(ValueError, match=match.replace('lora_delta',
                                                     'merge_lora_weight')):
    peft.merge_lora_weight(jnp.zeros((2, 3)), adapter, alpha=alpha)


def test_the_functional_api_takes_a_traced_alpha_and_none():
  adapter = {'A': jnp.ones((2, 2)), 'B': jnp.ones((2, 3))}
  traced = jax.jit(lambda s: peft.lora_delta(adapter, alpha=s))(4.0)
  np.testing.assert_allclose(traced, np.full((2, 3), 4.0))  # 4/2 * 2
  np.testing.assert_allclose(peft.lora_delta(adapter, alpha=None),
                             np.full((2, 3), 2.0))  # scale 1
