"""Hugging Face PEFT LoRA adapters <-> peft adapters of the reference decoder.

An HF PEFT adapter directory holds `adapter_config.json` (`r`, `lora_alpha`,
`use_rslora`, `target_modules`, `rank_pattern`, `alpha_pattern`, ...) and
`adapter_model.safetensors` with, per adapted `nn.Linear` of the torch
model, `lora_A.weight` `(r, in)` and `lora_B.weight` `(out, r)`; the update
is `scale * B @ A` with `scale = alpha / r` (or `alpha / sqrt(r)`).

Our decoder keeps Gemma's layout: one `kv_einsum` kernel for k and v, one
`gating_einsum` for gate and up. Their adapters are one A and one B over
the stack, so two HF adapters land in one of ours *exactly* in block form:
A is `[A_k | A_v]` (rank `r_k + r_v`) and B holds B_k in the k slot of its
first `r_k` rows and B_v in the v slot of the rest, zeros elsewhere. The
stacked kernel stays one einsum. Going back is exact too: an untouched
block form splits into the two HF adapters it came from; a trained one
(whose zero blocks have moved), like one trained here (one A shared by k
and v), exports both projections with the shared A at the full rank, which
is the same update; and two HF adapters with the same A load back as that
shared form.

This module is toolkit glue: it runs peft's surgery on the decoder to get
the adapters' specs (the decoder code itself imports nothing from peft).
GGUF-loaded weights need no adapter permutation: `load_gguf` un-permutes
llama.cpp's rotary q/k rows, so our kernels are in HF's row order.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
import pathlib
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import peft
from peft._core import dora as _dora
from peft._core import fuse as _fuse
from peft.models import _hf_peft_format as fmt
from peft.models._config import DecoderConfig
from peft.models._decoder import Decoder
from peft.models._decoder import Einsum


def register_decoder_layers() -> None:
  """Registers the decoder's `Einsum` with surgery (idempotent).

  Its param name is an attribute (the feed-forward keeps two kernels in one
  scope), so its adapters are `lora_<weight name>`.
  """
  peft.register_einsum_layer(Einsum, weight_name=lambda m: m.weight_name)


register_decoder_layers()


@dataclasses.dataclass(frozen=True)
class KernelTarget:
  """A surgery target: the decoder kernel `weight_name` at module `path`.

  A predicate (not a path regex) because the feed-forward's two kernels
  share one module path; equal targets compare equal, so surgeries built
  from the same adapters share compiled traces.
  """

  path: str
  weight_name: str

  @property
  def __name__(self) -> str:  # what surgery reports name the target by
    return f'{self.path}/{self.weight_name}'

  def __call__(self, module: Any) -> bool:
    return (isinstance(module, Einsum) and module.scope is not None
            and '/'.join(module.path) == self.path
            and module.weight_name == self.weight_name)


class HFAdapters(NamedTuple):
  """An HF PEFT adapter in peft's terms (what `load_hf_peft` returns).

  Example:
    >>> HFAdapters._fields
    ('lora', 'specs', 'rules', 'hf_config')

  Attributes:
    lora: the adapter tree for `Decoder` params (`merge_params`-ready).
    specs: the adapters' `AdapterSpec`s (for fuse and `save_adapters`).
    rules: `LoRARule`s that rebuild exactly these adapters under surgery
      (`peft.lora(rules=...)`), e.g. to keep training them.
    hf_config: the `adapter_config.json` as read.
  """

  lora: dict[str, Any]
  specs: tuple[peft.AdapterSpec, ...]
  rules: tuple[peft.LoRARule, ...]
  hf_config: dict[str, Any]


class _Projection(NamedTuple):
  """One HF adapter: `model.layers.N.<proj>`, its A `(r, in)`, B `(out, r)`
  and, for DoRA, its magnitude `m` `(out,)`."""

  layer: int
  proj: str
  a: np.ndarray
  b: np.ndarray
  m: np.ndarray | None = None

  @property
  def module(self) -> str:
    return f'model.layers.{self.layer}.{self.proj}'

  @property
  def ours(self) -> tuple[str, str, int | None]:
    """(our module path, our kernel name, slot)."""
    path, weight, slot = fmt.PROJECTIONS[self.proj]
    return f'layers_{self.layer}/{path}', weight, slot


def _read_projections(directory: pathlib.Path, config,
                      n_layers: int) -> list[_Projection]:
  file = directory / fmt.WEIGHTS_FILE
  try:
    tensors = safetensors.numpy.load_file(file)
  except FileNotFoundError:
    raise FileNotFoundError(
        f'{str(directory)!r} has no {fmt.WEIGHTS_FILE}. Point at the directory '
        'PeftModel.save_pretrained wrote.') from None
  except Exception as e:  # safetensors' error type is not a ValueError.
    raise fmt.error(file, f'safetensors could not read it ({e})',
                 'The file is truncated or corrupt; copy it again.') from None
  found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
  for name, value in tensors.items():
    match = fmt.TENSOR.match(name)
    if match is None:
      what = ('an embedding LoRA' if 'lora_embedding' in name else
              'not a LoRA factor of a Llama/Gemma projection')
      raise fmt.error(file, f'tensor {name!r} is {what}',
                   'peft loads LoRA on q/k/v/o/gate/up/down projections.')
    layer, proj, factor = int(match[1]), match[2], match[3] or 'm'
    if layer >= n_layers:
      raise fmt.error(file, f'tensor {name!r} is for layer {layer} but the '
                   f'model has {n_layers}', 'Load the base model the '
                   'adapter was trained on.')
    found.setdefault((layer, proj), {})[factor] = value.astype(np.float32)
  projections = []
  dora = bool(config.get('use_dora', False))
  for (layer, proj), factors in sorted(found.items()):
    module = f'model.layers.{layer}.{proj}'
    if not {'A', 'B'} <= set(factors):
      raise fmt.error(file, f'{module} has only lora_'
                   f'{"".join(sorted(set(factors) - {"m"}))}',
                   'The file is incomplete.')
    if ('m' in factors) != dora:
      raise fmt.error(
          file, f'{module} has a DoRA magnitude ({fmt.MAGNITUDE_SUFFIX}) but '
          'the config does not set use_dora' if not dora else
          f'the config sets use_dora=True but {module} has no '
          f'{fmt.MAGNITUDE_SUFFIX}', 'The config and the weights do not '
          'belong together.')
    p = _Projection(layer, proj, factors['A'], factors['B'], factors.get('m'))
    if p.a.ndim != 2 or p.b.ndim != 2 or p.a.shape[0] != p.b.shape[1]:
      raise fmt.error(file, f'{p.module} has lora_A {p.a.shape} and lora_B '
                   f'{p.b.shape}, which do not share a rank',
                   'The file is corrupt.')
    if p.m is not None and p.m.shape != p.b.shape[:1]:
      raise fmt.error(file, f'{p.module} has {fmt.MAGNITUDE_SUFFIX} '
                   f'{p.m.shape} but lora_B {p.b.shape}; DoRA keeps one '
                   'magnitude per output row', 'The file is corrupt.')
    expected_rank = fmt.pattern_value(config.get('rank_pattern'), p.module,
                                   config['r'])
    if p.a.shape[0] != expected_rank:
      raise fmt.error(file, f'{p.module} has rank {p.a.shape[0]} but the '
                   f'config says {expected_rank} (r / rank_pattern)',
                   'The config and the weights do not belong together.')
    projections.append(p)
  if not projections:
    raise fmt.error(file, 'it holds no LoRA tensors', 'Use a LoRA adapter.')
  return projections


def _shares_a(parts: Sequence[_Projection], scales: Sequence[float]) -> bool:
  """Whether stacked HF adapters are one of ours split up by an export:
  the same A (bit for bit) and the same scale."""
  return len(parts) > 1 and len(set(scales)) == 1 and all(
      np.array_equal(p.a, parts[0].a) for p in parts[1:])


def _block(parts: Sequence[tuple[int | None, np.ndarray, np.ndarray, float]],
           a_shape, b_shape, *, shared: bool):
  """Our A and B from HF parts `(slot, A (r, in), B (out, r), hf scale)`.

  A single part is reshaped. Stacked parts with `shared` A fill the slots
  of one B; others go to block form, whose scale is the first part's: each
  B is multiplied by `its scale / that scale` (exactly 1, so B is copied
  bit for bit, when the scales agree).
  """
  scale = parts[0][3]
  in_dims, out_dims = a_shape[:-1], b_shape[1:]
  if parts[0][0] is not None:
    out_dims = out_dims[1:]  # (slot, *out) after the rank
  if shared:
    rank = parts[0][1].shape[0]
    b_full = np.zeros((rank, b_shape[1], *out_dims), np.float32)
    for slot, _, b, _ in parts:
      b_full[:, slot] = b.T.reshape(rank, *out_dims)
    return parts[0][1].T.reshape(*in_dims, rank), b_full
  a_cols, b_rows = [], []
  for slot, a, b, part_scale in parts:
    rank = a.shape[0]
    a_cols.append(a.T.reshape(*in_dims, rank))
    b_part = b.T.reshape(rank, *out_dims)
    if part_scale != scale:
      b_part = b_part * np.float32(part_scale / scale)
    if slot is None:
      b_rows.append(b_part)
    else:
      full = np.zeros((rank, b_shape[1], *out_dims), np.float32)
      full[:, slot] = b_part
      b_rows.append(full)
  return np.concatenate(a_cols, -1), np.concatenate(b_rows, 0)


def _specs_for(config: DecoderConfig, rules) -> tuple[peft.AdapterSpec, ...]:
  """What surgery records for `rules` on the decoder (shapes only)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  with peft.lora(rules=rules) as report:
    jax.eval_shape(Decoder(config=config).init, jax.random.key(0), tokens)
  return report.specs


