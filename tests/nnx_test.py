"""peft.nnx: LoRA layers, surgery, fuse/unfuse and adapter files for nnx.

Values are checked against the unmodified nnx layers and against deltas
computed here with numpy. Weights come from numpy (no jax.random compiles).
"""

import dataclasses
import os

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft
import peft.nnx as pnnx
from tests.helpers import assert_trees_close

D, VOCAB, RANK = 4, 7, 2


def np_init(seed=0, scale=0.5):
  """An nnx initializer drawing from numpy (seeded by `seed` and shape)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    rng = np.random.default_rng([seed, *shape])
    return jnp.asarray(rng.normal(scale=scale, size=shape).astype(dtype))
  return init


def data(*shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


W = dict(kernel_init=np_init(1), bias_init=np_init(2))


class Holder(nnx.Module):
  """Holds one layer under 'layer' (the root is never replaced)."""

  def __init__(self, layer, call):
    self.layer = layer
    self.call = call

  def __call__(self, x):
    return self.call(self.layer, x)


def _apply(m, x):
  return m(x)


def _attend(m, x):
  return m.attend(x)


# name: (make layer, input, call, hand-written delta equation a,b->kernel)
CASES = {
    'linear': (lambda **kw: nnx.Linear(D, 3, **W, **kw, rngs=nnx.Rngs(0)),
               lambda: data(2, D), _apply, 'ir,ro->io'),
    'linear_general': (
        lambda **kw: nnx.LinearGeneral((2, D), (3, 2), axis=(1, -1), **W,
                                       **kw, rngs=nnx.Rngs(0)),
        lambda: data(5, 2, D), _apply, 'xir,rab->xiab'),
    'einsum': (
        lambda **kw: nnx.Einsum('btd,ndh->btnh', (2, D, 3), (2, 3), **W,
                                **kw, rngs=nnx.Rngs(0)),
        lambda: data(1, 5, D), _apply, 'dr,rnh->ndh'),
    'conv': (
        lambda **kw: nnx.Conv(D, 3, (3,), padding='CIRCULAR', strides=2,
                              **W, **kw, rngs=nnx.Rngs(0)),
        lambda: data(2, 6, D), _apply, 'kir,ro->kio'),
    'embed': (
        lambda **kw: nnx.Embed(VOCAB, D, embedding_init=np_init(1), **kw,
                               rngs=nnx.Rngs(0)),
        lambda: np.array([[0, 3, 6], [2, 2, 5]]), _apply, 'vr,rf->vf'),
    'embed_attend': (
        lambda **kw: nnx.Embed(VOCAB, D, embedding_init=np_init(1), **kw,
                               rngs=nnx.Rngs(0)),
        lambda: data(2, D), _attend, 'vr,rf->vf'),
}


def _adapted(name, **options):
  """(holder with LoRA, x, the plain layer it was made from, report)."""
  make, x, call, _ = CASES[name]
  base = make()
  holder = Holder(base, call)
  options = {'rank': RANK, 'a_init': np_init(3), **options}
  report = pnnx.apply_lora(holder, targets=type(base), rngs=nnx.Rngs(0),
                           **options)
  return holder, x(), base, report


def _randomize(layer, seed=4):
  layer.lora.b[...] = jnp.asarray(data(*layer.lora.b.shape, seed=seed))


def _kernel(layer):
  return layer.embedding if isinstance(layer, nnx.Embed) else layer.kernel


def _reference(name, base, a, b, scale, x):
  """The plain layer with kernel W + scale * delta, delta by np.einsum."""
  plain = nnx.clone(base)
  kernel = _kernel(plain)
  delta = np.einsum(CASES[name][3], np.asarray(a), np.asarray(b))
  kernel[...] = jnp.asarray(np.asarray(kernel[...]) + scale * delta)
  return CASES[name][2](plain, x)


@pytest.mark.parametrize('name', CASES)
def test_init_output_equals_the_unmodified_layer_bit_for_bit(name):
  make, x, call, _ = CASES[name]
  expected = call(make(), x())
  holder, x, base, report = _adapted(name)
  assert type(holder.layer) is pnnx.lora_class_for(base)
  assert _kernel(holder.layer) is _kernel(base)  # same Variable, not a copy
  assert [s.key for s in report.specs] == ['layer/lora']
  assert_trees_close(holder(x), expected)


@pytest.mark.parametrize('name', CASES)
def test_random_adapters_equal_base_plus_independent_delta(name):
  holder, x, base, _ = _adapted(name, alpha=3.0)
  _randomize(holder.layer)
  lora = holder.layer.lora
  assert lora.scale == 1.5
  expected = _reference(name, base, lora.a[...], lora.b[...], 1.5, x)
  assert_trees_close(holder(x), expected, atol=2e-5, rtol=1e-5)
  assert not np.allclose(holder(x), CASES[name][2](base, x), atol=1e-3)


def test_rslora_scale_is_alpha_over_sqrt_rank():
  holder, x, base, report = _adapted('linear', rank=4, alpha=4.0,
                                     use_rslora=True)
  _randomize(holder.layer)
  lora = holder.layer.lora
  assert lora.scale == report.specs[0].scale == 2.0
  assert_trees_close(holder(x), _reference('linear', base, lora.a[...],
                                           lora.b[...], 2.0, x),
                     atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('name', CASES)
def test_fuse_equals_unfused_and_unfuse_restores(name):
  holder, x, base, report = _adapted(name)
  _randomize(holder.layer)
  plain_graph = nnx.graphdef(Holder(base, CASES[name][2]))
  kernel, a, b = (_kernel(holder.layer)[...], holder.layer.lora.a[...],
                  holder.layer.lora.b[...])
  adapted = holder(x)

  fused = pnnx.fuse(holder)
  assert type(holder.layer) is type(base)
  assert nnx.graphdef(holder) == plain_graph
  assert fused.specs == report.specs
  assert_trees_close(fused.adapters, {'layer': {'lora': {'a': a, 'b': b}}})
  assert_trees_close(holder(x), adapted, atol=2e-5, rtol=1e-5)

  pnnx.unfuse(holder, *fused)
  assert type(holder.layer) is pnnx.lora_class_for(base)
  assert_trees_close(_kernel(holder.layer)[...], kernel, atol=1e-6)
  assert_trees_close((holder.layer.lora.a[...], holder.layer.lora.b[...]),
                     (a, b))
  assert_trees_close(holder(x), adapted, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('name', CASES)
def test_adapter_file_round_trip_into_the_unmodified_model(name, tmp_path):
  holder, x, _, report = _adapted(name, alpha=4.0)
  _randomize(holder.layer)
  file = os.fspath(tmp_path / 'adapters.safetensors')
  assert pnnx.save_adapters(file, holder) == report.specs
  fresh = Holder(CASES[name][0](), CASES[name][2])
  loaded = pnnx.load_adapters(file, fresh)
  assert loaded.specs == pnnx.adapter_specs(fresh) == report.specs
  assert_trees_close(nnx.to_pure_dict(nnx.state(fresh)),
                     nnx.to_pure_dict(nnx.state(holder)))
  assert_trees_close(fresh(x), holder(x))


@nnx.jit
def _output_and_lora_grads(model, x):
  return model(x), nnx.grad(lambda m: jnp.sum(m(x) ** 2),
                            argnums=nnx.DiffState(0, pnnx.LoRAParam))(model)


@pytest.mark.parametrize('name', CASES)
def test_jit_and_gradients_reach_only_the_adapters(name):
  holder, x, _, _ = _adapted(name)
  _randomize(holder.layer)
  output, grads = _output_and_lora_grads(holder, x)
  assert_trees_close(output, holder(x), atol=1e-6, rtol=1e-6)
  assert jax.tree.structure(nnx.to_pure_dict(grads)) == jax.tree.structure(
      {'layer': {'lora': {'a': 0, 'b': 0}}})
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))

  frozen = nnx.to_pure_dict(nnx.state(holder, nnx.Not(pnnx.LoRAParam)))
  before = nnx.to_pure_dict(nnx.state(holder, pnnx.LoRAParam))
  opt = nnx.Optimizer(holder, optax.sgd(0.1), wrt=pnnx.LoRAParam)
  opt.update(holder, grads)
  assert_trees_close(
      nnx.to_pure_dict(nnx.state(holder, nnx.Not(pnnx.LoRAParam))), frozen)
  after = nnx.to_pure_dict(nnx.state(holder, pnnx.LoRAParam))
  assert all(not np.array_equal(p, q) for p, q in zip(
      jax.tree.leaves(before), jax.tree.leaves(after)))


def _dot_dtypes(fn, *args):
  """Operand dtypes of every matmul/conv in `fn`'s jaxpr."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize('name', CASES)
