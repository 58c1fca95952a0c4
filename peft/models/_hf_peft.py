"""Hugging Face PEFT LoRA adapters <-> peft adapters of the reference decoder.

An HF PEFT adapter directory holds `adapter_config.json` (`r`, `lora_alpha`,
`use_rslora`, `target_modules`, `rank_pattern`, `alpha_pattern`, ...) and
`adapter_model.safetensors` with, per adapted `nn.Linear` of the torch
model, `lora_A.weight` `(r, in)` and `lora_B.weight` `(out, r)`; the update
is `scale * B @ A` with `scale = alpha / r` (or `alpha / sqrt(r)`).

Our decoder keeps Gemma's layout: one `kv_einsum` kernel for k and v, one
`gating_einsum` for gate and up. Their adapters are one A and one B over
the stack, so two HF adapters land in one of ours *exactly* in block form:
A is `[A_k | A_v]` (rank `r_k + r_v`) and B holds B_k in the k slot of its
first `r_k` rows and B_v in the v slot of the rest, zeros elsewhere. The
stacked kernel stays one einsum. Going back is exact too: an untouched
block form splits into the two HF adapters it came from; a trained one
(whose zero blocks have moved), like one trained here (one A shared by k
and v), exports both projections with the shared A at the full rank, which
is the same update; and two HF adapters with the same A load back as that
shared form.

This module is toolkit glue: it runs peft's surgery on the decoder to get
the adapters' specs (the decoder code itself imports nothing from peft).
GGUF-loaded weights need no adapter permutation: `load_gguf` un-permutes
llama.cpp's rotary q/k rows, so our kernels are in HF's row order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import peft
from peft import _file_modes
from peft import _fuse
from peft.models._config import DecoderConfig
from peft.models._decoder import Decoder
from peft.models._decoder import Einsum

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
# Where the HF config we read travels in our adapter files' metadata, so an
# export can write it back.
METADATA_KEY = 'hf_peft_config'
_PREFIX = 'base_model.model.'
# HF projection -> (our module under layers_N, our kernel, slot in the
# stacked kernel or None).
_PROJECTIONS = {
    'self_attn.q_proj': ('attn/q_einsum', 'w', None),
    'self_attn.k_proj': ('attn/kv_einsum', 'w', 0),
    'self_attn.v_proj': ('attn/kv_einsum', 'w', 1),
    'self_attn.o_proj': ('attn/attn_vec_einsum', 'w', None),
    'mlp.gate_proj': ('mlp', 'gating_einsum', 0),
    'mlp.up_proj': ('mlp', 'gating_einsum', 1),
    'mlp.down_proj': ('mlp', 'linear', None),
}
_TENSOR = re.compile(
    r'^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|'
    r'mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight$')
# Config fields whose non-default values change what the adapter computes
# in ways this loader does not reproduce, with the value it handles.
_UNSUPPORTED = {
    'use_dora': False, 'lora_bias': False, 'layer_replication': None,
    'trainable_token_indices': None, 'target_parameters': None,
    'use_qalora': False, 'alora_invocation_tokens': None,
    'use_bdlora': None,
}
_SUPPORTED_FIELDS_DOC = (
    'peft_type LORA, r, lora_alpha, use_rslora, target_modules, '
    'rank_pattern, alpha_pattern, bias "none", fan_in_fan_out, '
    'modules_to_save null')


def register_decoder_layers() -> None:
  """Registers the decoder's `Einsum` with surgery (idempotent).

  Its param name is an attribute (the feed-forward keeps two kernels in one
  scope), so its adapters are `lora_<weight name>`.
  """
  peft.register_einsum_layer(Einsum, weight_name=lambda m: m.weight_name)


register_decoder_layers()


@dataclasses.dataclass(frozen=True)
class KernelTarget:
  """A surgery target: the decoder kernel `weight_name` at module `path`.

  A predicate (not a path regex) because the feed-forward's two kernels
  share one module path; equal targets compare equal, so surgeries built
  from the same adapters share compiled traces.
  """

  path: str
  weight_name: str

  @property
  def __name__(self) -> str:  # what surgery reports name the target by
    return f'{self.path}/{self.weight_name}'

  def __call__(self, module: Any) -> bool:
    return (isinstance(module, Einsum) and module.scope is not None
            and '/'.join(module.path) == self.path
            and module.weight_name == self.weight_name)


class HFAdapters(NamedTuple):
  """An HF PEFT adapter in peft's terms (what `load_hf_peft` returns).

  Example:
    >>> HFAdapters._fields
    ('lora', 'specs', 'rules', 'hf_config')

  Attributes:
    lora: the adapter tree for `Decoder` params (`merge_params`-ready).
    specs: the adapters' `AdapterSpec`s (for fuse and `save_adapters`).
    rules: `LoRARule`s that rebuild exactly these adapters under surgery
      (`peft.lora(rules=...)`), e.g. to keep training them.
    hf_config: the `adapter_config.json` as read.
  """

  lora: dict[str, Any]
  specs: tuple[peft.AdapterSpec, ...]
  rules: tuple[peft.LoRARule, ...]
  hf_config: dict[str, Any]


def _error(path, why: str, fix: str) -> ValueError:
  return ValueError(f'HF PEFT adapter {str(path)!r}: {why}. {fix}')


def read_hf_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """`adapter_config.json` of `directory`, checked for what we can run."""
  directory = pathlib.Path(directory)
  file = directory / CONFIG_FILE
  try:
    config = json.loads(file.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(
        f'{str(directory)!r} has no {CONFIG_FILE}; an HF PEFT adapter '
        f'directory holds {CONFIG_FILE} and {WEIGHTS_FILE} (what '
        'PeftModel.save_pretrained writes).') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _error(file, f'the config is not JSON ({e})',
                 'Re-save the adapter with save_pretrained.') from None
  if not isinstance(config, dict):
    raise _error(file, 'the config is not a JSON object',
                 'Re-save the adapter with save_pretrained.')
  if config.get('peft_type', 'LORA') != 'LORA':
    raise _error(file, f'peft_type is {config["peft_type"]!r}',
                 'Only LoRA adapters (peft_type "LORA") can be loaded.')
  for field, default in _UNSUPPORTED.items():
    if config.get(field, default) not in (default, {}, [], None):
      raise _error(file, f'{field}={config[field]!r} is not supported',
                   f'peft reads plain LoRA ({_SUPPORTED_FIELDS_DOC}).')
  if config.get('fan_in_fan_out'):
    # What HF PEFT itself does for nn.Linear targets: the flag is for
    # GPT-2's Conv1D; the factors are stored as for any Linear.
    warnings.warn(
        f'HF PEFT adapter {str(file)!r} sets fan_in_fan_out=True, which is '
        'for Conv1D layers; Llama/Gemma projections are nn.Linear, so it is '
        'ignored (as HF PEFT does).', stacklevel=2)
  if config.get('bias', 'none') != 'none':
    raise _error(file, f'bias={config["bias"]!r} trains biases, which the '
                 'bias-free decoder does not have',
                 'Use an adapter trained with bias="none".')
  if config.get('modules_to_save'):
    raise _error(file, f'modules_to_save={config["modules_to_save"]!r} '
                 'replaces whole modules, which an adapter file here cannot '
                 'hold', 'Use an adapter without modules_to_save.')
  for field in ('r', 'lora_alpha'):
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        not value > 0):
      raise _error(file, f'{field}={value!r} is not a positive number',
                   'Fix the config.')
  return config


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
  """HF PEFT's rule: the first key `k` with `(.*\\.)?(k)$` matching."""
  for key, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?({key})$', module):
      return value
  return default


