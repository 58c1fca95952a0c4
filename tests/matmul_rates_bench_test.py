"""`benchmarks/matmul_rates.py`: the XLA side runs for real (seconds).

The torch side needs `.venv-torch` and is left to the command line.
"""

import doctest
import json

from benchmarks import matmul_rates


def test_doctests_pass():
  assert doctest.testmod(matmul_rates).failed == 0


def test_xla_rates_are_reported_per_shape(capsys):
  matmul_rates.main(['--reps', '1'])
  out = capsys.readouterr().out.splitlines()
  record = json.loads(out[-1])
  assert [tuple(s) for s in record['shapes']] == list(matmul_rates.SHAPES)
  assert set(record) == {'shapes', 'xla'}
  # Two cores do between 1 and 10,000 GFLOP/s.
  assert all(1 < rate < 1e4 for rate in record['xla']), record
  assert out[0].startswith('shape (m x k x n)') and len(out) == 6
