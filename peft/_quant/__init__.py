"""Quantization: numerics, quantized layers, the surgery and QLoRA.

`numerics` quantizes arrays (int8/int4/NF4/...); `layers` holds the
simulated and integer linen layers; `surgery` swaps them in; `qlora`
combines frozen quantized bases with LoRA adapters and quantizes whole
param trees.
"""
