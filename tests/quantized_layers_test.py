"""Tests of quantized layers, quantization surgery, QLoRA and fusing.

Outputs are compared with the unmodified float model (per-method relative
error bounds), with an independent `jnp.einsum` over the quantized kernel,
and simulated (QAT) with real (Int) quantization.
"""

import contextlib
import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft
from peft._core import fuse as _fuse
from peft._core import params as _params
from peft._linen import registry as _registry
from peft._quant import fuse as qfuse
from peft._quant import layers as ql
from peft._quant import numerics as q
from peft._quant import qlora
from peft._quant import tree as qtree
from tests import fixtures
from tests import helpers

M = q.QuantizationMethod
REAL = [m for m in M if m is not M.NONE]
# Relative error of the 4-layer Net's output against the float model.
NET_ERROR_BOUND = {M.INT8: 0.015, M.SFP8: 0.08, M.INT4: 0.3, M.Q4_0: 0.25,
                   M.Q4_0_TRANSPOSE: 0.25, M.NF4: 0.25}


class Net(nn.Module):
  """Dense, DenseGeneral, Einsum and a custom einsum; every kernel splits
  into whole blocks for each method (axis -1 of 64, axis -2 of 32/64)."""

  custom: bool = True

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(64, name='up')(x)
    h = nn.DenseGeneral((32, 64), name='heads')(jax.nn.gelu(h))
    h = nn.Einsum((32, 64, 64), 'bnh,nhd->bd', name='merge')(h)
    if self.custom:
      h = fixtures.MyEinsum((64, 64), name='proj')('bd,de->be',
                                                    jax.nn.gelu(h))
    return h


class OneDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, name='dense')(x)


X = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32)), jnp.float32)
NET_AXES = {'up/kernel': (0,), 'heads/kernel': (0,), 'merge/kernel': (0, 1),
            'proj/w': (0,)}


def filled(shapes, seed=0, adapter_scale=None):
  """Params of the given shapes from numpy (no jax.random compiles).

  Kernels get N(0, 1/fan_in), biases small values; adapter B stays zero
  (as at init) unless `adapter_scale` is given.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [str(getattr(p, 'key', '')) for p in path]
    if names[-1] == 'b' and any(n.startswith('lora') for n in names):
      if adapter_scale is None:
        return jnp.zeros(leaf.shape, leaf.dtype)
      return jnp.asarray(adapter_scale * rng.normal(size=leaf.shape),
                         leaf.dtype)
    fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
    scale = 0.1 if len(leaf.shape) == 1 else fan_in**-0.5
    return jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def shapes_of(model, *args, surgeries=()):
  """Param shapes of `model.init` under `surgeries` (no compute)."""
  with contextlib.ExitStack() as stack:
    for surgery in surgeries:
      stack.enter_context(surgery)
    return jax.eval_shape(model.init, jax.random.key(0), *args)['params']


def shapes_and_report(model, *args, outer):
  """Shapes under `outer` then LoRA (rank 4) inside; and LoRA's report."""
  with outer, peft.lora(rank=4) as report:
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)['params']
  return shapes, report


@functools.cache
def net_params():
  return filled(shapes_of(Net(), X))


def run(surgery, model, params, x=X):
  """Applies `model` under `surgery` (jitted: the surgery runs at trace)."""
  @jax.jit
  def apply(params, x):
    with surgery:
      return model.apply({'params': params}, x)
  return apply(params, x)


def rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# Layers with their equation (for an independent einsum) and contracted
# kernel axes; inputs are (2, 5, 8).
LAYERS = {
    'dense': (lambda: nn.Dense(64), '...i,io->...o', (0,)),
    'dense_general': (
        lambda: nn.DenseGeneral((2, 32), axis=(-2, -1),
                                bias_init=nn.initializers.normal()),
        'abc,bcde->ade', (0, 1)),
    'einsum': (lambda: nn.Einsum((8, 2, 32), 'btd,dnh->btnh',
                                 bias_init=nn.initializers.normal()),
               'btd,dnh->btnh', (0,)),
    'custom': (lambda: fixtures.MyEinsum((8, 64)), 'btd,de->bte', (0,)),
}


