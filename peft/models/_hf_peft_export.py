"""Adapters of the reference decoder written as a Hugging Face PEFT adapter.

Each of our adapters becomes one HF adapter per projection: a stacked
kernel's (k and v, gate and up) becomes two. An untouched block form (what
`load_hf_peft` makes of two HF adapters) splits back into them; otherwise
both projections get the shared A at the full rank, which is the same
update. The config keeps what the adapters were read with and adds exact
module names to `rank_pattern`/`alpha_pattern` where a rank or scale
differs. A DoRA adapter's magnitude goes with each projection as HF PEFT's
`lora_magnitude_vector` (a stacked kernel's split by slot), and the config
says `use_dora: true`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import math
import os
import pathlib
import re
from typing import Any

import numpy as np
import safetensors.numpy

import peft
from peft._core import adapter_tree as _adapter_tree
from peft._core import file_modes as _file_modes
from peft.models import _hf_peft_format as fmt

_OURS_TO_HF = {}
for _proj, (_path, _weight, _slot) in fmt.PROJECTIONS.items():
  _OURS_TO_HF.setdefault((_path, _weight), []).append((_slot, _proj))
_LAYER = re.compile(r'^layers_(\d+)$')


def _same_scale(x: float, y: float) -> bool:
  # Scales recomputed from (alpha, rank) in another order may differ in
  # the last bit; treating those as equal keeps B bit for bit.
  return math.isclose(x, y, rel_tol=1e-12)


def _hf_parts(spec: peft.AdapterSpec, a: np.ndarray, b: np.ndarray,
              m: np.ndarray | None, hf_config: Mapping[str, Any] | None):
  """HF `(module, A (r, in), B (out, r), scale, m (out,) or None)` for one
  of our adapters (`m`: its DoRA magnitude, one slot per part)."""
  layer = _LAYER.match(spec.path[0]) if spec.path else None
  key = ('/'.join(spec.path[1:]), spec.weight_name)
  if layer is None or key not in _OURS_TO_HF or spec.stack_shape:
    raise ValueError(
        f'export: adapter {spec.key!r} is not on a projection of the '
        'reference decoder (layers_N/attn/{q,kv,attn_vec}_einsum, '
        'layers_N/mlp gating_einsum/linear); HF PEFT has no name for it. '
        'Export adapters trained on peft.models.Decoder.')
  rank = spec.rank
  targets = sorted(_OURS_TO_HF[key], key=lambda t: t[0] or 0)
  names = [f'model.layers.{layer[1]}.{proj}' for _, proj in targets]
  flat_a = a.reshape(-1, rank).T  # (R, in)
  if targets[0][0] is None:
    return [(names[0], flat_a, b.reshape(rank, -1).T, spec.scale,
             None if m is None else m.reshape(-1))]
  # A stack: split an untouched block form back into its parts (their
  # ranks as the HF config we came from says), else share A at full rank.
  split = None
  if hf_config is not None:
    ranks = [fmt.pattern_value(hf_config.get('rank_pattern'), n, hf_config['r'])
             for n in names]
    bounds = np.cumsum([0, *ranks])
    if bounds[-1] == rank and all(
        not b[:lo, slot].any() and not b[hi:, slot].any()
        for slot, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))):
      split = list(zip(bounds[:-1], bounds[1:]))
  parts = []
  for slot, name in enumerate(names):
    lo, hi = split[slot] if split else (0, rank)
    part_b, scale = b[lo:hi, slot].reshape(hi - lo, -1).T, spec.scale
    if split and hf_config is not None:
      # The block form holds each part's B at the first part's scale
      # (load_hf_peft's `_block`); give each back its own HF scale.
      own = fmt.hf_scale(hf_config, name, hi - lo)[1]
      if not _same_scale(own, scale):
        part_b, scale = part_b * np.float32(scale / own), own
    parts.append((name, flat_a[lo:hi], part_b, scale,
                  None if m is None else m[slot].reshape(-1)))
  return parts


def _export_config(parts, hf_config: Mapping[str, Any] | None,
                   base_model: str | None, *, use_dora: bool
                   ) -> dict[str, Any]:
  """An `adapter_config.json` whose (rank, scale) per module is each
  part's: the config we came from where it agrees, patterns where not."""
  use_rslora = bool((hf_config or {}).get('use_rslora', False))

  def alpha_for(rank, scale):
    return scale * (math.sqrt(rank) if use_rslora else rank)

  ranks = [a.shape[0] for _, a, *_ in parts]
  if hf_config is None:
    r = max(set(ranks), key=ranks.count)
    alphas = [alpha_for(a.shape[0], s) for _, a, _, s, _ in parts if
              a.shape[0] == r]
    config = {'r': r, 'lora_alpha': max(set(alphas), key=alphas.count),
              'rank_pattern': {}, 'alpha_pattern': {}}
  else:
    config = {**hf_config,
              'rank_pattern': dict(hf_config.get('rank_pattern') or {}),
              'alpha_pattern': dict(hf_config.get('alpha_pattern') or {})}
  # HF takes the first pattern key `k` with `(.*\.)?(k)$` matching a
  # module, so the exact names this adds go before the config's own keys.
  ranks_by_name, alphas_by_name = {}, {}
  for name, a, _, scale, _ in parts:
    rank = a.shape[0]
    exact = re.escape(name)
    if fmt.pattern_value(config['rank_pattern'], name, config['r']) != rank:
      ranks_by_name[exact] = rank
    if not _same_scale(fmt.hf_scale(config, name, rank)[1], scale):
      alphas_by_name[exact] = alpha_for(rank, scale)
  config['rank_pattern'] = {**ranks_by_name, **config['rank_pattern']}
  config['alpha_pattern'] = {**alphas_by_name, **config['alpha_pattern']}
  names = [name for name, *_ in parts]
  target = (hf_config or {}).get('target_modules')
  if not (isinstance(target, str)
          and all(re.fullmatch(target, n) for n in names)):
    target = r'(?:.*\.)?(?:' + '|'.join(re.escape(n) for n in names) + ')'
  defaults = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'bias': 'none',
      'fan_in_fan_out': False, 'lora_dropout': 0.0, 'use_rslora': use_rslora,
      'modules_to_save': None, 'inference_mode': True,
      'init_lora_weights': True, 'base_model_name_or_path': base_model,
  }
  config = {**defaults, **config, 'target_modules': target}
  if use_dora or 'use_dora' in config:
    config['use_dora'] = use_dora
  return config


