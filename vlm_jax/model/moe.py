"""Mixture-of-experts SwiGLU (Mixtral design): a top-k router and GShard-style capacity dispatch, static shapes.

`MoeBlock(config, dtype)(x [B, S, D], token_mask bool [B, S]) -> (y [B, S, D], stats)` replaces the SwiGLU `mlp`
of a decoder layer; its params (E experts of hidden size F = `decoder.resolved_expert_mlp_dim`):
  moe/router/kernel     [D, E]          ("embed", None)
  moe/experts/gate_up   [E, D, 2, F]    ("exp", "embed", None, "mlp")   [:, :, 0] gate, [:, :, 1] up
  moe/experts/down      [E, F, D]       ("exp", "mlp", "embed")
transformers 5.23 Mixtral (`model.layers.{i}.mlp`) holds the router as `gate.weight` [E, D] and the experts fused
as `experts.gate_up_proj` [E, 2F, D] (torch (out, in) per expert; `linear(x, w).chunk(2)` gives gate then up)
and `experts.down_proj` [E, D, F]. So export is
  gate.weight = router.T,  gate_up_proj = gate_up.reshape(E, D, 2F).transpose(0, 2, 1),
  down_proj = down.transpose(0, 2, 1)
(hub checkpoints' `block_sparse_moe.experts.{e}.w1 / w3 / w2` are gate / up / down; HF fuses them at load).
Gate and up keep their own axis, rather than one 2F axis, so that F can shard over `tensor` without putting
all gates on one shard and all ups on another.

Routing, in float32: logits = x . router, probs = softmax(logits), top-k, weights renormalized over the k
(Mixtral). Tokens are grouped per batch row: expert e takes at most C tokens of each row, with C = S when
capacity_factor = 0 (dropless: a token picks an expert at most once, so S slots always suffice), else
C = min(S, ceil(S * k / E * capacity_factor)). An expert's slots go first to the row's first choices in token
order, then to its second choices, ... (GShard priority). A choice that finds its expert full is dropped and
adds nothing (the token's other choices keep their weights). Per-row groups make routing independent of how
the batch is sharded, so a sharded run equals a single-device one. Padding tokens (token_mask False) are not
dispatched (their output is 0) and count in no loss or statistic. Capacity depends on the row length S, so
with a capacity factor a KV-cache prefill and one-token decode steps can drop differently from a full forward;
dropless routing is per token and gives generation the exact full-forward result.

Dispatch and combine are one-hot einsums over [B, S, E, C] masks: x [B, S, D] -> expert inputs [E, B, C, D]
(E over the `expert` mesh axis, B over (data, fsdp): XLA turns the constraint into an all-to-all) -> SwiGLU per
expert -> router-weighted sum back to [B, S, D]. The masks cost B*S*E*C (S^2*E per row when dropless): fine
for short rows and few experts; long sequences want a capacity factor.

Per-layer losses (the decoder sums them over MoE layers):
  load balancing (Switch; equals HF Mixtral's load_balancing_loss_func on one layer): E * sum_e f_e * P_e,
    f_e = fraction of tokens having e among their top-k (sums to k), P_e = mean router probability of e;
  z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.config import DecoderConfig
from vlm_jax.model.layers import constrain, dense, logical, swiglu

EXPERT_ACT_AXES = ("act_exp", "act_exp_batch", None, "act_embed")


def route(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k routing. logits f32 [..., E] -> (probs [..., E], weights [..., k] summing to 1, experts int32 [..., k]).

  Ties go to the lower expert index (lax.top_k, like torch.topk)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top, experts = top_k(probs, k)
  return probs, top / jnp.sum(top, axis=-1, keepdims=True), experts


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k over the last axis as k rounds of argmax: the same values and indices (ties to the lower index) for
  x without NaNs. XLA's SPMD partitioner gathers lax.top_k's operand over the batch axes; argmax stays sharded."""
  values, indices = [], []
  for _ in range(k):
    i = jnp.argmax(x, axis=-1)
    values.append(jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0])
    indices.append(i.astype(jnp.int32))
    x = jnp.where(jax.nn.one_hot(i, x.shape[-1], dtype=jnp.bool_), -jnp.inf, x)
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def router_losses(logits: jax.Array, probs: jax.Array, experts: jax.Array,
                  token_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits, probs f32 [B, S, E], experts int [B, S, k], token_mask bool [B, S] ->
  (load_balancing_loss [], z_loss [], expert_load [E]: share of the k * tokens assignments, sums to 1)."""
  num_experts, k = logits.shape[-1], experts.shape[-1]
  valid = token_mask.astype(jnp.float32)[..., None]
  count = jnp.maximum(jnp.sum(valid), 1.0)
  chosen = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=-2) * valid  # [B, S, E]
  fraction = jnp.sum(chosen, axis=(0, 1)) / count  # f_e, sums to k
  mean_prob = jnp.sum(probs * valid, axis=(0, 1)) / count  # P_e
  load_balancing = num_experts * jnp.sum(fraction * mean_prob)
  z_loss = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * valid[..., 0]) / count
  return load_balancing, z_loss, fraction / k


def expert_capacity(seq_len: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Slots per expert per batch row: seq_len when dropless (capacity_factor 0), else ceil(S * k / E * factor)."""
  if capacity_factor == 0:
    return seq_len
  return max(1, min(seq_len, math.ceil(seq_len * k / num_experts * capacity_factor)))


def dispatch_and_combine(weights: jax.Array, experts: jax.Array, token_mask: jax.Array, num_experts: int,
                         capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """weights f32 [B, S, k], experts int [B, S, k], token_mask bool [B, S] ->
  (dispatch f32 [B, S, E, C] one-hot slots, combine f32 [B, S, E, C] = dispatch * router weight,
  dropped f32 []: number of (token, choice) assignments that found their expert full)."""
  b, s, k = experts.shape
  choice = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) * token_mask[:, :, None, None]  # [B, S, k, E]
  # Priority: every first choice of the row in token order, then every second choice, ...
  by_priority = jnp.swapaxes(choice, 1, 2).reshape(b, k * s, num_experts)
  slot = jnp.swapaxes((jnp.cumsum(by_priority, axis=1) - 1).reshape(b, k, s, num_experts), 1, 2)
  kept = choice * (slot < capacity)
  dropped = jnp.sum(choice - kept).astype(jnp.float32)
  # The k choices of a token are distinct experts, so the k axis folds away.
  kept_e = jnp.sum(kept, axis=2)  # [B, S, E] in {0, 1}
  slot_e = jnp.sum(slot * kept, axis=2)
  weight_e = jnp.sum(weights[..., None] * kept, axis=2)
  dispatch = jax.nn.one_hot(slot_e, capacity, dtype=jnp.float32) * kept_e[..., None]
  return dispatch, dispatch * weight_e[..., None], dropped


class Experts(nn.Module):
  """E SwiGLU MLPs with stacked weights, fed through dispatch / combine masks."""
  num_experts: int
  mlp_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, dispatch: jax.Array, combine: jax.Array) -> jax.Array:
    """x [B, S, D], dispatch / combine [B, S, E, C] -> [B, S, D]."""
    e, f, d = self.num_experts, self.mlp_dim, x.shape[-1]
    init = nn.initializers.lecun_normal(in_axis=1, out_axis=(2, 3), batch_axis=0)
    gate_up = self.param("gate_up", logical(init, ("exp", "embed", None, "mlp")), (e, d, 2, f), jnp.float32)
    init = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)
    down = self.param("down", logical(init, ("exp", "mlp", "embed")), (e, f, d), jnp.float32)
    inputs = jnp.einsum("bsec,bsd->ebcd", dispatch.astype(self.dtype), x.astype(self.dtype))
    inputs = constrain(inputs, EXPERT_ACT_AXES)
    h = jnp.einsum("ebcd,edtf->ebctf", inputs, gate_up.astype(self.dtype))
    h = constrain(swiglu(h[..., 0, :], h[..., 1, :]), ("act_exp", "act_exp_batch", None, "act_mlp"))
    out = constrain(jnp.einsum("ebcf,efd->ebcd", h, down.astype(self.dtype)), EXPERT_ACT_AXES)
    return jnp.einsum("bsec,ebcd->bsd", combine.astype(self.dtype), out)


