"""`peft.AdapterBank`: named adapters on one model, one per call or one per
batch row, each row checked against running it alone with its adapter."""

import contextlib
import functools

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
import peft.nnx as pnnx
from tests import fixtures
from tests.helpers import assert_trees_close


class Layers(nn.Module):
  """One layer of each kind, every input with the batch axis first."""

  @nn.compact
  def __call__(self, x, ids, img):
    embed = nn.Embed(11, 5, name='embed')
    return (nn.Dense(6, name='dense')(x),
            nn.DenseGeneral((2, 3), axis=-1, name='general')(x),
            nn.Einsum((5, 2, 3), 'btd,dnh->btnh', name='einsum')(x),
            # The batch axis moves (as Gemma's `BSD,CKDH->CBSKH`).
            nn.Einsum((2, 5, 3), 'btd,cdh->cbth', name='moved')(x),
            embed(ids), embed.attend(x),
            nn.Conv(4, (3, 3), name='conv')(img))


RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((3, 4, 5)), jnp.float32)
IDS = jnp.asarray(RNG.integers(0, 11, (3, 4)), jnp.int32)
IMG = jnp.asarray(RNG.standard_normal((3, 6, 6, 2)), jnp.float32)
TARGETS = ('dense', 'general', 'einsum', 'moved', 'embed', 'conv')
LAYER_OUTPUTS = ('dense', 'general', 'einsum', 'moved', 'embed', 'attend',
                 'conv')
SURGERY = peft.lora(rank=3, targets=TARGETS)  # rank: bank.rank.


@functools.lru_cache(maxsize=None)
def _trained():
  """Base params and two adapter sets: other ranks, alphas, scale rules."""
  out = {}
  for seed, (name, options) in enumerate(
      (('fr', dict(rank=2, alpha=4.0)),
       ('de', dict(rank=3, alpha=3.0, use_rslora=True)))):
    with peft.lora(**options, targets=TARGETS) as report:
      params = fixtures.random_params(Layers().init, jax.random.key(0), X,
                                      IDS, IMG, seed=seed)
    out[name] = peft.split_params(params), report.specs, options
  base = out['fr'][0].original
  return base, {name: (split.lora, specs) for name, (split, specs, _) in
                out.items()}, {name: o for name, (_, _, o) in out.items()}


def _bank():
  _, adapters, _ = _trained()
  return peft.AdapterBank.stack(adapters)


def _alone(name, x=X, ids=IDS, img=IMG):
  """The model with adapter `name` only (its own surgery), on the base."""
  base, adapters, options = _trained()
  with peft.lora(**options[name], targets=TARGETS):
    return Layers().apply(
        {'params': peft.merge_params(base, adapters[name][0])}, x, ids, img)


def _base(x=X, ids=IDS, img=IMG):
  return Layers().apply({'params': _trained()[0]}, x, ids, img)


@jax.jit
def _banked(params, selection_ids):
  with SURGERY, _bank().active(selection_ids):
    return Layers().apply({'params': params}, X, IDS, IMG)


def _bank_params():
  return peft.merge_params(_trained()[0], _bank().lora)


def test_stack_pads_ranks_and_folds_scales():
  bank = _bank()
  assert bank.names == ('fr', 'de') and bank.rank == 3
  assert {s.path[0]: s.rank for s in bank.specs} == dict.fromkeys(TARGETS, 3)
  assert all(s.scale == 1.0 for s in bank.specs)
  assert bank.lora['dense']['lora']['a'].shape == (2, 5, 3)
  assert bank.lora['dense']['lora']['b'].shape == (2, 3, 6)
  # fr's rank 2 is padded with a zero column of A and row of B.
  np.testing.assert_array_equal(bank.lora['dense']['lora']['a'][0, :, 2], 0)
  np.testing.assert_array_equal(bank.lora['dense']['lora']['b'][0, 2], 0)


@pytest.mark.parametrize('name', ['fr', 'de'])
def test_one_adapter_of_the_bank_equals_it_alone(name):
  with SURGERY, _bank().active(name):
    out = Layers().apply({'params': _bank_params()}, X, IDS, IMG)
  assert_trees_close(out, _alone(name), rtol=1e-5, atol=1e-5)


