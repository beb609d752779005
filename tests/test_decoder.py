"""Decoder: RoPE, the segment mask, scan vs loop, remat grads, bf16."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures_numerics import assert_f32_close, assert_trees_f32_close
from vlm_jax.config import DecoderConfig
from vlm_jax.model import attention
from vlm_jax.model.attention import apply_rope, dot_product_attention, make_attention_mask
from vlm_jax.model.decoder import Decoder

CFG = DecoderConfig(vocab_size=64, width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def test_rope_equals_hf_rotate_half():
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, 3, 8).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4], [0, 0, 7, 8, 100]], np.int32)  # left pad + jumps
  d, theta = 8, 500.0
  inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
  freqs = positions[..., None] * inv_freq  # [B, S, D/2]
  emb = np.concatenate([freqs, freqs], -1)[:, :, None]
  rotate_half = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  expected = x * np.cos(emb) + rotate_half * np.sin(emb)
  np.testing.assert_allclose(np.asarray(apply_rope(x, positions, theta)), expected, atol=2e-5)
  # position 0 is the identity
  np.testing.assert_array_equal(np.asarray(apply_rope(x, np.zeros_like(positions), theta)), x)


def test_mask_truth_table():
  segments = np.array([[1, 1, 2, 2, 0]], np.int32)  # two packed sequences and a padding slot
  expected = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(np.asarray(make_attention_mask(segments, segments))[0, 0], expected)
  left_padded = np.array([[0, 0, 1, 1]], np.int32)
  np.testing.assert_array_equal(np.asarray(make_attention_mask(left_padded, left_padded))[0, 0],
                                np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool))
  # a decode step at cache slot 3 sees filled slots 2..3 of its segment, not padding nor empty slots
  cache = np.array([[0, 0, 1, 1, 0, 0]], np.int32)
  np.testing.assert_array_equal(np.asarray(make_attention_mask(np.array([[1]]), cache, q_offset=3))[0, 0, 0],
                                np.array([0, 0, 1, 1, 0, 0], bool))


def _inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 64, (2, 7)).astype(np.int32)
  segments = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
  positions = np.array([[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6]], np.int32)
  return ids, segments, positions


def _restack(params, num_layers):
  params = dict(params)
  params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[params.pop(f"layers_{i}") for i in range(num_layers)])
  return params


def test_causal_blocks_equal_dense_attention():
  """causal=True (query blocks against the keys up to their own end) gives dense attention's output and
  gradients, with packed segments and padding in the rows; S = 3 blocks."""
  b, s, h, kv, d = 2, 3 * attention.CAUSAL_BLOCK, 4, 2, 8
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, s, h, d), (b, s, kv, d), (b, s, kv, d)))
  segments = np.ones((b, s), np.int32)
  segments[0, 100:] = 2  # two packed sequences
  segments[1, 300:] = 0  # right padding
  mask = make_attention_mask(jnp.asarray(segments), jnp.asarray(segments))

  def loss(q, k, v, causal):
    out = dot_product_attention(q, k, v, mask, causal=causal)
    return jnp.sum(jnp.where(segments[:, :, None, None] > 0, out, 0) ** 2), out
  (dense_loss, dense), dense_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
  (blocked_loss, blocked), blocked_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, True)
  valid = segments > 0
  assert_f32_close(np.asarray(blocked)[valid], np.asarray(dense)[valid])
  np.testing.assert_allclose(blocked_loss, dense_loss, rtol=1e-5)
  assert_trees_f32_close(blocked_grads, dense_grads)


def test_bf16_attention_gradients_match_float32_autodiff():
  """bf16 attention (custom VJP: bf16-input dots, float32 softmax and softmax gradient) gives the output and
  the q/k/v gradients of float32 autodiff on the same bf16 values, to bf16 rounding (measured max relative
  error 4e-3 of each tensor's largest entry)."""
  b, s, h, kv, d = 2, 16, 4, 2, 8
  rng = np.random.default_rng(1)
  shapes = ((b, s, h, d), (b, s, kv, d), (b, s, kv, d))
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in shapes)
  segments = np.ones((b, s), np.int32)
  segments[1, 11:] = 0  # right padding
  mask = make_attention_mask(jnp.asarray(segments), jnp.asarray(segments))
  weights = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32) * (segments > 0)[:, :, None, None]

  def loss(q, k, v):
    out = dot_product_attention(q, k, v, mask)
    return jnp.sum(out.astype(jnp.float32) * weights), out
  (got_loss, got), got_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  (want_loss, want), want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*f32)
  assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_grads)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2 * np.abs(want).max())
  for name, g, w in zip("qkv", got_grads, want_grads):
    w = np.asarray(w)
    err = np.abs(np.asarray(g, np.float32) - w).max() / np.abs(w).max()
    assert err < 1.5e-2, (name, err)
  # padding rows get no gradient into the keys they cannot see
  assert np.all(np.asarray(got_grads[1], np.float32)[1, 11:] == 0)


