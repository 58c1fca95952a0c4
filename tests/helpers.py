"""The one tree comparison helper of the test suite."""

from typing import Any

import jax
import numpy as np


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
