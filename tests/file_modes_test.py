"""Every writer gives its files the mode `open` would: a replaced output
keeps its permission bits, a new one follows the umask (safetensors'
`save_file` alone would make it 0600)."""

import os
import stat

import jax
import jax.numpy as jnp
import pytest

from peft import models
from peft._core import file_modes as _file_modes
from tests.cli_test import DATA
from tests.cli_test import run_cli


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
  old = os.umask(0o027)
  yield 0o640
  os.umask(old)


def test_model_loaders_write_files_that_follow_the_umask(umask_027,
                                                         tmp_path):
  config = models.tiny_config()
  params = jax.jit(models.Decoder(config=config).init)(
      jax.random.key(0), jnp.ones((1, 2), jnp.int32))['params']
  models.save_hf_dir(tmp_path / 'hf', config=config, params=params)
  assert _mode(tmp_path / 'hf' / 'model.safetensors') == umask_027
  assert _mode(tmp_path / 'hf' / 'config.json') == umask_027
  lora, specs = models._hf_peft._example_adapters(config)
  models.save_hf_peft(tmp_path / 'peft', lora, specs)
  assert _mode(tmp_path / 'peft' / 'adapter_model.safetensors') == umask_027


def test_cli_outputs_keep_the_mode_of_what_they_replace(tmp_path):
  argv = ('finetune', '--tiny', *DATA, '--steps', '1', '--batch-size', '2',
          '--workdir', tmp_path)
  assert run_cli(*argv)[0] == 0
  adapters = tmp_path / 'adapters.safetensors'
  os.chmod(adapters, 0o600)
  assert run_cli(*argv)[0] == 0
  assert _mode(adapters) == 0o600
  merged = tmp_path / 'merged.safetensors'
  assert run_cli('merge', '--tiny', *DATA, '--adapters', adapters, '--out',
                 merged, '--no-check')[0] == 0
  assert _mode(merged) == 0o666 & ~_file_modes.umask()
  os.chmod(merged, 0o600)
  assert run_cli('merge', '--tiny', *DATA, '--adapters', adapters, '--out',
                 merged, '--no-check')[0] == 0
  assert _mode(merged) == 0o600
