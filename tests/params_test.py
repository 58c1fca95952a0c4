"""split_params / merge_params."""

import functools

from flax import core as flax_core
import hypothesis
from hypothesis import strategies as st
import jax
import pytest

from peft._core import params as _params

split_params = _params.split_params
merge_params = _params.merge_params


def test_split_gemma_example_and_exact_round_trip():
  w, b, a, bb, other = (object() for _ in range(5))
  params = {'dense': {'kernel': w, 'bias': b, 'lora': {'a': a, 'b': bb}},
            'other': other}
  original, lora = split_params(params)
  assert isinstance(original, dict) and isinstance(lora, dict)
  assert original == {'dense': {'kernel': w, 'bias': b}, 'other': other}
  assert lora == {'dense': {'lora': {'a': a, 'b': bb}}}
  merged = merge_params(original, lora)
  assert merged == params
  assert merged['dense']['lora']['a'] is a  # leaves are not copied


def test_split_returns_named_tuple():
  out = split_params({'x': {'kernel': 1, 'lora': {'a': 2, 'b': 3}}})
  assert isinstance(out, _params.SplittedParams)
  assert out.original == {'x': {'kernel': 1}}
  assert out.lora == {'x': {'lora': {'a': 2, 'b': 3}}}


def test_split_leaves_no_empty_branches():
  params = {'a': {'b': {'kernel': 1}, 'c': {'kernel': 2, 'lora': {'a': 3}}},
            'd': {'e': {'f': {'scale': 4}}}}
  original, lora = split_params(params)
  assert lora == {'a': {'c': {'lora': {'a': 3}}}}
  assert original == {'a': {'b': {'kernel': 1}, 'c': {'kernel': 2}},
                      'd': {'e': {'f': {'scale': 4}}}}


def test_split_keeps_empty_dicts_of_the_input_for_an_exact_round_trip():
  params = {'empty': {}, 'x': {'kernel': 1, 'lora_w': {'a': 2}}}
  original, lora = split_params(params)
  assert original == {'empty': {}, 'x': {'kernel': 1}}
  assert merge_params(original, lora) == params


def test_split_named_adapters_of_a_shared_scope():
  params = {'mlp': {'gating': 1, 'linear': 2, 'lora_gating': {'a': 3},
                    'lora_linear': {'a': 4}, 'loraish': 5}}
  original, lora = split_params(params)
  assert original == {'mlp': {'gating': 1, 'linear': 2, 'loraish': 5}}
  assert lora == {'mlp': {'lora_gating': {'a': 3}, 'lora_linear': {'a': 4}}}


def test_split_and_merge_frozen_dict():
  params = flax_core.freeze({'x': {'kernel': 1, 'lora': {'a': 2}}})
  original, lora = split_params(params)
  assert isinstance(original, flax_core.FrozenDict)
  assert isinstance(lora, flax_core.FrozenDict)
  merged = merge_params(original, lora)
  assert isinstance(merged, flax_core.FrozenDict)
  assert merged == params


def test_split_root_adapter():
  original, lora = split_params({'kernel': 1, 'lora': {'a': 2}})
  assert (original, lora) == ({'kernel': 1}, {'lora': {'a': 2}})


def test_gemma_peft_layout_round_trips():
  # gm.nn.LoRA nests the adapter of gemma's Einsum in its own submodule, and
  # the shared-scope feed-forward names it after the kernel.
  params = {'attn': {'q_einsum': {'w': 1, '_LoRAEinsum_0': {
      'lora': {'a': 2, 'b': 3}}}},
            'mlp': {'gating_einsum': 4, '_LoRAEinsum_gating_einsum': {
                'lora': {'a': 5, 'b': 6}}}}
  original, lora = split_params(params)
  assert original == {'attn': {'q_einsum': {'w': 1}},
                      'mlp': {'gating_einsum': 4}}
  assert lora == {'attn': {'q_einsum': {'_LoRAEinsum_0': {
      'lora': {'a': 2, 'b': 3}}}}, 'mlp': {'_LoRAEinsum_gating_einsum': {
          'lora': {'a': 5, 'b': 6}}}}
  assert merge_params(original, lora) == params


def test_merge_module_missing_from_base_still_raises():
  with pytest.raises(ValueError, match=r"module at 'a/x' that the base"):
    merge_params({'a': {'y': {'kernel': 1}}},
                 {'a': {'x': {'inner': {'lora': {'a': 1}}}}})


@pytest.mark.parametrize('fn', [split_params,
                                functools.partial(merge_params, {})])
def test_non_mapping_raises(fn):
  with pytest.raises(TypeError, match=r"must be a nested dict .*got list"):
    fn([1, 2])


@pytest.mark.parametrize('original, lora, match', [
    ({'x': {'kernel': 1}}, {'y': {'lora': {'a': 1}}},
     r"module at 'y' .*lack.*\['x'\]"),
    ({'a': {'x': {'kernel': 1}}}, {'a': {'y': {'lora': 1}}},
     r"module at 'a/y'"),
    ({'x': {'kernel': 1, 'lora': 2}}, {'x': {'lora': 3}},
     r"adapter branch 'x/lora' is in both trees"),
    ({'x': 1}, {'x': {'lora': 3}}, r"'x' is a leaf in the base params"),
    ({'x': {'kernel': 1}}, {'x': {'kernel': 5}},
     r"non-adapter leaf at 'x/kernel'"),
])
def test_merge_misaligned_trees_raise(original, lora, match):
  with pytest.raises(ValueError, match=match):
    merge_params(original, lora)


_KEYS = st.sampled_from(['kernel', 'bias', 'scale', 'lora', 'lora_w', 'q'])


def _trees():
  """Nested dicts of ints; every dict with an adapter also has a base leaf."""
  leaf = st.integers(0, 9)

  def extend(children):
    return st.dictionaries(_KEYS, children, max_size=4).map(
        lambda d: {**d, 'w0': 0} if any(_params.is_adapter_key(k)
                                        for k in d) else d)

  return st.recursive(leaf, extend, max_leaves=12).filter(
      lambda t: isinstance(t, dict))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(_trees())
def test_merge_of_split_is_identity(params):
  original, lora = split_params(params)
  assert merge_params(original, lora) == params
  for path, _ in jax.tree_util.tree_flatten_with_path(original)[0]:
    assert not any(_params.is_adapter_key(k.key) for k in path)

  def no_empty(tree):
    return all(v != {} and (not isinstance(v, dict) or no_empty(v))
               for k, v in tree.items() if not _params.is_adapter_key(k))
  assert no_empty(lora)