def _call(layer, params, x, wrapper=None):
  module = layer if wrapper is None else wrapper
  if isinstance(layer, fixtures.MyEinsum):
    return module.apply({'params': params}, 'btd,de->bte', x)
  return module.apply({'params': params}, x)


def _init(module, layer, x):
  if isinstance(layer, fixtures.MyEinsum):
    return module.init(jax.random.key(0), 'btd,de->bte', x)['params']
  return module.init(jax.random.key(0), x)['params']


@pytest.mark.parametrize('name', LAYERS)
def test_wrappers_init_like_the_layer_and_compute_with_quantized_kernel(
    name):
  make, eq, axes = LAYERS[name]
  layer, x = make(), fixtures.features()
  params = _init(layer, layer, x)
  none = ql.SimulateQuantizedEinsumLike(wrapped=layer, method='none')
  helpers.assert_trees_close(_init(none, layer, x), params)
  sim = ql.SimulateQuantizedEinsumLike(wrapped=layer, method='int8')
  real = ql.IntEinsumLike(wrapped=layer, method='int8')
  kernel_name = 'kernel' if 'kernel' in params else 'w'

  @jax.jit
  def outputs(params):
    qparams = qtree.quantize(params, method='int8', axes={kernel_name: axes})
    return (_call(layer, params, x, none), _call(layer, params, x),
            _call(layer, params, x, sim), _call(layer, qparams, x, real))

  none_out, plain_out, sim_out, real_out = outputs(params)
  helpers.assert_trees_close(none_out, plain_out, rtol=1e-6, atol=1e-7)
  want = jnp.einsum(eq, x, q.simulate_quantize(params[kernel_name], 'int8',
                                               axes))
  if 'bias' in params:  # Biases here broadcast from the right.
    bias = params['bias']
    want = want + bias.reshape((1,) * (want.ndim - bias.ndim) + bias.shape)
  helpers.assert_trees_close(sim_out, want, rtol=1e-5, atol=1e-6)
  helpers.assert_trees_close(real_out, want, rtol=1e-5, atol=1e-6)


def test_simulated_gradient_is_straight_through():
  layer, x = nn.Dense(64), fixtures.features()
  params = filled(shapes_of(layer, x))
  sim = ql.SimulateQuantizedDense(wrapped=layer, method='int4')
  target = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5, 64)),
                       jnp.float32)
  loss = lambda module, p: jnp.sum((module.apply({'params': p}, x) - target)
                                   ** 2)
  grads = jax.grad(functools.partial(loss, sim))(params)
  # STE: d/dW f(Q(W)) = f'(Q(W)), the float layer's gradient at Q(W).
  at_q = {**params, 'kernel': q.simulate_quantize(params['kernel'], 'int4')}
  helpers.assert_trees_close(grads, jax.grad(functools.partial(loss, layer))(
      at_q), rtol=1e-5, atol=1e-5)


def test_single_int8_layer_is_well_under_one_percent():
  params = filled(shapes_of(OneDense(), X))
  want = OneDense().apply({'params': params}, X)
  got = run(peft.quantized('int8'), OneDense(),
            qtree.quantize(params, method='int8'))
  assert rel_err(got, want) < 0.008


def test_quantization_axes_come_from_the_equations():
  assert peft.quantization_axes(Net(), X) == NET_AXES


@functools.partial(jax.jit, static_argnums=1)
def _net_outputs(params, method):
  """Real, simulated and float outputs of Net, in one compile per method."""
  qparams = qtree.quantize(params, method=method, axes=NET_AXES)
  with peft.quantized(method):
    real = Net().apply({'params': qparams}, X)
  with peft.simulate_quantization(method):
    sim = Net().apply({'params': params}, X)
  return real, sim, Net().apply({'params': params}, X)


@pytest.mark.parametrize('method', REAL)
def test_model_real_equals_simulated_within_bound_of_float(method):
  real, sim, float_out = _net_outputs(net_params(), method)
  helpers.assert_trees_close(real, sim, rtol=1e-5, atol=1e-6)
  assert rel_err(real, float_out) < NET_ERROR_BOUND[method]


