"""The framework-free core: what linen, nnx and quantization share.

Einsum equations and LoRA plans (`einsum`), LoRA option checks
(`options`), the adapter contract (`spec`), param trees and paths
(`params`), finding adapters from their specs (`adapter_tree`), fusing
(`fuse`, `fuse_ledger`), adapter files (`checkpoint`, `file_modes`),
optax helpers (`optim`), the array-level API (`functional`), the
trainable-parameter report (`report`) and the "where" of error messages
(`errors`). Nothing here imports `flax.linen` or `flax.nnx`; see
docs/architecture.md.
"""
