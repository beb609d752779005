"""Projectors: Idefics3 pixel shuffle order, the MLP and the bias-free pixel-shuffle projection."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlm_jax.config import ProjectorConfig
from vlm_jax.model.projector import Projector, pixel_shuffle


def idefics3_pixel_shuffle_numpy(x, s):
  """Idefics3Connector.pixel_shuffle, torch ops transcribed one-for-one (view/reshape are row-major)."""
  bsz, seq, embed_dim = x.shape
  height = width = int(seq ** 0.5)
  x = x.reshape(bsz, height, width, embed_dim)
  x = x.reshape(bsz, height, width // s, embed_dim * s)
  x = x.transpose(0, 2, 1, 3)
  x = x.reshape(bsz, width // s, height // s, embed_dim * s * s)
  x = x.transpose(0, 2, 1, 3)
  return x.reshape(bsz, seq // (s * s), embed_dim * s * s)


@pytest.mark.parametrize("side,s", [(4, 2), (8, 4), (6, 3)])
def test_pixel_shuffle_equals_idefics3(side, s):
  x = np.random.RandomState(0).randn(2, side * side, 5).astype(np.float32)
  out = np.asarray(pixel_shuffle(x, s))
  np.testing.assert_array_equal(out, idefics3_pixel_shuffle_numpy(x, s))
  # What the order means: output token (r, c) of the reduced grid holds the s x s block at rows r*s.., cols
  # c*s.., channels ordered (row in block, column in block, feature).
  d, small = 5, side // s
  for r in range(small):
    for c in range(small):
      for m in range(s):
        for k in range(s):
          np.testing.assert_array_equal(out[:, r * small + c, (m * s + k) * d:(m * s + k + 1) * d],
                                        x[:, (r * s + m) * side + c * s + k])


def test_mlp_projector_matches_numpy():
  x = np.random.RandomState(1).randn(2, 3, 6).astype(np.float32)
  proj = Projector(ProjectorConfig(kind="mlp", act="gelu"), out_dim=8)
  params = jax.tree.map(np.asarray, nn.unbox(proj.init(jax.random.key(0), x)["params"]))
  p1, p2 = params["linear_1"], params["linear_2"]
  assert p1["kernel"].shape == (6, 8) and p2["kernel"].shape == (8, 8) and p2["bias"].shape == (8,)
  p1["bias"] = np.random.RandomState(2).randn(8).astype(np.float32)  # non-zero biases are exercised
  h = x.astype(np.float64) @ p1["kernel"] + p1["bias"]
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))  # exact (erf) GELU, torch's "gelu"
  expected = h @ p2["kernel"] + p2["bias"]
  out = proj.apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_pixel_shuffle_projector_is_bias_free_linear():
  x = np.random.RandomState(3).randn(2, 16, 4).astype(np.float32)
  proj = Projector(ProjectorConfig(kind="pixel_shuffle", scale_factor=2), out_dim=6)
  params = proj.init(jax.random.key(0), x)["params"]
  kernel = np.asarray(params["proj"]["kernel"].unbox())
  assert list(params["proj"]) == ["kernel"] and kernel.shape == (16, 6)
  out = proj.apply({"params": params}, x)
  assert out.shape == (2, 4, 6)
  np.testing.assert_allclose(np.asarray(out), idefics3_pixel_shuffle_numpy(x, 2) @ kernel, atol=1e-5)
