"""Interceptors: replacement semantics, nesting, threads and asyncio."""

import asyncio
import threading

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from tests import fixtures
from tests.helpers import assert_trees_close


def _to_lora(rank):
  def replace(module):
    if isinstance(module, nn.Dense):
      return peft.LoRADense(rank=rank, wrapped=module)
    return module
  return replace


def test_module_called_twice_shares_one_replacement():
  calls = []

  def replace(module):
    calls.append(type(module).__name__)
    return _to_lora(2)(module)

  x = fixtures.features((2, 4))
  with peft.ModuleInterceptor(replace):
    params = fixtures.CalledTwice().init(jax.random.key(0), x)['params']
  assert calls.count('Dense') == 1
  assert jax.tree.map(jnp.shape, params['shared']['lora']) == {
      'a': (4, 2), 'b': (2, 4)}


def test_submodules_of_replaced_module_are_still_intercepted():
  replaced = []

  def replace(module):
    if isinstance(module, fixtures.Block):
      replaced.append('/'.join(module.path))
    return _to_lora(2)(module)

  x = fixtures.features((2, fixtures.D))
  with peft.ModuleInterceptor(replace):
    params = fixtures.Nested().init(jax.random.key(0), x)['params']
  assert replaced == ['block0', 'block1']
  for name in ('block0', 'block1'):
    assert 'lora' in params[name]['inner']
  assert 'lora' in params['head']


def test_wrapper_call_of_wrapped_is_not_intercepted_again():
  seen = []

  class Spy(peft.Interceptor):
    def interceptor(self, next_fun, args, kwargs, context):
      if context.method_name == '__call__':
        seen.append(type(context.module).__name__)
      return next_fun(*args, **kwargs)

  x = fixtures.features((2, 4))
  with peft.ModuleInterceptor(_to_lora(2)):
    params = fixtures.CalledTwice().init(jax.random.key(0), x)
    with Spy():
      fixtures.CalledTwice().apply(params, x)
  # The inner Spy sees the wrapper, its adapter and the wrapped Dense; the
  # LoRA interceptor must not wrap the wrapped Dense a second time.
  assert seen.count('LoRADense') == 2
  assert seen.count('Dense') == 2


def test_nested_interceptors_outer_sees_call_first():
  order = []

  class Tag(peft.Interceptor):
    def __init__(self, name):
      self.name = name

    def interceptor(self, next_fun, args, kwargs, context):
      if isinstance(context.module, nn.Dense):
        order.append(self.name)
      return next_fun(*args, **kwargs)

  with Tag('outer'), Tag('inner'):
    nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 2)))
  assert order[:2] == ['outer', 'inner']


def test_exit_out_of_order_is_an_error():
  a = peft.ModuleInterceptor(lambda m: m)
  b = peft.ModuleInterceptor(lambda m: m)
  a.__enter__()
  b.__enter__()
  with pytest.raises(RuntimeError, match='not the innermost interceptor'):
    a.__exit__(None, None, None)
  b.__exit__(None, None, None)
  a.__exit__(None, None, None)


def test_missing_replace_fn_is_an_error():
  with pytest.raises(TypeError, match='has no replace_module_fn'):
    with peft.ModuleInterceptor():
      fixtures.Nested().init(jax.random.key(0), jnp.ones((1, fixtures.D)))


def _run_adapted_or_plain(interceptor, x, results, key):
  model = fixtures.Nested()
  if interceptor is None:
    params = model.init(jax.random.key(0), x)
  else:
    with interceptor:
      params = model.init(jax.random.key(0), x)
  results[key] = jax.tree.map(jnp.shape, params)


def test_threads_each_get_their_own_surgery():
  x = fixtures.features((2, fixtures.D))
  results = {}
  barrier = threading.Barrier(3)

  def worker(key, interceptor):
    barrier.wait()
    for _ in range(3):
      _run_adapted_or_plain(interceptor, x, results, key)

  shared = peft.lora(rank=2)  # one object entered by two threads at once
  threads = [threading.Thread(target=worker, args=args) for args in (
      ('rank2', shared), ('rank2b', shared),
      ('plain', None))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results['rank2']['params']['head']['lora']['a'] == (fixtures.D, 2)
  assert results['rank2'] == results['rank2b']
  assert 'lora' not in results['plain']['params']['head']


def test_asyncio_tasks_each_get_their_own_surgery():
  x = fixtures.features((2, fixtures.D))
  results = {}

  async def task(key, rank):
    surgery = peft.lora(rank=rank) if rank else None
    if surgery is None:
      await asyncio.sleep(0)
      _run_adapted_or_plain(None, x, results, key)
      return
    with surgery:
      await asyncio.sleep(0)  # let the other tasks enter their contexts
      model = fixtures.Nested()
      params = model.init(jax.random.key(0), x)
      await asyncio.sleep(0)
    results[key] = jax.tree.map(jnp.shape, params)

  async def main():
    await asyncio.gather(task('r2', 2), task('r3', 3), task('plain', 0))

  asyncio.run(main())
  assert results['r2']['params']['head']['lora']['a'] == (fixtures.D, 2)
  assert results['r3']['params']['head']['lora']['a'] == (fixtures.D, 3)
  assert 'lora' not in results['plain']['params']['head']


def test_interceptor_outputs_match_gemma_style_manual_wrapping():
  x = fixtures.features((2, 4))
  with peft.ModuleInterceptor(_to_lora(2)):
    params = fixtures.CalledTwice().init(jax.random.key(0), x)
    params = fixtures.randomize_adapters(params)
    out = fixtures.CalledTwice().apply(params, x)
  p = params['params']['shared']
  dense = lambda v: v @ (p['kernel'] + p['lora']['a'] @ p['lora']['b']) + (
      p['bias'][None])
  np.testing.assert_allclose(out, dense(jnp.tanh(dense(x))), rtol=1e-5,
                             atol=1e-5)
  assert_trees_close(jax.tree.map(jnp.shape, params['params']['shared']),
                     {'bias': (4,), 'kernel': (4, 4),
                      'lora': {'a': (4, 2), 'b': (2, 4)}})
