"""Our side of `real_step.py`: LoRA training steps of SmolLM2-135M, timed.

One process per measurement: it loads SmolLM2-135M-Instruct
(`peft.models.load_smollm2`; with `--quick` the random tiny model), adds
LoRA (Hu et al. 2021) of rank 8, alpha 16 to all seven projections, and
runs AdamW steps on random tokens, as `python -m peft finetune`'s step
does (`peft/_cli/train.py`'s `step_fn`): the base is a separate, frozen
argument, gradients are taken with respect to the adapters only, and
`peft.train_only_adapters` wraps AdamW. The step is compiled ahead of
time; its trace and compile count toward the first step. It prints one
JSON line (`procstats.run_steps`'s fields, plus XLA's memory analysis).

  python -m benchmarks.jax_lora_step --seq 128 --batch 4 [--remat]
      [--scan-layers] [--dtype bfloat16] [--steps 5] [--quick]
  python -m benchmarks.jax_lora_step --write-hf DIR [--quick]

`--write-hf` writes the same weights as a Hugging Face checkpoint
directory (`peft.models.save_hf_dir`), which the torch side loads.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import memory
from benchmarks import procstats
import peft
from peft import models
from peft._cli import train
from peft._cli import xla_flags

RANK, ALPHA = 8, 16
# q_einsum, kv_einsum (k and v stacked) and attn_vec_einsum (o); the mlp's
# gating_einsum (gate and up stacked) and linear (down): HF's seven.
TARGETS = ('.*attn/.*', '.*mlp')
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.0  # The CLI's default; the torch side uses the same.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def pretrained(quick: bool) -> models.Pretrained:
  """SmolLM2-135M-Instruct, or with `quick` the tiny model (random, seed 0).

  Both are deterministic, so every child and the HF directory hold the
  same weights. The tiny one is drawn with numpy (`models.random_params`),
  as the CLI's `--tiny` is.
  """
  if not quick:
    return models.load_smollm2()
  config = models.tiny_config()
  return models.Pretrained(config=config, params=models.random_params(config))


def make_step(model: models.Decoder, surgery: peft.LoRASurgery,
              tx: optax.GradientTransformation):
  """`step(lora, opt_state, frozen, tokens) -> (lora, opt_state, loss)`.

  `tokens` is `(batch, seq + 1)`; the loss is the mean next-token
  cross-entropy of `tokens[:, 1:]` from `tokens[:, :-1]` (in float32).
  """
  def loss_fn(lora, frozen, tokens):
    with surgery:
      logits = model.apply({'params': train.model_params(model, frozen, lora)},
                           tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()

  def step(lora, opt_state, frozen, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, tokens)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss
  return jax.jit(step)


def optimizer() -> optax.GradientTransformation:
  """AdamW on the adapters alone, as the CLI builds it (and the torch side)."""
  return peft.train_only_adapters(
      optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY))


def init_adapters(model: models.Decoder, surgery: peft.LoRASurgery,
                  frozen: Any) -> Any:
  """Fresh adapters (B = 0) on `frozen`, as the CLI makes them: one call
  of the model under the surgery, creating only the missing params."""
  def init(frozen):
    _, variables = model.apply(
        {'params': frozen}, jnp.zeros((1, 1), jnp.int32),
        mutable=['params'], rngs={'params': jax.random.key(1)})
    return peft.split_params(variables['params']).lora
  with surgery:
    return jax.jit(init)(frozen)


def measure(*, quick: bool, seq: int, batch: int, dtype: str, remat: bool,
            steps: int, seed: int = 0,
            scan_layers: bool = False) -> dict[str, Any]:
  """Loads the model, compiles the step, runs `1 + steps` steps."""
  pre = pretrained(quick)
  config = pre.config
  frozen = train.in_dtype(pre.params, DTYPES[dtype])  # As the CLI casts.
  del pre  # The float32 copy goes before the steps (bfloat16 runs).
  model = models.Decoder(config=config, dtype=DTYPES[dtype], remat=remat)
  surgery = peft.lora(RANK, alpha=ALPHA, targets=TARGETS)
  lora = init_adapters(model, surgery, frozen)  # float32, like the CLI's.
  if scan_layers:  # The CLI's stacked base; the unrolled copy goes.
    frozen = train.scan_layout(config, frozen, lora)
    model = model.clone(scan_layers=True)
  tx = optimizer()
  opt_state = jax.jit(tx.init)(lora)
  rows = procstats.token_rows(config.vocab_size, batch=batch,
                              length=seq + 1, seed=seed)
  tokens = jnp.asarray(np.asarray(rows, np.int32))

  start = time.perf_counter()
  compiled = make_step(model, surgery, tx).lower(
      lora, opt_state, frozen, tokens).compile()
  compile_s = time.perf_counter() - start
  state = [lora, opt_state]
  del lora, opt_state

  def one_step() -> float:
    lora, opt_state, loss = jax.block_until_ready(
        compiled(*state, frozen, tokens))
    state[:] = [lora, opt_state]
    return float(loss)

  gc.collect()
  result = procstats.run_steps(one_step, steps, compile_s=compile_s)
  return {
      'side': 'jax', 'dtype': dtype, 'remat': remat, 'seq': seq,
      'scan_layers': scan_layers,
      'batch': batch, 'steps': steps, 'quick': quick,
      'compile_s': compile_s, **result,
      'xla': memory.xla_bytes(compiled),
      'adapter_params': peft.count_params(state[0])[0],
      'versions': {'jax': jax.__version__, 'flax': flax.__version__,
                   'optax': optax.__version__},
      'cpus': len(os.sched_getaffinity(0)),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='the random tiny model instead of SmolLM2-135M')
  parser.add_argument('--write-hf', metavar='DIR',
                      help='write the weights as an HF checkpoint and exit')
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--scan-layers', action='store_true')
  parser.add_argument('--steps', type=int, default=5,
                      help='timed steps after the first')
  args = parser.parse_args(argv)
  if args.write_hf:
    pre = pretrained(args.quick)
    models.save_hf_dir(args.write_hf, config=pre.config, params=pre.params,
                       tokenizer=pre.tokenizer)
    return
  procstats.emit(measure(quick=args.quick, seq=args.seq, batch=args.batch,
                         dtype=args.dtype, remat=args.remat,
                         steps=args.steps, scan_layers=args.scan_layers))


if __name__ == '__main__':
  xla_flags.apply()  # The CLI's XLA flags, before any JAX work.
  main()
