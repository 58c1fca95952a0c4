"""fuse_params / unfuse_params on hand-built trees and adapted models."""

import functools

from flax import core as flax_core
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft._core import fuse as _fuse
from peft._core import params as _params
from peft._core import spec as _spec
from tests import fixtures
from tests.helpers import assert_trees_close

split_params = _params.split_params
merge_params = _params.merge_params
fuse_params = _fuse.fuse_params
unfuse_params = _fuse.unfuse_params


def _rand(seed, shape, dtype=jnp.float32):
  # numpy draws: jax.random would compile once per shape.
  x = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(x).astype(dtype)


# ---------------------------------------------------------------- split/merge


# ---------------------------------------------------------------- fuse cases
# Each case: a spec written by hand, and an independent forward pass
# `forward(x, kernel)` plus the adapter's own path `adapter(x, a, b)`, so
# `forward(x, fused) == forward(x, W) + scale * adapter(x, A, B)`.


def _dense_forward(x, w):
  return x @ w


def _conv_forward(x, w):
  return jax.lax.conv_general_dilated(
      x, w, (1,), 'SAME', dimension_numbers=('NWC', 'WIO', 'NWC'),
      precision='highest')


CASES = {
    'dense': dict(
        spec=dict(layer_type='Dense', weight_shape=(6, 5), a_shape=(6, 3),
                  b_shape=(3, 5), delta_str='ir,ro->io',
                  einsum_str='...i,io->...o'),
        x_shape=(4, 6), forward=_dense_forward,
        adapter=lambda x, a, b: (x @ a) @ b),
    'einsum_heads': dict(
        spec=dict(layer_type='Einsum', weight_shape=(2, 6, 3),
                  a_shape=(6, 3), b_shape=(3, 2, 3),
                  delta_str='Dr,rNH->NDH', einsum_str='BTD,NDH->BTNH'),
        x_shape=(2, 4, 6),
        forward=lambda x, w: jnp.einsum('btd,ndh->btnh', x, w),
        adapter=lambda x, a, b: jnp.einsum('btd,dr,rnh->btnh', x, a, b)),
    'einsum_experts': dict(
        spec=dict(layer_type='Einsum', weight_shape=(3, 6, 5),
                  a_shape=(3, 6, 3), b_shape=(3, 5),
                  delta_str='EDr,rF->EDF', einsum_str='ED,EDF->EF'),
        x_shape=(3, 6),
        forward=lambda x, w: jnp.einsum('ed,edf->ef', x, w),
        adapter=lambda x, a, b: jnp.einsum('ed,edr,rf->ef', x, a, b)),
    'conv': dict(
        spec=dict(layer_type='Conv', weight_shape=(3, 6, 5),
                  a_shape=(3, 6, 3), b_shape=(3, 5),
                  delta_str='air,ro->aio'),
        x_shape=(2, 7, 6), forward=_conv_forward,
        adapter=lambda x, a, b: _conv_forward(x, a) @ b),
    'embed': dict(
        spec=dict(layer_type='Embed', weight_shape=(9, 5), a_shape=(9, 3),
                  b_shape=(3, 5), delta_str='vr,rf->vf',
                  weight_name='embedding'),
        x_shape=None, forward=lambda ids, e: jnp.take(e, ids, axis=0),
        adapter=lambda ids, a, b: jnp.take(a, ids, axis=0) @ b),
}


def _case(name, *, dtype=jnp.float32, alpha=6.0, path=('blk', 'layer')):
  case = CASES[name]
  fields = dict(case['spec'])
  weight_name = fields.pop('weight_name', 'kernel')
  spec = _spec.AdapterSpec(path=path, weight_name=weight_name,
                           adapter_name='lora', rank=3, alpha=alpha,
                           **fields)
  module = {weight_name: _rand(0, spec.weight_shape, dtype),
            'bias': _rand(1, spec.weight_shape[-1:], dtype),
            'lora': {'a': _rand(2, spec.a_shape), 'b': _rand(3, spec.b_shape)}}
  params = {'blk': {'layer': module, 'norm': {'scale': jnp.ones(5)}}}
  if case['x_shape'] is None:
    x = jnp.array([[0, 3, 8], [1, 1, 5]])
  else:
    x = _rand(4, case['x_shape'])
  return spec, params, x, case


