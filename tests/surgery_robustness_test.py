"""Surgery on models written the way third-party code is written.

`__getattr__`, properties, `setup` blocks, a second method, flax's `nn.jit`
(with its own trace cache), `nn.remat`, `nn.scan` and `nn.vmap` over layers,
and a user's `jax.jit` around `apply`: a surgery takes effect whatever was
traced before, and never leaks into a plain run. Values are checked against
an independent computation of `W + scale * A @ B`.
"""

import asyncio
import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from tests import fixtures
from tests.helpers import assert_trees_close
from tests.helpers import independently_fused

X = fixtures.features((2, fixtures.D))


def _adapted(model, seed=0, **surgery):
  """(params with random adapters, specs) under `peft.lora(**surgery)`."""
  with peft.lora(**surgery) as report:
    params = model.init(jax.random.key(seed), X)['params']
  return fixtures.randomize_adapters(params), report.specs


def test_getattr_property_and_nn_jit_model_is_adapted():
  model = fixtures.ThirdPartyStyle()
  with peft.lora(rank=2) as report:
    params = model.init(jax.random.key(0), X)['params']
  assert sorted(s.key for s in report.specs) == [
      'head/lora', 'layer_0/inner/lora', 'layer_1/inner/lora']
  assert model.width == fixtures.D and model.depth == 2
  wrapped = peft.LoRA(model=model, rank=2)
  assert wrapped.width == fixtures.D
  params2 = wrapped.init(jax.random.key(0), X)['params']
  assert jax.tree.map(jnp.shape, params2) == jax.tree.map(jnp.shape, params)


def test_adapted_output_is_independent_einsum_under_nn_jit():
  model = fixtures.ThirdPartyStyle()
  params, specs = _adapted(model, rank=2, alpha=4.0)
  with peft.lora(rank=2, alpha=4.0):
    adapted = model.apply({'params': params}, X)
  fused = independently_fused(params, specs)
  np.testing.assert_allclose(adapted, model.apply({'params': fused}, X),
                             rtol=1e-5, atol=1e-5)
  assert_trees_close(peft.fuse_params(params, specs), fused, rtol=1e-6,
                     atol=1e-6)


def test_nn_jit_trace_order_plain_then_adapted_then_plain():
  model = fixtures.ThirdPartyStyle()
  base = model.init(jax.random.key(0), X)['params']
  plain_out = model.apply({'params': base}, X)  # nn.jit traces plainly
  params, specs = _adapted(model, rank=2)
  assert {s.key for s in specs} == {
      'head/lora', 'layer_0/inner/lora', 'layer_1/inner/lora'}
  params = peft.merge_params(base, peft.split_params(params).lora)
  with peft.lora(rank=2):
    adapted = model.apply({'params': params}, X)
  fused = independently_fused(params, specs)
  np.testing.assert_allclose(adapted, model.apply({'params': fused}, X),
                             rtol=1e-5, atol=1e-5)
  # Adapted, then plain: the adapted trace must not be replayed.
  again = model.init(jax.random.key(0), X)['params']
  assert 'lora' not in again['head']
  assert_trees_close(model.apply({'params': params}, X), plain_out)


def test_user_jit_around_apply_and_init_follows_the_active_surgery():
  model = fixtures.Nested()
  base = model.init(jax.random.key(0), X)['params']
  params, specs = _adapted(model, rank=2)
  params = peft.merge_params(base, peft.split_params(params).lora)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x))
  init = jax.jit(lambda: model.init(jax.random.key(1), X)['params'])
  plain_out = model.apply({'params': base}, X)
  adapted_out = model.apply({'params': independently_fused(params, specs)},
                            X)

  assert_trees_close(apply(params, X), plain_out)  # adapters unused
  assert 'lora' not in init()['head']
  with peft.lora(rank=2):
    np.testing.assert_allclose(apply(params, X), adapted_out, rtol=1e-5,
                               atol=1e-5)
    assert 'lora' in init()['head']
  assert_trees_close(apply(params, X), plain_out)
  assert 'lora' not in init()['head']
  with peft.lora(rank=2, alpha=8.0):  # new options: a new trace, new scale
    scaled = apply(params, X)
  assert not np.allclose(scaled, adapted_out, atol=1e-3)


def test_one_surgery_object_reuses_its_trace_a_new_one_retraces():
  model = fixtures.Nested()
  params, _ = _adapted(model, rank=2)
  traces = []

  @jax.jit
  def apply(p, x):
    traces.append(1)
    return model.apply({'params': p}, x)

  surgery = peft.lora(rank=2)
  for _ in range(2):
    with surgery:
      apply(params, X)
  assert len(traces) == 1
  with peft.lora(rank=2) as report:  # a new report must be filled
    apply(params, X)
  assert len(traces) == 2 and len(report.specs) == 3
  shared = [peft.LoRASurgery(rules=surgery.rules, share_traces=True)
            for _ in range(2)]
  for s in shared:
    with s:
      apply(params, X)
  assert len(traces) == 3


def test_second_method_is_adapted():
  model = fixtures.ThirdPartyStyle()
  params, specs = _adapted(model, rank=2)
  with peft.lora(rank=2):
    encoded = model.apply({'params': params}, X, method='encode')
  fused = independently_fused(params, specs)
  np.testing.assert_allclose(
      encoded, model.apply({'params': fused}, X, method='encode'),
      rtol=1e-5, atol=1e-5)