def _magnitude(parts: Sequence[_Projection], spec: peft.AdapterSpec,
               params: Any, directory: pathlib.Path) -> np.ndarray:
  """Our DoRA `m` (`spec.magnitude_shape`) from the HF parts' magnitudes.

  A stacked kernel (k and v, gate and up) takes one slot per part; a slot
  no HF adapter covers has B = 0 there, so its `m` is the base kernel's
  norm (read from `params`), which leaves that projection as it was.
  """
  shape = spec.magnitude_shape
  # `_read_projections` checked that every part of a DoRA file has one.
  magnitudes = [cast(np.ndarray, p.m) for p in parts]
  if parts[0].ours[2] is None:
    return magnitudes[0].reshape(shape)
  m = np.empty(shape, np.float32)
  missing = set(range(shape[0])) - {p.ours[2] for p in parts}
  if missing:
    if params is None:
      raise fmt.error(directory, f'DoRA adapts {[p.module for p in parts]} '
                      f'but not the other half of {spec.key!r}, whose '
                      'magnitude must start at the base kernel\'s norm',
                      'Pass the base params: load_hf_peft(directory, '
                      'config, params=params).')
    kernel = _fuse.get_kernel(params, spec, 'load_hf_peft', dequantize=True)
    norm = np.asarray(_dora.column_norm(kernel, spec.magnitude_axes))
    for slot in missing:
      m[slot] = norm[slot]
  for p, part_m in zip(parts, magnitudes):
    m[p.ours[2]] = part_m.reshape(shape[1:])
  return m


