"""LoRA for flax.nnx models: layers, surgery, fuse/unfuse, adapter files.

The same toolkit as peft's linen API, for `flax.nnx`. LoRA (Hu et al. 2021,
https://arxiv.org/abs/2106.09685) adds a trainable low-rank update
`scale * einsum(delta_str, A, B)` to frozen kernels; rsLoRA (Kalajdzievski
2023) scales it by `alpha / sqrt(rank)`; DoRA (Liu et al. 2024,
`use_dora=True`) adds a trained magnitude per output feature.

* Layers: `LoRA` (standalone, optionally around a base module),
  `LoRALinear`, `LoRALinearGeneral`, `LoRAEinsum`, `LoRAConv`, `LoRAEmbed`.
  Each subclasses its nnx layer and keeps its variable names, so a plain
  layer's state loads into it; A and B are `LoRAParam`s under `lora`.
* Surgery: `apply_lora(model, rank=..., targets=..., rngs=...)` replaces
  the selected layers in place and returns a report of `AdapterSpec`s.
* `fuse` / `unfuse` fold the adapters into the kernels and back;
  `save_adapters` / `load_adapters` write and read adapter-only files in
  the linen format.

Example:
  >>> from flax import nnx
  >>> import jax.numpy as jnp, optax
  >>> import peft.nnx
  >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
  ...                        nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
  >>> report = peft.nnx.apply_lora(model, rank=1, rngs=nnx.Rngs(2))
  >>> [s.key for s in report.specs]
  ['layers/0/lora', 'layers/1/lora']
  >>> opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=peft.nnx.LoRAParam)
  >>> _ = peft.nnx.fuse(model)
  >>> type(model.layers[0]).__name__
  'Linear'
"""

from peft.nnx._adapter import LoRA
from peft.nnx._adapter import LoRAAdapter
from peft.nnx._adapter import LoRAParam
from peft.nnx._files import load_adapters
from peft.nnx._files import load_bank
from peft.nnx._files import save_adapters
from peft.nnx._fuse import FusedAdapters
from peft.nnx._fuse import fuse
from peft.nnx._fuse import unfuse
from peft.nnx._kernel_init import init_dora_magnitudes
from peft.nnx._kernel_init import init_from_kernels
from peft.nnx._layers import LoRAConv
from peft.nnx._layers import LoRAEinsum
from peft.nnx._layers import LoRAEmbed
from peft.nnx._layers import LoRALinear
from peft.nnx._layers import LoRALinearGeneral
from peft.nnx._layers import is_lora_layer
from peft.nnx._layers import lora_class_for
from peft.nnx._surgery import LoRARule
from peft.nnx._surgery import adapter_specs
from peft.nnx._surgery import apply_lora

__all__ = [
    'FusedAdapters',
    'LoRA',
    'LoRAAdapter',
    'LoRAConv',
    'LoRAEinsum',
    'LoRAEmbed',
    'LoRALinear',
    'LoRALinearGeneral',
    'LoRAParam',
    'LoRARule',
    'adapter_specs',
    'apply_lora',
    'fuse',
    'init_dora_magnitudes',
    'init_from_kernels',
    'is_lora_layer',
    'lora_class_for',
    'load_adapters',
    'load_bank',
    'save_adapters',
    'unfuse',
]
