"""What surgery did, in a form users read: paths, shapes, param counts."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from peft._core import params as _params
from peft._core import spec as _spec


def count_params(params: Any) -> tuple[int, int]:
  """`(adapter params, all params)` of a param tree.

  Adapter params are the leaves under a `'lora'` or `'lora_*'` key.

  Example:
    >>> import numpy as np
    >>> count_params({'kernel': np.zeros((4, 4)),
    ...               'lora': {'a': np.zeros((4, 1)), 'b': np.zeros((1, 4))}})
    (8, 24)
  """
  trainable = total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    size = int(np.prod(np.shape(leaf)))
    total += size
    if any(_params.is_adapter_key(getattr(k, 'key', k)) for k in path):
      trainable += size
  return trainable, total


def _human(n: int) -> str:
  for unit, div in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= div:
      return f'{n / div:.2f}{unit}'
  return str(n)


@dataclasses.dataclass
class LoRAReport:
  """What one surgery context adapted (filled while the model runs).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> with peft.lora(rank=2, targets='layers_0') as report:
    ...   params = model.init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> report.seen  # every adaptable layer that ran
    {'layers_0': 'Dense', 'layers_2': 'Dense'}
    >>> print(report.summary(params))
    path               layer  kernel  A       B       rank  scale
    -----------------  -----  ------  ------  ------  ----  -----
    layers_0 [kernel]  Dense  (4, 8)  (4, 2)  (2, 8)  2     1
    1 adapted layers
    24 trainable of 82 (29.27%)

  Attributes:
    adapters: `spec.key -> AdapterSpec` for every adapted kernel.
    seen: `path -> layer type name` for every adaptable layer that ran,
      adapted or not (used in "target matched nothing" errors).
  """

  adapters: dict[str, _spec.AdapterSpec] = dataclasses.field(
      default_factory=dict)
  seen: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def specs(self) -> tuple[_spec.AdapterSpec, ...]:
    """The adapter specs, in the order the layers first ran."""
    return tuple(self.adapters.values())

  def summary(self, params: Any = None) -> str:
    """A table of adapted layers and, given params, trainable counts.

    Args:
      params: the model's params (with adapters); adds the line
        "N trainable of M (p%)".

    Returns:
      The table as text.
    """
    rows = [('path', 'layer', 'kernel', 'A', 'B', 'rank', 'scale')]
    for s in self.adapters.values():
      rows.append(('/'.join(s.path) + f' [{s.weight_name}]', s.layer_type,
                   str(s.weight_shape), str(s.a_shape), str(s.b_shape),
                   str(s.rank), f'{s.scale:g}'))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    lines.append(f'{len(self.adapters)} adapted layers')
    if params is not None:
      trainable, total = count_params(params)
      pct = 100.0 * trainable / total if total else 0.0
      lines.append(f'{_human(trainable)} trainable of {_human(total)} '
                   f'({pct:.2f}%)')
    return '\n'.join(lines)


def render_params(params: Any, *, as_html: bool = False) -> str:
  """A treescope rendering of a param tree; adapters show under `lora`.

  Example:
    >>> import numpy as np
    >>> text = render_params({'lora': {'a': np.zeros((2, 1), np.float32)}})
    >>> 'np.ndarray float32(2, 1)' in text
    True

  Args:
    params: any pytree of arrays.
    as_html: return treescope's interactive HTML (for notebooks) instead of
      text.

  Returns:
    The rendering.
  """
  import treescope  # pylint: disable=g-import-not-at-top

  if as_html:
    return treescope.render_to_html(params, roundtrip_mode=False)
  return treescope.render_to_text(params)
