"""LoRA and QLoRA surgery on the base model, from flags or an adapter file.

`Settings` holds what the flags say (`--targets`, `--rank`, `--alpha`,
`--dropout`, `--quantize`, `--use-dora`); `finetune` stores it in the
adapter file's metadata, with the base model's config and fingerprint, so
that `eval`, `sample` and `merge` rebuild the same surgery from the file
alone and refuse a file made for another base.

Where `--adapters` (or `finetune --init-adapters`) names a Hugging Face PEFT
directory instead, `peft.models.load_hf_peft` reads it and the surgery is
one rule per adapted kernel (`Settings.kernels`); the HF config travels in
the metadata of what `finetune` saves, so `export` can write it back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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
from peft._cli import parser as parser_lib
from peft.models import _hf_peft
from peft.models import _hf_peft_format

CliError = base_lib.CliError

# The reference decoder's own einsum layer takes its param name from an
# attribute (its feed-forward keeps two kernels in one scope).
_hf_peft.register_decoder_layers()

METADATA_KEY = 'peft_cli'
# Beside the settings in METADATA_KEY: the HF PEFT config adapters were
# read with, for `export`.
HF_CONFIG_KEY = _hf_peft_format.METADATA_KEY
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
    use_dora: DoRA adapters (a magnitude beside A and B).
  """

  targets: tuple[str, ...]
  rank: int
  alpha: float | None = None
  dropout: float = 0.0
  quantize: str | None = None
  use_dora: bool = False
  # (module path, kernel name, rank, alpha, use_rslora) of each adapted
  # kernel, for adapters read from a Hugging Face PEFT directory (their
  # ranks and scales vary per kernel); then `targets` is empty.
  kernels: tuple[tuple[str, str, int, float | None, bool], ...] = ()

  @classmethod
  def from_args(cls, args: Any) -> Settings:
    return cls(targets=tuple(args.targets or parser_lib.DEFAULT_TARGETS),
               rank=args.rank or parser_lib.DEFAULT_RANK,
               alpha=parser_lib.DEFAULT_ALPHA if args.alpha is None
               else args.alpha,
               dropout=args.dropout, quantize=args.quantize,
               use_dora=args.use_dora)

  @classmethod
  def from_hf_peft(cls, loaded: models.HFAdapters, *, dropout: float = 0.0,
                   quantize: str | None = None) -> Settings:
    """The surgery that rebuilds HF PEFT adapters (one rule per kernel)."""
    kernels = tuple(
        (rule.targets[0].path, rule.targets[0].weight_name, rule.rank,
         rule.alpha, rule.use_rslora) for rule in loaded.rules)
    # An HF PEFT adapter is DoRA or LoRA as a whole (one use_dora).
    return cls(targets=(), rank=max(k[2] for k in kernels), dropout=dropout,
               quantize=quantize, kernels=kernels,
               use_dora=any(rule.use_dora for rule in loaded.rules))

  def rules(self) -> tuple[peft.LoRARule, ...]:
    if not self.kernels:
      return peft.lora(self.rank, targets=self.targets, alpha=self.alpha,
                       dropout=self.dropout or None,
                       use_dora=self.use_dora).rules
    return tuple(
        peft.LoRARule(rank=rank, alpha=alpha, use_rslora=use_rslora,
                      dropout=self.dropout, use_dora=self.use_dora,
                      targets=_hf_peft.KernelTarget(path, weight))
        for path, weight, rank, alpha, use_rslora in self.kernels)

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'targets': list(self.targets),
            'kernels': [list(k) for k in self.kernels]}

  @classmethod
  def from_json(cls, data: Any, where: str) -> Settings:
    settings = None
    try:
      fields: dict[str, Any] = {
          **data, 'targets': tuple(data['targets']),
          'kernels': tuple(tuple(k) for k in data.get('kernels', ()))}
      read = cls(**fields)
      read.rules()  # The kernels' ranks and alphas are valid.
      if (isinstance(read.rank, int) and read.rank > 0
          and read.quantize in (None, *QUANTIZATIONS)
          and isinstance(read.use_dora, bool)):
        settings = read
    except (TypeError, KeyError, ValueError):
      pass
    if settings is None:
      raise CliError(f'{where} has unreadable surgery settings {data!r}. '
                     'Re-create the file with `python -m peft finetune`.')
    return settings

  @contextlib.contextmanager
  def applied(self) -> Iterator[peft.LoRAReport]:
    """Enters the surgery (quantized base outside, LoRA inside)."""
    with contextlib.ExitStack() as stack:
      if self.quantize:
        stack.enter_context(peft.quantized(self.quantize))
      yield stack.enter_context(peft.lora(rules=self.rules()))


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
  # The Hugging Face PEFT config the adapters came from, if they did.
  hf_config: dict[str, Any] | None = None

  @property
  def params(self) -> Mapping[str, Any]:
    return peft.merge_params(self.frozen, self.lora)

  def with_lora(self, lora: dict[str, Any]) -> Adapted:
    return dataclasses.replace(self, lora=lora)

  def as_base(self) -> Adapted:
    """These adapters made to add nothing: B = 0 and DoRA's `m` back at
    `||W||`, so the adapted model computes its base (for QLoRA, the
    quantized base)."""
    zeroed = peft.merge_params(self.frozen, without_adapters(self.lora))
    if any(s.use_dora for s in self.specs):
      zeroed = peft.init_dora_magnitudes(zeroed, self.specs)
    return self.with_lora(dict(peft.split_params(zeroed).lora))

  def metadata(self, **extra: Any) -> dict[str, Any]:
    """What `finetune` stores in the adapter file."""
    hf = {} if self.hf_config is None else {HF_CONFIG_KEY: self.hf_config}
    return {METADATA_KEY: {
        'settings': self.settings.to_json(),
        'base': {'source': self.base.source,
                 'config': dataclasses.asdict(self.base.config),
                 'fingerprint': self.base.fingerprint},
        **hf, **extra}}


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