def test_int_init_stores_the_quantized_float_init():
  @jax.jit
  def inits():
    with peft.quantized('nf4') as kernels:
      init = Mlp().init(jax.random.key(0), X)['params']
    assert kernels == {'up/kernel': (0,), 'down/kernel': (0,)}
    return init, Mlp().init(jax.random.key(0), X)['params']

  init, float_init = inits()
  want = qtree.quantize(float_init, method='nf4')
  assert jax.tree.structure(init) == jax.tree.structure(want)
  helpers.assert_trees_close(q.dequantize(init), q.dequantize(want))


def test_custom_layers_in_a_shared_scope():
  x = fixtures.features()
  model = fixtures.CustomModel()
  params = filled(shapes_of(model, x))
  with peft.simulate_quantization('int8') as kernels:
    jax.eval_shape(model.apply, {'params': params}, x)
  assert kernels == {'proj/w': (0,), 'mlp/gating_einsum': (1,),
                     'mlp/linear': (0,)}

  @jax.jit
  def outputs(params):
    qparams = qtree.quantize(params, method='int8', axes=kernels)
    with peft.simulate_quantization('int8'):
      sim = model.apply({'params': params}, x)
    with peft.quantized():
      real = model.apply({'params': qparams}, x)
    return qparams, sim, real, model.apply({'params': params}, x)

  qparams, sim, real, float_out = outputs(params)
  assert q.is_quantized(qparams['mlp']['gating_einsum'])
  helpers.assert_trees_close(real, sim, rtol=1e-5, atol=1e-6)
  assert rel_err(sim, float_out) < 0.01


@pytest.mark.parametrize('targets,exclude,quantized', [
    ('up|merge', None, {'up/kernel', 'merge/kernel'}),
    (nn.Einsum, None, {'merge/kernel'}),
    (lambda m: m.name == 'heads', None, {'heads/kernel'}),
    (None, (nn.Dense, 'proj'), {'heads/kernel', 'merge/kernel'}),
])
def test_targets_and_exclude_select_layers(targets, exclude, quantized):
  surgery = peft.simulate_quantization('int4', targets=targets,
                                        exclude=exclude)
  with surgery as kernels:
    jax.eval_shape(lambda: Net().init(jax.random.key(0), X))
  assert set(kernels) == quantized


def test_surgery_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"(?s)target 'atn' matched no "
                     r'layer.*up \(Dense\)'):
    with peft.quantized(targets='atn'):
      jax.eval_shape(lambda: Net().init(jax.random.key(0), X))
  with pytest.raises(TypeError, match='names Conv, which is not an '
                     'einsum-like layer'):
    peft.quantized(targets=nn.Conv)
  with pytest.raises(ValueError, match="method 'int3' at "
                     "'QuantizationSurgery'. Pass one of"):
    peft.simulate_quantization('int3')


def test_int_layer_errors():
  layer = nn.Dense(64)
  params = filled(shapes_of(OneDense(), X))['dense']
  with pytest.raises(TypeError, match=r"expects a QuantizedArray at "
                     r"'dense/kernel'; got float32\[32, 64\]\. Quantize"):
    run(peft.quantized(), OneDense(), {'dense': params})
  qparams = {'dense': qtree.quantize(params, method='int8')}
  with pytest.raises(ValueError, match="expects INT4 but 'dense/kernel' was "
                     "quantized with INT8. Pass method='INT8'"):
    run(peft.quantized('int4'), OneDense(), qparams)
  with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(32, 64\)"
                     r' but the layer needs \(16, 64\)'):
    run(peft.quantized(), OneDense(), qparams, X[:, :16])
  with pytest.raises(ValueError, match="No param 'kernel' at 'dense'"):
    run(peft.quantized(), OneDense(), {'dense': {'bias': params['bias']}})
  with pytest.raises(TypeError, match="found a QuantizedArray at "
                     "'dense/kernel'; simulated quantization trains a float"):
    run(peft.simulate_quantization('int8'), OneDense(), qparams)
  with pytest.raises(ValueError, match=r'IntDense dtype must be jnp.int4 or '
                     r'jnp.int8; got .*float32'):
    ql.IntDense(wrapped=layer, dtype=jnp.float32)
  with pytest.raises(TypeError, match='IntDense.wrapped must be a Dense; got '
                     'Einsum. Use the \\*EinsumLike wrapper'):
    ql.IntDense(wrapped=nn.Einsum((2, 2), 'ab,bc->ac'))