def _hf_scale(config, module: str, rank: int) -> tuple[float, float]:
  alpha = float(_pattern_value(config.get('alpha_pattern'), module,
                               config['lora_alpha']))
  use_rslora = bool(config.get('use_rslora', False))
  return alpha, alpha / (math.sqrt(rank) if use_rslora else rank)


class _Projection(NamedTuple):
  """One HF adapter: `model.layers.N.<proj>`, its A `(r, in)`, B `(out, r)`."""

  layer: int
  proj: str
  a: np.ndarray
  b: np.ndarray

  @property
  def module(self) -> str:
    return f'model.layers.{self.layer}.{self.proj}'

  @property
  def ours(self) -> tuple[str, str, int | None]:
    """(our module path, our kernel name, slot)."""
    path, weight, slot = _PROJECTIONS[self.proj]
    return f'layers_{self.layer}/{path}', weight, slot


def _read_projections(directory: pathlib.Path, config,
                      n_layers: int) -> list[_Projection]:
  file = directory / WEIGHTS_FILE
  try:
    tensors = safetensors.numpy.load_file(file)
  except FileNotFoundError:
    raise FileNotFoundError(
        f'{str(directory)!r} has no {WEIGHTS_FILE}. Point at the directory '
        'PeftModel.save_pretrained wrote.') from None
  except Exception as e:  # safetensors' error type is not a ValueError.
    raise _error(file, f'safetensors could not read it ({e})',
                 'The file is truncated or corrupt; copy it again.') from None
  found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
  for name, value in tensors.items():
    match = _TENSOR.match(name)
    if match is None:
      what = ('an embedding LoRA' if 'lora_embedding' in name else
              'a DoRA magnitude' if 'magnitude' in name else
              'not a LoRA factor of a Llama/Gemma projection')
      raise _error(file, f'tensor {name!r} is {what}',
                   'peft loads LoRA on q/k/v/o/gate/up/down projections.')
    layer, proj, factor = int(match[1]), match[2], match[3]
    if layer >= n_layers:
      raise _error(file, f'tensor {name!r} is for layer {layer} but the '
                   f'model has {n_layers}', 'Load the base model the '
                   'adapter was trained on.')
    found.setdefault((layer, proj), {})[factor] = value.astype(np.float32)
  projections = []
  for (layer, proj), factors in sorted(found.items()):
    if set(factors) != {'A', 'B'}:
      raise _error(file, f'model.layers.{layer}.{proj} has only lora_'
                   f'{"".join(factors)}', 'The file is incomplete.')
    p = _Projection(layer, proj, factors['A'], factors['B'])
    if p.a.ndim != 2 or p.b.ndim != 2 or p.a.shape[0] != p.b.shape[1]:
      raise _error(file, f'{p.module} has lora_A {p.a.shape} and lora_B '
                   f'{p.b.shape}, which do not share a rank',
                   'The file is corrupt.')
    expected_rank = _pattern_value(config.get('rank_pattern'), p.module,
                                   config['r'])
    if p.a.shape[0] != expected_rank:
      raise _error(file, f'{p.module} has rank {p.a.shape[0]} but the '
                   f'config says {expected_rank} (r / rank_pattern)',
                   'The config and the weights do not belong together.')
    projections.append(p)
  if not projections:
    raise _error(file, 'it holds no LoRA tensors', 'Use a LoRA adapter.')
  return projections


