"""peft on gemma's own model classes (the `gemma` package, not our copy).

A tiny config of gemma's `gm.nn.Transformer` runs the same code path as
`Gemma3_270M` (setup-built blocks, `__getattr__`, a property, `__call__`
under flax's `nn.jit`, gemma's own `Einsum(eqn, x)` layer with configurable
weight names, a shared-scope feed-forward) in seconds; one test runs the
real `Gemma3_270M` definition. Every check compares values: against the
plain model, against an independent `W + scale * A @ B`, round trips.
"""

import dataclasses

import flax
from gemma import gm
from gemma import peft as gemma_peft
from gemma.gm.nn import _lora as gm_lora
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft
from tests import fixtures
from tests.helpers import assert_trees_close
from tests.helpers import independently_fused

# What a user writes once to teach peft gemma's own einsum layer.
peft.register_einsum_layer(gm.nn.Einsum, weight_name=lambda m: m.weight_name)

TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 8)),
                     jnp.int32)
# Multiples of 64 along every contraction: whole NF4 blocks, no short one.
TINY = dataclasses.replace(
    gm.nn.Gemma3_270M.config, num_embed=64, embed_dim=64, hidden_dim=128,
    num_heads=2, head_dim=64, num_kv_heads=1, sliding_window_size=4,
    attention_types=gm.nn.config.make_attention_layers_types(
        (gm.nn.config.AttentionType.LOCAL_SLIDING,
         gm.nn.config.AttentionType.GLOBAL), num_layers=2))
LAYERS = ('attn/q_einsum', 'attn/kv_einsum', 'attn/attn_vec_einsum')


def _key(seed):
  # XLA:CPU compiles an init with rbg keys ~3x faster than with threefry;
  # which random bits the tests get does not matter.
  return jax.random.key(seed, impl='rbg')


def _model():
  return gm.nn.Transformer(config=TINY, dtype=jnp.float32)


def _logits(params, surgery=None):
  model = _model()
  if surgery is None:
    return model.apply({'params': params}, TOKENS).logits
  with surgery:
    return model.apply({'params': params}, TOKENS).logits


def _empty_dicts(tree, path=()):
  if not isinstance(tree, dict):
    return []
  if not tree:
    return [path]
  return [p for k, v in tree.items() for p in _empty_dicts(v, (*path, k))]


@pytest.fixture(scope='module')
def base():
  return _model().init(_key(0), TOKENS)['params']


@pytest.fixture(scope='module')
def surgery():
  return peft.lora(rank=4, alpha=8.0, targets=gm.nn.Einsum)


@pytest.fixture(scope='module')
def adapted(base, surgery):
  """(base + random adapters, specs) for every gemma Einsum."""
  with surgery as report:
    fresh = _model().init(_key(1), TOKENS)['params']
  params = peft.merge_params(base, peft.split_params(fresh).lora)
  return params, report.specs


def test_every_gemma_einsum_is_adapted(adapted):
  _, specs = adapted
  keys = sorted(s.key for s in specs)
  assert keys == sorted(
      [f'layer_{i}/{p}/lora_w' for i in range(2) for p in LAYERS]
      + [f'layer_{i}/mlp/lora_{w}' for i in range(2)
         for w in ('gating_einsum', 'linear')])


def test_init_output_equals_the_plain_model_bit_for_bit(base, adapted,
                                                        surgery):
  params, _ = adapted
  assert_trees_close(_logits(params, surgery), _logits(base))


def test_random_adapters_equal_base_plus_independent_einsum(adapted,
                                                            surgery):
  params, specs = adapted
  params = fixtures.randomize_adapters(params, scale=0.05)
  adapted_logits = _logits(params, surgery)
  expected = _logits(independently_fused(params, specs))
  np.testing.assert_allclose(adapted_logits, expected, rtol=1e-4, atol=1e-4)
  fused = peft.fuse_params(params, specs)
  np.testing.assert_allclose(_logits(fused), adapted_logits, rtol=1e-4,
                             atol=1e-4)
  lora = peft.split_params(params).lora
  assert_trees_close(peft.unfuse_params(fused, lora, specs), params,
                     atol=1e-6)


def test_split_merge_save_load_round_trips(adapted, tmp_path):
  params, specs = adapted
  params = fixtures.randomize_adapters(params, scale=0.05)
  original, lora = peft.split_params(params)
  assert_trees_close(peft.merge_params(original, lora), params)
  assert not _empty_dicts(original) and not _empty_dicts(lora)
  path = tmp_path / 'gemma.safetensors'
  peft.save_adapters(path, params, specs)
  loaded = peft.load_adapters(path, expected=specs)
  assert_trees_close(loaded.lora, lora)


