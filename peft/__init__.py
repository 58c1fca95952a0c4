"""peft: parameter-efficient fine-tuning (LoRA, QLoRA) for JAX and Flax.

A drop-in superset of `gemma.peft`'s public API.
"""

# Module surgery.
from peft._interceptors import Interceptor
from peft._interceptors import ModuleInterceptor
from peft._layers import register_einsum_layer

# LoRA layers.
from peft._lora import LoRAConv
from peft._lora import LoRADense
from peft._lora import LoRADenseGeneral
from peft._lora import LoRAEinsum
from peft._lora import LoRAEinsumLike
from peft._lora import LoRAEmbed
from peft._lora_adapters import LoRAConvAdapter
from peft._lora_adapters import LoRADenseAdapter
from peft._lora_adapters import LoRADenseGeneralAdapter
from peft._lora_adapters import LoRAEinsumAdapter
from peft._lora_adapters import LoRAEmbedAdapter
from peft._report import LoRAReport
from peft._report import count_params
from peft._report import render_params
from peft._rules import LoRARule
from peft._spec import AdapterSpec
from peft._spec import recording_adapters
from peft._surgery import LoRA
from peft._surgery import LoRASurgery
from peft._surgery import lora

__all__ = [
    'AdapterSpec',
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
    'ModuleInterceptor',
    'count_params',
    'lora',
    'recording_adapters',
    'register_einsum_layer',
    'render_params',
]