@pytest.mark.parametrize('name', LAYERS)
@pytest.mark.parametrize('wrapper', [ql.SimulateQuantizedEinsumLike,
                                     ql.IntEinsumLike])
def test_a_wrapper_is_described_as_its_wrapped_layer(name, wrapper):
  make, eq, _ = LAYERS[name]
  layer, x = make(), fixtures.features()
  quantized = wrapper(wrapped=layer, method='int8')
  args = ('btd,de->bte', x) if isinstance(layer, fixtures.MyEinsum) else (x,)
  kind = _registry.einsum_kind_of(quantized)
  inner = _registry.einsum_kind_of(layer)
  wrapper_kind = ql._WrapperKind  # pylint: disable=protected-access
  assert isinstance(kind, wrapper_kind) and kind is not inner
  assert kind.weight_name_of(quantized) == inner.weight_name_of(layer)
  call, want = (kind.describe(quantized, args, {}),
                inner.describe(layer, args, {}))
  assert call.equation.einsum_str == want.equation.einsum_str == eq
  assert call.inputs is x
  assert (call.weight_name, call.weight_shape, call.adapter_name) == (
      want.weight_name, want.weight_shape, want.adapter_name)


def test_a_custom_layer_s_configurable_name_passes_through_its_wrapper():
  layer = fixtures.MyEinsum((8, 64), weight_name='gate')
  quantized = ql.SimulateQuantizedEinsumLike(wrapped=layer, method='int8')
  kind = _registry.einsum_kind_of(quantized)
  call = kind.describe(quantized, ('btd,de->bte', fixtures.features()), {})
  assert kind.weight_name_of(quantized) == call.weight_name == 'gate'
  assert call.adapter_name == 'lora_gate'


def test_a_wrapper_of_an_unregistered_layer_cannot_be_described():
  class Odd(nn.Module):
    def __call__(self, x):
      return x

  quantized = ql.SimulateQuantizedEinsumLike(wrapped=Odd(), method='int8')
  kind = _registry.einsum_kind_of(quantized)
  match = "Odd at 'Odd' is not a registered einsum-like layer. Call peft"
  with pytest.raises(TypeError, match=match):
    kind.weight_name_of(quantized)
  with pytest.raises(TypeError, match=match):
    kind.describe(quantized, (X,), {})
  with pytest.raises(TypeError, match='SimulateQuantizedEinsumLike cannot '
                     "quantize Odd at 'Odd': it is not a registered"):
    quantized.init(jax.random.key(0), X)


def test_the_quantized_base_is_abstract():
  with pytest.raises(TypeError, match='abstract class QuantizedEinsumLike'):
    ql.QuantizedEinsumLike(wrapped=nn.Dense(2))

  class MethodOnly(ql.QuantizedEinsumLike):
    @nn.nowrap
    def _method(self):
      return None

  with pytest.raises(TypeError, match='abstract class MethodOnly'):
    MethodOnly(wrapped=nn.Dense(2))


def test_gemma_style_int_dense_dtype_picks_the_method():
  layer = nn.Dense(64)
  for dtype, method, values_dtype in ((jnp.int8, M.INT8, jnp.int8),
                                      (None, M.INT4, jnp.uint8)):
    params = shapes_of(ql.IntDense(wrapped=layer, dtype=dtype), X)
    assert params['kernel'].method is method
    assert params['kernel'].values.dtype == values_dtype


