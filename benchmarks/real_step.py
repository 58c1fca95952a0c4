"""Our LoRA training step against HF PEFT + torch's, on real SmolLM2-135M.

Both sides train the same weights (SmolLM2-135M-Instruct from
`peft.models.load_smollm2`; the torch side reads them from a Hugging Face
directory written once per run) on the same random tokens: LoRA (Hu et
al. 2021) rank 8, alpha 16 on all seven projections, AdamW at 1e-4, mean
next-token cross-entropy, batch 4 x seq 128, on CPU. Our side also runs a
sweep: float32 / bfloat16 compute x remat (gradient checkpointing) off /
on x seq 128, 512, 1024.

Every measurement is one fresh child process (`jax_lora_step.py` in our
venv, `torch_lora_step.py` in `.venv-torch`); its peak RSS comes from
`os.wait4`. Rounds alternate the variants, each round starting from a
different one, so drift of a shared machine hits all alike; medians over
rounds are reported, with ratios against baselines of the same run.

  make bench-torch-venv   # once: torch, transformers, HF peft
  .venv/bin/python -m benchmarks.real_step [--rounds 2] [--out out/real_step]
  .venv/bin/python -m benchmarks.real_step --quick   # tiny model, smoke test

Writes `results.json` under `--out`: every child's record, the medians
and the ratios.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks import procstats

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_VENV = '.venv-torch'
SEQS = (128, 512, 1024)
QUICK_SEQ = 16
# The head-to-head workload, the same on both sides.
BASE_SEQ, BASE_BATCH = 128, 4
# Seq 1024 at batch 4 needs about 20 GB for our float32 step without remat
# (XLA's estimate), too close to this 24 GB machine's memory beside other
# work; batch 1 keeps it at a quarter.
LONG_BATCH = 1
SHORT = {'float32': 'f32', 'bfloat16': 'bf16'}
# The targets: a ratio meets its target when it is <= the bound.
# Remat's targets apply at seq REMAT_SEQ (a cut of >= 40% in memory for
# <= 35% more step time).
STEP_VS_TORCH, RSS_VS_TORCH = 0.8, 1.0
REMAT_MEMORY, REMAT_STEP, REMAT_SEQ = 0.6, 1.35, 1024
BF16_STEP = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
  """One measured configuration.

  Attributes:
    side: 'jax' (ours) or 'torch' (HF PEFT).
    dtype: compute dtype, 'float32' or 'bfloat16'.
    remat: gradient checkpointing of each block (ours only).
    seq: tokens each row feeds the model.
    batch: rows per step.
    every_round: part of the head-to-head, measured in every round;
      otherwise only in the first `--sweep-rounds` rounds.
    threads: torch's intra-op threads; None is torch's default.
    scan: `--scan-layers`, the blocks as one loop (ours only).
  """

  side: str
  dtype: str = 'float32'
  remat: bool = False
  seq: int
  batch: int
  every_round: bool = False
  threads: int | None = None
  scan: bool = False

  @property
  def name(self) -> str:
    threads = f' t{self.threads}' if self.threads else ''
    return (f'{self.side} {SHORT[self.dtype]} '
            f'{"remat" if self.remat else "plain"} s{self.seq} b{self.batch}'
            f'{threads}{" scan" if self.scan else ""}')

  def argv(self, *, hf_dir: str | None, steps: int,
           quick: bool) -> list[str]:
    """The child's command line."""
    sizes = [f'--seq={self.seq}', f'--batch={self.batch}', f'--steps={steps}']
    if self.side == 'torch':
      threads = [f'--threads={self.threads}'] if self.threads else []
      return [str(ROOT / TORCH_VENV / 'bin' / 'python'), '-m',
              'benchmarks.torch_lora_step', f'--hf-dir={hf_dir}', *sizes,
              *threads]
    extra = (['--remat'] * self.remat + ['--scan-layers'] * self.scan +
             ['--quick'] * quick)
    return [sys.executable, '-m', 'benchmarks.jax_lora_step',
            f'--dtype={self.dtype}', *sizes, *extra]


