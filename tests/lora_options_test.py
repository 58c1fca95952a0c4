"""`peft.LoRAOptions`: the one declaration of the LoRA options, carried
unchanged from a rule to the adapters it builds (linen, QLoRA and nnx)."""

import dataclasses
import inspect

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft._linen import lora_fields
from peft._linen import lora_layers
from peft._linen import rules
import peft.nnx as pnnx
from peft.nnx import _adapter as nnx_adapter
from peft.nnx import _layers as nnx_layers

X = jax.random.normal(jax.random.key(0), (2, 4))
# Options that differ from every default, so a dropped one shows.
OPTIONS = peft.LoRAOptions(
    rank=3, alpha=6, use_rslora=False, dropout=0.0, deterministic=True,
    dtype=jnp.bfloat16, a_init=nn.initializers.normal(0.5),
    b_init=nn.initializers.normal(0.5))


def test_options_are_checked_normalised_and_frozen():
  options = peft.LoRAOptions(rank=np.int64(4), alpha=np.float32(8))
  assert (type(options.rank), type(options.alpha)) == (int, float)
  assert options.scale == 2.0
  assert options.replace(use_rslora=True).scale == 4.0
  assert options == peft.LoRAOptions(rank=4, alpha=8.0)
  assert hash(options) == hash(peft.LoRAOptions(rank=4, alpha=8.0))
  with pytest.raises(dataclasses.FrozenInstanceError):
    options.rank = 2  # pyrefly: ignore[read-only]
  with pytest.raises(ValueError, match=r"alpha must be positive or None; "
                     r"got -1 at 'LoRAOptions'.*Pass e\.g\. alpha=16\.0"):
    options.replace(alpha=-1)


def test_checked_names_where_the_options_came_from():
  with pytest.raises(ValueError, match=r"got 0 at 'layers/0/mlp'"):
    peft.LoRAOptions.checked('layers/0/mlp', rank=0)
  with pytest.raises(ValueError, match=r"LoRA needs a rank; got none at "
                     r"'my_rule'\. Pass e\.g\. rank=8"):
    peft.LoRAOptions.checked('my_rule', alpha=2.0)
  with pytest.raises(ValueError, match=r"'rnak' at 'x' is not a LoRA option"):
    peft.LoRAOptions.checked('x', rank=2, rnak=3)


def _init_defaults(cls) -> dict:
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name in peft.LoRAOptions.names()}


def test_every_option_is_declared_once():
  names = peft.LoRAOptions.names()
  defaults = {n: peft.LoRAOptions.default(n) for n in names}
  # The linen fields mirror LoRAOptions: same names, same defaults.
  fields = _init_defaults(lora_fields.LoRAFields)
  assert tuple(fields) == names
  assert {n: v for n, v in fields.items() if n != 'rank'} == {
      n: v for n, v in defaults.items() if n != 'rank'}
  for cls in (peft.LoRADense, peft.LoRAConv, peft.LoRAEmbed,
              peft.LoRAEinsumAdapter, peft.QLoRADense):
    assert _init_defaults(cls) == fields, cls
  # The keyword shorthands take every option (None: not given).
  assert set(names) <= set(inspect.signature(peft.lora).parameters)
  assert set(names) <= {f.name for f in dataclasses.fields(peft.LoRA)}
  nnx_names = {'param_dtype' if n == 'dtype' else n for n in names}
  assert nnx_names <= set(inspect.signature(pnnx.apply_lora).parameters)
  assert set(nnx_layers._LAYER_OPTIONS) == set(names) - {'dtype'}


def test_a_rule_carries_one_options_object():
  rule = peft.LoRARule(targets='up', options=OPTIONS)
  assert rule.options is OPTIONS
  assert (rule.rank, rule.alpha, rule.dtype) == (3, 6.0, jnp.bfloat16)
  assert peft.LoRARule(rank=3, alpha=6).options == peft.LoRAOptions(
      rank=3, alpha=6)
  with pytest.raises(AttributeError):
    _ = rule.rnak


def test_a_rule_refuses_options_and_keywords_together():
  with pytest.raises(ValueError, match=r"options=LoRAOptions\(\.\.\.\) or "
                     r"option keywords, not both; got options and \['alpha'\]"
                     r".*options\.replace"):
    peft.LoRARule(options=OPTIONS, alpha=2.0)
  with pytest.raises(TypeError, match=r"LoRARule options must be a "
                     r"peft\.LoRAOptions; got \{'rank': 2\}"):
    peft.LoRARule(options={'rank': 2})  # pyrefly: ignore[bad-argument-type]


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='out')(nn.relu(nn.Dense(8, name='up')(x)))


def _expected_up(params, options):
  """The adapted 'up' layer by hand: base + scale * x @ A @ B."""
  up = params['up']
  a, b = up['lora']['a'], up['lora']['b']
  return (X @ up['kernel'] + up['bias'][None]
          + options.scale * (X @ a.astype(jnp.float32))
          @ b.astype(jnp.float32))


