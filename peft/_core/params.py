"""Split and merge the adapter branches of LoRA param trees.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) keeps a frozen kernel
and learns low-rank factors A and B. In a param tree the adapters sit beside
the kernel they adapt, under a key `'lora'` or `'lora_<weight name>'`:

    {'dense': {'kernel': W, 'bias': c, 'lora': {'a': A, 'b': B}}}

`split_params`/`merge_params` separate and rejoin those branches, a drop-in
superset of `gemma.peft`'s: no empty `{}` left behind, an exact round trip,
and misaligned trees rejected with the first bad path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from flax import core as flax_core
import jax

Params = Mapping[str, Any]


class SplittedParams(NamedTuple):
  """The two halves returned by `split_params`.

  A named tuple: unpack it, or pass it whole back to `merge_params`.

  Example:
    >>> import peft
    >>> params = {'dense': {'kernel': 1, 'lora': {'a': 2, 'b': 3}}}
    >>> parts = peft.split_params(params)
    >>> parts.original, parts.lora
    ({'dense': {'kernel': 1}}, {'dense': {'lora': {'a': 2, 'b': 3}}})
    >>> peft.merge_params(*parts) == params
    True

  Attributes:
    original: the tree without adapter branches.
    lora: the adapter branches only, at their original paths.
  """

  original: Params
  lora: Params


def is_adapter_key(key: Any) -> bool:
  """Whether a param-tree key names an adapter branch.

  Example:
    >>> [is_adapter_key(k) for k in ('lora', 'lora_w', 'kernel', 'loraw')]
    [True, True, False, False]
  """
  return isinstance(key, str) and (key == 'lora' or key.startswith('lora_'))


def is_adapter_module(tree: Any) -> bool:
  """Whether `tree` is a module holding adapter branches and nothing else.

  Example:
    >>> is_adapter_module({'lora': {'a': 1, 'b': 2}})
    True
    >>> is_adapter_module({'kernel': 1, 'lora': {'a': 1, 'b': 2}})
    False
  """
  return isinstance(tree, Mapping) and bool(tree) and all(
      is_adapter_key(k) for k in tree)


def _holds_weights(module: Params) -> bool:
  return any(not isinstance(v, Mapping) for v in module.values())


def fmt_path(path: Sequence[Any]) -> str:
  """A param or module path as users read it in messages: 'a/b/c'.

  The one path format of peft's messages (linen, nnx and param trees).

  Example:
    >>> fmt_path(('decoder', 'layers', 0, 'q')), fmt_path(())
    ('decoder/layers/0/q', '<root>')
  """
  return shown_path('/'.join(str(p) for p in path))


def shown_path(path: str) -> str:
  """A path string 'a/b/c' as messages show it: '<root>' when empty.

  Example:
    >>> shown_path('mlp/up'), shown_path('')
    ('mlp/up', '<root>')
  """
  return path or '<root>'


def keypath_str(keypath: Sequence[Any]) -> str:
  """A `jax.tree_util` key path as 'a/b/c' (the keys, no brackets).

  Example:
    >>> import jax
    >>> [keypath_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
    ...     {'dense': {'kernel': 1, 'bias': 2}})]
    ['dense/bias', 'dense/kernel']
  """
  return jax.tree_util.keystr(tuple(keypath), simple=True, separator='/')


def module_path(module: Any) -> str:
  """'a/b/c' for a bound linen module; '' for the root or an unbound one.

  Example:
    >>> from flax import linen as nn
    >>> module_path(nn.Dense(2))
    ''
  """
  if getattr(module, 'scope', None) is None:
    return ''
  return '/'.join(module.path)


def check_mapping(tree: Any, name: str) -> None:
  if not isinstance(tree, Mapping):
    raise TypeError(
        f'{name} must be a nested dict of params (dict or FrozenDict); got '
        f'{type(tree).__name__} {tree!r:.80}. Pass e.g. variables["params"].'
    )


def to_dict(tree: Params) -> dict[str, Any]:
  """A copy of `tree` whose mappings (FrozenDicts too) are all plain dicts,
  so it can be edited in place; the leaves are the same objects."""
  return {k: to_dict(v) if isinstance(v, Mapping) else v
          for k, v in tree.items()}


def like(template: Any, tree: dict[str, Any]) -> Params:
  """Returns `tree` as a FrozenDict when `template` is one."""
  if isinstance(template, flax_core.FrozenDict):
    return flax_core.freeze(tree)
  return tree


def split_params(params: Params) -> SplittedParams:
  """Splits a tree into base params and adapter branches.

  Branches whose key is `'lora'` or starts with `'lora_'` go to `lora`,
  everything else to `original`. Neither tree gains empty `{}` branches, and
  `merge_params(*split_params(p)) == p` exactly (same leaves, same nesting).
  A FrozenDict in gives FrozenDicts out.

  Example:
    >>> params = {'dense': {'kernel': 1, 'lora': {'a': 2, 'b': 3}},
    ...           'norm': {'scale': 4}}
    >>> original, lora = split_params(params)
    >>> original
    {'dense': {'kernel': 1}, 'norm': {'scale': 4}}
    >>> lora
    {'dense': {'lora': {'a': 2, 'b': 3}}}
    >>> merge_params(original, lora) == params
    True

  Args:
    params: a nested dict of params holding adapter branches.

  Returns:
    `SplittedParams(original, lora)`.

  A module that holds adapter branches and nothing else (gemma.peft's
  wrappers nest their adapter so: `{'q_einsum': {'w': W, '_LoRAEinsum_0':
  {'lora': {...}}}}`) goes to `lora` whole; `merge_params` puts it back
  inside a module that holds weights.

  Raises:
    TypeError: `params` is not a mapping.
  """
  check_mapping(params, 'params')

  def split(tree: Params, path: tuple[str, ...]):
    original, lora = {}, {}
    for key, value in tree.items():
      if is_adapter_key(key):
        lora[key] = value
      elif isinstance(value, Mapping):
        sub_original, sub_lora = split(value, (*path, key))
        if sub_original or not sub_lora:  # keeps `{}` that were in `params`
          original[key] = sub_original
        if sub_lora:
          lora[key] = sub_lora
      else:
        original[key] = value
    return original, lora

  original, lora = split(params, ())
  return SplittedParams(like(params, original), like(params, lora))


def merge_params(original: Params, lora: Params) -> Params:
  """Inverse of `split_params`: puts the adapter branches back.

  Example:
    >>> merge_params({'dense': {'kernel': 1}},
    ...              {'dense': {'lora': {'a': 2, 'b': 3}}})
    {'dense': {'kernel': 1, 'lora': {'a': 2, 'b': 3}}}

  Args:
    original: the base params (no adapter branches where `lora` has some).
    lora: a tree holding only adapter branches, at the paths of the modules
      they adapt.

  Returns:
    The merged tree (a FrozenDict if `original` is one).

  Raises:
    TypeError: either tree is not a mapping.
    ValueError: the trees do not line up: a module path of `lora` is missing
      from `original` or is a leaf there, `lora` holds a non-adapter leaf, or
      an adapter key is already in `original`. The first bad path is named.
  """
  check_mapping(original, 'original')
  check_mapping(lora, 'lora')

  def merge(orig: Params, extra: Params, path: tuple[str, ...]):
    out = dict(orig)
    for key, value in extra.items():
      where = fmt_path((*path, key))
      if is_adapter_key(key):
        if key in orig:
          raise ValueError(
              f'merge_params: adapter branch {where!r} is in both trees. '
              'Pass the base params from split_params(...).original, '
              'without adapters.'
          )
        out[key] = value
      elif not isinstance(value, Mapping):
        raise ValueError(
            f'merge_params: the lora tree holds a non-adapter leaf at '
            f'{where!r} (value {value!r:.60}). It must hold only branches '
            "named 'lora' or 'lora_*'; pass split_params(...).lora."
        )
      elif key not in orig and is_adapter_module(value) and _holds_weights(
          orig):
        # A module of adapters only, inside the layer whose weights it
        # adapts (see split_params).
        out[key] = value
      elif key not in orig:
        raise ValueError(
            f'merge_params: the lora tree has a module at {where!r} that '
            f'the base params lack (they have {sorted(orig)!r} at '
            f'{fmt_path(path)!r}). The adapters were made for another model or '
            'path; check the module names.'
        )
      elif not isinstance(orig[key], Mapping):
        raise ValueError(
            f'merge_params: {where!r} is a leaf in the base params but a '
            'sub-tree in the lora tree. The trees come from different models.'
        )
      else:
        out[key] = merge(orig[key], value, (*path, key))
    return out

  return like(original, merge(original, lora, ()))
