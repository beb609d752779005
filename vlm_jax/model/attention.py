"""Attention masks from segment ids, half-split RoPE; scaled dot-product attention (GQA-aware) is
`dot_product_attention` of vlm_jax/model/kernels, re-exported here.

Masks are boolean `[batch, 1, q_len, kv_len]` (True = may attend). A query may attend a key iff both carry the
same non-zero segment id (0 = padding; packed rows carry 1..k) and the key's slot is not after the query's.
Slots are indices along the sequence (or KV-cache) axis; `q_offset` is the slot of the first query, so the same
rule serves training (q_offset=0, keys = queries) and cached decoding (keys = the whole cache).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.model.kernels import dot_product_attention  # noqa: F401 (re-exported)
from vlm_jax.model.kernels.cpu import CAUSAL_BLOCK  # noqa: F401 (the query block of the CPU causal attention)


def make_attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_offset: jax.Array | int = 0,
                        causal: bool = True) -> jax.Array:
  """Boolean mask [B, 1, S, L] from q_segment_ids [B, S] and kv_segment_ids [B, L]."""
  q = q_segment_ids[:, :, None]
  kv = kv_segment_ids[:, None, :]
  mask = (q == kv) & (q != 0)
  if causal:
    q_slot = q_offset + jnp.arange(q_segment_ids.shape[1])
    kv_slot = jnp.arange(kv_segment_ids.shape[1])
    mask &= kv_slot[None, None, :] <= q_slot[None, :, None]
  return mask[:, None]


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  """HF Llama inverse frequencies theta^(-arange(0, D, 2) / D), float32 [D/2]."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in HF's half-split layout: x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1).

  x: [B, S, heads, D]; positions: int [B, S] (explicit, so packed / left-padded rows restart anywhere).
  Angles are float32; the result has x's dtype.
  """
  freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(x.shape[-1], theta)  # [B, S, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, S, 1, D]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