def test_quantize_selects_by_regex_predicate_key_axes_and_shape():
  params = {'emb': {'embedding': jnp.ones((64, 8))},
            'blk': {'w': jnp.ones((8, 64)), 'b': jnp.ones(64),
                    'step': jnp.array(3)}}
  quantized = lambda tree: {
      '/'.join(str(k.key) for k in path)
      for path, x in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=q.is_quantized) if q.is_quantized(x)}
  assert quantized(qtree.quantize(params, method='int8')) == {
      'emb/embedding', 'blk/w'}
  assert quantized(qtree.quantize(params, method='int8',
                                  targets='blk/.*')) == {'blk/w', 'blk/b'}
  assert quantized(qtree.quantize(params, method='int8',
                                  checkpoint_kernel_key='w')) == {'blk/w'}
  assert quantized(qtree.quantize(
      params, method='int8',
      targets=lambda p, x: x.ndim == 2 and x.shape[0] == 64)) == {
          'emb/embedding'}
  assert quantized(qtree.quantize(params, method='int8', axes={
      'blk/w': (0,)})) == {'blk/w'}
  assert quantized(qtree.quantize(params, method='int8',
                                  min_size=1000)) == set()
  assert qtree.quantize(params, method='none') is params


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(targets='nothing'), ValueError,
     r"targets='nothing'.*float leaves of params, which are \['blk/w'\]"),
    (dict(axes={'blk/v': (0,)}), ValueError, r"axes keys \['blk/v'\]"),
    (dict(targets='('), ValueError, r"targets '\(' is not a valid regex"),
    (dict(targets=3), TypeError, 'targets must be a path regex or a '
     'predicate'),
    (dict(axes=(0,)), TypeError, r'axes must be a map \{path: axes\}'),
    (dict(method='int9'), ValueError, "method 'int9' at 'quantize'"),
])
def test_quantize_errors(kwargs, error, match):
  kwargs = {'method': 'int8', **kwargs}
  with pytest.raises(error, match=match):
    qtree.quantize({'blk': {'w': jnp.ones((8, 64))}}, **kwargs)


@pytest.mark.parametrize('method,ratio', [('int8', 4), ('int4', 8),
                                          ('nf4', 8)])
