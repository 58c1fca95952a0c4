"""DoRA (Liu et al. 2024): linen surgery, fuse/unfuse, files, errors.

Every value is checked against a direct computation on the dense kernel:
`V = W + scale * einsum(delta_str, A, B)`, its norm over the kernel axes the
output drops (written out by hand per layer below), `W' = m * V / ||V||`,
then the layer's einsum with `W'` plus the bias.
"""

import contextlib
import dataclasses
import functools
import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft
from tests import fixtures
from tests import helpers

D = 8
X3 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, D)),
                 jnp.float32)
X2 = X3[0]


class Experts(nn.Module):
  """An einsum with an axis shared by input, kernel and output (experts)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.broadcast_to(x[None], (3, *x.shape))  # (E, T, D)
    return nn.Einsum((3, D, 4), 'ETD,EDF->ETF', use_bias=False)(x)


# name -> (model, input, einsum of the kernel, kernel axes the norm sums).
# The norm axes are written here by hand: the test does not ask peft.
CASES = {
    'dense': (nn.Dense(3), X2, 'ti,io->to', (0,)),
    'dense_general': (nn.DenseGeneral((2, 3), axis=(-2, -1)), X3,
                      'btd,tdnh->bnh', (0, 1)),
    'einsum': (nn.Einsum((2, 4, D), 'BTNH,NHD->BTD'),
               X3.reshape(2, 5, 2, 4), 'BTNH,NHD->BTD', (0, 1)),
    'experts': (Experts(), X2, 'ETD,EDF->ETF', (1,)),
}


def _init(model, x, **options):
  with peft.lora(rank=2, use_dora=True, **options) as report:
    params = model.init(jax.random.key(1), x)['params']
  return params, report.specs


def _apply(model, params, x, **options):
  with peft.lora(rank=2, use_dora=True, **options):
    return model.apply({'params': params}, x)


def _random(params, seed=3):
  """Random A and B (B non-zero) and a positive random m."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    keys = [str(getattr(p, 'key', '')) for p in path]
    if not any(k == 'lora' or k.startswith('lora_') for k in keys):
      return leaf
    values = 0.3 * rng.standard_normal(leaf.shape)
    if keys[-1] == 'm':
      values = np.abs(leaf) * (1 + values)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, params)


def _module(params):
  """The module dict holding the kernel (the only one in these models)."""
  while 'kernel' not in params:
    (params,) = params.values()
  return params


def _direct(params, x, spec, eq, axes, *, m=None, kernel=None):
  """The DoRA layer by hand: einsum(eq, x, m * V / ||V||) + bias.

  `kernel` replaces the params' `W` (the dequantized kernel of a quantized
  base).
  """
  p = _module(params)
  w = np.asarray(p['kernel'] if kernel is None else kernel, np.float64)
  a, b = (np.asarray(p['lora'][k], np.float64) for k in 'ab')
  m = np.asarray(p['lora']['m'] if m is None else m, np.float64)
  v = w + spec.scale * np.einsum(spec.delta_str, a, b)
  norm = np.sqrt((v * v).sum(axis=axes, keepdims=True))
  x = np.asarray(x, np.float64)
  if eq == 'ETD,EDF->ETF':
    x = np.broadcast_to(x[None], (3, *x.shape))
  out = np.einsum(eq, x, np.expand_dims(m, axes) * v / norm)
  if 'bias' in p:
    out = out + np.asarray(p['bias'], np.float64)
  return out


@pytest.mark.parametrize('name', sorted(CASES))
def test_init_equals_the_base_model(name):
  model, x, _, axes = CASES[name]
  params, specs = _init(model, x)
  (spec,) = specs
  kernel = _module(params)['kernel']
  m = _module(params)['lora']['m']
  # m is ||W|| per output feature, shaped like the kernel's kept axes.
  np.testing.assert_allclose(
      m, np.sqrt((np.asarray(kernel) ** 2).sum(axis=axes)), rtol=1e-6)
  assert spec.use_dora and spec.magnitude_shape == m.shape
  base = model.apply({'params': peft.split_params(params).original}, x)
  np.testing.assert_allclose(_apply(model, params, x), base, rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize('name', sorted(CASES))
def test_output_equals_a_direct_dense_computation(name):
  model, x, eq, axes = CASES[name]
  params, (spec,) = _init(model, x, alpha=3.0)
  params = _random(params)
  want = _direct(params, x, spec, eq, axes)
  np.testing.assert_allclose(_apply(model, params, x, alpha=3.0), want,
                             rtol=1e-5, atol=1e-5)
  jitted = jax.jit(lambda p: _apply(model, p, x, alpha=3.0))(params)
  np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-5)


