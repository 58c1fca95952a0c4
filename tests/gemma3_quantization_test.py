"""peft's NF4 equals the independent NumPy NF4 of the Gemma 3 benchmark.

`benchmarks/gemma3_quantization.py` writes NF4 from QLoRA's definition
(levels from normal quantiles, nearest level, absmax blocks of 64 along the
contracted axes) and asserts on the real Gemma 3 270M kernels that
`peft.simulate_quantize(w, 'nf4', axes)` equals it; this checks the same on
small random kernels, bit for bit.
"""

import jax
import numpy as np
import pytest

from benchmarks import gemma3_quantization as bench
import peft

CASES = [
    # A Dense kernel (in, out) with a short last block (200 = 3 * 64 + 8).
    ('...D,DF->...F', (200, 24)),
    # attn_vec_einsum: blocks run along N and H flattened (2 * 96 = 3 * 64).
    ('BTNH,NHD->BTD', (2, 96, 40)),
    # kv_einsum: the contracted axis sits between kept ones.
    ('BSD,CKDH->CBSKH', (2, 1, 128, 16)),
]


@pytest.mark.parametrize(('eqn', 'shape'), CASES, ids=[c[0] for c in CASES])
def test_peft_nf4_equals_the_anchor_exactly(eqn, shape):
  # Channels of uneven scale, so blocks have different absmax.
  w = np.asarray(jax.random.normal(jax.random.key(0), shape), np.float32)
  w = w * np.linspace(0.01, 3.0, shape[-1], dtype=np.float32)
  axes = peft.get_axis_to_reduce_from_einsum_str(eqn)
  ours = np.asarray(peft.simulate_quantize(w, 'nf4', axis_to_reduce=axes))
  np.testing.assert_array_equal(ours, bench.nf4_anchor(w, axes))