def test_each_row_gets_its_own_adapter_in_one_jitted_call():
  params = _bank_params()
  for row_ids in ([1, -1, 0], [0, 0, 1]):
    out = _banked(params, jnp.asarray(row_ids, jnp.int32))
    for row, i in enumerate(row_ids):
      expected = (_base() if i < 0 else _alone(_bank().names[i]))
      for layer, got, want in zip(LAYER_OUTPUTS, out, expected):
        axis = 1 if layer == 'moved' else 0
        got = np.take(np.asarray(got), row, axis)
        want = np.take(np.asarray(want), row, axis)
        # A -1 row is the base model's to rounding: the banked program
        # fuses the base's ops differently from the plain one (1 ulp
        # apart on some CPUs); `active(None)` is exact (tested below).
        tolerance = 1e-6 if i < 0 else 1e-5
        np.testing.assert_allclose(got, want, rtol=tolerance,
                                   atol=tolerance, err_msg=layer)
  assert _banked._cache_size() == 1  # Other ids, same program.


def test_no_adapter_is_the_base_exactly():
  with SURGERY, _bank().active(None):
    off = Layers().apply({'params': _bank_params()}, X, IDS, IMG)
  assert_trees_close(off, _base())
  base, adapters, options = _trained()
  with peft.lora(**options['fr'], targets=TARGETS), peft.adapters_disabled():
    disabled = Layers().apply(
        {'params': peft.merge_params(base, adapters['fr'][0])}, X, IDS, IMG)
  assert_trees_close(disabled, _base())


def test_ids_from_names():
  bank = _bank()
  ids = bank.ids(['de', None, 'fr'])
  np.testing.assert_array_equal(ids, [1, -1, 0])
  out = _banked(_bank_params(), jnp.asarray(ids))
  np.testing.assert_allclose(out[0][0], _alone('de')[0][0], rtol=1e-5,
                             atol=1e-5)


def test_select_fuses_and_saves_as_one_adapter(tmp_path):
  bank = _bank()
  lora, specs = bank.select('de')
  fused = peft.fuse_params(peft.merge_params(_trained()[0], lora), specs)
  served = Layers().apply({'params': fused}, X, IDS, IMG)
  assert_trees_close(served, _alone('de'), rtol=1e-4, atol=1e-4)
  peft.save_adapters(tmp_path / 'de.safetensors', lora, specs)
  loaded = peft.load_adapters(tmp_path / 'de.safetensors')
  assert loaded.specs == specs
  assert_trees_close(loaded.lora, jax.tree.map(np.asarray, lora))