def test_conv_takes_dora():
  conv = nn.Conv(4, kernel_size=(3,))
  surgery = dict(rank=2, alpha=3.0, use_dora=True, targets=nn.Conv)
  with peft.lora(**surgery) as report:
    params = conv.init(jax.random.key(0), X3)['params']
  params = _random(params)
  (spec,) = report.specs
  assert spec.magnitude_axes == (2,)  # per output channel
  w = np.asarray(params['kernel'], np.float64)
  v = w + spec.scale * np.einsum(spec.delta_str, params['lora']['a'],
                                 params['lora']['b'])
  fused_w = np.asarray(params['lora']['m']) * v / np.sqrt(
      (v * v).sum(axis=(0, 1), keepdims=True))
  want = conv.apply({'params': {'kernel': fused_w.astype(np.float32),
                                'bias': params['bias']}}, X3)
  with peft.lora(**surgery):
    got = conv.apply({'params': params}, X3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_a_b_and_m_with_the_norm_held_constant():
  model, x, eq, axes = CASES['dense']
  params, (spec,) = _init(model, x)
  params = _random(params)
  probe = np.random.default_rng(4).standard_normal((5, 3))

  def loss(p):
    return jnp.sum(_apply(model, p, x) * probe)

  grads = jax.jit(jax.grad(loss))(params)['lora']

  def direct(a, b, m, *, constant_norm):
    v = params['kernel'] + spec.scale * a @ b
    norm = jnp.sqrt(jnp.sum(v * v, axis=0))
    if constant_norm:
      norm = jax.lax.stop_gradient(norm)
    return jnp.sum((x @ v * (m / norm)[None] + params['bias'][None])
                   * probe)

  lora = params['lora']
  want = jax.grad(direct, argnums=(0, 1, 2))(
      lora['a'], lora['b'], lora['m'], constant_norm=True)
  for got, expected in zip((grads['a'], grads['b'], grads['m']), want):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(got).max()) > 0
  # m's gradient by hand: d/dm of sum(probe * (x @ V) * m / ||V||).
  v = np.asarray(params['kernel']) + spec.scale * np.asarray(
      lora['a']) @ np.asarray(lora['b'])
  np.testing.assert_allclose(
      grads['m'], (probe * (np.asarray(x) @ v)).sum(0)
      / np.sqrt((v * v).sum(0)), rtol=1e-4)
  # Differentiating through the norm would give other A/B gradients.
  through = jax.grad(direct, argnums=0)(lora['a'], lora['b'], lora['m'],
                                        constant_norm=False)
  assert float(jnp.abs(through - grads['a']).max()) > 1e-3


@pytest.mark.parametrize('name', sorted(CASES))
def test_fuse_equals_unfused_and_unfuse_restores(name):
  model, x, _, _ = CASES[name]
  params, specs = _init(model, x)
  params = _random(params)
  fused = peft.fuse_params(params, specs)
  assert set(_module(fused)) <= {'kernel', 'bias'}
  plain = model.apply({'params': fused}, x)
  np.testing.assert_allclose(plain, _apply(model, params, x), rtol=1e-5,
                             atol=1e-5)
  lora = peft.split_params(params).lora
  helpers.assert_trees_close(peft.unfuse_params(fused, lora, specs), params,
                             rtol=1e-5, atol=1e-5)


def test_fuse_under_jit_and_its_error():
  model, x, _, _ = CASES['dense']
  params, specs = _init(model, x)
  params = _random(params)
  fused, error = jax.jit(lambda p: peft.fuse_params(
      p, specs, return_error=True))(params)
  np.testing.assert_allclose(
      fused['kernel'], peft.fuse_params(params, specs)['kernel'], rtol=1e-6)
  assert float(error) < 1e-6


