"""LoRA on a device mesh: adapters sharded like their kernels, same numbers.

Runs on 8 fake CPU devices (`tests/conftest.py` sets XLA_FLAGS). The base
is sharded two ways:

* 'fsdp': fully sharded data parallel on a 1-D mesh `('data',)`: every
  kernel's 'embed' axis and the batch are split over all 8 devices; the
  kernels are declared with `nn.with_partitioning` (mesh axis names).
* 'tp': tensor parallel on a `('data', 'model')` 2x4 mesh: the 'heads' and
  'mlp' axes over 'model', the batch over 'data'; the kernels are declared
  with `nn.with_logical_partitioning` and mapped by logical axis rules.
"""

import dataclasses

from flax import linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import peft
from tests import fixtures
from tests.helpers import assert_trees_close

VOCAB, EMBED, HEADS, HEAD_DIM, MLP, RANK = 16, 16, 4, 4, 32, 2
BATCH, LENGTH = 8, 6
INIT = nn.initializers.lecun_normal()


@dataclasses.dataclass(frozen=True)
class Case:
  """One way of sharding the base.

  Attributes:
    name: the test id.
    mesh_shape: the mesh's shape.
    mesh_axes: the mesh's axis names.
    rules: logical axis -> mesh axis (unlisted logical axes replicate).
    logical: declare kernels with `nn.with_logical_partitioning` (True) or
      with `nn.with_partitioning` on the mesh names the rules give (False).
  """

  name: str
  mesh_shape: tuple[int, ...]
  mesh_axes: tuple[str, ...]
  rules: tuple[tuple[str, str], ...]
  logical: bool

  def mesh(self) -> Mesh:
    count = int(np.prod(self.mesh_shape))
    devices = np.asarray(jax.devices()[:count]).reshape(self.mesh_shape)
    return Mesh(devices, self.mesh_axes)

  def mesh_spec(self, logical_names) -> P:
    """The PartitionSpec the rules give to an axis-name tuple."""
    rules = dict(self.rules)
    return P(*(rules.get(n) for n in logical_names))

  def partitioned(self, names):
    """`INIT` declared with this case's partitioning style."""
    if self.logical:
      return nn.with_logical_partitioning(INIT, names)
    return nn.with_partitioning(INIT, tuple(self.mesh_spec(names)))


CASES = [
    Case(name='fsdp', mesh_shape=(8,), mesh_axes=('data',),
         rules=(('batch', 'data'), ('embed', 'data')), logical=False),
    Case(name='tp', mesh_shape=(2, 4), mesh_axes=('data', 'model'),
         rules=(('batch', 'data'), ('heads', 'model'), ('mlp', 'model')),
         logical=True),
]

# The kernels' logical axes, and the axes their adapters must inherit:
# A takes the axes the layer contracts with its input, B the output side,
# and the rank axis (None here) is replicated.
KERNEL_AXES = {
    'embed': (('vocab', 'embed'),
              ('vocab', None), (None, 'embed'), 'embedding'),
    'q': (('embed', 'heads', 'kv'),
          ('embed', None), (None, 'heads', 'kv'), 'kernel'),
    'o': (('heads', 'kv', 'embed'),
          ('heads', 'kv', None), (None, 'embed'), 'kernel'),
    'up': (('embed', 'mlp'), ('embed', None), (None, 'mlp'), 'kernel'),
    'down': (('mlp', 'embed'), ('mlp', None), (None, 'embed'), 'kernel'),
}


class ShardedLM(nn.Module):
  """Embed, an attention-like pair of einsums, a two-layer MLP, tied output."""

  case: Case

  @nn.compact
  def __call__(self, tokens):
    part = self.case.partitioned
    axes = {k: v[0] for k, v in KERNEL_AXES.items()}
    embed = nn.Embed(VOCAB, EMBED, embedding_init=part(axes['embed']),
                     name='embed')
    x = embed(tokens)
    q = nn.Einsum((EMBED, HEADS, HEAD_DIM), 'BTD,DNH->BTNH', use_bias=False,
                  kernel_init=part(axes['q']), name='q')(x)
    x = x + nn.Einsum((HEADS, HEAD_DIM, EMBED), 'BTNH,NHD->BTD',
                      use_bias=False, kernel_init=part(axes['o']),
                      name='o')(jnp.tanh(q))
    h = nn.Dense(MLP, use_bias=False, kernel_init=part(axes['up']),
                 name='up')(x)
    x = x + nn.Dense(EMBED, use_bias=False, kernel_init=part(axes['down']),
                     name='down')(jax.nn.gelu(h))
    return embed.attend(x)


def _surgery():
  return peft.lora(rank=RANK, targets=(nn.Embed, '.*'))


def _tokens():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, VOCAB, (BATCH, LENGTH)), jnp.int32)


