"""Adapters initialised from their kernels: PiSSA and OLoRA.

PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948) starts A and B
at the kernel's top `rank` singular directions; OLoRA (Büyükakyüz 2024,
https://arxiv.org/abs/2406.01775) at the first `rank` columns of a QR
factorisation. Either way the kernel is replaced by the residual
`W - scale * delta(A, B)`, so the model at init computes what it did (to
float rounding), and training moves the part of W that matters most.

The kernel is read as the matrix the delta equation implies: A's kernel
axes (the inputs side) as rows, B's as columns, axes both hold (batch
axes of a DenseGeneral) as a batch of matrices. So every layer kind
surgery adapts (Dense, DenseGeneral, Einsum, Conv, Embed, registered
layers) factors the same way.

The trained adapters then belong to the residual base, not to the
original kernels. `adapters_for_original_base` rewrites them, exactly, as
rank `2 * rank` adapters of the original kernels: `W + s * (A B - A0 B0) =
residual + s * A B`. That is what to save (as HF peft does): the file then
needs no residual, and loads onto the pretrained model as any LoRA file.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
import string
import typing
from typing import Any, Literal

import jax
import jax.numpy as jnp

from peft._core import adapter_tree as _adapter_tree
from peft._core import dora as _dora
from peft._core import einsum as _einsum
from peft._core import fuse as _fuse
from peft._core import params as _params
from peft._core import spec as _spec
from peft._quant import numerics as _numerics

Method = Literal['pissa', 'olora']
METHODS: tuple[str, ...] = ('pissa', 'olora')


def check_method(method: Any, where: str) -> Method:
  """`method` if it is one of `METHODS`, else a clear error."""
  if method not in METHODS:
    raise ValueError(
        f'{where}: method must be one of {list(METHODS)}; got {method!r}. '
        "Pass method='pissa' (top singular vectors) or method='olora' (QR)."
    )
  return typing.cast(Method, method)


def _roles(delta_str: str) -> tuple[str, str, str, str]:
  """`(rank, batch, rows, cols)` axis letters of a delta `a,b->weights`."""
  a_axes, b_axes, weights = _einsum.split_delta(delta_str)
  (rank,) = set(a_axes) - set(weights)
  batch = ''.join(c for c in a_axes if c in b_axes and c != rank)
  rows = ''.join(c for c in a_axes if c not in b_axes)
  cols = ''.join(c for c in b_axes if c not in a_axes)
  return rank, batch, rows, cols


def rank_letter(delta_str: str) -> str:
  """The letter of the rank axis in a delta `a,b->weights`."""
  return _roles(delta_str)[0]


def factor_matrices(m: jax.Array, rank: int, scale: float, *,
                    method: Method) -> tuple[jax.Array, jax.Array]:
  """`(A, B)` of matrices `m (..., rows, cols)`, `scale * A @ B` their
  rank-`rank` part (see `kernel_factors`); float32."""
  m = jnp.asarray(m, jnp.float32)
  if method == 'pissa':
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    return u[..., :rank] * root[..., None, :], root[..., :, None] * vt[
        ..., :rank, :]
  # QR of the (cols x rows) matrix, so that B's rows are orthonormal, as
  # OLoRA's output-side factor.
  q, r = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))
  return (jnp.swapaxes(r[..., :rank, :], -1, -2) / scale,
          jnp.swapaxes(q[..., :rank], -1, -2))


def check_rank_fits(rank: int, n_rows: int, n_cols: int, *, method: str,
                    what: str, where: str) -> None:
  """A rank above `min(rows, cols)` cannot come from the factorisation."""
  if rank > min(n_rows, n_cols):
    raise ValueError(
        f'{where}: {what} has rank {rank}, but its kernel is a '
        f'{n_rows}x{n_cols} matrix, so {method} gives at most rank '
        f'{min(n_rows, n_cols)}. Use a smaller rank for this layer.'
    )


def kernel_factors(kernel: jax.Array, spec: _spec.AdapterSpec, *,
                   method: Method, where: str = 'kernel_factors'
                   ) -> tuple[jax.Array, jax.Array]:
  """A and B (float32) with `spec`'s shapes from the kernel's factorisation.

  `scale * delta(A, B)` is the kernel's best rank-`rank` part (PiSSA:
  `U_r S_r V_r^T`, `sqrt(S_r / scale)` on each side) or its part along the
  first `rank` QR directions (OLoRA: B's rows orthonormal, A holds
  `R_r^T / scale`), so the residual is the same whatever the scale.

  Example:
    >>> import peft
    >>> spec = peft.AdapterSpec(
    ...     path=('d',), layer_type='Dense', weight_name='kernel',
    ...     adapter_name='lora', weight_shape=(3, 2), a_shape=(3, 2),
    ...     b_shape=(2, 2), delta_str='ir,ro->io', rank=2)
    >>> w = jnp.array([[1., 0.], [0., 2.], [0., 0.]])
    >>> a, b = kernel_factors(w, spec, method='pissa')
    >>> bool(jnp.allclose(a @ b, w))  # rank 2 holds all of w
    True

  Args:
    kernel: the kernel, with `spec.stack_shape` leading axes if stacked.
    spec: the adapter's spec (delta equation, shapes, rank, scale).
    method: `'pissa'` or `'olora'`.
    where: named in errors.

  Raises:
    ValueError: an unknown method, or a rank larger than the kernel's
      matrix allows.
  """
  check_method(method, where)
  rank_axis, batch, rows, cols = _roles(spec.delta_str)
  a_axes, b_axes, weights = _einsum.split_delta(spec.delta_str)
  size = dict(zip(weights, spec.weight_shape))
  n_rows = math.prod(size[c] for c in rows)
  n_cols = math.prod(size[c] for c in cols)
  rank = spec.rank
  check_rank_fits(
      rank, n_rows, n_cols, method=method, where=where,
      what=(f'adapter {spec.key!r} (kernel {tuple(spec.weight_shape)}, delta '
            f'{spec.delta_str!r})'))
  lead = _lead(spec)
  k = jnp.asarray(kernel, jnp.float32).reshape((-1, *spec.weight_shape))
  m = jnp.einsum(f'{lead}{weights}->{lead}{batch}{rows}{cols}', k)
  m = m.reshape((k.shape[0], -1, n_rows, n_cols))
  return from_matrices(*factor_matrices(m, rank, spec.scale, method=method),
                       spec)


def _lead(spec: _spec.AdapterSpec) -> str:
  """A letter for the flattened stack axes, unused by the delta."""
  return next(c for c in string.ascii_letters if c not in spec.delta_str)


def to_matrices(a: jax.Array, b: jax.Array, spec: _spec.AdapterSpec
                ) -> tuple[jax.Array, jax.Array]:
  """A and B (with `spec.stack_shape` leading axes) as batches of matrices:
  A `(stack, batch, rows, rank)` and B `(stack, batch, rank, cols)`, the
  stack flattened to one axis, the rows and columns as in `kernel_factors`,
  so that `A @ B` is the delta's matrix; float32."""
  rank_axis, batch, rows, cols = _roles(spec.delta_str)
  a_axes, b_axes, _ = _einsum.split_delta(spec.delta_str)
  lead, n = _lead(spec), len(spec.stack_shape)

  def grouped(x, axes_from: str, groups: tuple[str, ...]) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    x = x.reshape((-1, *x.shape[n:]))
    x = jnp.einsum(f'{lead}{axes_from}->{lead}{"".join(groups)}', x)
    size = dict(zip(''.join(groups), x.shape[1:]))
    return x.reshape((x.shape[0],
                      *(math.prod(size[c] for c in g) for g in groups)))

  return (grouped(a, a_axes, (batch, rows, rank_axis)),
          grouped(b, b_axes, (batch, rank_axis, cols)))