def _shares_a(parts: Sequence[_Projection], scales: Sequence[float]) -> bool:
  """Whether stacked HF adapters are one of ours split up by an export:
  the same A (bit for bit) and the same scale."""
  return len(parts) > 1 and len(set(scales)) == 1 and all(
      np.array_equal(p.a, parts[0].a) for p in parts[1:])


def _block(parts: Sequence[tuple[int | None, np.ndarray, np.ndarray, float]],
           a_shape, b_shape, *, shared: bool):
  """Our A and B from HF parts `(slot, A (r, in), B (out, r), hf scale)`.

  A single part is reshaped. Stacked parts with `shared` A fill the slots
  of one B; others go to block form, whose scale is the first part's: each
  B is multiplied by `its scale / that scale` (exactly 1, so B is copied
  bit for bit, when the scales agree).
  """
  scale = parts[0][3]
  in_dims, out_dims = a_shape[:-1], b_shape[1:]
  if parts[0][0] is not None:
    out_dims = out_dims[1:]  # (slot, *out) after the rank
  if shared:
    rank = parts[0][1].shape[0]
    b_full = np.zeros((rank, b_shape[1], *out_dims), np.float32)
    for slot, _, b, _ in parts:
      b_full[:, slot] = b.T.reshape(rank, *out_dims)
    return parts[0][1].T.reshape(*in_dims, rank), b_full
  a_cols, b_rows = [], []
  for slot, a, b, hf_scale in parts:
    rank = a.shape[0]
    a_cols.append(a.T.reshape(*in_dims, rank))
    b_part = b.T.reshape(rank, *out_dims)
    if hf_scale != scale:
      b_part = b_part * np.float32(hf_scale / scale)
    if slot is None:
      b_rows.append(b_part)
    else:
      full = np.zeros((rank, b_shape[1], *out_dims), np.float32)
      full[:, slot] = b_part
      b_rows.append(full)
  return np.concatenate(a_cols, -1), np.concatenate(b_rows, 0)


