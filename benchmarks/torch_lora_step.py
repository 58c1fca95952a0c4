"""The torch side of `real_step.py`: HF PEFT LoRA training steps, timed.

Runs in `.venv-torch` (`make bench-torch-venv`: torch, transformers, HF
peft, numpy; neither jax nor this project), so it imports only those and
the standard-library `benchmarks.procstats`. It loads the checkpoint
directory that `jax_lora_step.py --write-hf` wrote, in float32, adds LoRA
(Hu et al. 2021) of rank 8, alpha 16 to the seven projections with
`peft.get_peft_model`, and runs `torch.optim.AdamW` steps on the same
random tokens as our side, with the same loss. Threads are torch's
default unless `--threads` is given (both reported). It prints one JSON
line (`procstats.run_steps`'s fields).

  .venv-torch/bin/python -m benchmarks.torch_lora_step --hf-dir DIR \\
      --seq 128 --batch 4 [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from benchmarks import procstats

TARGET_MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
                  'up_proj', 'down_proj']
RANK, ALPHA = 8, 16
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.0  # As our side (the CLI's default).


def _drop_repo_from_path() -> None:
  """Makes `import peft` find Hugging Face's, not this repo's `peft/`.

  `python -m` puts the working directory (the repo root) first on
  `sys.path`; `benchmarks` is already imported, so nothing else is needed
  from there.
  """
  here = os.path.abspath(os.getcwd())
  sys.path[:] = [p for p in sys.path
                 if os.path.abspath(p or os.curdir) != here]


def measure(hf_dir: str, *, seq: int, batch: int, steps: int,
            threads: int | None = None, seed: int = 0) -> dict[str, Any]:
  """Loads the model, adds LoRA, runs `1 + steps` AdamW steps.

  `threads` sets `torch.set_num_threads`; None keeps torch's default.
  """
  _drop_repo_from_path()
  # Imported here, after the repo left sys.path (ruff files HF's peft as
  # first party, under its name).
  # pylint: disable=g-import-not-at-top
  import torch
  import torch.nn.functional as F
  import transformers

  import peft as hf_peft

  if threads:
    torch.set_num_threads(threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=torch.float32)
  model = hf_peft.get_peft_model(model, hf_peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES,
      lora_dropout=0.0))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE,
                          weight_decay=WEIGHT_DECAY)
  vocab = model.config.vocab_size
  tokens = torch.tensor(procstats.token_rows(vocab, batch=batch,
                                             length=seq + 1, seed=seed))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def one_step() -> float:
    opt.zero_grad(set_to_none=True)
    # No KV cache: a training forward never reads one back.
    logits = model(input_ids=inputs, use_cache=False).logits
    loss = F.cross_entropy(logits.float().reshape(-1, vocab),
                           targets.reshape(-1))
    loss.backward()
    opt.step()
    return loss.item()

  result = procstats.run_steps(one_step, steps)
  return {
      'side': 'torch', 'dtype': 'float32', 'remat': False, 'seq': seq,
      'batch': batch, 'steps': steps, 'threads': threads, **result,
      'adapter_params': sum(p.numel() for p in trainable),
      'versions': {'torch': torch.__version__,
                   'transformers': transformers.__version__,
                   'peft': hf_peft.__version__},
      'torch_threads': torch.get_num_threads(),
      'torch_interop_threads': torch.get_num_interop_threads(),
      'attn_implementation': model.config._attn_implementation,
      'cpus': len(os.sched_getaffinity(0)),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--hf-dir', required=True,
                      help='the checkpoint `jax_lora_step --write-hf` wrote')
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--steps', type=int, default=5,
                      help='timed steps after the first')
  parser.add_argument('--threads', type=int, default=None,
                      help="torch's intra-op threads (default: torch's)")
  args = parser.parse_args(argv)
  procstats.emit(measure(args.hf_dir, seq=args.seq, batch=args.batch,
                         steps=args.steps, threads=args.threads))


if __name__ == '__main__':
  main()
