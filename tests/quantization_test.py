"""Tests of array-level quantization (peft/_quant/numerics.py).

Values are checked against independent numpy references (brute-force nearest
level instead of the library's midpoint search), real against simulated
quantization, and the straight-through gradient against the identity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft._quant import numerics as q
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
    axes = tuple(range(w.ndim - 1)) if w.ndim > 1 else (0,)
  axes = tuple(sorted(a % w.ndim for a in np.atleast_1d(axes)))
  if method in (M.INT8, M.INT4):
    qmax = 127 if method is M.INT8 else 7
    scale = np.max(np.abs(w), axis=axes, keepdims=True) / qmax
    return np.clip(np.round(w / scale), -qmax, qmax) * scale
  if method is M.SFP8:
    scale = np.max(np.abs(w), axis=axes, keepdims=True) / np.float32(1.875)
    return np.sign(w) * _nearest(np.abs(w) / scale, q.SFP8_MAGNITUDES) * scale
  if method is M.Q4_0_TRANSPOSE:
    return _reference(w.swapaxes(-1, -2), M.Q4_0).swapaxes(-1, -2)
  # Q4_0 blocks the last axis; NF4 the reduced axes, flattened. Both pad a
  # short last block with zeros (dropped again below).
  size, axes = (32, (w.ndim - 1,)) if method is M.Q4_0 else (64, axes)
  kept = [a for a in range(w.ndim) if a not in axes]
  moved = w.transpose(kept + list(axes))
  flat = moved.reshape(*moved.shape[:len(kept)], -1)
  n = flat.shape[-1]
  padded = np.pad(flat, [(0, 0)] * len(kept) + [(0, -n % size)])
  blocks = padded.reshape(*padded.shape[:-1], -1, size)
  if method is M.NF4:
    absmax = np.max(np.abs(blocks), axis=-1, keepdims=True)
    out = _nearest(blocks / absmax, q.NF4_LEVELS) * absmax
  else:  # Q4_0, as llama.cpp: d = peak / -8 kept in float16.
    peak = np.take_along_axis(
        blocks, np.argmax(np.abs(blocks), -1)[..., None], -1)
    d = peak / np.float32(-8.0)
    codes = np.clip(np.floor(blocks * (np.float32(1) / d) + 8.5), 0, 15)
    out = d.astype(np.float16).astype(np.float32) * (codes - 8)
  out = out.reshape(padded.shape)[..., :n].reshape(moved.shape)
  return out.transpose(np.argsort(kept + list(axes)))


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
  # NF4 blocks the contracted axis 0 (`in`): one block per output column.
  assert repr(qa) == ('QuantizedArray(method=NF4, shape=(64, 128), '
                      'dtype=float32, values=uint8[64, 64], '
                      'scales=float32[128, 1])')


def test_none_is_the_identity():
  w = jnp.asarray(W)
  assert q.simulate_quantize(w, 'none') is w
  with pytest.raises(ValueError, match='quantize_array needs a real method; '
                     "got NONE at 'k'"):
    q.quantize_array(w, 'none', where='k')


def test_q4_0_transpose_needs_two_axes():
  match = (r'Q4_0_TRANSPOSE blocks axis -2, but the array of shape \(64,\) '
           r"at .k. has only 1 axes. Use a per-channel method")
  with pytest.raises(ValueError, match=match):
    q.quantize_array(jnp.ones(64), 'q4_0_transpose', where='k')
  with pytest.raises(ValueError, match=match):
    q.simulate_quantize(jnp.ones(64), 'q4_0_transpose', where='k')


# Shapes whose blocked runs end in a short block for every block method
# (NF4 along the flattened leading axes, Q4_0 axis -1, transpose axis -2).
PADDED = [(40, 24), (2, 5, 7)]


@pytest.mark.parametrize('shape', PADDED, ids=str)
@pytest.mark.parametrize('method', REAL)
def test_any_shape_round_trips_within_bound(method, shape):
  rng = np.random.default_rng(4)
  w = rng.normal(size=shape).astype(np.float32)
  qa = q.quantize_array(jnp.asarray(w), method)
  out = np.asarray(qa.dequantize())
  assert out.shape == w.shape and out.dtype == np.float32
  helpers.assert_trees_close(jnp.asarray(out),
                             q.simulate_quantize(jnp.asarray(w), method))
  # The numpy reference pads with explicit zeros and drops them: equal
  # values mean the padding changes no scale and no value leaks out.
  np.testing.assert_allclose(out, _reference(w, method), rtol=1e-6,
                             atol=1e-7)
  assert np.linalg.norm(out - w) / np.linalg.norm(w) < REL_ERROR_BOUND[
      method]
  # Honest bytes: one code per element (4-bit ones two per byte along the
  # last axis), one scale per channel or per block, short ones included.
  bits = 8 if method in (M.INT8, M.SFP8) else 4
  last = shape[-1] if bits == 8 else -(-shape[-1] // 2)
  assert qa.values.size == np.prod(shape[:-1]) * last
  axes = {M.Q4_0: (len(shape) - 1,), M.Q4_0_TRANSPOSE: (len(shape) - 2,)
          }.get(method, tuple(range(len(shape) - 1)))
  kept = np.prod([d for i, d in enumerate(shape) if i not in axes])
  run = np.prod([shape[i] for i in axes])
  size = {M.NF4: 64, M.Q4_0: 32, M.Q4_0_TRANSPOSE: 32}.get(method)
  assert qa.scales.size == kept * (1 if size is None else -(-run // size))
  assert qa.nbytes == qa.values.size * qa.values.itemsize + (
      qa.scales.size * qa.scales.itemsize)


@pytest.mark.parametrize('method', [M.NF4, M.Q4_0])
def test_a_short_block_is_the_zero_padded_block(method):
  w = W[:3, :40]  # Blocked along axis 1: one short block of 40 per row.
  padded = np.pad(w, [(0, 0), (0, 24)])  # Whole blocks for both methods.
  short = q.quantize_array(jnp.asarray(w), method, 1).dequantize()
  whole = np.asarray(q.quantize_array(jnp.asarray(padded), method,
                                      1).dequantize())
  # The zeros quantize to exactly 0 (NF4 has the level 0, Q4_0's code 8 is
  # 0 * d), so padding changes nothing the short block keeps.
  assert np.all(whole[:, 40:] == 0.0)
  helpers.assert_trees_close(short, jnp.asarray(whole[:, :40]))


def test_nf4_blocks_along_the_contracted_axes():
  w = np.random.default_rng(5).normal(size=(4, 16, 8)).astype(np.float32)
  # Contracting (0, 1), as in 'bnh,nhd->bd': blocks of 64 over n*h.
  qa = q.quantize_array(jnp.asarray(w), 'nf4', axis_to_reduce=(0, 1))
  assert qa.axes == (0, 1) and qa.scales.shape == (8, 1)
  np.testing.assert_allclose(qa.dequantize(), _reference(w, M.NF4, (0, 1)),
                             rtol=1e-6)
  # One axis: the same blocks as the transposed array blocked along its
  # last axis.
  v = w.reshape(64, 8)
  helpers.assert_trees_close(
      q.simulate_quantize(jnp.asarray(v), 'nf4', axis_to_reduce=0),
      q.simulate_quantize(jnp.asarray(v.T), 'nf4', axis_to_reduce=1).T)
  # Q4_0's name fixes its axis (llama.cpp's layout), whatever is reduced.
  for method in ('q4_0', 'q4_0_transpose'):
    helpers.assert_trees_close(
        q.simulate_quantize(jnp.asarray(v), method, axis_to_reduce=1),
        q.simulate_quantize(jnp.asarray(v), method))


def _with(value, at=(3, 5), shape=(64, 64)):
  w = np.asarray(W[:shape[0], :shape[1]]).copy()
  w[at] = value
  return w


@pytest.mark.parametrize('value,counts', [(np.nan, '1 NaN and 0 Inf'),
                                          (-np.inf, '0 NaN and 1 Inf')])
@pytest.mark.parametrize('method', REAL)
def test_non_finite_weights_are_rejected(method, value, counts):
  match = (rf"{method.name} cannot quantize the array of shape \(64, 64\) "
           rf"at 'dec/q/kernel': it holds {counts} \(the first at index "
           r'\(3, 5\)\)\. Quantization needs finite weights.*nan_to_num')
  w = jnp.asarray(_with(value))
  with pytest.raises(ValueError, match=match):
    q.quantize_array(w, method, where='dec/q/kernel')
  with pytest.raises(ValueError, match=match):
    q.simulate_quantize(w, method, where='dec/q/kernel')


@pytest.mark.parametrize('method', [M.Q4_0, M.Q4_0_TRANSPOSE])
def test_q4_0_rejects_weights_its_float16_scale_cannot_hold(method):
  match = (rf'{method.name} keeps each block scale \(largest \|x\| / 8\) in '
           r'float16, so \|x\| must be at most 524032; the array of shape '
           r"\(64, 64\) at 'k' has \|x\| = 4e\+06 at index \(3, 5\)\. "
           r'Scale the weights down, or use NF4')
  with pytest.raises(ValueError, match=match):
    q.quantize_array(jnp.asarray(_with(4e6)), method, where='k')
  with pytest.raises(ValueError, match=match):
    q.simulate_quantize(jnp.asarray(_with(-4e6)), method, where='k')
  # Up to the limit the scale is finite and the peak round-trips.
  out = q.quantize_array(jnp.asarray(_with(524032.0)), method).dequantize()
  assert np.all(np.isfinite(out)) and float(out[3, 5]) == 524032.0


# Faults in a (64, 64) kernel, each in its own channel and block, and the
# slices they hit: NaN at (3, 5), Inf at (40, 50), and 1e6 at (10, 20),
# which overflows only Q4_0's float16 scales.
_FAULTS = {(3, 5): np.nan, (40, 50): np.inf, (10, 20): 1e6}
_HIT = {M.Q4_0: [np.s_[3, :32], np.s_[40, 32:], np.s_[10, :32]],
        M.Q4_0_TRANSPOSE: [np.s_[:32, 5], np.s_[32:, 50], np.s_[:32, 20]]}


@pytest.mark.parametrize('method', REAL)
def test_traced_bad_weights_turn_their_channel_or_block_nan(method):
  w = W[:64, :64].copy()
  for at, value in _FAULTS.items():
    w[at] = value
  hit = np.zeros(w.shape, bool)
  for where in _HIT.get(method, [np.s_[:, 5], np.s_[:, 50]]):
    hit[where] = True
  # Under jit there is no value to check: no error, no host sync; the
  # fault shows as NaN, confined to its channel or block.
  clean = np.asarray(q.simulate_quantize(jnp.asarray(np.where(hit, 0, w)),
                                         method))

  @jax.jit
  def outputs(w):
    return (q.simulate_quantize(w, method),
            q.quantize_array(w, method).dequantize())

  for out in outputs(jnp.asarray(w)):
    out = np.asarray(out)
    np.testing.assert_array_equal(np.isnan(out), hit)
    np.testing.assert_array_equal(out[~hit], clean[~hit])


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


def test_a_tree_mapped_quantized_array_still_prints():
  # `jax.tree.map(jnp.shape, params)` on quantized params is a common
  # first look; its QuantizedArray then holds tuples, not arrays.
  w = q.quantize_array(jnp.ones((8, 4)), 'int8')
  shapes = jax.tree.map(jnp.shape, w)
  assert 'values=(8, 4)' in repr(shapes)
