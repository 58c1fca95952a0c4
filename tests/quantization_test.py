"""Tests of array-level quantization (peft/_quantization.py).

Values are checked against independent numpy references (brute-force nearest
level instead of the library's midpoint search), real against simulated
quantization, and the straight-through gradient against the identity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft import _quantization as q
from tests import helpers

M = q.QuantizationMethod
REAL = [m for m in M if m is not M.NONE]
# One weight shape for every method keeps XLA compiles few: axis -1 holds
# 64-blocks (NF4) and 32-blocks (Q4_0), axis -2 two 32-blocks (transpose).
W = np.asarray(jax.random.normal(jax.random.key(0), (64, 128)), np.float32)
# Relative Frobenius error on Gaussian weights, per method (stated bounds).
REL_ERROR_BOUND = {M.INT8: 0.01, M.SFP8: 0.04, M.INT4: 0.13, M.Q4_0: 0.11,
                   M.Q4_0_TRANSPOSE: 0.11, M.NF4: 0.11}
# NormalFloat4 levels as tabulated in QLoRA (Dettmers et al. 2023, App. E).
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367,
             -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _nearest(values, levels):
  """Brute force: the level closest to each value."""
  idx = np.argmin(np.abs(values[..., None] - levels), axis=-1)
  return levels[idx]


def _reference(w: np.ndarray, method, axes=None) -> np.ndarray:
  """Independent numpy quantize-dequantize."""
  w = w.astype(np.float32)
  if axes is None:
    axes = tuple(range(w.ndim - 1))
  if method in (M.INT8, M.INT4):
    qmax = 127 if method is M.INT8 else 7
    scale = np.max(np.abs(w), axis=axes, keepdims=True) / qmax
    return np.clip(np.round(w / scale), -qmax, qmax) * scale
  if method is M.SFP8:
    scale = np.max(np.abs(w), axis=axes, keepdims=True) / np.float32(1.875)
    return np.sign(w) * _nearest(np.abs(w) / scale, q.SFP8_MAGNITUDES) * scale
  if method is M.Q4_0_TRANSPOSE:
    return _reference(w.swapaxes(-1, -2), M.Q4_0).swapaxes(-1, -2)
  size = 32 if method is M.Q4_0 else 64
  blocks = w.reshape(*w.shape[:-1], -1, size)
  if method is M.NF4:
    absmax = np.max(np.abs(blocks), axis=-1, keepdims=True)
    out = _nearest(blocks / absmax, q.NF4_LEVELS) * absmax
  else:  # Q4_0, as llama.cpp: d = peak / -8 kept in float16.
    peak = np.take_along_axis(
        blocks, np.argmax(np.abs(blocks), -1)[..., None], -1)
    d = peak / np.float32(-8.0)
    codes = np.clip(np.floor(blocks * (np.float32(1) / d) + 8.5), 0, 15)
    out = d.astype(np.float16).astype(np.float32) * (codes - 8)
  return out.reshape(w.shape)


@pytest.mark.parametrize('name', ['int8', 'INT8', 'Int8', M.INT8])
def test_method_accepts_enum_and_any_case(name):
  assert q.QuantizationMethod(name) is M.INT8
  assert q.parse_method(name) is M.INT8


@pytest.mark.parametrize('bad', ['int3', 4, None])
def test_unknown_method_lists_the_valid_ones(bad):
  valid = 'NONE, INT4, INT8, Q4_0, Q4_0_TRANSPOSE, SFP8, NF4'
  with pytest.raises(ValueError, match=f"method {bad!r}. Pass one of {valid}"):
    q.QuantizationMethod(bad)
  with pytest.raises(ValueError, match=f"{bad!r} at 'layer/kernel'"):
    q.simulate_quantize(jnp.ones((2, 2)), bad, where='layer/kernel')


def test_nf4_levels_match_the_paper_table():
  np.testing.assert_allclose(q.NF4_LEVELS, NF4_PAPER, atol=2e-7)


def test_sfp8_magnitudes_follow_the_format():
  mags = q.SFP8_MAGNITUDES.astype(np.float64)
  assert len(mags) == 128 and mags[0] == 0.0 and mags[-1] == 1.875
  assert mags[1] == 1.25 * 2.0**-23  # 1.0 * 2**-23 is given up for zero.
  assert np.all(np.diff(mags) > 0)
  # 3 mantissa bits (8 steps per binade) from 2**-7 up, 2 bits below.
  assert np.sum((mags >= 2.0**-7) & (mags < 2.0**-6)) == 8
  assert np.sum((mags >= 2.0**-9) & (mags < 2.0**-8)) == 4


@pytest.mark.parametrize('method', REAL)
def test_simulate_matches_numpy_reference(method):
  got = q.simulate_quantize(jnp.asarray(W), method)
  np.testing.assert_allclose(got, _reference(W, method), rtol=1e-6,
                             atol=1e-7)


@pytest.mark.parametrize('method', REAL)
def test_real_quantization_equals_simulated_and_is_small(method):
  qa = q.quantize_array(jnp.asarray(W), method)
  helpers.assert_trees_close(qa.dequantize(),
                             q.simulate_quantize(jnp.asarray(W), method))
  bits = 8 if method in (M.INT8, M.SFP8) else 4
  assert qa.values.dtype == (jnp.int8 if method is M.INT8 else jnp.uint8)
  assert qa.values.size == W.size * bits // 8  # 4-bit: two codes per byte.
  assert qa.nbytes == qa.values.size + qa.scales.size * qa.scales.itemsize
  rel = np.linalg.norm(qa.dequantize() - W) / np.linalg.norm(W)
  assert rel < REL_ERROR_BOUND[method]


@pytest.mark.parametrize('method', REAL)
def test_gradient_is_straight_through(method):
  w = jnp.asarray(W[:4])  # (4, 128): still whole blocks for every method.
  if method is M.Q4_0_TRANSPOSE:
    w = jnp.asarray(W[:32])
  cotangent = jax.random.normal(jax.random.key(1), w.shape)
  _, vjp = jax.vjp(lambda v: q.simulate_quantize(v, method), w)
  helpers.assert_trees_close(vjp(cotangent)[0], cotangent)
  _, tangent_out = jax.jvp(lambda v: q.simulate_quantize(v, method), (w,),
                           (cotangent,))
  helpers.assert_trees_close(tangent_out, cotangent)
  grad = jax.grad(lambda v: jnp.sum(q.simulate_quantize(v, method)))(w)
  helpers.assert_trees_close(grad, jnp.ones_like(w))


def test_per_channel_axes_are_honoured():
  w = W.reshape(8, 8, 128)
  for axes in ((0, 1), 1, (-1,)):
    got = q.simulate_quantize(jnp.asarray(w), 'int8', axis_to_reduce=axes)
    np.testing.assert_allclose(got, _reference(w, M.INT8, axes), rtol=1e-6)
  # None: every axis but the last, one scale per output channel.
  helpers.assert_trees_close(
      q.simulate_quantize(jnp.asarray(w), 'int8'),
      q.simulate_quantize(jnp.asarray(w), 'int8', axis_to_reduce=(0, 1)))
  assert q.quantize_array(jnp.asarray(w), 'sfp8', 1).scales.shape == (8, 1,
                                                                        128)


def test_q4_0_transpose_blocks_the_second_to_last_axis():
  helpers.assert_trees_close(
      q.simulate_quantize(jnp.asarray(W), 'q4_0_transpose'),
      q.simulate_quantize(jnp.asarray(W.T), 'q4_0').T)


def test_odd_last_axis_packs_with_padding():
  w = jnp.asarray(W[:3, :5])
  qa = q.quantize_array(w, 'int4', axis_to_reduce=0)
  assert qa.values.shape == (3, 3)
  helpers.assert_trees_close(qa.dequantize(),
                             q.simulate_quantize(w, 'int4', 0))
  np.testing.assert_allclose(qa.dequantize(), _reference(np.asarray(w),
                                                         M.INT4, (0,)),
                             rtol=1e-6)


@pytest.mark.parametrize('method', REAL)
def test_zero_channels_and_blocks_stay_zero(method):
  w = W.copy()
  w[:, :64] = 0.0  # Zero columns and zero blocks for every method.
  out = np.asarray(q.quantize_array(jnp.asarray(w), method).dequantize())
  assert np.all(np.isfinite(out))
  assert np.all(out[:, :64] == 0.0)


def test_bfloat16_keeps_its_dtype():
  w = jnp.asarray(W, jnp.bfloat16)
  sim = q.simulate_quantize(w, 'int8')
  qa = q.quantize_array(w, 'int8')
  assert sim.dtype == jnp.bfloat16 and qa.dequantize().dtype == jnp.bfloat16
  helpers.assert_trees_close(qa.dequantize(), sim)
  assert qa.dequantize(jnp.float32).dtype == jnp.float32


def test_quantized_array_is_a_pytree_that_crosses_jit():
  qa = q.quantize_array(jnp.asarray(W), 'nf4')
  leaves, treedef = jax.tree.flatten(qa)
  assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.float32]
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert (rebuilt.method, rebuilt.shape) == (M.NF4, (64, 128))
  jitted = jax.jit(lambda t: q.dequantize(t))({'k': qa, 'b': jnp.ones(2)})
  helpers.assert_trees_close(jitted, {'k': qa.dequantize(), 'b': jnp.ones(2)})
  assert repr(qa) == ('QuantizedArray(method=NF4, shape=(64, 128), '
                      'dtype=float32, values=uint8[64, 64], '
                      'scales=float32[64, 2])')


def test_none_is_the_identity():
  w = jnp.asarray(W)
  assert q.simulate_quantize(w, 'none') is w
  with pytest.raises(ValueError, match='quantize_array needs a real method; '
                     "got NONE at 'k'"):
    q.quantize_array(w, 'none', where='k')


@pytest.mark.parametrize('method,shape,match', [
    ('q4_0', (4, 48), r'Q4_0 quantizes blocks of 32 along axis -1, but that '
     r"axis of shape \(4, 48\) at 'k' has size 48"),
    ('nf4', (2, 32), r'NF4 quantizes blocks of 64 along axis -1.*\(2, 32\)'),
    ('q4_0_transpose', (40, 64), r'Q4_0_TRANSPOSE quantizes blocks of 32 '
     r'along axis -2.*\(40, 64\).*has size 40'),
    ('q4_0_transpose', (64,), r'Q4_0_TRANSPOSE blocks axis -2, but the '
     r'array of shape \(64,\) at .k. has only 1 axes'),
])
def test_block_methods_need_whole_blocks(method, shape, match):
  with pytest.raises(ValueError, match=match):
    q.quantize_array(jnp.ones(shape), method, where='k')
  with pytest.raises(ValueError, match=match):
    q.simulate_quantize(jnp.ones(shape), method, where='k')


@pytest.mark.parametrize('axes', [2, (0, -2), ('a',)])
def test_bad_axes_are_named(axes):
  with pytest.raises(ValueError, match=rf'axis_to_reduce {re_escape(axes)} '
                     r'does not name distinct axes of an array of shape '
                     r"\(2, 3\) at 'k'"):
    q.simulate_quantize(jnp.ones((2, 3)), 'int8', axes, where='k')


def re_escape(value) -> str:
  import re
  return re.escape(repr(value))


def test_non_float_input_is_rejected():
  with pytest.raises(TypeError, match="floating-point array; got int32 at "
                     "'k'"):
    q.quantize_array(jnp.ones((2, 2), jnp.int32), 'int8', where='k')


@pytest.mark.parametrize('einsum_str,axes', [
    # gemma.peft's table, now derived from the equation.
    ('BTD,NDH->BTNH', (1,)), ('BSD,CKDH->CBSKH', (2,)),
    ('BTNH,NHD->BTD', (0, 1)), ('...F,NHF->...NH', (2,)),
    ('...H,HF->...F', (0,)),
    # Any other valid equation.
    ('bi,ji->bj', (1,)), ('btd, dnh -> btnh', (0,)),
    ('bnd,nd->bn', (1,)),  # n is a batch axis, not reduced.
    ('b,d->bd', None),  # Outer product: nothing contracted.
])
def test_axis_to_reduce_from_any_equation(einsum_str, axes):
  assert q.get_axis_to_reduce_from_einsum_str(einsum_str) == axes


def test_axis_to_reduce_rejects_non_equations():
  with pytest.raises(ValueError, match="exactly two operands.*'q_einsum'"):
    q.get_axis_to_reduce_from_einsum_str('q_einsum')


def test_dequantize_leaves_float_leaves_alone():
  tree = {'a': q.quantize_array(jnp.asarray(W), 'int8'), 'b': jnp.ones(3)}
  out = q.dequantize(tree)
  helpers.assert_trees_close(out['b'], jnp.ones(3))
  np.testing.assert_allclose(out['a'], _reference(W, M.INT8), rtol=1e-6)
