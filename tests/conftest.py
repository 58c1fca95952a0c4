"""Strict test habits for the whole suite."""

import os
import tempfile

# Several fake CPU devices for sharding tests; must precede importing jax.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import pytest  # noqa: E402

from peft import models  # noqa: E402

# One persistent compilation cache for the session, as `python -m peft`
# has: the CLI tests' processes (inheriting the variable) and this one
# load the programs the others compiled. It starts empty, so no result
# depends on a previous session.
_COMPILATION_CACHE = os.environ.setdefault(
    'PEFT_COMPILATION_CACHE', tempfile.mkdtemp(prefix='peft-test-jax-'))
jax.config.update('jax_compilation_cache_dir', _COMPILATION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)

# Fixture makers run in a side environment with torch (see their
# docstrings), never in the suite.
collect_ignore_glob = ['testdata/*']

jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture(scope='session')
def gemma3():
  """Gemma 3 270M from its GGUF package, loaded once per worker."""
  return models.load_gemma3()


# `make test` hands whole files to its two workers (`--dist loadfile`), so
# that a module's fixtures (a fine-tuning run, a loaded model) are made
# once, not once per worker. These files take a minute or more each; they
# go first, so that the small ones fill the gaps at the end instead of one
# worker running a long file alone. Measured with --durations; reorder
# when a file's cost changes much.
_SLOW_FIRST = (
  'tests/cli_train_test.py', 'tests/colabs_test.py',
  'tests/cli_gemma3_test.py', 'tests/distributed_test.py',
  'tests/docs_test.py',
  'tests/models_gemma3_test.py', 'tests/cli_test.py',
  'tests/cli_hf_peft_test.py', 'tests/hf_peft_test.py',
  'tests/cli_data_test.py', 'tests/kernel_init_test.py',
  'tests/quantized_layers_test.py', 'tests/surgery_robustness_test.py',
)


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.nodeid.split('::')[0]
    return _SLOW_FIRST.index(path) if path in _SLOW_FIRST else len(_SLOW_FIRST)
  items.sort(key=rank)  # Stable: each file keeps its own order.