def test_unfuse_needs_the_norm_fuse_recorded():
  model, x, _, _ = CASES['dense']
  params, specs = _init(model, x)
  params = _random(params)
  lora = peft.split_params(params).lora
  fused = peft.fuse_params(params, specs)
  copied = jax.tree.map(jnp.copy, fused)  # what a loaded checkpoint is
  with pytest.raises(ValueError, match=r"unfuse_params: kernel 'kernel' "
                     r"holds the DoRA adapter 'lora', whose unfuse needs the "
                     r"per-column norm .* Unfuse the params fuse returned"):
    peft.unfuse_params(copied, lora, specs)
  zeroed = {**lora, 'lora': {**lora['lora'],
                             'm': lora['lora']['m'].at[0].set(0.0)}}
  fused = peft.fuse_params(peft.merge_params(
      peft.split_params(params).original, zeroed), specs)
  with pytest.raises(ValueError, match=r"'lora' has 1 zero entries in its "
                     r"magnitude m.*Keep the base params"):
    peft.unfuse_params(fused, zeroed, specs)


def test_adapter_files_round_trip_and_refuse_the_other_kind(tmp_path):
  model, x, _, _ = CASES['einsum']
  params, specs = _init(model, x)
  params = _random(params)
  path = os.fspath(tmp_path / 'dora.safetensors')
  peft.save_adapters(path, params, specs)
  lora, loaded, _ = peft.load_adapters(path, expected=specs)
  helpers.assert_trees_close(lora, peft.split_params(params).lora)
  assert loaded == specs and loaded[0].use_dora
  assert loaded[0].to_json()['magnitude_axes'] == [2]
  with peft.lora(rank=2) as plain:
    lora_params = model.init(jax.random.key(1), x)['params']
  with pytest.raises(ValueError, match=r"adapter 'lora' in .* is DoRA "
                     r"\(use_dora=True\) but the model expects LoRA "
                     r"\(use_dora=False\)\. Adapt the model with "
                     r"use_dora=True"):
    peft.load_adapters(path, expected=plain.specs)
  lora_path = os.fspath(tmp_path / 'lora.safetensors')
  peft.save_adapters(lora_path, lora_params, plain.specs)
  with pytest.raises(ValueError, match=r"is LoRA \(use_dora=False\) but the "
                     r"model expects DoRA"):
    peft.load_adapters(lora_path, expected=specs)


def test_dora_params_with_lora_specs_are_refused():
  model, x, _, _ = CASES['dense']
  params, specs = _init(model, x)
  lora_specs = [dataclasses.replace(s, use_dora=False, magnitude_axes=())
                for s in specs]
  with pytest.raises(ValueError, match=r"adapter 'lora' is LoRA \(its spec "
                     r"says use_dora=False\) but the params hold keys "
                     r"\['a', 'b', 'm'\], with a DoRA magnitude m"):
    peft.fuse_params(params, lora_specs)


def test_rule_and_lora_module_take_use_dora():
  model, x, _, _ = CASES['dense']
  rule = peft.LoRARule(rank=2, use_dora=True)
  with peft.lora(rules=[rule]) as report:
    params = model.init(jax.random.key(1), x)['params']
  assert sorted(params['lora']) == ['a', 'b', 'm'] and report.specs[
      0].use_dora
  wrapped = peft.LoRA(model=model, rank=2, use_dora=True)
  assert sorted(wrapped.init(jax.random.key(1), x)['params']['lora']) == [
      'a', 'b', 'm']
  layer = peft.LoRADense(rank=2, use_dora=True, wrapped=nn.Dense(3))
  lp = layer.init(jax.random.key(1), x)['params']
  assert lp['lora']['m'].shape == (3,)


def test_magnitude_takes_the_kernels_partition_names():
  model = nn.Einsum(
      (2, 4, D), 'BTNH,NHD->BTD',
      kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                       ('heads', 'kv', 'embed')))
  with peft.lora(rank=2, use_dora=True):
    boxed = model.init(jax.random.key(0), CASES['einsum'][1])['params']
  assert boxed['lora']['m'].names == ('embed',)
  assert boxed['lora']['b'].names == (None, 'embed')