def variants(*, quick: bool, torch: bool, long_batch: int = LONG_BATCH,
             torch_threads: Sequence[int] = (),
             seqs: Sequence[int] = SEQS) -> list[Variant]:
  """Torch and ours at the head-to-head workload, then our sweep.

  Torch runs with its default threads and once more for each of
  `torch_threads`. Ours at float32, no remat, seq 128 is both the
  head-to-head and the sweep's baseline, so it is measured once per round.
  Seq 1024 runs at `long_batch` rows; `seqs` are the sweep's lengths.
  """
  seqs = (QUICK_SEQ,) if quick else tuple(seqs)
  base_seq = QUICK_SEQ if quick else BASE_SEQ
  out = [Variant(side='torch', seq=base_seq, batch=BASE_BATCH,
                 every_round=True, threads=t)
         for t in (None, *torch_threads)] if torch else []
  out.append(Variant(side='jax', seq=base_seq, batch=BASE_BATCH,
                     every_round=True))
  out.append(Variant(side='jax', seq=base_seq, batch=BASE_BATCH,
                     every_round=True, scan=True))
  for seq in seqs:
    batch = long_batch if seq == 1024 else BASE_BATCH
    for dtype in ('float32', 'bfloat16'):
      for remat in (False, True):
        v = Variant(side='jax', dtype=dtype, remat=remat, seq=seq,
                    batch=batch)
        if (dtype, remat, seq) != ('float32', False, base_seq):
          out.append(v)
  return out


def torch_python(*, quick: bool, root: pathlib.Path = ROOT) -> bool:
  """Whether the torch side can run; without `quick` it must.

  Raises:
    SystemExit: `.venv-torch` is missing and `quick` is False.
  """
  if (root / TORCH_VENV / 'bin' / 'python').exists():
    return True
  if quick:
    print(f'note: {TORCH_VENV} is missing, so --quick skips the torch side '
          '(`make bench-torch-venv` installs it).')
    return False
  raise SystemExit(
      f'benchmarks/real_step.py needs {root / TORCH_VENV}/bin/python (torch '
      'and Hugging Face peft) for its torch side; it is missing. Run `make '
      'bench-torch-venv` first, or pass --quick to skip the torch side.')


def _median_field(records: Sequence[dict[str, Any]], *keys: str) -> float:
  values = []
  for r in records:
    for k in keys:
      r = r[k]
    values.append(r)
  return float(statistics.median(values))