def test_unmatched_target_raises_after_a_plain_trace():
  model = fixtures.ThirdPartyStyle()
  base = model.init(jax.random.key(0), X)['params']
  model.apply({'params': base}, X)
  with pytest.raises(ValueError, match=r"target 'nope' .*matched no layer"):
    with peft.lora(rank=2, targets='nope'):
      model.apply({'params': base}, X)


def test_unregistered_type_target_says_how_to_register():
  class OwnLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x

  with pytest.raises(TypeError, match=r'OwnLayer, which peft cannot adapt.*'
                     r'register_einsum_layer'):
    peft.lora(rank=2, targets=OwnLayer)


@pytest.mark.parametrize('model_fn, stacked', [
    (fixtures.Scanned, 'layers/up/lora'),
    (fixtures.Vmapped, 'members/lora'),
])
def test_stacked_layers_fuse_unfuse_and_save(model_fn, stacked, tmp_path):
  model = model_fn()
  x = X if model_fn is fixtures.Scanned else jnp.stack([X, 2 * X, -X])
  with peft.lora(rank=2) as report:
    params = model.init(jax.random.key(0), x)['params']
  spec = report.adapters[stacked]
  node = params
  for key in spec.adapter_path:
    node = node[key]
  assert node['a'].shape == (3, *spec.a_shape)
  assert node['b'].shape == (3, *spec.b_shape)
  plain = model.apply({'params': peft.split_params(params).original}, x)
  with peft.lora(rank=2):
    assert_trees_close(model.apply({'params': params}, x), plain)

  params = fixtures.randomize_adapters(params)
  with peft.lora(rank=2):
    adapted = model.apply({'params': params}, x)
  fused = peft.fuse_params(params, report.specs)
  assert_trees_close(fused, independently_fused(params, report.specs),
                     rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model.apply({'params': fused}, x), adapted,
                             rtol=1e-5, atol=1e-5)
  lora = peft.split_params(params).lora
  assert_trees_close(peft.unfuse_params(fused, lora, report.specs), params,
                     atol=1e-6)

  path = tmp_path / 'stacked.safetensors'
  peft.save_adapters(path, params, report.specs)
  loaded = peft.load_adapters(path, expected=report.specs)
  assert_trees_close(loaded.lora, lora)
  assert {s.stack_shape for s in loaded.specs} == {(3,)} | (
      {()} if len(loaded.specs) > 1 else set())
  assert_trees_close(peft.fuse_params(
      peft.merge_params(peft.split_params(params).original, loaded.lora),
      loaded.specs), fused)


def test_remat_blocks_adapt_and_train():
  model = fixtures.Remat()
  params, specs = _adapted(model, rank=2)
  assert {s.key for s in specs} == {'block0/inner/lora', 'block1/inner/lora'}

  def loss(p):
    with peft.lora(rank=2):
      return jnp.sum(model.apply({'params': p}, X) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  for block in ('block0', 'block1'):
    for ab in 'ab':
      assert float(jnp.abs(grads[block]['inner']['lora'][ab]).max()) > 0
  with peft.lora(rank=2):
    adapted = model.apply({'params': params}, X)
  np.testing.assert_allclose(
      adapted, model.apply({'params': independently_fused(params, specs)},
                           X), rtol=1e-5, atol=1e-5)


def test_asyncio_task_tracing_under_another_tasks_key_is_an_error():
  model = fixtures.Nested()
  entered = asyncio.Event()
  checked = asyncio.Event()

  async def adapted_task():
    with peft.lora(rank=2):
      entered.set()
      await checked.wait()  # holds its surgery across an await

  async def plain_task():
    await entered.wait()
    init = jax.jit(lambda: model.init(jax.random.key(0), X))
    try:
      with pytest.raises(RuntimeError, match='another asyncio task'):
        init()
    finally:
      checked.set()

  async def main():
    await asyncio.gather(adapted_task(), plain_task())

  asyncio.run(main())
  # Back in one task: the plain trace now works and has no adapters.
  params = jax.jit(lambda: model.init(jax.random.key(0), X))()
  assert 'lora' not in params['params']['head']


def test_interceptor_bookkeeping_never_runs_getattr_through_itself():
  seen = []

  class Counting(fixtures.ThirdPartyStyle):
    def __getattr__(self, name):
      seen.append(name)
      return super().__getattr__(name)

  with peft.lora(rank=2):
    Counting().init(jax.random.key(0), X)
  # Surgery reads fields directly; a missing-attribute probe like
  # `getattr(module, 'wrapped')` would have shown up here.
  assert 'wrapped' not in seen


def test_functools_partial_interceptors_share_a_key():
  def replace(module, *, rank):
    if isinstance(module, nn.Dense) and module.scope is not None:
      return peft.LoRADense(rank=rank, wrapped=module)
    return module

  a = peft.ModuleInterceptor(functools.partial(replace, rank=2))
  b = peft.ModuleInterceptor(functools.partial(replace, rank=2))
  c = peft.ModuleInterceptor(functools.partial(replace, rank=3))
  assert a.jit_cache_key() == b.jit_cache_key() != c.jit_cache_key()
