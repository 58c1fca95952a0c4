"""Quantized param trees, QLoRA layers and fusing into a quantized base.

(The context managers that run a model quantized are in
`_quantization_surgery.py`.)

* `quantize(params, ...)`: quantizes the kernels of a param tree, selected
  by path regex, predicate, an `axes` map or shape (never by layer names).
* QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): LoRA over
  a frozen quantized base: `with peft.quantized(), peft.lora(rank=8):`
  (quantization outside, LoRA inside, so LoRA wraps the quantized layers).
* `fuse_into_quantized`: folds trained adapters into a quantized base and
  re-quantizes with the same method, reporting the re-quantization error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import re
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peft import _einsum
from peft import _fuse
from peft import _layers
from peft import _lora
from peft import _params
from peft import _quantization as q
from peft import _quantized_layers as _ql
from peft import _spec


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _is_float(x: Any) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)


def quantize(params: Any, *, method: q.QuantizationMethod | str,
             checkpoint_kernel_key: str | None = None,
             in_place_keys: bool = False,
             targets: str | Callable[[str, Any], bool] | None = None,
             axes: Mapping[str, Any] | Callable[[str, Any], Any] | None = None,
             min_size: int = 1) -> Any:
  """Replaces the selected kernels of `params` by `QuantizedArray`s.

  A kernel keeps its path, so the `Int*` layers (`peft.quantized`) find it
  where the float layer kept it. Which float leaves are quantized: those
  named `checkpoint_kernel_key` (if given), then those `targets` selects;
  without `targets`, the keys of an `axes` map, else every leaf with
  `ndim >= 2` and `size >= min_size` but biases (flax's `'bias'` keys;
  exclude embeddings with `targets`). `axes=quantization_axes(model, x)`
  selects exactly the kernels of the model's einsum-like layers.

  Example:
    >>> params = {'dense': {'kernel': jnp.ones((4, 8)), 'bias': jnp.ones(8)},
    ...           'embed': {'embedding': jnp.ones((10, 4))}}
    >>> qp = quantize(params, method='int8', targets='dense/.*')
    >>> qp['dense']['kernel']
    QuantizedArray(method=INT8, shape=(4, 8), dtype=float32, \
values=int8[4, 8], scales=float32[1, 8])
    >>> qp['embed']['embedding'].shape  # not selected: stays float
    (10, 4)

  Args:
    params: a param tree (dicts of arrays).
    method: a `QuantizationMethod` or its name; NONE returns `params`.
    checkpoint_kernel_key: gemma.peft's argument: only leaves with this key
      (e.g. 'w'). `None`: any key.
    in_place_keys: accepted for gemma.peft compatibility; kernels always
      stay at their own key here, which is what the Int layers read.
    targets: a regex full-matched against leaf paths like 'block/q/kernel',
      or a predicate `(path, leaf) -> bool`.
    axes: per-kernel contracted axes: a map `{path: axes}` (see
      `quantization_axes`) or `(path, leaf) -> axes`. Per-channel methods
      reduce them, NF4 blocks along them. Missing: all axes but the last.
    min_size: smallest kernel size quantized by the shape rule.

  Returns:
    The tree with quantized kernels (other leaves unchanged).

  Raises:
    ValueError: unknown method, a bad regex, `targets`/`axes` that select
      no float leaf, or a kernel holding NaN or Inf (or too large for
      Q4_0's float16 scales); the message names the kernel's path.
    TypeError: `targets` or `axes` of the wrong kind.
  """
  del in_place_keys  # Kernels never move; see the docstring.
  method = q.parse_method(method, where='quantize')
  if method is q.QuantizationMethod.NONE:
    return params
  select = _selector(targets, axes, checkpoint_kernel_key, min_size)
  done = []

  def visit(path, leaf):
    key = _path_str(path)
    if q.is_quantized(leaf) or not _is_float(leaf) or not select(key, leaf):
      return leaf
    done.append(key)
    leaf_axes = (axes.get(key) if isinstance(axes, Mapping)
                 else axes(key, leaf) if axes is not None else None)
    return q.quantize_array(leaf, method, leaf_axes, where=key)

  out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=q.is_quantized)
  missing = sorted(set(axes) - set(done)) if isinstance(axes, Mapping) else []
  if (targets is not None or checkpoint_kernel_key or isinstance(
      axes, Mapping)) and (not done or (targets is None and missing)):
    paths = [_path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(
        params) if _is_float(x)]
    raise ValueError(
        f'quantize: the selection (targets={targets!r}, '
        f'checkpoint_kernel_key={checkpoint_kernel_key!r}, axes keys '
        f'{missing[:3] or "ok"}) does not match the float leaves of params, '
        f'which are {paths[:6]}. Fix the regex/keys to match these paths.'
    )
  return out


def _selector(targets, axes, kernel_key, min_size):
  if isinstance(targets, str):
    try:
      pattern = re.compile(targets)
    except re.error as e:
      raise ValueError(
          f'quantize: targets {targets!r} is not a valid regex ({e}). Pass '
          "e.g. targets='.*/kernel'."
      ) from None
    rule = lambda path, leaf: pattern.fullmatch(path) is not None
  elif callable(targets):
    rule = lambda path, leaf: bool(targets(path, leaf))
  elif targets is not None:
    raise TypeError(
        f'quantize: targets must be a path regex or a predicate (path, leaf)'
        f' -> bool; got {targets!r}.'
    )
  elif isinstance(axes, Mapping):
    rule = lambda path, leaf: path in axes
  else:
    rule = lambda path, leaf: (leaf.ndim >= 2 and leaf.size >= min_size
                               and not path.endswith('bias'))
  if axes is not None and not (isinstance(axes, Mapping) or callable(axes)):
    raise TypeError(
        f'quantize: axes must be a map {{path: axes}} or a function (path, '
        f'leaf) -> axes; got {axes!r}. See peft.quantization_axes.'
    )
  def select(path: str, leaf) -> bool:
    if kernel_key is not None and path.rsplit('/', 1)[-1] != kernel_key:
      return False
    return rule(path, leaf)
  return select


def param_bytes(params: Any) -> int:
  """Bytes held by the arrays of a tree (quantized codes and scales too).

  Example:
    >>> w = jnp.ones((64, 64))
    >>> param_bytes(w), param_bytes(quantize(w, method='int8'))
    (16384, 4352)
  """
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(params))


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


def _requantize(kernel, delta_str, a, b, scale, *, where):
  exact = _einsum.add_delta(kernel.dequantize(jnp.float32),
                            jnp.asarray(a, jnp.float32),
                            jnp.asarray(b, jnp.float32), scale,
                            delta_str=delta_str)
  # The kernel's own axes: its channels, or the axes its blocks run along.
  new = q.quantize_array(exact.astype(kernel.dtype), kernel.method,
                         kernel.axes, where=where)
  err = jnp.linalg.norm(new.dequantize(jnp.float32) - exact) / jnp.maximum(
      jnp.linalg.norm(exact), jnp.finfo(jnp.float32).tiny)
  return new, err


def fuse_into_quantized(params: Any, adapters: Sequence[_spec.AdapterSpec]):
  """`fuse_params` for a quantized base: returns `(fused, errors)`.

  Each quantized kernel is dequantized, gets `scale * einsum(delta_str, A,
  B)` and is re-quantized with its own method and axes; float kernels are
  fused in float (by `fuse_params`). `errors` maps each re-quantized
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
  specs = _fuse.check_specs(adapters, name)
  base, lora = _params.split_params(params)
  _fuse.check_covered(lora, specs, name)
  kernels = {s: _kernel(base, s, name) for s in specs}
  plain = [s for s in specs if not q.is_quantized(kernels[s])]
  fused = _fuse.fuse_params(
      _params.merge_params(base, _subtree(lora, plain)), plain)
  errors = {}
  for spec in specs:
    if spec not in plain:
      a, b = _fuse.get_adapter(lora, spec, name)
      new, errors[spec.key] = _requantize(kernels[spec], spec.delta_str, a, b,
                                          spec.scale, where=spec.key)
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
    _fuse.adapter_node(out, spec).update(zip('ab', _fuse.get_adapter(
        lora, spec, 'fuse_into_quantized')))
  return out


def _replace(tree, path, value):
  """A copy of `tree` with the leaf at `path` replaced (dicts out)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], value)
  return out


class QLoRAEinsumLike(_lora.LoRAEinsumLike):
  """LoRA over a quantized kernel (gemma.peft's QLoRA layers, generalized).

  If the params hold a `QuantizedArray` at the kernel's path (from
  `quantize`), the base runs on it (`Int*`, true QLoRA); otherwise the
  kernel is float and the base runs with `simulate_quantize(kernel,
  quant_method)`, as gemma.peft's. The adapter sits beside the kernel under
  `'lora'` and computes in float.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> layer = peft.QLoRAEinsumLike(rank=2, wrapped=nn.Dense(64),
    ...                              quant_method='nf4')
    >>> x = jnp.ones((1, 8))
    >>> params = layer.init(jax.random.key(0), x)['params']
    >>> jax.tree.map(jnp.shape, params['lora'])
    {'a': (8, 2), 'b': (2, 64)}
    >>> base, lora = peft.split_params(params)
    >>> qparams = {**peft.quantize(base, method='nf4'), **lora}
    >>> layer.apply({'params': qparams}, x).shape
    (1, 64)

  Attributes:
    quant_method: method of the simulated base (a stored QuantizedArray
      keeps its own).
  """

  quant_method: q.QuantizationMethod | str = q.QuantizationMethod.INT4

  def __post_init__(self):
    q.parse_method(self.quant_method, where=type(self).__name__)
    super().__post_init__()  # checks the wrapped layer's type

  @nn.compact
  def __call__(self, *args, **kwargs):
    kind = _layers.einsum_kind_of(self.wrapped)
    name = kind.describe(self.wrapped, args, kwargs).weight_name if kind else ''
    stored = (self.get_variable('params', name)
              if self.has_variable('params', name) else None)
    real = q.is_quantized(stored)
    base = _ql.wrapper_for(self.wrapped, simulate=not real,
                           method=None if real else self.quant_method)
    options = {f: getattr(self, f) for f in _lora.wrapper_fields()}
    return _lora.LoRAEinsumLike(wrapped=base, **options)(*args, **kwargs)


class QLoRADense(QLoRAEinsumLike):
  """QLoRA for `nn.Dense` (see `QLoRAEinsumLike`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> dense = nn.Dense(4)
    >>> layer = peft.QLoRADense(rank=2, wrapped=dense)
    >>> x = jnp.ones((1, 8))
    >>> params = layer.init(jax.random.key(0), x)['params']
    >>> jax.tree.map(jnp.shape, params)
    {'bias': (4,), 'kernel': (8, 4), 'lora': {'a': (8, 2), 'b': (2, 4)}}
    >>> base, lora = peft.split_params(params)
    >>> qbase = peft.quantize(base, method='nf4')  # the frozen 4-bit base
    >>> y = layer.apply({'params': peft.merge_params(qbase, lora)}, x)
    >>> # B starts at zero: the output is the quantized base's.
    >>> bool(jnp.all(y == peft.IntDense(wrapped=dense).apply(
    ...     {'params': qbase}, x)))
    True
  """

  _expects = nn.Dense


class QLoRAEinsum(QLoRAEinsumLike):
  """QLoRA for `nn.Einsum` (see `QLoRAEinsumLike`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> einsum = nn.Einsum((4, 2, 3), 'btd,dnh->btnh')
    >>> layer = peft.QLoRAEinsum(rank=1, wrapped=einsum, quant_method='int8')
    >>> x = jnp.ones((1, 5, 4))
    >>> params = layer.init(jax.random.key(0), x)['params']
    >>> jax.tree.map(jnp.shape, params['lora'])  # A on d, B on (n, h)
    {'a': (4, 1), 'b': (1, 2, 3)}
    >>> # A float kernel runs simulated int8, as gemma.peft's QLoRA does.
    >>> simulated = peft.SimulateQuantizedEinsum(wrapped=einsum, method='int8')
    >>> base = peft.split_params(params).original
    >>> bool(jnp.all(layer.apply({'params': params}, x)
    ...               == simulated.apply({'params': base}, x)))
    True
  """

  _expects = nn.Einsum
