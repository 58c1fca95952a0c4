"""`benchmarks/mesh_bytes.py` prints each device's share of a placed base."""

import re

import jax
import pytest

from benchmarks import mesh_bytes


@pytest.mark.parametrize('argv', [[], ['--quantize', 'nf4']])
def test_quick_run_prints_a_device_share_near_one_eighth(capsys, argv):
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (XLA_FLAGS, as make test sets)')
  mesh_bytes.main(['--quick', *argv])
  out = capsys.readouterr().out
  shares = re.findall(r'^(unrolled|stacked) +device 0 holds +[\d.]+ of +'
                      r'[\d.]+ MiB: (\d\.\d{3}) \(1 / devices: 0\.125\)$',
                      out, re.M)
  assert [layout for layout, _ in shares] == ['unrolled', 'stacked'], out
  for _, share in shares:
    # Sharded, not replicated: near 1/8 (the tiny model's norm scales and
    # NF4's block scales stay whole), the same in both layouts.
    assert 0.125 <= float(share) < 0.2, out
  assert shares[0][1] == shares[1][1], out
