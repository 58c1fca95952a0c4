"""gemma's param tree <-> the reference decoder's, for Gemma 3.

Google's `gemma` package (`gm.nn.Gemma3_270M`, `gm.nn.Transformer`) lays out
a Gemma 3 decoder (Gemma Team 2025) almost as `Decoder` does; the conversion
is renames and one transpose, exact in both directions:

  ours (`Decoder`)                    gemma (`gm.nn.Transformer`)
  embedder/embedding (V, D)           embedder/input_embedding (V, D)
  layers_N/...                        layer_N/... (same names below)
  attn/q_einsum/w (N, D, H) and       the same when K < N; one
  attn/kv_einsum/w (2, K, D, H)       attn/qkv_einsum/w (3, N, D, H) when K == N
  mlp/gating_einsum (2, D, F)         (2, F, D) with transpose_gating_einsum
                                      (every Gemma 3), else (2, D, F)
  the norms, attn/_query_norm,        unchanged (both multiply by 1 + scale)
  attn/_key_norm, attn_vec_einsum,
  mlp/linear, final_norm

gemma always ties the embeddings, scales them by `sqrt(D)`, runs RMSNorm
with eps 1e-6 as `(1 + scale)` and the tanh-approximate GeLU, so only a
`DecoderConfig` with those options converts. Nothing here imports gemma;
`decoder_config_from_gemma` reads gemma's `TransformerConfig` by its
attribute names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from peft.models._config import DecoderConfig
from peft.models._weights import layer_norm_shapes

Params = dict[str, Any]
_Path = tuple[str, ...]

# What gemma's Transformer hard-codes: DecoderConfig field -> its value.
_GEMMA_FIXED = {
  'tie_embeddings': True,
  'scale_embeddings': True,
  'norm_add_one': True,
  'norm_eps': 1e-6,
  'activation': 'gelu_tanh',
}

_OURS = 'our Decoder params'
_THEIRS = "gemma's params"
_FIX = {
  _OURS: ("Pass the params tree of Decoder(config=config), without the "
          "'params' wrapper, with LoRA adapters fused or split off "
          '(peft.fuse_params or peft.split_params(params).original), and '
          'check that the config matches it.'),
  _THEIRS: ("Pass the params tree of gemma's Transformer for this config "
            "(model.init(...)['params'] or a loaded checkpoint), without "
            'LoRA adapters or a vision encoder, and check that the config '
            '(n_layers, head counts, transpose_gating_einsum) matches it.'),
}


@dataclasses.dataclass(frozen=True)
class _Kind:
  """How one gemma leaf is made from our leaves, and taken apart again."""

  to_gemma: Callable[..., Any]
  from_gemma: Callable[[Any], tuple[Any, ...]]
  gemma_shape: Callable[..., tuple[int, ...]]


def _swap(x):
  return jnp.swapaxes(x, -1, -2)


_KINDS = {
  'same': _Kind(lambda x: x, lambda x: (x,), lambda s: s),
  'swap': _Kind(_swap, lambda x: (_swap(x),),
                lambda s: (*s[:-2], s[-1], s[-2])),
  # q (N, D, H) and kv (2, N, D, H) stacked as gemma's qkv (3, N, D, H).
  'qkv': _Kind(lambda q, kv: jnp.concatenate([q[None], kv], axis=0),
               lambda qkv: (qkv[0], qkv[1:]),
               lambda q, kv: (kv[0] + 1, *kv[1:])),
}


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One gemma leaf: our leaves (paths, shapes) it is made of, and how."""

  ours: tuple[_Path, ...]
  shapes: tuple[tuple[int, ...], ...]
  theirs: _Path
  kind: str

  @property
  def gemma_shape(self) -> tuple[int, ...]:
    return _KINDS[self.kind].gemma_shape(*self.shapes)


