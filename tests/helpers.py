"""Shared checks: the one tree comparison helper, the independent fuse."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import peft


def assert_trees_close(actual: Any, expected: Any, *, rtol: float = 0.0,
                       atol: float = 0.0) -> None:
  """Same structure first, then every leaf close (exact by default)."""
  a_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(actual)]
  e_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(expected)]
  assert jax.tree.structure(actual) == jax.tree.structure(expected), (
      f'tree structures differ:\n{a_paths}\nvs\n{e_paths}')
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual),
                          jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype, f'{jax.tree_util.keystr(path)}: dtype '\
        f'{a.dtype} != {e.dtype}'
    np.testing.assert_allclose(
        a.astype(np.float64) if a.dtype.kind == 'V' or 'bfloat' in str(
            a.dtype) else a,
        e.astype(np.float64) if e.dtype.kind == 'V' or 'bfloat' in str(
            e.dtype) else e,
        rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def independently_fused(params, specs, *, kept_axes=None):
  """`W + scale * einsum(delta_str, A, B)` per adapted kernel, plain jnp.

  The reference for fuse and adapted outputs: it shares no code with peft's
  delta computation. Stacked layers (a leading layer axis on W, A and B, from
  `nn.scan`/`nn.vmap`) go through `jnp.einsum`'s ellipsis. A DoRA adapter
  makes the kernel `m * V / ||V||` of that `V`, the norm summed over the
  kernel axes `kept_axes(spec)` (written by the test) does not name.
  """
  original, lora = peft.split_params(params)
  out = jax.tree.map(lambda x: x, original)
  for spec in specs:
    node, adapter = out, lora
    for key in spec.path:
      node = node[key]
    for key in spec.adapter_path:
      adapter = adapter[key]
    lhs, weights = spec.delta_str.split('->')
    a_axes, b_axes = lhs.split(',')
    delta = jnp.einsum(f'...{a_axes},...{b_axes}->...{weights}',
                       adapter['a'], adapter['b'])
    kernel = node[spec.weight_name] + spec.scale * delta
    if spec.use_dora:
      n_stack = kernel.ndim - len(spec.weight_shape)
      kept = kept_axes(spec)
      summed = tuple(n_stack + i for i in range(len(spec.weight_shape))
                     if i not in kept)
      norm = jnp.sqrt(jnp.sum(kernel * kernel, axis=summed, keepdims=True))
      kernel = jnp.expand_dims(adapter['m'], summed) * kernel / norm
    node[spec.weight_name] = kernel
  return out


def padded_forward(pretrained, length: int):
  """`ids -> logits` of a loaded model, every call padded to `length`.

  One padded length means one XLA compile for all of a golden test's
  forwards; the model is causal, so logits before the padding do not
  depend on it.
  """
  model = pretrained.model
  run = jax.jit(lambda params, tokens: model.apply({'params': params},
                                                  tokens))

  def logits(ids):
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(ids)] = ids
    return run(pretrained.params, jnp.asarray(padded))[0, :len(ids)]

  return logits


def perplexity(logits, ids) -> float:
  """exp of the mean next-token negative log-likelihood of `ids`."""
  logprobs = jax.nn.log_softmax(logits[:-1], axis=-1)
  nll = -jnp.mean(logprobs[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])])
  return float(jnp.exp(nll))