def test_errors_name_the_value_the_place_and_the_fix():
  with pytest.raises(ValueError, match=r"LoRA use_dora must be a bool; got "
                     r"'yes' at 'LoRAOptions'\. Pass e\.g\. use_dora=True"):
    peft.LoRAOptions(rank=2, use_dora='yes')
  with pytest.raises(ValueError, match=r"use_dora must be a bool; got 1 at "
                     r"'LoRARule'"):
    peft.LoRARule(rank=2, use_dora=1)
  embed = nn.Embed(5, 3)
  with pytest.raises(ValueError, match=r"DoRA \(use_dora=True\) does not "
                     r"support the Embed at .*Exclude the Embed"):
    with peft.lora(rank=2, use_dora=True, targets=nn.Embed):
      embed.init(jax.random.key(0), jnp.array([1, 2]))
  with pytest.raises(ValueError, match=r"LoRADenseAdapter at '<root>' has "
                     r"use_dora=True, but DoRA rescales the wrapped layer's "
                     r"output.*peft\.LoRADense\(\.\.\., use_dora=True\)"):
    peft.LoRADenseAdapter(rank=2, features=3, use_dora=True).init(
        jax.random.key(0), X2)


def test_spec_checks_the_magnitude_axes():
  spec = peft.AdapterSpec(
      path=('d',), layer_type='Dense', weight_name='kernel',
      adapter_name='lora', weight_shape=(4, 3), a_shape=(4, 2),
      b_shape=(2, 3), delta_str='ir,ro->io', einsum_str='...i,io->...o',
      rank=2, use_dora=True, magnitude_axes=(1,))
  assert peft.AdapterSpec.from_json(spec.to_json()) == spec
  assert spec.options.use_dora and spec.magnitude_shape == (3,)
  with pytest.raises(ValueError, match=r"magnitude_axes \(0,\) at 'd/lora' "
                     r"are not the kernel axes the output of einsum_str "
                     r"'\.\.\.i,io->\.\.\.o' keeps, \(1,\)"):
    dataclasses.replace(spec, magnitude_axes=(0,))
  with pytest.raises(ValueError, match=r"magnitude_axes must be \(\) \(the "
                     r"adapter is not DoRA\); got \(1,\) at 'd/lora'"):
    dataclasses.replace(spec, use_dora=False)
  with pytest.raises(ValueError, match=r"magnitude_axes must be ascending "
                     r"kernel axes in \[0, 2\); got \(5,\)"):
    dataclasses.replace(spec, magnitude_axes=(5,), einsum_str=None)