def _specs_for(config: DecoderConfig, rules) -> tuple[peft.AdapterSpec, ...]:
  """What surgery records for `rules` on the decoder (shapes only)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  with peft.lora(rules=rules) as report:
    jax.eval_shape(Decoder(config=config).init, jax.random.key(0), tokens)
  return report.specs


def load_hf_peft(directory: str | os.PathLike[str],
                 config: DecoderConfig) -> HFAdapters:
  """Reads an HF PEFT LoRA adapter for the reference decoder.

  The result computes what the adapter computes in torch on the same base
  model: `fuse_params(merge_params(base, lora), specs)` gives the merged
  weights, and `peft.lora(rules=rules)` rebuilds the adapters to evaluate
  or keep training them.

  An adapter this module wrote loads as `PeftModel.save_pretrained`'s do.

  Example:
    >>> import tempfile
    >>> from peft.models import tiny_config
    >>> cfg = tiny_config()
    >>> lora, specs = _example_adapters(cfg)
    >>> directory = tempfile.mkdtemp()
    >>> _ = save_hf_peft(directory, lora, specs)
    >>> loaded = load_hf_peft(directory, cfg)
    >>> [(s.key, s.rank) for s in loaded.specs]
    [('layers_0/attn/q_einsum/lora_w', 2),
     ('layers_0/attn/kv_einsum/lora_w', 2)]
    >>> with peft.lora(rules=loaded.rules) as report:
    ...   _ = jax.eval_shape(Decoder(config=cfg).init, jax.random.key(0),
    ...                      jnp.ones((1, 2), jnp.int32))
    >>> report.specs == loaded.specs
    True

  Args:
    directory: what `PeftModel.save_pretrained` wrote.
    config: the base model's config (the adapter's model).

  Returns:
    `HFAdapters(lora, specs, rules, hf_config)`.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: an unsupported config field (named), a tensor that is not a
      LoRA factor of a projection, or shapes that do not fit `config`.
  """
  directory = pathlib.Path(directory)
  hf_config = read_hf_config(directory)
  projections = _read_projections(directory, hf_config, config.n_layers)
  groups: dict[tuple[str, str], list[_Projection]] = {}
  for p in projections:
    groups.setdefault(p.ours[:2], []).append(p)
  plans = {}
  for (path, weight), parts in groups.items():
    parts.sort(key=lambda p: p.ours[2] or 0)
    scales = [_hf_scale(hf_config, p.module, p.a.shape[0])[1] for p in parts]
    shared = _shares_a(parts, scales)
    if len(parts) == 1 or shared:
      rank = parts[0].a.shape[0]
      alpha, _ = _hf_scale(hf_config, parts[0].module, rank)
      use_rslora = bool(hf_config.get('use_rslora', False))
    else:  # block form: the 1st part's scale, without rsLoRA
      rank = sum(p.a.shape[0] for p in parts)
      alpha, use_rslora = scales[0] * rank, False
    plans[path, weight] = (parts, scales, shared, rank, alpha, use_rslora)
  rules = tuple(
      peft.LoRARule(rank=rank, alpha=alpha, use_rslora=use_rslora,
                    targets=KernelTarget(path, weight))
      for (path, weight), (*_, rank, alpha, use_rslora) in plans.items())
  try:
    specs = _specs_for(config, rules)
  except ValueError as e:
    raise _error(directory, f'it does not fit the model ({e})',
                 'Load the base model the adapter was trained on.') from None
  lora: dict[str, Any] = {}
  for spec in specs:
    parts, scales, shared, *_ = plans['/'.join(spec.path), spec.weight_name]
    try:
      a, b = _block([(p.ours[2], p.a, p.b, s) for p, s in zip(parts, scales)],
                    spec.a_shape, spec.b_shape, shared=shared)
    except ValueError as e:
      raise _error(directory, f'{[p.module for p in parts]} do not fit '
                   f'{spec.key!r} ({e})',
                   'Load the base model the adapter was trained on.') from None
    node = lora
    for key in spec.adapter_path:
      node = node.setdefault(key, {})
    node.update(a=jnp.asarray(a), b=jnp.asarray(b))
  return HFAdapters(lora, tuple(specs), rules, hf_config)


# ------------------------------------------------------------------ export

_OURS_TO_HF = {}
for _proj, (_path, _weight, _slot) in _PROJECTIONS.items():
  _OURS_TO_HF.setdefault((_path, _weight), []).append((_slot, _proj))
_LAYER = re.compile(r'^layers_(\d+)$')


def _same_scale(x: float, y: float) -> bool:
  # Scales recomputed from (alpha, rank) in another order may differ in
  # the last bit; treating those as equal keeps B bit for bit.
  return math.isclose(x, y, rel_tol=1e-12)


def _hf_parts(spec: peft.AdapterSpec, a: np.ndarray, b: np.ndarray,
              hf_config: Mapping[str, Any] | None):
  """HF `(module, A (r, in), B (out, r), scale)` for one of our adapters."""
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
    return [(names[0], flat_a, b.reshape(rank, -1).T, spec.scale)]
  # A stack: split an untouched block form back into its parts (their
  # ranks as the HF config we came from says), else share A at full rank.
  split = None
  if hf_config is not None:
    ranks = [_pattern_value(hf_config.get('rank_pattern'), n, hf_config['r'])
             for n in names]
    bounds = np.cumsum([0, *ranks])
    if bounds[-1] == rank and all(
        not b[:lo, slot].any() and not b[hi:, slot].any()
        for slot, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))):
      split = list(zip(bounds[:-1], bounds[1:]))
  parts = []
  for slot, name in enumerate(names):
    lo, hi = split[slot] if split else (0, rank)
    parts.append((name, flat_a[lo:hi], b[lo:hi, slot].reshape(hi - lo, -1).T,
                  spec.scale))
  return parts


def _export_config(parts, hf_config: Mapping[str, Any] | None,
                   base_model: str | None) -> dict[str, Any]:
  """An `adapter_config.json` whose (rank, scale) per module is each
  part's: the config we came from where it agrees, patterns where not."""
  use_rslora = bool((hf_config or {}).get('use_rslora', False))

  def alpha_for(rank, scale):
    return scale * (math.sqrt(rank) if use_rslora else rank)

  ranks = [a.shape[0] for _, a, _, _ in parts]
  if hf_config is None:
    r = max(set(ranks), key=ranks.count)
    alphas = [alpha_for(a.shape[0], s) for _, a, _, s in parts if
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
  for name, a, _, scale in parts:
    rank = a.shape[0]
    exact = re.escape(name)
    if _pattern_value(config['rank_pattern'], name, config['r']) != rank:
      ranks_by_name[exact] = rank
    if not _same_scale(_hf_scale({**config, 'rank_pattern': {}}, name,
                                 rank)[1], scale):
      alphas_by_name[exact] = alpha_for(rank, scale)
  config['rank_pattern'] = {**ranks_by_name, **config['rank_pattern']}
  config['alpha_pattern'] = {**alphas_by_name, **config['alpha_pattern']}
  names = [name for name, _, _, _ in parts]
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
  return {**defaults, **config, 'target_modules': target}


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
    ValueError: an adapter is not on a decoder projection.
  """
  specs = _fuse.check_specs(specs, 'save_hf_peft')
  parts = []
  for spec in specs:
    a, b = _fuse.get_adapter(lora, spec, 'save_hf_peft')
    parts += _hf_parts(spec, np.asarray(a, np.float32),
                       np.asarray(b, np.float32), hf_config)
  config = _export_config(parts, hf_config, base_model)
  tensors = {}
  for name, a, b, scale in parts:
    _, hf_scale = _hf_scale(config, name, a.shape[0])
    if not _same_scale(hf_scale, scale):  # can't happen: patterns fixed it
      b = b * np.float32(scale / hf_scale)
    tensors[f'{_PREFIX}{name}.lora_A.weight'] = np.ascontiguousarray(a)
    tensors[f'{_PREFIX}{name}.lora_B.weight'] = np.ascontiguousarray(b)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, directory / WEIGHTS_FILE,
                              metadata={'format': 'pt'})
  _file_modes.as_if_opened(directory / WEIGHTS_FILE)  # not 0600
  (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
  return config



def _example_adapters(config: DecoderConfig):
  """Rank-2 adapters on layer 0's q and kv kernels, for the examples."""
  with peft.lora(rank=2, targets='layers_0/attn/(q|kv)_einsum') as report:
    params = Decoder(config=config).init(jax.random.key(0),
                                         jnp.ones((1, 2), jnp.int32))
  return peft.split_params(params['params']).lora, report.specs
