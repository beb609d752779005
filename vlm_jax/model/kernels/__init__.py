"""The one backend switch: model files call these functions, `model.kernels` picks what runs.

  cpu    hand-written VJPs tuned for XLA:CPU (cpu.py): compute dtype in, float32 accumulation, one rounding
  plain  plain autodiff (plain.py), attention by jax.nn.dot_product_attention: what XLA:TPU / GPU fuse best
  tpu    plain, with self-attention (the decoder's causal one, the ViT's) in the Pallas splash kernel (tpu.py)
  auto   by jax.default_backend(): cpu -> cpu, tpu -> tpu, anything else -> plain

The choice is read while the model is traced: `VLM` methods run inside `use(config.kernels)`; a module used on
its own gets "auto". `vlm-jax aot` compiles with "tpu" (its target) where the config says "auto".
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

from vlm_jax.model.kernels import cpu, plain

KERNELS = ("auto", "cpu", "plain", "tpu")
_ACTIVE = contextvars.ContextVar("vlm_jax_kernels", default="auto")


def resolve(setting: str) -> str:
  """'auto' -> the kernels of jax.default_backend(); any other of KERNELS -> itself."""
  if setting not in KERNELS:
    raise ValueError(f"Unknown kernels {setting!r}; choose one of {', '.join(KERNELS)}.")
  if setting != "auto":
    return setting
  return {"cpu": "cpu", "tpu": "tpu"}.get(jax.default_backend(), "plain")


@contextlib.contextmanager
def use(setting: str) -> Iterator[str]:
  """Traces inside run with these kernels (resolved); yields the resolved name."""
  token = _ACTIVE.set(resolve(setting))
  try:
    yield _ACTIVE.get()
  finally:
    _ACTIVE.reset(token)


def current() -> str:
  """The resolved kernels of the code being traced now."""
  return resolve(_ACTIVE.get())


def _ops():
  return cpu if current() == "cpu" else plain


def matmul(x: jax.Array, kernel: jax.Array, n_in: int, float32_out: bool = False) -> jax.Array:
  """x [..., *in] . kernel [*in, *out] (float32 weights, cast to x's dtype) -> [..., *out] in x's dtype, or the
  float32 accumulator with `float32_out` (the output head)."""
  return _ops().matmul(x, kernel, n_in, float32_out)


def unembed(x: jax.Array, table: jax.Array) -> jax.Array:
  """Tied output head: x [..., D] . table [V, D]^T -> float32 [..., V]."""
  return _ops().unembed(x, table)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up computed in float32, returned in gate's dtype."""
  return _ops().swiglu(gate, up)


def scale_features(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x [..., D] * scale [D] (a float32 norm scale, cast to x's dtype) -> x's dtype."""
  return _ops().scale_features(x, scale)


def add_bias(y: jax.Array, bias: jax.Array, n_out: int) -> jax.Array:
  """y [..., *F] + bias [*F] (float32, cast to y's dtype; F = the trailing n_out dims)."""
  return _ops().add_bias(y, bias, n_out)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                          causal: bool = False, segment_ids: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T * D^-0.5) v, float32 logits and softmax: q [B, S, H, D], k, v [B, L, KV, D] (GQA: query head
  h reads kv head h // (H/KV)), mask bool [B, 1, S, L] or None -> [B, S, H, D] in q's dtype.

  causal=True promises that the mask is causal over the same S slots; with segment_ids int [B, S] too (the
  mask being `make_attention_mask(segment_ids, segment_ids)`), the tpu kernels run the splash kernel, which
  builds that mask itself; they do for unmasked self-attention (the ViT) too. Fully masked (padding) queries
  give finite garbage, never NaN.
  """
  name = current()
  if name == "cpu":
    return cpu.dot_product_attention(q, k, v, mask, causal=causal)
  if name == "tpu" and ((causal and segment_ids is not None) or (mask is None and not causal)):
    from vlm_jax.model.kernels import tpu  # pylint: disable=import-outside-toplevel  (Pallas: only when used)
    if tpu.supports(q, k, causal):
      return tpu.splash_attention(q, k, v, segment_ids if causal else None, causal=causal)
  return plain.dot_product_attention(q, k, v, mask)
