"""The integration venv works: gemma 4, kauldron and peft import and run.

These run in `.venv-integration` (Python 3.12, `requirements/integration.txt`)
via `make test`; the main venv's pytest ignores `tests/integration`. A broken
install fails here loudly rather than skipping.
"""

import importlib.metadata

from gemma import gm
import gemma.peft
import jax
from kauldron import kd
import numpy as np
import pytest

import peft

VOCAB = 128
TOKENS = np.arange(8, dtype=np.int32)[None]


def key(seed):
  # XLA:CPU takes ~11 s to compile a threefry init of even this toy model,
  # ~3 s with rbg: the random bits do not matter here.
  return jax.random.key(seed, impl='rbg')


class TinyGemma(gm.nn.Transformer):
  """Gemma 3's architecture (local/global layers, QK norm) at toy size."""

  config: gm.nn.config.TransformerConfig = gm.nn.config.TransformerConfig(
      num_embed=VOCAB,
      embed_dim=32,
      hidden_dim=64,
      num_heads=2,
      head_dim=16,
      num_kv_heads=1,
      final_logit_softcap=None,
      use_post_attn_norm=True,
      use_post_ffw_norm=True,
      use_qk_norm=True,
      attention_types=gm.nn.config.make_attention_layers_types(
          gm.nn.config.GEMMA3_ATTENTION_PATTERN, num_layers=2),
      sliding_window_size=4,
      transpose_gating_einsum=True,
  )


def test_the_pinned_versions_are_the_ones_imported():
  versions = {name: importlib.metadata.version(name)
              for name in ('gemma', 'kauldron', 'jax', 'flax')}
  assert versions == {'gemma': '4.0.1', 'kauldron': '1.4.4',
                      'jax': '0.10.2', 'flax': '0.12.8'}, versions
  assert kd.train.Trainer is not None
  assert peft.LoRA is not None
  assert gemma.peft.LoRADense is not None


@pytest.fixture(scope='module')
def tiny():
  model = TinyGemma()
  return model, jax.jit(model.init)(key(0), TOKENS)['params']


def test_tiny_transformer_init_and_apply_give_logits(tiny):
  model, params = tiny
  out = jax.jit(model.apply)({'params': params}, TOKENS)
  assert out.logits.shape == (1, 8, VOCAB)
  assert np.all(np.isfinite(np.asarray(out.logits, np.float32)))
  assert params['layer_0']['mlp']['gating_einsum'].shape == (2, 64, 32)
  assert params['layer_0']['mlp']['linear'].shape == (64, 32)


def test_gemma_lora_wraps_the_tiny_transformer(tiny):
  model, _ = tiny
  lora = gm.nn.LoRA(rank=4, model=model)
  params = jax.jit(lora.init)(key(1), TOKENS)['params']
  adapters = params['layer_0']['mlp']['_LoRAEinsum_linear']['lora']
  assert adapters['a'].shape == (64, 4)
  assert adapters['b'].shape == (4, 32)
  base, _ = gemma.peft.split_params(params)
  # B starts at zero: the wrapped model computes what the plain one does.
  np.testing.assert_array_equal(
      jax.jit(lora.apply)({'params': params}, TOKENS).logits,
      jax.jit(model.apply)({'params': base}, TOKENS).logits)


def test_gemma3_270m_builds_abstractly():
  model = gm.nn.Gemma3_270M()
  shapes = jax.eval_shape(model.init, key(0), TOKENS)['params']
  assert shapes['embedder']['input_embedding'].shape == (262144, 640)
  assert len([k for k in shapes if k.startswith('layer_')]) == 18