def _check_config(config: DecoderConfig, caller: str) -> None:
  if not isinstance(config, DecoderConfig):
    raise TypeError(
      f'{caller} needs a DecoderConfig; got {config!r}. Pass the config '
      'the params were built with, e.g. gemma3_270m().')
  for name, value in _GEMMA_FIXED.items():
    got = getattr(config, name)
    if got != value:
      raise ValueError(
        f'{caller}: gemma\'s Transformer always runs {name}={value!r}, but '
        f'the config has {name}={got!r}, so its params would compute a '
        'different model there. Convert only Gemma configs (e.g. '
        'gemma3_270m()); use params_to_hf for other architectures.')


def _rules(config: DecoderConfig, transpose_gating_einsum: bool) -> list[
    _Rule]:
  """Every gemma leaf of `config`, and the leaves of ours it comes from."""
  c = config
  d, h, n, k = c.d_model, c.head_dim, c.n_heads, c.n_kv_heads
  rules = [_Rule((('embedder', 'embedding'),), ((c.vocab_size, d),),
                 ('embedder', 'input_embedding'), 'same'),
           _Rule((('final_norm', 'scale'),), ((d,),),
                 ('final_norm', 'scale'), 'same')]
  norms = layer_norm_shapes(c)  # gemma names its norms as we do.
  for i in range(c.n_layers):
    ours, theirs = f'layers_{i}', f'layer_{i}'

    def add(path, shape, kind='same', ours=ours, theirs=theirs):
      rules.append(_Rule(((ours, *path),), (shape,), (theirs, *path), kind))

    for path, shape in norms.items():
      add((*path, 'scale'), shape)
    q, kv = ('attn', 'q_einsum', 'w'), ('attn', 'kv_einsum', 'w')
    if k == n:  # gemma fuses the three projections of full multi-head.
      rules.append(_Rule(((ours, *q), (ours, *kv)), ((n, d, h), (2, k, d, h)),
                         (theirs, 'attn', 'qkv_einsum', 'w'), 'qkv'))
    else:
      add(q, (n, d, h))
      add(kv, (2, k, d, h))
    add(('attn', 'attn_vec_einsum', 'w'), (n, h, d))
    add(('mlp', 'gating_einsum'), (2, d, c.ffn_dim),
        'swap' if transpose_gating_einsum else 'same')
    add(('mlp', 'linear'), (c.ffn_dim, d))
  return rules


def gemma_shapes(config: DecoderConfig, *,
                 transpose_gating_einsum: bool = True) -> dict[
                   str, tuple[int, ...]]:
  """Every leaf of gemma's params tree for `config`, by '/'-joined path.

  Args:
    config: a Gemma config of the reference decoder.
    transpose_gating_einsum: gemma's option of that name: True (every
      Gemma 3) stores the feed-forward's gate and up kernels as (2, F, D).

  Example:
    >>> from peft.models._config import tiny_gemma3_config
    >>> shapes = gemma_shapes(tiny_gemma3_config())
    >>> shapes['embedder/input_embedding'], shapes['layer_2/mlp/gating_einsum']
    ((320, 64), (2, 128, 64))
    >>> len(shapes)
    35
  """
  _check_config(config, 'gemma_shapes')
  return {'/'.join(r.theirs): r.gemma_shape
          for r in _rules(config, transpose_gating_einsum)}


def _leaf_paths(tree: Any, path: _Path = ()) -> list[_Path]:
  if not isinstance(tree, Mapping):
    return [path]
  return [p for key, value in tree.items()
          for p in _leaf_paths(value, (*path, key))]


def _check_root(tree: Any, name: str) -> None:
  if not isinstance(tree, Mapping):
    raise TypeError(
      f'{name} must be a nested dict of arrays; got {type(tree).__name__} '
      f'{tree!r:.80}. {_FIX[name]}')
  if list(tree) == ['params']:
    raise ValueError(
      f"{name} are wrapped in {{'params': ...}}; the conversion takes the "
      "tree inside. Pass tree['params'].")