def from_matrices(a_m: jax.Array, b_m: jax.Array, spec: _spec.AdapterSpec
                  ) -> tuple[jax.Array, jax.Array]:
  """The inverse of `to_matrices`: A and B shaped as `spec` says (its
  rank, and `spec.stack_shape` leading axes)."""
  rank_axis, batch, rows, cols = _roles(spec.delta_str)
  a_axes, b_axes, weights = _einsum.split_delta(spec.delta_str)
  size = dict(zip(weights, spec.weight_shape))
  lead = _lead(spec)
  stack = tuple(spec.stack_shape)

  def arrange(x, axes_from: str, axes_to: str, shape) -> jax.Array:
    dims = [x.shape[0], *(size.get(c, spec.rank) for c in axes_from)]
    x = jnp.einsum(f'{lead}{axes_from}->{lead}{axes_to}', x.reshape(dims))
    return x.reshape((*stack, *shape))

  return (arrange(a_m, batch + rows + rank_axis, a_axes, spec.a_shape),
          arrange(b_m, batch + rank_axis + cols, b_axes, spec.b_shape))


def init_from_kernels(params: _params.Params,
                      adapters: Sequence[_spec.AdapterSpec], *,
                      method: Method = 'pissa') -> _params.Params:
  """PiSSA or OLoRA: A and B from each kernel, the kernel its residual.

  Takes the params of a LoRA model (base and adapters merged, as after
  `with peft.lora(...): model.init(...)`) and returns them with every
  adapter's A and B set from its kernel and the kernel replaced by
  `W - scale * delta(A, B)`, in the kernel's dtype. The model's output is
  unchanged to float rounding. Save the trained adapters through
  `adapters_for_original_base`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model, x = nn.Dense(4), jnp.ones((2, 3))
    >>> with peft.lora(rank=2) as report:
    ...   params = model.init(jax.random.key(0), x)['params']
    >>> pissa = peft.init_from_kernels(params, report.specs)
    >>> with peft.lora(rank=2):
    ...   same = model.apply({'params': pissa}, x)
    >>> bool(jnp.allclose(same, model.apply({'params': params}, x),
    ...                   atol=1e-5))
    True

  Args:
    params: base params with adapter branches.
    adapters: the `AdapterSpec` of every adapter in `params`.
    method: `'pissa'` (top singular vectors) or `'olora'` (QR).

  Returns:
    The params, with new kernels and adapters (same structure and dtypes).

  Raises:
    ValueError: an unknown method, a rank the kernel cannot give, specs
      that do not match the params.
    TypeError: a quantized kernel (initialise on the float base).
  """
  name = 'init_from_kernels'
  check_method(method, name)
  specs = _adapter_tree.check_specs(adapters, name)
  original, lora = _params.split_params(params)
  _adapter_tree.check_covered(lora, specs, name)
  base, lora = _params.to_dict(original), _params.to_dict(lora)
  for spec in specs:
    module = _adapter_tree.module_at(base, spec, name)
    if _numerics.is_quantized(module.get(spec.weight_name)):
      raise TypeError(
          f'{name}: kernel {_params.fmt_path((*spec.path, spec.weight_name))!r}'
          f' is quantized; {method} replaces a kernel by its residual, which '
          'needs the float kernel. Initialise on the float base params, then '
          'quantize the result with peft.quantize.'
      )
    kernel = _fuse.get_kernel(base, spec, name)
    a0, b0, spec = _adapter_tree.adapter_and_spec(lora, spec, name)
    a, b = kernel_factors(kernel, spec, method=method, where=name)
    a, b = a.astype(jnp.result_type(a0)), b.astype(jnp.result_type(b0))
    assert isinstance(module, dict)  # `to_dict` made every module a dict.
    module[spec.weight_name] = _fuse.apply_delta(kernel, a, b, spec, -1.0)
    node = _adapter_tree.adapter_node(lora, spec)
    node['a'], node['b'] = a, b
  return _params.like(params,
                      _params.to_dict(_params.merge_params(base, lora)))


