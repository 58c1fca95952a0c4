"""`finetune --scan-layers` with adapters in some blocks only.

A scanning Decoder runs one period of blocks per loop step, so the loop's
body holds the blocks `layers_0 ... layers_{P-1}` (P: the sliding-window
period, 1 for SmolLM2), and the surgery sees those paths, whatever block
a step runs. Two things make a run whose `--targets` adapt some blocks
only (`layers_2[0-9]/.*`, or attention in one block and MLP in another)
run there as it does unrolled:

* `body_settings`: the surgery retargeted at the body's paths. A layer
  adapted in block `i` is adapted in body block `i % P`, so every block
  of that period position runs an adapter for it;
* `every_block`: the adapters with each block given the adapters its
  period position runs, zeros where the run has none. A zero A and B add
  exactly nothing to the layer's output, and the step stacks them inside
  the program from constants, so they get no gradient and are never
  trained or saved: checkpoints and the adapter file hold the run's own
  adapters only.

DoRA adapters cannot be padded so: a zero update still rescales the
kernel by its magnitude over its norm, which is the identity only to
rounding. Those runs must adapt every block alike.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from flax import traverse_util
import numpy as np

from peft import models
from peft._cli import adapt
from peft._cli import base as base_lib
from peft.models import _scan

CliError = base_lib.CliError
_BLOCK = _scan._LAYER  # `layers_<index>`, as stack_layers reads it.


def _body_path(path: str, period: int) -> str:
  """`layers_i/rest` as the scan's body names it: `layers_{i % P}/rest`."""
  head, sep, rest = path.partition('/')
  match = _BLOCK.fullmatch(head)
  if not match:
    return path
  return f'layers_{int(match.group(1)) % period}{sep}{rest}'


def body_settings(settings: adapt.Settings, specs: Any,
                  config: models.DecoderConfig) -> adapt.Settings:
  """The surgery of a scanning model: `settings` adapting, by exact path,
  the body's layers that stand for the adapted layers `specs` name.

  Example:
    >>> from peft._cli import adapt
    >>> settings = adapt.Settings(targets=('layers_1/attn/q_einsum',), rank=4)
    >>> spec = type('Spec', (), {'path': ('layers_1', 'attn', 'q_einsum')})
    >>> body_settings(settings, [spec], models.tiny_config()).targets
    ('layers_0/attn/q_einsum',)
  """
  period = _scan.layer_period(config)
  if settings.kernels:  # Hugging Face PEFT adapters: one rule per kernel.
    kernels = {}
    for path, weight, rank, alpha, use_rslora in settings.kernels:
      body = _body_path(path, period)
      kernels.setdefault((body, weight),
                         (body, weight, rank, alpha, use_rslora))
    return dataclasses.replace(settings, kernels=tuple(kernels.values()))
  paths = dict.fromkeys(_body_path('/'.join(s.path), period) for s in specs)
  return dataclasses.replace(settings,
                             targets=tuple(re.escape(p) for p in paths))


def every_block(lora: Any, config: models.DecoderConfig,
                use_dora: bool = False) -> Any:
  """`lora` with zero adapters where a block lacks those of its period
  position (see the module docstring), ready for `models.stack_layers`.

  Example:
    >>> import numpy as np
    >>> lora = {'layers_1': {'attn': {'a': np.ones((2, 1))}}}
    >>> padded = every_block(lora, models.tiny_config())  # 2 blocks
    >>> padded['layers_0']['attn']['a'].tolist()
    [[0.0], [0.0]]

  Raises:
    CliError: DoRA adapters that some blocks lack.
  """
  period = _scan.layer_period(config)
  blocks = {k: v for k, v in lora.items() if _BLOCK.fullmatch(k)}
  if not blocks:
    return lora
  # Period position -> each adapter leaf some block of it has.
  wanted: list[dict[tuple[str, ...], Any]] = [{} for _ in range(period)]
  for name, tree in blocks.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      wanted[int(name.split('_')[1]) % period].setdefault(path, leaf)
  out = dict(lora)
  for i in range(config.n_layers):
    name = f'layers_{i}'
    have = traverse_util.flatten_dict(blocks.get(name, {}))
    missing = [p for p in wanted[i % period] if p not in have]
    if missing and use_dora:
      raise CliError(
          f'--scan-layers with --use-dora needs every block adapted alike, '
          f'but {name} lacks {"/".join(missing[0])} (a DoRA adapter cannot '
          'be padded with one that changes nothing). Pass --targets that '
          'select the same layers in every block, or drop --scan-layers.')
    if missing or name not in blocks:
      # Stacking wants every block: zeros for what this one lacks (an empty
      # block where its position runs no adapter).
      like = wanted[i % period]
      zeros = {p: np.zeros(np.shape(like[p]), like[p].dtype)
               for p in missing}
      out[name] = traverse_util.unflatten_dict({**have, **zeros})
  return out