def test_linen_surgery_builds_adapters_with_the_rules_options():
  rule = peft.LoRARule(targets='up', options=OPTIONS)
  with peft.lora(rules=[rule]) as report:
    params = Mlp().init(jax.random.key(1), X)['params']
  a, b = params['up']['lora']['a'], params['up']['lora']['b']
  assert (a.shape, b.shape, a.dtype) == ((4, 3), (3, 8), jnp.bfloat16)
  assert float(jnp.abs(b).max()) > 0  # b_init was used
  (spec,) = report.specs
  assert (spec.options, spec.scale) == (
      peft.LoRAOptions(rank=3, alpha=6.0), 2.0)

  class Up(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name='up')(x)

  with peft.lora(rules=[rule]):
    got = jax.jit(Up().apply)({'params': {'up': params['up']}}, X)
  np.testing.assert_allclose(got, _expected_up(params, OPTIONS), rtol=1e-5,
                             atol=1e-5)


def test_wrappers_and_qlora_carry_the_options_they_are_built_from():
  dense = lora_layers.LoRADense.from_options(OPTIONS, wrapped=nn.Dense(8))
  assert dense.options == OPTIONS
  qlora = peft.QLoRADense.from_options(OPTIONS, wrapped=nn.Dense(8),
                                       quant_method='int8')
  params = qlora.init(jax.random.key(1), X)['params']
  assert params['lora']['a'].dtype == jnp.bfloat16
  simulated = peft.SimulateQuantizedDense(wrapped=nn.Dense(8), method='int8')
  base = simulated.apply({'params': peft.split_params(params).original}, X)
  lora = params['lora']
  want = base + OPTIONS.scale * (X @ lora['a'].astype(jnp.float32)) @ (
      lora['b'].astype(jnp.float32))
  np.testing.assert_allclose(qlora.apply({'params': params}, X), want,
                             rtol=1e-5, atol=1e-5)


def test_nnx_surgery_builds_adapters_with_the_rules_options():
  model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
  pnnx.apply_lora(model, rules=[peft.LoRARule(options=OPTIONS)],
                  rngs=nnx.Rngs(1))
  layer = model.layers[0]
  assert layer.lora.options == OPTIONS
  assert layer.lora.a.dtype == jnp.bfloat16
  kernel, bias = layer.kernel[...], layer.bias[...]
  want = X @ kernel + bias[None] + OPTIONS.scale * (
      X @ layer.lora.a[...].astype(jnp.float32)) @ layer.lora.b[
          ...].astype(jnp.float32)
  got = nnx.jit(lambda m, x: m(x))(model, X)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_nnx_adapt_takes_the_layers_param_dtype_when_options_leave_it():
  linear = nnx.Linear(4, 8, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  layer = pnnx.LoRALinear.adapt(linear, peft.LoRAOptions(rank=2, dtype=None),
                                where='up', rngs=nnx.Rngs(1))
  assert layer.lora.a.dtype == jnp.bfloat16
  assert layer.kernel_variable() is linear.kernel


def test_the_nnx_adapter_refuses_a_rank_that_is_not_as():
  with pytest.raises(ValueError, match=r"options\.rank=3 but A \(4, 2\) has "
                     r"rank 2"):
    pnnx.LoRAAdapter((4, 2), (2, 8), 'ir,ro->io', options=OPTIONS,
                     rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"not both; got options and "
                     r"\['alpha'\]"):
    pnnx.LoRAAdapter((4, 3), (3, 8), 'ir,ro->io', options=OPTIONS,
                     alpha=2.0, rngs=nnx.Rngs(0))


def test_nnx_options_keep_dtype_for_the_compute_dtype():
  with pytest.raises(ValueError, match=r"LoRALinear: in peft\.nnx the dtype "
                     r"of A and B is param_dtype; got dtype=.*bfloat16"):
    nnx_adapter.nnx_options('LoRALinear', rank=2, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"param_dtype must be None or a float "
                     r"dtype; got 'int8' at 'LoRA'"):
    nnx_adapter.nnx_options('LoRA', rank=2, param_dtype='int8')


@pytest.mark.parametrize('module', [
    nn.Dense(2), nn.DenseGeneral(2), nn.Einsum((2, 3), 'bd,df->bf'),
    nn.Conv(2, (3,)), nn.Embed(4, 2), nn.LayerNorm(), nn.Dropout(0.1),
])
def test_the_wrapper_exists_exactly_for_adaptable_layers(module):
  assert (lora_layers.wrapper_type_for(module) is not None) == (
      rules.is_adaptable(module))


def test_checked_options_are_reused_but_never_across_types():
  first = peft.LoRAOptions.checked('here', rank=2, alpha=1)
  assert peft.LoRAOptions.checked('here', rank=2, alpha=1) is first
  # True == 1 and 2.0 == 2 in Python; the check still sees each.
  with pytest.raises(ValueError, match=r'alpha must be positive or None; got '
                     r"True at 'here'"):
    peft.LoRAOptions.checked('here', rank=2, alpha=True)
  with pytest.raises(ValueError, match=r"rank must be a positive int; got 2\.0"
                     r" at 'here'"):
    peft.LoRAOptions.checked('here', rank=2.0, alpha=1)
  # Unhashable values are checked every time, not cached.
  with pytest.raises(ValueError, match=r'dropout must be in \[0, 1\)'):
    peft.LoRAOptions.checked('here', rank=2, dropout=[0.1])
