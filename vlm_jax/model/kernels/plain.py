"""Plain autodiff kernels (TPU, GPU, and the reference for the others): XLA fuses and schedules these itself.

Dots take the compute dtype in; the TPU MXU and GPU tensor cores accumulate bf16 products in float32 and round
the result once, and autodiff's backward dots then run in bf16 too. Shapes and dtypes as in cpu.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, kernel: jax.Array, n_in: int, float32_out: bool = False) -> jax.Array:
  """x [..., *in] . kernel [*in, *out] -> [..., *out] in x's dtype, or float32 with `float32_out`."""
  dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
  return jax.lax.dot_general(x, kernel.astype(x.dtype), dims,
                             preferred_element_type=jnp.float32 if float32_out else x.dtype)


def unembed(x: jax.Array, table: jax.Array) -> jax.Array:
  """x [..., D] . table [V, D]^T -> float32 [..., V]."""
  return jax.lax.dot_general(x, table.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up in float32 (elementwise, fused), returned in gate's dtype."""
  return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def scale_features(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x [..., D] * scale [D] in x's dtype."""
  return scale.astype(x.dtype) * x


def add_bias(y: jax.Array, bias: jax.Array, n_out: int) -> jax.Array:
  """y [..., *F] + bias [*F] in y's dtype."""
  assert bias.ndim == n_out
  return y + bias.astype(y.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """jax.nn.dot_product_attention (float32 logits and softmax): q [B, S, H, D], k, v [B, L, KV, D] (GQA: query
  head h reads kv head h // (H/KV)), mask bool [B, 1, S, L] or None -> [B, S, H, D] in q's dtype."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1 / math.sqrt(q.shape[-1]))
