"""Process-level measuring for benchmark children: peaks, timings, launch.

Standard library only: `torch_lora_step.py` imports it from `.venv-torch`,
which has neither jax nor this project installed, and `memory.py` and
`jax_lora_step.py` import it from the project's venv.

* In a child: `reset_peak` and `status_kib` read the kernel's peak-RSS
  mark (`VmHWM`, Linux procfs) around the training steps, `run_steps` times
  them, `emit` prints the one JSON line the parent reads.
* In the parent: `run_child` starts one fresh child process, reads its JSON
  line and its peak RSS (`ru_maxrss` from `os.wait4`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import ctypes
import ctypes.util
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


def status_kib(field: str) -> int:
  """A `VmRSS`/`VmHWM`-style line of /proc/self/status, in KiB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise RuntimeError(
      f'/proc/self/status has no {field!r} line; the memory benchmarks need '
      'Linux procfs. Run them on Linux.'
  )


def reset_peak() -> None:
  """Resets `VmHWM` (the peak RSS) to the current RSS."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def trim_heap() -> None:
  """Collects garbage and hands freed heap pages back to the OS (glibc).

  Without it, memory freed after loading or compiling stays resident and
  would count as the training steps' own.
  """
  gc.collect()
  name = ctypes.util.find_library('c')
  libc = ctypes.CDLL(name) if name else None
  if libc is not None and hasattr(libc, 'malloc_trim'):
    libc.malloc_trim(0)


def token_rows(vocab: int, *, batch: int, length: int,
               seed: int = 0) -> list[list[int]]:
  """`batch` rows of `length` token ids, the same in every interpreter.

  Python's own RNG (not numpy's or a framework's), so both sides of a
  comparison train on the same tokens.

  Example:
    >>> rows = token_rows(100, batch=2, length=3)
    >>> len(rows), len(rows[0]), rows == token_rows(100, batch=2, length=3)
    (2, 3, True)
  """
  rng = random.Random(seed)
  return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def run_steps(step: Callable[[], float], steps: int, *,
              compile_s: float = 0.0) -> dict[str, Any]:
  """Runs `1 + steps` training steps; returns their times and memory.

  The heap is trimmed and the peak-RSS mark reset first, so the memory
  figures cover the steps only: weights loaded and programs compiled before
  the call are resident, their transient peaks are not counted.

  Args:
    step: runs one step to completion and returns its loss.
    steps: the timed steps after the first.
    compile_s: set-up seconds of the first step spent before this call
      (JAX's trace and compile); added to `first_step_s`.

  Returns:
    `first_step_s` (compile and first run), `median_step_s` and `step_s`
    (the later steps), the first and last losses, and `rss_before_bytes`,
    `train_peak_bytes` (peak RSS during the steps) and `train_added_bytes`
    (the difference).
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1; got {steps!r}. Time at least '
                     'one step after the first.')
  trim_heap()
  rss_before = status_kib('VmRSS')
  reset_peak()
  start = time.perf_counter()
  first_loss = step()
  first_run_s = time.perf_counter() - start
  times, loss = [], first_loss
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  peak = status_kib('VmHWM')
  return {
      'first_step_s': compile_s + first_run_s,
      'first_run_s': first_run_s,
      'median_step_s': statistics.median(times),
      'step_s': times,
      'first_loss': first_loss,
      'last_loss': loss,
      'rss_before_bytes': rss_before * 1024,
      'train_peak_bytes': peak * 1024,
      'train_added_bytes': (peak - rss_before) * 1024,
  }


def emit(result: dict[str, Any]) -> None:
  """Prints `result` as the child's one JSON line (the last on stdout)."""
  sys.stdout.write(json.dumps(result) + '\n')
  sys.stdout.flush()


def run_child(argv: Sequence[str], *, cwd: str | None = None
              ) -> dict[str, Any]:
  """Runs `argv` as a fresh process; returns its JSON line plus its peak.

  `os.wait4` gives the child's own `ru_maxrss` (this process's and other
  children's peaks are not mixed in, as `RUSAGE_CHILDREN` would). stderr
  goes to a temporary file, shown only when the child fails.

  Returns:
    The child's last stdout line, parsed, with `peak_rss_bytes` and
    `wall_s` (the whole process: start, load, compile, steps) added.

  Raises:
    RuntimeError: the child exited non-zero or printed no JSON line; the
      message holds the command and the end of its stderr.
  """
  start = time.perf_counter()
  with tempfile.TemporaryFile('w+') as err:
    proc = subprocess.Popen(list(argv), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=err, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen won't wait.
    err.seek(0)
    tail = err.read()[-4000:]
  lines = out.strip().splitlines()
  try:
    if proc.returncode:
      raise ValueError
    result = json.loads(lines[-1])
  except (ValueError, IndexError):
    raise RuntimeError(
        f'benchmark child {" ".join(argv)!r} exited with '
        f'{proc.returncode} and no JSON line; its stderr ends:\n{tail}\n'
        'Run that command by hand to see the whole error.') from None
  result['peak_rss_bytes'] = usage.ru_maxrss * 1024
  result['wall_s'] = time.perf_counter() - start
  return result
