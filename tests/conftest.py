"""Strict test habits for the whole suite."""

import os
import tempfile

# Several fake CPU devices for sharding tests; must precede importing jax.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

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