def _take(tree: Mapping[str, Any], path: _Path, shape: tuple[int, ...],
          name: str, other: tuple[tuple[int, ...], str] | None = None) -> Any:
  """The leaf at `path`, checked to have `shape`, or an error naming both.

  `other` is a known wrong shape and the fix to give for it.
  """
  node: Any = tree
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      where = '/'.join(path[:depth]) or 'the root'
      has = (f'which has {sorted(node)[:8]!r}' if isinstance(node, Mapping)
             else f'which is a {type(node).__name__}, not a dict')
      raise ValueError(
        f'{name} lack {"/".join(path)!r} (shape {shape!r}): no {key!r} '
        f'under {where!r}, {has}. {_FIX[name]}')
    node = node[key]
  got = tuple(np.shape(node))
  if got != shape:
    fix = other[1] if other is not None and got == other[0] else _FIX[name]
    raise ValueError(
      f'{name} {"/".join(path)!r} has shape {got!r}, but the config needs '
      f'{shape!r}. {fix}')
  return node


def _nest(flat: Mapping[_Path, Any]) -> Params:
  out: Params = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _convert(tree: Any, config: DecoderConfig, transpose_gating_einsum: bool,
             to_gemma: bool) -> Params:
  """The one walk both directions share: check, take, convert, nest."""
  caller = 'to_gemma_params' if to_gemma else 'from_gemma_params'
  _check_config(config, caller)
  name = _OURS if to_gemma else _THEIRS
  _check_root(tree, name)
  out, used = {}, set()
  for rule in _rules(config, transpose_gating_einsum):
    kind = _KINDS[rule.kind]
    if to_gemma:
      leaves = [_take(tree, path, shape, name)
                for path, shape in zip(rule.ours, rule.shapes)]
      out[rule.theirs] = kind.to_gemma(*leaves)
      used.update(rule.ours)
      continue
    other = None  # gemma stores the gating kernel in either of two layouts.
    if rule.theirs[-1] == 'gating_einsum':
      other = (_KINDS['swap'].gemma_shape(rule.gemma_shape),
               'That is the other layout of gating_einsum: pass '
               f'transpose_gating_einsum={not transpose_gating_einsum}, as '
               "gemma's config of this checkpoint says.")
    leaf = _take(tree, rule.theirs, rule.gemma_shape, name, other)
    out.update(zip(rule.ours, kind.from_gemma(leaf)))
    used.add(rule.theirs)
  extra = ['/'.join(p) for p in _leaf_paths(tree) if p not in used]
  if extra:
    target = "gemma's" if to_gemma else 'the Decoder'
    raise ValueError(
      f'{name} hold {len(extra)} leaf(s) that {target} tree of this config '
      f'has no place for, e.g. {extra[:3]!r}. {_FIX[name]}')
  return _nest(out)


def to_gemma_params(params: Mapping[str, Any], config: DecoderConfig, *,
                    transpose_gating_einsum: bool = True) -> Params:
  """gemma's params tree for `gm.nn.Transformer`, from our `Decoder`'s.

  Exact: leaves are renamed, transposed or stacked, never rounded, and
  keep their dtype; `from_gemma_params` inverts it. The tree has no
  `'params'` wrapper: apply gemma's model to `{'params': tree}`.

  Args:
    params: the `Decoder(config=config)` params (without `'params'`).
    config: a Gemma config of the reference decoder (see the module
      docstring for the options gemma fixes).
    transpose_gating_einsum: gemma's config option of that name (True for
      every Gemma 3): the gate/up kernel is stored (2, F, D), not (2, D, F).

  Returns:
    A nested dict in gemma's names and layouts (see `gemma_shapes`).

  Raises:
    ValueError: a leaf is missing, mis-shaped, or has no place in gemma's
      tree, or the config is not one gemma's Transformer runs.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from peft import models
    >>> from peft.models._config import tiny_gemma3_config
    >>> cfg = tiny_gemma3_config()  # 4 query heads, 2 key/value heads
    >>> tokens = jnp.ones((1, 4), jnp.int32)
    >>> params = models.Decoder(config=cfg).init(jax.random.key(0),
    ...                                          tokens)['params']
    >>> theirs = to_gemma_params(params, cfg)
    >>> sorted(theirs)
    ['embedder', 'final_norm', 'layer_0', 'layer_1', 'layer_2']
    >>> theirs['layer_0']['mlp']['gating_einsum'].shape  # (2, F, D)
    (2, 128, 64)
  """
  return _convert(params, config, transpose_gating_einsum, to_gemma=True)


