"""LoRA speed, compile time and memory, side by side, in one process.

Every variant (base forward, LoRA forwards at several ranks, the fused
forward, LoRA / full fine-tuning / QLoRA training steps, DoRA's forward,
step and fused forward, fuse against a plain copy, and the same LoRA
forward and step in gemma.peft and qwix when they are installed) is traced
and compiled ahead of time, warmed up, then timed in interleaved rounds
(each round runs every variant once, starting from a different one), so
drift of a shared machine hits all variants alike.
Reported: medians of wall time and of this process's CPU time, XLA's cost
analysis of each program, and ratios to the base forward of the same run.
Peak memory of LoRA, QLoRA and full fine-tuning comes from separate
processes (`benchmarks/memory.py`).

  python -m benchmarks.run --out docs/benchmarks   # the recorded run
  python -m benchmarks.run --quick                 # smoke test, tiny sizes

Writes `results.json` and (with matplotlib) `results.png` under `--out`;
`python -m benchmarks.report DIR` prints and draws them again.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import compare
from benchmarks import memory
from benchmarks import model as model_lib
from benchmarks import report
from benchmarks import steps as steps_lib
import peft

QUICK_SIZES = dict(vocab=256, d_model=64, layers=1, heads=4, kv_heads=2,
                   head_dim=16, ffn=128, batch=2, seq=16, rank=4, ranks=[4])


@dataclasses.dataclass
class Variant:
  """One timed function and its arguments.

  Attributes:
    name: the row name.
    make: returns a fresh Python function (so each compile is a cold one).
    args: the arguments; for training steps the first two (trained params,
      optimizer state) are donated and replaced by the step's outputs.
    step: whether it is a training step (donates and feeds back args 0, 1).
    jit: False runs `make()` eagerly (op by op), with no compile timing.
  """

  name: str
  make: Any
  args: tuple[Any, ...]
  step: bool = False
  jit: bool = True
  trace_s: list[float] = dataclasses.field(default_factory=list)
  compile_s: list[float] = dataclasses.field(default_factory=list)
  times_s: list[float] = dataclasses.field(default_factory=list)
  cpu_s: list[float] = dataclasses.field(default_factory=list)
  cost: dict[str, float] = dataclasses.field(default_factory=dict)
  _run: Any = None

  def __post_init__(self):
    if self.step:  # own copies: other variants share these buffers
      owned = jax.tree.map(lambda x: jnp.asarray(np.array(x)), self.args[:2])
      self.args = (*owned, *self.args[2:])

  def compile(self) -> None:
    fn = self.make()
    if not self.jit:
      self._run = fn
      return
    donate = (0, 1) if self.step else ()
    start = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).lower(*self.args)
    traced = time.perf_counter()
    self._run = lowered.compile()
    self.trace_s.append(traced - start)
    self.compile_s.append(time.perf_counter() - traced)
    cost = self._run.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    self.cost = {'flops': float(cost.get('flops', 0.0)),
                 'bytes_accessed': float(cost.get('bytes accessed', 0.0))}

  def call(self) -> None:
    """Runs once; records wall time and this process's CPU time."""
    cpu, start = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(self._run(*self.args))
    self.times_s.append(time.perf_counter() - start)
    self.cpu_s.append(time.process_time() - cpu)
    if self.step:
      self.args = (out[0], out[1], *self.args[2:])

  def output(self) -> Any:
    """One more call's result (forwards only: steps donate their args)."""
    return self._run(*self.args)

  def summary(self) -> dict[str, Any]:
    t = np.asarray(self.times_s) * 1e3
    out = {'name': self.name, 'median_ms': float(np.median(t)),
           'p25_ms': float(np.percentile(t, 25)),
           'p75_ms': float(np.percentile(t, 75)),
           'cpu_median_ms': 1e3 * statistics.median(self.cpu_s),
           'samples_ms': t.tolist(),
           'cpu_samples_ms': [1e3 * c for c in self.cpu_s], **self.cost}
    if self.trace_s:
      out['trace_s'] = statistics.median(self.trace_s)
      out['compile_s'] = statistics.median(self.compile_s)
      out['trace_compile_s'] = statistics.median(
          a + b for a, b in zip(self.trace_s, self.compile_s))
    return out