def test_functional_dora_against_numpy_and_its_gradients():
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
  adapter = peft.init_lora_adapter(w, 2, key=jax.random.key(0),
                                   use_dora=True)
  np.testing.assert_allclose(adapter['m'], np.linalg.norm(w, axis=0),
                             rtol=1e-6)
  np.testing.assert_allclose(peft.dora_linear(x, w, adapter), x @ w,
                             rtol=1e-5, atol=1e-6)
  adapter = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
             for k, v in adapter.items()}
  v = np.asarray(w) + 1.5 * np.asarray(adapter['A']) @ np.asarray(
      adapter['B'])
  norm = np.linalg.norm(v, axis=0)
  want = np.asarray(x) @ (np.asarray(adapter['m']) * v / norm)
  got = jax.jit(peft.dora_linear)(x, w, adapter, 3.0)  # scale 3 / 2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  merged, fused_norm = peft.merge_dora_weight(w, adapter, 3.0)
  np.testing.assert_allclose(merged, np.asarray(adapter['m']) * v / norm,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(x @ merged, got, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      peft.unmerge_dora_weight(merged, adapter, fused_norm, 3.0), w,
      rtol=1e-5, atol=1e-5)
  # m's gradient with the norm constant: sum_t (x @ V)[t] / ||V||.
  grad_m = jax.grad(lambda m: peft.dora_linear(
      x, w, {**adapter, 'm': m}, 3.0).sum())(adapter['m'])
  np.testing.assert_allclose(grad_m, (np.asarray(x) @ v).sum(0) / norm,
                             rtol=1e-5)


def test_functional_dora_errors():
  w = jnp.ones((4, 3))
  lora = {'A': jnp.ones((4, 1)), 'B': jnp.ones((1, 3))}
  with pytest.raises(ValueError, match=r"dora_linear: adapter must be a DoRA "
                     r"adapter \{'A', 'B', 'm'\}; got \['A', 'B'\]"
                     r".*use_dora=True\)"):
    peft.dora_linear(jnp.ones((1, 4)), w, lora)
  with pytest.raises(ValueError, match=r"merge_dora_weight: weight \(4, 3\) "
                     r"does not fit A \(4, 1\), B \(1, 3\) and m \(2,\)"):
    peft.merge_dora_weight(w, {**lora, 'm': jnp.ones(2)})
  dora = {**lora, 'm': jnp.array([1., 0., 1.])}
  merged, norm = peft.merge_dora_weight(w, dora)
  with pytest.raises(ValueError, match=r"unmerge_dora_weight: m has 1 zero "
                     r"entries.*Keep the original weight"):
    peft.unmerge_dora_weight(merged, dora, norm)
  with pytest.raises(ValueError, match=r"unmerge_dora_weight: norm has shape "
                     r"\(2,\); expected \(3,\)"):
    peft.unmerge_dora_weight(merged, dora, jnp.ones(2))
  with pytest.raises(ValueError, match=r"dora_linear: x \(1, 3\) does not "
                     r"fit the weight \(4, 3\)"):
    peft.dora_linear(jnp.ones((1, 3)), w, {**lora, 'm': jnp.ones(3)})
  with pytest.raises(ValueError, match=r"use_dora must be a bool; got 'no' "
                     r"at 'init_lora_adapter'"):
    peft.init_lora_adapter(w, 1, key=jax.random.key(0), use_dora='no')


def test_init_dora_magnitudes_starts_from_the_pretrained_kernels():
  model, x, _, _ = CASES['dense_general']
  params, specs = _init(model, x)
  rng = np.random.default_rng(9)
  pretrained = jax.tree.map(
      lambda t: jnp.asarray(rng.standard_normal(t.shape), t.dtype),
      peft.split_params(params).original)
  merged = peft.merge_params(pretrained, peft.split_params(params).lora)
  ready = peft.init_dora_magnitudes(merged, specs)
  np.testing.assert_allclose(
      ready['lora']['m'],
      np.sqrt((np.asarray(pretrained['kernel']) ** 2).sum(axis=(0, 1))),
      rtol=1e-6)
  np.testing.assert_allclose(_apply(model, ready, x),
                             model.apply({'params': pretrained}, x),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"init_dora_magnitudes: the params "
                     r"hold adapter 'lora' but no AdapterSpec describes it"):
    peft.init_dora_magnitudes(merged, [])


@pytest.mark.parametrize('name', ['scanned', 'custom'])
def test_stacked_and_custom_einsum_layers(name):
  # nn.scan stacks m like A and B; a model's own einsum layer (several
  # kernels in one scope, one with an output axis before the inputs') is
  # read from its registered equation.
  model = fixtures.Scanned() if name == 'scanned' else fixtures.CustomModel()
  x = fixtures.features()
  with peft.lora(rank=2, alpha=3.0, use_dora=True) as report:
    params = model.init(jax.random.key(0), x)['params']
  base = model.apply({'params': peft.split_params(params).original}, x)
  np.testing.assert_allclose(_apply(model, params, x, alpha=3.0), base,
                             rtol=1e-5, atol=1e-5)
  if name == 'scanned':
    assert params['layers']['up']['lora']['m'].shape == (3, D)
  else:
    gating = next(s for s in report.specs if s.weight_name == 'gating_einsum')
    assert gating.magnitude_axes == (0, 2)  # C and F: kept, D normed over
  params = _random(params)
  fused = peft.fuse_params(params, report.specs)
  np.testing.assert_allclose(model.apply({'params': fused}, x),
                             _apply(model, params, x, alpha=3.0), rtol=1e-5,
                             atol=1e-5)
  helpers.assert_trees_close(
      peft.unfuse_params(fused, peft.split_params(params).lora,
                         report.specs), params, rtol=1e-5, atol=1e-5)


def test_pissa_on_dora_adapters_keeps_the_magnitude():
  model, x, _, _ = CASES['dense']
  params, specs = _init(model, x)
  pissa = peft.init_from_kernels(params, specs)  # V = residual + sAB = W
  np.testing.assert_allclose(_apply(model, pissa, x), _apply(model, params, x),
                             rtol=1e-5, atol=1e-5)
  trained = _random(pissa)
  lora, new_specs = peft.adapters_for_original_base(
      peft.split_params(trained).lora, peft.split_params(pissa).lora, specs)
  helpers.assert_trees_close(lora['lora']['m'], trained['lora']['m'])
  original = peft.merge_params(peft.split_params(params).original, lora)
  np.testing.assert_allclose(
      model.apply({'params': peft.fuse_params(original, new_specs)}, x),
      _apply(model, trained, x), rtol=1e-5, atol=1e-5)


class OddBias(nn.Module):
  """A registered einsum layer whose bias is not over its output features."""

  shape: tuple[int, ...] = (D, 3)

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param('w', nn.initializers.normal(), self.shape)
    return jnp.einsum(eqn, x, w) + self.param('bias', nn.initializers.zeros,
                                              (1, 1))


peft.register_einsum_layer(OddBias, weight_name='w')


def test_a_bias_not_over_the_output_features_is_refused():
  with pytest.raises(ValueError, match=r"DoRA at 'OddBias': the bias of "
                     r"OddBias has shape \(1, 1\), but DoRA adds the bias "
                     r"after rescaling and needs it over the output features "
                     r"\(3,\).*Use LoRA \(use_dora=False\)"):
    with peft.lora(rank=2, use_dora=True):
      jax.eval_shape(lambda: OddBias().init(jax.random.key(0), 'td,dh->th',
                                            X2))


class MisnamedKernel(nn.Module):
  """Registered with weight_name='w' but keeping its kernel as 'kernel'."""

  shape: tuple[int, ...] = (D, 3)

  @nn.compact
  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.param('kernel', nn.initializers.normal(),
                                         self.shape))


