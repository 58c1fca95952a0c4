"""The einsum parser: validation, the LoRA rewrite, delta and reductions."""

import string

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft._core import einsum as _einsum
from peft._core.einsum import EinsumEquation
from peft._core.einsum import add_delta
from peft._core.einsum import delta
from peft._core.einsum import dense_general_call


@pytest.mark.parametrize('eq, shape, expected', [
    # Dense: A (in, r), B (r, out).
    ('...i,io->...o', (4, 5), ('...i,ir,ro->...o', (4, 3), (3, 5))),
    # Attention out: contracted N and H go to A.
    ('BTNH,NHD->BTD', (2, 4, 8), ('BTNH,NHr,rD->BTD', (2, 4, 3), (3, 8))),
    # Expert axis shared by all three terms stays with A.
    ('EBD,EDF->EBF', (2, 8, 6), ('EBD,EDr,rF->EBF', (2, 8, 3), (3, 6))),
    # 'r' already used: the next free letter is taken.
    ('br,rc->bc', (4, 5), ('br,rA,Ac->bc', (4, 3), (3, 5))),
    # Whitespace is ignored.
    (' bd , df -> bf ', (4, 5), ('bd,dr,rf->bf', (4, 3), (3, 5))),
])
def test_lora_plan(eq, shape, expected):
  plan = EinsumEquation.parse(eq).lora_plan(weight_shape=shape, rank=3)
  assert (plan.einsum_str, plan.a_shape, plan.b_shape) == expected


def test_weight_only_axis_goes_to_b():
  # 'k' is summed away inside the weight; it must still be in the delta.
  plan = EinsumEquation.parse('bd,dk->b').lora_plan(weight_shape=(3, 4),
                                                    rank=2)
  assert plan.delta_str == 'dr,rk->dk'
  assert plan.b_shape == (2, 4)


@pytest.mark.parametrize('eq, axes', [
    ('BTD,NDH->BTNH', (1,)),
    ('BTNH,NHD->BTD', (0, 1)),
    ('EBD,EDF->EBF', (1,)),  # the expert axis is kept, not reduced
    ('...i,io->...o', (0,)),
])
def test_reduction_axes(eq, axes):
  assert EinsumEquation.parse(eq).reduction_axes == axes


@pytest.mark.parametrize('eq, error, match', [
    ('ab,bc,cd->ad', ValueError, "exactly two operands.*'ab,bc,cd->ad'"),
    ('ab,bc', ValueError, 'explicit "->"'),
    ('ab->b', ValueError, 'exactly two operands'),
    ('ab,...c->ac', ValueError, "weights term '...c'.*ellipsis"),
    ('ab,bb->a', ValueError, "weights term 'bb'.*repeats a letter"),
    ('ab,bc->aa', ValueError, "outputs term 'aa'.*repeats"),
    ('ab,bc->az', ValueError, "Output axes 'z'.*neither"),
    ('a1,1c->ac', ValueError, 'characters other than ASCII letters'),
    ('ab,->a', ValueError, 'weights term.*is empty'),
    ('ab,bc->...c', ValueError, 'has "..." but the inputs do not'),
    ('......a,ab->b', ValueError, 'more than one "..."'),
    (3, TypeError, 'einsum_str must be a str.*got 3'),
])
def test_parse_errors(eq, error, match):
  with pytest.raises(error, match=match):
    EinsumEquation.parse(eq, where='dec/attn/q')


def test_error_names_module_path():
  with pytest.raises(ValueError, match="at 'dec/attn/q'"):
    EinsumEquation.parse('ab,bc,cd->ad', where='dec/attn/q')


def test_weight_shape_mismatch():
  eq = EinsumEquation.parse('bd,df->bf')
  with pytest.raises(ValueError, match=r'Weight shape \(2, 3, 4\) has 3 axes'):
    eq.lora_plan(weight_shape=(2, 3, 4), rank=2)


@pytest.mark.parametrize('rank', [0, -1, 1.5, True, None])
def test_bad_rank(rank):
  with pytest.raises(ValueError, match='rank must be a positive int'):
    EinsumEquation.parse('bd,df->bf').lora_plan(weight_shape=(2, 3),
                                                rank=rank)