def test_quantized_base_bytes(method, ratio):
  params = net_params()
  qparams = qtree.quantize(params, method=method, axes=NET_AXES)
  for path, axes in NET_AXES.items():
    layer, name = path.split('/')
    kernel, qkernel = params[layer][name], qparams[layer][name]
    # One float32 scale per output channel, times (NF4) the blocks of 64
    # along the contracted axes: up's 32 inputs make one short block.
    n_scales = int(np.prod([d for i, d in enumerate(kernel.shape)
                            if i not in axes]))
    if method == 'nf4':
      n_scales *= -(-int(np.prod([kernel.shape[i] for i in axes])) // 64)
    assert qkernel.nbytes == kernel.nbytes // ratio + 4 * n_scales
  bias_bytes = sum(params[k]['bias'].nbytes for k in ('up', 'heads',
                                                      'merge'))
  assert qtree.param_bytes(qparams) == bias_bytes + sum(
      qparams[p.split('/')[0]][p.split('/')[1]].nbytes for p in NET_AXES)


@pytest.mark.parametrize('method', ['nf4', 'q4_0', 'q4_0_transpose'])
def test_block_methods_serve_a_dense_of_any_width(method):
  """40 inputs and 24 outputs: short blocks along either axis."""
  layer, x = nn.Dense(24), X[:, :8].repeat(5, axis=1)  # (4, 40)
  params = filled(shapes_of(layer, x))
  qparams = qtree.quantize(params, method=method)
  kernel = qparams['kernel']
  assert kernel.dequantize().shape == (40, 24)
  if method == 'nf4':  # Blocks run along the 40 inputs, as in QLoRA.
    assert kernel.axes == (0,) and kernel.scales.shape == (24, 1)
  qlayer = qlora.QLoRADense(rank=2, wrapped=layer, quant_method=method)
  lora_shapes = shapes_of(qlayer, x)['lora']
  lora = filled({'lora': lora_shapes}, seed=3, adapter_scale=0.3)

  @jax.jit
  def outputs(params, qparams, lora):
    with peft.quantized(method):
      served = Narrow().apply({'params': {'dense': qparams}}, x)
    return (served,
            ql.IntDense(wrapped=layer).apply({'params': qparams}, x),
            ql.SimulateQuantizedDense(wrapped=layer, method=method).apply(
                {'params': params}, x),
            qlayer.apply({'params': {**qparams, **lora}}, x))

  served, real, sim, adapted = outputs(params, qparams, lora)
  want = x @ kernel.dequantize() + params['bias'][None]
  for out in (served, real, sim):
    helpers.assert_trees_close(out, want, rtol=1e-5, atol=1e-6)
  update = x @ lora['lora']['a'] @ lora['lora']['b']
  helpers.assert_trees_close(adapted, want + update, rtol=1e-5, atol=1e-5)


class Narrow(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(24, name='dense')(x)


@pytest.mark.parametrize('method', REAL)
def test_quantize_names_the_path_of_bad_weights(method):
  params = {'blk': {'w': jnp.ones((8, 64)).at[2, 7].set(jnp.nan)},
            'ok': {'w': jnp.ones((8, 64))}}
  with pytest.raises(ValueError, match=(
      rf"{method.name} cannot quantize the array of shape \(8, 64\) at "
      r"'blk/w': it holds 1 NaN and 0 Inf \(the first at index \(2, 7\)\)")):
    qtree.quantize(params, method=method)


class Mlp(nn.Module):
  """The QLoRA model: two Dense layers whose kernels every method blocks."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, name='down')(jax.nn.gelu(nn.Dense(64, name='up')(x)))


def _qlora_setup(method):
  """QLoRA on Mlp: the quantized base and float adapters at init."""
  model = Mlp()
  shapes, report = shapes_and_report(model, X, outer=peft.quantized(method))
  assert all(q.is_quantized(shapes[k]['kernel']) for k in ('up', 'down'))
  _, lora = _params.split_params(filled(shapes, seed=2))
  base = qtree.quantize(filled(shapes_of(model, X)), method=method)
  return model, base, lora, report


def _qlora_apply(model, method, rank=4):
  @jax.jit
  def apply(base, lora, x):
    with peft.quantized(method), peft.lora(rank=rank):
      return model.apply({'params': _params.merge_params(base, lora)}, x)
  return apply


def test_qlora_starts_at_the_quantized_base_and_adds_x_a_b():
  model, base, lora, report = _qlora_setup('nf4')
  assert [s.key for s in report.specs] == ['up/lora', 'down/lora']
  assert jax.tree.map(lambda a: a.dtype, lora) == {
      k: {'lora': {'a': jnp.float32, 'b': jnp.float32}} for k in ('up',
                                                              'down')}
  apply = _qlora_apply(model, 'nf4')
  helpers.assert_trees_close(apply(base, lora, X),
                             run(peft.quantized('nf4'), model, base))
  # Non-zero adapters: each layer is base(x) + x @ A @ B, checked by hand.
  lora = filled(lora, seed=3, adapter_scale=0.3)
  h = X
  for name in ('up', 'down'):
    if name == 'down':
      h = jax.nn.gelu(h)
    p, ab = base[name], lora[name]['lora']
    h = (h @ p['kernel'].dequantize() + p['bias'][None]
         + h @ ab['a'] @ ab['b'])
  helpers.assert_trees_close(apply(base, lora, X), h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', ['int8', 'int4', 'nf4'])
def test_qlora_fine_tunes_only_the_adapters(method):
  model, base, lora, _ = _qlora_setup(method)
  apply = _qlora_apply(model, method)
  target = jnp.sin(X[:, :1] * jnp.arange(64.0)[None] / 8)  # (4, 64)
  tx = optax.adam(3e-2)

  @jax.jit
  def train(lora):
    def step(carry, _):
      lora, state = carry
      loss, grads = jax.value_and_grad(
          lambda lo: jnp.mean((apply(base, lo, X) - target) ** 2))(lora)
      updates, state = tx.update(grads, state, lora)
      return (optax.apply_updates(lora, updates), state), loss
    return jax.lax.scan(step, (lora, tx.init(lora)), length=40)[1]

  losses = train(lora)
  assert losses[-1] < 0.3 * losses[0], losses
  # Gradients are taken for the adapters only: the base stays quantized.
  assert all(q.is_quantized(base[k]['kernel']) for k in ('up', 'down'))


def test_qat_plus_lora_quantizes_only_the_base():
  dense = OneDense()
  with peft.simulate_quantization('int4'), peft.lora(rank=2) as report:
    init = jax.eval_shape(dense.init, jax.random.key(0), X)['params']
  assert [s.key for s in report.specs] == ['dense/lora']
  params = filled(init, adapter_scale=0.3)

  @jax.jit
  def apply(params):
    with peft.simulate_quantization('int4'), peft.lora(rank=2):
      return dense.apply({'params': params}, X)

  p = params['dense']
  want = (X @ q.simulate_quantize(p['kernel'], 'int4') + p['bias'][None]
          + X @ p['lora']['a'] @ p['lora']['b'])
  helpers.assert_trees_close(apply(params), want, rtol=1e-5, atol=1e-5)
  # The QAT base fuses with the plain fuse_params (kernels are float).
  fused = _fuse.fuse_params(params, report.specs)
  helpers.assert_trees_close(
      run(peft.simulate_quantization('int4'), dense, fused),
      X @ q.simulate_quantize(p['kernel'] + p['lora']['a'] @ p['lora']['b'],
                              'int4') + p['bias'][None], rtol=1e-5,
      atol=1e-5)


@pytest.mark.parametrize('method,bound', [('int8', 0.01), ('nf4', 0.12)])
def test_fuse_into_quantized_base(method, bound):
  model, base, lora, report = _qlora_setup(method)
  lora = filled(lora, seed=3, adapter_scale=0.05)
  adapted = _qlora_apply(model, method)(base, lora, X)
  fused, errors = qfuse.fuse_into_quantized(
      _params.merge_params(base, lora), report.specs)
  assert set(errors) == {'up/lora', 'down/lora'}
  assert _params.split_params(fused).lora == {}
  kernel = fused['down']['kernel']
  assert kernel.method is M(method)
  a, b = lora['down']['lora']['a'], lora['down']['lora']['b']
  exact = base['down']['kernel'].dequantize() + a @ b
  helpers.assert_trees_close(
      errors['down/lora'],
      jnp.linalg.norm(kernel.dequantize() - exact) / jnp.linalg.norm(exact),
      rtol=1e-5)
  assert max(float(e) for e in errors.values()) < bound
  served = run(peft.quantized(method), model, fused)
  assert rel_err(served, adapted) < 3 * bound


def test_fuse_quantized_kernel_and_its_errors():
  w = q.quantize_array(jnp.asarray(np.random.default_rng(0).normal(
      size=(8, 2, 4)), jnp.float32), 'int8', (0,))
  a, b = jnp.ones((8, 1)), jnp.full((1, 2, 4), 0.5)
  new, err = qfuse.fuse_quantized_kernel(w, a, b, einsum_str='btd,dnh->btnh',
                                         scale=2.0)
  exact = w.dequantize() + 2.0 * jnp.einsum('dr,rnh->dnh', a, b)
  helpers.assert_trees_close(new.dequantize(),
                             q.simulate_quantize(exact, 'int8', (0,)))
  assert new.axes == (0,) and float(err) < 0.01
  with pytest.raises(ValueError, match=r'A \(8, 1\) and B \(1, 4\) do not '
                     r"fit einsum_str 'btd,dnh->btnh'.*\(1, 2, 4\)"):
    qfuse.fuse_quantized_kernel(w, a, jnp.ones((1, 4)),
                                einsum_str='btd,dnh->btnh')
  with pytest.raises(TypeError, match='adapters must hold AdapterSpec'):
    qfuse.fuse_into_quantized({}, ['dense/lora'])


def test_fuse_keeps_the_block_axes_and_rejects_diverged_adapters():
  rng = np.random.default_rng(0)
  # DenseGeneral-like (in, heads, head_dim): NF4 blocks the 40 inputs only,
  # not the default (0, 1), and the fused kernel must block alike.
  w = q.quantize_array(jnp.asarray(rng.normal(size=(40, 2, 4)), jnp.float32),
                       'nf4', (0,))
  a, b = jnp.ones((40, 1)), jnp.full((1, 2, 4), 0.1)
  new, err = qfuse.fuse_quantized_kernel(w, a, b, einsum_str='btd,dnh->btnh')
  assert new.axes == (0,) and new.scales.shape == w.scales.shape == (2, 4,
                                                                     1)
  exact = w.dequantize() + jnp.einsum('dr,rnh->dnh', a, b)
  helpers.assert_trees_close(new.dequantize(),
                             q.simulate_quantize(exact, 'nf4', (0,)))
  assert float(err) < 0.12
  with pytest.raises(ValueError, match=(
      r"NF4 cannot quantize the array of shape \(40, 2, 4\) at "
      r"'fuse_quantized_kernel': it holds 8 NaN and 0 Inf")):
    qfuse.fuse_quantized_kernel(w, a.at[3, 0].set(jnp.nan), b,
                                einsum_str='btd,dnh->btnh')


def test_gemma_style_qlora_layers():
  layer = nn.Dense(64)
  qlayer = qlora.QLoRADense(rank=2, wrapped=layer, quant_method='int8')
  params = filled(shapes_of(qlayer, X), adapter_scale=0.3)
  base, lora = _params.split_params(params)
  sim = ql.SimulateQuantizedDense(wrapped=layer, method='int8')
  update = X @ lora['lora']['a'] @ lora['lora']['b']
  helpers.assert_trees_close(qlayer.apply({'params': params}, X),
                             sim.apply({'params': base}, X) + update,
                             rtol=1e-5, atol=1e-6)
  qbase = qtree.quantize(base, method='int8')
  helpers.assert_trees_close(
      qlayer.apply({'params': {**qbase, **lora}}, X),
      ql.IntDense(wrapped=layer).apply({'params': qbase}, X) + update,
      rtol=1e-5, atol=1e-6)
  einsum = nn.Einsum((32, 2, 32), 'btd,dnh->btnh')
  x = jnp.ones((1, 3, 32))
  params = shapes_of(qlora.QLoRAEinsum(rank=2, wrapped=einsum), x)
  assert jax.tree.map(jnp.shape, params['lora']) == {'a': (32, 2),
                                                     'b': (2, 2, 32)}
  with pytest.raises(TypeError, match='QLoRAEinsum.wrapped must be a Einsum'):
    qlora.QLoRAEinsum(rank=2, wrapped=layer)


def test_lora_and_quantization_compose_in_either_order():
  """Either nesting gives LoRA over the quantized base, custom layers too."""
  net = Net(custom=True)
  orders = {
      'quant_outside': lambda: (peft.simulate_quantization('int8'),
                                peft.lora(rank=2)),
      'lora_outside': lambda: (peft.lora(rank=2),
                               peft.simulate_quantization('int8')),
  }
  outputs, shapes = {}, {}
  for name, contexts in orders.items():
    outer, inner = contexts()
    with outer, inner:
      init = jax.eval_shape(net.init, jax.random.key(0), X)['params']
    shapes[name] = jax.tree.map(lambda s: s.shape, init)
    params = filled(init, adapter_scale=0.3)
    outer, inner = contexts()
    with outer, inner:
      outputs[name] = jax.jit(net.apply)({'params': params}, X)
  assert shapes['quant_outside'] == shapes['lora_outside']
  assert 'lora_w' in shapes['lora_outside']['proj']
  helpers.assert_trees_close(outputs['quant_outside'],
                             outputs['lora_outside'], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('simulate', [True, False])
def test_qlora_on_custom_layers_sharing_one_scope(simulate):
  """Two wrapped custom einsums in one scope keep distinct names."""
  surgery = (peft.simulate_quantization('int8') if simulate
             else peft.quantized())
  with surgery, peft.lora(rank=2, targets='.*mlp') as report:
    shapes = jax.eval_shape(fixtures.CustomModel().init, jax.random.key(0),
                            fixtures.features())['params']
  assert sorted(shapes['mlp']) == ['gating_einsum', 'linear',
                                   'lora_gating_einsum', 'lora_linear']
  assert sorted(s.key for s in report.specs) == [
      'mlp/lora_gating_einsum', 'mlp/lora_linear']


def test_gemma_qlora_adapter_names_are_aliases_of_the_lora_adapters():
  # Documented in docs/api/peft.md: one class each, two names.
  assert peft.QLoRADenseAdapter is peft.LoRADenseAdapter
  assert peft.QLoRAEinsumAdapter is peft.LoRAEinsumAdapter