def test_layer_dtype_and_param_dtype_are_respected(name):
  make, x, call, _ = CASES[name]
  holder = Holder(make(dtype=jnp.bfloat16), call)
  pnnx.apply_lora(holder, rank=RANK, targets=type(holder.layer),
                  param_dtype=jnp.bfloat16, a_init=np_init(3),
                  rngs=nnx.Rngs(0))
  lora = holder.layer.lora
  assert lora.a.dtype == lora.b.dtype == jnp.bfloat16
  assert _kernel(holder.layer).dtype == jnp.float32  # the layer's own
  x = x()
  graphdef, state = nnx.split(holder)
  fn = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
  assert jax.eval_shape(fn, state, x).dtype == jnp.bfloat16
  assert _dot_dtypes(fn, state, x) == {'bfloat16'}


def test_lora_linear_dtype_and_param_dtype_values():
  layer = pnnx.LoRALinear(D, 3, rank=RANK, dtype=jnp.bfloat16,
                          param_dtype=jnp.bfloat16, a_init=np_init(3),
                          b_init=np_init(4), **W, rngs=nnx.Rngs(0))
  assert {v.dtype for v in jax.tree.leaves(nnx.state(layer))} == {
      jnp.dtype(jnp.bfloat16)}
  x = data(2, D)
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  f32 = lambda v: np.asarray(v[...], np.float32)  # noqa: E731
  expected = (x @ (f32(layer.kernel) + f32(layer.lora.a) @ f32(layer.lora.b))
              + f32(layer.bias))
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=3e-2,
                             atol=3e-2)
  assert _dot_dtypes(layer, x) == {'bfloat16'}


