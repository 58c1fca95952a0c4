"""`eval`, `sample` and `summary`: use a base, adapted or merged model.

`eval` and `sample` run one model: the base (default), the base with an
adapter file (`--adapters`), or a merged model (`--merged`). `--compare`
also runs the base beside it. Beside an adapter file, the base runs through
the same compiled adapted model with every B set to zero, which the surgery
guarantees equals the unmodified model (for QLoRA: the quantized base);
that saves one compile of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import peft
from peft import models
from peft._cli import adapt
from peft._cli import base as base_lib
from peft._cli import merge as merge_lib

DEFAULT_PROMPT = ('ROMEO:\nGood morrow, friar. What news from fair Verona?\n'
                  '\nFRIAR LAURENCE:\n')


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Variant:
  """One model to run: a name, its surgery (or None) and params."""

  name: str
  base: base_lib.Base
  settings: adapt.Settings | None
  params: Any

  def scope(self):
    return self.settings.applied() if self.settings else (
        contextlib.nullcontext())


def variants(args: Any) -> list[Variant]:
  """The models `--adapters`, `--merged` and `--compare` ask for."""
  source = base_lib.source_of(args)
  if args.merged:
    merged = merge_lib.load_merged(args.merged,
                                   lambda: base_lib.load_base(source))
    out = [Variant(name='merged', base=merged, settings=None,
                   params=merged.params)]
    if args.compare:
      base = base_lib.load_base(source)
      out.insert(0, Variant(name='base', base=base, settings=None,
                            params=base.params))
    return out
  base = base_lib.load_base(source)
  if not args.adapters:
    return [Variant(name='base', base=base, settings=None, params=base.params)]
  adapted, _ = adapt.load(base, args.adapters)
  settings = adapted.settings
  out = [Variant(name='fine-tuned', base=base, settings=settings,
                 params=adapted.params)]
  if args.compare:
    zeroed = adapted.as_base()
    name = f'base ({settings.quantize})' if settings.quantize else 'base'
    out.insert(0, Variant(name=name, base=base, settings=settings,
                          params=zeroed.params))
  return out


def run_eval(args: Any) -> dict[str, Any]:
  """Prints (and returns) the held-out perplexity of each variant."""
  results = {}
  held = None  # Read and tokenized once: the variants share a tokenizer.
  for v in variants(args):
    base_lib.check_seq_len(v.base, args.seq_len)
    if held is None:
      held = base_lib.held_out_data(v.base, args)
    results[v.name] = adapt.perplexity(v.base.config, v.settings, v.params,
                                       held.tokens, held.weights)
    what = (f'{len(held)} held-out examples, {held.target_tokens} target '
            'tokens' if args.data or args.eval_data else
            f'{len(held)} windows of {args.seq_len} predicted tokens')
    print(f'{v.name}: held-out perplexity {results[v.name]:.3f} ({what})')
    if args.exact_match:
      right, total = exact_matches(v, held)
      results[f'{v.name} exact match'] = right / total
      print(f'{v.name}: exact match {right}/{total} '
            f'({100 * right / total:.1f}%) of the held-out answers')
  return results


def exact_matches(v: Variant, held: models.Examples) -> tuple[int, int]:
  """`(right, total)`: held-out rows whose greedy answer is the reference.

  Raises:
    CliError: no held-out row has a reference answer.
  """
  tok = v.base.tokenizer
  pairs = _answer_pairs(v, held)
  longest = max(len(tok.encode(answer, add_bos=False)) for _, answer in pairs)
  replies = _replies(v, [ids for ids, _ in pairs],
                     max_new_tokens=longest + 4)
  right = sum(reply.strip() == answer.strip()
              for reply, (_, answer) in zip(replies, pairs))
  return right, len(pairs)


def _replies(v: Variant, prompts: list[list[int]], **sampling) -> list[str]:
  """`v`'s decoded replies to token prompts, `EVAL_CHUNK` rows per call."""
  tok = v.base.tokenizer
  replies = []
  for start in range(0, len(prompts), adapt.EVAL_CHUNK):
    with v.scope():
      replies += [tok.decode(new) for new in _sampler(v)(
          v.params, prompts[start:start + adapt.EVAL_CHUNK],
          eos_id=tok.stop_ids, **sampling)]
  return replies


_SAMPLERS: dict[tuple[Any, ...], models.Sampler] = {}


