"""LoRA and QLoRA surgery on the base model, from flags or an adapter file.

`Settings` holds what the flags say (`--targets`, `--rank`, `--alpha`,
`--dropout`, `--quantize`); `finetune` stores it in the adapter file's
metadata, with the base model's config and fingerprint, so that `eval`,
`sample` and `merge` rebuild the same surgery from the file alone and refuse
a file made for another base.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import dataclasses
import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import peft
from peft import models
from peft._cli import base as base_lib

CliError = base_lib.CliError

# The reference decoder's own einsum layer takes its param name from an
# attribute (its feed-forward keeps two kernels in one scope).
peft.register_einsum_layer(models.Einsum, weight_name=lambda m: m.weight_name)

METADATA_KEY = 'peft_cli'
QUANTIZATIONS = ('int8', 'int4', 'nf4')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """The surgery: which layers get LoRA, how, over which base precision.

  Attributes:
    targets: module-path regexes (full match), e.g. `'.*attn/.*'`.
    rank: LoRA rank.
    alpha: scale numerator (`None`: scale 1).
    dropout: adapter-input dropout rate while training.
    quantize: `None`, or the method of a QLoRA base (`int8`, `int4`, `nf4`).
  """

  targets: tuple[str, ...]
  rank: int
  alpha: float | None = None
  dropout: float = 0.0
  quantize: str | None = None

  @classmethod
  def from_args(cls, args: Any) -> Settings:
    return cls(targets=tuple(args.targets), rank=args.rank, alpha=args.alpha,
               dropout=args.dropout, quantize=args.quantize)

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'targets': list(self.targets)}

  @classmethod
  def from_json(cls, data: Any, where: str) -> Settings:
    try:
      settings = cls(**{**data, 'targets': tuple(data['targets'])})
      ok = (isinstance(settings.rank, int) and settings.rank > 0
            and settings.quantize in (None, *QUANTIZATIONS))
    except (TypeError, KeyError):
      ok = False
    if not ok:
      raise CliError(f'{where} has unreadable surgery settings {data!r}. '
                     'Re-create the file with `python -m peft finetune`.')
    return settings

  @contextlib.contextmanager
  def applied(self) -> Iterator[peft.LoRAReport]:
    """Enters the surgery (quantized base outside, LoRA inside)."""
    with contextlib.ExitStack() as stack:
      if self.quantize:
        stack.enter_context(peft.quantized(self.quantize))
      yield stack.enter_context(peft.lora(
          self.rank, targets=self.targets, alpha=self.alpha,
          dropout=self.dropout or None))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Adapted:
  """A base model, the surgery on it, and its adapters.

  Attributes:
    base: the base model.
    settings: the surgery.
    frozen: the base params the adapted model runs on (quantized for QLoRA).
    lora: the adapter branches (`split_params(...).lora`).
    specs: the adapter specs, as `save_adapters` and `fuse_params` take.
  """

  base: base_lib.Base
  settings: Settings
  frozen: dict[str, Any]
  lora: dict[str, Any]
  specs: tuple[peft.AdapterSpec, ...]

  @property
  def params(self) -> dict[str, Any]:
    return peft.merge_params(self.frozen, self.lora)

  def with_lora(self, lora: dict[str, Any]) -> Adapted:
    return dataclasses.replace(self, lora=lora)

  def metadata(self, **extra: Any) -> dict[str, Any]:
    """What `finetune` stores in the adapter file."""
    return {METADATA_KEY: {
        'settings': self.settings.to_json(),
        'base': {'source': self.base.source,
                 'config': dataclasses.asdict(self.base.config),
                 'fingerprint': self.base.fingerprint},
        **extra}}


_QUANTIZED: dict[tuple[str, str], Any] = {}


def frozen_params(base: base_lib.Base, settings: Settings) -> dict[str, Any]:
  """The base params, quantized (once per process) for a QLoRA surgery."""
  if not settings.quantize:
    return base.params
  key = (base.source, settings.quantize)
  if key not in _QUANTIZED:
    tokens = jnp.zeros((1, 1), jnp.int32)
    axes = peft.quantization_axes(base.model, tokens)
    _QUANTIZED[key] = peft.quantize(base.params, method=settings.quantize,
                                    axes=axes)
  return _QUANTIZED[key]


def _layer_kinds(paths: Any) -> str:
  kinds = dict.fromkeys(re.sub(r'_\d+(?=/|$)', '_N', p) for p in paths)
  return ', '.join(kinds)


def adapt(base: base_lib.Base, settings: Settings, *, seed: int = 0,
          shapes_only: bool = False) -> Adapted:
  """Runs the model once under the surgery, creating fresh adapters.

  Only the adapters are initialized (the base params are given), in one
  small compiled call; with `shapes_only` nothing is computed and `lora`
  holds `jax.ShapeDtypeStruct`s.

  Raises:
    CliError: a `--targets` regex matches no layer of the model.
  """
  frozen = frozen_params(base, settings)
  model = base.model

  def init(frozen, key):
    _, variables = model.apply({'params': frozen}, jnp.zeros((1, 1), jnp.int32),
                               mutable=['params'], rngs={'params': key})
    return peft.split_params(variables['params']).lora

  run = functools.partial(jax.eval_shape, init) if shapes_only else jax.jit(
      init)
  report = None
  try:
    with settings.applied() as report:
      lora = run(frozen, jax.random.key(seed))
  except ValueError:
    seen = report.seen if report is not None else {}
    for target in settings.targets:
      if seen and not any(re.fullmatch(target, p) for p in seen):
        raise CliError(
            f'--targets {target!r} matches no layer. The adaptable layers '
            f'are {_layer_kinds(seen)} (N = layer index). A regex must match '
            "the whole path, e.g. '.*attn/.*'.") from None
    raise
  return Adapted(base=base, settings=settings, frozen=frozen, lora=lora,
                 specs=report.specs)


def _check_base(meta: dict[str, Any], base: base_lib.Base, where: str) -> None:
  trained = meta.get('base')
  trained = trained if isinstance(trained, dict) else {}
  config = trained.get('config')
  config = config if isinstance(config, dict) else {}
  ours = dataclasses.asdict(base.config)
  if config != ours:
    diff = {k: (config.get(k), v) for k, v in ours.items()
            if config.get(k) != v}
    raise CliError(
        f'{where} was trained on another model ({trained.get("source")!r}); '
        f'its config differs from {base.source!r} in {diff!r} (file, '
        'base). Pass the base it was trained on (--tiny, --hf-dir, --gguf).')
  if trained.get('fingerprint') != base.fingerprint:
    raise CliError(
        f'{where} was trained on the weights of {trained.get("source")!r} '
        f'(fingerprint {trained.get("fingerprint")}) but {base.source!r} '
        f'holds other weights ({base.fingerprint}), e.g. a merged model that '
        'already contains them. Pass the base it was trained on.')


def load(base: base_lib.Base, path: str) -> tuple[Adapted, dict[str, Any]]:
  """Restores `finetune`'s adapter file onto `base`.

  Returns:
    The adapted model and the file's CLI metadata.

  Raises:
    CliError: no such file, a file not written by `finetune`, or one made
      for another base model.
    ValueError: a corrupt file, or adapters that differ from the surgery
      its metadata describes (from `peft.load_adapters`).
  """
  where = f'--adapters {path!r}'
  if not os.path.isfile(path):
    raise CliError(f'{where}: no such file. Pass the adapter file that '
                   '`python -m peft finetune` wrote (its --out).')
  loaded = peft.load_adapters(path)
  meta = loaded.metadata.get(METADATA_KEY)
  if not isinstance(meta, dict):
    raise CliError(
        f'{where} holds adapters but not the {METADATA_KEY!r} metadata that '
        'says how they were made. Use a file written by `python -m peft '
        'finetune`.')
  _check_base(meta, base, where)
  settings = Settings.from_json(meta.get('settings'), where)
  shapes = adapt(base, settings, shapes_only=True)
  lora = peft.load_adapters(path, expected=shapes.specs).lora
  return shapes.with_lora(lora), meta


def without_adapters(lora: dict[str, Any]) -> dict[str, Any]:
  """`lora` with every B set to zero: the adapted model then equals its base.

  Example:
    >>> without_adapters({'q': {'lora': {'a': np.ones(2), 'b': np.ones(2)}}})
    {'q': {'lora': {'a': array([1., 1.]), 'b': array([0., 0.])}}}
  """
  def zero_b(path, leaf):
    is_b = getattr(path[-1], 'key', None) == 'b'
    return np.zeros_like(leaf) if is_b else leaf
  return jax.tree_util.tree_map_with_path(zero_b, lora)


@functools.cache
def logits_fn(config: models.DecoderConfig, settings: Settings | None):
  """A compiled `(params, tokens) -> logits`, under the surgery if given.

  Cached per (config, settings), so repeated evaluations reuse one compile.
  """
  model = models.Decoder(config=config)

  def logits(params, tokens):
    with (settings.applied() if settings else contextlib.nullcontext()):
      return model.apply({'params': params}, tokens)
  return jax.jit(logits)


def mean_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token negative log-likelihood."""
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)
  return -jnp.mean(picked)


def perplexity(config: models.DecoderConfig, settings: Settings | None,
               params: Any, held: np.ndarray) -> float:
  """Held-out perplexity `exp(mean NLL)` over every predicted token.

  The logits come from `logits_fn`, whose compile every evaluation of the
  same model and shape shares (training, `eval`, `merge`'s check).
  """
  held = jnp.asarray(held)
  logits = logits_fn(config, settings)(params, held[:, :-1])
  return float(np.exp(float(_mean_nll(logits, held[:, 1:]))))


_mean_nll = jax.jit(mean_nll)