def test_param_dtype_defaults_to_float32_in_surgery():
  holder = Holder(CASES['linear'][0](param_dtype=jnp.bfloat16), _apply)
  pnnx.apply_lora(holder, rank=RANK, a_init=np_init(3), rngs=nnx.Rngs(0))
  assert holder.layer.lora.a.dtype == jnp.float32
  assert holder.layer.kernel.dtype == jnp.bfloat16


def test_dropout_is_on_in_train_mode_and_off_in_eval_mode():
  layer = pnnx.LoRALinear(D, 3, rank=RANK, dropout=0.5, a_init=np_init(3),
                          b_init=np_init(4), **W, rngs=nnx.Rngs(0))
  x = data(8, D)
  expected = (x @ (np.asarray(layer.kernel[...]) + np.asarray(
      layer.lora.a[...]) @ np.asarray(layer.lora.b[...]))
              + np.asarray(layer.bias[...]))
  first, second = layer(x), layer(x)
  assert not np.allclose(first, expected, atol=1e-3)
  assert not np.allclose(first, second, atol=1e-3)
  layer.eval()
  np.testing.assert_allclose(layer(x), expected, atol=2e-5, rtol=1e-5)
  assert_trees_close(layer(x), layer(x))
  layer.train()
  assert not np.allclose(layer(x), expected, atol=1e-3)