def with_rank(shape: Sequence[int], axes: str, letter: str,
               rank: int) -> tuple[int, ...]:
  """`shape` (of A or B, named by `axes`) with its rank axis set to `rank`."""
  return tuple(rank if c == letter else d for c, d in zip(axes, shape))


def adapters_for_original_base(
    lora: _params.Params, initial: _params.Params,
    adapters: Sequence[_spec.AdapterSpec],
) -> tuple[dict[str, Any], tuple[_spec.AdapterSpec, ...]]:
  """Adapters trained on a PiSSA/OLoRA residual, as adapters of the
  original kernels.

  With `A0, B0` the adapters `init_from_kernels` made, the trained model
  is `residual + s A B = W + s (A B - A0 B0)`: adapters of rank `2 rank`
  (A next to A0, B next to -B0) with the same scale, over the original
  kernels `W`. Exact, so `fuse_params(W + these)` equals
  `fuse_params(residual + trained)` to float rounding. Save these (with
  their specs) and the file loads onto the pretrained model.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model, x = nn.Dense(4), jnp.ones((2, 3))
    >>> with peft.lora(rank=1) as report:
    ...   params = model.init(jax.random.key(0), x)['params']
    >>> pissa = peft.init_from_kernels(params, report.specs)
    >>> trained = jax.tree.map(lambda p: p * 1.1, pissa)  # "training"
    >>> lora, specs = peft.adapters_for_original_base(
    ...     peft.split_params(trained).lora, peft.split_params(pissa).lora,
    ...     report.specs)
    >>> specs[0].rank, lora['lora']['a'].shape
    (2, (3, 2))

  Args:
    lora: the trained adapters (a lora tree, `split_params(...).lora`).
    initial: the adapters right after `init_from_kernels`.
    adapters: their specs.

  Returns:
    `(lora tree, specs)` of the rank-`2 rank` adapters.

  Raises:
    ValueError: specs that do not match the trees.
  """
  name = 'adapters_for_original_base'
  specs = _adapter_tree.check_specs(adapters, name)
  out: dict[str, Any] = {}
  new_specs = []
  for spec in specs:
    a, b, spec = _adapter_tree.adapter_and_spec(lora, spec, name)
    a0, b0, _ = _adapter_tree.adapter_and_spec(initial, spec, name)
    a_axes, b_axes, _ = _einsum.split_delta(spec.delta_str)
    letter = rank_letter(spec.delta_str)
    n = len(spec.stack_shape)
    node = _adapter_tree.adapter_node(out, spec)
    node['a'] = jnp.concatenate([a, a0], axis=n + a_axes.index(letter))
    node['b'] = jnp.concatenate([b, -jnp.asarray(b0)],
                                axis=n + b_axes.index(letter))
    if spec.use_dora:  # V is the same kernel, so m carries over as it is
      node[_dora.MAGNITUDE] = _adapter_tree.get_magnitude(lora, spec, name)
    rank = 2 * spec.rank
    new_specs.append(dataclasses.replace(
        spec, rank=rank, alpha=spec.scale * rank, use_rslora=False,
        a_shape=with_rank(spec.a_shape, a_axes, letter, rank),
        b_shape=with_rank(spec.b_shape, b_axes, letter, rank)))
  return out, tuple(new_specs)