peft.register_einsum_layer(MisnamedKernel, weight_name='w')


def test_dora_needs_the_registered_kernel():
  with pytest.raises(ValueError, match=r"DoRA at 'MisnamedKernel' found no "
                     r"kernel 'w' in the scope of MisnamedKernel\. Register "
                     r"the layer with its kernel's param name"):
    with peft.lora(rank=2, use_dora=True):
      jax.eval_shape(lambda: MisnamedKernel().init(
          jax.random.key(0), 'td,dh->th', X2))


def test_dropout_applies_to_the_lora_branch_input_only():
  model, x, _, _ = CASES['dense']
  params, _ = _init(model, x)
  rngs = {'dropout': jax.random.key(5)}

  def run(p):
    with peft.lora(rank=2, use_dora=True, dropout=0.5):
      return model.apply({'params': p}, x, rngs=rngs)

  # B = 0: the rescaled base path sees x itself, so dropout changes nothing.
  base = model.apply({'params': peft.split_params(params).original}, x)
  np.testing.assert_allclose(run(params), base, rtol=1e-6, atol=1e-6)
  trained = _random(params)
  assert float(jnp.abs(run(trained) - _apply(model, trained, x)).max()) > 1e-3


# QDoRA: DoRA over a quantized base. `W` in `V = W + scale * BA` is the
# kernel the base computes with: the dequantized QuantizedArray (Int
# layers, `peft.quantized`) or `simulate_quantize(W)` (QAT).

# name -> method: each layer kind over a 4-bit or an 8-bit base.
QUANTIZED = {'dense': 'int8', 'dense_general': 'nf4', 'einsum': 'int4',
             'experts': 'nf4'}


@contextlib.contextmanager
def _qdora_surgery(*, lora_outside=False, simulate=None):
  """`peft.quantized()` (or simulated) with DoRA, in either order."""
  quant = (peft.quantized() if simulate is None
           else peft.simulate_quantization(simulate))
  lora = peft.lora(rank=2, use_dora=True)
  outer, inner = (lora, quant) if lora_outside else (quant, lora)
  with outer as first, inner as second:
    yield first if lora_outside else second


def _nested(name):
  """CASES[name]'s model inside a parent (surgery leaves the root alone)."""
  model, x, _, _ = CASES[name]
  return nn.Sequential([model]), x


@functools.cache  # each test only reads them
def _qdora(name):
  """(QDoRA params over the quantized pretrained base, specs, that base)."""
  model, x = _nested(name)
  pretrained = fixtures.random_params(model.init, jax.random.key(5), x)
  qbase = peft.quantize(pretrained, method=QUANTIZED[name],
                        axes=peft.quantization_axes(model, x))
  with _qdora_surgery() as report:
    fresh = model.init(jax.random.key(1), x)['params']
  params = peft.init_dora_magnitudes(
      peft.merge_params(qbase, peft.split_params(fresh).lora), report.specs)
  return params, report.specs, qbase


