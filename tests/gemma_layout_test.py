"""gemma.peft's param layout, without gemma installed.

`gm.nn.LoRA` wraps gemma's own Einsum in a module that does not share the
layer's scope, so each adapter sits one level down
(`q_einsum/_LoRAEinsum_0/lora/{a,b}`, or `mlp/_LoRAEinsum_gating_einsum/lora`
in the shared-scope feed-forward), and it calls the adapter directly. The
wrapper below is built the same way; tests/integration/ runs gemma's own.
"""

import dataclasses
import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from tests import fixtures
from tests.helpers import assert_trees_close

X = fixtures.features()


class _NestedLoRAEinsum(nn.Module):
  """A foreign LoRA wrapper: own scope, calls peft's adapter directly."""

  _: dataclasses.KW_ONLY
  rank: int
  wrapped: nn.Module

  @nn.compact
  def __call__(self, eqn, x):
    adapter = peft.LoRAEinsumAdapter(name='lora', rank=self.rank,
                                     einsum_str=eqn, shape=self.wrapped.shape)
    return self.wrapped(eqn, x) + adapter(x)


def _replace(module, *, rank):
  if isinstance(module, fixtures.MyEinsum):
    name = (None if module.weight_name == 'w'
            else f'_LoRAEinsum_{module.weight_name}')
    return _NestedLoRAEinsum(name=name, rank=rank, wrapped=module)
  return module


def _foreign_surgery(rank=2):
  return peft.ModuleInterceptor(functools.partial(_replace, rank=rank))


@pytest.fixture(scope='module')
def adapted():
  model = fixtures.CustomModel()
  with peft.recording_adapters() as specs, _foreign_surgery():
    params = model.init(jax.random.key(0), X)['params']
  return model, fixtures.randomize_adapters(params), dict(specs)


def test_foreign_wrapper_layout_and_self_recorded_specs(adapted):
  _, params, specs = adapted
  assert set(params['proj']) == {'w', '_NestedLoRAEinsum_0'}
  assert set(params['mlp']) == {'gating_einsum', 'linear',
                                '_LoRAEinsum_gating_einsum',
                                '_LoRAEinsum_linear'}
  assert sorted(specs) == ['mlp/_LoRAEinsum_gating_einsum/lora',
                           'mlp/_LoRAEinsum_linear/lora',
                           'proj/_NestedLoRAEinsum_0/lora']
  gating = specs['mlp/_LoRAEinsum_gating_einsum/lora']
  assert (gating.path, gating.weight_name, gating.adapter_name) == (
      ('mlp',), 'gating_einsum', '_LoRAEinsum_gating_einsum/lora')


def test_split_merge_fuse_unfuse_save_on_foreign_layout(adapted, tmp_path):
  model, params, specs = adapted
  specs = list(specs.values())
  original, lora = peft.split_params(params)
  assert set(original['proj']) == {'w'}
  assert_trees_close(peft.merge_params(original, lora), params)

  with _foreign_surgery():
    adapted_out = model.apply({'params': params}, X)
  fused = peft.fuse_params(params, specs)
  np.testing.assert_allclose(model.apply({'params': fused}, X), adapted_out,
                             rtol=1e-5, atol=1e-5)
  # Independently: proj's delta is A @ B for the 'btd,de->bte' kernel.
  a = params['proj']['_NestedLoRAEinsum_0']['lora']['a']
  b = params['proj']['_NestedLoRAEinsum_0']['lora']['b']
  np.testing.assert_allclose(fused['proj']['w'],
                             params['proj']['w'] + jnp.einsum('dr,re->de',
                                                               a, b),
                             rtol=1e-6, atol=1e-6)
  assert_trees_close(peft.unfuse_params(fused, lora, specs), params,
                     atol=1e-6)

  path = tmp_path / 'foreign.safetensors'
  peft.save_adapters(path, params, specs)
  loaded = peft.load_adapters(path, expected=specs)
  assert_trees_close(loaded.lora, lora)


@pytest.mark.parametrize('adapter, match', [
    (peft.LoRADenseAdapter(rank=3),
     r'LoRADenseAdapter needs features .*got 0.*features=dense.features'),
    (peft.LoRAEinsumAdapter(rank=3, shape=(4, 2)),
     r"needs einsum_str .*got ''.*einsum_str="),
    (peft.LoRAEinsumAdapter(rank=3, einsum_str='bi,io->bo'),
     r'needs shape .*got \(\).*shape=layer.shape'),
    (peft.LoRADenseGeneralAdapter(rank=3),
     r'needs features .*got \(\).*features=layer.features'),
])
def test_adapter_without_a_required_field_is_a_clear_error(adapter, match):
  # gemma's README writes LoRADenseAdapter(rank=3) and so on.
  with pytest.raises(ValueError, match=match):
    adapter.init(jax.random.key(0), jnp.ones((2, 4)))