@pytest.mark.parametrize('name', sorted(CASES))
def test_fuse_matches_an_independent_forward(name):
  spec, params, x, case = _case(name)
  fused = fuse_params(params, [spec])
  assert spec.scale == 2.0
  layer = params['blk']['layer']
  kernel = layer[spec.weight_name]
  expected = case['forward'](x, kernel) + spec.scale * case['adapter'](
      x, layer['lora']['a'], layer['lora']['b'])
  np.testing.assert_allclose(case['forward'](x, fused['blk']['layer'][
      spec.weight_name]), expected, rtol=1e-5, atol=1e-5)
  # Everything but the kernel is untouched, and no adapter is left.
  assert 'lora' not in fused['blk']['layer']
  assert fused['blk']['layer']['bias'] is layer['bias']
  assert fused['blk']['norm']['scale'] is params['blk']['norm']['scale']
  assert 'lora' in params['blk']['layer']  # the input is not mutated


@pytest.mark.parametrize('name', sorted(CASES))
def test_unfuse_inverts_fuse(name):
  spec, params, _, _ = _case(name)
  fused = fuse_params(params, [spec])
  lora = split_params(params).lora
  restored, err = unfuse_params(fused, lora, [spec], return_error=True)
  assert_trees_close(restored, params, atol=1e-5)
  assert restored['blk']['layer']['lora'] is lora['blk']['layer']['lora']
  assert float(err) < 1e-5


def test_fuse_bfloat16_base_is_computed_in_float32():
  spec, params, _, _ = _case('dense', dtype=jnp.bfloat16)
  layer = params['blk']['layer']
  fused, err = fuse_params(params, [spec], return_error=True)
  kernel = fused['blk']['layer']['kernel']
  assert kernel.dtype == jnp.bfloat16
  exact = (np.asarray(layer['kernel'], np.float64) + spec.scale * (
      np.asarray(layer['lora']['a'], np.float64)
      @ np.asarray(layer['lora']['b'], np.float64)))
  expected = exact.astype(np.float32).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(kernel), expected)
  # The reported error is the bfloat16 round-off: non-zero, within 1 ulp.
  actual_err = np.abs(np.asarray(kernel, np.float64) - exact).max()
  np.testing.assert_allclose(float(err), actual_err, rtol=1e-5)
  assert 0 < float(err) <= np.abs(exact).max() * 2.0 ** -8


def test_fuse_float32_error_is_tiny():
  spec, params, _, _ = _case('einsum_heads')
  _, err = fuse_params(params, [spec], return_error=True)
  assert err.dtype == jnp.float32 and 0 <= float(err) < 1e-6


def test_fuse_and_unfuse_under_jit():
  spec, params, _, _ = _case('einsum_experts')
  eager = fuse_params(params, [spec])
  jitted = jax.jit(functools.partial(fuse_params, adapters=(spec,)))(params)
  assert_trees_close(jitted, eager, atol=1e-6)
  static = jax.jit(fuse_params, static_argnames=('adapters',))
  assert_trees_close(static(params, adapters=(spec,)), eager, atol=1e-6)
  lora = split_params(params).lora
  unfuse = jax.jit(functools.partial(unfuse_params, adapters=(spec,)))
  assert_trees_close(unfuse(jitted, lora), params, atol=1e-5)


def test_fuse_two_named_adapters_in_one_scope_and_a_spec_dict():
  w1, w2 = _rand(0, (4, 5)), _rand(1, (5, 4))
  a1, b1, a2, b2 = (_rand(i, s) for i, s in
                    ((2, (4, 2)), (3, (2, 5)), (4, (5, 2)), (5, (2, 4))))
  params = {'mlp': {'w1': w1, 'w2': w2, 'lora_w1': {'a': a1, 'b': b1},
                    'lora_w2': {'a': a2, 'b': b2}}}
  specs = {
      f'mlp/lora_{n}': _spec.AdapterSpec(
          path=('mlp',), layer_type='MyEinsum', weight_name=n,
          adapter_name=f'lora_{n}', weight_shape=s, a_shape=(s[0], 2),
          b_shape=(2, s[1]), delta_str='ir,ro->io', rank=2)
      for n, s in (('w1', (4, 5)), ('w2', (5, 4)))}
  fused = fuse_params(params, specs)
  np.testing.assert_allclose(fused['mlp']['w1'], w1 + a1 @ b1, rtol=1e-6)
  np.testing.assert_allclose(fused['mlp']['w2'], w2 + a2 @ b2, rtol=1e-6)
  assert sorted(fused['mlp']) == ['w1', 'w2']


