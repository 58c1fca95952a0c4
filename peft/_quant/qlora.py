"""QLoRA layers: LoRA over a frozen quantized base.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) trains
float LoRA adapters over a frozen quantized base: `with peft.quantized(),
peft.lora(rank=8):` (quantization outside, LoRA inside, so LoRA wraps the
quantized layers). The layers here are gemma.peft's QLoRA classes,
generalized to any registered einsum-like layer. Whole-tree quantization
is in `tree.py`, fusing into a quantized base in `fuse.py`, the context
managers in `surgery.py`.
"""

from __future__ import annotations

from flax import linen as nn

from peft._linen import lora_layers as _lora_layers
from peft._linen import registry as _registry
from peft._quant import layers as _ql
from peft._quant import numerics as q


class QLoRAEinsumLike(_lora_layers.LoRAEinsumLike):
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
    kind = _registry.einsum_kind_of(self.wrapped)
    name = kind.weight_name_of(self.wrapped) if kind else ''
    stored = (self.get_variable('params', name)
              if self.has_variable('params', name) else None)
    real = q.is_quantized(stored)
    base = _ql.wrapper_for(self.wrapped, simulate=not real,
                           method=None if real else self.quant_method)
    return _lora_layers.LoRAEinsumLike.from_options(
        self.options, wrapped=base)(*args, **kwargs)


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