def from_gemma_params(gemma_params: Mapping[str, Any], config: DecoderConfig,
                      *, transpose_gating_einsum: bool = True) -> Params:
  """Our `Decoder`'s params from gemma's (`gm.nn.Transformer`) tree.

  The exact inverse of `to_gemma_params`: `Decoder(config=config)` applied
  to the result computes what gemma's model computes on `gemma_params`.

  Args:
    gemma_params: gemma's params tree (without the `'params'` wrapper), as
      `model.init(...)['params']` or a checkpoint loader returns it.
    config: the matching config, e.g. `decoder_config_from_gemma(
      model.config)`.
    transpose_gating_einsum: gemma's config option of that name (True for
      every Gemma 3).

  Returns:
    A nested dict of `Decoder` params.

  Raises:
    ValueError: a leaf is missing, mis-shaped, or has no place in our tree,
      or the config is not one gemma's Transformer runs.

  Example:
    >>> import jax, numpy as np
    >>> from peft.models._config import tiny_gemma3_config
    >>> cfg = tiny_gemma3_config(n_kv_heads=4)  # gemma fuses q, k, v
    >>> shapes = gemma_shapes(cfg)
    >>> shapes['layer_0/attn/qkv_einsum/w']
    (3, 4, 64, 16)
    >>> rng = np.random.default_rng(0)
    >>> theirs = {}
    >>> for path, shape in shapes.items():
    ...   *keys, leaf = path.split('/')
    ...   node = theirs
    ...   for key in keys:
    ...     node = node.setdefault(key, {})
    ...   node[leaf] = rng.standard_normal(shape).astype(np.float32)
    >>> ours = from_gemma_params(theirs, cfg)
    >>> jax.tree.map(np.shape, ours['layers_0']['attn']['kv_einsum'])
    {'w': (2, 4, 64, 16)}
    >>> back = to_gemma_params(ours, cfg)
    >>> all(jax.tree.leaves(jax.tree.map(np.array_equal, back, theirs)))
    True
  """
  return _convert(gemma_params, config, transpose_gating_einsum,
                  to_gemma=False)


_GEMMA_SLIDING, _GEMMA_GLOBAL = 'LOCAL_SLIDING', 'GLOBAL'