def test_scan_equals_loop():
  ids, segments, positions = _inputs()
  loop = Decoder(CFG, scan_layers=False)
  params = nn.unbox(loop.init(jax.random.key(0), ids, segments, positions)["params"])
  logits_loop, _ = jax.jit(loop.apply)({"params": params}, ids, segments, positions)
  logits_scan, _ = jax.jit(Decoder(CFG, scan_layers=True).apply)({"params": _restack(params, 2)}, ids, segments,
                                                                  positions)
  assert float(jnp.abs(logits_loop).max()) > 0.1
  assert_f32_close(logits_scan, logits_loop)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_equal_grads(remat):
  ids, segments, positions = _inputs()
  params = nn.unbox(Decoder(CFG).init(jax.random.key(0), ids, segments, positions)["params"])

  def grads(model):
    loss = lambda p: jnp.mean(model.apply({"params": p}, ids, segments, positions)[0] ** 2)
    return jax.jit(jax.grad(loss))(params)
  reference, rematted = grads(Decoder(CFG, remat="none")), grads(Decoder(CFG, remat=remat))
  assert_trees_f32_close(rematted, reference)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(reference)) > 1e-4


def test_remat_policies_save_what_they_say():
  """What the backward pass keeps of each scanned layer: the residuals of jax.vjp shaped [layers, B, S, ...]
  (abstractly: eval_shape compiles nothing). full keeps the layer's input only; dots keeps matmul outputs and
  recomputes the elementwise rest (RMSNorm's [.., 1] statistics among it); none keeps everything."""
  ids, segments, positions = _inputs()
  params = jax.eval_shape(lambda: nn.unbox(Decoder(CFG).init(jax.random.key(0), ids, segments, positions)["params"]))
  per_layer = (CFG.num_layers, *ids.shape)

  def saved(remat):
    model = Decoder(CFG, remat=remat)
    loss = lambda p: jnp.mean(model.apply({"params": p}, ids, segments, positions)[0] ** 2)
    residuals = jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))
    return sorted(x.shape[3:] for x in residuals if x.shape[:3] == per_layer)
  none, full, dots = saved("none"), saved("full"), saved("dots")
  assert full == [(CFG.width,)]  # the carried hidden states [L, B, S, D]
  assert (1,) in none and (1,) not in dots
  assert (CFG.mlp_dim,) in dots  # the MLP's gate and up matmuls
  assert len(full) < len(dots) < len(none) and all(dots.count(s) <= none.count(s) for s in dots)


def test_padding_and_packing_do_not_leak():
  """Changing tokens of one packed segment or of padding leaves the other segment's logits unchanged."""
  ids, segments, positions = _inputs()
  model = Decoder(CFG)
  params = nn.unbox(model.init(jax.random.key(0), ids, segments, positions)["params"])
  apply = jax.jit(model.apply)
  base, _ = apply({"params": params}, ids, segments, positions)
  changed = ids.copy()
  changed[0, 3:] = (changed[0, 3:] + 1) % 64  # segment 2 and the padding slot of row 0
  other, _ = apply({"params": params}, changed, segments, positions)
  np.testing.assert_array_equal(np.asarray(other)[0, :3], np.asarray(base)[0, :3])
  assert float(jnp.abs(other[0, 3:6] - base[0, 3:6]).max()) > 1e-3


def test_bfloat16_close_to_float32():
  ids, segments, positions = _inputs()
  params = nn.unbox(Decoder(CFG).init(jax.random.key(0), ids, segments, positions)["params"])
  f32, _ = jax.jit(Decoder(CFG).apply)({"params": params}, ids, segments, positions)
  bf16, hidden = jax.jit(Decoder(CFG, dtype=jnp.bfloat16).apply)({"params": params}, ids, segments, positions)
  assert bf16.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
  err = float(jnp.abs(bf16 - f32).max())
  scale = float(jnp.abs(f32).max())
  # bf16 has an 8-bit mantissa (relative step 2^-8 = 0.4%); 2 layers of rounding stay within 3% of the range.
  assert 0 < err < 0.03 * scale, (err, scale)


def test_mlp_chunks_give_the_same_logits_and_gradients():
  """mlp_chunks=2 runs the MLP on two halves of the sequence (6 tokens): same params, same logits and gradients
  (float32). A sequence it does not divide (7 tokens) runs whole."""
  ids, segments, positions = _inputs()
  chunked = dataclasses.replace(CFG, mlp_chunks=2)
  params = nn.unbox(Decoder(CFG).init(jax.random.key(0), ids, segments, positions)["params"])

  def loss_and_grads(cfg, ids, segments, positions):
    loss = lambda p: jnp.mean(Decoder(cfg).apply({"params": p}, ids, segments, positions)[0] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)
  for cut in (0, 1):
    args = [a[:, :a.shape[1] - cut] for a in (ids, segments, positions)]
    (loss, grads), (loss_2, grads_2) = loss_and_grads(CFG, *args), loss_and_grads(chunked, *args)
    np.testing.assert_allclose(float(loss_2), float(loss), rtol=1e-6)
    assert_trees_f32_close(grads_2, grads)  # the gradients of the kernels are sums of two halves' partial sums
