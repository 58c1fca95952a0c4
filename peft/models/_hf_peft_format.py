"""The Hugging Face PEFT adapter format: file names, config, tensor names.

What both directions share: which HF projection is which kernel of the
reference decoder, which config fields can be run here, and HF PEFT's rule
for per-module ranks and alphas (`rank_pattern`, `alpha_pattern`).
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
import pathlib
import re
from typing import Any
import warnings

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
# Where the HF config we read travels in our adapter files' metadata, so an
# export can write it back.
METADATA_KEY = 'hf_peft_config'
PREFIX = 'base_model.model.'
# HF projection -> (our module under layers_N, our kernel, slot in the
# stacked kernel or None).
PROJECTIONS = {
    'self_attn.q_proj': ('attn/q_einsum', 'w', None),
    'self_attn.k_proj': ('attn/kv_einsum', 'w', 0),
    'self_attn.v_proj': ('attn/kv_einsum', 'w', 1),
    'self_attn.o_proj': ('attn/attn_vec_einsum', 'w', None),
    'mlp.gate_proj': ('mlp', 'gating_einsum', 0),
    'mlp.up_proj': ('mlp', 'gating_einsum', 1),
    'mlp.down_proj': ('mlp', 'linear', None),
}
# Group 3 is 'A' or 'B' for a LoRA factor; None for a DoRA magnitude (HF
# PEFT writes `lora_magnitude_vector` without the `.weight` it has in torch).
TENSOR = re.compile(
    r'^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|'
    r'mlp\.(?:gate|up|down)_proj)\.(?:lora_([AB])\.weight|'
    r'lora_magnitude_vector(?:\.weight)?)$')
MAGNITUDE_SUFFIX = 'lora_magnitude_vector'
# Config fields whose non-default values change what the adapter computes
# in ways this loader does not reproduce, with the value it handles.
_UNSUPPORTED = {
    'lora_bias': False, 'layer_replication': None,
    'trainable_token_indices': None, 'target_parameters': None,
    'use_qalora': False, 'alora_invocation_tokens': None,
    'use_bdlora': None,
}
_SUPPORTED_FIELDS_DOC = (
    'peft_type LORA, r, lora_alpha, use_rslora, use_dora, target_modules, '
    'rank_pattern, alpha_pattern, bias "none", fan_in_fan_out, '
    'modules_to_save null')


def error(path: Any, why: str, fix: str) -> ValueError:
  """An error about the adapter at `path`: what is wrong, then the fix."""
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
    raise error(file, f'the config is not JSON ({e})',
                 'Re-save the adapter with save_pretrained.') from None
  if not isinstance(config, dict):
    raise error(file, 'the config is not a JSON object',
                 'Re-save the adapter with save_pretrained.')
  if config.get('peft_type', 'LORA') != 'LORA':
    raise error(file, f'peft_type is {config["peft_type"]!r}',
                 'Only LoRA adapters (peft_type "LORA") can be loaded.')
  for field, default in _UNSUPPORTED.items():
    if config.get(field, default) not in (default, {}, [], None):
      raise error(file, f'{field}={config[field]!r} is not supported',
                   f'peft reads plain LoRA ({_SUPPORTED_FIELDS_DOC}).')
  if config.get('fan_in_fan_out'):
    # What HF PEFT itself does for nn.Linear targets: the flag is for
    # GPT-2's Conv1D; the factors are stored as for any Linear.
    warnings.warn(
        f'HF PEFT adapter {str(file)!r} sets fan_in_fan_out=True, which is '
        'for Conv1D layers; Llama/Gemma projections are nn.Linear, so it is '
        'ignored (as HF PEFT does).', stacklevel=2)
  if config.get('bias', 'none') != 'none':
    raise error(file, f'bias={config["bias"]!r} trains biases, which the '
                 'bias-free decoder does not have',
                 'Use an adapter trained with bias="none".')
  if config.get('modules_to_save'):
    raise error(file, f'modules_to_save={config["modules_to_save"]!r} '
                 'replaces whole modules, which an adapter file here cannot '
                 'hold', 'Use an adapter without modules_to_save.')
  for field in ('use_rslora', 'use_dora'):
    if not isinstance(config.get(field, False), bool):
      raise error(file, f'{field}={config[field]!r} is not a bool',
                  'Fix the config (true or false).')
  for field in ('r', 'lora_alpha'):
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        not value > 0):
      raise error(file, f'{field}={value!r} is not a positive number',
                   'Fix the config.')
  return config


def pattern_value(patterns: Mapping[str, Any] | None, module: str,
                  default: Any) -> Any:
  """HF PEFT's rule: the first key `k` with `(.*\\.)?(k)$` matching."""
  for key, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?({key})$', module):
      return value
  return default


def hf_scale(config: Mapping[str, Any], module: str,
             rank: int) -> tuple[float, float]:
  """`(alpha, scale)` HF PEFT gives `module` at `rank`."""
  alpha = float(pattern_value(config.get('alpha_pattern'), module,
                               config['lora_alpha']))
  use_rslora = bool(config.get('use_rslora', False))
  return alpha, alpha / (math.sqrt(rank) if use_rslora else rank)
