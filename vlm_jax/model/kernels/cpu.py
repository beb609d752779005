"""XLA:CPU kernels: hand-written VJPs that take the compute dtype in, accumulate in float32 and round once.

Plain autodiff of the same ops runs its bf16 backward on float32 cotangents and writes parameter gradients as
reduce-windows and transposes on XLA:CPU; these avoid both (measurements in docs/performance.md).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _dims(lhs_contract, rhs_contract):
  return ((tuple(lhs_contract), tuple(rhs_contract)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x: jax.Array, kernel: jax.Array, n_in: int, float32_out: bool = False) -> jax.Array:
  """x [..., *in] . kernel [*in, *out] (float32 master weights) -> [..., *out] in x's dtype, or with
  `float32_out` the float32 accumulator (the output head, read by the loss in float32).

  Every product takes x's dtype in and accumulates in float32, both ways; the kernel gradient comes out in
  float32 in the kernel's own layout (x^T . g), with no transpose copy.
  """
  return _matmul_fwd(x, kernel, n_in, float32_out)[0]


def _matmul_fwd(x, kernel, n_in, float32_out):
  k = kernel.astype(x.dtype)
  y = jax.lax.dot_general(x, k, _dims(range(x.ndim - n_in, x.ndim), range(n_in)),
                          preferred_element_type=jnp.float32)
  return (y if float32_out else y.astype(x.dtype)), (x, k)


def _matmul_bwd(n_in, float32_out, residuals, g):
  x, k = residuals
  g = g.astype(x.dtype)
  batch, n_out = x.ndim - n_in, k.ndim - n_in
  dx = jax.lax.dot_general(g, k, _dims(range(batch, batch + n_out), range(n_in, k.ndim)),
                           preferred_element_type=jnp.float32)
  dk = jax.lax.dot_general(x, g, _dims(range(batch), range(batch)), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def unembed(x: jax.Array, table: jax.Array) -> jax.Array:
  """x [..., D] . table [V, D]^T (a float32 embedding table) -> the float32 accumulator [..., V]: a tied output
  head with `matmul`'s numerics; the table's gradient comes out [V, D] (g^T . x), with no transpose copy."""
  return _unembed_fwd(x, table)[0]


def _unembed_fwd(x, table):
  t = table.astype(x.dtype)
  return jax.lax.dot_general(x, t, _dims([x.ndim - 1], [1]), preferred_element_type=jnp.float32), (x, t)


def _unembed_bwd(residuals, g):
  x, t = residuals
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, t, _dims([g.ndim - 1], [0]), preferred_element_type=jnp.float32)
  rows = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
  return dx.astype(x.dtype), jax.lax.dot_general(*rows, _dims([0], [0]), preferred_element_type=jnp.float32)


unembed.defvjp(_unembed_fwd, _unembed_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, computed in float32 and returned in gate's dtype: one float32 pass each way, one
  rounding at the end (bf16 autodiff rounds after every op, and ran 2x slower on XLA:CPU)."""
  return _swiglu_fwd(gate, up)[0]


def _swiglu_fwd(gate, up):
  g = gate.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype), (gate, up)


def _swiglu_bwd(residuals, d):
  gate, up = residuals
  g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), d.astype(jnp.float32)
  s = jax.nn.sigmoid(g)
  return (d * u * s * (1 + g * (1 - s))).astype(gate.dtype), (d * g * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def scale_features(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x [..., D] * scale [D] (a float32 param, cast to x's dtype first) -> x's dtype: a norm's learned scale;
  its gradient is a ones-vector dot in float32 (`_sum_over_positions`)."""
  return _scale_features_fwd(x, scale)[0]


def _scale_features_fwd(x, scale):
  return scale.astype(x.dtype) * x, (x, scale)


def _scale_features_bwd(residuals, g):
  x, scale = residuals
  return g * scale.astype(g.dtype), _sum_over_positions(g.astype(jnp.float32) * x.astype(jnp.float32), 1)


def _sum_over_positions(x: jax.Array, n_features: int) -> jax.Array:
  """x [..., *F] summed over every leading dim -> float32 [*F] (F = the trailing n_features dims), as a
  ones-vector dot with float32 accumulation: XLA:CPU turns a plain reduce over many positions into a float32
  copy and a slow reduce-window."""
  features = x.shape[x.ndim - n_features:]
  rows = x.reshape(-1, math.prod(features))
  return jnp.dot(jnp.ones(rows.shape[0], x.dtype), rows, preferred_element_type=jnp.float32).reshape(features)


scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def add_bias(y: jax.Array, bias: jax.Array, n_out: int) -> jax.Array:
  """y [..., *F] + bias [*F] (a float32 param, cast to y's dtype first; F = the trailing n_out dims); the bias
  gradient is `_sum_over_positions` of g, rounded to y's dtype as autodiff's is."""
  return _add_bias_fwd(y, bias, n_out)[0]


def _add_bias_fwd(y, bias, n_out):
  return y + bias.astype(y.dtype), None


def _add_bias_bwd(n_out, _, g):
  return g, _sum_over_positions(g, n_out).astype(g.dtype).astype(jnp.float32)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


CAUSAL_BLOCK = 128  # query block of `causal=True` attention


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                          causal: bool = False) -> jax.Array:
  """softmax(q k^T * D^-0.5) v with float32 logits and softmax (HF eager numerics).

  q: [B, S, H, D]; k, v: [B, L, KV, D] with H a multiple of KV (query head h reads kv head h // (H/KV), HF's
  repeat_kv order); mask: bool [B, 1, S, L] or None. Fully masked rows (padding queries) give finite garbage,
  never NaN. Returns [B, S, H, D] in q's dtype.

  causal=True promises that `mask` already forbids every key slot after its query slot (queries and keys are
  the same S slots): the queries then go in blocks of CAUSAL_BLOCK, each against the keys up to its own end,
  skipping the masked upper triangle's logits.
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
  takes q's dtype in and accumulates in float32. Logits keep q's (S, G) order, so no transpose copy."""
  probs = _masked_softmax(_dot("bskgd,btkd->bksgt", q, k) * scale, mask).astype(q.dtype)
  return _dot("bksgt,btkd->bksgd", probs, v).transpose(0, 2, 1, 3, 4).astype(q.dtype), probs


def _dot(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_low_precision(q, k, v, mask, scale):
  """`_attention_forward` for bf16 q/k/v with a hand-written backward: all six matmuls take bf16 inputs and
  accumulate in float32, the softmax gradient runs in float32, the probabilities are kept in bf16."""
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
