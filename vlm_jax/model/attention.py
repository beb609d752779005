"""Attention masks from segment ids, half-split RoPE, and scaled dot-product attention (GQA-aware).

Masks are boolean `[batch, 1, q_len, kv_len]` (True = may attend). A query may attend a key iff both carry the
same non-zero segment id (0 = padding; packed rows carry 1..k) and the key's slot is not after the query's.
Slots are indices along the sequence (or KV-cache) axis; `q_offset` is the slot of the first query, so the same
rule serves training (q_offset=0, keys = queries) and cached decoding (keys = the whole cache).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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


CAUSAL_BLOCK = 128  # query block of `causal=True` attention


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                          causal: bool = False) -> jax.Array:
  """softmax(q k^T * D^-0.5) v with float32 logits and softmax (HF eager numerics).

  q: [B, S, H, D]; k, v: [B, L, KV, D] with H a multiple of KV (query head h reads kv head h // (H/KV), HF's
  repeat_kv order); mask: bool [B, 1, S, L] or None. Fully masked rows (padding queries) give finite garbage,
  never NaN. Returns [B, S, H, D] in q's dtype.

  causal=True promises that `mask` already forbids every key slot after its query slot (queries and keys are
  the same S slots). The queries then go in blocks of CAUSAL_BLOCK, each against the keys up to its own end
  only: the same result without the masked upper triangle's logits (at S = 4 blocks, 10 of 16 tiles).
  """
  s, length = q.shape[1], k.shape[1]
  if causal and s == length and s > CAUSAL_BLOCK and s % CAUSAL_BLOCK == 0:
    outs = []
    for end in range(CAUSAL_BLOCK, s + 1, CAUSAL_BLOCK):
      block_mask = None if mask is None else mask[:, :, end - CAUSAL_BLOCK:end, :end]
      outs.append(_attention(q[:, end - CAUSAL_BLOCK:end], k[:, :end], v[:, :end], block_mask))
    return jnp.concatenate(outs, axis=1)
  return _attention(q, k, v, mask)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  b, s, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, s, kv_heads, h // kv_heads, d)
  if q.dtype == jnp.float32:  # plain autodiff
    out = _attention_forward(q, k, v, mask, d ** -0.5)[0]
  else:
    out = _attention_low_precision(q, k, v, mask, d ** -0.5)
  return out.reshape(b, s, h, d)


def _masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """float32 softmax over the last axis of logits [B, KV, S, G, L]; mask [B, 1, S, L]."""
  if mask is not None:
    logits = jnp.where(mask[:, :, :, None], logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def _attention_forward(q, k, v, mask, scale):
  """q [B, S, KV, G, D] -> (out [B, S, KV, G, D] in q's dtype, probs [B, KV, S, G, L] in q's dtype); every dot
  takes q's dtype in and accumulates in float32.

  Logits and probabilities keep q's (S, G) order: a dot's output lists the left operand's free dims in that
  operand's order, and [B, KV, G, S, L] cost a transpose copy of every logit tensor (forward and backward)."""
  probs = _masked_softmax(_dot("bskgd,btkd->bksgt", q, k) * scale, mask).astype(q.dtype)
  return _dot("bksgt,btkd->bksgd", probs, v).transpose(0, 2, 1, 3, 4).astype(q.dtype), probs


def _dot(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_low_precision(q, k, v, mask, scale):
  """`_attention_forward` for bf16 q/k/v with a hand-written backward: all six matmuls (two forward, four
  backward) take bf16 inputs and accumulate in float32, the softmax gradient runs in float32, and the
  probabilities are kept in bf16 for the backward. Plain autodiff would run the backward dots on float32
  cotangents and the P.V dot bf16 -> bf16: on XLA:CPU both are 2x slower (an attention layer's forward +
  backward at bench_cpu's shape: 77 -> 44 ms)."""
  return _attention_forward(q, k, v, mask, scale)[0]


def _attention_low_precision_fwd(q, k, v, mask, scale):
  out, probs = _attention_forward(q, k, v, mask, scale)
  return out, (q, k, v, probs)  # the mask is in probs already (0 at masked slots, as autodiff sees it)


def _attention_low_precision_bwd(scale, residuals, g):
  q, k, v, probs = residuals
  # dv and dk come out as [B, KV, D, L] and are transposed after: as `probs^T . g` the dot would need the
  # [S, L] probabilities (and logit gradients) transposed first, a copy 4x larger than the [L, D] result.
  dv = _dot("bskgd,bksgt->bkdt", g, probs).transpose(0, 3, 1, 2)
  dprobs = _dot("bskgd,btkd->bksgt", g, v)
  p = probs.astype(jnp.float32)
  dlogits = (p * (dprobs - jnp.sum(dprobs * p, axis=-1, keepdims=True)) * scale).astype(q.dtype)
  dq = _dot("bksgt,btkd->bksgd", dlogits, k).transpose(0, 2, 1, 3, 4)
  dk = _dot("bskgd,bksgt->bkdt", q, dlogits).transpose(0, 3, 1, 2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention_low_precision.defvjp(_attention_low_precision_fwd, _attention_low_precision_bwd)
