"""`benchmarks/real_step.py`: its JAX child's record and its ratios.

The child runs for real on the tiny model (one process, seconds); the
ratios and the report are checked on hand-made numbers. The torch child
needs `.venv-torch` and is left to `python -m benchmarks.real_step`.
"""

import doctest
import pathlib
import sys

import pytest

from benchmarks import procstats
from benchmarks import real_step

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_modules_doctests_pass():
  for module in (procstats, real_step):
    assert doctest.testmod(module).failed == 0, module.__name__


def test_jax_child_reports_sane_figures():
  variant = real_step.Variant(side='jax', seq=16, batch=2)
  result = procstats.run_child(
      variant.argv(hf_dir=None, steps=2, quick=True), cwd=str(ROOT))
  assert (result['side'], result['seq'], result['batch']) == ('jax', 16, 2)
  for key in ('first_step_s', 'median_step_s', 'compile_s', 'wall_s'):
    assert result[key] > 0, key
  assert result['first_step_s'] > result['median_step_s']
  assert len(result['step_s']) == 2
  assert result['peak_rss_bytes'] >= result['train_peak_bytes'] > 0
  assert result['xla']['peak_bytes'] > 0
  assert 0 < result['last_loss'] < 10  # ln(320 tokens) is 5.8.
  assert result['adapter_params'] > 0


def _row(side, dtype='float32', remat=False, seq=128, *, step, rss=100,
         train=100, xla=100, first=10.0, threads=None):
  return {'side': side, 'dtype': dtype, 'remat': remat, 'seq': seq,
          'threads': threads, 'median_step_s': step, 'peak_rss_bytes': rss,
          'train_peak_bytes': train, 'xla_peak_bytes': xla,
          'first_step_s': first}


def test_ratios_are_against_the_right_baselines():
  rows = [
      _row('torch', step=4.0, rss=200, first=2.0),
      _row('torch', step=2.0, rss=200, first=2.0, threads=1),
      _row('jax', step=3.0, rss=150, first=30.0),
      _row('jax', seq=1024, step=10.0, train=1000, xla=800),
      _row('jax', remat=True, seq=1024, step=12.0, train=500, xla=200),
      _row('jax', 'bfloat16', seq=1024, step=15.0),
  ]
  got = {r['name']: r for r in real_step.ratios(rows)}
  expect = {
      'ours/torch step time (f32 s128)': (0.75, True),
      'ours/torch peak RSS (f32 s128)': (0.75, True),
      'ours/torch first step (f32 s128)': (15.0, None),
      'ours/torch step time (f32 s128 torch t1)': (1.5, False),
      'ours/torch peak RSS (f32 s128 torch t1)': (0.75, True),
      'ours/torch first step (f32 s128 torch t1)': (15.0, None),
      'remat/plain peak RSS during steps (f32 s1024)': (0.5, True),
      'remat/plain XLA peak bytes (f32 s1024)': (0.25, None),
      'remat/plain step time (f32 s1024)': (1.2, True),
      'bf16/f32 step time (plain s1024)': (1.5, False),
  }
  assert sorted(got) == sorted(expect)  # Rows without a partner: none.
  for name, (value, met) in expect.items():
    assert got[name]['value'] == pytest.approx(value), name
    assert got[name]['met'] is met, name
  report = real_step.format_report(real_step.summarize([], []),
                                   list(got.values()))
  assert 'remat/plain step time (f32 s1024)' in report
  assert 'NOT met' in report


def test_summarize_takes_medians_over_rounds():
  v = real_step.Variant(side='jax', seq=16, batch=2)
  records = [{'variant': v.name, 'first_step_s': t, 'median_step_s': t,
              'peak_rss_bytes': 1, 'train_peak_bytes': 1,
              'train_added_bytes': 0, 'first_loss': 1.0, 'wall_s': 1.0,
              'xla': {'peak_bytes': 5}} for t in (1.0, 3.0, 2.0)]
  (row,) = real_step.summarize([v], records)
  assert (row['rounds'], row['median_step_s'], row['xla_peak_bytes']) == (
      3, 2.0, 5)


def test_variants_cover_the_sweep_once_each():
  vs = real_step.variants(quick=False, torch=True, torch_threads=[1])
  names = [v.name for v in vs]
  assert len(names) == len(set(names)) == 2 + 13
  assert [v.name for v in vs if v.every_round] == [
      'torch f32 plain s128 b4', 'torch f32 plain s128 b4 t1',
      'jax f32 plain s128 b4', 'jax f32 plain s128 b4 scan']
  scan = [v for v in vs if v.scan]
  assert len(scan) == 1 and '--scan-layers' in scan[0].argv(
      hf_dir=None, steps=1, quick=False)
  assert {v.batch for v in vs if v.seq == 1024} == {real_step.LONG_BATCH}


def test_missing_torch_venv_says_how_to_make_it(tmp_path, capsys):
  with pytest.raises(SystemExit, match='Run `make bench-torch-venv` first'):
    real_step.torch_python(quick=False, root=tmp_path)
  assert real_step.torch_python(quick=True, root=tmp_path) is False
  assert 'skips the torch side' in capsys.readouterr().out


def test_run_steps_needs_a_timed_step():
  with pytest.raises(ValueError, match='steps must be >= 1; got 0'):
    procstats.run_steps(lambda: 0.0, 0)


def test_failing_child_names_its_command_and_stderr():
  argv = [sys.executable, '-c', 'import sys; sys.exit("boom")']
  with pytest.raises(RuntimeError, match=r'exited with 1.*\n.*boom'):
    procstats.run_child(argv)


def test_seqs_choose_the_sweeps_lengths():
  vs = real_step.variants(quick=False, torch=False, seqs=[128])
  assert [v.name for v in vs] == [
      'jax f32 plain s128 b4', 'jax f32 plain s128 b4 scan',
      'jax f32 remat s128 b4', 'jax bf16 plain s128 b4',
      'jax bf16 remat s128 b4']


def test_scan_rows_are_compared_with_the_plain_row_only():
  def row(side, step, scan=False):
    return {'side': side, 'dtype': 'float32', 'remat': False, 'seq': 128,
            'scan': scan, 'median_step_s': step, 'peak_rss_bytes': 100,
            'first_step_s': step * 5}
  rats = {r['name']: r['value'] for r in real_step.ratios(
      [row('torch', 2.0), row('jax', 2.5), row('jax', 3.0, scan=True)])}
  assert rats['ours/torch step time (f32 s128)'] == 1.25  # Not the scan's.
  assert rats['scan/plain step time (f32 s128)'] == 1.2
  assert rats['scan/plain first step (f32 s128)'] == 1.2
  assert rats['scan/plain peak RSS (f32 s128)'] == 1.0
