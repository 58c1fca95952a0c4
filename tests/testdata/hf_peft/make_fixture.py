"""Makes (and re-checks) the Hugging Face PEFT fixture, in a torch side venv.

Never run by `make test`: torch is not a dependency. The fixture it writes
is committed; tests/hf_peft_test.py checks peft's loader and exporter
against it. Steps, from the repository root:

  # 1. The base model as a Hugging Face directory (peft's own GGUF loader;
  #    the golden test checks it against transformers).
  .venv/bin/python -c "from peft import models; p = models.load_smollm2(); \
models.save_hf_dir('/tmp/smollm2_hf', config=p.config, params=p.params, \
tokenizer=p.tokenizer)"
  # 2. A side venv with torch, transformers and HF PEFT.
  python3.11 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 transformers==5.23.0 \
      'peft>=0.21,<0.22' safetensors numpy
  # 3. The fixture: an adapter directory and the logits torch gives; then
  #    a DoRA adapter (use_dora=True) and its logits.
  /tmp/torchenv/bin/python tests/testdata/hf_peft/make_fixture.py make \
      --base /tmp/smollm2_hf --out tests/testdata/hf_peft
  /tmp/torchenv/bin/python tests/testdata/hf_peft/make_fixture.py \
      make-dora --base /tmp/smollm2_hf --out tests/testdata/hf_peft
  # 4. By hand, after exporting with peft (see docs/checkpoints.md): torch's
  #    logits for an exported adapter (or a merged directory) against the
  #    logits peft saved beside it as `peft_logits.npy`.
  /tmp/torchenv/bin/python tests/testdata/hf_peft/make_fixture.py \
      check-adapter --base /tmp/smollm2_hf --adapter OUT_DIR
  /tmp/torchenv/bin/python tests/testdata/hf_peft/make_fixture.py \
      check-merged --merged MERGED_DIR
"""

import argparse
import json
import pathlib

import numpy as np
import torch

# A fixed prompt (token ids), so the fixture needs no tokenizer.
PROMPT = [1, 504, 3458, 282, 253, 1345, 30, 2]
# Logits are stored for this many leading vocabulary entries (a 1e-4 match
# over 6 x 4096 values is a strict check and keeps the fixture small).
VOCAB_SLICE = 4096
# All seven projection types, on three of the 30 layers.
TARGETS = (r'.*layers\.(0|1|29)\.(self_attn\.(q|k|v|o)_proj'
           r'|mlp\.(gate|up|down)_proj)')


def _logits(model) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.tensor([PROMPT])).logits
  return out[0].float().numpy()


def _load_base(base):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoModelForCausalLM.from_pretrained(
      base, torch_dtype=torch.float32).eval()


def make(args):
  import peft  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.out)
  model = _load_base(args.base)
  base_logits = _logits(model)
  config = peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
      bias='none', rank_pattern={'o_proj': 2},
      alpha_pattern={'down_proj': 16}, task_type='CAUSAL_LM')
  model = peft.get_peft_model(model, config)
  torch.manual_seed(0)
  for name, param in model.named_parameters():
    if 'lora_B' in name:  # B starts at zero: make the adapter do something
      torch.nn.init.normal_(param, std=0.05)
  model.eval()
  adapted_logits = _logits(model)
  model.save_pretrained(out / 'adapter')
  np.savez(out / 'logits.npz', prompt=np.array(PROMPT),
           base=base_logits[:, :VOCAB_SLICE],
           adapted=adapted_logits[:, :VOCAB_SLICE])
  print('max |adapted - base|:',
        float(np.abs(adapted_logits - base_logits).max()))


# The DoRA adapters: all seven projections of two layers (DoRA adds a
# magnitude per output row), and HF's usual q/v-only choice with rsLoRA,
# which adapts one half of our stacked kv kernel.
DORA_TARGETS = (r'.*layers\.(0|29)\.(self_attn\.(q|k|v|o)_proj'
                r'|mlp\.(gate|up|down)_proj)')