def test_no_letter_left_for_rank():
  letters = string.ascii_letters
  eq = EinsumEquation.parse(f'{letters[:26]},{letters[26:]}->a')
  with pytest.raises(ValueError, match='none is left for the LoRA rank'):
    eq.rank_letter()


def test_dense_general_call_with_batch_dims():
  eq, shape = dense_general_call(input_shape=(3, 4, 5), axis=(-1,),
                                 batch_dims=(0,), features=(6,))
  assert eq.einsum_str == 'abc,acd->abd'
  assert shape == (3, 5, 6)


@st.composite
def equations(draw):
  """Random valid `inputs,weights->outputs` with matching shapes."""
  letters = list(string.ascii_lowercase)
  draw(st.randoms()).shuffle(letters)
  counts = [draw(st.integers(0, 2)) for _ in range(5)]
  counts[1] = max(counts[1], 1)  # at least one contracted axis
  groups, i = [], 0
  for n in counts:
    groups.append(letters[i:i + n])
    i += n
  batch, contracted, free, out_w, weight_only = groups
  inputs = batch + contracted + free
  weights = batch + contracted + out_w + weight_only
  outputs = batch + free + out_w
  for term in (inputs, weights, outputs):
    draw(st.randoms()).shuffle(term)
  ellipsis = draw(st.booleans())
  dims = {c: draw(st.integers(1, 3)) for c in inputs + weights}
  lead = (2,) if ellipsis else ()
  x_shape = lead + tuple(dims[c] for c in inputs)
  w_shape = tuple(dims[c] for c in weights)
  pre = '...' if ellipsis else ''
  eq = f'{pre}{"".join(inputs)},{"".join(weights)}->{pre}{"".join(outputs)}'
  return eq, x_shape, w_shape, draw(st.integers(1, 3))


def _two_products(plan, x, a, b, einsum=np.einsum):
  """`plan.apply`'s evaluation, spelled out with `einsum` (numpy's here)."""
  low = einsum(plan.down_str, x, a)
  if plan.b_layout_str:
    b = einsum(plan.b_layout_str, b)
    low = np.broadcast_to(low, b.shape[:plan.lead_ndim] + low.shape)
  return einsum(plan.up_str, low, b)


