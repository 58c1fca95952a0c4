"""fuse/unfuse refuse what would silently give wrong kernels: a quantized
base, a delta that overflows, a second fuse of the same adapter, an unfuse
of a kernel that was never fused."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft._core import spec as _spec
import peft.nnx as pnnx

SPEC = _spec.AdapterSpec(
    path=('d',), layer_type='Dense', weight_name='kernel',
    adapter_name='lora', weight_shape=(4, 3), a_shape=(4, 2),
    b_shape=(2, 3), delta_str='ir,ro->io', einsum_str='...i,io->...o',
    rank=2)


def _params(kernel_dtype=jnp.float32, b_value=0.5):
  rng = np.random.default_rng(0)
  return {'d': {
      'kernel': jnp.asarray(rng.standard_normal((4, 3)), kernel_dtype),
      'lora': {'a': jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
               'b': jnp.full((2, 3), b_value, jnp.float32)}}}


def test_fuse_on_a_quantized_base_points_to_fuse_into_quantized():
  params = _params()
  base, lora = peft.split_params(params)
  quantized = peft.merge_params(peft.quantize(base, method='int8'), lora)
  with pytest.raises(TypeError, match=r"fuse_params: kernel 'd/kernel' is a "
                     r'INT8 QuantizedArray.*peft\.fuse_into_quantized'):
    peft.fuse_params(quantized, [SPEC])
  fused, errors = peft.fuse_into_quantized(quantized, [SPEC])  # the fix
  assert isinstance(fused['d']['kernel'], peft.QuantizedArray)
  assert errors['d/lora'] < 0.05


def test_a_delta_that_overflows_float16_is_an_error_naming_the_kernel():
  params = _params(jnp.float16, b_value=3e4)
  with pytest.raises(ValueError, match=(
      r"fuse_params: kernel 'd/kernel' \(float16 \(4, 3\)\) has \d+ "
      r"non-finite values after adding adapter 'd/lora'.*float32")):
    peft.fuse_params(params, [SPEC])
  # In float32 the same fuse is fine.
  as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  assert np.isfinite(peft.fuse_params(as_f32, [SPEC])['d']['kernel']).all()


def test_a_nan_adapter_is_an_error_on_fuse_and_unfuse():
  params = _params()
  params['d']['lora']['a'] = params['d']['lora']['a'].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r'has 3 non-finite values'):
    peft.fuse_params(params, [SPEC])
  base, lora = peft.split_params(jax.tree.map(jnp.array, params))
  with pytest.raises(ValueError, match=r'unfuse_params: .*non-finite'):
    peft.unfuse_params(base, lora, [SPEC])


def test_fusing_the_same_adapter_twice_is_refused():
  params = _params()
  fused = peft.fuse_params(params, [SPEC])
  assert peft.fuse_state(fused['d']['kernel']) == 'fused'
  assert peft.fuse_state(params['d']['kernel']) == 'base'
  again = peft.merge_params(fused, peft.split_params(params).lora)
  with pytest.raises(ValueError, match=(
      r"kernel 'd/kernel' already has adapter 'd/lora' fused.*delta twice")):
    peft.fuse_params(again, [SPEC])


def test_unfusing_a_base_kernel_is_refused():
  params = _params()
  base, lora = peft.split_params(params)
  peft.fuse_params(params, [SPEC])  # marks `base`'s kernel as a base
  with pytest.raises(ValueError, match=(
      r"unfuse_params: kernel 'd/kernel' is a base kernel.*never added")):
    peft.unfuse_params(base, lora, [SPEC])


def test_legitimate_sequences_still_work_with_values():
  params = _params()
  base, lora = peft.split_params(params)
  fused = peft.fuse_params(params, [SPEC])
  expected = base['d']['kernel'] + lora['d']['lora']['a'] @ (
      lora['d']['lora']['b'])
  np.testing.assert_allclose(fused['d']['kernel'], expected, rtol=1e-6)
  # fuse -> unfuse -> fuse again is a round trip, not a double fuse.
  restored = peft.unfuse_params(fused, lora, [SPEC])
  assert peft.fuse_state(restored['d']['kernel']) == 'base'
  refused = peft.fuse_params(restored, [SPEC])
  np.testing.assert_allclose(refused['d']['kernel'], expected, rtol=1e-6)
  # A second, different adapter fused on top is allowed, and the first
  # fused kernel can still be unfused.
  other = {'d': {'lora': {'a': lora['d']['lora']['a'] * 2,
                          'b': lora['d']['lora']['b']}}}
  twice = peft.fuse_params(peft.merge_params(fused, other), [SPEC])
  np.testing.assert_allclose(twice['d']['kernel'], expected + 2 * (
      expected - base['d']['kernel']), rtol=1e-5)
  np.testing.assert_allclose(
      peft.unfuse_params(fused, lora, [SPEC])['d']['kernel'],
      base['d']['kernel'], rtol=1e-6, atol=1e-6)
  # A copy is unknown, so a deliberate second add goes through.
  copied = jax.tree.map(jnp.array, fused)
  assert peft.fuse_state(copied['d']['kernel']) is None
  peft.fuse_params(peft.merge_params(copied, lora), [SPEC])


def test_under_jit_fuse_works_and_values_are_unchecked():
  params = _params()
  fuse = jax.jit(functools.partial(peft.fuse_params, adapters=(SPEC,)))
  np.testing.assert_allclose(fuse(params)['d']['kernel'],
                             peft.fuse_params(params, [SPEC])['d']['kernel'],
                             rtol=1e-6)
  overflow = _params(jnp.float16, b_value=3e4)
  assert not np.isfinite(fuse(overflow)['d']['kernel']).all()


def test_nnx_fuse_refuses_an_overflowing_delta():
  model = nnx.Sequential(nnx.Linear(4, 3, param_dtype=jnp.float16,
                                    rngs=nnx.Rngs(0)))
  pnnx.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
  layer = model.layers[0]
  layer.lora.a[...] = jnp.ones(layer.lora.a[...].shape)
  layer.lora.b[...] = jnp.full(layer.lora.b[...].shape, 6e4)  # 2 * 6e4: inf
  kernel = layer.kernel[...]
  with pytest.raises(ValueError, match=r"kernel 'layers/0/kernel' .* has "
                     r'\d+ non-finite values'):
    pnnx.fuse(model)
  # Nothing changed: the model is still adapted, its kernel untouched.
  assert pnnx.is_lora_layer(model.layers[0])
  np.testing.assert_array_equal(model.layers[0].kernel[...], kernel)


def test_nnx_unfuse_of_a_model_that_was_never_fused_is_refused():
  model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  base_model = nnx.clone(model)  # the plain model, kept aside
  pnnx.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
  model.layers[0].lora.b[...] = jnp.ones(model.layers[0].lora.b[...].shape)
  taken = pnnx.fuse(model)
  assert peft.fuse_state(model.layers[0].kernel[...]) == 'fused'
  # The kept-aside base holds the kernel fuse read: not fused.
  with pytest.raises(ValueError, match=r"unfuse: kernel 'layers/0/kernel' "
                     'is a base kernel'):
    pnnx.unfuse(base_model, *taken)
  pnnx.unfuse(model, *taken)  # the fused one round-trips
  np.testing.assert_allclose(model.layers[0].kernel[...],
                             base_model.layers[0].kernel[...], atol=1e-6)
