"""Targets, the printed tables and the chart of a benchmark run.

`python -m benchmarks.report DIR` prints the tables of the `results.json` in
DIR again (judging the targets afresh) and redraws its `results.png`.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
from typing import Any


def _rows(results) -> dict[str, dict[str, Any]]:
  return {v['name']: v for v in results['variants']}


def _target(name: str, measured: float | None, limit: float, *,
            cpu: float | None = None, at_most: bool = True,
            note: str = '') -> dict[str, Any]:
  """One target; `measured` (wall time ratio) decides whether it is met."""
  met = None
  if measured is not None:
    met = measured <= limit if at_most else measured >= limit
  return {'target': name, 'measured': measured, 'cpu_measured': cpu,
          'limit': f'{"<=" if at_most else ">="} {limit:g}', 'met': met,
          'note': note}


def _timed(name, rows, num, den, limit, **kwargs):
  """A target on the wall-time ratio, with the CPU-time ratio beside it."""
  return _target(name, _ratio(rows, num, den), limit,
                 cpu=_ratio(rows, num, den, 'cpu_median_ms'), **kwargs)


def _ratio(rows, num: str, den: str, key: str = 'median_ms'):
  if num in rows and den in rows and key in rows[num] and key in rows[den]:
    return rows[num][key] / rows[den][key]
  return None


def targets(results: dict[str, Any], *, rank: int) -> list[dict[str, Any]]:
  """Each target of the issue, with the measured ratio and whether it holds."""
  rows = _rows(results)
  base, full = 'base forward', 'full fine-tune step'
  step = f'LoRA step r{rank}'
  out = []
  for name in rows:
    if name.startswith('LoRA forward r'):
      out.append(_timed(f'{name} / base forward', rows, name, base, 1.05))
  out.append(_timed(f'fused forward r{rank} / base forward', rows,
                    f'fused forward r{rank}', base, 1.01))
  dora_forward, lora_forward = f'DoRA forward r{rank}', f'LoRA forward r{rank}'
  out.append(_timed(f'{dora_forward} / {lora_forward}', rows, dora_forward,
                    lora_forward, 1.3,
                    note='the norm of W + sBA per call'))
  out.append(_timed(f'DoRA step r{rank} / {step}', rows, f'DoRA step r{rank}',
                    step, 1.3))
  out.append(_timed(f'fused DoRA forward r{rank} / base forward', rows,
                    f'fused DoRA forward r{rank}', base, 1.01))
  for name in rows:
    if name.startswith('QDoRA step '):
      qlora = name.replace('QDoRA', 'QLoRA', 1)
      out.append(_timed(f'{name} / {qlora}', rows, name, qlora, 1.3,
                        note='DoRA over the quantized base'))
  gemma = f'gemma.peft LoRA step r{rank}'
  out.append(_timed(f'{step} / {gemma}', rows, step, gemma, 1.0,
                    note=results['skipped'].get('gemma.peft LoRA', '')))
  out.append(_timed(f'{step} / {full}', rows, step, full, 0.45))
  out.append(_timed(f'{step}, whole-tree grads / {full}', rows,
                    f'{step}, whole-tree grads', full, 0.45,
                    note='the README pattern; informative'))
  out.append(_target(
      f'{step} FLOPs / {full} FLOPs', _flop_ratio(rows, step, full), 0.45,
      note="XLA's cost analysis: the compute floor of the time ratio"))
  out.append(_target(
      f'LoRA forward r{rank} compile / base forward compile',
      _ratio(rows, f'LoRA forward r{rank}', base, 'trace_compile_s'), 1.3))
  out.append(_target(
      f'{step} compile / {full} compile',
      _ratio(rows, step, full, 'trace_compile_s'), 1.3))
  copy = 'copy of fused kernels (jit)'
  out.append(_timed('fuse (jit) bandwidth / copy bandwidth', rows, copy,
                    'fuse (jit)', 0.25, at_most=False))
  mem = results['memory']
  if mem.get('lora') and mem.get('full'):
    lora = statistics.median(r['train_bytes'] for r in mem['lora'])
    full_bytes = statistics.median(r['train_bytes'] for r in mem['full'])
    out.append(_target('LoRA training memory / full fine-tuning memory',
                       lora / full_bytes, 0.6,
                       note='peak RSS added by training (VmHWM)'))
    out.append(_target(
        'LoRA XLA step buffers / full fine-tuning XLA step buffers',
        mem['lora'][0]['xla']['peak_bytes']
        / mem['full'][0]['xla']['peak_bytes'], 0.6,
        note="the compiled step's arguments + outputs + temps"))
    lora = statistics.median(r['child_ru_maxrss_bytes'] for r in mem['lora'])
    full_bytes = statistics.median(
        r['child_ru_maxrss_bytes'] for r in mem['full'])
    out.append(_target('LoRA process peak / full fine-tuning process peak',
                       lora / full_bytes, 0.6,
                       note='whole child ru_maxrss, incl. jax and compile'))
    full_train = statistics.median(r['train_bytes'] for r in mem['full'])
    if mem.get('frozen-backprop'):
      floor = statistics.median(
          r['train_bytes'] for r in mem['frozen-backprop'])
      out.append(_target(
          'frozen-backprop training memory / full fine-tuning memory',
          floor / full_train, 0.6,
          note='the floor: backward through the frozen model, no adapters'))
    for mode in sorted(m for m in mem if m.startswith('qlora-')):
      q = statistics.median(r['train_bytes'] for r in mem[mode])
      out.append(_target(f'{mode} training memory / full fine-tuning memory',
                         q / full_train, 0.6, note='informative'))
  return out


def _flop_ratio(rows, num: str, den: str) -> float | None:
  if num in rows and den in rows:
    flops = [rows[n].get('flops') for n in (num, den)]
    if all(flops):
      return flops[0] / flops[1]
  return None


def _table(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(r[i]) for r in [header, *rows])
            for i in range(len(header))]
  line = lambda r: '  '.join(
      c.rjust(w) if i else c.ljust(w)
      for i, (c, w) in enumerate(zip(r, widths))).rstrip()
  return '\n'.join([line(header), line(['-' * w for w in widths]),
                    *map(line, rows)])


def _mib(n: float) -> str:
  return f'{n / 2**20:.1f}'


def render(results: dict[str, Any]) -> str:
  """The run as text: speed table, targets, memory, what was not measured."""
  rows = _rows(results)
  base = rows['base forward']
  speed = []
  for v in results['variants']:
    compile_s = v.get('trace_compile_s')
    jitted = compile_s is not None
    speed.append([
        v['name'], f'{v["median_ms"]:.1f}',
        f'{v["p25_ms"]:.1f}-{v["p75_ms"]:.1f}',
        f'{v["median_ms"] / base["median_ms"]:.3f}',
        f'{v["cpu_median_ms"]:.1f}',
        f'{v["cpu_median_ms"] / base["cpu_median_ms"]:.3f}',
        f'{v["flops"] / 1e9:.2f}' if jitted else '-',
        f'{v["bytes_accessed"] / 1e6:.0f}' if jitted else '-',
        f'{compile_s:.2f}' if jitted else '-',
        f'{compile_s / base["trace_compile_s"]:.2f}' if jitted else '-'])
  c, m = results['config'], results['machine']
  parts = [
      f'model: {c["params"] / 1e6:.2f}M params, {c["layers"]} layers, '
      f'd_model {c["d_model"]}, batch {c["batch"]}x{c["seq"]}, '
      f'LoRA rank {c["rank"]}',
      f'machine: {m["cpu"]}, {m["cpus_visible"]} CPUs, jax {m["jax"]} '
      f'({m["backend"]}); load average before/after '
      f'{results["load_average_before"][0]:.1f}/'
      f'{results["load_average_after"][0]:.1f}',
      '',
      _table(['variant', 'wall ms', 'p25-p75', 'x base', 'cpu ms',
              'x base cpu', 'GFLOP', 'MB accessed', 'compile s',
              'x base compile'], speed),
      '',
      _table(['target', 'measured', 'cpu-time ratio', 'limit', 'met'], [
          [t['target'],
           '-' if t['measured'] is None else f'{t["measured"]:.3f}',
           '-' if t['cpu_measured'] is None else f'{t["cpu_measured"]:.3f}',
           t['limit'],
           {True: 'yes', False: 'NO', None: 'not measured'}[t['met']]]
          for t in results['targets']]),
  ]
  mem = results['memory']
  if mem:
    mem_rows = []
    for mode, runs in mem.items():
      for r in runs:
        mem_rows.append([
            mode, _mib(r['train_bytes']), _mib(r['child_ru_maxrss_bytes']),
            _mib(r['rss_before_train_bytes']), _mib(r['xla']['peak_bytes']),
            f'{r["trainable_params"]:,}'])
    parts += ['', _table(['memory', 'training MiB (VmHWM - RSS before)',
                          'process peak MiB (ru_maxrss)',
                          'RSS before MiB', 'XLA step buffers MiB',
                          'trainable params'], mem_rows)]
  for name, why in results['skipped'].items():
    parts.append(f'not measured: {name}: {why}')
  return '\n'.join(parts)


def chart(results: dict[str, Any], path: pathlib.Path) -> str:
  """Writes a PNG of the time and compile ratios; returns what it did."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use('Agg')
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return (f'chart: not written ({path}); matplotlib is not installed. '
            'pip install matplotlib to get it.')
  rows = [v for v in results['variants']
          if not v['name'].startswith(('fuse (', 'fuse,', 'copy'))]
  base = _rows(results)['base forward']
  names = [v['name'] for v in rows]
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.4 * len(rows) + 1.5),
                                    sharey=True)
  left.barh(names, [v['median_ms'] / base['median_ms'] for v in rows],
            color='tab:blue')
  left.axvline(1.0, color='black', linewidth=0.8)
  left.set_xlabel('median time / base forward (same run)')
  right.barh(names, [v.get('trace_compile_s', 0.0) for v in rows],
             color='tab:orange')
  right.set_xlabel('trace + compile (s)')
  left.invert_yaxis()
  c = results['config']
  fig.suptitle(f'{c["params"] / 1e6:.1f}M-param decoder, batch '
               f'{c["batch"]}x{c["seq"]}, {results["machine"]["cpu"]}',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return f'chart: {path} (matplotlib {matplotlib.__version__})'


def main(argv: list[str]) -> None:
  if len(argv) != 1:
    raise SystemExit('usage: python -m benchmarks.report DIR (the --out of '
                     'a benchmarks.run)')
  out = pathlib.Path(argv[0])
  results = json.loads((out / 'results.json').read_text())
  # Judge the targets afresh, so a change to them applies to old runs too.
  results['targets'] = targets(results, rank=results['config']['rank'])
  print(render(results))
  print(chart(results, out / 'results.png'))


if __name__ == '__main__':
  main(sys.argv[1:])
