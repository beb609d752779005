"""Vision encoders: SigLIP / CLIP ViTs with HF numerics, and Fuyu-style linear patch embedding ('none').

`VisionEncoder(pixels [B, H, W, C], uint8 or normalized floats) -> features [B, T, W]`, where the features are
`hidden_states[feature_layer]` (0 = embeddings, after `pre_layernorm` for CLIP; i = output of block i;
-1 = last block), then `select_strategy` ('default' drops CLIP's CLS token), then `post_layernorm` if set.
That is LLaVA's `vision_feature_layer` / `vision_feature_select_strategy`, and with feature_layer=-1 and
post_layernorm=True it is HF's `last_hidden_state` (what Idefics3 uses). Blocks after the selected layer are
not computed, but their params exist so that HF checkpoints round-trip.

Also here: `EncoderBlock` (the pre-LN transformer block, shared with the text tower) and `MAPHead`
(attention pooling with a learned probe, big_vision style).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import VisionConfig
from vlm_jax.model.attention import dot_product_attention
from vlm_jax.model.layers import LayerNorm, activation, constrain, dense, logical, stack_layers

ACT_AXES = ("act_batch", "act_length", "act_embed")


class SelfAttention(nn.Module):
  """Multi-head attention with biases on q/k/v/out (SigLIP / CLIP layout). Optional bool mask [B,1,T,T]."""
  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv = [dense((self.num_heads, head_dim), ("vision_embed", "heads", "head_dim"), name=n, dtype=self.dtype)(x)
           for n in ("q", "k", "v")]
    qkv = [constrain(t, ("act_batch", "act_length", "act_heads", None)) for t in qkv]
    out = dot_product_attention(*qkv, mask=mask)
    return dense(width, ("heads", "head_dim", "vision_embed"), num_in=2, name="out", dtype=self.dtype)(out)


class Mlp(nn.Module):
  mlp_dim: int
  act: str
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(self.mlp_dim, ("vision_embed", "vision_mlp"), name="fc1", dtype=self.dtype)(x)
    h = constrain(activation(self.act)(h), ("act_batch", "act_length", "act_mlp"))
    return dense(x.shape[-1], ("vision_mlp", "vision_embed"), name="fc2", dtype=self.dtype)(h)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)). Returns (x, None) so it can be scanned."""
  num_heads: int
  mlp_dim: int
  eps: float
  act: str
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, None]:
    h = LayerNorm(self.eps, self.dtype, name="ln1")(x)
    x = x + SelfAttention(self.num_heads, self.dtype, name="attn")(h, mask)
    h = LayerNorm(self.eps, self.dtype, name="ln2")(x)
    x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(h)
    return constrain(x, ACT_AXES), None


def resolve_feature_layer(feature_layer: int, depth: int) -> int:
  """Index into hidden_states (depth + 1 entries) -> number of blocks to run."""
  index = feature_layer if feature_layer >= 0 else depth + 1 + feature_layer
  if not 0 <= index <= depth:
    raise ValueError(f"vision.feature_layer={feature_layer} is outside hidden_states of a {depth}-block ViT.")
  return index


