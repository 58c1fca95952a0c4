"""`python -m peft demo`: the whole pipeline, as `make demo` runs it.

It runs, in one process (the base model loads once and compiles are
shared), exactly the commands it prints:

  finetune -> eval --compare -> sample --compare -> merge (with its check)

and ends with a recap: base vs fine-tuned held-out perplexity, and how
closely the merged plain model reproduces the adapted model's logits.
"""

from __future__ import annotations

import os
import shlex
import time
from typing import Any

from peft._cli import base as base_lib

OUTPUTS = ('adapters.safetensors', 'loss.png', 'merged')  # In --workdir.


def run(args: Any) -> dict[str, Any]:
  """Runs the demo pipeline; fails if fine-tuning did not help."""
  from peft._cli import parser as parser_lib  # pylint: disable=g-import-not-at-top

  started = time.perf_counter()
  for name in OUTPUTS:  # Checked now, not after fine-tuning.
    base_lib.output(args, name, directory=name == 'merged')
  model = (['--tiny'] if args.tiny else ['--hf-dir', args.hf_dir]
           if args.hf_dir else ['--gguf', args.gguf] if args.gguf
           else ['--model', args.model] if args.model else [])
  common = [*model, '--workdir', args.workdir]
  data = ['--max-plays', str(args.max_plays)] if args.max_plays else []
  adapters = os.path.join(args.workdir, OUTPUTS[0])
  pipeline = {
      'finetune': ['finetune', *common, *data, '--steps', str(args.steps)],
      'eval': ['eval', *common, *data, '--adapters', adapters, '--compare'],
      'sample': ['sample', *common, '--adapters', adapters, '--compare'],
      'merge': ['merge', *common, *data, '--adapters', adapters],
  }
  parser = parser_lib.build()
  results = {}
  for name, argv in pipeline.items():
    print(f'\n$ {parser_lib.PROG} {shlex.join(argv)}', flush=True)
    step_started = time.perf_counter()
    step_args = parser.parse_args(argv)
    results[name] = step_args.run(step_args)
    print(f'({name}: {time.perf_counter() - step_started:.0f} s)', flush=True)
  base_ppl = results['eval']['base']
  tuned_ppl = results['eval']['fine-tuned']
  seconds = time.perf_counter() - started
  print('\n=== demo recap ===')
  print(f'held-out perplexity: base {base_ppl:.2f} -> fine-tuned '
        f'{tuned_ppl:.2f} ({100 * (1 - tuned_ppl / base_ppl):.0f}% lower)')
  print(f'merged plain model vs adapted model: max |logit diff| '
        f'{results["merge"]["max_abs_diff"]:.2e}')
  print(f'outputs in {args.workdir}/: {", ".join(OUTPUTS)}/')
  print(f'wall time: {seconds:.0f} s')
  if not tuned_ppl < base_ppl:
    raise base_lib.CliError(
        f'fine-tuning did not lower the held-out perplexity ({base_ppl:.3f} '
        f'-> {tuned_ppl:.3f}). Pass more --steps.')
  return {**results, 'seconds': seconds}
