"""Fusing trained adapters into a quantized base (QLoRA to serving).

Each quantized kernel is dequantized, gets `scale * delta(A, B)` (with a
DoRA magnitude, QDoRA, becomes `m * V / ||V||` of that `V`) and is
re-quantized with its own method and axes; the relative error of the
re-quantized kernel against the exact float one is reported, so a user
sees what fusing into 4 bits costs (QLoRA: Dettmers et al. 2023).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peft._core import adapter_tree as _adapter_tree
from peft._core import dora as _dora
from peft._core import einsum as _einsum
from peft._core import fuse as _fuse
from peft._core import params as _params
from peft._core import spec as _spec
from peft._quant import numerics as q


def fuse_quantized_kernel(kernel: q.QuantizedArray, a: jax.Array,
                          b: jax.Array, *, einsum_str: str,
                          scale: float = 1.0):
  """Adds `scale * delta(A, B)` to a quantized kernel and re-quantizes.

  The delta's equation comes from the layer's `einsum_str` (see
  `EinsumEquation.lora_plan`); the result uses the kernel's method and
  axes. The error is `|new - exact| / |exact|` (Frobenius norms), `exact`
  being the float fused kernel `dequantize(kernel) + scale * delta`.

  Example:
    >>> import peft
    >>> w = peft.quantize_array(jnp.eye(4), 'int8')
    >>> a, b = jnp.ones((4, 1)), jnp.full((1, 4), 0.1)
    >>> new, err = fuse_quantized_kernel(w, a, b, einsum_str='...i,io->...o')
    >>> new.method.name, float(err) < 0.01
    ('INT8', True)

  Returns:
    `(new QuantizedArray, relative error)`.

  Raises:
    ValueError: A or B do not fit the equation and kernel shape, or the
      fused kernel holds NaN or Inf (e.g. diverged adapters).
  """
  eq = _einsum.EinsumEquation.parse(einsum_str, where='fuse_quantized_kernel')
  plan = eq.lora_plan(weight_shape=kernel.shape, rank=np.shape(a)[-1])
  if (np.shape(a), np.shape(b)) != (plan.a_shape, plan.b_shape):
    raise ValueError(
        f'fuse_quantized_kernel: A {np.shape(a)} and B {np.shape(b)} do not '
        f'fit einsum_str {einsum_str!r} with kernel {kernel.shape}; expected'
        f' {plan.a_shape} and {plan.b_shape}. Pass the adapter of this layer.'
    )
  return _requantize(kernel, plan.delta_str, a, b, scale,
                     where='fuse_quantized_kernel')


def _requantize(kernel, delta_str, a, b, scale, *, where, m=None,
                magnitude_axes=()):
  """`(re-quantized fused kernel, its relative error)`.

  The exact fused kernel is `dequantize(kernel) + scale * delta(A, B)`, or
  with a DoRA magnitude `m` (QDoRA) `m * V / ||V||` of that `V`.
  """
  float_kernel = kernel.dequantize(jnp.float32)
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if m is None:
    exact = _einsum.add_delta(float_kernel, a, b, scale, delta_str=delta_str)
  else:
    exact, _ = _dora.fused_kernel(
        float_kernel, a, b, jnp.asarray(m, jnp.float32), scale,
        delta_str=delta_str, magnitude_axes=tuple(magnitude_axes))
  # The kernel's own axes: its channels, or the axes its blocks run along.
  new = q.quantize_array(exact.astype(kernel.dtype), kernel.method,
                         kernel.axes, where=where)
  err = jnp.linalg.norm(new.dequantize(jnp.float32) - exact) / jnp.maximum(
      jnp.linalg.norm(exact), jnp.finfo(jnp.float32).tiny)
  return new, err


def fuse_into_quantized(params: Any, adapters: Sequence[_spec.AdapterSpec]):
  """`fuse_params` for a quantized base: returns `(fused, errors)`.

  Each quantized kernel is dequantized, gets `scale * einsum(delta_str, A,
  B)` (a DoRA adapter's kernel becomes `m * V / ||V||` of that `V`) and is
  re-quantized with its own method and axes; float kernels are fused in
  float (by `fuse_params`). `errors` maps each re-quantized
  adapter key to the relative error against the float fused kernel (see
  `fuse_quantized_kernel`). The result has no adapter branches, so the
  plain model under `peft.quantized()` serves it.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model = nn.Sequential([nn.Dense(4)])
    >>> x = jnp.ones((1, 8))
    >>> with peft.quantized('int8'), peft.lora(rank=1) as report:  # QLoRA
    ...   params = model.init(jax.random.key(0), x)['params']
    >>> params['layers_0']['lora']['b'] = jnp.full((1, 4), 0.1)  # "trained"
    >>> with peft.quantized(), peft.lora(rank=1):
    ...   y = model.apply({'params': params}, x)
    >>> fused, errors = peft.fuse_into_quantized(params, report.specs)
    >>> sorted(fused['layers_0']), fused['layers_0']['kernel'].method.name
    (['bias', 'kernel'], 'INT8')
    >>> {key: float(err) < 0.01 for key, err in errors.items()}
    {'layers_0/lora': True}
    >>> with peft.quantized():  # the plain model, no LoRA
    ...   y_fused = model.apply({'params': fused}, x)
    >>> float(jnp.abs(y_fused - y).max()) < 0.01
    True

  Raises:
    ValueError, TypeError: as `fuse_params` (missing kernel or adapter,
      shapes that disagree with the specs); ValueError also for a fused
      kernel holding NaN or Inf, naming its adapter key.
  """
  name = 'fuse_into_quantized'
  specs = _adapter_tree.check_specs(adapters, name)
  base, lora = _params.split_params(params)
  _adapter_tree.check_covered(lora, specs, name)
  kernels = {s: _kernel(base, s, name) for s in specs}
  plain = [s for s in specs if not q.is_quantized(kernels[s])]
  fused = _fuse.fuse_params(
      _params.merge_params(base, _subtree(lora, plain)), plain)
  errors = {}
  for spec in specs:
    if spec not in plain:
      a, b, m, _ = _adapter_tree.adapter_arrays(lora, spec, name)
      new, errors[spec.key] = _requantize(
          kernels[spec], spec.delta_str, a, b, spec.scale, where=spec.key,
          m=m, magnitude_axes=spec.magnitude_axes)
      fused = _replace(fused, (*spec.path, spec.weight_name), new)
  return fused, errors


def _kernel(base, spec, name):
  node = base
  for key in (*spec.path, spec.weight_name):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(
          f'{name}: adapter {spec.key!r} adapts {spec.weight_name!r} at '
          f'{"/".join(spec.path)!r}, which is missing from the params. Pass '
          'the specs recorded for these params.'
      )
    node = node[key]
  if tuple(np.shape(node)) != tuple(spec.weight_shape):
    raise ValueError(
        f'{name}: the kernel of adapter {spec.key!r} has shape '
        f'{tuple(np.shape(node))} but its spec says {spec.weight_shape}. '
        'The params and specs do not match.'
    )
  return node


def _subtree(lora, specs):
  out = {}
  for spec in specs:
    a, b, m, _ = _adapter_tree.adapter_arrays(lora, spec,
                                              'fuse_into_quantized')
    node = _adapter_tree.adapter_node(out, spec)
    node.update(a=a, b=b)
    if m is not None:
      node[_dora.MAGNITUDE] = m
  return out


def _replace(tree, path, value):
  """A copy of `tree` with the leaf at `path` replaced (dicts out)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], value)
  return out
