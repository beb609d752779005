"""Small pre-LN transformer text tower for CLIP / SigLIP-style pretraining of the ViT.

text_ids [B, L], text_mask [B, L] -> pooled [B, width]. Attention is bidirectional over the real tokens and
the pooled vector is the mean of the final-LayerNorm outputs over `text_mask`. Why mean rather than the
EOS / last token: the batch contract only promises `text_mask`, not that captions end with EOS, and mean
pooling gives every token a direct gradient, which helps a tower trained from scratch in a few hundred steps.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.config import ContrastiveConfig
from vlm_jax.model.attention import make_attention_mask
from vlm_jax.model.layers import Embed, LayerNorm, constrain, logical, stack_layers
from vlm_jax.model.vision import EncoderBlock

LAYER_NORM_EPS = 1e-6


class TextEncoder(nn.Module):
  config: ContrastiveConfig
  vocab_size: int
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: str = "none"

  @nn.compact
  def __call__(self, text_ids: jax.Array, text_mask: jax.Array, pooled: bool = True) -> jax.Array:
    """text_ids int [B, L], text_mask bool [B, L] (L <= max_text_len) -> [B, width] in the compute dtype
    ([B, L, width], the final-LayerNorm output per token, with pooled=False)."""
    c = self.config
    length = text_ids.shape[1]
    if length > c.max_text_len:
      raise ValueError(f"text length {length} exceeds contrastive.max_text_len={c.max_text_len}.")
    x = Embed(self.vocab_size, c.width, "vision_embed", self.dtype, name="embed")(text_ids)
    pos = self.param("pos_embed", logical(nn.initializers.normal(0.01), ("positions", "vision_embed")),
                     (c.max_text_len, c.width), jnp.float32)
    x = constrain(x + pos[:length].astype(self.dtype), ("act_batch", "act_length", "act_embed"))
    segments = text_mask.astype(jnp.int32)
    mask = make_attention_mask(segments, segments, causal=False)
    blocks = stack_layers(
        EncoderBlock, dict(num_heads=c.num_heads, mlp_dim=c.mlp_dim, eps=LAYER_NORM_EPS, act="gelu_tanh",
                           dtype=self.dtype),
        num_layers=c.depth, scanned=self.scan_layers, remat=self.remat, broadcast_args=1)
    x = LayerNorm(LAYER_NORM_EPS, self.dtype, name="final_norm")(blocks(x, mask))
    if not pooled:
      return x
    weights = text_mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(x.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return pooled.astype(self.dtype)
