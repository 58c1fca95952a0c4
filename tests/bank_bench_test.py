"""`benchmarks/bank.py` runs and prints its three timings and two ratios."""

import re

import jax

from benchmarks import bank


def test_quick_run_prints_times_and_ratios(capsys):
  # The benchmark model's rotary embedding broadcasts `(T, 1, H)` against
  # `(B, T, N, H)`, which the suite's strict rank promotion refuses.
  with jax.numpy_rank_promotion('allow'):
    bank.main(['--quick', '--base-rows', '2'])
  out = capsys.readouterr().out
  for name in ('mixed', 'separate', 'base'):
    assert re.search(rf'^{name} +\d+\.\d+ ms per batch$', out, re.M), out
  assert re.search(r'^mixed / separate \d+\.\d{3}$', out, re.M), out
  assert re.search(r'^mixed / base +\d+\.\d{3}$', out, re.M), out
