"""The XLA flags `python -m peft` runs with, unless the user sets them.

XLA:CPU's concurrency-optimized scheduler (on by default) orders a
program's work for parallelism. In a training step it starts every
block's recomputation and backward work early, so each block's attention
scores and MLP activations stay alive through the whole backward pass:
`--remat` then saves nothing, and the peak memory grows with depth. With
it off, SmolLM2-135M's LoRA step at batch 4 x 128 needs 1157 MiB of XLA
temporaries instead of 1552 (peak RSS 2379 MiB instead of 2749, below HF
PEFT + torch's 2451) for 2% more step time, and at 1 x 1024 with `--remat`
2522 MiB instead of 5457 (docs/benchmarks.md).

XLA reads `XLA_FLAGS` once, when JAX starts its backend, so `apply` runs
before any JAX work; a flag the user's `XLA_FLAGS` already names keeps the
user's value.
"""

from __future__ import annotations

from collections.abc import MutableMapping
import os
import re

DEFAULTS = {'xla_cpu_enable_concurrency_optimized_scheduler': 'false'}


def with_defaults(xla_flags: str) -> str:
  """`xla_flags` with each default it does not name appended.

  Example:
    >>> with_defaults('')
    '--xla_cpu_enable_concurrency_optimized_scheduler=false'
    >>> with_defaults('--xla_cpu_enable_concurrency_optimized_scheduler=true')
    '--xla_cpu_enable_concurrency_optimized_scheduler=true'
  """
  flags = xla_flags.split()
  for name, value in DEFAULTS.items():
    if not any(re.fullmatch(rf'--{name}(=.*)?', f) for f in flags):
      flags.append(f'--{name}={value}')
  return ' '.join(flags)


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds the defaults to `environ['XLA_FLAGS']` (before JAX starts)."""
  environ['XLA_FLAGS'] = with_defaults(environ.get('XLA_FLAGS', ''))