def summarize(vs: Sequence[Variant],
              records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per variant: medians over its rounds of each figure."""
  rows = []
  for v in vs:
    mine = [r for r in records if r['variant'] == v.name]
    if not mine:
      continue
    row = {**dataclasses.asdict(v), 'name': v.name, 'rounds': len(mine)}
    for key in ('first_step_s', 'median_step_s', 'peak_rss_bytes',
                'train_peak_bytes', 'train_added_bytes', 'first_loss',
                'wall_s'):
      row[key] = _median_field(mine, key)
    row['xla_peak_bytes'] = (_median_field(mine, 'xla', 'peak_bytes')
                             if 'xla' in mine[0] else None)
    rows.append(row)
  return rows


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The issue's ratios, each against a baseline row of the same run.

  Args:
    rows: `summarize`'s rows (keys `side`, `dtype`, `remat`, `seq` and the
      figures). A ratio whose rows are missing is left out.

  Returns:
    Dicts of `name`, `value`, `target` (the bound, or None) and `met`
    (`value <= target`, or None without a target).

  Example:
    >>> row = lambda side, step: {'side': side, 'dtype': 'float32',
    ...     'remat': False, 'seq': 128, 'median_step_s': step,
    ...     'peak_rss_bytes': 1, 'first_step_s': 1}
    >>> r = ratios([row('torch', 2.0), row('jax', 1.0)])[0]
    >>> r['name'], r['value'], r['met']
    ('ours/torch step time (f32 s128)', 0.5, True)
  """
  def find(side, dtype, remat, seq, threads=None, scan=False):
    for row in rows:
      if (row['side'], row['dtype'], row['remat'], row['seq'],
          row.get('threads'), row.get('scan', False)) == (
              side, dtype, remat, seq, threads, scan):
        return row
    return None

  out = []

  def add(name, num, den, key, target=None):
    if num is None or den is None or not den[key]:
      return
    value = num[key] / den[key]
    out.append({'name': name, 'value': value, 'target': target,
                'met': None if target is None else value <= target})

  seqs = sorted({row['seq'] for row in rows})
  for row in rows:
    if row['side'] != 'torch':
      continue
    seq, threads = row['seq'], row.get('threads')
    ours = find('jax', 'float32', False, seq)
    tag = f'(f32 s{seq}{f" torch t{threads}" if threads else ""})'
    add(f'ours/torch step time {tag}', ours, row, 'median_step_s',
        STEP_VS_TORCH)
    add(f'ours/torch peak RSS {tag}', ours, row, 'peak_rss_bytes',
        RSS_VS_TORCH)
    add(f'ours/torch first step {tag}', ours, row, 'first_step_s')
  for dtype in ('float32', 'bfloat16'):
    for seq in seqs:
      on, off = find('jax', dtype, True, seq), find('jax', dtype, False, seq)
      long = seq == REMAT_SEQ
      tag = f'({SHORT[dtype]} s{seq})'
      add(f'remat/plain peak RSS during steps {tag}', on, off,
          'train_peak_bytes', REMAT_MEMORY if long else None)
      add(f'remat/plain XLA peak bytes {tag}', on, off, 'xla_peak_bytes')
      add(f'remat/plain step time {tag}', on, off, 'median_step_s',
          REMAT_STEP if long else None)
  for seq in seqs:
    scan, plain = (find('jax', 'float32', False, seq, scan=True),
                   find('jax', 'float32', False, seq))
    for figure, key in (('step time', 'median_step_s'),
                        ('first step', 'first_step_s'),
                        ('peak RSS', 'peak_rss_bytes')):
      add(f'scan/plain {figure} (f32 s{seq})', scan, plain, key)
  for remat in (False, True):
    for seq in seqs:
      bf16, f32 = find('jax', 'bfloat16', remat, seq), find(
          'jax', 'float32', remat, seq)
      add(f'bf16/f32 step time ({"remat" if remat else "plain"} s{seq})',
          bf16, f32, 'median_step_s', BF16_STEP)
  return out


def _mib(x: float | None) -> str:
  return '-' if x is None else f'{x / 2**20:.0f}'


def format_report(rows: Sequence[dict[str, Any]],
                  rats: Sequence[dict[str, Any]]) -> str:
  """The table of medians and the ratios, as text."""
  head = (f'{"variant":<26}{"n":>3}{"first s":>9}{"step s":>9}'
          f'{"RSS MiB":>9}{"steps MiB":>10}{"added":>7}{"XLA MiB":>9}'
          f'{"loss0":>8}')
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(
        f'{r["name"]:<26}{r["rounds"]:>3}{r["first_step_s"]:>9.2f}'
        f'{r["median_step_s"]:>9.3f}{_mib(r["peak_rss_bytes"]):>9}'
        f'{_mib(r["train_peak_bytes"]):>10}'
        f'{_mib(r["train_added_bytes"]):>7}'
        f'{_mib(r["xla_peak_bytes"]):>9}{r["first_loss"]:>8.4f}')
  lines += ['', 'ratios (target: met when <= the bound)']
  for r in rats:
    target = ('' if r['target'] is None else
              f'  target <= {r["target"]:.2f}: '
              f'{"met" if r["met"] else "NOT met"}')
    lines.append(f'  {r["name"]:<46}{r["value"]:>7.3f}{target}')
  return '\n'.join(lines)


def machine() -> dict[str, Any]:
  cpu = platform.machine()
  with open('/proc/cpuinfo') as f:
    names = [line.split(':', 1)[1].strip() for line in f
             if line.startswith('model name')]
  return {'cpu': names[0] if names else cpu,
          'cpus_visible': len(os.sched_getaffinity(0)),
          'python': platform.python_version(),
          'platform': platform.platform(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'loadavg_start': os.getloadavg()}


def run(vs: Sequence[Variant], *, rounds: int, sweep_rounds: int,
        steps: int, quick: bool, hf_dir: str | None,
        on_record: Callable[[list[dict[str, Any]]], None] = lambda r: None
        ) -> list[dict[str, Any]]:
  """Runs every variant's children in alternating rounds; their records.

  `on_record` gets the records so far after each child (a long run then
  leaves its results behind even if it is stopped).
  """
  records = []
  for rnd in range(max(rounds, sweep_rounds)):
    todo = [v for v in vs
            if rnd < (rounds if v.every_round else sweep_rounds)]
    shift = rnd % len(todo)
    for v in todo[shift:] + todo[:shift]:  # A different first each round.
      load = os.getloadavg()
      result = procstats.run_child(
          v.argv(hf_dir=hf_dir, steps=steps, quick=quick), cwd=str(ROOT))
      records.append({'variant': v.name, 'round': rnd,
                      'loadavg_before': load, **result})
      print(f'round {rnd + 1} {v.name}: first {result["first_step_s"]:.2f} '
            f's, step {result["median_step_s"]:.3f} s, peak RSS '
            f'{_mib(result["peak_rss_bytes"])} MiB', flush=True)
      on_record(records)
  return records


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help=f'the tiny random model at seq {QUICK_SEQ}, one '
                      'round; skips torch if .venv-torch is missing')
  parser.add_argument('--rounds', type=int, default=None,
                      help='rounds of the head-to-head (default 2, quick 1)')
  parser.add_argument('--sweep-rounds', type=int, default=None,
                      help='rounds of our sweep (default: --rounds)')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps after the first (default 5, quick 2)')
  parser.add_argument('--seqs', type=int, nargs='+', default=list(SEQS),
                      help='sequence lengths of our sweep')
  parser.add_argument('--long-batch', type=int, default=LONG_BATCH,
                      help='batch of the seq 1024 runs')
  parser.add_argument('--torch-threads', type=int, nargs='*', default=[],
                      help="torch thread counts to run besides torch's "
                      'default, e.g. 1 (OpenMP suffers on a loaded machine)')
  parser.add_argument('--out', default='out/real_step')
  args = parser.parse_args(argv)
  rounds = args.rounds or (1 if args.quick else 2)
  sweep_rounds = args.sweep_rounds or rounds
  steps = args.steps or (2 if args.quick else 5)
  with_torch = torch_python(quick=args.quick)
  vs = variants(quick=args.quick, torch=with_torch,
                long_batch=args.long_batch, torch_threads=args.torch_threads,
                seqs=args.seqs)
  info = machine()
  settings = {'rounds': rounds, 'sweep_rounds': sweep_rounds,
              'steps': steps, 'quick': args.quick,
              'long_batch': args.long_batch, 'seqs': args.seqs,
              'torch': with_torch,
              'torch_threads': args.torch_threads}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  def write(records, *, done=False):
    rows = summarize(vs, records)
    info['loadavg_end'] = os.getloadavg()
    (out / 'results.json').write_text(json.dumps(
        {'machine': info, 'settings': settings, 'complete': done,
         'records': records, 'summary': rows, 'ratios': ratios(rows)},
        indent=2))
    return rows

  with tempfile.TemporaryDirectory(prefix='real_step_hf_') as tmp:
    hf_dir = None
    if with_torch:  # Written by a child: this process stays small.
      hf_dir = str(pathlib.Path(tmp) / 'hf')
      subprocess.run([sys.executable, '-m', 'benchmarks.jax_lora_step',
                      f'--write-hf={hf_dir}', *['--quick'] * args.quick],
                     cwd=ROOT, check=True)
    records = run(vs, rounds=rounds, sweep_rounds=sweep_rounds, steps=steps,
                  quick=args.quick, hf_dir=hf_dir, on_record=write)
  rows = write(records, done=True)
  print()
  print(format_report(rows, ratios(rows)))
  print(f'\nwrote {out / "results.json"}')

if __name__ == '__main__':
  main()
