"""peft: parameter-efficient fine-tuning (LoRA, QLoRA) for JAX and Flax.

A drop-in superset of `gemma.peft`'s public API.
"""

# First of all: under `python -m peft`, Ctrl-C is handled from here on,
# before jax and flax take seconds to import (stdlib only; a no-op
# elsewhere).
from peft._cli import interrupt as _interrupt  # noqa: F401

# isort: split

# Surgery.
from peft._core.options import LoRAOptions
from peft._core.report import LoRAReport
from peft._core.report import count_params
from peft._core.report import render_params
from peft._core.spec import AdapterSpec
from peft._core.spec import recording_adapters
from peft._linen.interceptors import Interceptor
from peft._linen.interceptors import ModuleInterceptor
from peft._linen.registry import register_einsum_layer
from peft._linen.rules import LoRARule
from peft._linen.surgery import LoRA
from peft._linen.surgery import LoRASurgery
from peft._linen.surgery import lora

# isort: split

# LoRA layers (gemma.peft names, and any registered einsum-like layer).
from peft._linen.lora_layers import LoRAConv
from peft._linen.lora_layers import LoRADense
from peft._linen.lora_layers import LoRADenseGeneral
from peft._linen.lora_layers import LoRAEinsum
from peft._linen.lora_layers import LoRAEinsumLike
from peft._linen.lora_layers import LoRAEmbed

# isort: split

# LoRA adapters.
from peft._linen.lora_adapters import LoRAConvAdapter
from peft._linen.lora_adapters import LoRADenseAdapter
from peft._linen.lora_adapters import LoRADenseGeneralAdapter
from peft._linen.lora_adapters import LoRAEinsumAdapter
from peft._linen.lora_adapters import LoRAEmbedAdapter

# isort: split

# Param trees: split, merge, fuse, combine, banks of named adapters.
from peft._core.active_adapter import adapters_disabled
from peft._core.bank import AdapterBank
from peft._core.combine import CombinedAdapters
from peft._core.combine import combine_adapters
from peft._core.fuse import fuse_params
from peft._core.fuse import fuse_state
from peft._core.fuse import unfuse_params
from peft._core.kernel_init import adapters_for_original_base
from peft._core.kernel_init import init_dora_magnitudes
from peft._core.kernel_init import init_from_kernels
from peft._core.params import SplittedParams
from peft._core.params import merge_params
from peft._core.params import split_params

# isort: split

# Training only the adapters.
from peft._core.optim import adapter_labels
from peft._core.optim import adapter_mask
from peft._core.optim import lora_plus
from peft._core.optim import train_only_adapters

# isort: split

# Adapter files.
from peft._core.checkpoint import LoadedAdapters
from peft._core.checkpoint import check_adapters_match
from peft._core.checkpoint import load_adapters
from peft._core.checkpoint import save_adapters

# isort: split

# The functional API on plain arrays.
from peft._core.functional import dora_linear
from peft._core.functional import init_lora_adapter
from peft._core.functional import lora_delta
from peft._core.functional import lora_linear
from peft._core.functional import merge_dora_weight
from peft._core.functional import merge_lora_weight
from peft._core.functional import principal_lora_adapter
from peft._core.functional import tree_lora_delta
from peft._core.functional import unmerge_dora_weight
from peft._core.functional import unmerge_lora_weight

# isort: split

# Quantization: numerics and surgery.
from peft._quant.numerics import QuantizationMethod
from peft._quant.numerics import QuantizedArray
from peft._quant.numerics import dequantize
from peft._quant.numerics import get_axis_to_reduce_from_einsum_str
from peft._quant.numerics import quantize_array
from peft._quant.numerics import simulate_quantize
from peft._quant.sharding import quantized_shardings
from peft._quant.surgery import QuantizationSurgery
from peft._quant.surgery import quantization_axes
from peft._quant.surgery import quantized
from peft._quant.surgery import simulate_quantization
from peft._quant.tree import param_bytes
from peft._quant.tree import quantize

# isort: split

# Quantized layers: simulated (QAT) and real int8/int4/NF4.
from peft._quant.layers import IntDense
from peft._quant.layers import IntDenseGeneral
from peft._quant.layers import IntEinsum
from peft._quant.layers import IntEinsumLike
from peft._quant.layers import SimulateQuantizedDense
from peft._quant.layers import SimulateQuantizedDenseGeneral
from peft._quant.layers import SimulateQuantizedEinsum
from peft._quant.layers import SimulateQuantizedEinsumLike

# isort: split

# QLoRA. The adapters are the LoRA ones under gemma.peft's QLoRA names.
from peft._linen.lora_adapters import LoRADenseAdapter as QLoRADenseAdapter
from peft._linen.lora_adapters import LoRAEinsumAdapter as QLoRAEinsumAdapter
from peft._quant.fuse import fuse_into_quantized
from peft._quant.fuse import fuse_quantized_kernel
from peft._quant.qlora import QLoRADense
from peft._quant.qlora import QLoRAEinsum
from peft._quant.qlora import QLoRAEinsumLike

__all__ = [
    'AdapterBank',
    'AdapterSpec',
    'CombinedAdapters',
    'IntDense',
    'IntDenseGeneral',
    'IntEinsum',
    'IntEinsumLike',
    'Interceptor',
    'LoRA',
    'LoRAConv',
    'LoRAConvAdapter',
    'LoRADense',
    'LoRADenseAdapter',
    'LoRADenseGeneral',
    'LoRADenseGeneralAdapter',
    'LoRAEinsum',
    'LoRAEinsumAdapter',
    'LoRAEinsumLike',
    'LoRAEmbed',
    'LoRAEmbedAdapter',
    'LoRAOptions',
    'LoRAReport',
    'LoRARule',
    'LoRASurgery',
    'LoadedAdapters',
    'ModuleInterceptor',
    'QLoRADense',
    'QLoRADenseAdapter',
    'QLoRAEinsum',
    'QLoRAEinsumAdapter',
    'QLoRAEinsumLike',
    'QuantizationMethod',
    'QuantizationSurgery',
    'QuantizedArray',
    'SimulateQuantizedDense',
    'SimulateQuantizedDenseGeneral',
    'SimulateQuantizedEinsum',
    'SimulateQuantizedEinsumLike',
    'SplittedParams',
    'adapter_labels',
    'adapter_mask',
    'adapters_disabled',
    'adapters_for_original_base',
    'check_adapters_match',
    'combine_adapters',
    'count_params',
    'dequantize',
    'dora_linear',
    'fuse_into_quantized',
    'fuse_params',
    'fuse_quantized_kernel',
    'fuse_state',
    'get_axis_to_reduce_from_einsum_str',
    'init_dora_magnitudes',
    'init_from_kernels',
    'init_lora_adapter',
    'load_adapters',
    'lora',
    'lora_delta',
    'lora_linear',
    'lora_plus',
    'merge_dora_weight',
    'merge_lora_weight',
    'merge_params',
    'param_bytes',
    'principal_lora_adapter',
    'quantization_axes',
    'quantize',
    'quantize_array',
    'quantized',
    'quantized_shardings',
    'recording_adapters',
    'register_einsum_layer',
    'render_params',
    'save_adapters',
    'simulate_quantization',
    'simulate_quantize',
    'split_params',
    'train_only_adapters',
    'tree_lora_delta',
    'unfuse_params',
    'unmerge_dora_weight',
    'unmerge_lora_weight',
]
