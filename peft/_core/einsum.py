"""The one einsum parser of the package.

Every weighted layer we adapt or quantize is described by an equation
`inputs,weights->outputs` (a Dense layer is `...i,io->...o`). From that single
description this module derives everything the rest of the package needs:

* the LoRA rewrite `inputs,a,b->outputs`, where `a` holds the weight axes
  shared with the inputs (contracted and batch/expert axes) followed by a new
  rank axis, and `b` holds the rank axis followed by the remaining weight axes
  (LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685);
* how to evaluate that rewrite cheaply: `x @ A` first (a rank-sized
  intermediate), then `@ B` with B laid out so the result needs no transpose
  (`LoRAEinsumPlan.apply`);
* the delta equation `a,b->weights`, so `einsum(delta_eq, A, B)` has the
  kernel's exact shape and axis order (used by fuse/unfuse), and a fusible
  way to add it to a kernel (`add_delta`);
* the kernel axes a per-channel quantizer reduces over (those contracted with
  the inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import re
import string

import jax
import jax.numpy as jnp

from peft._core import errors as _errors
from peft._core import options as _options

_ELLIPSIS = '...'


@dataclasses.dataclass(frozen=True)
class LoRAEinsumPlan:
  """How a LoRA adapter factorises one weight, and how to apply it.

  `apply` evaluates `einsum_str` in two products. First `down_str`
  contracts x with A, leaving the input's kept axes and the rank. Then
  `up_str` contracts that with B. B's output axes that come before every
  input axis in the outputs (Gemma's `C` in `BTD,CDF->CBTF`) become batch
  axes of that second product. So the product writes the output in its
  final axis order, and no activation-sized transpose follows.

  Example:
    >>> plan = EinsumEquation.parse('BTD,CDF->CBTF').lora_plan(
    ...     weight_shape=(8, 2, 4), rank=3)
    >>> plan.down_str, plan.b_layout_str, plan.up_str
    ('BTD,Dr->BTr', 'rCF->CrF', 'CBTr,CrF->CBTF')

  Attributes:
    einsum_str: the adapter's equation `inputs,a,b->outputs`.
    delta_str: `a,b->weights`; gives a delta shaped exactly like the kernel.
    a_shape: shape of A (input-side weight axes, then rank).
    b_shape: shape of B (rank, then the other weight axes).
    down_str: `inputs,a->low`, the first product `x @ A`.
    b_layout_str: `b->lead,rank,rest`, moving B's leading output axes to
      the front, or '' when there are none.
    up_str: `low,b->outputs` (with the lead axes prepended to both when
      `b_layout_str` is set).
    lead_ndim: how many of B's axes `b_layout_str` moves to the front.
  """

  einsum_str: str
  delta_str: str
  a_shape: tuple[int, ...]
  b_shape: tuple[int, ...]
  down_str: str
  b_layout_str: str
  up_str: str
  lead_ndim: int

  def apply(self, x: jax.Array, a: jax.Array, b: jax.Array, *,
            precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """`einsum(einsum_str, x, a, b)`, computed as `(x @ A) @ B`."""
    low = jnp.einsum(self.down_str, x, a, precision=precision)
    if self.b_layout_str:
      b = jnp.einsum(self.b_layout_str, b)
      # The lead axes are dot batch axes: low needs them too (its broadcast
      # is fused into the dot; its gradient is a sum over them).
      low = jnp.broadcast_to(low, b.shape[:self.lead_ndim] + low.shape)
    return jnp.einsum(self.up_str, low, b, precision=precision)

  def batch_axis(self, out_ndim: int) -> int | None:
    """Where the input's first axis (the batch) lands in an output of
    `out_ndim` axes; None when the equation contracts it.

    Example:
      >>> plan = EinsumEquation.parse('BSD,CKDH->CBSKH').lora_plan(
      ...     weight_shape=(2, 1, 8, 4), rank=3)
      >>> plan.batch_axis(5)
      1
      >>> EinsumEquation.parse('...i,io->...o').lora_plan(
      ...     weight_shape=(3, 4), rank=2).batch_axis(3)
      0
    """
    inputs, outputs = self.einsum_str.split('->')
    head = _axes(inputs.split(',')[0])[0]
    out = _axes(outputs)
    if head not in out:
      return None
    dots = out_ndim - len(out) + 1  # The axes `...` stands for.
    return sum(dots if t == _ELLIPSIS else 1 for t in out[:out.index(head)])


@dataclasses.dataclass(frozen=True)
class EinsumEquation:
  """A validated `inputs,weights->outputs` equation.

  Example:
    >>> eq = EinsumEquation.parse('BTD,DNH->BTNH')
    >>> eq.inputs, eq.weights, eq.outputs
    ('BTD', 'DNH', 'BTNH')
    >>> plan = eq.lora_plan(weight_shape=(8, 2, 4), rank=3)
    >>> plan.einsum_str, plan.a_shape, plan.b_shape, plan.delta_str
    ('BTD,Dr,rNH->BTNH', (8, 3), (3, 2, 4), 'Dr,rNH->DNH')
    >>> eq.reduction_axes
    (0,)

  Attributes:
    inputs: the input term (may contain `...`).
    weights: the weight term (letters only, each once).
    outputs: the output term (may contain `...`).
  """

  inputs: str
  weights: str
  outputs: str

  @classmethod
  def parse(cls, einsum_str: str, *, where: str = '') -> EinsumEquation:
    """Parses and validates `einsum_str`.

    Args:
      einsum_str: e.g. `'BTD,DNH->BTNH'`; whitespace is ignored.
      where: the module path, quoted in error messages.

    Returns:
      The parsed equation.

    Raises:
      ValueError: the equation is not `inputs,weights->outputs`, the weights
        hold an ellipsis or a repeated letter, or an output letter comes from
        nowhere.
      TypeError: `einsum_str` is not a string.
    """
    at = _errors.at(where)
    if not isinstance(einsum_str, str):
      raise TypeError(
          f'einsum_str must be a str like "BTD,DNH->BTNH"; got '
          f'{einsum_str!r}{at}.'
      )
    eq = ''.join(einsum_str.split())
    lhs, arrow, outputs = eq.partition('->')
    terms = lhs.split(',')
    if not arrow or '->' in outputs or len(terms) != 2:
      raise ValueError(
          "einsum_str must be 'inputs,weights->outputs' with exactly two "
          f'operands and an explicit "->"; got {einsum_str!r}{at}. Pass a '
          'two-operand einsum such as "BTD,DNH->BTNH".'
      )
    inputs, weights = terms
    if _ELLIPSIS in weights:
      raise ValueError(
          f'The weights term {weights!r} of einsum_str {einsum_str!r}{at} '
          'contains an ellipsis. Name every weight axis with a letter.'
      )
    for name, term in (('inputs', inputs), ('weights', weights),
                       ('outputs', outputs)):
      letters = term.replace(_ELLIPSIS, '')
      if not all(c in string.ascii_letters for c in letters):
        raise ValueError(
            f'The {name} term {term!r} of einsum_str {einsum_str!r}{at} holds '
            'characters other than ASCII letters and one "...". Use letters '
            'for axes.'
        )
      if term.count(_ELLIPSIS) > 1:
        raise ValueError(
            f'The {name} term {term!r} of einsum_str {einsum_str!r}{at} has '
            'more than one "...". Use at most one ellipsis per term.'
        )
    if not weights:
      raise ValueError(
          f'The weights term of einsum_str {einsum_str!r}{at} is empty. '
          'A weight needs at least one axis.'
      )
    if len(set(weights)) != len(weights):
      raise ValueError(
          f'The weights term {weights!r} of einsum_str {einsum_str!r}{at} '
          'repeats a letter. Give every weight axis its own letter.'
      )
    out_letters = outputs.replace(_ELLIPSIS, '')
    if len(set(out_letters)) != len(out_letters):
      raise ValueError(
          f'The outputs term {outputs!r} of einsum_str {einsum_str!r}{at} '
          'repeats a letter. Give every output axis its own letter.'
      )
    unknown = set(out_letters) - set(inputs) - set(weights)
    if unknown:
      raise ValueError(
          f'Output axes {"".join(sorted(unknown))!r} of einsum_str '
          f'{einsum_str!r}{at} appear in neither inputs nor weights. '
          'Every output letter must come from an operand.'
      )
    if _ELLIPSIS in outputs and _ELLIPSIS not in inputs:
      raise ValueError(
          f'The outputs term of einsum_str {einsum_str!r}{at} has "..." but '
          'the inputs do not. Put the ellipsis in the inputs too.'
      )
    return cls(inputs=inputs, weights=weights, outputs=outputs)

  @property
  def einsum_str(self) -> str:
    """The canonical (whitespace-free) equation."""
    return f'{self.inputs},{self.weights}->{self.outputs}'

  @property
  def input_side_axes(self) -> str:
    """Weight letters shared with the inputs, in weight order (A's axes)."""
    return ''.join(c for c in self.weights if c in self.inputs)

  @property
  def output_side_axes(self) -> str:
    """Weight letters not in the inputs, in weight order (B's axes)."""
    return ''.join(c for c in self.weights if c not in self.inputs)

  @property
  def reduction_axes(self) -> tuple[int, ...]:
    """Kernel axes contracted with the inputs (summed away in the output).

    A per-channel quantizer computes one scale per slice along the other
    axes, so these are the axes it reduces over.
    """
    return tuple(
        i for i, c in enumerate(self.weights)
        if c in self.inputs and c not in self.outputs
    )

  @property
  def magnitude_axes(self) -> tuple[int, ...]:
    """Kernel axes that the outputs keep: the axes of a DoRA magnitude.

    An output feature of the layer is one entry along these axes (output
    features, and axes shared by inputs, kernel and outputs such as
    experts); the other kernel axes are summed away, so DoRA's column norm
    is taken over them (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

    Example:
      >>> EinsumEquation.parse('BTD,DNH->BTNH').magnitude_axes
      (1, 2)
      >>> EinsumEquation.parse('ETD,EDF->ETF').magnitude_axes  # experts
      (0, 2)
    """
    return tuple(i for i, c in enumerate(self.weights) if c in self.outputs)

  def to_outputs(self, value: jax.Array, ndim: int) -> jax.Array:
    """`value` over `magnitude_axes` (kernel order), laid out to broadcast
    against an output of `ndim` axes.

    Size-1 axes stand for the output axes `value` lacks; an equation
    written per output position (a conv's) broadcasts over the leading
    axes it does not name.

    Example:
      >>> eq = EinsumEquation.parse('...d,dnh->...hn')
      >>> eq.to_outputs(jnp.zeros((2, 3)), ndim=4).shape  # (n, h) -> h, n
      (1, 1, 3, 2)
    """
    letters = ''.join(self.weights[i] for i in self.magnitude_axes)
    terms = _axes(self.outputs)
    order = ''.join(t for t in terms if t in letters)
    value = jnp.einsum(f'{letters}->{order}', value) if letters else value
    size = dict(zip(order, value.shape))
    shape: list[int] = []
    for t in terms:
      if t == _ELLIPSIS:
        shape += [1] * (ndim - len(terms) + 1)
      else:
        shape.append(size.get(t, 1))
    return value.reshape([1] * (ndim - len(shape)) + shape)

  def rank_letter(self) -> str:
    """A letter used nowhere in the equation ('r' when free)."""
    used = set(self.inputs + self.weights + self.outputs)
    if 'r' not in used:
      return 'r'
    free = sorted(set(string.ascii_letters) - used)
    if not free:
      raise ValueError(
          f'einsum_str {self.einsum_str!r} uses all 52 letters; none is left '
          'for the LoRA rank axis. Use fewer axis letters.'
      )
    return free[0]

  def check_weight_shape(
      self, weight_shape: Sequence[int], *, where: str = ''
  ) -> tuple[int, ...]:
    """Returns `weight_shape` as a tuple; checks one dim per weight letter."""
    shape = tuple(int(d) for d in weight_shape)
    if len(shape) != len(self.weights):
      at = _errors.at(where)
      raise ValueError(
          f'Weight shape {shape} has {len(shape)} axes but the weights term '
          f'{self.weights!r} of einsum_str {self.einsum_str!r}{at} names '
          f'{len(self.weights)}. Make the equation match the kernel.'
      )
    return shape

  def lora_plan(
      self, *, weight_shape: Sequence[int], rank: int, where: str = ''
  ) -> LoRAEinsumPlan:
    """Factorises the weight into A and B of the given rank.

    Args:
      weight_shape: the kernel's shape, one entry per weight letter.
      rank: the LoRA rank (> 0).
      where: module path for error messages.

    Returns:
      The adapter equation, the delta equation and the A/B shapes.
    """
    check_rank(rank, where=where)
    shape = self.check_weight_shape(weight_shape, where=where)
    r = self.rank_letter()
    dims = dict(zip(self.weights, shape))
    dims[r] = rank
    a_axes = self.input_side_axes + r
    b_axes = r + self.output_side_axes
    # `low` keeps the input axes the outputs keep, in input order (each once).
    low = ''.join(dict.fromkeys(
        t for t in _axes(self.inputs) if t == _ELLIPSIS or t in self.outputs))
    lead = ''
    for t in _axes(self.outputs):
      if t == _ELLIPSIS or t in low:
        break
      lead += t  # an output axis of B's that precedes every input axis
    rest = ''.join(c for c in self.output_side_axes if c not in lead)
    if lead:
      b_layout_str = f'{b_axes}->{lead}{r}{rest}'
      up_str = f'{lead}{low}{r},{lead}{r}{rest}->{self.outputs}'
    else:
      b_layout_str = ''
      up_str = f'{low}{r},{b_axes}->{self.outputs}'
    return LoRAEinsumPlan(
        einsum_str=f'{self.inputs},{a_axes},{b_axes}->{self.outputs}',
        delta_str=f'{a_axes},{b_axes}->{self.weights}',
        a_shape=tuple(dims[c] for c in a_axes),
        b_shape=tuple(dims[c] for c in b_axes),
        down_str=f'{self.inputs},{a_axes}->{low}{r}',
        b_layout_str=b_layout_str, up_str=up_str, lead_ndim=len(lead),
    )


def _axes(term: str) -> list[str]:
  """The axes of an einsum term: letters and `...`, in order."""
  return re.findall(r'\.\.\.|[A-Za-z]', term)


def split_delta(delta_str: str) -> tuple[str, str, str]:
  """`(a_axes, b_axes, weights)` of a delta equation `a,b->weights`.

  Example:
    >>> split_delta('Dr,rNH->DNH')
    ('Dr', 'rNH', 'DNH')
  """
  lhs, weights = delta_str.split('->')
  a_axes, b_axes = lhs.split(',')
  return a_axes, b_axes, weights


def delta(delta_str: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`einsum(delta_str, a, b)`: a kernel-shaped delta, as a sum over the rank.

  A sum of `rank` broadcast outer products, not a dot. So it is exact
  elementwise float math whatever the backend's matmul precision. And under
  jit, XLA fuses the delta with whatever consumes it (the add to the kernel,
  the cast) into one pass over the kernel, where a dot would write the whole
  delta and read it back.

  Example:
    >>> a, b = jnp.arange(6.).reshape(3, 2), jnp.arange(8.).reshape(2, 4)
    >>> bool((delta('ir,ro->io', a, b) == a @ b).all())
    True
    >>> delta('Dr,rNH->NDH', jnp.ones((4, 2)), jnp.ones((2, 3, 5))).shape
    (3, 4, 5)
  """
  a_axes, b_axes, weights = split_delta(delta_str)
  (rank,) = set(a_axes) - set(weights)
  full = weights + rank

  def expand(x, axes):
    # Put x's axes in kernel order (rank last), with size-1 axes for the
    # kernel axes it lacks, so the product broadcasts to kernel + (rank,).
    order = ''.join(sorted(axes, key=full.index))
    x = jnp.einsum(f'{axes}->{order}', x)
    return x.reshape([x.shape[order.index(c)] if c in order else 1
                      for c in full])

  a, b = expand(a, a_axes), expand(b, b_axes)
  # Unrolled over the rank: an elementwise fusion, which XLA vectorizes along
  # the kernel's minor axis (a reduction over a short minor rank axis runs
  # about 2x slower on CPU; a dot writes the delta and reads it back).
  out = a[..., 0] * b[..., 0]
  for i in range(1, a.shape[-1]):
    out = out + a[..., i] * b[..., i]
  return out


def stacked_delta_str(delta_str: str, n_stack: int) -> str:
  """`delta_str` with `n_stack` leading axes shared by A, B and the kernel.

  Layers stacked by `nn.scan` or `nn.vmap` hold one kernel, A and B per
  layer along the leading axes; the delta is taken layer by layer.

  Example:
    >>> stacked_delta_str('ir,ro->io', 1)
    'air,aro->aio'
  """
  if n_stack == 0:
    return delta_str
  free = [c for c in string.ascii_letters if c not in delta_str][:n_stack]
  lead = ''.join(free)
  a_axes, b_axes, weights = split_delta(delta_str)
  return f'{lead}{a_axes},{lead}{b_axes}->{lead}{weights}'


@functools.partial(jax.jit, static_argnames=('delta_str', 'with_error'))
def add_delta(kernel: jax.Array, a: jax.Array, b: jax.Array,
              scale: jax.Array | float, *, delta_str: str,
              with_error: bool = False):
  """`kernel + scale * delta(delta_str, a, b)`, cast back to kernel's dtype.

  Computed in float32 (or wider, if an operand is), in one fused pass over
  the kernel; jitted, so an eager call runs that pass too instead of
  op by op.

  Example:
    >>> w = jnp.zeros((2, 2), jnp.bfloat16)
    >>> out = add_delta(w, jnp.ones((2, 1)), jnp.ones((1, 2)), 0.5,
    ...                 delta_str='ir,ro->io')
    >>> out.dtype, out.tolist()
    (dtype(bfloat16), [[0.5, 0.5], [0.5, 0.5]])

  Args:
    kernel: the weight.
    a: A of the adapter.
    b: B of the adapter.
    scale: the factor of the delta (negative to subtract it).
    delta_str: `a,b->weights`.
    with_error: also return the largest absolute round-off of the cast.

  Returns:
    The new kernel, or `(new kernel, max abs round-off)` with `with_error`.
  """
  dtype = jnp.result_type(kernel, a, b, jnp.float32)
  exact = kernel.astype(dtype) + jnp.asarray(scale, dtype) * delta(
      delta_str, a.astype(dtype), b.astype(dtype))
  out = exact.astype(kernel.dtype)
  if not with_error:
    return out
  return out, jnp.max(jnp.abs(out.astype(dtype) - exact), initial=0.0)


def delta_partition_names(
    delta_str: str, kernel_names: Sequence[str | None]
) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
  """Sharding axis names of A and B from the kernel's, via `a,b->weights`.

  Each A/B axis takes the name of the kernel axis with the same letter; the
  rank axis (absent from the kernel) is replicated (`None`).

  Example:
    >>> delta_partition_names('Dr,rNH->DNH', ('embed', 'heads', 'kv'))
    (('embed', None), (None, 'heads', 'kv'))
  """
  a_axes, b_axes, weights = split_delta(delta_str)
  if len(kernel_names) != len(weights):
    raise ValueError(
        f'The kernel has {len(kernel_names)} partition names '
        f'{tuple(kernel_names)!r} but the delta equation {delta_str!r} gives '
        f'it {len(weights)} axes. Give one name (or None) per kernel axis.'
    )
  name = dict(zip(weights, kernel_names))
  return (tuple(name.get(c) for c in a_axes),
          tuple(name.get(c) for c in b_axes))


def check_rank(rank: object, *, where: str = '') -> int:
  """Returns `rank` as an int if it is a positive int, else raises."""
  return _options.check_lora_options(where, rank=rank)['rank']


def dense_general_call(
    *, input_shape: Sequence[int], axis: Sequence[int],
    batch_dims: Sequence[int], features: Sequence[int],
) -> tuple[EinsumEquation, tuple[int, ...]]:
  """The equation and kernel shape of `nn.DenseGeneral` on `input_shape`.

  Output axes follow `lax.dot_general`: batch axes, the free input axes, then
  the feature axes; the kernel is batch axes, contracted axes (in `axis`
  order), then features. Negative axes count from the end.

  Example:
    >>> eq, shape = dense_general_call(input_shape=(2, 5, 6), axis=(-1,),
    ...                                batch_dims=(), features=(3, 4))
    >>> eq.einsum_str, shape
    ('abc,cde->abde', (6, 3, 4))
  """
  ndim = len(input_shape)
  letters = string.ascii_letters
  axis = tuple(a % ndim for a in axis)
  batch_dims = tuple(a % ndim for a in batch_dims)
  inputs = letters[:ndim]
  feats = letters[ndim:ndim + len(features)]
  free = ''.join(inputs[i] for i in range(ndim)
                 if i not in axis and i not in batch_dims)
  batch = ''.join(inputs[i] for i in batch_dims)
  contracted = ''.join(inputs[i] for i in axis)
  eq = EinsumEquation(inputs=inputs, weights=batch + contracted + feats,
                      outputs=batch + free + feats)
  shape = tuple(input_shape[i] for i in batch_dims + axis) + tuple(features)
  return eq, shape


# Window axes of a conv kernel: any letters but the channel ('i', 'o') and
# rank ('r') letters, so the delta reads '{window}ir,ro->{window}io'.
_WINDOW_LETTERS = ''.join(c for c in string.ascii_lowercase if c not in 'ior')


def conv_equation(n_window: int, *, where: str = '') -> EinsumEquation:
  """The einsum a conv kernel is the weight of, per output position.

  A convolution contracts each window patch `{window}i` of its input with
  the kernel `{window}io`; LoRA factorises that kernel like any einsum
  weight (A: window and input channels then the rank; B: rank to output
  channels). linen's and nnx's LoRA convs both derive from this.

  Example:
    >>> eq = conv_equation(2)
    >>> eq.einsum_str
    'abi,abio->o'
    >>> plan = eq.lora_plan(weight_shape=(3, 3, 5, 4), rank=2)
    >>> plan.delta_str, plan.a_shape, plan.b_shape
    ('abir,ro->abio', (3, 3, 5, 2), (2, 4))

  Raises:
    ValueError: more spatial axes than letters for them.
  """
  if n_window > len(_WINDOW_LETTERS):
    raise ValueError(
        f'The conv at {where or "<unknown>"!r} has {n_window} spatial axes; '
        f'LoRA convs support at most {len(_WINDOW_LETTERS)}. Exclude it from '
        'the LoRA targets.'
    )
  return _conv_equation(n_window)


@functools.lru_cache(maxsize=None)
def _conv_equation(n_window: int) -> EinsumEquation:
  # Parsed once per window rank: a LoRA conv asks at every call, and the
  # string is valid by construction (so no `where` is needed).
  w = _WINDOW_LETTERS[:n_window]
  return EinsumEquation.parse(f'{w}i,{w}io->o')


# A table lookup is a one-hot matmul: rows of A (one per id), then B.
EMBED = EinsumEquation.parse('...v,vf->...f')
