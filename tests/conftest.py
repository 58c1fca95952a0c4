"""Strict test habits for the whole suite."""

import os

# Several fake CPU devices for sharding tests; must precede importing jax.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

# Fixture makers run in a side environment with torch (see their
# docstrings), never in the suite.
collect_ignore_glob = ['testdata/*']

jax.config.update('jax_numpy_rank_promotion', 'raise')