@settings(max_examples=60, deadline=None)
@given(equations())
def test_rewrite_and_two_products_equal_einsum_with_fused_delta(case):
  eq_str, x_shape, w_shape, rank = case
  plan = EinsumEquation.parse(eq_str).lora_plan(weight_shape=w_shape,
                                                rank=rank)
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape)
  a = rng.standard_normal(plan.a_shape)
  b = rng.standard_normal(plan.b_shape)
  delta = np.einsum(plan.delta_str, a, b)
  assert delta.shape == w_shape
  adapted = np.einsum(plan.einsum_str, x, a, b)
  np.testing.assert_allclose(adapted, np.einsum(eq_str, x, delta),
                             rtol=1e-10, atol=1e-10)
  # `plan.apply`'s two products compute the same.
  np.testing.assert_allclose(_two_products(plan, x, a, b), adapted,
                             rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('eq, down, layout, up', [
    # Gemma's projections: the second product writes the output in order.
    ('BTD,NDH->BTNH', 'BTD,Dr->BTr', '', 'BTr,rNH->BTNH'),
    ('BSD,CKDH->CBSKH', 'BSD,Dr->BSr', 'rCKH->CrKH', 'CBSr,CrKH->CBSKH'),
    ('BTNH,NHD->BTD', 'BTNH,NHr->BTr', '', 'BTr,rD->BTD'),
    ('BTD,CDF->CBTF', 'BTD,Dr->BTr', 'rCF->CrF', 'CBTr,CrF->CBTF'),
    ('...i,io->...o', '...i,ir->...r', '', '...r,ro->...o'),
    # A repeated input letter is kept once in the rank-sized intermediate.
    ('bbd,do->bo', 'bbd,dr->br', '', 'br,ro->bo'),
])
def test_two_product_equations(eq, down, layout, up):
  shape = (2,) * len(EinsumEquation.parse(eq).weights)
  plan = EinsumEquation.parse(eq).lora_plan(weight_shape=shape, rank=3)
  assert (plan.down_str, plan.b_layout_str, plan.up_str) == (down, layout, up)


_APPLY_CASES = [('BSD,CKDH->CBSKH', (2, 5, 8), (2, 3, 8, 4)),
                ('BTD,CDF->CBTF', (2, 5, 8), (2, 8, 6)),
                ('BTNH,NHD->BTD', (2, 5, 3, 4), (3, 4, 8))]


@pytest.mark.parametrize('eq, x_shape, w_shape', _APPLY_CASES)
def test_apply_equals_the_delta_einsum_under_jit(eq, x_shape, w_shape):
  plan = EinsumEquation.parse(eq).lora_plan(weight_shape=w_shape, rank=3)
  rng = np.random.default_rng(2)
  x, a, b = (rng.standard_normal(s).astype(np.float32)
             for s in (x_shape, plan.a_shape, plan.b_shape))
  expected = np.einsum(eq, x, np.einsum(plan.delta_str, a, b))
  got = jax.jit(plan.apply)(x, a, b)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda a, b: plan.apply(x, a, b).sum(), (0, 1))(a, b)
  expected_grads = jax.grad(
      lambda a, b: jnp.einsum(plan.einsum_str, x, a, b).sum(), (0, 1))(a, b)
  for g, e in zip(grads, expected_grads):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('delta_str, a_shape, b_shape', [
    ('ir,ro->io', (4, 3), (3, 5)),
    ('Dr,rNH->NDH', (4, 3), (3, 2, 5)),   # kernel axes out of A/B order
    ('NHr,rD->NHD', (2, 3, 3), (3, 4)),
    ('EDr,rF->EDF', (2, 4, 3), (3, 5)),   # an expert axis only in A
])
def test_delta_equals_einsum(delta_str, a_shape, b_shape):
  rng = np.random.default_rng(3)
  a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
  np.testing.assert_allclose(delta(delta_str, a, b),
                             np.einsum(delta_str, a, b), rtol=1e-5,
                             atol=1e-5)


def test_add_delta_casts_back_and_reports_round_off():
  rng = np.random.default_rng(4)
  w = rng.standard_normal((4, 5)).astype(jnp.bfloat16)
  a, b = rng.standard_normal((4, 2)), rng.standard_normal((2, 5))
  exact = np.asarray(w, np.float32) - 0.5 * (a @ b)
  out, err = add_delta(w, a.astype(np.float32), b.astype(np.float32), -0.5,
                       delta_str='ir,ro->io', with_error=True)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=1e-2,
                             atol=1e-2)
  np.testing.assert_allclose(
      float(err), np.abs(np.asarray(out, np.float32) - exact).max(),
      rtol=1e-5)
  assert float(err) > 0  # bfloat16 cannot hold the float32 sum exactly


def test_conv_equation_factorises_like_the_hand_written_conv_layout():
  for n, window in ((1, 'a'), (2, 'ab'), (3, 'abc')):
    eq = _einsum.conv_equation(n)
    assert eq.einsum_str == f'{window}i,{window}io->o'
    plan = eq.lora_plan(weight_shape=(*(3,) * n, 5, 4), rank=2)
    assert plan.delta_str == f'{window}ir,ro->{window}io'
    assert (plan.a_shape, plan.b_shape) == ((*(3,) * n, 5, 2), (2, 4))


def test_conv_equation_refuses_more_window_axes_than_letters():
  with pytest.raises(ValueError, match=r"The conv at 'net/c' has 24 spatial "
                     r'axes; LoRA convs support at most 23\. Exclude it'):
    _einsum.conv_equation(24, where='net/c')


def test_the_embed_equation_gives_rows_of_a_then_b():
  plan = _einsum.EMBED.lora_plan(weight_shape=(10, 4), rank=2)
  assert (plan.delta_str, plan.a_shape, plan.b_shape) == (
      'vr,rf->vf', (10, 2), (2, 4))