def test_a_kernel_only_some_adapters_adapt_is_zero_in_the_others():
  _, adapters, _ = _trained()
  de_lora, de_specs = adapters['de']
  dense_only = tuple(s for s in de_specs if s.path == ('dense',))
  bank = peft.AdapterBank.stack(
      {'fr': adapters['fr'], 'de': ({'dense': de_lora['dense']}, dense_only)})
  np.testing.assert_array_equal(bank.lora['conv']['lora']['b'][1], 0)
  params = peft.merge_params(_trained()[0], bank.lora)
  with SURGERY, bank.active('de'):
    out = Layers().apply({'params': params}, X, IDS, IMG)
  np.testing.assert_allclose(out[0], _alone('de')[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[6], _base()[6], rtol=1e-6, atol=1e-6)


def test_banks_of_scanned_layers_keep_the_layer_axis_first():
  model, x = fixtures.Scanned(), fixtures.features()
  surgery = peft.lora(rank=2)
  with surgery as report:
    params = [fixtures.random_params(model.init, jax.random.key(0), x,
                                     seed=s) for s in (1, 2)]
  base = peft.split_params(params[0]).original
  bank = peft.AdapterBank.stack(
      {f'a{i}': (peft.split_params(p).lora, report.specs)
       for i, p in enumerate(params)})
  a = bank.lora['layers']['up']['lora']['a']
  assert a.shape == (3, 2, fixtures.D, 2)  # (layers, adapters, in, rank)
  with surgery, bank.active('a1'):
    out = model.apply({'params': peft.merge_params(base, bank.lora)}, x)
  with surgery:
    alone = model.apply({'params': peft.merge_params(
        base, peft.split_params(params[1]).lora)}, x)
  np.testing.assert_allclose(out, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('call, error, match', [
    (lambda bank, p: bank.active('it').__enter__(), ValueError,
     r"AdapterBank: no adapter named 'it'; the bank holds \['fr', 'de'\]"),
    (lambda bank, p: bank.active(1.5).__enter__(), TypeError,
     r'AdapterBank.active takes an adapter name, \(batch,\) int ids or None;'
     r" got 1.5. Pass e.g. 'fr'"),
    (lambda bank, p: _apply(bank.active(jnp.array([0, 1])), p), ValueError,
     r'adapter ids \(2,\) must give one adapter per row of the batch, but '
     r"the input of 'dense/lora' has shape \(3, 4, 5\)"),
    (lambda bank, p: _apply(None, p), ValueError,
     r"LoRA param 'a' at 'dense/lora' has shape \(2, 5, 3\) but this layer "
     r'with rank 3 needs \(5, 3\)'),
    (lambda bank, p: _apply(bank.active('fr'), _trained()[0]), ValueError,
     r"LoRA param 'a' at 'dense/lora' does not exist, and a bank selection "
     r'\(AdapterBank.active\) is in effect'),
    (lambda bank, p: peft.AdapterBank.stack({}), ValueError,
     r'AdapterBank: adapters must be a non-empty dict'),
    (lambda bank, p: _apply(bank.active('fr'), p,
                            peft.lora(rank=3, alpha=6.0, targets=TARGETS)),
     ValueError,
     r"the LoRA layer at 'dense/lora' has scale 2.0 \(alpha / rank\); a bank "
     r"holds its adapters' scales in B. Run the bank under "
     r'peft.lora\(rank=bank.rank\) with alpha left unset'),
])
def test_errors(call, error, match):
  with pytest.raises(error, match=match):
    call(_bank(), _bank_params())


def test_a_bank_over_a_quantized_base_equals_each_qlora_adapter():
  model, x = fixtures.Block(), fixtures.features()
  with peft.quantized('int8'), peft.lora(rank=2) as report:
    adapters = [peft.split_params(fixtures.random_params(
        model.init, jax.random.key(0), x, seed=s)).lora for s in (1, 2)]
  floats = fixtures.random_params(model.init, jax.random.key(0), x, seed=3)
  qbase = peft.quantize(floats, method='int8')
  bank = peft.AdapterBank.stack(
      {f'q{i}': (lora, report.specs) for i, lora in enumerate(adapters)})
  ids = jnp.array([1, -1])

  with peft.quantized('int8'), peft.lora(rank=2), bank.active(ids):
    mixed = model.apply({'params': peft.merge_params(qbase, bank.lora)}, x)
  with peft.quantized('int8'), peft.lora(rank=2):
    alone = model.apply(
        {'params': peft.merge_params(qbase, adapters[1])}, x)
  with peft.quantized('int8'):
    base = model.apply({'params': qbase}, x)
  np.testing.assert_allclose(mixed[0], alone[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(mixed[1], base[1])


def test_a_layer_that_contracts_the_batch_cannot_take_row_ids():
  class Pooled(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((5, 2), 'btd,dh->th', name='pool')(x)
  with peft.lora(rank=2) as report:
    params = fixtures.random_params(Pooled().init, jax.random.key(0), X)
  bank = peft.AdapterBank.stack(
      {'x': (peft.split_params(params).lora, report.specs)})
  merged = peft.merge_params(peft.split_params(params).original, bank.lora)
  with pytest.raises(ValueError, match=(
      r"The layer at 'pool/lora' does not keep the batch axis of its input "
      r'\(3, 4, 5\) in its output \(4, 2\), so its rows cannot take adapters '
      r'of their own')):
    with peft.lora(rank=2), bank.active(jnp.array([0, 0, -1])):
      Pooled().apply({'params': merged}, X)


def _apply(selection, params, surgery=SURGERY):
  with surgery, selection or contextlib.nullcontext():
    return Layers().apply({'params': params}, X, IDS, IMG)


class _NnxNet(nnx.Module):
  """Each nnx layer kind, every input with the batch axis first."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 5, rngs=rngs)
    self.dense = nnx.Linear(5, 4, rngs=rngs)
    self.einsum = nnx.Einsum('btd,cdh->cbth', (2, 5, 3), rngs=rngs)
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)

  def __call__(self, ids, img):
    h = self.embed(ids)
    return (h, self.dense(h), self.einsum(h), self.embed.attend(h),
            self.conv(img))


def test_nnx_bank_equals_each_adapter_alone(tmp_path):
  net = _NnxNet(nnx.Rngs(0))
  base = net(IDS, IMG)
  targets = (nnx.Embed, nnx.Linear, nnx.Einsum, nnx.Conv)
  loaded, alone = {}, {}
  for seed, name in enumerate(('fr', 'de')):
    if seed:
      pnnx.load_adapters(tmp_path / 'fr.safetensors', net)  # Reinit below.
      for _, layer in pnnx._surgery.lora_layers(net):  # pylint: disable=protected-access
        layer.lora.b[...] = jnp.asarray(
            np.random.default_rng(7).standard_normal(layer.lora.b.shape),
            layer.lora.b.dtype)
    else:
      pnnx.apply_lora(net, rank=2, targets=targets,
                      b_init=nn.initializers.normal(0.5), rngs=nnx.Rngs(1))
    pnnx.save_adapters(tmp_path / f'{name}.safetensors', net)
    loaded[name] = peft.load_adapters(tmp_path / f'{name}.safetensors')
    alone[name] = net(IDS, IMG)
  bank = peft.AdapterBank.stack(loaded)
  pnnx.load_bank(net, bank)
  assert net.dense.lora.a.shape == (2, 5, 2)
  with bank.active('fr'):
    assert_trees_close(net(IDS, IMG), alone['fr'], rtol=1e-5, atol=1e-5)
  with bank.active(None):
    assert_trees_close(net(IDS, IMG), base)
  row_ids = [1, -1, 0]
  with bank.active(jnp.asarray(row_ids)):
    mixed = net(IDS, IMG)
  for row, i in enumerate(row_ids):
    want = base if i < 0 else alone[bank.names[i]]
    for layer, got, expect in zip(('embed', 'dense', 'einsum', 'attend',
                                   'conv'), mixed, want):
      axis = 1 if layer == 'einsum' else 0
      got = np.take(np.asarray(got), row, axis)
      expect = np.take(np.asarray(expect), row, axis)
      if i < 0:
        np.testing.assert_array_equal(got, expect, err_msg=layer)
      else:
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5,
                                   err_msg=layer)
  with pytest.raises(ValueError, match=(
      r"The nnx LoRA adapter of kernel '.*' holds a bank of 2 adapters, but "
      r'no bank selection is in effect. Load the bank with '
      r"peft.nnx.load_bank and call the model under that bank's active")):
    net(IDS, IMG)


def _dense_adapter():
  with peft.lora(rank=3) as report:
    params = nn.Dense(4).init(jax.random.key(0), X)['params']
  return peft.split_params(params).lora, report.specs


def test_nnx_bank_errors():
  net = _NnxNet(nnx.Rngs(0))
  bank = _bank()
  with pytest.raises(ValueError, match=(
      r'load_bank: the model has no LoRA layers. Adapt it first')):
    pnnx.load_bank(net, bank)
  pnnx.apply_lora(net, rank=2, alpha=4.0, targets=nnx.Linear,
                  rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=(
      r"The nnx LoRA adapter of kernel 'ir,ro->io' holds one adapter, but a "
      r'selection of a bank of 2 is in effect')):
    with bank.active('fr'):
      net(IDS, IMG)
  with pytest.raises(ValueError, match=(
      r"load_bank: the adapter 'dense/lora' has A \(5, 2\), B "
      r'\(2, 4\), scale 2.0, DoRA False; the bank needs \(5, 3\), \(3, 6\), '
      r'scale 1 and no DoRA')):
    pnnx.load_bank(net, bank)
  other = _NnxNet(nnx.Rngs(0))
  pnnx.apply_lora(other, rank=2, targets=nnx.Conv, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=(
      r"load_bank: the model's adapter 'conv/lora' is not in the bank \(it "
      r"holds \['lora'\]\)")):
    pnnx.load_bank(other, peft.AdapterBank.stack({'x': _dense_adapter()}))

  class Dense(nnx.Module):  # The bank's `dense` layer alone.
    def __init__(self):
      self.dense = nnx.Linear(5, 6, rngs=nnx.Rngs(0))
  only = Dense()
  pnnx.apply_lora(only, rank=3, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=(
      r"load_bank: the bank adapts \['conv/lora', 'einsum/lora', "
      r"'embed/lora', 'general/lora', 'moved/lora'\], which the model does "
      r'not')):
    pnnx.load_bank(only, bank)


def test_dora_adapters_are_disabled_exactly_and_refused_by_banks():
  model = nn.Dense(3)
  with peft.lora(rank=2, use_dora=True) as report:
    params = fixtures.random_params(model.init, jax.random.key(0), X[0])
  base = peft.split_params(params).original
  with peft.lora(rank=2, use_dora=True), peft.adapters_disabled():
    off = model.apply({'params': params}, X[0])
  np.testing.assert_array_equal(off, model.apply({'params': base}, X[0]))
  lora = peft.split_params(params).lora
  for call in (lambda: peft.AdapterBank.stack({'d': (lora, report.specs)}),
               lambda: peft.combine_adapters({'d': (lora, report.specs)})):
    with pytest.raises(ValueError, match=(
        r"adapter 'lora' of 'd' is DoRA \(use_dora\); its magnitude rescales "
        r'the whole kernel')):
      call()


def test_nnx_dora_layers_are_disabled_exactly():
  layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  base = layer(X)

  class Holder(nnx.Module):
    def __init__(self, layer):
      self.layer = layer
  model = Holder(layer)
  pnnx.apply_lora(model, rank=2, use_dora=True, b_init=nn.initializers.ones,
                  rngs=nnx.Rngs(1))
  assert not np.allclose(model.layer(X), base)
  with peft.adapters_disabled():
    np.testing.assert_array_equal(model.layer(X), base)