def save_hf_peft(directory: str | os.PathLike[str], lora: Any,
                 specs: Sequence[peft.AdapterSpec], *,
                 hf_config: Mapping[str, Any] | None = None,
                 base_model: str | None = None) -> dict[str, Any]:
  """Writes adapters of the reference decoder as an HF PEFT directory.

  `PeftModel.from_pretrained(<the transformers model>, directory)` then
  computes what our adapted decoder computes. Adapters read by
  `load_hf_peft` go back to the same tensors and config (pass its
  `hf_config`); a stacked adapter (k and v, gate and up) whose block form
  training filled in is written as two adapters sharing its A, at its
  rank, which is the same update.

  Example:
    >>> import tempfile
    >>> from peft.models import tiny_config
    >>> from peft.models._hf_peft import _example_adapters
    >>> lora, specs = _example_adapters(tiny_config())
    >>> config = save_hf_peft(tempfile.mkdtemp(), lora, specs)
    >>> config['r'], config['lora_alpha'], config['rank_pattern']
    (2, 2.0, {})
    >>> [re.fullmatch(config['target_modules'], f'model.layers.0.{p}')
    ...  is not None for p in ('self_attn.q_proj', 'mlp.up_proj')]
    [True, False]

  Args:
    directory: created if missing; `adapter_config.json` and
      `adapter_model.safetensors` are (re)written.
    lora: params or a lora tree holding the adapters.
    specs: their specs.
    hf_config: the HF config the adapters were read with, if any.
    base_model: `base_model_name_or_path` to record.

  Returns:
    The config written.

  Raises:
    ValueError: an adapter is not on a decoder projection, or some
      adapters are DoRA and others not (HF PEFT's `use_dora` is one flag).
  """
  specs = _adapter_tree.check_specs(specs, 'save_hf_peft')
  dora = [s.key for s in specs if s.use_dora]
  if dora and len(dora) != len(specs):
    plain = [s.key for s in specs if not s.use_dora]
    raise ValueError(
        f'save_hf_peft: adapters {dora[:3]} are DoRA but {plain[:3]} are '
        'not; an HF PEFT adapter is DoRA or LoRA as a whole (one use_dora '
        'in its config). Export them as two adapters, or fuse the DoRA '
        'ones (peft.fuse_params).'
    )
  parts = []
  for spec in specs:
    a, b, m, _ = _adapter_tree.adapter_arrays(lora, spec, 'save_hf_peft')
    parts += _hf_parts(spec, np.asarray(a, np.float32),
                       np.asarray(b, np.float32),
                       None if m is None else np.asarray(m, np.float32),
                       hf_config)
  config = _export_config(parts, hf_config, base_model, use_dora=bool(dora))
  tensors = {}
  for name, a, b, scale, m in parts:
    _, written = fmt.hf_scale(config, name, a.shape[0])
    if not _same_scale(written, scale):  # can't happen: patterns fixed it
      b = b * np.float32(scale / written)
    tensors[f'{fmt.PREFIX}{name}.lora_A.weight'] = np.ascontiguousarray(a)
    tensors[f'{fmt.PREFIX}{name}.lora_B.weight'] = np.ascontiguousarray(b)
    if m is not None:  # DoRA's magnitude, named as HF PEFT writes it
      tensors[f'{fmt.PREFIX}{name}.{fmt.MAGNITUDE_SUFFIX}'] = (
          np.ascontiguousarray(m))
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, directory / fmt.WEIGHTS_FILE,
                              metadata={'format': 'pt'})
  _file_modes.as_if_opened(directory / fmt.WEIGHTS_FILE)  # not 0600
  (directory / fmt.CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
  return config
