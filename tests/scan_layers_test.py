"""`Decoder(scan_layers=True)` and the stacked layout it runs on.

The scanning model is compared with the unrolled one on the same params:
logits, and gradients with respect to random adapters, under jit; with
remat; on a Gemma 3 config whose blocks differ by index (a period of
three); and its errors.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft import models
from tests import helpers

TARGETS = ('.*attn/.*', '.*mlp')
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 320, (2, 7)),
                     jnp.int32)


def _random_adapted(config, surgery, seed=0):
  """Base params and adapters, all random (B nonzero), of `config`."""
  with surgery:
    shapes = jax.eval_shape(models.Decoder(config=config).init,
                            jax.random.key(0), TOKENS)['params']
  rng = np.random.default_rng(seed)
  params = peft.split_params(jax.tree.map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
      shapes))
  return params.original, params.lora


def _loss_and_grads(config, surgery, frozen, lora, *, scan, remat=False,
                    rngs=None, dtype=jnp.float32):
  model = models.Decoder(config=config, scan_layers=scan, remat=remat,
                         dtype=dtype)
  stack = (lambda t: models.stack_layers(t, config)) if scan else (
      lambda t: t)

  def loss(lora):
    with surgery:
      logits = model.apply(
          {'params': peft.merge_params(stack(frozen), stack(lora))}, TOKENS,
          rngs=rngs or {})
    return jnp.mean(logits.astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss))(lora)


@pytest.mark.parametrize('config', [
    models.tiny_config(n_layers=3),
    # Sliding, sliding, global, twice: the scan runs a period of 3.
    dataclasses.replace(models.tiny_gemma3_config(), n_layers=6),
], ids=['llama', 'gemma3'])
def test_the_scan_gives_the_unrolled_models_loss_and_gradients(config):
  surgery = peft.lora(4, alpha=8, targets=TARGETS)
  frozen, lora = _random_adapted(config, surgery)
  loss, grads = _loss_and_grads(config, surgery, frozen, lora, scan=False)
  scan_loss, scan_grads = _loss_and_grads(config, surgery, frozen, lora,
                                          scan=True)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  # The gradients come back in the unrolled layout: stacking is
  # differentiated through.
  helpers.assert_trees_close(scan_grads, grads, rtol=1e-4, atol=1e-6)
  assert set(grads) == {f'layers_{i}' for i in range(config.n_layers)}


@pytest.mark.parametrize('remat', [False, True], ids=['stored', 'remat'])
def test_a_bfloat16_scan_gives_the_unrolled_models_loss_and_gradients(remat):
  # bfloat16 weights and activations cross the loop as bits
  # (`_scan_loop`); the gradients must still be the unrolled model's.
  config = models.tiny_config(n_layers=3)
  surgery = peft.lora(4, alpha=8, targets=TARGETS)
  frozen, lora = _random_adapted(config, surgery)
  frozen = jax.tree.map(lambda a: a.astype(jnp.bfloat16), frozen)
  loss, grads = _loss_and_grads(config, surgery, frozen, lora, scan=False,
                                dtype=jnp.bfloat16)
  scan_loss, scan_grads = _loss_and_grads(
      config, surgery, frozen, lora, scan=True, remat=remat,
      dtype=jnp.bfloat16)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-2)
  helpers.assert_trees_close(scan_grads, grads, rtol=5e-2, atol=5e-3)
  assert jax.tree.leaves(grads)[0].dtype == jnp.float32


def test_global_blocks_of_a_period_attend_globally():
  # If the scan ran every block as layer 0 (sliding), a long sequence would
  # give other logits than the unrolled model's, whose layer 2 is global.
  config = dataclasses.replace(models.tiny_gemma3_config(), n_layers=6)
  params = models.random_params(config)
  tokens = jnp.tile(TOKENS, (1, 3))  # 21 positions, window 4.
  unrolled = models.Decoder(config=config).apply({'params': params}, tokens)
  scanned = models.Decoder(config=config, scan_layers=True).apply(
      {'params': models.stack_layers(params, config)}, tokens)
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-4, atol=1e-5)
  all_sliding = dataclasses.replace(config, sliding_window_pattern=None)
  wrong = models.Decoder(config=all_sliding).apply({'params': params}, tokens)
  assert not np.allclose(wrong, unrolled, atol=1e-3)


def test_remat_in_the_scan_gives_the_same_gradients_in_less_memory():
  config = models.tiny_config(n_layers=4)
  surgery = peft.lora(4, targets=TARGETS)
  frozen, lora = _random_adapted(config, surgery, seed=1)
  _, plain = _loss_and_grads(config, surgery, frozen, lora, scan=True)
  _, remat = _loss_and_grads(config, surgery, frozen, lora, scan=True,
                             remat=True)
  helpers.assert_trees_close(remat, plain, rtol=1e-5, atol=1e-6)

  def temp_bytes(remat):
    model = models.Decoder(config=config, scan_layers=True, remat=remat)
    stacked = models.stack_layers(frozen, config)
    tokens = jnp.zeros((8, 128), jnp.int32)

    def loss(lora):
      with surgery:
        params = peft.merge_params(stacked, models.stack_layers(lora, config))
        return jnp.mean(model.apply({'params': params}, tokens) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(lora).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  assert temp_bytes(True) < 0.7 * temp_bytes(False)


def test_dropout_in_the_scan_is_on_and_reproducible():
  config = models.tiny_config(n_layers=2)
  surgery = peft.lora(4, dropout=0.5, targets=TARGETS)
  frozen, lora = _random_adapted(config, surgery, seed=2)
  run = lambda rngs: _loss_and_grads(config, surgery, frozen, lora,
                                     scan=True, rngs=rngs)[0]
  key = {'dropout': jax.random.key(3)}
  assert float(run(key)) == float(run(key))
  assert float(run(key)) != float(run({'dropout': jax.random.key(4)}))
  assert float(run(key)) != float(run(None))
  # Dropout off, the scan matches the unrolled model.
  off = _loss_and_grads(config, surgery, frozen, lora, scan=False)[0]
  np.testing.assert_allclose(run(None), off, rtol=1e-5)


def test_a_surgery_sees_the_first_periods_paths():
  # Inside the scan, block i's layers run under `layers_{i % period}/...`,
  # so a regex naming blocks by index still finds them.
  config = models.tiny_config(n_layers=2)
  surgery = peft.lora(4, targets=r'layers_\d+/attn/q_einsum')
  frozen, lora = _random_adapted(config, surgery, seed=3)
  assert all(set(lora[f'layers_{i}']['attn']) == {'q_einsum'}
             for i in range(2))
  loss, _ = _loss_and_grads(config, surgery, frozen, lora, scan=False)
  scan_loss, _ = _loss_and_grads(config, surgery, frozen, lora, scan=True)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  base = _loss_and_grads(config, surgery, frozen,
                         jax.tree.map(jnp.zeros_like, lora), scan=True)[0]
  assert float(base) != float(scan_loss)  # The adapters did run.


def test_stacking_round_trips_exactly():
  config = dataclasses.replace(models.tiny_gemma3_config(), n_layers=6)
  params = models.random_params(config)
  stacked = models.stack_layers(params, config)
  assert sorted(stacked['scanned_layers']) == ['layers_0', 'layers_1',
                                               'layers_2']
  # Group g of entry j is block 3 g + j.
  np.testing.assert_array_equal(
      stacked['scanned_layers']['layers_1']['attn']['q_einsum']['w'][1],
      params['layers_4']['attn']['q_einsum']['w'])
  back = models.unstack_layers(stacked, config)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # A tree without blocks (the embedder's adapters alone) passes through.
  assert models.stack_layers({'embedder': 1}, config) == {'embedder': 1}


def test_stacking_refuses_blocks_that_differ():
  config = models.tiny_config(n_layers=2)
  layer = {'attn': {'w': np.zeros((2, 3))}}
  with pytest.raises(ValueError, match=r"lack \['layers_1'\].*Adapt every "
                     'block'):
    models.stack_layers({'layers_0': layer}, config)
  with pytest.raises(ValueError, match=r"have extra \['layers_2'\]"):
    models.stack_layers({f'layers_{i}': layer for i in range(3)}, config)
  other = {'attn': {'w': np.zeros((2, 4))}}
  with pytest.raises(ValueError, match=r"layers_1 differs from layers_0 .*"
                     r"\['attn'\]\['w'\]: \(\(2, 3\).*\(2, 4\)"):
    models.stack_layers({'layers_0': layer, 'layers_1': other}, config)
  with pytest.raises(ValueError, match=r"\['attn'\]\['v'\] is in only one"):
    models.stack_layers({'layers_0': layer,
                         'layers_1': {'attn': {'v': np.zeros((2, 3))}}},
                        config)
  uneven = dataclasses.replace(models.tiny_gemma3_config(), n_layers=4)
  with pytest.raises(ValueError, match='4 blocks do not split into whole '
                     r'periods of the sliding-window pattern \(3\)'):
    models.stack_layers({}, uneven)


def test_a_scanning_decoder_names_what_it_cannot_do():
  config = models.tiny_config()
  model = models.Decoder(config=config, scan_layers=True)
  params = models.random_params(config)
  with pytest.raises(ValueError, match=r"lack\. Init the unrolled Decoder"):
    model.init(jax.random.key(0), TOKENS)
  with pytest.raises(ValueError, match='lack. Init the unrolled'):
    model.apply({'params': params}, TOKENS)  # Not stacked.
  three = models.stack_layers(models.random_params(
      models.tiny_config(n_layers=3)), models.tiny_config(n_layers=3))
  with pytest.raises(ValueError, match=r'hold 3 x 1 blocks, the config 2'):
    model.apply({'params': three}, TOKENS)
  cache = models.init_cache(config, 2, 8)
  with pytest.raises(ValueError, match=r'runs whole sequences only.*'
                     r'unstack_layers'):
    model.apply({'params': models.stack_layers(params, config)}, TOKENS,
                cache, 0, method='decode')
  with pytest.raises(ValueError, match=r'scanned_layers/layers_1 is no block '
                     'of a period of 1'):
    models.unstack_layers({'scanned_layers': {'layers_1': {}}}, config)
  gemma3 = models.tiny_gemma3_config()  # A period of 3.
  with pytest.raises(ValueError, match=r"scanned_layers lacks \['layers_1', "
                     r"'layers_2'\] of a period of 3"):
    models.unstack_layers({'scanned_layers': {'layers_0': {}}}, gemma3)