def test_dropout_without_an_rng_stream_is_an_error():
  with pytest.raises(ValueError, match=r"dropout=0\.1 at 'LoRALinear' "
                     'needs an rng stream'):
    pnnx.LoRALinear(D, 3, rank=RANK, dropout=0.1, a_init=np_init(), **W,
                    rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize('option, match', [
    (dict(rank=0), r"rank must be a positive int; got 0 at 'LoRALinear'"),
    (dict(alpha=-1.0), r'alpha must be positive or None; got -1\.0'),
    (dict(dropout=1.0), r'dropout must be in \[0, 1\); got 1\.0'),
])
def test_bad_layer_options_are_errors(option, match):
  with pytest.raises(ValueError, match=match):
    pnnx.LoRALinear(D, 3, **{'rank': RANK, **option}, **W,
                    rngs=nnx.Rngs(0))


@pytest.mark.parametrize('cls, args', [
    (pnnx.LoRALinear, (D, 3)),
    (pnnx.LoRALinearGeneral, ((2, D), (3, 2))),
    (pnnx.LoRAEinsum, ('btd,ndh->btnh', (2, D, 3))),
    (pnnx.LoRAConv, (D, 3, (3,))),
])
def test_constructors_load_the_plain_layer_state(cls, args):
  kw = {'axis': (1, -1)} if cls is pnnx.LoRALinearGeneral else {}
  layer = cls(*args, rank=RANK, a_init=np_init(3), **W, **kw,
              rngs=nnx.Rngs(0))
  plain = cls.base_type(*args, **W, **kw, rngs=nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(plain)) == jax.tree.structure(
      nnx.state(layer, nnx.Not(pnnx.LoRAParam)))
  nnx.update(layer, nnx.state(plain))
  x = {pnnx.LoRALinear: data(2, D), pnnx.LoRALinearGeneral: data(5, 2, D),
       pnnx.LoRAEinsum: data(1, 5, D), pnnx.LoRAConv: data(2, 6, D)}[cls]
  assert_trees_close(layer(x), plain(x))


def test_embed_constructor_and_attend():
  layer = pnnx.LoRAEmbed(VOCAB, D, rank=RANK, embedding_init=np_init(1),
                         a_init=np_init(3), b_init=np_init(4),
                         rngs=nnx.Rngs(0))
  table = np.asarray(layer.embedding[...]) + np.asarray(
      layer.lora.a[...]) @ np.asarray(layer.lora.b[...])
  ids, q = np.array([1, 6]), data(3, D)
  np.testing.assert_allclose(layer(ids), table[ids], atol=2e-5)
  np.testing.assert_allclose(layer.attend(q), q @ table.T, atol=2e-5)


def test_default_initializers_make_a_random_and_b_zero():
  lora = pnnx.LoRA(2, 1, 3, rngs=nnx.Rngs(0))
  assert np.abs(np.asarray(lora.a[...])).min() > 0
  assert_trees_close(lora.b[...], jnp.zeros((1, 3)))
  assert lora.a.dtype == jnp.float32 and type(lora.a) is pnnx.LoRAParam
  assert isinstance(lora.a, nnx.LoRAParam)


def test_standalone_lora_with_and_without_base_module():
  kw = dict(alpha=4.0, a_init=np_init(3), b_init=np_init(4))
  lora = pnnx.LoRA(D, RANK, 3, rngs=nnx.Rngs(0), **kw)
  x = data(2, D)
  update = 2.0 * x @ np.asarray(lora.a[...]) @ np.asarray(lora.b[...])
  np.testing.assert_allclose(lora(x), update, atol=2e-5)
  linear = nnx.Linear(D, 3, **W, rngs=nnx.Rngs(0))
  wrapped = pnnx.LoRA(D, RANK, 3, base_module=linear, rngs=nnx.Rngs(0),
                      **kw)
  np.testing.assert_allclose(wrapped(x), linear(x) + update, atol=2e-5)
  assert sorted(nnx.to_pure_dict(nnx.state(wrapped))) == [
      'a', 'b', 'base_module']


# ------------------------------------------------------------------ surgery


class Block(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.Linear(D, D, **W, rngs=rngs)
    self.mlp = nnx.Linear(D, D, **W, rngs=rngs)

  def __call__(self, x):
    return self.mlp(jax.nn.relu(self.attn(x)))


class Net(nnx.Module):
  """Embed, blocks in an nnx.List, plain list and dict, nnx.Dict, a tie."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, embedding_init=np_init(1), rngs=rngs)
    self.blocks = nnx.List([Block(rngs), Block(rngs)])
    self.extra = nnx.data([nnx.Linear(D, D, **W, rngs=rngs)])
    self.side = nnx.data({'gate': nnx.Linear(D, D, **W, rngs=rngs)})
    self.heads = nnx.Dict({'out': nnx.Linear(D, 2, **W, rngs=rngs)})
    self.conv = nnx.Conv(D, D, (3,), **W, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.tied = self.blocks[0].attn

  def __call__(self, ids):
    x = self.conv(self.embed(ids))
    for block in self.blocks:
      x = x + block(x)
    x = self.tied(self.extra[0](self.norm(x))) * self.side['gate'](x)
    return self.heads['out'](x), self.embed.attend(x)


IDS = np.array([[1, 4, 6, 0], [2, 2, 5, 3]])
ALL_LINEARS = ['blocks/0/attn', 'blocks/0/mlp', 'blocks/1/attn',
               'blocks/1/mlp', 'extra/0', 'heads/out', 'side/gate']


def _keys(report_or_specs):
  specs = getattr(report_or_specs, 'specs', report_or_specs)
  return sorted(s.key[:-len('/lora')] for s in specs)


def test_surgery_adapts_every_linear_in_place_including_lists_and_ties(
    tmp_path):
  net = Net(nnx.Rngs(0))
  expected = net(IDS)
  base_state = nnx.to_pure_dict(nnx.state(net))
  report = pnnx.apply_lora(net, rank=RANK, a_init=np_init(3),
                           rngs=nnx.Rngs(0))
  assert _keys(report) == ALL_LINEARS
  assert sorted(report.seen) == sorted(ALL_LINEARS + ['conv', 'embed'])
  assert net.tied is net.blocks[0].attn
  assert isinstance(net.tied, pnnx.LoRALinear)
  assert isinstance(net.extra[0], pnnx.LoRALinear)
  assert isinstance(net.side['gate'], pnnx.LoRALinear)
  assert isinstance(net.heads['out'], pnnx.LoRALinear)
  assert type(net.embed) is nnx.Embed and type(net.conv) is nnx.Conv
  lora_paths = sorted('/'.join(map(str, p[:-2])) for p, _ in nnx.to_flat_state(
      nnx.state(net, pnnx.LoRAParam)) if p[-1] == 'a')
  assert lora_paths == ALL_LINEARS
  assert pnnx.adapter_specs(net) == report.specs
  assert_trees_close(net(IDS), expected)
  # The base variables are unchanged, and a plain checkpoint loads.
  assert_trees_close(
      nnx.to_pure_dict(nnx.state(net, nnx.Not(pnnx.LoRAParam))), base_state)
  nnx.update(net, nnx.state(Net(nnx.Rngs(0))))
  assert_trees_close(net(IDS), expected)
  # Adapter files keep list indices and ties.
  for layer in (net.blocks[0].attn, net.heads['out']):
    _randomize(layer)
  assert not np.allclose(net(IDS)[0], expected[0], atol=1e-3)
  file = os.fspath(tmp_path / 'net.safetensors')
  pnnx.save_adapters(file, net)
  fresh = Net(nnx.Rngs(0))
  pnnx.load_adapters(file, fresh)
  assert fresh.tied is fresh.blocks[0].attn
  assert_trees_close(fresh(IDS), net(IDS))


def test_rules_pick_rank_per_layer_first_rule_wins():
  net = Net(nnx.Rngs(0))
  report = pnnx.apply_lora(net, rules=[
      pnnx.LoRARule(rank=3, targets=r'blocks/\d+/attn', a_init=np_init()),
      pnnx.LoRARule(rank=1, targets=(nnx.Linear, nnx.Embed), exclude=(
          'extra/.*', lambda m: getattr(m, 'out_features', 0) == 2),
      a_init=np_init()),
      peft.LoRARule(rank=2, targets=lambda m: isinstance(m, nnx.Conv),
                    a_init=np_init()),
  ], rngs=nnx.Rngs(0))
  ranks = {s.key[:-len('/lora')]: s.rank for s in report.specs}
  assert ranks == {'blocks/0/attn': 3, 'blocks/1/attn': 3, 'blocks/0/mlp': 1,
                   'blocks/1/mlp': 1, 'side/gate': 1, 'embed': 1, 'conv': 2}
  assert net.embed.lora.a.shape == (VOCAB, 1)
  assert net.conv.lora.a.shape == (3, D, 2)
  _ = net(IDS)


def test_regex_target_on_a_list_index_and_layers_inside_lora_are_skipped():
  net = Net(nnx.Rngs(0))
  report = pnnx.apply_lora(net, rank=RANK, targets='extra/0',
                           a_init=np_init(), rngs=nnx.Rngs(0))
  assert _keys(report) == ['extra/0']
  wrapper = Holder(pnnx.LoRA(D, RANK, D, base_module=nnx.Linear(
      D, D, **W, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0)), _apply)
  with pytest.raises(ValueError, match='selected no layer in Holder'):
    pnnx.apply_lora(wrapper, rank=RANK, rngs=nnx.Rngs(0))


def test_unmatched_target_is_an_error_listing_adaptable_layers():
  net = Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match=(
      r"(?s)LoRA target 'blocks/attn' \(rule 0\) matched no layer\. "
      r'Adaptable layers:\n  blocks/0/attn \(Linear\).*heads/out \(Linear\)'
      r'.*regexes must match the whole path')):
    pnnx.apply_lora(net, rank=RANK, targets=('extra/0', 'blocks/attn'),
                    rngs=nnx.Rngs(0))
  assert type(net.extra[0]) is nnx.Linear  # nothing changed


def test_adapting_twice_is_an_error_naming_the_adapted_layers():
  net = Net(nnx.Rngs(0))
  pnnx.apply_lora(net, rank=RANK, targets='heads/out', a_init=np_init(),
                  rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"already have LoRA: \['heads/out'\]"):
    pnnx.apply_lora(net, rank=RANK, targets='heads/out', rngs=nnx.Rngs(0))


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(), ValueError, 'LoRA needs a rank'),
    (dict(rank=2, rules=[peft.LoRARule(rank=2)]), ValueError,
     'Pass either rules'),
    (dict(rank=0), ValueError, 'rank must be a positive int; got 0'),
    (dict(rules=[peft.LoRARule(rank=2, targets=nn.Dense)]), TypeError,
     r'targets names flax\.linen\.linear\.Dense, which peft\.nnx cannot '
     'adapt'),
    (dict(rank=2, targets=nnx.LayerNorm), TypeError,
     'targets names LayerNorm, which peft cannot adapt'),
    (dict(rank=2, exclude=3), TypeError, 'exclude entries must be a layer '
     'type, a path regex or a predicate; got 3'),
    (dict(rank=2, targets='('), ValueError, "targets holds '\\(', which is "
     'not a valid regex'),
])
def test_bad_surgery_options_are_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    pnnx.apply_lora(Net(nnx.Rngs(0)), rngs=nnx.Rngs(0), **kwargs)


def test_layers_surgery_cannot_adapt_are_errors():
  linear = nnx.Linear(D, 3, **W, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='apply_lora takes a flax.nnx Module; '
                     'got dict'):
    pnnx.apply_lora({'a': linear}, rank=RANK, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'The root \(an nnx.Linear\) cannot '
                     r'be replaced in place; use peft\.nnx\.LoRALinear'):
    pnnx.apply_lora(linear, rank=RANK, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"The layer at 'layer/0' sits in a "
                     'tuple'):
    pnnx.apply_lora(Holder(nnx.data((linear,)), _apply), rank=RANK,
                    rngs=nnx.Rngs(0))
  einsum = nnx.Einsum('bd,do->bo', (D, 3), **W, rngs=nnx.Rngs(0))
  einsum.einsum_str = None  # to be given at each call
  with pytest.raises(ValueError, match="The nnx.Einsum at 'layer' has no "
                     'einsum_str'):
    pnnx.apply_lora(Holder(einsum, _apply), rank=RANK, rngs=nnx.Rngs(0))
  conv = nnx.Conv(D, D, (3,), feature_group_count=2, **W, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"cannot adapt the conv at 'layer': "
                     r'it is grouped \(feature_group_count=2\)'):
    pnnx.apply_lora(Holder(conv, _apply), rank=RANK, targets=nnx.Conv,
                    rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='LoRAConv adapts nnx.Conv; got Linear'):
    pnnx.LoRAConv.from_module(linear, rank=RANK, rngs=nnx.Rngs(0))


def test_einsum_adapted_for_a_given_equation_and_called_otherwise():
  einsum = nnx.Einsum('btd,ndh->btnh', (2, D, 3), **W, rngs=nnx.Rngs(0))
  layer = pnnx.LoRAEinsum.from_module(
      einsum, rank=RANK, einsum_str='xd,ndh->xnh', a_init=np_init(3),
      rngs=nnx.Rngs(0))
  assert layer.adapter_spec().einsum_str == 'xd,ndh->xnh'
  x = data(1, 5, D)
  _randomize(layer)
  expected = _reference('einsum', einsum, layer.lora.a[...],
                        layer.lora.b[...], 1.0, x)
  # The same split of the kernel under any letters is fine.
  assert_trees_close(layer(x), expected, atol=2e-5, rtol=1e-5)
  assert_trees_close(layer(x, 'xyd,ndh->xynh'), expected, atol=2e-5,
                     rtol=1e-5)
  with pytest.raises(ValueError, match="adapted for einsum 'xd,ndh->xnh' "
                     r"\(delta 'dr,rnh->ndh'\) but is called with "
                     "'btn,ndh->btdh'"):
    layer(data(1, 5, 2), 'btn,ndh->btdh')


# ----------------------------------------------- fine-tune, fuse, save, load


class Mlp(nnx.Module):

  def __init__(self, seed):
    self.up = nnx.Linear(D, 8, kernel_init=np_init(seed), rngs=nnx.Rngs(0))
    self.down = nnx.Linear(8, 1, kernel_init=np_init(seed + 1),
                           rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.down(jnp.tanh(self.up(x)))


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(
      _loss, argnums=nnx.DiffState(0, pnnx.LoRAParam))(model, x, y)
  optimizer.update(model, grads)
  return loss


def test_fine_tune_adapters_only_then_fuse_save_and_load(tmp_path):
  x = data(64, D)
  teacher = Mlp(seed=10)
  teacher.up.kernel[...] += 0.8 * (data(D, 1, seed=5) @ data(1, 8, seed=6))
  y = teacher(x)
  model = Mlp(seed=10)
  frozen = nnx.to_pure_dict(nnx.state(model))
  pnnx.apply_lora(model, rank=RANK, targets=nnx.Linear,
                  a_init=np_init(3, scale=0.3), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=pnnx.LoRAParam)
  losses = [float(_train_step(model, optimizer, x, y)) for _ in range(40)]
  assert losses[-1] < 0.1 * losses[0], losses
  assert_trees_close(
      nnx.to_pure_dict(nnx.state(model, nnx.Not(pnnx.LoRAParam))), frozen)
  predictions = model(x)

  file = os.fspath(tmp_path / 'adapters.safetensors')
  specs = pnnx.save_adapters(file, model, metadata={'task': 'teacher'})
  assert [s.key for s in specs] == ['down/lora', 'up/lora']

  fused = pnnx.fuse(model)
  assert (type(model.up), type(model.down)) == (nnx.Linear, nnx.Linear)
  assert not jax.tree.leaves(nnx.state(model, pnnx.LoRAParam))
  np.testing.assert_allclose(model(x), predictions, atol=2e-5, rtol=1e-5)
  assert fused.specs == specs

  # Into an unmodified base: LoRA layers are built from the file.
  base = Mlp(seed=10)
  loaded = pnnx.load_adapters(file, base)
  assert loaded.metadata == {'task': 'teacher'}
  assert_trees_close(base(x), predictions)
  # Into an adapted model: the adapters are overwritten.
  other = Mlp(seed=10)
  pnnx.apply_lora(other, rank=RANK, targets=nnx.Linear, rngs=nnx.Rngs(7))
  pnnx.load_adapters(file, other)
  assert_trees_close(other(x), predictions)


def test_save_load_fuse_errors(tmp_path):
  file = os.fspath(tmp_path / 'a.safetensors')
  with pytest.raises(ValueError, match='save_adapters found no LoRA layer in '
                     'Mlp'):
    pnnx.save_adapters(file, Mlp(seed=0))
  with pytest.raises(ValueError, match='fuse found no LoRA layer in Mlp'):
    pnnx.fuse(Mlp(seed=0))
  model = Mlp(seed=0)
  pnnx.apply_lora(model, rank=RANK, a_init=np_init(), rngs=nnx.Rngs(0))
  pnnx.save_adapters(file, model)
  half = Mlp(seed=0)
  pnnx.apply_lora(half, rank=RANK, param_dtype=jnp.bfloat16,
                  a_init=np_init(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"load_adapters: 'down/lora' in .* is "
                     'float32 but the model holds bfloat16'):
    pnnx.load_adapters(file, half)
  other_rank = Mlp(seed=0)
  pnnx.apply_lora(other_rank, rank=1, a_init=np_init(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='differs from the expected spec'):
    pnnx.load_adapters(file, other_rank)
  fused = pnnx.fuse(model)
  wrong = Holder(nnx.Linear(D, 3, **W, rngs=nnx.Rngs(0)), _apply)
  with pytest.raises(ValueError, match=r"unfuse: adapter 'down/lora' is for "
                     "an nnx.Linear at 'down', but the model holds no module"):
    pnnx.unfuse(wrong, *fused)
  with pytest.raises(ValueError, match="unfuse: adapter 'up/lora' does not "
                     "fit the layer at 'up'"):
    pnnx.unfuse(model, [dataclasses.replace(
        fused.specs[1], einsum_str='bi,io->bo')], fused.adapters)


# ------------------------------------------- one adapter file, linen or nnx


class _LinenTwin(nn.Module):
  """One layer of each kind; `_NnxTwin` is the same model in nnx."""

  @nn.compact
  def __call__(self, x, ids):
    h = nn.Dense(6, name='up')(x)
    h = nn.DenseGeneral((2, 3), name='gen')(h)
    h = nn.Einsum((2, 3, D), 'btnh,nhd->btd', name='ein')(h)
    return nn.Conv(D, (3,), name='conv')(h) + nn.Embed(VOCAB, D,
                                                       name='emb')(ids)


class _NnxTwin(nnx.Module):

  def __init__(self, base):
    rngs = nnx.Rngs(0)
    self.up = nnx.Linear(D, 6, rngs=rngs)
    self.gen = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
    self.ein = nnx.Einsum('btnh,nhd->btd', (2, 3, D), (D,), rngs=rngs)
    self.conv = nnx.Conv(D, D, (3,), rngs=rngs)
    self.emb = nnx.Embed(VOCAB, D, rngs=rngs)
    for layer, variables in base.items():  # the linen model's weights
      for name, value in variables.items():
        getattr(getattr(self, layer), name)[...] = value

  def __call__(self, x, ids):
    return self.conv(self.ein(self.gen(self.up(x)))) + self.emb(ids)


_LINEN_KINDS = [nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed]
_NNX_KINDS = [nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed]
_X, _IDS = jnp.asarray(data(1, 5, D)), jnp.array([[0, 3, 6, 2, 2]])


def _under(surgery, fn):
  """`fn()` under `peft.lora(**surgery)` (plain if empty), and the report."""
  if not surgery:
    return fn(), None
  with peft.lora(**surgery) as report:
    return fn(), report


def _twin_params(seed, **surgery):
  """Random params of `_LinenTwin` (under surgery if given), and its report.

  Drawn with numpy at the shapes of init (an eager init compiles each op).
  """
  shapes, report = _under(surgery, lambda: jax.eval_shape(
      _LinenTwin().init, jax.random.key(0), _X, _IDS)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(scale=0.3, size=s.shape), s.dtype),
      shapes), report


def _linen_twin(params, **surgery):
  run = jax.jit(lambda p: _LinenTwin().apply({'params': p}, _X, _IDS))
  return _under(surgery, lambda: run(params))[0]


_SURGERY = dict(rank=RANK, alpha=4.0, targets=_LINEN_KINDS)


def _linen_file(tmp_path, surgery):
  """The linen twin adapted by `surgery` with random adapters, saved:
  `(base params, params, report, its output, the file)`."""
  base, _ = _twin_params(0)
  fresh, report = _twin_params(1, **surgery)
  params = peft.merge_params(base, peft.split_params(fresh).lora)
  file = os.fspath(tmp_path / 'linen.safetensors')
  peft.save_adapters(file, params, report.specs)
  return base, params, report, _linen_twin(params, **surgery), file


def test_a_linen_file_loads_into_the_identical_nnx_model(tmp_path):
  base, _, report, expected, file = _linen_file(tmp_path, _SURGERY)
  assert {s.layer_type for s in report.specs} == {
      'Dense', 'DenseGeneral', 'Einsum', 'Conv', 'Embed'}

  plain = _NnxTwin(base)
  pnnx.load_adapters(file, plain)  # builds the LoRA layers from the file
  assert type(plain.gen) is pnnx.LoRALinearGeneral
  assert_trees_close(plain(_X, _IDS), expected, atol=1e-5, rtol=1e-5)
  adapted = _NnxTwin(base)  # overwrites the adapters of LoRA layers
  pnnx.apply_lora(adapted, rank=RANK, alpha=4.0, targets=_NNX_KINDS,
                  rngs=nnx.Rngs(0))
  pnnx.load_adapters(file, adapted)
  assert_trees_close(adapted(_X, _IDS), expected, atol=1e-5, rtol=1e-5)


def test_an_nnx_file_loads_into_the_identical_linen_model(tmp_path):
  base, _ = _twin_params(0)
  twin = _NnxTwin(base)
  pnnx.apply_lora(twin, rank=RANK, alpha=4.0, targets=_NNX_KINDS,
                  a_init=np_init(3, scale=0.3), rngs=nnx.Rngs(0))
  for layer in (twin.up, twin.gen, twin.ein, twin.conv, twin.emb):
    _randomize(layer)
  file = os.fspath(tmp_path / 'nnx.safetensors')
  pnnx.save_adapters(file, twin)

  fresh, report = _twin_params(1, **_SURGERY)
  lora, specs, _ = peft.load_adapters(file, expected=report.specs)
  assert {s.layer_type for s in specs} == {
      'Linear', 'LinearGeneral', 'Einsum', 'Conv', 'Embed'}
  peft.check_adapters_match(lora, fresh)
  params = peft.merge_params(base, lora)
  got = _linen_twin(params, **_SURGERY)
  assert_trees_close(got, twin(_X, _IDS), atol=1e-5, rtol=1e-5)
  # The file's specs are all fuse needs, whichever framework wrote them.
  assert_trees_close(_linen_twin(peft.fuse_params(params, specs)), got,
                     atol=1e-5, rtol=1e-5)


def test_a_file_for_another_layer_kind_is_refused(tmp_path):
  params, report = _twin_params(1, rank=RANK, targets=nn.Embed)
  # A linen kind is named as nnx calls it.
  spec = dataclasses.replace(report.specs[0], layer_type='Dense')
  file = os.fspath(tmp_path / 'a.safetensors')
  peft.save_adapters(file, params, [spec])
  with pytest.raises(ValueError, match=r"load_adapters: adapter 'emb/lora' "
                     r"is for an nnx.Linear at 'emb', but the model holds "
                     r'Embed there'):
    pnnx.load_adapters(file, _NnxTwin({}))


def test_nnx_lora_rule_is_the_one_rule_type():
  # Documented in docs/api/nnx.md: nnx and linen share one rule language.
  assert pnnx.LoRARule is peft.LoRARule


# ------------------------------------------------------------------- DoRA

# DoRA on every kind but Embed (which refuses it).
_DORA = dict(rank=RANK, alpha=4.0, use_dora=True, targets=_LINEN_KINDS[:4])


def test_dora_init_equals_the_plain_model_and_trains_m():
  base, _ = _twin_params(0)
  twin = _NnxTwin(base)
  plain = twin(_X, _IDS)
  pnnx.apply_lora(twin, rank=RANK, use_dora=True, targets=_NNX_KINDS[:4],
                  rngs=nnx.Rngs(0))
  assert_trees_close(twin(_X, _IDS), plain, atol=1e-6, rtol=1e-6)
  trained = nnx.to_pure_dict(nnx.state(twin, pnnx.LoRAParam))
  assert sorted(trained['gen']['lora']) == ['a', 'b', 'm']
  assert trained['gen']['lora']['m'].shape == (2, 3)
  np.testing.assert_allclose(  # m = ||W|| over the contracted axis
      trained['ein']['lora']['m'],
      np.sqrt((np.asarray(base['ein']['kernel']) ** 2).sum(axis=(0, 1))),
      rtol=1e-6)


def test_dora_nnx_equals_linen_on_the_same_weights(tmp_path):
  base, params, report, expected, linen_file = _linen_file(tmp_path, _DORA)
  twin = _NnxTwin(base)
  pnnx.load_adapters(linen_file, twin)  # builds DoRA layers from the file
  assert twin.up.lora.options.use_dora
  assert_trees_close(twin(_X, _IDS), expected, atol=1e-5, rtol=1e-5)
  # And back: the nnx file holds the same m, and loads into linen.
  nnx_file = os.fspath(tmp_path / 'nnx.safetensors')
  pnnx.save_adapters(nnx_file, twin)
  lora, _, _ = peft.load_adapters(nnx_file, expected=report.specs)
  assert_trees_close(lora, peft.split_params(params).lora)
  # fuse gives the plain nnx model, unfuse the DoRA one with its kernels.
  fused = pnnx.fuse(twin)
  assert type(twin.gen) is nnx.LinearGeneral
  assert_trees_close(twin(_X, _IDS), expected, atol=1e-5, rtol=1e-5)
  pnnx.unfuse(twin, *fused)
  assert type(twin.gen) is pnnx.LoRALinearGeneral
  assert_trees_close(twin(_X, _IDS), expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(twin.ein.kernel[...], base['ein']['kernel'],
                             atol=1e-5, rtol=1e-5)


def test_dora_errors_in_nnx():
  with pytest.raises(ValueError, match=r"DoRA \(use_dora=True\) does not "
                     r"support the nnx\.Embed at 'LoRAEmbed'.*use_dora=False"):
    pnnx.LoRAEmbed(VOCAB, D, rank=RANK, use_dora=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"LoRA: use_dora=True needs the "
                     r"adapted kernel .*apply_lora\(model, rank=\.\.\., "
                     r"use_dora=True\)"):
    pnnx.LoRA(D, RANK, 3, use_dora=True, rngs=nnx.Rngs(0))


def test_dora_magnitudes_follow_loaded_kernels():
  base, _ = _twin_params(0)
  twin = _NnxTwin(base)
  pnnx.apply_lora(twin, rank=RANK, use_dora=True, targets=_NNX_KINDS[:4],
                  rngs=nnx.Rngs(0))
  other, _ = _twin_params(5)
  loaded = _NnxTwin(other)  # the same model with other kernels...
  for name in ('up', 'gen', 'ein', 'conv', 'emb'):
    for var, value in vars(getattr(loaded, name)).items():
      if isinstance(value, nnx.Param):
        getattr(getattr(twin, name), var)[...] = value[...]
  pnnx.init_dora_magnitudes(twin)  # ...and m from them
  assert_trees_close(twin(_X, _IDS), loaded(_X, _IDS), atol=1e-5, rtol=1e-5)


def test_dora_refuses_an_nnx_bias_not_over_the_output_features():
  dora = pnnx.LoRALinear(D, 3, rank=RANK, use_dora=True, rngs=nnx.Rngs(0))
  dora.bias = nnx.Param(jnp.zeros((1, 1)))  # broadcasts, but not per feature
  with pytest.raises(ValueError, match=r"DoRA on LoRALinear: the bias has "
                     r"shape \(1, 1\), but DoRA adds the bias after rescaling "
                     r"and needs it over the output features \(3,\)"):
    dora(_X[0])