def _q_apply(name, params, **surgery):
  model, x = _nested(name)
  with _qdora_surgery(**surgery):
    return model.apply({'params': params}, x)


def _dequantized_kernel(params):
  return np.asarray(peft.dequantize(_module(params)['kernel']), np.float64)


@pytest.mark.parametrize('name', sorted(QUANTIZED))
def test_qdora_starts_at_the_quantized_base(name):
  _, _, _, axes = CASES[name]
  model, x = _nested(name)
  params, specs, qbase = _qdora(name)
  assert isinstance(_module(params)['kernel'], peft.QuantizedArray)
  # m is the norm of the kernel the base computes with: the dequantized one.
  w = _dequantized_kernel(params)
  np.testing.assert_allclose(_module(params)['lora']['m'],
                             np.sqrt((w * w).sum(axis=axes)), rtol=1e-6)
  with peft.quantized():
    base = model.apply({'params': qbase}, x)
  for lora_outside in (False, True):
    np.testing.assert_allclose(
        _q_apply(name, params, lora_outside=lora_outside), base, rtol=1e-5,
        atol=1e-6)
  assert [s.use_dora for s in specs] == [True]


@pytest.mark.parametrize('name', sorted(QUANTIZED))
def test_qdora_equals_dora_on_the_dequantized_kernel_by_hand(name):
  _, x, eq, axes = CASES[name]
  params, (spec,), _ = _qdora(name)
  params = _random(params)
  want = _direct(params, x, spec, eq, axes,
                 kernel=_dequantized_kernel(params))
  np.testing.assert_allclose(_q_apply(name, params), want, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(_q_apply(name, params, lora_outside=True), want,
                             rtol=1e-5, atol=1e-5)
  jitted = jax.jit(lambda p: _q_apply(name, p))(params)
  np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-5)


def test_qdora_over_simulated_quantization_and_its_magnitudes():
  _, _, eq, axes = CASES['einsum']
  model, x = _nested('einsum')
  pretrained = fixtures.random_params(model.init, jax.random.key(5), x)
  with _qdora_surgery(simulate='int4') as report:
    fresh = model.init(jax.random.key(1), x)['params']
  merged = peft.merge_params(pretrained, peft.split_params(fresh).lora)
  params = peft.init_dora_magnitudes(merged, report.specs, simulate='int4')
  # QAT computes with the simulated kernel; its contracted axes are N, H.
  w = np.asarray(peft.simulate_quantize(_module(pretrained)['kernel'],
                                        'int4', axis_to_reduce=(0, 1)),
                 np.float64)
  np.testing.assert_allclose(_module(params)['lora']['m'],
                             np.sqrt((w * w).sum(axis=axes)), rtol=1e-6)
  with peft.simulate_quantization('int4'):
    base = model.apply({'params': pretrained}, x)
  np.testing.assert_allclose(_q_apply('einsum', params, simulate='int4'),
                             base, rtol=1e-5, atol=1e-6)
  # Without `simulate`, m is the float kernel's norm: the start is off.
  float_m = _module(peft.init_dora_magnitudes(merged, report.specs))
  assert float(jnp.abs(float_m['lora']['m']
                       - _module(params)['lora']['m']).max()) > 1e-3
  params = _random(params)
  (spec,) = report.specs
  np.testing.assert_allclose(_q_apply('einsum', params, simulate='int4'),
                             _direct(params, x, spec, eq, axes, kernel=w),
                             rtol=1e-5, atol=1e-5)


def test_qlora_layers_take_use_dora():
  dense = nn.Dense(3)
  layer = peft.QLoRADense(rank=2, use_dora=True, wrapped=dense,
                          quant_method='nf4')
  params = layer.init(jax.random.key(0), X2)['params']
  base, lora = peft.split_params(params)
  qbase = peft.quantize(base, method='nf4')
  qparams = peft.merge_params(qbase, lora)
  # Initialised over the simulated NF4 kernel, m already fits the stored
  # NF4 one (simulate_quantize equals dequantize(quantize_array)).
  np.testing.assert_allclose(
      layer.apply({'params': qparams}, X2),
      peft.IntDense(wrapped=dense).apply({'params': qbase}, X2), rtol=1e-6,
      atol=1e-6)
  qparams = _random(qparams)
  _, _, eq, axes = CASES['dense']
  spec = peft.AdapterSpec(
      path=(), layer_type='Dense', weight_name='kernel', adapter_name='lora',
      weight_shape=(D, 3), a_shape=(D, 2), b_shape=(2, 3),
      delta_str='ir,ro->io', rank=2, use_dora=True, magnitude_axes=(1,))
  np.testing.assert_allclose(
      layer.apply({'params': qparams}, X2),
      _direct(qparams, X2, spec, eq, axes,
              kernel=_dequantized_kernel(qparams)), rtol=1e-5, atol=1e-5)