def _forward_variants(decoder, base, tokens, ranks, setups):
  forward = functools.partial(steps_lib.make_forward, decoder)
  out = [Variant('base forward', forward, (base, tokens))]
  for rank in ranks:
    s = setups[rank]
    out.append(Variant(
        f'LoRA forward r{rank}',
        functools.partial(steps_lib.make_lora_forward, decoder, s.surgery),
        (base, s.adapters, tokens)))
  return out


def _fuse_variants(params, specs):
  """Fuse under jit, eagerly, and a plain copy of the kernels it writes."""
  kernels = []
  for spec in specs:
    node = params
    for key in spec.path:
      node = node[key]
    kernels.append(node[spec.weight_name])

  def make_fuse():
    return lambda p: peft.fuse_params(p, specs)

  def make_copy():
    return lambda ks: [jnp.copy(k) for k in ks]

  return [Variant('fuse (jit)', make_fuse, (params,)),
          Variant('copy of fused kernels (jit)', make_copy, (kernels,)),
          Variant('fuse (eager)', make_fuse, (params,), jit=False)]


def _dora_variants(decoder, base, tokens, rank, tx):
  """DoRA's forward and step (same targets and rank as LoRA's), fused."""
  dora = steps_lib.init_lora(decoder, tokens, rank=rank, use_dora=True)
  fused = jax.jit(lambda p: peft.fuse_params(p, dora.specs))(
      peft.merge_params(base, dora.adapters))
  return [
      Variant(f'DoRA forward r{rank}', functools.partial(
          steps_lib.make_lora_forward, decoder, dora.surgery),
              (base, dora.adapters, tokens)),
      Variant(f'fused DoRA forward r{rank}',
              functools.partial(steps_lib.make_forward, decoder),
              (fused, tokens)),
      Variant(f'DoRA step r{rank}', functools.partial(
          steps_lib.make_lora_step, decoder, dora.surgery, tx),
              (dora.adapters, jax.jit(tx.init)(dora.adapters), base, tokens),
              step=True),
  ]


def _qlora_variants(decoder, base, tokens, rank, methods, skipped):
  """QLoRA's and QDoRA's steps over each quantized base."""
  kinds = (('QLoRA', False), ('QDoRA', True))
  problem = steps_lib.quantization_api()
  if problem:
    for method in methods:
      for kind, _ in kinds:
        skipped[f'{kind} step {method} r{rank}'] = problem
    return []
  out = []
  for method in methods:
    qbase = None
    for kind, use_dora in kinds:
      name = f'{kind} step {method} r{rank}'
      try:
        if qbase is None:
          qbase = jax.jit(functools.partial(
              steps_lib.quantize_base, decoder, tokens=tokens,
              method=method))(base)
        context = functools.partial(peft.quantized, method)
        setup = steps_lib.init_lora(decoder, tokens, rank=rank,
                                    context=context, use_dora=use_dora)
        tx = steps_lib.adapter_optimizer()
        out.append(Variant(name, functools.partial(
            steps_lib.make_lora_step, decoder, setup.surgery, tx, context),
            (setup.adapters, jax.jit(tx.init)(setup.adapters), qbase,
             tokens), step=True))
      except Exception as e:  # pylint: disable=broad-except
        skipped[name] = f'{type(e).__name__}: {e}'
  return out


def _library_variants(decoder, base, tokens, rank, libraries, skipped,
                      versions):
  out = []
  for name in libraries:
    try:
      lib = compare.LIBRARIES[name](decoder, tokens, rank=rank)
      # Build both functions once here, so a failure is caught now.
      jax.eval_shape(lib.make_forward(), base, lib.adapters, tokens)
      jax.eval_shape(lib.make_step(), lib.adapters, lib.opt_state, base,
                     tokens)
    except Exception as e:  # pylint: disable=broad-except
      skipped[f'{name} LoRA'] = f'{type(e).__name__}: {str(e)[:300]}'
      continue
    versions[name] = lib.version
    out.append(Variant(f'{name} forward r{rank}', lib.make_forward,
                       (base, lib.adapters, tokens)))
    out.append(Variant(f'{name} LoRA step r{rank}', lib.make_step,
                       (lib.adapters, lib.opt_state, base, tokens),
                       step=True))
  return out


