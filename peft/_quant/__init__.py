"""Quantization: numerics, quantized layers, the surgery and QLoRA.

`numerics` quantizes arrays (int8/int4/NF4/...); `layers` holds the
simulated and integer linen layers; `surgery` swaps them in; `tree`
quantizes whole param trees; `qlora` holds the QLoRA layers (LoRA over a
frozen quantized base); `fuse` folds trained adapters into a quantized
base.
"""