def test_two_adapters_of_one_kernel_add_up():
  spec, params, _, _ = _case('dense')
  second = _replace(spec, adapter_name='lora_extra', alpha=None)
  a2, b2 = _rand(8, (6, 3)), _rand(9, (3, 5))
  params['blk']['layer']['lora_extra'] = {'a': a2, 'b': b2}
  layer = params['blk']['layer']
  fused = fuse_params(params, [spec, second])
  expected = (np.asarray(layer['kernel'], np.float64)
              + 2.0 * np.asarray(layer['lora']['a'] @ layer['lora']['b'])
              + 1.0 * np.asarray(a2 @ b2))
  np.testing.assert_allclose(fused['blk']['layer']['kernel'], expected,
                             rtol=1e-5, atol=1e-5)
  restored = unfuse_params(fused, split_params(params).lora, [spec, second])
  assert_trees_close(restored, params, atol=1e-5)


def test_fuse_frozen_dict():
  spec, params, _, _ = _case('dense')
  fused = fuse_params(flax_core.freeze(params), [spec])
  assert isinstance(fused, flax_core.FrozenDict)
  assert_trees_close(flax_core.unfreeze(fused), fuse_params(params, [spec]))


def _replace(spec, **kw):
  return _spec.AdapterSpec(**{**spec.__dict__, **kw})


def _drop(params, *keys):
  out = jax.tree.map(lambda x: x, params)
  node = out
  for k in keys[:-1]:
    node = node[k]
  del node[keys[-1]]
  return out


def _fuse_error_cases():
  spec, params, _, _ = _case('dense')
  lora = params['blk']['layer']['lora']
  bad_a = {**params, 'blk': {**params['blk'], 'layer': {
      **params['blk']['layer'], 'lora': {'a': jnp.ones((6, 2)),
                                         'b': lora['b']}}}}
  extra = {**params, 'head': {'kernel': jnp.ones((2, 2)),
                              'lora': {'a': 1, 'b': 2}}}
  no_b = {**params, 'blk': {**params['blk'], 'layer': {
      **params['blk']['layer'], 'lora': {'a': lora['a']}}}}
  int_kernel = {**params, 'blk': {**params['blk'], 'layer': {
      **params['blk']['layer'], 'kernel': jnp.ones((6, 5), jnp.int8)}}}
  return [
      (extra, [spec, _replace(spec, path=('head',), weight_shape=(2, 2),
                              a_shape=(2, 3), b_shape=(3, 2))], ValueError,
       r"'head/lora/a' has shape \(\) but its spec says \(2, 3\)"),
      (params, [spec, _replace(spec, path=('blk', 'nope'))], ValueError,
       r"'blk/nope/lora' expects a module at 'blk/nope', but 'blk/nope' is "
       r'missing from the base params'),
      (_drop(params, 'blk', 'layer', 'kernel'), [spec], ValueError,
       r"adapts 'kernel', which is not in the params at 'blk/layer'"),
      (_drop(params, 'blk', 'layer', 'lora'), [spec], ValueError,
       r"no adapter branch 'blk/layer/lora'"),
      (params, [_replace(spec, weight_shape=(6, 4), b_shape=(3, 4))],
       ValueError, r"kernel 'blk/layer/kernel' has shape \(6, 5\) but "
       r'adapter .* expects \(6, 4\)'),
      (bad_a, [spec], ValueError,
       r"'blk/layer/lora/a' has shape \(6, 2\) but its spec says \(6, 3\)"),
      (extra, [spec], ValueError,
       r"hold adapter 'head/lora' but no AdapterSpec describes it"),
      (params, [spec, spec], ValueError,
       r"two specs for the adapter 'blk/layer/lora'"),
      (params, spec, TypeError, r'adapters must be a sequence of AdapterSpec'),
      ({'params': params}, [spec], ValueError,
       r"adapter 'params/blk/layer/lora' but no AdapterSpec describes it. "
       r"The specs start below 'params': pass variables\['params'\]"),
      (params, [spec.to_json()], TypeError, r'must hold AdapterSpec; got '),
      (params, {'wrong/key': spec}, ValueError,
       r"maps 'wrong/key' to AdapterSpec"),
      (no_b, [spec], ValueError,
       r"'blk/layer/lora' must be a dict with keys a and b"),
      (int_kernel, [spec], TypeError,
       r"'blk/layer/kernel' has dtype int8; only float kernels"),
  ]


