"""Llama-family decoder: embed -> [RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU] x L -> RMSNorm -> logits.

`Decoder(input_ids, segment_ids, positions, replace=None, decode=False) -> (logits [B,S,V] f32, hidden [B,S,D])`.
`replace=(where [B,S] bool, values [B,S,D])` swaps token embeddings for other vectors (the VLM's image
features) before the first layer. Layers are `nn.scan`ned when `scan_layers` (params under `layers` with a
leading axis named 'layers'), else `layers_0`, `layers_1`, ...; `remat` one of layers.REMAT_POLICIES or none.

Mixture of experts (`config.moe.num_experts > 0`, vlm_jax/model/moe.py): layer i has a `moe` block instead of
the SwiGLU `mlp` iff `config.is_moe_layer(i)`. Every layer MoE (every_n_layers = 1): the tree is the dense one
with `moe` for `mlp`. Interleaved (every_n_layers = n > 1), unscanned: `layers_i/{mlp|moe}`; scanned: the scan
repeats a group of n layers, params under `layers/layers_j/...` (j = 0..n-1, only j = n-1 has `moe`) with a
leading axis of num_layers / n groups, so global layer i = group * n + j. The MoE statistics ride the layer
carry (x, summed stats); `with_aux=True` also returns (aux_loss [], moe_metrics dict) (`moe.summarize`;
0.0 and {} for a dense decoder).

KV cache (generation). With `decode=True` the decoder reads and writes a linen "cache" collection:
  decoder/index          int32 []              next free slot (shared by all rows: prompts are left-padded)
  decoder/segment_ids    int32 [B, L]          segment of each filled slot (0 = padding / empty)
  decoder/layers/attn/{key,value} [B, L, KV, hd]   (scanned: [layers, B, L, KV, hd]; else under layers_i)
A call with S tokens writes their K/V (RoPE already applied, from the explicit `positions`) and segment ids at
slots [index, index + S), then attends each query to every cache slot with the same non-zero segment that is not
after it, and advances index by S. So prefill is one call with the whole left-padded prompt on an empty cache
(left-pad slots carry segment 0 and are never attended; each row's positions start at 0 on its first real
token), and each decode step is a call with S=1, the next position of each row, and segment 1.
The cache length L is fixed when the cache is made (it must hold prompt + new tokens: writes past L are
clamped by dynamic_update_slice, so the caller stops before) (see `vlm.init_cache`, which sizes it by an abstract call
on [B, L] tokens); every array shape is static, so generate.py can jit the prefill and run the decode steps in
`lax.while_loop`, threading the cache through `apply(..., mutable=["cache"])`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vlm_jax import losses
from vlm_jax.config import DecoderConfig
from vlm_jax.model import kernels
from vlm_jax.model import moe as moe_lib
from vlm_jax.model.attention import apply_rope, dot_product_attention, make_attention_mask
from vlm_jax.model.layers import (QKV_NAMES, Embed, RMSNorm, constrain, dense, logical, maybe_remat, stack_layers,
                                  swiglu)

ACT_AXES = ("act_batch", "act_length", "act_embed")


class Attention(nn.Module):
  """GQA self-attention, no biases, RoPE on q and k; with `decode`, K/V go through the cache."""
  config: DecoderConfig
  dtype: Any
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache_index: jax.Array | None,
               segment_ids: jax.Array):
    c = self.config
    hd = c.resolved_head_dim
    q = dense((c.num_heads, hd), ("embed", "heads", "head_dim"), name="q_proj", dtype=self.dtype, use_bias=False)(x)
    k = dense((c.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), name="k_proj", dtype=self.dtype,
              use_bias=False)(x)
    v = dense((c.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), name="v_proj", dtype=self.dtype,
              use_bias=False)(x)
    q, k, v = (checkpoint_name(t, n) for t, n in zip((q, k, v), QKV_NAMES))  # remat policies keep these by name
    q = constrain(apply_rope(q, positions, c.rope_theta), ("act_batch", "act_length", "act_heads", None))
    k = constrain(apply_rope(k, positions, c.rope_theta), ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
    if self.decode:
      cached_key = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
      cached_value = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), start)
      v = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype), start)
      k = constrain(k, ("act_batch", None, "act_kv_heads", None))
      v = constrain(v, ("act_batch", None, "act_kv_heads", None))
      cached_key.value, cached_value.value = k, v
    out = dot_product_attention(q, k, v, mask, causal=not self.decode, segment_ids=segment_ids)
    return checkpoint_name(dense(c.width, ("heads", "head_dim", "embed"), num_in=2, name="o_proj",
                                 dtype=self.dtype, use_bias=False)(out), "out_proj")


class SwiGLU(nn.Module):
  config: DecoderConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate = dense(c.mlp_dim, ("embed", "mlp"), name="gate", dtype=self.dtype, use_bias=False)
    up = dense(c.mlp_dim, ("embed", "mlp"), name="up", dtype=self.dtype, use_bias=False)
    down = dense(c.width, ("mlp", "embed"), name="down", dtype=self.dtype, use_bias=False)

    def mlp(piece):
      h = swiglu(checkpoint_name(gate(piece), "mlp_gate"), checkpoint_name(up(piece), "mlp_up"))
      return checkpoint_name(down(constrain(h, ("act_batch", "act_length", "act_mlp"))), "mlp_down")
    chunks = c.mlp_chunks if x.shape[1] % c.mlp_chunks == 0 else 1  # see DecoderConfig.mlp_chunks
    if chunks == 1:
      return mlp(x)
    return jnp.concatenate([mlp(piece) for piece in jnp.split(x, chunks, axis=1)], axis=1)


class DecoderLayer(nn.Module):
  config: DecoderConfig
  dtype: Any
  decode: bool = False
  moe: bool = False  # a mixture-of-experts block (`moe`) instead of the SwiGLU `mlp`

  @nn.compact
  def __call__(self, carry, positions, mask, cache_index, segment_ids):
    """carry: x [B, S, D], or (x, MoE stats summed so far) when the decoder has MoE layers."""
    c = self.config
    x, stats = carry if c.moe.num_experts else (carry, None)
    h = RMSNorm(c.rms_norm_eps, self.dtype, name="attn_norm")(x)
    x = x + Attention(c, self.dtype, self.decode, name="attn")(h, positions, mask, cache_index, segment_ids)
    h = RMSNorm(c.rms_norm_eps, self.dtype, name="mlp_norm")(x)
    if self.moe:
      y, layer_stats = moe_lib.MoeBlock(c, self.dtype, name="moe")(h, segment_ids > 0)
      stats = jax.tree.map(jnp.add, stats, layer_stats)
    else:
      y = SwiGLU(c, self.dtype, name="mlp")(h)
    x = constrain(x + y, ACT_AXES)
    return (x if stats is None else (x, stats)), None


class DecoderGroup(nn.Module):
  """`moe.every_n_layers` consecutive layers, the last one MoE: the unit the scan repeats when MoE is interleaved."""
  config: DecoderConfig
  dtype: Any
  decode: bool = False

  @nn.compact
  def __call__(self, carry, *args):
    n = self.config.moe.every_n_layers
    for j in range(n):
      carry, _ = DecoderLayer(self.config, self.dtype, self.decode, moe=j == n - 1, name=f"layers_{j}")(carry, *args)
    return carry, None


def decoder_layers(config: DecoderConfig, dtype: Any, *, decode: bool, scanned: bool, remat: str):
  """f(carry, positions, mask, cache_index, segment_ids) -> carry through all layers (call inside a compact
  method)."""
  kwargs = dict(config=config, dtype=dtype, decode=decode)
  common = dict(scanned=scanned, remat=remat, broadcast_args=4, cache=decode)
  n = config.moe.every_n_layers
  if not config.moe.num_experts or n == 1:
    return stack_layers(DecoderLayer, dict(kwargs, moe=config.moe.num_experts > 0), num_layers=config.num_layers,
                        **common)
  if scanned:
    return stack_layers(DecoderGroup, kwargs, num_layers=config.num_layers // n, **common)
  block = maybe_remat(DecoderLayer, remat, scanned=False)
  layers = [block(**kwargs, moe=config.is_moe_layer(i), name=f"layers_{i}") for i in range(config.num_layers)]

  def run(carry, *args):
    for layer in layers:
      carry, _ = layer(carry, *args)
    return carry
  return run


def unscanned(tree: dict[str, Any], config: DecoderConfig) -> dict[str, Any]:
  """A scanned decoder's subtree (params or cache: `layers` with a leading axis) in the unscanned layout
  (`layers_0` ... `layers_{L-1}`); global layer g * n + j of an interleaved-MoE scan is group g's `layers_j`."""
  tree = dict(tree)
  stacked, n = tree.pop("layers"), config.moe.every_n_layers if config.moe.num_experts else 1
  for g in range(config.num_layers // n):
    group = jax.tree.map(lambda a, g=g: a[g], stacked)
    for j in range(n):
      tree[f"layers_{g * n + j}"] = group if n == 1 else group[f"layers_{j}"]
  return tree


class LmHead(nn.Module):
  """The untied output head's kernel [D, V] (a bias-free Dense's param, `lm_head/kernel`), as an array."""
  width: int
  vocab_size: int

  @nn.compact
  def __call__(self) -> jax.Array:
    init = nn.initializers.lecun_normal(in_axis=(0,), out_axis=(1,))
    return self.param("kernel", logical(init, ("embed", "vocab")), (self.width, self.vocab_size), jnp.float32)


class Decoder(nn.Module):
  config: DecoderConfig
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: str = "none"

  @nn.compact
  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array, *,
               replace: tuple[jax.Array, jax.Array] | None = None,
               decode: bool = False, with_aux: bool = False, labels: jax.Array | None = None) -> tuple[Any, ...]:
    """input_ids, segment_ids, positions: int [B, S] -> (logits float32 [B, S, V], final hidden [B, S, D]),
    and with `with_aux` also (aux_loss f32 [], moe_metrics dict) as in the module docstring. With `labels`
    int [B, S] the logits are (summed NLL f32 [], scored tokens int32 []) instead, from
    `losses.chunked_token_cross_entropy`: the [B, S, V] logits never exist."""
    c = self.config
    embed = Embed(c.vocab_size, c.width, "embed", self.dtype, name="embed")
    x = embed(input_ids)
    if replace is not None:
      where, values = replace
      x = jnp.where(where[..., None], values.astype(self.dtype), x)
    x = constrain(x, ACT_AXES)
    self.sow("intermediates", "embeddings", x)

    if decode:
      index_var = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      segments_var = self.variable("cache", "segment_ids", jnp.zeros, segment_ids.shape, jnp.int32)
      cache_index = index_var.value
      kv_segments = jax.lax.dynamic_update_slice(segments_var.value, segment_ids.astype(jnp.int32), (0, cache_index))
      mask = make_attention_mask(segment_ids, kv_segments, q_offset=cache_index)
      segments_var.value = kv_segments
      index_var.value = cache_index + input_ids.shape[1]
    else:
      cache_index = None
      mask = make_attention_mask(segment_ids, segment_ids)

    layers = decoder_layers(c, self.dtype, decode=decode, scanned=self.scan_layers,
                            remat="none" if decode else self.remat)
    moe = c.moe.num_experts > 0
    carry = layers((x, moe_lib.empty_stats(c.moe.num_experts)) if moe else x, positions, mask, cache_index,
                   segment_ids)
    x, stats = carry if moe else (carry, None)
    x = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")(x)
    if c.tie_embeddings:
      table = embed.embedding
      head = lambda h: kernels.unembed(h.astype(self.dtype), table)
    else:
      kernel = LmHead(c.width, c.vocab_size, name="lm_head")()
      head = lambda h: kernels.matmul(h.astype(self.dtype), kernel, 1, True)
    logits_of = lambda h: constrain(head(h), ("act_batch", "act_length", "act_vocab"))
    logits = logits_of(x) if labels is None else losses.chunked_token_cross_entropy(
        x, logits_of, labels, unroll=not self.scan_layers)
    if not with_aux:
      return logits, x
    if not moe:
      return logits, x, jnp.zeros((), jnp.float32), {}
    num_moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_layers))
    return (logits, x, *moe_lib.summarize(stats, num_moe_layers))