def _shardings(case: Case, mesh: Mesh, boxed):
  """NamedShardings of a boxed param tree, as flax users derive them."""
  specs = nn.get_partition_spec(boxed)
  if case.logical:
    return nn.logical_to_mesh_sharding(specs, mesh, case.rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def _padded(spec: P, ndim: int) -> tuple:
  return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.fixture(scope='module', params=CASES, ids=lambda c: c.name)
def setup(request):
  if jax.device_count() < 8:
    pytest.skip(f'needs 8 devices, got {jax.device_count()}; run with '
                'XLA_FLAGS=--xla_force_host_platform_device_count=8')
  case = request.param
  mesh = case.mesh()
  model = ShardedLM(case)
  tokens = _tokens()
  with _surgery() as report:
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  shardings = _shardings(case, mesh, boxed)
  return dict(case=case, mesh=mesh, model=model, tokens=tokens,
              shardings=shardings, specs=report.specs,
              batch_sharding=NamedSharding(mesh, case.mesh_spec(('batch',))))


def test_adapters_are_sharded_like_their_kernels(setup):
  case, model = setup['case'], setup['model']

  def init(key, tokens):
    with _surgery():
      return nn.unbox(model.init(key, tokens)['params'])

  params = jax.jit(init, out_shardings=setup['shardings'])(
      jax.random.key(0), setup['tokens'])
  got, want = {}, {}
  for layer, (kernel, a, b, weight) in KERNEL_AXES.items():
    for name, axes, value in ((weight, kernel, params[layer][weight]),
                              ('a', a, params[layer]['lora']['a']),
                              ('b', b, params[layer]['lora']['b'])):
      assert value.sharding.mesh.shape == setup['mesh'].shape
      got[layer, name] = _padded(value.sharding.spec, value.ndim)
      want[layer, name] = _padded(case.mesh_spec(axes), value.ndim)
  assert got == want
  # Each device holds only its shard: A of 'up' splits 'embed' over the 8
  # devices under fsdp, B splits 'mlp' over the 4 'model' devices under tp.
  a, b = params['up']['lora']['a'], params['up']['lora']['b']
  if case.name == 'fsdp':
    assert a.addressable_shards[0].data.shape == (EMBED // 8, RANK)
  else:
    assert b.addressable_shards[0].data.shape == (RANK, MLP // 4)


TX = peft.train_only_adapters(optax.adam(1e-2))


def _train_step(model):
  def step(params, opt_state, tokens):
    def loss_fn(params):
      with _surgery():
        logits = model.apply({'params': params}, tokens)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits[:, :-1], tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


@pytest.fixture(scope='module')
def one_device():
  """Random params (B non-zero), and one step and one fuse on one device.

  The partitioning metadata changes no number, so both cases share this.
  """
  model, tokens = ShardedLM(CASES[0]), _tokens()

  def init(key, tokens):
    with _surgery():
      return nn.unbox(model.init(key, tokens))

  values = fixtures.random_params(init, jax.random.key(0), tokens, seed=4,
                                  scale=0.5)
  values = jax.tree.map(np.asarray, values)
  with _surgery() as report:
    jax.eval_shape(model.init, jax.random.key(0), tokens)
  params = jax.tree.map(jnp.asarray, values)
  opt_state = jax.jit(TX.init)(params)
  new_params, _, loss = jax.jit(_train_step(model))(params, opt_state,
                                                    tokens)
  fused = jax.jit(lambda p: peft.fuse_params(p, report.specs))(params)
  return dict(values=values, opt_state=opt_state, params=new_params,
              loss=loss, fused=fused)


def test_lora_step_on_mesh_matches_one_device(setup, one_device):
  values, shardings = one_device['values'], setup['shardings']
  params = jax.device_put(values, shardings)
  replicated = NamedSharding(setup['mesh'], P())
  opt_state = jax.device_put(one_device['opt_state'], replicated)
  tokens = jax.device_put(setup['tokens'], setup['batch_sharding'])
  step = jax.jit(_train_step(setup['model']),
                 out_shardings=(shardings, None, None))
  new_params, _, loss = step(params, opt_state, tokens)

  np.testing.assert_allclose(loss, one_device['loss'], rtol=1e-5)
  base, adapters = peft.split_params(new_params)
  one_base, one_adapters = peft.split_params(one_device['params'])
  assert_trees_close(adapters, one_adapters, rtol=1e-5, atol=1e-6)
  # The frozen base is untouched, bit for bit, and still sharded.
  original, initial = peft.split_params(values)
  assert_trees_close(base, original)
  assert_trees_close(one_base, original)
  up = new_params['up']
  assert up['kernel'].sharding.is_equivalent_to(
      params['up']['kernel'].sharding, 2)
  # The adapters really moved (the comparison above is not vacuous).
  moved = jax.tree.map(lambda new, old: np.abs(new - old).max(), adapters,
                       initial)
  assert min(jax.tree.leaves(moved)) > 1e-3


def test_fuse_params_keeps_kernel_sharding(setup, one_device):
  shardings = setup['shardings']
  params = jax.device_put(one_device['values'], shardings)
  fuse = lambda p: peft.fuse_params(p, setup['specs'])
  fused = jax.jit(fuse, in_shardings=(shardings,))(params)
  for layer, (_, _, _, weight) in KERNEL_AXES.items():
    kernel = params[layer][weight]
    assert fused[layer][weight].sharding.is_equivalent_to(
        kernel.sharding, kernel.ndim), (
            layer, fused[layer][weight].sharding, kernel.sharding)
  assert_trees_close(fused, one_device['fused'], rtol=1e-6, atol=1e-6)


def _qlora_step(model, method):
  tx = optax.adam(1e-2)

  def step(adapters, opt_state, base, tokens):
    def loss_fn(adapters):
      with peft.quantized(method), _surgery():
        logits = model.apply(
            {'params': peft.merge_params(base, adapters)}, tokens)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits[:, :-1], tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss
  return tx, step


@pytest.mark.parametrize('method', ['int8', 'int4', 'nf4'])
def test_qlora_step_on_mesh_matches_one_device(setup, one_device, method):
  float_base, adapters = peft.split_params(one_device['values'])
  # The kernels; `peft.quantized()` keeps nn.Embed float.
  base = peft.quantize(float_base, method=method, targets=r'.*/kernel')
  tx, step = _qlora_step(setup['model'], method)
  opt_state = tx.init(adapters)
  want = jax.jit(step)(adapters, opt_state, base, setup['tokens'])

  base_shardings, adapter_shardings = peft.split_params(setup['shardings'])
  placed = jax.device_put(
      base, peft.quantized_shardings(base_shardings, base))
  got = jax.jit(step)(jax.device_put(adapters, adapter_shardings),
                      opt_state, placed,
                      jax.device_put(setup['tokens'], setup['batch_sharding']))
  np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
  assert_trees_close(got[0], want[0], rtol=1e-5, atol=1e-6)
  # The adapters moved, so the comparison is not vacuous.
  assert np.abs(want[0]['up']['lora']['b'] - adapters['up']['lora']['b']
                ).max() > 1e-3
  # Each device holds a slice of the codes, as of the float kernel: 'up'
  # (embed, mlp) splits embed over 8 devices (fsdp) or mlp over 4 (tp).
  up = placed['up']['kernel']
  assert isinstance(up, peft.QuantizedArray)
  packed = 2 if method in ('int4', 'nf4') else 1
  shard = up.values.addressable_shards[0].data.shape
  # Its scales split along mlp where the kernel does: per-channel (1, mlp),
  # NF4's (mlp, blocks).
  mlp_shard = MLP if setup['case'].name == 'fsdp' else MLP // 4
  scales = (mlp_shard, 1) if method == 'nf4' else (1, mlp_shard)
  if setup['case'].name == 'fsdp':
    assert shard == (EMBED // 8, MLP // packed)
  else:
    assert shard == (EMBED, MLP // 4 // packed)
  assert up.scales.addressable_shards[0].data.shape == scales


def test_quantized_shardings_keep_whole_what_the_mesh_does_not_divide():
  mesh = Mesh(np.asarray(jax.devices()[:2]), ('model',))
  split = NamedSharding(mesh, P(None, 'model'))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {'odd': {'kernel': jnp.ones((4, 6))},  # int4 codes (4, 3)
            'alone': {'kernel': jnp.ones((4, 8))}, 'bias': jnp.ones(6)}
  quantized = peft.quantize(params, method='int4', targets=r'.*/kernel')
  got = peft.quantized_shardings(
      {'odd': {'kernel': split}, 'alone': {'kernel': one},
       'bias': NamedSharding(mesh, P('model'))},
      quantized)
  odd = got['odd']['kernel']
  # 3 packed columns do not split in 2: the codes stay whole; the 6 scales
  # split as the float kernel's columns.
  assert tuple(odd.values.spec) == (None, None)
  assert tuple(odd.scales.spec) == (None, 'model')
  assert got['alone']['kernel'].values is one
  assert got['alone']['kernel'].scales is one
  assert tuple(got['bias'].spec) == ('model',)  # Not quantized: as given.
  placed = jax.device_put(quantized, got)
  assert_trees_close(peft.dequantize(placed), peft.dequantize(quantized))


def test_quantized_shardings_name_where_the_trees_differ():
  mesh = Mesh(np.asarray(jax.devices()[:2]), ('model',))
  quantized = peft.quantize({'up': {'kernel': jnp.ones((8, 4))},
                             'down': {'kernel': jnp.ones((4, 8))}},
                            method='int8')
  with pytest.raises(ValueError, match=(
      r"(?s)quantized_shardings: `shardings` is not a tree like `params`.*"
      r"down.*Pass the float params' shardings, one per leaf")):
    peft.quantized_shardings({'up': {'kernel': NamedSharding(mesh, P())}},
                             quantized)
