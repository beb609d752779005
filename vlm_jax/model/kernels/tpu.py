"""TPU attention: the Pallas splash attention kernel for self-attention, causal over packed rows (the decoder)
or bidirectional (the ViT), with GQA.

The kernel builds the causal x same-segment mask itself from segment ids and skips fully masked blocks, so no
[B, H, S, S] logits or mask exist. Bidirectional sequences are padded to whole blocks (padding in segment 0).
Under a mesh it runs per shard (shard_map): rows over the batch axes, heads over the tensor axis (when the query
and KV heads both divide by it).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

MIN_BLOCK = 128  # the kernel's smallest block along the sequence
KERNEL_NAME = "splash_mha"  # prefix of the kernel's custom call names in the compiled HLO


def supports(q: jax.Array, k: jax.Array, causal: bool = True) -> bool:
  """Self-attention over the same slots: q [B, S, H, D], k [B, S, KV, D]; causal ones in whole blocks
  (S % 128 == 0), bidirectional ones of at least one block (they are padded)."""
  s, length = q.shape[1], k.shape[1]
  whole = s % MIN_BLOCK == 0 if causal else s >= MIN_BLOCK
  return s == length and whole and q.shape[2] % k.shape[2] == 0


def block_sizes(seq_len: int) -> splash.BlockSizes:
  """512-long blocks where the sequence allows (MaxText's default), else 128."""
  b = 512 if seq_len % 512 == 0 else MIN_BLOCK
  return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _kernel(num_heads: int, seq_len: int, causal: bool, interpret: bool):
  shape = (seq_len, seq_len)
  head_mask = splash_mask.CausalMask(shape) if causal else splash_mask.FullMask(shape)
  mask = splash_mask.MultiHeadMask([head_mask] * num_heads)
  return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=block_sizes(seq_len),
                                interpret=interpret)


def _local(q, k, v, segment_ids, causal, interpret):
  """One shard: q [b, H, S, D] (scaled), k, v [b, KV, S, D], segment_ids [b, S] -> [b, H, S, D]."""
  kernel = _kernel(q.shape[1], q.shape[2], causal, interpret)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segment_ids)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                     causal: bool = True, interpret: bool = False) -> jax.Array:
  """Attention within equal segment ids (None: one segment), causal or not: q [B, S, H, D], k, v [B, S, KV, D]
  (query head h reads kv head h // (H/KV)), segment_ids int [B, S] -> [B, S, H, D] in q's dtype. `interpret`
  runs the kernel's own code through the Pallas interpreter (on any backend, for tests)."""
  b, s = q.shape[:2]
  if segment_ids is None:
    segment_ids = jnp.ones((b, s), jnp.int32)
  pad = -s % MIN_BLOCK
  if pad:  # bidirectional only (causal needs whole blocks): padding keys sit in segment 0, unseen
    assert not causal
    q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
  scale = q.shape[-1] ** -0.5
  q = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  segment_ids = segment_ids.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = _local(q, k, v, segment_ids, causal, interpret)
  else:
    batch = nn.logical_to_mesh_axes(("act_batch",))[0]
    heads = nn.logical_to_mesh_axes(("act_heads",))[0]
    head_shards = 1 if heads is None else mesh.shape[heads] if isinstance(heads, str) else 0
    if not head_shards or q.shape[1] % head_shards or k.shape[1] % head_shards:
      heads = None
    spec = P(batch, heads, None, None)
    out = jax.shard_map(functools.partial(_local, causal=causal, interpret=interpret), mesh=mesh,
                        in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec, check_vma=False)(
                            q, k, v, segment_ids)
  return out.transpose(0, 2, 1, 3)[:, :s].astype(q.dtype)
