"""PiSSA and OLoRA (`peft.init_from_kernels`), checked against numpy's own
SVD and QR of each kernel, on every layer kind, linen and nnx."""

import functools
import pathlib

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft._core import kernel_init
import peft.nnx as pnnx

RANK, ALPHA = 2, 4.0  # scale 2, so a forgotten scale shows


class Layers(nn.Module):
  """One layer of each kind; every output is returned."""

  @nn.compact
  def __call__(self, x, ids, img):
    dense = nn.Dense(6, name='dense')(x)
    general = nn.DenseGeneral((2, 3), axis=-1, name='general')(x)
    batched = nn.DenseGeneral(4, axis=-1, batch_dims=(0,), name='batched')(
        x[None].repeat(3, axis=0))
    einsum = nn.Einsum((5, 2, 3), 'btd,dnh->btnh', name='einsum')(
        x[:, None, :])
    embed = nn.Embed(7, 4, name='embed')(ids)
    conv = nn.Conv(4, (3, 3), name='conv')(img)
    return dense, general, batched, einsum, embed, conv


X = jax.random.normal(jax.random.key(0), (2, 5))
IDS = jnp.array([1, 6, 3])
IMG = jax.random.normal(jax.random.key(1), (1, 6, 6, 2))
SURGERY = peft.lora(rank=RANK, alpha=ALPHA,
                    targets=('dense', 'general', 'batched', 'einsum', 'embed',
                             'conv'))


@functools.lru_cache(maxsize=None)
def _setup():
  with SURGERY as report:
    params = Layers().init(jax.random.key(2), X, IDS, IMG)['params']
  return params, report.specs


def _apply(params):
  with SURGERY:
    return Layers().apply({'params': params}, X, IDS, IMG)


# Layer -> the kernel as the matrix its delta implies, (batch, rows, cols).
MATRICES = {
    'dense': lambda w: w[None],
    'general': lambda w: w.reshape(1, 5, 6),
    # Its B is shared by the batch axis, so A's rows are (batch, in).
    'batched': lambda w: w.reshape(1, 15, 4),
    'einsum': lambda w: w.reshape(1, 5, 6),
    'embed': lambda w: w[None],
    'conv': lambda w: w.reshape(1, 18, 4),
}


def _best_rank_r(m):
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  return (u[..., :RANK] * s[..., None, :RANK]) @ vt[..., :RANK, :]


def _olora_part(m):
  q, r = np.linalg.qr(np.swapaxes(m, -1, -2))
  return np.swapaxes(q[..., :RANK] @ r[..., :RANK, :], -1, -2)


def _delta_matrix(params, spec, layer):
  lora = params[layer]['lora']
  delta = jnp.einsum(spec.delta_str, lora['a'], lora['b']) * spec.scale
  return MATRICES[layer](np.asarray(delta, np.float64))


@pytest.mark.parametrize('method, expected', [('pissa', _best_rank_r),
                                              ('olora', _olora_part)])
def test_each_kind_factors_as_numpy_does_and_the_output_is_unchanged(
    method, expected):
  params, specs = _setup()
  new = peft.init_from_kernels(params, specs, method=method)
  for spec in specs:
    layer = spec.path[0]
    w = MATRICES[layer](np.asarray(params[layer][spec.weight_name],
                                   np.float64))
    np.testing.assert_allclose(_delta_matrix(new, spec, layer), expected(w),
                               atol=2e-5, err_msg=layer)
    residual = MATRICES[layer](np.asarray(new[layer][spec.weight_name]))
    np.testing.assert_allclose(residual, w - expected(w), atol=2e-5,
                               err_msg=layer)
    if method == 'olora':  # B's rows are orthonormal
      b = np.asarray(new[layer]['lora']['b']).reshape(RANK, -1)
      np.testing.assert_allclose(b @ b.T, np.eye(RANK), atol=1e-5)
  for got, want in zip(_apply(new), _apply(params)):
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_an_axis_in_both_a_and_b_factors_per_batch_element():
  # A hand-written spec may share a kernel axis between A and B (one
  # adapter per head): each head's matrix is factored alone.
  spec = peft.AdapterSpec(
      path=('d',), layer_type='Einsum', weight_name='kernel',
      adapter_name='lora', weight_shape=(3, 5, 4), a_shape=(3, 5, 2),
      b_shape=(3, 2, 4), delta_str='nir,nro->nio', rank=2)
  w = jax.random.normal(jax.random.key(4), (3, 5, 4))
  a, b = kernel_init.kernel_factors(w, spec, method="pissa")
  np.testing.assert_allclose(jnp.einsum('nir,nro->nio', a, b),
                             _best_rank_r(np.asarray(w, np.float64)),
                             atol=2e-5)


