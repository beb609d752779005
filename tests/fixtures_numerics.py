"""Comparing float32 results that were summed in different orders (scan vs loop, sharded vs not, a cache vs a
full forward, float32 vs a float64 reference)."""
import jax
import numpy as np


def assert_f32_close(got, want, rtol=1e-5, scale=None, err_msg=""):
  """|got - want| <= rtol * (|want| + scale), scale = max |want| unless given.

  Two summation orders of the same float32 sums differ by a few ulps of the sums' scale, not of each element:
  an element near 0 of a tensor whose entries reach ~1 can be off by 1e-6 (XLA:CPU's AVX2 and AVX-512 kernels
  split dots differently). rtol=1e-5 is ~80 ulps; a real bug (a wrong layer, mask or shard) is off by O(scale).
  """
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if scale is None:
    scale = float(np.abs(want).max()) if want.size else 0.0
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def assert_trees_f32_close(got, want, rtol=1e-5):
  """assert_f32_close leaf by leaf against the largest |value| of the whole tree, naming the leaf that differs:
  a gradient that is zero up to rounding (~1e-9, e.g. a leaf the loss barely reaches) is noise at the scale of
  the sums that made it, not at its own."""
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
  assert jax.tree.structure(got) == want_def
  scale = max(float(np.abs(np.asarray(b)).max()) for _, b in want_leaves if np.size(b))
  for (path, a), (_, b) in zip(got_leaves, want_leaves):
    assert_f32_close(a, b, rtol, scale, err_msg=jax.tree_util.keystr(path))
