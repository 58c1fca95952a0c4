"""`python -m peft merge`: fold the adapters into the base, save plain params.

The merged model is the unmodified decoder on fused params, with zero
overhead at serving time. For a QLoRA adapter file the adapters are folded
into the dequantized base, i.e. into the very weights the adapted model ran
on, so the merged float model reproduces the adapted one.

`--out` names a Hugging Face-style directory (`peft.models.save_hf_dir`,
with the tokenizer; `load_hf_dir` and `--hf-dir` read it) or, when it ends
in `.safetensors`, one file of the decoder's params keyed by path
(`layers_0/attn/q_einsum/w`) with the config in its metadata. The check
(on by default) reads the written output back and compares the plain model
on it with the adapted model; the output replaces an old one only if the
check passes.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from safetensors import numpy as st_numpy

import peft
from peft import models
from peft._cli import adapt
from peft._cli import base as base_lib
from peft._core import file_modes as _file_modes

CliError = base_lib.CliError

FORMAT = 'peft.merged_params'


def write_params_file(path: pathlib.Path, config: models.DecoderConfig,
                      params: Any) -> None:
  """Writes the decoder params keyed by path, with the config as metadata."""
  tensors = {
      jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(x)
      for p, x in jax.tree_util.tree_leaves_with_path(params)}
  st_numpy.save_file(tensors, str(path), metadata={
      'format': FORMAT, 'config': json.dumps(dataclasses.asdict(config))})
  _file_modes.as_if_opened(path)  # safetensors makes it 0600


def read_params_file(path: str) -> tuple[models.DecoderConfig, dict[str, Any]]:
  """Reads `write_params_file`'s output: the config and nested params.

  Raises:
    CliError: the file is not a readable merged-params file.
  """
  where = f'--merged {path!r}'
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get('format') != FORMAT:
      raise ValueError(f'its metadata format is {meta.get("format")!r}')
    config = models.DecoderConfig(**json.loads(meta['config']))
  except Exception as e:  # safetensors raises its own (Rust) error types.
    raise CliError(
        f'{where} is not a merged-params file written by `python -m peft '
        f'merge` ({e}). Pass that file, or a checkpoint directory.') from None
  params: dict[str, Any] = {}
  for name, value in tensors.items():
    *parents, leaf = name.split('/')
    node = params
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = jnp.asarray(value)
  return config, params


def load_merged(path: str, fallback: Any) -> base_lib.Base:
  """Loads a merged model (directory or file) as a `Base`.

  Args:
    path: what `merge --out` wrote.
    fallback: `() -> Base` giving the tokenizer when `path` holds none.
  """
  if os.path.isdir(path):
    pretrained = models.load_hf_dir(path)
    config, params = pretrained.config, pretrained.params
    tokenizer = pretrained.tokenizer or fallback().tokenizer
  elif os.path.isfile(path):
    config, params = read_params_file(path)
    tokenizer = fallback().tokenizer
  else:
    raise CliError(f'--merged {path!r}: no such file or directory. Pass what '
                   '`python -m peft merge` wrote (its --out).')
  return base_lib.Base(source=f'merged:{os.path.abspath(path)}',
                       config=config, params=params, tokenizer=tokenizer,
                       fingerprint=base_lib.fingerprint(params))


def fused_params(adapted: adapt.Adapted) -> Mapping[str, Any]:
  """The plain params: adapters folded into the (dequantized) base."""
  float_base = peft.dequantize(adapted.frozen)
  return peft.fuse_params(peft.merge_params(float_base, adapted.lora),
                          adapted.specs)


def max_logit_diff(adapted: adapt.Adapted, plain: base_lib.Base,
                   held: np.ndarray) -> float:
  """Max |logits| difference: plain model on `plain` vs the adapted model."""
  if plain.config != adapted.base.config:
    raise CliError(f'the merged config {plain.config} differs from the base '
                   f'config {adapted.base.config}.')
  tokens = jnp.asarray(held[:, :-1])
  ours = adapt.logits_fn(plain.config, None)(plain.params, tokens)
  theirs = adapt.logits_fn(adapted.base.config, adapted.settings)(
      adapted.params, tokens)
  return float(jnp.max(jnp.abs(ours - theirs)))


def run(args: Any) -> dict[str, Any]:
  """Merges `--adapters` into the base and writes `--out`."""
  as_file = pathlib.Path(args.out or 'merged').suffix == '.safetensors'
  out = base_lib.output(args, 'merged', flag='--out', directory=not as_file)
  base = base_lib.load_base(base_lib.source_of(args))
  adapted, _ = adapt.load(base, args.adapters)
  held = (base_lib.held_out_data(base, args).tokens[:args.eval_windows]
          if args.check else None)
  fused = fused_params(adapted)
  result: dict[str, Any] = {'merged': str(out)}
  with base_lib.staged(out) as tmp:
    if as_file:
      write_params_file(tmp, base.config, fused)
    else:
      models.save_hf_dir(tmp, config=base.config, params=fused,
                         tokenizer=base.tokenizer)
    if held is not None:  # --check
      plain = load_merged(str(tmp), lambda: base)
      diff = max_logit_diff(adapted, plain, held)
      result['max_abs_diff'] = diff
      verdict = 'ok' if diff <= args.atol else 'FAILED'
      print(f'check: plain model on the merged params vs adapted model, '
            f'{len(held)} held-out windows: max |logit diff| = {diff:.2e} '
            f'(atol {args.atol:g}) {verdict}')
      if diff > args.atol:
        raise CliError(
            f'the merged model differs from the adapted one by {diff:.3g} > '
            f'--atol {args.atol:g}; {str(out)!r} was not written. Report '
            'this as a bug, or pass a larger --atol.')
  print(f'wrote {out} ({"params file" if as_file else "checkpoint dir"})')
  return result