class _Absent:
  """A config key that one side does not have."""

  def __repr__(self) -> str:
    return '<absent>'


_ABSENT = _Absent()


# DecoderConfig fields added after the CLI began writing adapter files (the
# Gemma 3 options): a file without them trained with their defaults. Any
# other missing field is a difference.
_ADDED_FIELDS = ('qk_norm', 'post_norms', 'sliding_window',
                 'sliding_window_pattern', 'rope_local_theta',
                 'attn_logit_softcap', 'final_logit_softcap')
_CONFIG_DEFAULTS = {f.name: f.default
                    for f in dataclasses.fields(models.DecoderConfig)
                    if f.name in _ADDED_FIELDS}


def _check_base(meta: dict[str, Any], base: base_lib.Base, where: str) -> None:
  trained = meta.get('base')
  trained = trained if isinstance(trained, dict) else {}
  config = trained.get('config')
  config = config if isinstance(config, dict) else {}
  config = {**_CONFIG_DEFAULTS, **config}
  ours = dataclasses.asdict(base.config)
  if config != ours:
    diff = {k: (config.get(k, _ABSENT), ours.get(k, _ABSENT))
            for k in [*ours, *(k for k in config if k not in ours)]
            if config.get(k, _ABSENT) != ours.get(k, _ABSENT)}
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


def is_hf_peft_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, _hf_peft_format.CONFIG_FILE))


def load_hf_peft(base: base_lib.Base, path: str, *, flag: str = '--adapters',
                 **settings: Any) -> Adapted:
  """A Hugging Face PEFT adapter directory on `base` (`settings`: dropout,
  quantize of the surgery that runs it)."""
  try:
    loaded = models.load_hf_peft(path, base.config, params=base.params)
  except ValueError as e:
    raise CliError(f'{flag} {path!r}: {e}') from None
  surgery = Settings.from_hf_peft(loaded, **settings)
  return Adapted(base=base, settings=surgery,
                 frozen=frozen_params(base, surgery), lora=loaded.lora,
                 specs=loaded.specs, hf_config=loaded.hf_config)


def load(base: base_lib.Base, path: str, *, flag: str = '--adapters'
         ) -> tuple[Adapted, dict[str, Any]]:
  """Restores `finetune`'s adapter file (or an HF PEFT directory) onto
  `base`.

  Returns:
    The adapted model and the file's CLI metadata (`{}` for HF PEFT).

  Raises:
    CliError: no such file, a file not written by `finetune`, or one made
      for another base model; an HF PEFT directory that does not fit.
    ValueError: a corrupt file, or adapters that differ from the surgery
      its metadata describes (from `peft.load_adapters`).
  """
  where = f'{flag} {path!r}'
  if os.path.isdir(path) and is_hf_peft_dir(path):
    return load_hf_peft(base, path, flag=flag), {}
  if not os.path.isfile(path):
    raise CliError(f'{where}: no such file. Pass the adapter file that '
                   '`python -m peft finetune` wrote (its --out), or a '
                   'Hugging Face PEFT adapter directory.')
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
  adapted = dataclasses.replace(shapes, lora=lora,
                                hf_config=meta.get(HF_CONFIG_KEY))
  return adapted, meta


