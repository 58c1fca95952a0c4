"""The einsum-layer registry, the spec recorder and their errors."""

import collections
import dataclasses

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft._core import einsum as _einsum
from peft._core import spec as _spec
from peft._linen import interceptors as _interceptors
from peft._linen import registry as _registry
from tests import fixtures
from tests import helpers


class TwoArgs(nn.Module):
  @nn.compact
  def __call__(self, x, eqn):
    return jnp.einsum(eqn, x, self.param('kernel', nn.initializers.ones,
                                         (x.shape[-1], 3)))


class OneArg(nn.Module):
  def __call__(self, x):
    return x


def test_registration_with_named_arguments():
  kind = _registry.register_einsum_layer(
      TwoArgs, weight_name='kernel', einsum_str_arg='eqn', inputs_arg='x',
      shape_attr='shape')
  x = jnp.ones((2, 4))
  module = TwoArgs()
  eq, inputs = kind.read_call(module, (x,), {'eqn': 'bi,io->bo'})
  assert eq == 'bi,io->bo' and inputs is x


@pytest.mark.parametrize('args, match', [
    (dict(module_type=int), 'expects a flax.linen Module class; got'),
    (dict(module_type=OneArg), r"takes \['x'\]; the defaults"),
    (dict(module_type=fixtures.MyEinsum, einsum_str_arg='equation'),
     r"MyEinsum.__call__ has no argument 'equation'; it takes "
     r"\['eqn', 'x'\]"),
])
def test_registration_errors(args, match):
  with pytest.raises(TypeError, match=match):
    _registry.register_einsum_layer(**args)


def test_register_kind_type_is_checked():
  with pytest.raises(TypeError, match='expects an EinsumLayerKind; got 3'):
    _registry.register_einsum_kind(3)


def test_custom_layer_kind_describes_its_call():
  module = fixtures.MyEinsum((4, 5), weight_name='gate')
  call = _registry.einsum_kind_of(module).describe(
      module, ('btd,de->bte', jnp.ones((1, 2, 4))), {})
  assert (call.weight_name, call.adapter_name, call.weight_shape) == (
      'gate', 'lora_gate', (4, 5))
  assert call.equation.einsum_str == 'btd,de->bte'


def test_custom_layer_kind_names_the_kernel_as_describe_does():
  module = fixtures.MyEinsum((4, 5), weight_name='gate')
  kind = _registry.einsum_kind_of(module)
  call = kind.describe(module, ('btd,de->bte', jnp.ones((1, 2, 4))), {})
  assert kind.weight_name_of(module) == call.weight_name == 'gate'


# (layer, input shape, call kwargs, equation, kernel shape); no biases, so
# the output is exactly the einsum.
BUILT_IN_CALLS = {
    'dense': (lambda: nn.Dense(3, use_bias=False), (2, 5, 4), {},
              '...i,io->...o', (4, 3)),
    'dense_general': (lambda: nn.DenseGeneral((2, 3), use_bias=False),
                      (2, 5, 4), {}, 'abc,cde->abde', (4, 2, 3)),
    'dense_general_two_axes': (
        lambda: nn.DenseGeneral(3, axis=(-2, -1), use_bias=False),
        (2, 5, 4), {}, 'abc,bcd->ad', (5, 4, 3)),
    'einsum': (lambda: nn.Einsum((4, 2, 3), 'btd,dnh->btnh', use_bias=False),
               (2, 5, 4), {}, 'btd,dnh->btnh', (4, 2, 3)),
    'einsum_str_at_call': (lambda: nn.Einsum((4, 3), use_bias=False),
                           (2, 4), {'einsum_str': 'bd,dh->bh'}, 'bd,dh->bh',
                           (4, 3)),
}


@pytest.mark.parametrize('name', BUILT_IN_CALLS)
def test_built_in_kinds_describe_the_einsum_the_layer_computes(name):
  make, shape, kwargs, einsum_str, weight_shape = BUILT_IN_CALLS[name]
  layer, x = make(), fixtures.features(shape)
  kind = _registry.einsum_kind_of(layer)
  call = kind.describe(layer, (x,), kwargs)
  assert (call.equation.einsum_str, call.weight_name, call.weight_shape,
          call.adapter_name) == (einsum_str, 'kernel', weight_shape, 'lora')
  assert call.inputs is x and kind.weight_name_of(layer) == 'kernel'
  variables = layer.init(jax.random.key(0), x, **kwargs)
  want = jnp.einsum(einsum_str, x, variables['params']['kernel'])
  helpers.assert_trees_close(layer.apply(variables, x, **kwargs), want,
                             rtol=1e-6)