def test_trace_order_plain_then_adapted_then_plain(base, surgery):
  plain = _logits(base)  # nn.jit has traced the plain model
  with peft.lora(rank=4, targets=gm.nn.Einsum) as report:
    fresh = _model().init(_key(1), TOKENS)['params']
  assert len(report.specs) == 10
  assert 'lora_w' in fresh['layer_0']['attn']['q_einsum']
  again = _model().init(_key(1), TOKENS)['params']
  assert 'lora_w' not in again['layer_0']['attn']['q_einsum']
  params = fixtures.randomize_adapters(
      peft.merge_params(base, peft.split_params(fresh).lora))
  assert_trees_close(_logits(params), plain)  # no surgery: adapters unused
  with pytest.raises(ValueError, match='matched no layer'):
    with peft.lora(rank=4, targets='no/such/layer'):
      _model().apply({'params': base}, TOKENS)


def test_lora_wrapper_module_on_gemma(base, adapted):
  params, _ = adapted
  model = peft.LoRA(model=_model(), rank=4, alpha=8.0,
                    targets=gm.nn.Einsum)
  assert model.config is TINY  # attribute access is forwarded
  assert_trees_close(model.apply({'params': params}, TOKENS).logits,
                     _logits(base))


def test_a_few_jitted_steps_lower_the_loss(adapted, surgery):
  params, _ = adapted
  # gemma's init gives near-zero tied embeddings (logits ~ 0); a pretrained
  # model has larger ones, through which the adapters can move the logits.
  original = fixtures.random_params(_model().init, _key(0), TOKENS,
                                    scale=0.2)
  lora = peft.split_params(params).lora
  targets = jnp.roll(TOKENS, -1, axis=1)

  def loss(lora):
    with surgery:
      logits = _model().apply({'params': peft.merge_params(original, lora)},
                              TOKENS).logits
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  tx = optax.adam(0.1)
  opt_state = tx.init(lora)

  @jax.jit
  def step(lora, opt_state):
    value, grads = jax.value_and_grad(loss)(lora)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, value

  losses = []
  for _ in range(20):
    lora, opt_state, value = step(lora, opt_state)
    losses.append(float(value))
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize('method, tolerance', [('int8', 0.05), ('nf4', 0.3)])
def test_qlora_on_gemma(base, method, tolerance):
  axes = peft.quantization_axes(_model(), TOKENS)
  assert len(axes) == 10
  qbase = peft.quantize(base, method=method, axes=axes)
  with peft.quantized(method), peft.lora(rank=4, targets=gm.nn.Einsum) as r:
    fresh = _model().init(_key(1), TOKENS)['params']
  assert len(r.specs) == 10
  params = peft.merge_params(qbase, peft.split_params(fresh).lora)
  with peft.quantized(method), peft.lora(rank=4, targets=gm.nn.Einsum):
    qlogits = _model().apply({'params': params}, TOKENS).logits
  with peft.quantized(method):
    plain_q = _model().apply({'params': qbase}, TOKENS).logits
  assert_trees_close(qlogits, plain_q)  # B = 0 over the quantized base
  float_logits = _logits(base)
  error = jnp.linalg.norm(qlogits - float_logits) / jnp.linalg.norm(
      float_logits)
  assert float(error) < tolerance


def test_qlora_on_a_mesh_on_gemma(base):
  # Fully sharded data parallel as a gemma user would write it (gemma's
  # params carry no axis names): each weight's embed axis over 8 devices.
  # NF4: packed codes and block scales (tests/sharding_test.py has int8
  # and int4 too).
  method = 'nf4'
  mesh = jax.make_mesh((8,), ('fsdp',),
                       axis_types=(jax.sharding.AxisType.Auto,))

  def fsdp(leaf):
    spec = [None] * leaf.ndim
    if TINY.embed_dim in leaf.shape:
      spec[list(leaf.shape).index(TINY.embed_dim)] = 'fsdp'
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  qbase = peft.quantize(base, method=method,
                        axes=peft.quantization_axes(_model(), TOKENS))
  with peft.quantized(method), peft.lora(rank=4, targets=gm.nn.Einsum):
    fresh = _model().init(_key(1), TOKENS)['params']
  lora = fixtures.randomize_adapters(peft.split_params(fresh).lora,
                                     scale=0.05)

  @jax.jit
  def logits_and_grads(lora, qbase):
    def total(lora):
      with peft.quantized(method), peft.lora(rank=4, targets=gm.nn.Einsum):
        logits = _model().apply({'params': peft.merge_params(qbase, lora)},
                                TOKENS).logits
      return jnp.sum(logits ** 2), logits
    return jax.grad(total, has_aux=True)(lora)[::-1]

  want = logits_and_grads(lora, qbase)
  placed = jax.device_put(
      qbase, peft.quantized_shardings(jax.tree.map(fsdp, base), qbase))
  got = logits_and_grads(lora, placed)
  assert_trees_close(got, want, rtol=1e-5, atol=1e-5)
  # Each device holds an eighth of the codes: q_einsum (N, D, H) splits D.
  q = placed['layer_0']['attn']['q_einsum']['w']
  assert isinstance(q, peft.QuantizedArray)
  assert q.values.addressable_shards[0].data.shape[1] == TINY.embed_dim // 8