def test_under_jit_it_equals_the_eager_result():
  params, specs = _setup()
  jitted = jax.jit(peft.init_from_kernels,
                   static_argnames=('adapters', 'method'))
  eager = peft.init_from_kernels(params, specs)
  for got, want in zip(jax.tree.leaves(jitted(params, adapters=specs)),
                       jax.tree.leaves(eager)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def _trained(params, seed=3):
  """PiSSA params with the adapters moved, as training would."""
  base, lora = peft.split_params(params)
  leaves, treedef = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  moved = [x + 0.1 * jax.random.normal(k, x.shape)
           for k, x in zip(keys, leaves)]
  return peft.merge_params(base, jax.tree.unflatten(treedef, moved))


@pytest.mark.parametrize('method', ['pissa', 'olora'])
def test_trained_adapters_convert_exactly_to_the_original_base(
    method, tmp_path: pathlib.Path):
  params, specs = _setup()
  pissa = peft.init_from_kernels(params, specs, method=method)
  trained = _trained(pissa)
  lora, new_specs = peft.adapters_for_original_base(
      peft.split_params(trained).lora, peft.split_params(pissa).lora, specs)
  assert [s.rank for s in new_specs] == [2 * RANK] * len(specs)
  assert [s.scale for s in new_specs] == [s.scale for s in specs]
  # Saved and loaded, they serve the pretrained params exactly as the
  # trained residual model does.
  path = tmp_path / 'pissa.safetensors'
  peft.save_adapters(path, lora, new_specs)
  loaded = peft.load_adapters(path)
  original = peft.split_params(params).original
  served = peft.fuse_params(peft.merge_params(original, loaded.lora),
                            loaded.specs)
  want = peft.fuse_params(trained, specs)
  for got, expect in zip(jax.tree.leaves(served), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expect, atol=2e-5)


def test_nnx_matches_linen_on_the_same_kernel():
  linear = nnx.Linear(5, 6, rngs=nnx.Rngs(0))
  model = nnx.Sequential(linear)
  pnnx.apply_lora(model, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
  w = np.asarray(linear.kernel[...], np.float64)
  x = jnp.ones((3, 5))
  before = model(x)
  pnnx.init_from_kernels(model)
  layer = model.layers[0]
  delta = ALPHA / RANK * np.asarray(layer.lora.a[...] @ layer.lora.b[...])
  np.testing.assert_allclose(delta, _best_rank_r(w[None])[0], atol=2e-5)
  np.testing.assert_allclose(layer.kernel[...], w - delta, atol=2e-5)
  np.testing.assert_allclose(model(x), before, atol=2e-5)


def test_nnx_stacked_layers_factor_layer_by_layer():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(4, 4, rngs=nnx.Rngs(key))

  class Stack(nnx.Module):

    def __init__(self):
      self.layers = make(jax.random.split(jax.random.key(0), 3))

  model = Stack()
  pnnx.apply_lora(model, rank=RANK, rngs=nnx.Rngs(1))
  w = np.asarray(model.layers.kernel[...], np.float64)
  pnnx.init_from_kernels(model)
  lora = model.layers.lora
  delta = np.asarray(jnp.einsum('lir,lro->lio', lora.a[...], lora.b[...]))
  np.testing.assert_allclose(delta, _best_rank_r(w), atol=2e-5)


def test_an_unknown_method_is_an_error():
  params, specs = _setup()
  with pytest.raises(ValueError, match=r"init_from_kernels: method must be "
                     r"one of \['pissa', 'olora'\]; got 'svd'.*method='pissa'"):
    peft.init_from_kernels(params, specs, method='svd')  # pyrefly: ignore
  model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'found no LoRA layer.*apply_lora'):
    pnnx.init_from_kernels(model)


def test_a_rank_larger_than_the_kernel_allows_is_an_error():
  with peft.lora(rank=3) as report:
    params = nn.Dense(2).init(jax.random.key(0), X)['params']
  with pytest.raises(ValueError, match=r"adapter 'lora' \(kernel \(5, 2\), "
                     r"delta 'ir,ro->io'\) has rank 3, but its kernel is a 5x2 "
                     r'matrix.*at most rank 2\. Use a smaller rank'):
    peft.init_from_kernels(params, report.specs)


def test_a_quantized_kernel_is_an_error_naming_the_float_route():
  params, specs = _setup()
  base, lora = peft.split_params(params)
  quantized = peft.merge_params(peft.quantize(base, method='int8'), lora)
  with pytest.raises(TypeError, match=r"kernel '.*' is quantized; pissa "
                     r'replaces.*peft\.quantize'):
    peft.init_from_kernels(quantized, specs)


@pytest.mark.parametrize('method, expected', [('pissa', _best_rank_r),
                                              ('olora', _olora_part)])
def test_the_functional_form_factors_a_2d_weight(method, expected):
  w = jax.random.normal(jax.random.key(5), (6, 4))
  adapter, residual = peft.principal_lora_adapter(w, RANK, ALPHA,
                                                  method=method)
  np.testing.assert_allclose(
      peft.lora_delta(adapter, ALPHA),
      expected(np.asarray(w, np.float64)[None])[0], atol=2e-5)
  np.testing.assert_allclose(peft.merge_lora_weight(residual, adapter, ALPHA),
                             w, atol=2e-5)


def test_the_functional_form_refuses_a_rank_too_large():
  with pytest.raises(ValueError, match=r'principal_lora_adapter: the adapter '
                     r'has rank 5, but its kernel is a 6x4 matrix'):
    peft.principal_lora_adapter(jnp.ones((6, 4)), 5)
  with pytest.raises(ValueError, match=r"method must be one of"):
    peft.principal_lora_adapter(jnp.ones((6, 4)), 2, method='qr')


def test_qlora_on_a_quantized_residual_follows_the_float_route():
  # QPiSSA: factor the float kernels, then quantize the residual base; the
  # adapters (float) carry the principal part exactly.
  params, specs = _setup()
  pissa = peft.init_from_kernels(params, specs)
  residual, lora = peft.split_params(pissa)
  # The einsum-like kernels; Embed and Conv have no quantized layer.
  qresidual = peft.quantize(
      residual, method='int8',
      targets='(dense|general|batched|einsum)/kernel')
  with peft.quantized('int8'), SURGERY:
    got = Layers().apply({'params': peft.merge_params(qresidual, lora)}, X,
                         IDS, IMG)
  dequantized = jax.tree.map(
      lambda q: q.dequantize() if hasattr(q, 'dequantize') else q, qresidual,
      is_leaf=lambda q: hasattr(q, 'dequantize'))
  want = _apply(peft.merge_params(dequantized, lora))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4)
