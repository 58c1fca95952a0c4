"""LoRA wrappers: values against the unmodified layer and independent math."""

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from tests import fixtures
from tests.helpers import assert_trees_close

D = fixtures.D


class OneLayer(nn.Module):
  """A model holding one layer named 'layer' (so it is not the root)."""

  make: object
  call: object

  @nn.compact
  def __call__(self, x):
    return self.call(self.make(), x)


def _dense(dtype):
  return OneLayer(lambda: nn.Dense(5, dtype=dtype, name='layer'),
                  lambda m, x: m(x))


def _dense_general(dtype):
  return OneLayer(
      lambda: nn.DenseGeneral((2, 3), axis=(-2, -1), dtype=dtype,
                              name='layer'), lambda m, x: m(x))


def _einsum(dtype):
  return OneLayer(
      lambda: nn.Einsum((4, D, 3), 'btd,ndh->btnh', dtype=dtype,
                        name='layer'), lambda m, x: m(x))


def _conv(dtype):
  return OneLayer(
      lambda: nn.Conv(5, kernel_size=(3,), padding='SAME', dtype=dtype,
                      name='layer'), lambda m, x: m(x))


def _embed(dtype):
  return OneLayer(lambda: nn.Embed(fixtures.VOCAB, D, dtype=dtype,
                                   name='layer'), lambda m, x: m(x))


def _embed_attend(dtype):
  return OneLayer(lambda: nn.Embed(fixtures.VOCAB, D, dtype=dtype,
                                   name='layer'), lambda m, x: m.attend(x))


def _custom(dtype):
  del dtype
  return OneLayer(lambda: fixtures.MyEinsum((D, 6), name='layer'),
                  lambda m, x: m('btd,de->bte', x))


# kind -> (model factory, input, independent delta from A and B)
CASES = {
    'Dense': (_dense, lambda: fixtures.features(),
              lambda a, b: np.einsum('ir,ro->io', a, b), 'kernel'),
    'DenseGeneral': (_dense_general, lambda: fixtures.features((2, 3, 4, 2)),
                     lambda a, b: np.einsum('xyr,rfg->xyfg', a, b), 'kernel'),
    'Einsum': (_einsum, lambda: fixtures.features(),
               lambda a, b: np.einsum('dr,rnh->ndh', a, b), 'kernel'),
    'Conv': (_conv, lambda: fixtures.features(),
             lambda a, b: np.einsum('kir,ro->kio', a, b), 'kernel'),
    'Embed': (_embed, fixtures.tokens,
              lambda a, b: np.einsum('vr,rf->vf', a, b), 'embedding'),
    'EmbedAttend': (_embed_attend, lambda: fixtures.features(),
                    lambda a, b: np.einsum('vr,rf->vf', a, b), 'embedding'),
    'Custom': (_custom, lambda: fixtures.features(),
               lambda a, b: np.einsum('dr,re->de', a, b), 'w'),
}


def _targets(kind):
  return {'Conv': nn.Conv, 'Embed': nn.Embed,
          'EmbedAttend': nn.Embed}.get(kind)


def _adapted_and_base(kind, dtype, rank, alpha=None, use_rslora=False):
  make, inputs, delta, weight = CASES[kind]
  model = make(dtype)
  x = inputs()
  if kind == 'EmbedAttend':
    x = x.astype(dtype)
  surgery = peft.lora(rank=rank, alpha=alpha, use_rslora=use_rslora,
                      targets=_targets(kind))
  init_x = fixtures.tokens() if kind == 'EmbedAttend' else x
  init_model = _embed(dtype) if kind == 'EmbedAttend' else model
  with surgery as report:
    params = jax.jit(init_model.init)(jax.random.key(0), init_x)['params']
  return model, x, params, surgery, report, delta, weight


@pytest.mark.parametrize('kind', sorted(CASES))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('rank', [1, 3])
def test_values_at_init_and_with_random_adapters(kind, dtype, rank):
  model, x, params, surgery, report, delta, weight = _adapted_and_base(
      kind, dtype, rank, alpha=2.0 * rank)
  spec, = report.specs
  assert spec.scale == 2.0

  @jax.jit
  def adapted(p, x):
    with surgery:
      return model.apply({'params': p}, x)

  base_params = {'layer': {k: v for k, v in params['layer'].items()
                           if not k.startswith('lora')}}
  plain = jax.jit(model.apply)  # the unmodified model
  base = plain({'params': base_params}, x)
  # At init B == 0: bit-exact equality with the unmodified model.
  assert_trees_close(adapted(params, x), base)

  # Random adapters: the unmodified layer on W + scale * (independent
  # A @ B) gives the adapted output.
  params = fixtures.randomize_adapters(params)
  a = np.asarray(params['layer'][spec.adapter_name]['a'], np.float32)
  b = np.asarray(params['layer'][spec.adapter_name]['b'], np.float32)
  w = np.asarray(params['layer'][weight], np.float32)
  fused = dict(base_params['layer'])
  fused[weight] = jnp.asarray(w + spec.scale * delta(a, b))
  expected = plain({'params': {'layer': fused}}, x)
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  out = adapted(params, x)
  assert out.dtype == base.dtype
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(expected, np.float32),
                             rtol=tol, atol=tol)
  assert not np.allclose(np.asarray(out, np.float32),
                         np.asarray(base, np.float32), atol=tol)