def _sampler(v: Variant) -> models.Sampler:
  # Surgery is baked into a sampler's first compile: one per surgery.
  key = (v.base.config, v.settings, id(v.base.tokenizer))
  if key not in _SAMPLERS:
    _SAMPLERS[key] = models.Sampler(model=v.base.model,
                                    tokenizer=v.base.tokenizer)
  return _SAMPLERS[key]


def run_sample(args: Any) -> dict[str, Any]:
  """Prints (and returns) each variant's continuation of each prompt."""
  if args.data or args.eval_data:
    if args.prompt or isinstance(args.chat, str):
      given = '--prompt' if args.prompt else '--chat MESSAGE'
      raise base_lib.CliError(
          f'{given} and --data both give the prompts; pass one of them.')
    return _sample_held_out(args)
  chat = bool(args.chat)
  if isinstance(args.chat, str):  # `--chat MESSAGE`
    if args.prompt:
      raise base_lib.CliError(
          f'--chat {args.chat!r} and --prompt both give the prompts; pass '
          'one of them (or a bare --chat to wrap each --prompt as a chat '
          'turn).')
    prompts = [args.chat.replace('\\n', '\n')]
  else:
    prompts = [p.replace('\\n', '\n')
               for p in args.prompt or [DEFAULT_PROMPT]]
  how = (f'temperature {args.temperature:g}, top-k {args.top_k}, seed '
         f'{args.seed}' if args.temperature else 'greedy')
  results = {}
  for v in variants(args):
    with v.scope():
      texts = _sampler(v).generate_text(
          v.params, prompts, chat=chat,
          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
          top_k=args.top_k, seed=args.seed)
    results[v.name] = texts
    print(f'--- {v.name} ({how}) ---')
    for prompt, text in zip(prompts, texts):
      print(f'> {prompt}\n{text}' if chat else f'{prompt}{text}')
  return results


def _answer_pairs(v: Variant, held: models.Examples
                  ) -> list[tuple[list[int], str]]:
  """`(prompt ids, reference)` of the held-out rows that have an answer.

  Raises:
    CliError: no held-out row has one.
  """
  tok = v.base.tokenizer
  pairs = [p for p in (models.answer_prompt(r, tok) for r in held.rows)
           if p is not None]
  if not pairs:
    raise base_lib.CliError(
        'the held-out data has no chat rows ending in an assistant reply, '
        'nor prompt/completion rows, so there is no prompt to answer. '
        'Pass such --data or --eval-data.')
  return pairs


def _sample_held_out(args: Any) -> dict[str, Any]:
  """`sample --data`: each variant answers the held-out rows' prompts."""
  results = {}
  pairs = None  # Read and tokenized once: the variants share a tokenizer.
  for v in variants(args):
    tok = v.base.tokenizer
    if pairs is None:
      pairs = _answer_pairs(v, base_lib.held_out_data(v.base, args))
    replies = _replies(v, [ids for ids, _ in pairs],
                       max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed)
    results[v.name] = replies
    print(f'--- {v.name} ---')
    for (ids, answer), reply in zip(pairs, replies):
      print(f'{tok.decode(ids).strip()}\n{reply.strip()}  '
            f'(reference: {answer.strip()})\n')
  return results


def run_summary(args: Any) -> dict[str, Any]:
  """Prints what the surgery adapts and the trainable/frozen counts."""
  base = base_lib.load_base(base_lib.source_of(args))
  if args.adapters:
    adapted, _ = adapt.load(base, args.adapters)
  else:
    adapted = adapt.adapt(base, adapt.Settings.from_args(args),
                          shapes_only=True)
  report = peft.LoRAReport(adapters={s.key: s for s in adapted.specs})
  params = peft.merge_params(base.params, adapted.lora)
  print(report.summary(params))
  trainable, total = peft.count_params(params)
  print(f'{trainable:,} trainable (adapters), {total - trainable:,} frozen '
        f'(base {base.source})')
  result = {'adapted': len(adapted.specs), 'trainable': trainable,
            'frozen': total - trainable}
  if adapted.settings.quantize:
    result['frozen_bytes'] = peft.param_bytes(adapted.frozen)
    print(f'frozen base in memory: {result["frozen_bytes"] / 2**20:.1f} MiB '
          f'({adapted.settings.quantize}) instead of '
          f'{peft.param_bytes(base.params) / 2**20:.1f} MiB')
  return result