# The kernel axes each DoRA norm keeps, by hand from gemma's equations
# (kept: the axes the output names), not asked of peft.
DORA_KEPT = {
    'q_einsum': (0, 2),  # BTD,NDH->BTNH keeps N, H
    'kv_einsum': (0, 1, 3),  # BSD,CKDH->CBSKH keeps C, K, H
    'attn_vec_einsum': (2,),  # BTNH,NHD->BTD keeps D
    'gating_einsum': (0, 1),  # ...F,NHF->...NH keeps N, H
    'linear': (1,),  # ...H,HF->...F keeps F
}


def _kept(spec):
  # Attention einsums hold their kernel as 'w'; the MLP names its two.
  return DORA_KEPT[spec.path[-1] if spec.weight_name == 'w'
                   else spec.weight_name]


def _dora_params(base, surgery):
  """Fresh DoRA adapters over `base` (any params), m from base's kernels."""
  with surgery as report:
    fresh = _model().init(_key(1), TOKENS)['params']
  params = peft.init_dora_magnitudes(
      peft.merge_params(base, peft.split_params(fresh).lora), report.specs)
  return params, report.specs


def _randomized_dora(params):
  """Random A and B; m moved off its start by a few percent."""
  noisy = fixtures.randomize_adapters(params, scale=0.05)

  def m_near_start(path, new, old):
    if getattr(path[-1], 'key', None) == 'm':
      return old * (1 + new)
    return new

  return jax.tree_util.tree_map_with_path(m_near_start, noisy, params)


def test_dora_on_gemma_equals_an_independent_computation(base):
  surgery = peft.lora(rank=4, alpha=8.0, targets=gm.nn.Einsum, use_dora=True)
  params, specs = _dora_params(base, surgery)
  assert len(specs) == 10
  assert all(s.magnitude_axes == _kept(s) for s in specs)
  np.testing.assert_allclose(_logits(params, surgery), _logits(base),
                             rtol=1e-5, atol=1e-5)
  params = _randomized_dora(params)
  adapted = _logits(params, surgery)
  expected = _logits(independently_fused(params, specs, kept_axes=_kept))
  np.testing.assert_allclose(adapted, expected, rtol=1e-4, atol=1e-4)
  fused = peft.fuse_params(params, specs)
  np.testing.assert_allclose(_logits(fused), adapted, rtol=1e-4, atol=1e-4)
  lora = peft.split_params(params).lora
  assert_trees_close(peft.unfuse_params(fused, lora, specs), params,
                     atol=1e-5)


def test_qdora_on_gemma(base):
  axes = peft.quantization_axes(_model(), TOKENS)
  qbase = peft.quantize(base, method='nf4', axes=axes)
  dora = peft.lora(rank=4, alpha=8.0, targets=gm.nn.Einsum, use_dora=True)

  def qdora_logits(params):
    with peft.quantized('nf4'):
      return _logits(params, dora)

  params, specs = _dora_params(qbase, _Both(peft.quantized('nf4'), dora))
  with peft.quantized('nf4'):
    plain_q = _logits(qbase)
  np.testing.assert_allclose(qdora_logits(params), plain_q, rtol=1e-5,
                             atol=1e-5)
  params = _randomized_dora(params)
  adapted = qdora_logits(params)
  # QDoRA is float DoRA over the dequantized kernels.
  lora = peft.split_params(params).lora
  np.testing.assert_allclose(
      adapted, _logits(peft.merge_params(peft.dequantize(qbase), lora), dora),
      rtol=1e-4, atol=1e-4)
  fused, errors = peft.fuse_into_quantized(params, specs)
  # Each error is the re-quantized kernel's against the exact DoRA kernel.
  exact = independently_fused(peft.merge_params(peft.dequantize(qbase), lora),
                              specs, kept_axes=_kept)
  assert sorted(errors) == sorted(s.key for s in specs)
  for spec in specs:
    want, got = exact, peft.dequantize(fused)
    for key in (*spec.path, spec.weight_name):
      want, got = want[key], got[key]
    err = jnp.linalg.norm(got - want) / jnp.linalg.norm(want)
    np.testing.assert_allclose(errors[spec.key], err, rtol=1e-3)
    assert 0 < float(err) < 0.15  # one more NF4 rounding
  with peft.quantized('nf4'):
    served = _logits(fused)
  # Ten re-rounded NF4 kernels; test_qlora_on_gemma allows NF4 0.3 too.
  assert float(jnp.linalg.norm(served - adapted)
               / jnp.linalg.norm(adapted)) < 0.3


