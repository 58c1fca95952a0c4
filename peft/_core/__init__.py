"""The framework-free core: what linen, nnx and quantization share.

Einsum equations and LoRA plans (`einsum`), LoRA option checks
(`options`), the adapter contract (`spec`), param trees (`params`),
fusing (`fuse`, `fuse_ledger`), adapter files (`checkpoint`,
`file_modes`), optax helpers (`optim`), the array-level API
(`functional`) and the trainable-parameter report (`report`). Nothing
here imports `flax.linen` or `flax.nnx`; see docs/architecture.md.
"""
