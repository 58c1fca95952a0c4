"""Makes (and re-checks) a tiny random Gemma 3 Hugging Face directory.

Never run by `make test`: torch is not a dependency. The fixture it writes
(`tiny_hf/`: config.json + model.safetensors, and `tiny_hf_logits.npz`) is
committed; tests/models_gemma3_test.py checks `load_hf_dir` against it. The
config exercises what Gemma 3 adds to Llama: QK-norm, post-norms, two
sliding layers (window 4, shorter than the prompt) and one global layer with
their own rotary bases, a query scalar that is not `head_dim`, and a final
soft cap. It also sets `attn_logit_softcapping`, which transformers' Gemma 3
reads but never applies (nor do we, reading its config). Every weight,
norms included, is redrawn from N(0, 0.2) so nothing is trivial.
From the repository root, in a side venv with torch and transformers:

  python3.11 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 transformers==5.23.0 \
      safetensors numpy
  /tmp/torchenv/bin/python tests/testdata/gemma3/make_tiny_hf.py make
  # By hand, after `models.save_hf_dir(DIR, ...)` of a Gemma 3 config with
  # peft's logits for PROMPT saved as DIR/peft_logits.npy: transformers
  # reads DIR and must compute the same logits.
  /tmp/torchenv/bin/python tests/testdata/gemma3/make_tiny_hf.py check DIR
"""

import pathlib
import sys

import numpy as np
import torch
import transformers

HERE = pathlib.Path(__file__).resolve().parent
PROMPT = [2, 17, 99, 5, 250, 31, 7, 64, 128, 3, 300, 42]


def _logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor([PROMPT])).logits[0].float().numpy()


def make() -> None:
  config = transformers.Gemma3TextConfig(
    vocab_size=320, hidden_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, sliding_window=4,
    layer_types=['sliding_attention', 'sliding_attention', 'full_attention'],
    query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, max_position_embeddings=256,
    tie_word_embeddings=True)
  torch.manual_seed(0)
  model = transformers.Gemma3ForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  out = HERE / 'tiny_hf'
  model.save_pretrained(out)
  np.savez(HERE / 'tiny_hf_logits.npz', prompt=np.array(PROMPT),
           logits=_logits(model))
  print(f'wrote {out} and tiny_hf_logits.npz')


def check(directory: str) -> None:
  model = transformers.AutoModelForCausalLM.from_pretrained(
    directory, dtype=torch.float32).eval()
  ours = np.load(pathlib.Path(directory) / 'peft_logits.npy')
  theirs = _logits(model)
  diff = float(np.abs(ours - theirs).max())
  print(f'max |peft - transformers| = {diff:.3g}')
  sys.exit(0 if diff < 1e-4 else 1)


if __name__ == '__main__':
  if sys.argv[1:2] == ['make']:
    make()
  elif sys.argv[1:2] == ['check'] and len(sys.argv) == 3:
    check(sys.argv[2])
  else:
    sys.exit(__doc__)
