"""`peft.models._scan_loop.scan`, the scanning Decoder's loop.

Compared with `jax.lax.scan` of the same step: values and reverse-mode
gradients under jit, in float32 and bfloat16, with remat, with some params
not differentiated and some integer; and the reason it exists, checked in
the compiled program: no bfloat16 stack is converted whole to float32.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft
from peft import models
from peft._cli import train
from peft.models import _scan
from peft.models import _scan_loop
from tests import helpers

STEPS, WIDTH = 3, 8


def _step(x, params, g, consts):
  """A step reading float, bfloat16 and integer params and a const."""
  shift, = consts
  w = params['w'].astype(x.dtype)
  scale = params['scale'].astype(x.dtype) * (params['q'].astype(x.dtype) + 1)
  b = params['b'].astype(x.dtype)
  return jnp.tanh(x @ w * scale[None] + b + (shift * g).astype(x.dtype))


def _inputs(dtype):
  rng = np.random.default_rng(0)
  stacked = {
      'w': jnp.asarray(0.5 * rng.standard_normal((STEPS, WIDTH, WIDTH)),
                       dtype),
      # (1, WIDTH) a step: no float32 leaf has a bfloat16 leaf's shape.
      'b': jnp.asarray(rng.standard_normal((STEPS, 1, WIDTH)), jnp.float32),
      'scale': jnp.asarray(rng.uniform(0.5, 1.5, (STEPS, WIDTH)), dtype),
      'q': jnp.asarray(rng.integers(-3, 3, (STEPS, WIDTH)), jnp.int8),
  }
  x = jnp.asarray(rng.standard_normal((2, WIDTH)), jnp.float32)
  return x, stacked, (jnp.float32(0.25),)


def _reference(x, stacked, consts):
  def body(x, slices):
    params, g = slices
    return _step(x, params, g, consts), None
  return jax.lax.scan(body, x, (stacked, jnp.arange(STEPS)))[0]


def _ours(remat):
  return lambda x, stacked, consts: _scan_loop.scan(
      _step, x, stacked, consts, remat=remat)


def _loss_and_grads(run, x, stacked, consts, trained):
  """Loss and gradients in `x` and the float params named in `trained`."""
  def loss(x, floats):
    out = run(x, {**stacked, **floats}, consts)
    return jnp.sum(out.astype(jnp.float32) ** 2)
  floats = {k: stacked[k] for k in trained}
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, floats)


@pytest.mark.parametrize('remat', [False, True], ids=['stored', 'remat'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16],
                         ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('trained', [('w', 'b', 'scale'), ('b',)],
                         ids=['all', 'bias-only'])
def test_scan_equals_lax_scan_in_value_and_gradients(remat, dtype, trained):
  x, stacked, consts = _inputs(dtype)
  np.testing.assert_array_equal(
      jax.jit(_ours(remat))(x, stacked, consts),
      jax.jit(_reference)(x, stacked, consts))
  want = _loss_and_grads(_reference, x, stacked, consts, trained)
  got = _loss_and_grads(_ours(remat), x, stacked, consts, trained)
  # Same ops, but XLA may fuse the two programs differently.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  helpers.assert_trees_close(got, want, rtol=tol, atol=tol)
  assert jax.tree.map(lambda a: a.dtype, got[1][1]) == {
      k: stacked[k].dtype for k in trained}


def test_forward_mode_is_refused_in_bfloat16_only():
  x, stacked, consts = _inputs(jnp.float32)
  np.testing.assert_array_equal(
      jax.jvp(lambda x: _ours(False)(x, stacked, consts), (x,), (x,)),
      jax.jvp(lambda x: _reference(x, stacked, consts), (x,), (x,)))
  x, stacked, consts = _inputs(jnp.bfloat16)
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(lambda x: _ours(False)(x, stacked, consts), (x,), (x,))


def _float32_copies(hlo: str, stacked) -> list[str]:
  """Float32 arrays in `hlo` of a bfloat16 stacked leaf's shape."""
  shapes = {'f32[' + ','.join(map(str, a.shape)) + ']'
            for a in jax.tree.leaves(stacked) if a.dtype == jnp.bfloat16}
  return sorted(set(re.findall(r'f32\[[\d,]+\]', hlo)) & shapes)


def _compiled_step(model, surgery, frozen, lora, tokens):
  def loss(lora):
    with surgery:
      logits = model.apply(
          {'params': train.model_params(model, frozen, lora)}, tokens)
    return jnp.mean(logits.astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss)).lower(lora).compile().as_text()


def test_no_bfloat16_stack_is_converted_whole():
  # XLA:CPU runs bfloat16 ops in float32, slices and stack writes
  # included. A plain lax.scan over the bfloat16 toy stack shows it: the
  # compiled program holds float32 copies of the whole stacks (w, scale).
  x, stacked, consts = _inputs(jnp.bfloat16)
  x = x.astype(jnp.bfloat16)  # So the step computes in bfloat16.

  def bias_grad_program(run):
    def loss(b):
      return jnp.sum(run(x, {**stacked, 'b': b}, consts))
    return jax.jit(jax.grad(loss)).lower(stacked['b']).compile().as_text()
  assert _float32_copies(bias_grad_program(_reference), stacked) == [
      'f32[3,8,8]', 'f32[3,8]']
  assert _float32_copies(bias_grad_program(_ours(False)), stacked) == []
  # The bfloat16 LoRA step of a scanning Decoder: no stacked weight (nor
  # stacked bfloat16 adapter) appears as a float32 array.
  # Three blocks: no adapter's shape (rank 4) is a stack's (3, ...).
  config = models.tiny_config(n_layers=3)
  surgery = peft.lora(4, alpha=8, targets=('.*attn/.*', '.*mlp'))
  frozen = train.in_dtype(models.random_params(config), jnp.bfloat16)
  model = models.Decoder(config=config, dtype=jnp.bfloat16)
  with surgery:
    lora = peft.split_params(model.init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']).lora
  stacked_frozen = train.scan_layout(config, frozen, lora)
  tokens = jnp.zeros((2, 16), jnp.int32)
  hlo = _compiled_step(model.clone(scan_layers=True), surgery,
                       stacked_frozen, lora, tokens)
  assert _float32_copies(hlo, stacked_frozen[_scan.SCANNED]) == []