class _Both:
  """Two surgeries entered as one (`with a, b:`), yielding the second's."""

  def __init__(self, outer, inner):
    self._outer, self._inner = outer, inner

  def __enter__(self):
    self._outer.__enter__()
    return self._inner.__enter__()

  def __exit__(self, *exc):
    self._inner.__exit__(*exc)
    return self._outer.__exit__(*exc)


def _gm_lora_params(base):
  model = gm.nn.LoRA(rank=4, model=_model(), dtype=jnp.float32)
  with peft.recording_adapters() as specs:
    fresh = model.init(_key(1), TOKENS)['params']
  params = fixtures.randomize_adapters(
      peft.merge_params(base, peft.split_params(fresh).lora), scale=0.05)
  return model, params, dict(specs)


def test_split_merge_on_gemma_peft_own_layout(base):
  model, params, specs = _gm_lora_params(base)
  assert not specs  # gemma's own adapters record nothing
  q = params['layer_0']['attn']['q_einsum']
  assert set(q) == {'w', '_LoRAEinsum_0'}
  original, lora = peft.split_params(params)
  assert_trees_close(original, base)
  assert_trees_close(peft.merge_params(original, lora), params)
  # gemma.peft's own split gives the same halves.
  # gemma.peft's own split holds the same arrays but leaves `{}` residue
  # where its adapter modules were; ours leaves none.
  theirs = gemma_peft.split_params(params)
  assert _empty_dicts(flax.core.unfreeze(theirs.original))
  assert not _empty_dicts(original)
  for mine, other in ((original, theirs.original), (lora, theirs.lora)):
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(other),
                    strict=True):
      np.testing.assert_array_equal(a, b)
  del model


def test_gm_lora_with_peft_substituted_fuses_and_saves(base, monkeypatch,
                                                       tmp_path):
  # Code written against gemma.peft runs after changing only the import.
  monkeypatch.setattr(gm_lora, 'peft', peft)
  model, params, specs = _gm_lora_params(base)
  assert len(specs) == 10
  spec = specs['layer_0/attn/q_einsum/_LoRAEinsum_0/lora']
  assert (spec.path, spec.weight_name) == (('layer_0', 'attn', 'q_einsum'),
                                           'w')
  adapted_logits = model.apply({'params': params}, TOKENS).logits
  specs = list(specs.values())
  fused = peft.fuse_params(params, specs)
  np.testing.assert_allclose(_logits(fused), adapted_logits, rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(
      _logits(independently_fused(params, specs)), adapted_logits,
      rtol=1e-4, atol=1e-4)
  lora = peft.split_params(params).lora
  assert_trees_close(peft.unfuse_params(fused, lora, specs), params,
                     atol=1e-6)
  path = tmp_path / 'gm_lora.safetensors'
  peft.save_adapters(path, params, specs)
  assert_trees_close(peft.load_adapters(path, expected=specs).lora, lora)


def test_gemma3_270m_definition():
  model = gm.nn.Gemma3_270M(dtype=jnp.float32)
  tokens = TOKENS[:1, :4]
  base = fixtures.random_params(model.init, _key(0), tokens,
                                scale=0.02)
  surgery = peft.lora(rank=4, targets=gm.nn.Einsum)
  with surgery as report:
    shapes = jax.eval_shape(model.init, _key(0), tokens)['params']
  assert len(report.specs) == 18 * 5
  lora = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      peft.split_params(shapes).lora)
  assert peft.count_params(lora)[0] == 857_088  # gemma's own count, rank 4
  params = peft.merge_params(base, lora)
  plain = model.apply({'params': base}, tokens).logits
  with surgery:
    assert_trees_close(model.apply({'params': params}, tokens).logits,
                       plain)
  params = fixtures.randomize_adapters(params, scale=0.01)
  with surgery:
    adapted_logits = model.apply({'params': params}, tokens).logits
  fused = peft.fuse_params(params, report.specs)
  np.testing.assert_allclose(model.apply({'params': fused}, tokens).logits,
                             adapted_logits, rtol=1e-3, atol=1e-3)