def initial(base: base_lib.Base, args: Any) -> Adapted:
  """The adapters `finetune` starts from: fresh ones from the surgery flags,
  or `--init-adapters` (whose surgery, with this run's `--dropout` and
  `--quantize`, they bring along).

  Raises:
    CliError: `--init-adapters` with surgery flags it would override.
  """
  if not args.init_adapters:
    return adapt(base, Settings.from_args(args), seed=args.seed)
  given = [f'--{f}' for f in ('targets', 'rank', 'alpha')
           if getattr(args, f) is not None]
  given += ['--use-dora'] if args.use_dora else []
  if given:
    raise CliError(
        f'--init-adapters {args.init_adapters!r} brings its own surgery, '
        f'so {", ".join(given)} would not apply. Drop them (or drop '
        '--init-adapters to train fresh adapters).')
  path, flag = args.init_adapters, '--init-adapters'
  if os.path.isdir(path) and is_hf_peft_dir(path):
    return load_hf_peft(base, path, flag=flag, dropout=args.dropout,
                        quantize=args.quantize)
  adapted, _ = load(base, path, flag=flag)
  settings = dataclasses.replace(adapted.settings, dropout=args.dropout,
                                 quantize=args.quantize)
  return dataclasses.replace(adapted, settings=settings,
                             frozen=frozen_params(base, settings))


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
def logits_fn(config: models.DecoderConfig, settings: Settings | None,
              scan_layers: bool = False):
  """A compiled `(params, tokens) -> logits`, under the surgery if given.

  Cached per (config, settings, scan_layers), so repeated evaluations reuse
  one compile. With `scan_layers`, `params` are in `models.stack_layers`'
  layout.
  """
  model = models.Decoder(config=config, scan_layers=scan_layers)

  def logits(params, tokens):
    with (settings.applied() if settings else contextlib.nullcontext()):
      return model.apply({'params': params}, tokens)
  return jax.jit(logits)


def mean_nll(logits: jax.Array, targets: jax.Array,
             weights: jax.Array | None = None) -> jax.Array:
  """Mean next-token negative log-likelihood over the weighted targets.

  `weights` (like `targets`; default all ones) is 0 where a token is no
  target (a prompt, a user turn, a pad).
  """
  total, count = nll_sums(logits, targets, weights)
  return total / jnp.maximum(count, 1.0)


def nll_sums(logits, targets, weights):
  """`(sum of weighted NLL, sum of weights)`."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  if weights is None:
    weights = jnp.ones_like(picked)
  return -jnp.sum(picked * weights), jnp.sum(weights)


# Held-out rows per compiled evaluation call; a last partial chunk is
# padded with rows of zero weight, so every call has one shape.
EVAL_CHUNK = 8


def perplexity(config: models.DecoderConfig, settings: Settings | None,
               params: Any, held: np.ndarray,
               weights: np.ndarray | None = None, *,
               scan_layers: bool = False) -> float:
  """Held-out perplexity `exp(mean NLL)` over the weighted targets.

  `held` is `(n, length)` token rows, `weights` `(n, length - 1)` (default
  all ones: every predicted token). The logits come from `logits_fn`,
  whose compile every evaluation of the same model and shape shares
  (training, `eval`, `merge`'s check).
  """
  held = np.asarray(held)
  if weights is None:
    weights = np.ones((held.shape[0], held.shape[1] - 1), np.float32)
  total = count = 0.0
  for start in range(0, len(held), EVAL_CHUNK):
    tokens = held[start:start + EVAL_CHUNK]
    w = weights[start:start + EVAL_CHUNK]
    if len(tokens) < EVAL_CHUNK and len(held) > EVAL_CHUNK:
      pad = EVAL_CHUNK - len(tokens)
      tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
      w = np.concatenate([w, np.zeros((pad, w.shape[1]), w.dtype)])
    logits = logits_fn(config, settings, scan_layers)(
        params, jnp.asarray(tokens[:, :-1]))
    nll, n = _jit_nll_sums(logits, jnp.asarray(tokens[:, 1:]),
                           jnp.asarray(w))
    total, count = total + float(nll), count + float(n)
  return float(np.exp(total / max(count, 1.0)))


_jit_nll_sums = jax.jit(nll_sums)
