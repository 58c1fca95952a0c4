"""The param layout of a Decoder that scans over its blocks.

`Decoder(scan_layers=True)` runs its blocks as one `jax.lax.scan`, so the
program holds one block (one period of blocks) instead of all of them:
SmolLM2-135M's LoRA step then traces in about a quarter of the time and a
second run loads it from JAX's cache in a quarter (docs/benchmarks.md). The
scan reads each block's params from arrays stacked along a new leading
axis; `stack_layers` makes that layout from the unrolled one
(`layers_0 ... layers_{n-1}`) and `unstack_layers` takes it back, so
checkpoints, adapter files and Hugging Face loading keep the unrolled
layout and only a scanning model sees the stacked one.

Blocks that differ by index (Gemma 3's sliding and global attention) are
scanned a period at a time: with a pattern of P, the scan's body runs P
blocks, `layers_0 ... layers_{P-1}`, and the stacked tree holds, for each
j < P, blocks j, j + P, j + 2P, ... stacked under `scanned_layers/layers_j`.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import jax
import jax.numpy as jnp

from peft.models._config import DecoderConfig

SCANNED = 'scanned_layers'
_LAYER = re.compile(r'layers_(\d+)')


def layer_period(config: DecoderConfig) -> int:
  """How many consecutive blocks one step of the scan runs.

  Blocks repeat with the sliding-window pattern (Gemma 3: five sliding, one
  global), so the scan's body holds one whole pattern; blocks that are all
  alike are scanned one at a time.

  Example:
    >>> from peft import models
    >>> layer_period(models.smollm2_135m()), layer_period(models.gemma3_270m())
    (1, 6)
  """
  pattern = config.sliding_window_pattern
  if config.sliding_window is None or not pattern:
    return 1
  return pattern


def _check_period(config: DecoderConfig) -> tuple[int, int]:
  period = layer_period(config)
  if config.n_layers % period:
    raise ValueError(
        f'scan_layers: the {config.n_layers} blocks do not split into whole '
        f'periods of the sliding-window pattern ({period}), so the blocks of '
        'one scan step would differ. Run the Decoder unrolled '
        '(scan_layers=False).')
  return period, config.n_layers // period


def stack_layers(params: Mapping[str, Any],
                 config: DecoderConfig) -> dict[str, Any]:
  """`params` with the blocks stacked for `Decoder(scan_layers=True)`.

  Entries other than `layers_*` are kept as they are. `params` may hold
  the whole model or a part of it (adapters only): either every block or
  none of them, all alike in structure and shapes.

  Example:
    >>> import numpy as np
    >>> from peft import models
    >>> config = models.tiny_config()  # 2 blocks
    >>> params = {'layers_0': {'w': np.zeros(3)}, 'layers_1': {'w': np.ones(3)},
    ...           'final_norm': {'scale': np.ones(3)}}
    >>> stacked = stack_layers(params, config)
    >>> stacked['scanned_layers']['layers_0']['w'].shape
    (2, 3)
    >>> unstack_layers(stacked, config)['layers_1']['w']
    Array([1., 1., 1.], dtype=float32)

  Raises:
    ValueError: blocks are missing or differ in structure or shape, or
      `config.n_layers` is not a whole number of periods.
  """
  period, groups = _check_period(config)
  layers = {k: v for k, v in params.items() if _LAYER.fullmatch(k)}
  out = {k: v for k, v in params.items() if k not in layers}
  if not layers:
    return out
  wanted = {f'layers_{i}' for i in range(config.n_layers)}
  if set(layers) != wanted:
    missing = sorted(wanted - set(layers), key=_index)
    extra = sorted(set(layers) - wanted, key=_index)
    wrong = ' and '.join(([f'lack {missing[:4]}'] if missing else []) +
                         ([f'have extra {extra[:4]}'] if extra else []))
    raise ValueError(
        f'stack_layers: a scanning Decoder needs all {config.n_layers} '
        f'blocks alike; these params {wrong}. Adapt every block (or none), '
        'or run the Decoder unrolled (scan_layers=False).')
  out[SCANNED] = {
      f'layers_{j}': _stack([f'layers_{g * period + j}' for g in range(groups)],
                            layers)
      for j in range(period)}
  return out


def unstack_layers(params: Mapping[str, Any],
                   config: DecoderConfig) -> dict[str, Any]:
  """The inverse of `stack_layers`: blocks back as `layers_0 ... layers_{n-1}`.

  Example:
    >>> import numpy as np
    >>> from peft import models
    >>> config = models.tiny_config()  # 2 blocks
    >>> w = np.arange(4.0).reshape(2, 2)  # Blocks 0 and 1 of `w`.
    >>> stacked = {'scanned_layers': {'layers_0': {'w': w}}}
    >>> unstacked = unstack_layers(stacked, config)
    >>> sorted(unstacked), unstacked['layers_1']['w'].tolist()
    (['layers_0', 'layers_1'], [2.0, 3.0])

  Raises:
    ValueError: `params[SCANNED]` holds an entry that is no block of a
      period, or lacks one (another config's stacking).
  """
  period, groups = _check_period(config)
  out = {k: v for k, v in params.items() if k != SCANNED}
  scanned = params.get(SCANNED, {})
  wanted = [f'layers_{j}' for j in range(period)]
  for name in scanned:
    if name not in wanted:
      raise ValueError(
          f'unstack_layers: {SCANNED}/{name} is no block of a period of '
          f'{period}. Pass params made by stack_layers with this config.')
  if scanned and len(scanned) < period:
    raise ValueError(
        f'unstack_layers: {SCANNED} lacks '
        f'{[n for n in wanted if n not in scanned]} of a period of {period}. '
        'Pass params made by stack_layers with this config.')
  for j, name in enumerate(wanted if scanned else []):
    for g in range(groups):
      out[f'layers_{g * period + j}'] = jax.tree.map(
          lambda leaf, g=g: leaf[g], scanned[name])
  return out


def _index(name: str) -> int:
  return int(name.rsplit('_', 1)[1])


def _stack(names: list[str], layers: Mapping[str, Any]) -> Any:
  first = layers[names[0]]
  for name in names[1:]:
    if _signature(layers[name]) != _signature(first):
      raise ValueError(
          f'stack_layers: {name} differs from {names[0]} in structure or '
          f'shapes ({_difference(layers[names[0]], layers[name])}), so one '
          'scan step cannot run both. Adapt the blocks alike, or run the '
          'Decoder unrolled (scan_layers=False).')
  return jax.tree.map(lambda *leaves: jnp.stack(leaves),
                      *[layers[n] for n in names])


def _signature(tree: Any) -> tuple[Any, ...]:
  leaves, structure = jax.tree_util.tree_flatten_with_path(tree)
  return structure, tuple((jnp.shape(x), jnp.result_type(x)) for _, x in leaves)


def _difference(a: Any, b: Any) -> str:
  """The first path where `a` and `b` differ, for error messages."""
  flat_a = {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(a)[0]}
  flat_b = {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(b)[0]}
  for path in sorted(set(flat_a) | set(flat_b)):
    if path not in flat_a or path not in flat_b:
      return f'{path} is in only one'
    shapes = [(jnp.shape(x), str(jnp.result_type(x)))
              for x in (flat_a[path], flat_b[path])]
    if shapes[0] != shapes[1]:
      return f'{path}: {shapes[0]} vs {shapes[1]}'
  return 'tree structure'