def init_dora_magnitudes(params: _params.Params,
                         adapters: Sequence[_spec.AdapterSpec], *,
                         simulate: Any = None) -> _params.Params:
  """Every DoRA magnitude `m` set to its kernel's norm `||W||`.

  DoRA (Liu et al. 2024) starts `m` at the per-output-feature norm of the
  kernel it adapts. `model.init` under surgery does so for the kernels it
  makes; call this after putting the pretrained kernels in
  (`merge_params(pretrained, split_params(params).lora)`), so the adapted
  model starts at the pretrained one. LoRA adapters are left as they are.

  `W` is the kernel the base computes with: a `QuantizedArray` (QDoRA over
  `peft.quantize`d params) is dequantized; under
  `peft.simulate_quantization(method)` pass `simulate=method`, and `W` is
  `simulate_quantize(kernel)` over the axes the layer contracts.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model, x = nn.Dense(2), jnp.ones((1, 3))
    >>> with peft.lora(rank=1, use_dora=True) as report:
    ...   lora = peft.split_params(model.init(jax.random.key(0), x)['params']
    ...                            ).lora
    >>> pretrained = {'kernel': jnp.array([[3., 0.], [4., 0.], [0., 2.]]),
    ...               'bias': jnp.zeros(2)}
    >>> params = peft.init_dora_magnitudes(
    ...     peft.merge_params(pretrained, lora), report.specs)
    >>> params['lora']['m'].tolist()
    [5.0, 2.0]
    >>> qdora = peft.init_dora_magnitudes(  # over an int8 base (QDoRA)
    ...     peft.merge_params(peft.quantize(pretrained, method='int8'), lora),
    ...     report.specs)
    >>> [round(m, 4) for m in qdora['lora']['m'].tolist()]
    [5.0, 2.0]

  Args:
    params: base params with adapter branches.
    adapters: the `AdapterSpec` of every adapter in `params`.
    simulate: the method of a simulated-quantization base (QAT), or None.

  Returns:
    The params with new magnitudes (in their dtype); the rest unchanged.

  Raises:
    ValueError: specs that do not match the params, or an unknown
      `simulate` method.
    TypeError: `simulate` with a `QuantizedArray` kernel (it is already
      quantized; leave `simulate` unset).
  """
  name = 'init_dora_magnitudes'
  method = None if simulate is None else _numerics.parse_method(
      simulate, where=f'{name} simulate')
  specs = _adapter_tree.check_specs(adapters, name)
  original, lora = _params.split_params(params)
  _adapter_tree.check_covered(lora, specs, name)
  lora = _params.to_dict(lora)
  for spec in specs:
    if not spec.use_dora:
      continue
    where = _params.fmt_path((*spec.path, spec.weight_name))
    stored = _adapter_tree.module_at(original, spec, name).get(
        spec.weight_name)
    if method is not None and isinstance(stored, _numerics.QuantizedArray):
      raise TypeError(
          f'{name}: kernel {where!r} is a {stored.method.name} '
          f'QuantizedArray, but simulate={simulate!r} asks for a float '
          'kernel under simulated quantization. Leave simulate unset for a '
          'quantized base.'
      )
    kernel = _fuse.get_kernel(original, spec, name, dequantize=True)
    _, _, m, stacked = _adapter_tree.adapter_arrays(lora, spec, name)
    n_stack = len(stacked.stack_shape)
    if method is not None:
      kernel = _numerics.simulate_quantize(
          kernel, method, _dora.norm_axes(len(spec.weight_shape),
                                          spec.magnitude_axes,
                                          n_stack=n_stack), where=where)
    _adapter_tree.adapter_node(lora, spec)[_dora.MAGNITUDE] = (
        _dora.column_norm(kernel, spec.magnitude_axes,
                          n_stack=n_stack).astype(jnp.result_type(m)))
  return _params.like(params, _params.to_dict(
      _params.merge_params(original, lora)))
