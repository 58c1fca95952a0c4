"""LoRA surgery on flax.linen models.

Method interception (`interceptors`), the layer registry that maps
layer types to einsum equations (`registry`), the base that shares the
wrapped module's scope (`shared_scope`), the adapters and the gemma.peft
wrapper classes (`lora_adapters`, `lora_layers`), the rules that select
layers (`rules`) and the surgery that puts it together (`surgery`).
"""
