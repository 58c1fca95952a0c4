"""`finetune --scan-layers` with adapters in some blocks only.

`peft/_cli/scanning.py` retargets the surgery at the loop body's blocks and
pads the blocks that lack adapters with zeros. On a Gemma 3 config whose
blocks repeat with a period of three, with random adapters (B nonzero) in
a few blocks, the scanning model must give the unrolled model's loss and
gradients.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft import models
from peft._cli import adapt
from peft._cli import base as base_lib
from peft._cli import scanning
from tests import helpers

CONFIG = dataclasses.replace(models.tiny_gemma3_config(), n_layers=6)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 320, (2, 7)),
                     jnp.int32)
# Blocks 1 and 4 share a period position, 5 has the MLP alone.
SETTINGS = adapt.Settings(
    targets=('layers_1/attn/q_einsum', 'layers_4/attn/.*', 'layers_5/mlp'),
    rank=4, alpha=8.0)


def _loss_and_grads(settings, frozen, lora, *, scan):
  model = models.Decoder(config=CONFIG, scan_layers=scan)

  def loss(lora):
    if scan:
      params = peft.merge_params(
          models.stack_layers(frozen, CONFIG),
          models.stack_layers(scanning.every_block(lora, CONFIG), CONFIG))
    else:
      params = peft.merge_params(frozen, lora)
    with settings.applied():
      logits = model.apply({'params': params}, TOKENS)
    return jnp.mean(logits ** 2)
  return jax.jit(jax.value_and_grad(loss))(lora)


def test_some_blocks_adapted_scan_as_they_run_unrolled():
  with SETTINGS.applied() as report:
    shapes = jax.eval_shape(models.Decoder(config=CONFIG).init,
                            jax.random.key(0), TOKENS)['params']
  rng = np.random.default_rng(0)
  frozen, lora = peft.split_params(jax.tree.map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
      shapes))
  assert sorted(lora) == ['layers_1', 'layers_4', 'layers_5']
  body = scanning.body_settings(SETTINGS, report.specs, CONFIG)
  assert body.targets == ('layers_1/attn/q_einsum',
                          'layers_1/attn/kv_einsum',
                          'layers_1/attn/attn_vec_einsum', 'layers_2/mlp')
  loss, grads = _loss_and_grads(SETTINGS, frozen, lora, scan=False)
  scan_loss, scan_grads = _loss_and_grads(body, frozen, lora, scan=True)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  # Gradients for the run's own adapters only, in the unrolled layout.
  helpers.assert_trees_close(scan_grads, grads, rtol=1e-4, atol=1e-6)
  # The adapters matter: without them the loss moves.
  plain, _ = _loss_and_grads(
      SETTINGS, frozen, jax.tree.map(jnp.zeros_like, lora), scan=False)
  assert abs(float(plain) - float(loss)) > 1e-4


def test_every_block_pads_with_zeros_and_refuses_dora():
  a = np.ones((4, 2), np.float32)
  lora = {'layers_1': {'attn': {'a': a}}, 'layers_5': {'mlp': {'a': a}}}
  padded = scanning.every_block(lora, CONFIG)  # Period 3.
  # Position 0 (blocks 0, 3) runs no adapter, 1 (blocks 1, 4) attention's,
  # 2 (blocks 2, 5) the MLP's; stacking wants every block, even empty.
  assert sorted(padded) == [f'layers_{i}' for i in range(6)]
  assert padded['layers_0'] == padded['layers_3'] == {}
  assert padded['layers_1']['attn']['a'] is a
  assert not padded['layers_4']['attn']['a'].any()
  assert not padded['layers_2']['mlp']['a'].any()
  with pytest.raises(base_lib.CliError, match=(
      r'--scan-layers with --use-dora needs every block adapted alike, but '
      r'layers_2 lacks mlp/a')):
    scanning.every_block(lora, CONFIG, use_dora=True)
