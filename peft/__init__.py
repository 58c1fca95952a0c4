"""peft: parameter-efficient fine-tuning (LoRA, QLoRA) for JAX and Flax.

A drop-in superset of `gemma.peft`'s public API.
"""

# First of all: under `python -m peft`, Ctrl-C is handled from here on,
# before jax and flax take seconds to import (stdlib only; a no-op
# elsewhere).
from peft._cli import interrupt as _interrupt  # noqa: F401

# isort: split

# Surgery.
from peft._interceptors import Interceptor
from peft._interceptors import ModuleInterceptor
from peft._layers import register_einsum_layer
from peft._report import LoRAReport
from peft._report import count_params
from peft._report import render_params
from peft._rules import LoRARule
from peft._spec import AdapterSpec
from peft._spec import recording_adapters
from peft._surgery import LoRA
from peft._surgery import LoRASurgery
from peft._surgery import lora

# isort: split

# LoRA layers (gemma.peft names, and any registered einsum-like layer).
from peft._lora import LoRAConv
from peft._lora import LoRADense
from peft._lora import LoRADenseGeneral
from peft._lora import LoRAEinsum
from peft._lora import LoRAEinsumLike
from peft._lora import LoRAEmbed

# isort: split

# LoRA adapters.
from peft._lora_adapters import LoRAConvAdapter
from peft._lora_adapters import LoRADenseAdapter
from peft._lora_adapters import LoRADenseGeneralAdapter
from peft._lora_adapters import LoRAEinsumAdapter
from peft._lora_adapters import LoRAEmbedAdapter

# isort: split

# Param trees: split, merge, fuse.
from peft._fuse import fuse_params
from peft._fuse import fuse_state
from peft._fuse import unfuse_params
from peft._params import SplittedParams
from peft._params import merge_params
from peft._params import split_params

# isort: split

# Training only the adapters.
from peft._optim import adapter_labels
from peft._optim import adapter_mask
from peft._optim import train_only_adapters

# isort: split

# Adapter files.
from peft._checkpoint import LoadedAdapters
from peft._checkpoint import check_adapters_match
from peft._checkpoint import load_adapters
from peft._checkpoint import save_adapters

# isort: split

# The functional API on plain arrays.
from peft._functional import init_lora_adapter
from peft._functional import lora_delta
from peft._functional import lora_linear
from peft._functional import merge_lora_weight
from peft._functional import tree_lora_delta
from peft._functional import unmerge_lora_weight

# isort: split

# Quantization: numerics and surgery.
from peft._qlora import param_bytes
from peft._qlora import quantize
from peft._quantization import QuantizationMethod
from peft._quantization import QuantizedArray
from peft._quantization import dequantize
from peft._quantization import get_axis_to_reduce_from_einsum_str
from peft._quantization import quantize_array
from peft._quantization import simulate_quantize
from peft._quantization_surgery import QuantizationSurgery
from peft._quantization_surgery import quantization_axes
from peft._quantization_surgery import quantized
from peft._quantization_surgery import simulate_quantization

# isort: split

# Quantized layers: simulated (QAT) and real int8/int4/NF4.
from peft._quantized_layers import IntDense
from peft._quantized_layers import IntDenseGeneral
from peft._quantized_layers import IntEinsum
from peft._quantized_layers import IntEinsumLike
from peft._quantized_layers import SimulateQuantizedDense
from peft._quantized_layers import SimulateQuantizedDenseGeneral
from peft._quantized_layers import SimulateQuantizedEinsum
from peft._quantized_layers import SimulateQuantizedEinsumLike

# isort: split

# QLoRA. The adapters are the LoRA ones under gemma.peft's QLoRA names.
from peft._lora_adapters import LoRADenseAdapter as QLoRADenseAdapter
from peft._lora_adapters import LoRAEinsumAdapter as QLoRAEinsumAdapter
from peft._qlora import QLoRADense
from peft._qlora import QLoRAEinsum
from peft._qlora import QLoRAEinsumLike
from peft._qlora import fuse_into_quantized
from peft._qlora import fuse_quantized_kernel

__all__ = [
    'AdapterSpec',
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
    'check_adapters_match',
    'count_params',
    'dequantize',
    'fuse_into_quantized',
    'fuse_params',
    'fuse_quantized_kernel',
    'fuse_state',
    'get_axis_to_reduce_from_einsum_str',
    'init_lora_adapter',
    'load_adapters',
    'lora',
    'lora_delta',
    'lora_linear',
    'merge_lora_weight',
    'merge_params',
    'param_bytes',
    'quantization_axes',
    'quantize',
    'quantize_array',
    'quantized',
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
    'unmerge_lora_weight',
]