def decoder_config_from_gemma(gemma_config: Any, *,
                              max_len: int = 32_768) -> DecoderConfig:
  """The `DecoderConfig` that runs what gemma's `TransformerConfig` runs.

  It reads gemma's config by attribute name (gemma is not imported): the
  sizes, `attention_types` (each `AttentionType.LOCAL_SLIDING` or `GLOBAL`,
  or those names), `sliding_window_size`, the local/global rotary bases,
  `query_pre_attn_scalar()`, the soft caps and the qk/post norms.
  `transpose_gating_einsum` is a layout, not a model option: pass it to
  `to_gemma_params`/`from_gemma_params`.

  Args:
    gemma_config: e.g. `gm.nn.Gemma3_270M.config`.
    max_len: the context length, which gemma's config does not record
      (32 768 for Gemma 3 270M and 1B).

  Raises:
    ValueError: for an option the reference decoder does not run (rope
      scaling, a vision encoder, layer kinds no period describes, a
      post-attention norm without a post-feed-forward one), or a missing
      attribute.

  Example:
    >>> import types
    >>> from peft.models._config import gemma3_270m
    >>> like_gemma3_270m = types.SimpleNamespace(  # gm.nn.Gemma3_270M.config
    ...     num_embed=262_144, embed_dim=640, hidden_dim=2048, num_heads=4,
    ...     head_dim=256, num_kv_heads=1, final_logit_softcap=None,
    ...     use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
    ...     attention_types=(['LOCAL_SLIDING'] * 5 + ['GLOBAL']) * 3,
    ...     query_pre_attn_scalar=lambda: 256 ** -0.5,
    ...     attn_logits_soft_cap=None, sliding_window_size=512,
    ...     local_base_frequency=10_000, global_base_frequency=1_000_000,
    ...     local_scale_factor=1.0, global_scale_factor=1.0,
    ...     vision_encoder=None)
    >>> decoder_config_from_gemma(like_gemma3_270m) == gemma3_270m()
    True
  """

  def get(name):
    if not hasattr(gemma_config, name):
      raise ValueError(
        f'gemma_config lacks {name!r} (got a {type(gemma_config).__name__}). '
        "Pass gemma's TransformerConfig, e.g. gm.nn.Gemma3_270M.config.")
    return getattr(gemma_config, name)

  if get('vision_encoder') is not None:
    raise ValueError(
      'gemma_config has a vision_encoder; the reference decoder is text '
      'only. Pass dataclasses.replace(config, vision_encoder=None) and drop '
      "the 'vision_encoder' params.")
  for name in ('local_scale_factor', 'global_scale_factor'):
    if get(name) != 1.0:
      raise ValueError(
        f'gemma_config has {name}={get(name)!r}: a scaled rope, which the '
        'reference decoder does not implement (it runs the plain rope, scale '
        '1.0). Use a Gemma 3 model without rope scaling, such as 270M or 1B.')
  post_norms = get('use_post_attn_norm')
  if get('use_post_ffw_norm') != post_norms:
    raise ValueError(
      f'gemma_config has use_post_attn_norm={post_norms!r} but '
      f'use_post_ffw_norm={get("use_post_ffw_norm")!r}; the reference '
      'decoder has one post_norms option for both. Set them equal.')
  kinds = [getattr(t, 'name', t) for t in get('attention_types')]
  if set(kinds) - {_GEMMA_SLIDING, _GEMMA_GLOBAL}:
    raise ValueError(
      f'gemma_config has attention_types={kinds!r}; each must be '
      f'{_GEMMA_SLIDING!r} or {_GEMMA_GLOBAL!r}. Fix the config.')
  sliding = [kind == _GEMMA_SLIDING for kind in kinds]
  window = get('sliding_window_size') if any(sliding) else None
  if any(sliding) and window is None:
    raise ValueError(
      f'gemma_config has sliding layers {kinds!r} but '
      'sliding_window_size=None. Set sliding_window_size.')
  pattern = None
  if any(sliding) and not all(sliding):
    pattern = sliding.index(False) + 1
  head_dim = get('head_dim')
  multiplier = float(get('query_pre_attn_scalar')())
  if not (math.isfinite(multiplier) and multiplier > 0):
    raise ValueError(
      f'gemma_config.query_pre_attn_scalar() is {multiplier!r}; a query '
      'scale must be a positive number. Fix query_pre_attn_norm.')
  scalar = None  # ours: queries times scalar ** -0.5; None means head_dim
  if multiplier != head_dim ** -0.5:
    scalar = multiplier ** -2
    if math.isclose(scalar, round(scalar), rel_tol=1e-12):
      scalar = float(round(scalar))
    scalar = None if scalar == head_dim else scalar
  config = DecoderConfig(
    vocab_size=get('num_embed'), d_model=get('embed_dim'),
    n_layers=len(kinds), n_heads=get('num_heads'),
    n_kv_heads=get('num_kv_heads'), head_dim=head_dim,
    ffn_dim=get('hidden_dim'),
    rope_theta=float(get('global_base_frequency')),
    query_pre_attn_scalar=scalar, max_len=max_len,
    qk_norm=get('use_qk_norm'), post_norms=post_norms,
    sliding_window=window, sliding_window_pattern=pattern,
    rope_local_theta=(float(get('local_base_frequency')) if any(sliding)
                      else None),
    attn_logit_softcap=get('attn_logits_soft_cap'),
    final_logit_softcap=get('final_logit_softcap'),
    **_GEMMA_FIXED)
  ours = [config.is_sliding(i) for i in range(config.n_layers)]
  if ours != sliding:
    raise ValueError(
      f'gemma_config has attention_types={kinds!r}: global layers at '
      f'{[i for i, s in enumerate(sliding) if not s]}, which is not every '
      'N-th layer; the reference decoder runs periodic patterns only '
      '(layers N-1, 2N-1, ...). Use a model with a periodic pattern.')
  return config
