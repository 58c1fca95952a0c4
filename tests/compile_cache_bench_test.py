"""`benchmarks/compile_cache.py`: two processes, the second loads the step.

Runs for real on the tiny model (two child processes, seconds).
"""

import doctest
import json

from benchmarks import compile_cache


def test_report_doctest_passes():
  assert doctest.testmod(compile_cache).failed == 0


def test_the_second_process_loads_the_step_from_the_cache(capsys):
  compile_cache.main(['--quick', '--seq', '16', '--batch', '2'])
  out = capsys.readouterr().out.splitlines()
  runs = json.loads(out[-1])
  first, second = runs['first'], runs['second']
  assert first['layers'] == second['layers'] == 2
  assert first['stablehlo_lines'] == second['stablehlo_lines'] > 100
  # A compile takes over a second here; a load from the cache a tenth.
  assert second['compile_s'] < first['compile_s'] / 3, runs
  assert out[0] == 'run     trace s  lower s  compile s'
  assert 'target <= 2.0 s: met' in out[3]


def test_a_scanning_step_holds_one_block_and_loads_too(capsys):
  def runs(*argv):
    compile_cache.main(['--quick', '--seq', '16', '--batch', '2',
                        '--layers', '4', *argv])
    return json.loads(capsys.readouterr().out.splitlines()[-1])
  unrolled, scanned = runs(), runs('--scan-layers')
  assert scanned['first']['scan_layers'] and not unrolled['first'][
      'scan_layers']
  # XLA's program of four unrolled blocks holds four copies of the
  # block's; the scan's holds one. Both hold the optimizer's update of
  # each block's adapters, so the scan's is shorter by less than 3/4.
  lines = lambda runs: runs['first']['compiled_hlo_lines']
  assert lines(scanned) < 0.8 * lines(unrolled), (unrolled, scanned)
  assert (scanned['second']['compile_s'] <
          scanned['first']['compile_s'] / 3), scanned