@pytest.mark.parametrize('kind', sorted(CASES))
def test_gradients_reach_a_and_b(kind):
  model, x, params, surgery, report, _, weight = _adapted_and_base(
      kind, jnp.float32, 2)
  lora = report.specs[0].adapter_name

  def loss(p):
    with surgery:
      return jnp.sum(model.apply({'params': p}, x) ** 2)

  grads = jax.jit(jax.grad(loss))(params)['layer']
  # At init B == 0, so dL/dA == 0 and dL/dB != 0.
  np.testing.assert_array_equal(grads[lora]['a'], 0.0)
  assert np.abs(np.asarray(grads[lora]['b'])).max() > 0
  assert np.abs(np.asarray(grads[weight])).max() > 0


def test_rslora_and_default_scale():
  *_, report, _, _ = _adapted_and_base('Dense', jnp.float32, 4)
  assert report.specs[0].scale == 1.0
  *_, report, _, _ = _adapted_and_base('Dense', jnp.float32, 4, alpha=8.0,
                                       use_rslora=True)
  assert report.specs[0].scale == 4.0


def test_adapter_params_dtype_and_compute_dtype():
  model = _dense(jnp.bfloat16)
  x = fixtures.features()
  with peft.lora(rank=2, dtype=jnp.bfloat16):
    params = model.init(jax.random.key(0), x)['params']
    out = model.apply({'params': fixtures.randomize_adapters(params)}, x)
  assert params['layer']['lora']['a'].dtype == jnp.bfloat16
  assert params['layer']['kernel'].dtype == jnp.float32
  assert out.dtype == jnp.bfloat16


def test_dropout_on_in_train_off_in_eval():
  model = _dense(jnp.float32)
  x = fixtures.features()
  surgery = peft.lora(rank=2, dropout=0.5)
  with surgery:
    params = model.init(jax.random.key(0), x)['params']
  params = fixtures.randomize_adapters(params)

  def run(**rngs):
    with surgery:
      return model.apply({'params': params}, x, rngs=rngs)

  with peft.lora(rank=2):
    no_dropout = model.apply({'params': params}, x)
  assert_trees_close(run(), no_dropout)  # eval: no rng, deterministic
  train1 = run(dropout=jax.random.key(1))
  train2 = run(dropout=jax.random.key(2))
  assert not np.allclose(train1, no_dropout)
  assert not np.allclose(train1, train2)
  # Dropout applies only to the adapter input: with zero adapters the
  # output is the base output whatever the rng.
  zero = jax.tree.map(jnp.zeros_like, params)
  zero['layer']['kernel'] = params['layer']['kernel']
  zero['layer']['bias'] = params['layer']['bias']
  with surgery:
    out = model.apply({'params': zero}, x, rngs={'dropout': jax.random.key(1)})
  base = model.apply({'params': {'layer': {
      'kernel': params['layer']['kernel'], 'bias': params['layer']['bias']}}},
                     x)
  assert_trees_close(out, base)


def test_deterministic_forces_dropout_off():
  model = _dense(jnp.float32)
  x = fixtures.features()
  with peft.lora(rank=2):
    params = fixtures.randomize_adapters(
        model.init(jax.random.key(0), x)['params'])
    expected = model.apply({'params': params}, x)
  with peft.lora(rank=2, dropout=0.5, deterministic=True):
    out = model.apply({'params': params}, x,
                      rngs={'dropout': jax.random.key(1)})
  assert_trees_close(out, expected)


def test_wrapper_type_is_checked():
  with pytest.raises(TypeError, match='LoRADense.wrapped must be a Dense; got'
                     ' Einsum'):
    peft.LoRADense(rank=2, wrapped=nn.Einsum((2, 2), 'ab,bc->ac'))


def test_unregistered_layer_is_an_error():
  class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return peft.LoRAEinsumLike(rank=2, wrapped=Odd(name='odd'))(x)

  with pytest.raises(TypeError, match='not a registered einsum-like layer'):
    M().init(jax.random.key(0), jnp.ones((1, 2)))


def test_grouped_conv_is_an_error():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      conv = nn.Conv(4, (3,), feature_group_count=2, name='conv')
      return peft.LoRAConv(rank=2, wrapped=conv)(x)

  with pytest.raises(ValueError, match="grouped conv at 'conv'"):
    M().init(jax.random.key(0), jnp.ones((1, 5, 4)))


@pytest.mark.parametrize('bad, match', [
    (dict(rank=0), 'rank must be a positive int; got 0'),
    (dict(rank=2, dropout=1.5), r'dropout must be in \[0, 1\); got 1.5'),
])
def test_adapter_field_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    peft.LoRADenseAdapter(features=3, **bad)


def test_adapters_of_another_rank_are_an_error():
  model = _dense(jnp.float32)
  x = jnp.ones((2, D))
  with peft.lora(2):
    params = model.init(jax.random.key(0), x)['params']
  with peft.lora(4), pytest.raises(
      ValueError, match=r"LoRA param 'a' at 'layer/lora' has shape \(8, 2\) "
      r'but this layer with rank 4 needs \(8, 4\)'):
    model.apply({'params': params}, x)