def build_variants(args, config, skipped, versions):
  decoder = model_lib.Decoder(config)
  tokens = model_lib.random_tokens(config, batch=args.batch, seq=args.seq)
  base = steps_lib.init_base(decoder, tokens)
  count = peft.count_params(base)[1]
  if count != config.param_count():
    raise RuntimeError(
        f'The decoder has {count} params but Config.param_count() says '
        f'{config.param_count()}; fix benchmarks/model.py.'
    )
  ranks = sorted(set(args.ranks) | {args.rank})
  setups = {r: steps_lib.init_lora(decoder, tokens, rank=r) for r in ranks}
  main = setups[args.rank]
  merged = peft.merge_params(base, main.adapters)
  fused = jax.jit(lambda p: peft.fuse_params(p, main.specs))(merged)

  variants = _forward_variants(decoder, base, tokens, args.ranks, setups)
  variants.append(Variant(
      f'fused forward r{args.rank}',
      functools.partial(steps_lib.make_forward, decoder), (fused, tokens)))
  tx = steps_lib.adapter_optimizer()
  variants.append(Variant(
      f'LoRA step r{args.rank}',
      functools.partial(steps_lib.make_lora_step, decoder, main.surgery, tx),
      (main.adapters, jax.jit(tx.init)(main.adapters), base, tokens),
      step=True))
  variants.append(Variant(
      f'LoRA step r{args.rank}, whole-tree grads',
      functools.partial(steps_lib.make_lora_tree_step, decoder, main.surgery,
                        tx), (merged, jax.jit(tx.init)(merged), tokens),
      step=True))
  full_tx = optax.adam(steps_lib.LEARNING_RATE)
  variants.append(Variant(
      'full fine-tune step',
      functools.partial(steps_lib.make_full_step, decoder, full_tx),
      (base, jax.jit(full_tx.init)(base), tokens), step=True))
  variants += _dora_variants(decoder, base, tokens, args.rank, tx)
  variants += _qlora_variants(decoder, base, tokens, args.rank,
                              args.qlora_methods, skipped)
  variants += _library_variants(decoder, base, tokens, args.rank,
                                args.libraries, skipped, versions)
  variants += _fuse_variants(merged, main.specs)
  return variants, count


def check_fused(variants, rank: int) -> None:
  """The fused model must compute what the adapted one does."""
  rows = {v.name: v for v in variants}
  for kind in ('LoRA', 'DoRA'):
    adapted = rows[f'{kind} forward r{rank}'].output()
    fused = 'fused' if kind == 'LoRA' else 'fused DoRA'
    plain = rows[f'{fused} forward r{rank}'].output()
    err = float(jnp.max(jnp.abs(adapted - plain)))
    scale = float(jnp.max(jnp.abs(adapted)))
    if not err <= 1e-4 * max(scale, 1.0):
      raise RuntimeError(
          f'fused and adapted {kind} logits differ by {err} (max |logit| '
          f'{scale}); fuse_params is broken, not the benchmark.'
      )


def time_variants(variants, *, compiles: int, warmup: int,
                  rounds: int) -> None:
  """Compiles, warms up, then times the variants in interleaved rounds."""
  for _ in range(compiles):
    for v in variants:
      v.compile()
  for v in variants:
    for _ in range(warmup):
      v.call()
    v.times_s.clear()
    v.cpu_s.clear()
  n = len(variants)
  for r in range(rounds):
    for i in range(n):
      variants[(r + i) % n].call()


# Runs `python ARGS` in a grandchild forked from this tiny process and
# prints the grandchild's rusage. Linux carries a process's peak RSS across
# exec from the process that forked it, so a child forked straight from this
# (large) benchmark process would report our peak, not its own.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
  os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({'exit_code': os.waitstatus_to_exitcode(status),
                  'ru_maxrss_kib': usage.ru_maxrss}))