def empty_stats(num_experts: int) -> dict[str, jax.Array]:
  """Zero MoE statistics, the start of the sum the decoder carries through its layers."""
  zero = jnp.zeros((), jnp.float32)
  return {"aux_loss": zero, "load_balancing_loss": zero, "z_loss": zero,
          "expert_load": jnp.zeros((num_experts,), jnp.float32), "dropped": zero, "assignments": zero}


def summarize(stats: dict[str, jax.Array], num_moe_layers: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Stats summed over the MoE layers -> (aux_loss [] (coef-weighted, summed over layers), metrics:
  expert_load [E] and the two router losses averaged over layers, dropped_fraction [] of all assignments)."""
  metrics = {"expert_load": stats["expert_load"] / num_moe_layers,
             "load_balancing_loss": stats["load_balancing_loss"] / num_moe_layers,
             "z_loss": stats["z_loss"] / num_moe_layers,
             "dropped_fraction": stats["dropped"] / jnp.maximum(stats["assignments"], 1.0)}
  return stats["aux_loss"], metrics


class MoeBlock(nn.Module):
  config: DecoderConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, S, D], token_mask bool [B, S] -> (y [B, S, D], this layer's stats as in `empty_stats`)."""
    c, m = self.config, self.config.moe
    e, k = m.num_experts, m.experts_per_token
    # The router runs in float32 whatever the compute dtype: bf16 logits flip near-tied top-k choices.
    logits = dense(e, ("embed", None), name="router", dtype=jnp.float32, use_bias=False)(x)
    probs, weights, experts = route(logits, k)
    load_balancing, z_loss, load = router_losses(logits, probs, experts, token_mask)
    capacity = expert_capacity(x.shape[1], e, k, m.capacity_factor)
    dispatch, combine, dropped = dispatch_and_combine(weights, experts, token_mask, e, capacity)
    y = Experts(e, c.resolved_expert_mlp_dim, self.dtype, name="experts")(x, dispatch, combine)
    stats = {"aux_loss": m.router_aux_loss_coef * load_balancing + m.router_z_loss_coef * z_loss,
             "load_balancing_loss": load_balancing, "z_loss": z_loss, "expert_load": load, "dropped": dropped,
             "assignments": k * jnp.sum(token_mask.astype(jnp.float32))}
    return constrain(y, ("act_batch", "act_length", "act_embed")), stats