def sincos2d(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """float32 [grid * grid, width]: for the patch at (row, col), row-major, width/4 frequencies
  temperature^(-i / (width/4 - 1)), then [sin(col f), cos(col f), sin(row f), cos(row f)] (big_vision's
  `posemb_sincos_2d` layout)."""
  if width % 4:
    raise ValueError(f"pos_embed_init='sincos2d' needs a vision width divisible by 4, got {width}.")
  quarter = width // 4
  freqs = temperature ** -(np.arange(quarter) / max(quarter - 1, 1))
  rows, cols = np.mgrid[:grid, :grid]
  col_angles = cols.reshape(-1, 1) * freqs
  row_angles = rows.reshape(-1, 1) * freqs
  return np.concatenate([np.sin(col_angles), np.cos(col_angles), np.sin(row_angles), np.cos(row_angles)],
                        axis=1).astype(np.float32)


def sincos2d_init(c: VisionConfig):
  """Initializer of the pos_embed param [num_positions, width]: the sincos2d table (a zero row first for CLIP's
  CLS token)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    table = sincos2d(c.image_size // c.patch_size, c.width)
    if c.kind == "clip":
      table = np.concatenate([np.zeros((1, c.width), np.float32), table])
    return jnp.asarray(table, dtype)
  return init


def normalize_pixels(pixels: jax.Array, mean, std) -> jax.Array:
  """Pixels as the ViT takes them, by dtype: uint8 [..., C] (what the loader ships, 4x fewer bytes) -> float32
  (x / 255 - mean) / std, computed here on the device; floating pixels are already normalized (an HF
  processor's pixel_values) and pass as they are. The host's reference (vlm_jax/inputs/images.py `normalize`)
  agrees to an ulp: XLA computes x / c as x * (1 / c)."""
  if jnp.issubdtype(pixels.dtype, jnp.floating):
    return pixels
  if pixels.dtype != jnp.uint8:
    raise TypeError(f"pixel_values of dtype {pixels.dtype}: pass uint8 tiles (normalized on the device) or "
                    "floats that are already normalized.")
  x = pixels.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


class VisionEncoder(nn.Module):
  """pixels [B, H, W, C] NHWC, uint8 or already normalized floats (`normalize_pixels`) -> features
  [B, config.tokens_per_image, width]."""
  config: VisionConfig
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: str = "none"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    p, width = c.patch_size, c.width
    b, h, w, ch = pixels.shape
    pixels = normalize_pixels(pixels, c.image_mean, c.image_std).astype(self.dtype)
    if c.kind == "none":
      # Fuyu: each patch flattened in (row, col, channel) order, one linear layer, no transformer.
      patches = pixels.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * ch)
      x = dense(width, ("patch", "vision_embed"), name="patch_embed", dtype=self.dtype)(patches)
      return constrain(x, ACT_AXES)

    is_clip = c.kind == "clip"
    x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=not is_clip, dtype=self.dtype,
                param_dtype=jnp.float32, name="patch_embed",
                kernel_init=logical(nn.initializers.lecun_normal(), (None, None, "channels", "vision_embed")),
                bias_init=logical(nn.initializers.zeros_init(), ("vision_embed",)))(pixels)
    x = x.reshape(b, -1, width)  # row-major patches, as torch's flatten(2).transpose(1, 2)
    if is_clip:
      cls = self.param("cls_token", logical(nn.initializers.normal(0.02), ("vision_embed",)), (width,), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, width)), x], axis=1)
    pos_init = sincos2d_init(c) if c.pos_embed_init == "sincos2d" else nn.initializers.normal(width ** -0.5)
    pos = self.param("pos_embed", logical(pos_init, ("positions", "vision_embed")), (c.num_positions, width),
                     jnp.float32)
    x = constrain(x + pos.astype(self.dtype), ACT_AXES)
    if is_clip:
      x = LayerNorm(c.layer_norm_eps, self.dtype, name="pre_layernorm")(x)

    needed = resolve_feature_layer(c.feature_layer, c.depth)
    blocks = stack_layers(
        EncoderBlock, dict(num_heads=c.num_heads, mlp_dim=c.mlp_dim, eps=c.layer_norm_eps, act=c.act, dtype=self.dtype),
        num_layers=c.depth, scanned=self.scan_layers, remat=self.remat,
        count=c.depth if self.is_initializing() else needed, broadcast_args=1)
    x = blocks(x, None)
    if is_clip and c.select_strategy == "default":
      x = x[:, 1:]
    post_layernorm = LayerNorm(c.layer_norm_eps, self.dtype, name="post_layernorm")
    if c.post_layernorm:
      x = post_layernorm(x)
    elif self.is_initializing():
      post_layernorm(x)  # create its params anyway: HF checkpoints carry them
    return x


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then a residual MLP.

  tokens [B, T, W] -> [B, W]. Unlike mean pooling, the attention weights can single out positions (the
  tokens carry position embeddings), which position questions need.
  """
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, width = x.shape
    head_dim = width // self.num_heads
    probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, "vision_embed")), (1, width),
                       jnp.float32)
    q = dense((self.num_heads, head_dim), ("vision_embed", "heads", "head_dim"), name="q", dtype=self.dtype)(
        jnp.broadcast_to(probe.astype(self.dtype), (b, 1, width)))
    k = dense((self.num_heads, head_dim), ("vision_embed", "heads", "head_dim"), name="k", dtype=self.dtype)(x)
    v = dense((self.num_heads, head_dim), ("vision_embed", "heads", "head_dim"), name="v", dtype=self.dtype)(x)
    y = dense(width, ("heads", "head_dim", "vision_embed"), num_in=2, name="out", dtype=self.dtype)(
        dot_product_attention(q, k, v))
    y = y + Mlp(self.mlp_dim, "gelu_tanh", self.dtype, name="mlp")(LayerNorm(1e-6, self.dtype, name="ln")(y))
    return y[:, 0]