"""


def start_memory(args, config) -> list[tuple[str, subprocess.Popen]]:
  """Starts one child process per training mode (they run concurrently:
  memory is per process, only their speed suffers)."""
  sizes = [f'--{f.name.replace("_", "-")}={getattr(config, f.name)}'
           for f in dataclasses.fields(config)]
  sizes += [f'--batch={args.batch}', f'--seq={args.seq}',
            f'--rank={args.rank}']
  root = pathlib.Path(__file__).resolve().parent.parent
  modes = [*memory.MODES, *(f'qlora-{m}' for m in args.qlora_methods)]
  if steps_lib.quantization_api() or args.quick:
    modes = list(memory.MODES)
  return [(mode, subprocess.Popen(
      [sys.executable, '-c', _LAUNCHER, '-m', 'benchmarks.memory',
       f'--mode={mode}', *sizes], cwd=root, stdout=subprocess.PIPE,
      text=True)) for mode in modes]


def finish_memory(procs, results: dict[str, list[Any]]) -> None:
  """Waits for `start_memory`'s children; appends their figures."""
  for mode, proc in procs:
    lines = proc.communicate()[0].strip().splitlines()
    launcher = json.loads(lines[-1]) if lines else {}
    if proc.returncode or launcher.get('exit_code') != 0:
      raise RuntimeError(
          f'{" ".join(proc.args[3:])} failed ({launcher or proc.returncode})'
          '; run it alone (python -m benchmarks.memory ...) to see its '
          'traceback.'
      )
    result = json.loads(lines[-2])
    result['child_ru_maxrss_bytes'] = launcher['ru_maxrss_kib'] * 1024
    results.setdefault(mode, []).append(result)


def machine() -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f
               if line.startswith('model name')]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  return {'cpu': cpu, 'cpus_visible': len(os.sched_getaffinity(0)),
          'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__')
          else jax.__version__, 'backend': jax.default_backend(),
          'platform': platform.platform()}


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  memory.add_size_flags(parser)
  parser.add_argument('--ranks', type=int, nargs='+', default=[8, 16, 64],
                      help='ranks of the unfused LoRA forwards')
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--compiles', type=int, default=3,
                      help='cold trace+compile repeats per variant')
  parser.add_argument('--memory-runs', type=int, default=2,
                      help='child processes per training mode')
  parser.add_argument('--libraries', nargs='*', choices=list(compare.LIBRARIES),
                      help='other LoRA libraries to run (default: all; none '
                      'with --quick)')
  parser.add_argument('--qlora-methods', nargs='*', default=['int8', 'int4'],
                      help='base quantization methods of the QLoRA steps')
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes and few rounds: a smoke test')
  parser.add_argument('--out', type=pathlib.Path,
                      default=pathlib.Path('benchmarks/results'))
  args = parser.parse_args(argv)
  if args.quick:
    for key, value in QUICK_SIZES.items():
      setattr(args, key, value)
    args.rounds, args.warmup, args.compiles, args.memory_runs = 3, 1, 1, 1
    args.qlora_methods = args.qlora_methods[:1]
  if args.libraries is None:
    args.libraries = [] if args.quick else list(compare.LIBRARIES)
  if args.rounds < 3:
    parser.error(f'--rounds must be >= 3 for a median; got {args.rounds}.')
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  config = memory.config_from(args)
  # Donated opt-state buffers that XLA cannot reuse are expected here.
  warnings.filterwarnings('ignore', message='Some donated buffers')
  load_before = os.getloadavg()
  started = time.time()
  skipped: dict[str, str] = {}
  versions = {'peft': 'working tree', 'jax': jax.__version__}
  mem: dict[str, list[Any]] = {}
  # A smoke test overlaps the memory children with the timing; a real run
  # keeps them apart so they do not slow the timed variants.
  early = start_memory(args, config) if args.quick else None
  variants, count = build_variants(args, config, skipped, versions)
  time_variants(variants, compiles=args.compiles, warmup=args.warmup,
                rounds=args.rounds)
  check_fused(variants, args.rank)
  if early:
    finish_memory(early, mem)
  for _ in range(0 if early else args.memory_runs):
    finish_memory(start_memory(args, config), mem)
  results = {
      'command': ' '.join(['python -m benchmarks.run',
                           *(argv if argv is not None else sys.argv[1:])]),
      'machine': machine(),
      'versions': versions,
      'config': dataclasses.asdict(config) | {
          'batch': args.batch, 'seq': args.seq, 'rank': args.rank,
          'ranks': args.ranks, 'params': count},
      'settings': {'rounds': args.rounds, 'warmup': args.warmup,
                   'compiles': args.compiles,
                   'memory_runs': args.memory_runs},
      'load_average_before': load_before,
      'load_average_after': os.getloadavg(),
      'wall_s': time.time() - started,
      'variants': [v.summary() for v in variants],
      'skipped': skipped,
      'memory': mem,
  }
  results['targets'] = report.targets(results, rank=args.rank)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / 'results.json').write_text(json.dumps(results, indent=1))
  print(report.render(results))
  chart = report.chart(results, args.out / 'results.png')
  print(chart)
  return results


if __name__ == '__main__':
  main()