def test_fuse_into_quantized_folds_the_magnitude_and_reports_its_error():
  _, _, _, axes = CASES['dense_general']
  model, x = _nested('dense_general')
  params, (spec,), qbase = _qdora('dense_general')
  params = _random(params)
  fused, errors = peft.fuse_into_quantized(params, [spec])
  new = _module(fused)['kernel']
  assert set(_module(fused)) == {'kernel', 'bias'}
  assert (new.method, new.axes) == (_module(qbase)['kernel'].method,
                                    _module(qbase)['kernel'].axes)
  # The exact fused kernel by hand: m * V / ||V|| of the dequantized W.
  lora = _module(params)['lora']
  w = _dequantized_kernel(params)
  v = w + spec.scale * np.einsum(spec.delta_str, *(
      np.asarray(lora[k], np.float64) for k in 'ab'))
  exact = np.expand_dims(np.asarray(lora['m'], np.float64), axes) * v / (
      np.sqrt((v * v).sum(axis=axes, keepdims=True)))
  got = np.asarray(peft.dequantize(new), np.float64)
  err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
  np.testing.assert_allclose(float(errors[spec.key]), err, rtol=1e-4)
  assert 0 < err < 0.15  # NF4 rounding of the new kernel
  with peft.quantized():
    served = model.apply({'params': fused}, x)
  adapted = _q_apply('dense_general', params)
  assert float(jnp.linalg.norm(served - adapted)
               / jnp.linalg.norm(adapted)) < 2 * err
  # A float DoRA kernel fuses as fuse_params does, with no error entry.
  float_params, float_specs = _init(model, x)
  fused, errors = peft.fuse_into_quantized(float_params, float_specs)
  helpers.assert_trees_close(fused, peft.fuse_params(float_params,
                                                     float_specs))
  assert errors == {}


def test_qdora_files_round_trip_and_train(tmp_path):
  params, specs, qbase = _qdora('dense')
  model, x = _nested('dense')
  target = jnp.sin(jnp.arange(15.0).reshape(5, 3))

  def loss(adapters):
    with _qdora_surgery():
      y = model.apply({'params': peft.merge_params(qbase, adapters)}, x)
    return jnp.mean((y - target) ** 2)

  tx = optax.adam(3e-2)
  adapters = peft.split_params(params).lora
  state = tx.init(adapters)

  @jax.jit
  def step(adapters, state):
    value, grads = jax.value_and_grad(loss)(adapters)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state, value, grads

  first = None
  for _ in range(20):
    adapters, state, value, grads = step(adapters, state)
    first = value if first is None else first
  assert float(value) < 0.7 * float(first)
  # A, B and m all learn (B starts at zero, so A's first gradient is zero).
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  trained = peft.merge_params(qbase, adapters)
  path = os.fspath(tmp_path / 'qdora.safetensors')
  peft.save_adapters(path, trained, specs)
  loaded, loaded_specs, _ = peft.load_adapters(path, expected=specs)
  assert loaded_specs == specs
  helpers.assert_trees_close(loaded, adapters, rtol=0, atol=0)
  np.testing.assert_array_equal(
      _q_apply('dense', peft.merge_params(qbase, loaded)),
      _q_apply('dense', trained))


def test_init_dora_magnitudes_simulate_errors():
  params, specs, _ = _qdora('dense')
  with pytest.raises(TypeError, match=r"init_dora_magnitudes: kernel "
                     r"'layers_0/kernel' is a INT8 QuantizedArray, but "
                     r"simulate='int8' asks for a float kernel.*Leave "
                     r"simulate unset"):
    peft.init_dora_magnitudes(params, specs, simulate='int8')
  with pytest.raises(ValueError, match=r"Unknown quantization method 'int3'"
                     r" at 'init_dora_magnitudes simulate'. Pass one of"):
    peft.init_dora_magnitudes(params, specs, simulate='int3')
