"""Symmetric int8 weights with one float32 scale per output channel (absmax), for QLoRA-style frozen bases.

A kernel W [*lead, *in, *out] (lead: the scanned `layers` / MoE `exp` axes, see vlm_jax/model/lora.py) is stored
as q = round(W / s) in int8 [-127, 127] with s = max|W| / 127 over its input axes, s [*lead, *out]; so
|W - q * s| <= s / 2 in every channel (and W is exact where it is the channel's absmax). An all-zero channel
gets s = 1 (q = 0). Our own rather than qwix / aqt: neither is installed, and the frozen base needs only
these two functions (no quantized matmul: the kernel is dequantized to the compute dtype before the model runs).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

QMAX = 127


def scale_shape(shape: tuple[int, ...], lead: int, n_in: int) -> tuple[int, ...]:
  """The scale's shape [*lead, *out] for a kernel of `shape` with `lead` leading and `n_in` input axes."""
  return tuple(shape[:lead]) + tuple(shape[lead + n_in:])


def _expand(scale: jax.Array, lead: int, n_in: int) -> jax.Array:
  """[*lead, *out] -> [*lead, 1 x n_in, *out], broadcastable against the kernel."""
  return scale.reshape(scale.shape[:lead] + (1,) * n_in + scale.shape[lead:])


def quantize(w: jax.Array, lead: int, n_in: int) -> tuple[jax.Array, jax.Array]:
  """W -> (q int8, same shape; s float32 [*lead, *out]), absmax over the input axes, rounded to nearest even."""
  w = w.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w), axis=tuple(range(lead, lead + n_in)))
  scale = jnp.where(absmax > 0, absmax / QMAX, 1.0).astype(jnp.float32)
  q = jnp.clip(jnp.round(w / _expand(scale, lead, n_in)), -QMAX, QMAX).astype(jnp.int8)
  return q, scale


def dequantize(q: jax.Array, scale: jax.Array, lead: int, n_in: int, dtype: Any = jnp.float32) -> jax.Array:
  """q * s in float32, then rounded once to `dtype` (XLA fuses the two: no float32 copy of the kernel)."""
  return (q.astype(jnp.float32) * _expand(scale, lead, n_in)).astype(dtype)
