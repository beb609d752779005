"""Vision -> decoder projectors: LLaVA's 2-layer MLP, or Idefics3's pixel shuffle + bias-free linear."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.config import ProjectorConfig
from vlm_jax.model.layers import activation, constrain, dense

ACT_AXES = ("act_batch", "act_length", "act_embed")


def pixel_shuffle(x: jax.Array, scale_factor: int) -> jax.Array:
  """Idefics3's space-to-depth: [B, T, W] (T a square grid, row-major) -> [B, T / s^2, W * s^2].

  A line-by-line transcription of the torch code (view = row-major reshape), so that exported projector
  weights line up with HF's channel order.
  """
  b, t, width = x.shape
  side = int(round(t ** 0.5))
  s = scale_factor
  x = x.reshape(b, side, side // s, width * s)
  x = x.transpose(0, 2, 1, 3)
  x = x.reshape(b, side // s, side // s, width * s * s)
  x = x.transpose(0, 2, 1, 3)
  return x.reshape(b, t // (s * s), width * s * s)


class Projector(nn.Module):
  """features [B, T, W] -> [B, T', D] with T' = T (mlp) or T / scale_factor^2 (pixel_shuffle)."""
  config: ProjectorConfig
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    x = x.astype(self.dtype)
    if c.kind == "mlp":
      h = dense(self.out_dim, ("proj_in", "mlp"), name="linear_1", dtype=self.dtype)(x)
      h = constrain(activation(c.act)(h), ("act_batch", "act_length", "act_mlp"))
      out = dense(self.out_dim, ("mlp", "embed"), name="linear_2", dtype=self.dtype)(h)
    elif c.kind == "pixel_shuffle":
      out = dense(self.out_dim, ("proj_in", "embed"), name="proj", dtype=self.dtype, use_bias=False)(
          pixel_shuffle(x, c.scale_factor))
    else:
      raise ValueError(f"Unknown projector kind {c.kind!r}.")
    return constrain(out, ACT_AXES)