def load_hf_peft(directory: str | os.PathLike[str],
                 config: DecoderConfig, *,
                 params: Any = None) -> HFAdapters:
  """Reads an HF PEFT LoRA (or DoRA) adapter for the reference decoder.

  The result computes what the adapter computes in torch on the same base
  model: `fuse_params(merge_params(base, lora), specs)` gives the merged
  weights, and `peft.lora(rules=rules)` rebuilds the adapters to evaluate
  or keep training them.

  An adapter this module wrote loads as `PeftModel.save_pretrained`'s do.
  A DoRA adapter (`use_dora: true`, a `lora_magnitude_vector` per
  projection) loads with each magnitude beside its A and B; when it adapts
  one half of a stacked kernel (HF's usual q/v choice adapts v but not k),
  the other half's magnitude is that kernel's norm, read from `params`.

  Example:
    >>> import tempfile
    >>> from peft.models import tiny_config
    >>> cfg = tiny_config()
    >>> lora, specs = _example_adapters(cfg)
    >>> directory = tempfile.mkdtemp()
    >>> from peft import models
    >>> _ = models.save_hf_peft(directory, lora, specs)
    >>> loaded = load_hf_peft(directory, cfg)
    >>> [(s.key, s.rank) for s in loaded.specs]
    [('layers_0/attn/q_einsum/lora_w', 2),
     ('layers_0/attn/kv_einsum/lora_w', 2)]
    >>> with peft.lora(rules=loaded.rules) as report:
    ...   _ = jax.eval_shape(Decoder(config=cfg).init, jax.random.key(0),
    ...                      jnp.ones((1, 2), jnp.int32))
    >>> report.specs == loaded.specs
    True

  Args:
    directory: what `PeftModel.save_pretrained` wrote.
    config: the base model's config (the adapter's model).
    params: the base params; needed only for a DoRA adapter on one half of
      a stacked kernel (the error says so).

  Returns:
    `HFAdapters(lora, specs, rules, hf_config)`.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: an unsupported config field (named), a tensor that is not a
      LoRA factor of a projection, or shapes that do not fit `config`.
  """
  directory = pathlib.Path(directory)
  hf_config = fmt.read_hf_config(directory)
  projections = _read_projections(directory, hf_config, config.n_layers)
  groups: dict[tuple[str, str], list[_Projection]] = {}
  for p in projections:
    groups.setdefault(p.ours[:2], []).append(p)
  plans = {}
  for (path, weight), parts in groups.items():
    parts.sort(key=lambda p: p.ours[2] or 0)
    scales = [fmt.hf_scale(hf_config, p.module, p.a.shape[0])[1] for p in parts]
    shared = _shares_a(parts, scales)
    if len(parts) == 1 or shared:
      rank = parts[0].a.shape[0]
      alpha, _ = fmt.hf_scale(hf_config, parts[0].module, rank)
      use_rslora = bool(hf_config.get('use_rslora', False))
    else:  # block form: the 1st part's scale, without rsLoRA
      rank = sum(p.a.shape[0] for p in parts)
      alpha, use_rslora = scales[0] * rank, False
    plans[path, weight] = (parts, scales, shared, rank, alpha, use_rslora)
  dora = bool(hf_config.get('use_dora', False))
  rules = tuple(
      peft.LoRARule(rank=rank, alpha=alpha, use_rslora=use_rslora,
                    use_dora=dora, targets=KernelTarget(path, weight))
      for (path, weight), (*_, rank, alpha, use_rslora) in plans.items())
  try:
    specs = _specs_for(config, rules)
  except ValueError as e:
    raise fmt.error(directory, f'it does not fit the model ({e})',
                 'Load the base model the adapter was trained on.') from None
  lora: dict[str, Any] = {}
  for spec in specs:
    parts, scales, shared, *_ = plans['/'.join(spec.path), spec.weight_name]
    try:
      a, b = _block([(p.ours[2], p.a, p.b, s) for p, s in zip(parts, scales)],
                    spec.a_shape, spec.b_shape, shared=shared)
    except ValueError as e:
      raise fmt.error(directory, f'{[p.module for p in parts]} do not fit '
                   f'{spec.key!r} ({e})',
                   'Load the base model the adapter was trained on.') from None
    node = lora
    for key in spec.adapter_path:
      node = node.setdefault(key, {})
    node.update(a=jnp.asarray(a), b=jnp.asarray(b))
    if dora:
      node[_dora.MAGNITUDE] = jnp.asarray(
          _magnitude(parts, spec, params, directory))
  return HFAdapters(lora, tuple(specs), rules, hf_config)


def _example_adapters(config: DecoderConfig):
  """Rank-2 adapters on layer 0's q and kv kernels, for the examples."""
  with peft.lora(rank=2, targets='layers_0/attn/(q|kv)_einsum') as report:
    params = Decoder(config=config).init(jax.random.key(0),
                                         jnp.ones((1, 2), jnp.int32))
  return peft.split_params(params['params']).lora, report.specs