DORA_QV_TARGETS = r'.*layers\.(0|29)\.self_attn\.(q|v)_proj'


def _dora_logits(base, seed, **lora):
  import peft  # pylint: disable=g-import-not-at-top
  model = peft.get_peft_model(_load_base(base), peft.LoraConfig(
      r=4, lora_alpha=8, lora_dropout=0.0, bias='none', use_dora=True,
      task_type='CAUSAL_LM', **lora))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'lora_B' in name:  # B starts at zero: make the adapter do something
        torch.nn.init.normal_(param, std=0.05)
      elif 'lora_magnitude_vector' in name:  # and m starts at ||W||: move it
        param.mul_(1 + 0.1 * torch.randn_like(param))
  model.eval()
  return model, _logits(model)


def make_dora(args):
  out = pathlib.Path(args.out)
  model, adapted = _dora_logits(args.base, 1, target_modules=DORA_TARGETS,
                                rank_pattern={'v_proj': 2})
  model.save_pretrained(out / 'adapter_dora')
  model, adapted_qv = _dora_logits(args.base, 2,
                                   target_modules=DORA_QV_TARGETS,
                                   use_rslora=True)
  model.save_pretrained(out / 'adapter_dora_qv')
  np.savez(out / 'logits_dora.npz', prompt=np.array(PROMPT),
           adapted=adapted[:, :VOCAB_SLICE],
           adapted_qv=adapted_qv[:, :VOCAB_SLICE])
  print('saved tensors like:', sorted(
      k for k in _tensor_names(out / 'adapter_dora') if '.0.' in k)[:4])


def _tensor_names(directory):
  import safetensors  # pylint: disable=g-import-not-at-top
  with safetensors.safe_open(directory / 'adapter_model.safetensors',
                             'np') as f:
    return list(f.keys())


def _compare(name, torch_logits, peft_dir):
  ours = np.load(pathlib.Path(peft_dir) / 'peft_logits.npy')
  diff = float(np.abs(torch_logits[:, :ours.shape[-1]] - ours).max())
  print(json.dumps({name: {'max_abs_diff': diff, 'shape': ours.shape}}))


def check_adapter(args):
  import peft  # pylint: disable=g-import-not-at-top
  model = peft.PeftModel.from_pretrained(_load_base(args.base), args.adapter)
  _compare('adapter', _logits(model.eval()), args.adapter)


# The conversation whose rendering peft and transformers must agree on.
MESSAGES = [{'role': 'user', 'content': 'Who wrote Hamlet?'},
            {'role': 'assistant', 'content': 'Shakespeare.'},
            {'role': 'user', 'content': 'When?'}]


def check_merged(args):
  import transformers  # pylint: disable=g-import-not-at-top
  _compare('merged', _logits(_load_base(args.merged)), args.merged)
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.merged)
  ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                      tokenize=True)
  ids = list(getattr(ids, 'input_ids', ids))
  ours = np.load(pathlib.Path(args.merged) / 'peft_chat_ids.npy').tolist()
  print(json.dumps({'chat_template_ids_equal': ids == ours,
                    'n_tokens': len(ids)}))


def main():
  parser = argparse.ArgumentParser()
  sub = parser.add_subparsers(dest='command', required=True)
  for command in ('make', 'make-dora'):
    p = sub.add_parser(command)
    p.add_argument('--base', required=True)
    p.add_argument('--out', required=True)
  p = sub.add_parser('check-adapter')
  p.add_argument('--base', required=True)
  p.add_argument('--adapter', required=True)
  p = sub.add_parser('check-merged')
  p.add_argument('--merged', required=True)
  args = parser.parse_args()
  {'make': make, 'make-dora': make_dora, 'check-adapter': check_adapter,
   'check-merged': check_merged}[args.command](args)


if __name__ == '__main__':
  main()
