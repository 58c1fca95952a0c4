"""PiSSA and OLoRA for flax.nnx models: adapters from their kernels, in place.

The math is the linen one (`peft._core.kernel_init`): A and B from the
kernel's SVD (PiSSA) or QR (OLoRA), the kernel replaced by its residual;
DoRA's magnitudes from their kernels' norms.
"""

from __future__ import annotations

from flax import nnx
import jax.numpy as jnp

from peft._core import dora as _dora
from peft._core import fuse as _fuse
from peft._core import kernel_init as _kernel_init
from peft.nnx import _fuse as _nnx_fuse


def init_from_kernels(model: nnx.Module, *,
                      method: _kernel_init.Method = 'pissa') -> None:
  """PiSSA or OLoRA on every LoRA layer of `model`, in place.

  Each layer's A and B are set from its kernel and the kernel becomes
  `W - scale * delta(A, B)` (its dtype kept), so the model computes what
  it did to float rounding. See `peft.init_from_kernels`; save the trained
  adapters through `peft.adapters_for_original_base`.

  Example:
    >>> import jax.numpy as jnp
    >>> import peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    >>> _ = peft.nnx.apply_lora(model, rank=2, rngs=nnx.Rngs(1))
    >>> x = jnp.ones((2, 3))
    >>> before = model(x)
    >>> peft.nnx.init_from_kernels(model, method='olora')
    >>> bool(jnp.allclose(model(x), before, atol=1e-5))
    True

  Args:
    model: an nnx model with LoRA layers (after `apply_lora`).
    method: `'pissa'` (top singular vectors) or `'olora'` (QR).

  Raises:
    ValueError: no LoRA layer, an unknown method, or a rank the kernel
      cannot give.
  """
  name = 'peft.nnx.init_from_kernels'
  _kernel_init.check_method(method, name)
  layers = _nnx_fuse.adapted_layers(model, name, 'peft.nnx.apply_lora')
  # Every factorisation is computed (and checked) before any variable
  # changes, so an error leaves the model as it was.
  new = []
  for path, layer in layers:
    spec = layer.adapter_spec(path)
    kernel = layer.kernel_variable()
    a, b = _kernel_init.kernel_factors(kernel[...], spec, method=method,
                                       where=name)
    a = a.astype(jnp.result_type(layer.lora.a[...]))
    b = b.astype(jnp.result_type(layer.lora.b[...]))
    new.append((layer, a, b, _fuse.apply_delta(kernel[...], a, b, spec,
                                               -1.0)))
  for layer, a, b, residual in new:
    layer.lora.a[...] = a
    layer.lora.b[...] = b
    layer.kernel_variable()[...] = residual


def init_dora_magnitudes(model: nnx.Module) -> None:
  """Every DoRA magnitude `m` of `model` set to its kernel's norm, in place.

  `apply_lora(..., use_dora=True)` starts `m` at the norms of the kernels
  the layers hold then; call this after loading other kernels into the
  model (`nnx.update` with a pretrained state), so the adapted model starts
  at the loaded one. See `peft.init_dora_magnitudes`.

  Example:
    >>> import jax.numpy as jnp
    >>> import peft.nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    >>> _ = peft.nnx.apply_lora(model, rank=1, use_dora=True,
    ...                         rngs=nnx.Rngs(1))
    >>> model.layers[0].kernel[...] = jnp.array([[3., 0.], [4., 2.]])
    >>> peft.nnx.init_dora_magnitudes(model)
    >>> model.layers[0].lora.m[...].tolist()
    [5.0, 2.0]

  Raises:
    ValueError: the model has no LoRA layer.
  """
  name = 'peft.nnx.init_dora_magnitudes'
  layers = _nnx_fuse.adapted_layers(model, name,
                                    'peft.nnx.apply_lora(..., use_dora=True)')
  for _, layer in layers:
    lora = layer.lora
    if lora.options.use_dora:
      lora.m[...] = _dora.column_norm(
          layer.kernel_variable()[...], lora.magnitude_axes,
          n_stack=len(lora.stack_shape)).astype(lora.m[...].dtype)