@pytest.mark.parametrize('changes, match', [
    (dict(weight_shape=(6, 6)),
     r"give a delta of shape \(6, 5\).*kernel is \(6, 6\)"),
    (dict(rank=2), r'rank axes \[3\].*rank=2'),
    (dict(delta_str='ir,rx->io'), r"ir,rx->io"),
])
def test_inconsistent_specs_cannot_even_be_built(changes, match):
  # These used to reach fuse_params; AdapterSpec now refuses them itself.
  spec, _, _, _ = _case('dense')
  with pytest.raises(ValueError, match=match):
    _replace(spec, **changes)


@pytest.mark.parametrize('params, specs, error, match', _fuse_error_cases())
def test_fuse_errors(params, specs, error, match):
  with pytest.raises(error, match=match):
    fuse_params(params, specs)


def test_unfuse_errors():
  spec, params, _, _ = _case('dense')
  fused = fuse_params(params, [spec])
  lora = split_params(params).lora
  with pytest.raises(ValueError, match=r"fused params hold adapter branches "
                     r"\['blk/layer/lora/a'"):
    unfuse_params(params, lora, [spec])
  with pytest.raises(ValueError, match=r"non-adapter leaf at 'blk/x'"):
    unfuse_params(fused, {'blk': {**lora['blk'], 'x': 1}}, [spec])
  with pytest.raises(ValueError, match=r"no adapter branch 'blk/layer/lora'"):
    unfuse_params(fused, {}, [spec])
  with pytest.raises(TypeError, match=r"lora must be a nested dict"):
    unfuse_params(fused, None, [spec])


# ---------------------------------------------------------------- integration


def test_fused_plain_model_reproduces_the_adapted_model():
  """Dense, DenseGeneral, Einsum, Conv and Embed (+ tied attend)."""
  model, tokens = fixtures.Zoo(), fixtures.tokens()
  targets = [nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed]
  surgery = functools.partial(peft.lora, rank=2, alpha=4.0, targets=targets)
  with surgery() as report:
    params = fixtures.random_params(model.init, jax.random.key(0), tokens)
  assert sorted(s.layer_type for s in report.specs) == [
      'Conv', 'Dense', 'DenseGeneral', 'Einsum', 'Embed']

  @jax.jit
  def run(params, fused):
    with surgery():
      adapted = model.apply({'params': params}, tokens)
    base = model.apply({'params': split_params(params).original}, tokens)
    return adapted, base, model.apply({'params': fused}, tokens)

  fused = jax.jit(functools.partial(fuse_params, adapters=report.specs))(
      params)
  adapted, base, plain = run(params, fused)
  np.testing.assert_allclose(plain, adapted, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(adapted - base)).max() > 0.1  # adapters matter
  restored = jax.jit(functools.partial(unfuse_params, adapters=report.specs))(
      fused, split_params(params).lora)
  assert_trees_close(restored, params, atol=1e-5)
  # A dict spec.key -> spec works too.
  assert_trees_close(fuse_params(params, report.adapters), fused, atol=1e-6)


@pytest.mark.parametrize('model, n_specs', [
    (fixtures.CustomModel(), 3),  # own einsum; two `lora_<w>` in one scope
    (fixtures.CalledTwice(), 1),  # one adapter used by both calls
    (fixtures.Nested(), 3),  # layers built in setup, two levels deep
])
def test_fused_plain_model_reproduces_other_adapted_models(model, n_specs):
  x = fixtures.features()
  with peft.lora(rank=3) as report:
    params = fixtures.random_params(model.init, jax.random.key(0), x)
  assert len(report.specs) == n_specs

  @jax.jit
  def run(params, fused):
    with peft.lora(rank=3):
      adapted = model.apply({'params': params}, x)
    base = model.apply({'params': split_params(params).original}, x)
    return adapted, base, model.apply({'params': fused}, x)

  adapted, base, plain = run(params, fuse_params(params, report.specs))
  np.testing.assert_allclose(plain, adapted, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(adapted - base)).max() > 0.05
