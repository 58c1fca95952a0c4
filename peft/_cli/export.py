"""`python -m peft export`: an adapter file in another format.

`--format hf-peft` writes a Hugging Face PEFT adapter directory
(`adapter_config.json` + `adapter_model.safetensors`) that
`PeftModel.from_pretrained` loads onto the matching transformers model. An
adapter file whose adapters came from an HF PEFT directory (`finetune
--init-adapters`) carries that directory's config, which the export keeps.
"""

from __future__ import annotations

from typing import Any

import peft
from peft import models
from peft._cli import adapt
from peft._cli import base as base_lib

CliError = base_lib.CliError


def run(args: Any) -> dict[str, Any]:
  """Exports `--adapters` to `OUT_DIR`."""
  out = base_lib.output(args, 'hf_peft', flag='OUT_DIR', directory=True)
  try:
    loaded = peft.load_adapters(args.adapters)
  except FileNotFoundError:
    raise CliError(f'--adapters {args.adapters!r}: no such file. Pass the '
                   'adapter file that `python -m peft finetune` wrote.'
                   ) from None
  meta = loaded.metadata.get(adapt.METADATA_KEY, {})
  hf_config = meta.get(adapt.HF_CONFIG_KEY) if isinstance(meta, dict) else (
      None)
  base = meta.get('base', {}).get('source') if isinstance(meta, dict) else (
      None)
  try:
    with base_lib.staged(out) as tmp:
      config = models.save_hf_peft(tmp, loaded.lora, loaded.specs,
                                   hf_config=hf_config, base_model=base)
  except ValueError as e:
    raise CliError(f'--adapters {args.adapters!r}: {e}') from None
  patterns = config['rank_pattern'] or config['alpha_pattern']
  print(f'wrote {out} (Hugging Face PEFT: {len(loaded.specs)} adapters, '
        f'r={config["r"]}, lora_alpha={config["lora_alpha"]:g}'
        f'{", with rank/alpha patterns" if patterns else ""})')
  return {'out': str(out), 'config': config}
