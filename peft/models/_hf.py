"""Load and save a local Hugging Face-style checkpoint directory.

The directory holds `config.json`, one or more `*.safetensors` files with
Llama/Gemma tensor names, and optionally `tokenizer.json` (plus
`tokenizer_config.json` for the chat template). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import pathlib
from typing import Any

import jax.numpy as jnp
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import save_file
import tokenizers

from peft._core import file_modes as _file_modes
from peft.models._config import DecoderConfig
from peft.models._sentencepiece import read_sentencepiece_model
from peft.models._tokenizer import Tokenizer
from peft.models._tokenizer import system_prompt_from_template
from peft.models._weights import Pretrained
from peft.models._weights import params_from_hf
from peft.models._weights import params_to_hf


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_bytes())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(
      f'{str(path)!r} is not valid JSON ({e}). Fix or regenerate the '
      'file.') from e
  if not isinstance(data, dict):
    raise ValueError(f'{str(path)!r} must hold a JSON object; got '
                     f'{type(data).__name__}.')
  return data


def _first_id(value: Any) -> int | None:
  if isinstance(value, list):
    return value[0] if value else None
  return value


def _load_tokenizer(directory: pathlib.Path,
                    hf_config: dict[str, Any]) -> Tokenizer | None:
  path = directory / 'tokenizer.json'
  sentencepiece_path = directory / 'tokenizer.model'
  if not path.is_file() and not sentencepiece_path.is_file():
    return None
  extra_path = directory / 'tokenizer_config.json'
  extra = _read_json(extra_path) if extra_path.is_file() else {}
  eos_id = _first_id(hf_config.get('eos_token_id'))
  bos_id = _first_id(hf_config.get('bos_token_id'))
  default_system_prompt = system_prompt_from_template(
    extra.get('chat_template'))
  if not path.is_file():
    # Only SentencePiece's file: HF's SentencePiece tokenizers (Llama,
    # Gemma) add BOS unless tokenizer_config.json says otherwise.
    model = read_sentencepiece_model(sentencepiece_path)
    return model.tokenizer(
      eos_id=eos_id, bos_id=bos_id,
      add_bos=bool(extra.get('add_bos_token', True)),
      default_system_prompt=default_system_prompt)
  if eos_id is None:
    raise ValueError(
      f'{str(directory / "config.json")!r} has no eos_token_id, which the '
      'tokenizer needs to end generation. Add it to config.json.')
  try:
    backend = tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception.
    raise ValueError(
      f'{str(path)!r} is not a readable tokenizer file ({e}). Replace it '
      "with the model's own tokenizer.json.") from e
  return Tokenizer(
    backend, eos_id=eos_id, bos_id=bos_id,
    add_bos=bool(extra.get('add_bos_token', False)),
    default_system_prompt=default_system_prompt)


def _read_tensors(path: pathlib.Path) -> dict[str, Any]:
  try:
    with safe_open(str(path), framework='numpy') as f:
      return {name: f.get_tensor(name) for name in f.keys()}
  except SafetensorError as e:
    raise ValueError(
      f'{str(path)!r} is not a readable safetensors file ({e}); it is '
      'truncated or corrupt. Save or copy the weights again.') from e


def load_hf_dir(path: str | pathlib.Path, *,
                dtype: Any = jnp.float32) -> Pretrained:
  """Loads `config.json` + `*.safetensors` (+ a tokenizer) from `path`.

  The tokenizer is `tokenizer.json` or, without one, SentencePiece's
  `tokenizer.model` (Llama, Gemma).

  Example:
    >>> import tempfile
    >>> import jax.numpy as jnp, numpy as np
    >>> from peft import models
    >>> config = models.tiny_config()
    >>> tensors = {name: np.zeros(shape, np.float32)
    ...            for name, shape in models.hf_shapes(config).items()}
    >>> directory = tempfile.mkdtemp()
    >>> models.save_hf_dir(directory, config=config,
    ...                    params=models.params_from_hf(tensors, config))
    >>> pre = models.load_hf_dir(directory, dtype=jnp.bfloat16)
    >>> pre.config == config, pre.tokenizer is None  # no tokenizer.json
    (True, True)
    >>> pre.params['layers_0']['attn']['q_einsum']['w'].dtype
    dtype(bfloat16)

  Args:
    path: the checkpoint directory.
    dtype: dtype of the returned params.

  Returns:
    The config, the `Decoder` params and the tokenizer (None when the
    directory has neither `tokenizer.json` nor `tokenizer.model`).

  Raises:
    FileNotFoundError: no directory, `config.json` or `*.safetensors`.
    ValueError: an unsupported config, tensors that do not fit it, or a
      file that is not valid JSON, safetensors or tokenizer (truncated or
      corrupt); the message names the file.
  """
  directory = pathlib.Path(path)
  config_path = directory / 'config.json'
  if not config_path.is_file():
    raise FileNotFoundError(
      f'no config.json in {str(directory)!r}. Pass a Hugging Face-style '
      'checkpoint directory (config.json + *.safetensors).')
  hf_config = _read_json(config_path)
  config = DecoderConfig.from_hf_config(hf_config)
  files = sorted(directory.glob('*.safetensors'))
  if not files:
    raise FileNotFoundError(
      f'no *.safetensors file in {str(directory)!r}. Save the weights as '
      'safetensors (PyTorch .bin files are not read).')
  tensors = {}
  for file in files:
    tensors.update(_read_tensors(file))
  params = params_from_hf(tensors, config, dtype=dtype,
                          source=repr(str(directory)))
  return Pretrained(config=config, params=params,
                    tokenizer=_load_tokenizer(directory, hf_config))


def save_hf_dir(path: str | pathlib.Path, *, config: DecoderConfig,
                params: Mapping[str, Any],
                tokenizer: Tokenizer | None = None) -> None:
  """Writes a checkpoint directory that `load_hf_dir` (and HF) can read.

  The weights go to `model.safetensors` in their current dtype. With a
  `tokenizer`, `tokenizer.json` and `tokenizer_config.json` (special tokens
  and a ChatML chat template with the default system prompt) go beside it,
  so the directory chats as the original did.

  Example:
    >>> import tempfile, jax
    >>> from peft.models import Decoder, tiny_config
    >>> cfg = tiny_config()
    >>> tokens = jnp.zeros((1, 2), jnp.int32)
    >>> params = Decoder(config=cfg).init(jax.random.key(0), tokens)['params']
    >>> d = tempfile.mkdtemp()
    >>> save_hf_dir(d, config=cfg, params=params)
    >>> load_hf_dir(d).config == cfg
    True
  """
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = config.to_hf_config()
  if tokenizer is not None:
    hf_config['eos_token_id'] = tokenizer.eos_id
    if tokenizer.bos_id is not None:
      hf_config['bos_token_id'] = tokenizer.bos_id
    tokenizer.backend.save(str(directory / 'tokenizer.json'))
    (directory / 'tokenizer_config.json').write_text(
      json.dumps(_tokenizer_config(tokenizer), indent=2))
  (directory / 'config.json').write_text(json.dumps(hf_config, indent=2))
  weights = directory / 'model.safetensors'
  save_file(params_to_hf(params, config), str(weights),
            metadata={'format': 'pt'})
  _file_modes.as_if_opened(weights)  # safetensors makes it 0600


def _tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
  """What HF's `tokenizer_config.json` says of `tokenizer`."""
  name = tokenizer.backend.id_to_token
  config = {
    'tokenizer_class': 'PreTrainedTokenizerFast',
    'eos_token': name(tokenizer.eos_id),
    'bos_token': None if tokenizer.bos_id is None else name(tokenizer.bos_id),
    'add_bos_token': tokenizer.add_bos,
  }
  template = tokenizer.chat_template()
  if template is not None:
    config['chat_template'] = template
  return config