@pytest.fixture
def calls(monkeypatch):
  """Counts `EinsumEquation.parse` and `dense_general_call` calls."""
  seen = collections.Counter()
  parse = _einsum.EinsumEquation.parse.__func__
  dense_general_call = _einsum.dense_general_call

  def counting_parse(cls, *args, **kwargs):
    seen['parse'] += 1
    return parse(cls, *args, **kwargs)

  def counting_dense_general_call(**kwargs):
    seen['dense_general_call'] += 1
    return dense_general_call(**kwargs)

  monkeypatch.setattr(_einsum.EinsumEquation, 'parse',
                      classmethod(counting_parse))
  monkeypatch.setattr(_einsum, 'dense_general_call',
                      counting_dense_general_call)
  return seen


def test_dense_general_describe_parses_nothing(calls):
  layer = nn.DenseGeneral((2, 3), axis=(-2, -1))
  kind = _registry.einsum_kind_of(layer)
  call = kind.describe(layer, (jnp.ones((2, 5, 4)),), {})
  assert isinstance(kind, _registry.DenseGeneralKind)
  assert calls == {'dense_general_call': 1}
  assert call.equation == _einsum.EinsumEquation.parse('abc,bcde->ade')
  assert call.weight_shape == (5, 4, 2, 3)


def test_call_reading_kind_parses_each_call_once(calls):
  layer = nn.Einsum((4, 3), 'bd,dh->bh')
  kind = _registry.einsum_kind_of(layer)
  kind.describe(layer, (jnp.ones((2, 4)),), {})
  assert isinstance(kind, _registry.CallReadingKind)
  assert calls == {'parse': 1}


def test_einsum_layer_kind_is_abstract():
  with pytest.raises(TypeError, match='abstract class EinsumLayerKind'):
    _registry.EinsumLayerKind(module_type=nn.Dense)

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class NamesOnly(_registry.EinsumLayerKind):
    def weight_name_of(self, module):
      return 'kernel'

  with pytest.raises(TypeError, match='abstract class NamesOnly'):
    NamesOnly(module_type=nn.Dense)


class MatMul(nn.Module):
  """`x @ w` without an equation argument: served by a hand-written kind."""

  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.normal(),
                   (x.shape[-1], self.features))
    return x @ w


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatMulKind(_registry.EinsumLayerKind):
  """The two methods of the protocol, nothing else."""

  def weight_name_of(self, module):
    return 'w'

  def describe(self, module, args, kwargs):
    (x,) = args
    return _registry.LayerCall(
        equation=_einsum.EinsumEquation.parse('...i,io->...o'), inputs=x,
        weight_name=self.weight_name_of(module),
        weight_shape=(x.shape[-1], module.features), adapter_name='lora')


_registry.register_einsum_kind(MatMulKind(module_type=MatMul))


def test_a_hand_written_kind_serves_lora_surgery_and_fuse():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return MatMul(3, name='mm')(x)

  model, x = Model(), fixtures.features((2, 4))
  surgery = peft.lora(rank=2, targets='.*')
  with surgery as report:
    params = model.init(jax.random.key(0), x)['params']
  assert jax.tree.map(jnp.shape, params) == {
      'mm': {'w': (4, 3), 'lora': {'a': (4, 2), 'b': (2, 3)}}}
  params = fixtures.randomize_adapters(params)
  with surgery:
    adapted = model.apply({'params': params}, x)
  fused = helpers.independently_fused(params, report.specs)
  plain = model.apply({'params': fused}, x)
  helpers.assert_trees_close(adapted, plain, rtol=1e-5, atol=1e-6)
  assert float(np.abs(adapted - x @ params['mm']['w']).max()) > 0.1


def test_conflicting_reports_for_one_adapter_are_an_error():
  spec = _spec.AdapterSpec(
      path=('d',), layer_type='Dense', weight_name='kernel',
      adapter_name='lora', weight_shape=(2, 2), a_shape=(2, 1),
      b_shape=(1, 2), delta_str='ir,ro->io', rank=1)
  with _spec.recording_adapters() as seen:
    _spec.record_adapter(spec)
    _spec.record_adapter(spec)  # the same layout again is fine
    other = spec.__class__(**{**spec.__dict__, 'rank': 2, 'a_shape': (2, 2),
                              'b_shape': (2, 2)})
    with pytest.raises(ValueError, match="adapter at 'd/lora' was called "
                       'with two different layouts'):
      _spec.record_adapter(other)
  assert list(seen) == ['d/lora']


def test_delta_partition_names_length_is_checked():
  with pytest.raises(ValueError, match=r"partition names \('x',\) but the "
                     "delta equation 'ir,ro->io' gives it 2 axes"):
    _einsum.delta_partition_names('ir,ro->io', ('x',))


def test_interceptor_state_outside_its_context_is_an_error():
  surgery = peft.ModuleInterceptor(lambda m: m)
  with pytest.raises(RuntimeError, match='outside its context'):
    surgery._state()  # pylint: disable=protected-access


def test_suspended_hides_interceptors():
  seen = []

  class Spy(peft.Interceptor):
    def interceptor(self, next_fun, args, kwargs, context):
      seen.append(context.method_name)
      return next_fun(*args, **kwargs)

  with Spy():
    with _interceptors.suspended():
      nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 2)))
    assert seen == []
    nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 2)))
  assert '__call__' in seen
