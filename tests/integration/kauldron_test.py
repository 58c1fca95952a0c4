"""The kauldron LoRA example (`examples/kauldron/`) trains, a few steps.

It runs in `.venv-integration` (`make test`), where kauldron 1.4.4 is
installed from requirements/integration.txt; kauldron is not a dependency
of peft.
"""

import importlib.util

import pytest

if importlib.util.find_spec('kauldron') is None:
  pytest.skip('kauldron is not installed: run this in .venv-integration '
              '(make integration-venv).', allow_module_level=True)

# Imported only when kauldron is there; a broken install fails loudly.
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from kauldron import konfig  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from examples.kauldron import kd_peft  # noqa: E402
from examples.kauldron import lora_config  # noqa: E402
import peft  # noqa: E402
from peft import models  # noqa: E402
from tests import helpers  # noqa: E402

STEPS = 8


def xent(model, params, windows):
  logits = model.apply({'params': params}, jnp.asarray(windows[:, :-1]))
  return float(optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.asarray(windows[:, 1:])).mean())


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """Resolves the example config on small settings and trains it."""
  tmp = tmp_path_factory.mktemp('kauldron')
  base = kd_peft.write_base_checkpoint(tmp / 'base')
  cfg = lora_config.get_config()
  cfg.workdir = str(tmp / 'work')
  cfg.init_transform.wrapped.path = str(tmp / 'base')
  cfg.train_ds.data_source.windows.max_plays = 1
  cfg.train_ds.batch_size = 8
  cfg.num_train_steps = STEPS
  cfg.checkpointer.save_interval_steps = STEPS
  trainer = konfig.resolve(cfg)
  initial = trainer.init_state()
  final, _ = trainer.train()
  return trainer, base, initial, final


def test_init_restores_the_base_and_keeps_fresh_adapters(run):
  trainer, base, initial, _ = run
  restored, adapters = peft.split_params(initial.params)
  helpers.assert_trees_close(restored, base, rtol=0, atol=0)
  assert sorted(adapters['layers_0']['mlp']) == ['lora_gating_einsum',
                                                 'lora_linear']
  for path, b in jax.tree_util.tree_leaves_with_path(adapters):
    if path[-1].key == 'b':
      assert not np.any(np.asarray(b)), path
  # B = 0: the adapted model computes exactly what the base model does.
  windows = trainer.train_ds.data_source.windows[:4]
  tokens = jnp.asarray(windows[:, :-1])
  plain = models.Decoder(config=models.tiny_config())
  np.testing.assert_array_equal(
      trainer.model.apply({'params': initial.params}, tokens),
      plain.apply({'params': base}, tokens))


def test_training_updates_only_the_adapters_and_lowers_the_loss(run):
  trainer, base, initial, final = run
  assert int(final.step) == STEPS + 1  # kauldron runs steps 0..STEPS.
  final_base, final_adapters = peft.split_params(final.params)
  helpers.assert_trees_close(final_base, base, rtol=0, atol=0)
  _, initial_adapters = peft.split_params(initial.params)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       final_adapters, initial_adapters)
  assert min(jax.tree.leaves(moved)) > 0, moved
  windows = trainer.train_ds.data_source.windows[:32]
  before = xent(trainer.model, initial.params, windows)
  after = xent(trainer.model, final.params, windows)
  assert after < before - 0.05, (before, after)


def test_skip_adapters_errors_name_the_fix(run, tmp_path):
  trainer, _, initial, _ = run
  base, _ = peft.split_params(initial.params)
  wrapped = kd_peft.LoadHFCheckpoint(path=tmp_path)
  with pytest.raises(ValueError, match='found no adapter params.*peft.LoRA'):
    kd_peft.SkipAdapters(wrapped=wrapped).transform(
        initial.replace(params=base))
  models.save_hf_dir(tmp_path, config=models.tiny_config(n_layers=1),
                     params=_one_layer_params())
  with pytest.raises(ValueError, match=r"does not fit the model: missing "
                     r"\['layers_1/.*same architecture"):
    kd_peft.SkipAdapters(wrapped=wrapped).transform(initial)


def _one_layer_params():
  model = models.Decoder(config=models.tiny_config(n_layers=1))
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 2), jnp.int32))['params']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def test_token_windows_layout_and_errors():
  source = kd_peft.TokenWindows(windows=np.arange(12).reshape(3, 4))
  example = source[1]
  assert len(source) == 3
  assert example['input'].tolist() == [4, 5, 6]
  assert example['target'].tolist() == [[5], [6], [7]]
  with pytest.raises(ValueError, match=r'got shape \(5,\)'):
    kd_peft.TokenWindows(windows=np.arange(5))
