"""The einsum-layer registry, the spec recorder and their errors."""

from flax import linen as nn
import jax
import jax.numpy as jnp
import pytest

import peft
from peft._core import einsum as _einsum
from peft._core import spec as _spec
from peft._linen import interceptors as _interceptors
from peft._linen import registry as _registry
from tests import fixtures


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
