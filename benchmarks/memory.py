"""Peak memory of training steps, measured in this (child) process.

`run.py` starts this module once per mode in a fresh process and reads the
child's `ru_maxrss` from `os.wait4`. The child also reports what the OS
says training itself added: it compiles the step ahead of time from shapes
(no params exist yet), resets the kernel's peak-RSS mark
(`/proc/self/clear_refs`, Linux), creates the params and optimizer state,
runs the steps and reads the new peak (`VmHWM`). So compile-time memory,
which can exceed the training state of a small model, is kept apart.

Modes: `lora`, `full` fine-tuning, QLoRA over an int base, and
`frozen-backprop`, which trains one first-layer norm scale: a backward pass
through the whole frozen model with no adapters, the floor under LoRA's.

  python -m benchmarks.memory --mode lora   # one JSON line on stdout
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import resource
import sys

import jax
import optax

from benchmarks import model as model_lib
from benchmarks import procstats
from benchmarks import steps as steps_lib
import peft

MODES = ('lora', 'full', 'frozen-backprop')
QLORA_MODES = ('qlora-int8', 'qlora-int4')


def add_size_flags(parser: argparse.ArgumentParser) -> None:
  """Flags for every `model.Config` field, plus batch, seq and rank."""
  for field in dataclasses.fields(model_lib.Config):
    parser.add_argument(f'--{field.name.replace("_", "-")}', type=int,
                        default=field.default, dest=field.name)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--rank', type=int, default=8,
                      help='LoRA rank of the training steps')


def config_from(args: argparse.Namespace) -> model_lib.Config:
  return model_lib.Config(**{f.name: getattr(args, f.name)
                             for f in dataclasses.fields(model_lib.Config)})


def xla_bytes(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled program, with its peak."""
  stats = compiled.memory_analysis()
  names = ('argument_size_in_bytes', 'output_size_in_bytes',
           'alias_size_in_bytes', 'temp_size_in_bytes')
  out = {n: int(getattr(stats, n)) for n in names}
  out['peak_bytes'] = (out['argument_size_in_bytes']
                       + out['output_size_in_bytes']
                       - out['alias_size_in_bytes']
                       + out['temp_size_in_bytes'])
  return out


def measure(mode: str, config: model_lib.Config, *, batch: int, seq: int,
            rank: int, steps: int) -> dict[str, object]:
  """Runs `steps` training steps of `mode`; returns the memory figures."""
  decoder = model_lib.Decoder(config)
  tokens = model_lib.random_tokens(config, batch=batch, seq=seq)
  base_shapes = jax.eval_shape(decoder.init, jax.random.key(0),
                               tokens)['params']
  if mode == 'frozen-backprop':
    tx = optax.adam(steps_lib.LEARNING_RATE)
    step = steps_lib.make_first_norm_step(decoder, tx)
    trained_shapes = base_shapes['block0']['norm1']
    extra = (base_shapes, tokens)
  elif mode != 'full':
    context = None
    if mode.startswith('qlora-'):  # the base is stored quantized
      method = mode.removeprefix('qlora-')
      context = functools.partial(peft.quantized, method)
      base_shapes = jax.eval_shape(functools.partial(
          steps_lib.quantize_base, decoder, tokens=tokens, method=method),
                                   base_shapes)
    lora = steps_lib.init_lora(decoder, tokens, rank=rank, context=context)
    tx = steps_lib.adapter_optimizer()
    step = steps_lib.make_lora_step(decoder, lora.surgery, tx, context)
    trained_shapes = jax.eval_shape(lambda: lora.adapters)
    extra = (base_shapes, tokens)
  else:
    tx = optax.adam(steps_lib.LEARNING_RATE)
    step = steps_lib.make_full_step(decoder, tx)
    trained_shapes = base_shapes
    extra = (tokens,)
  # Compile everything before any param exists.
  init_opt = jax.jit(tx.init).lower(trained_shapes).compile()
  opt_shapes = jax.eval_shape(tx.init, trained_shapes)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      trained_shapes, opt_shapes, *extra).compile()
  gc.collect()
  rss_before_kib = procstats.status_kib('VmRSS')
  procstats.reset_peak()

  base = model_lib.random_like(base_shapes, seed=0, scale=1.0)
  if mode != 'full':
    trained = model_lib.random_like(trained_shapes, seed=1, scale=0.1)
    rest = (base, tokens)
  else:
    trained, rest = base, (tokens,)
  opt_state = init_opt(trained)
  for _ in range(steps):
    trained, opt_state, loss = compiled(trained, opt_state, *rest)
  loss = float(loss)
  peak_kib = procstats.status_kib('VmHWM')
  trainable = peft.count_params(trained)[1]
  total = config.param_count() + (0 if mode == 'full' else trainable)
  return {
      'mode': mode,
      'loss': loss,
      'rss_before_train_bytes': rss_before_kib * 1024,
      'peak_during_train_bytes': peak_kib * 1024,
      'train_bytes': (peak_kib - rss_before_kib) * 1024,
      'self_maxrss_bytes': resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss * 1024,
      'xla': xla_bytes(compiled),
      'trainable_params': trainable,
      'total_params': total,
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mode', choices=MODES + QLORA_MODES, required=True)
  parser.add_argument('--steps', type=int, default=3)
  add_size_flags(parser)
  args = parser.parse_args(argv)
  config = config_from(args)
  result = measure(args.mode, config, batch=args.batch, seq=args.seq,
                   rank=args.rank, steps=args.steps)
  json.dump(result, sys.stdout)
  sys.stdout.write('\n')
  sys.stdout.flush()


if __name__ == '__main__':
  main()
