"""ViT feature selection and numerics against a NumPy transcription of HF SigLIP / CLIP, and Fuyu patches."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from fixtures_numerics import assert_f32_close

from vlm_jax.config import VisionConfig
from vlm_jax.model.vision import VisionEncoder

DEPTH, WIDTH, HEADS = 3, 16, 2


def _config(kind, **kw):
  base = dict(kind=kind, image_size=16, patch_size=4, width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=32,
              layer_norm_eps=1e-6 if kind == "siglip" else 1e-5, act="gelu_tanh" if kind == "siglip" else "quick_gelu")
  base.update(kw)
  return VisionConfig(**base)


def _init(cfg, pixels):
  params = nn.unbox(VisionEncoder(cfg, scan_layers=False).init(jax.random.key(0), pixels)["params"])
  # Random (not 1 / 0) norm params and biases, so that mixing them up would show.
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(1)
  return jax.tree.unflatten(tree, [np.asarray(l) + 0.1 * rng.randn(*l.shape).astype(np.float32) for l in leaves])


def _ln(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _act(name, x):
  if name == "gelu_tanh":
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  return x / (1 + np.exp(-1.702 * x))


def _block(x, p, cfg):
  """HF SiglipEncoderLayer / CLIPEncoderLayer in NumPy (float64)."""
  b, t, w = x.shape
  hd = w // cfg.num_heads
  h = _ln(x, p["ln1"], cfg.layer_norm_eps)
  q, k, v = (np.einsum("btw,whd->bhtd", h, p["attn"][n]["kernel"]) + p["attn"][n]["bias"][None, :, None]
             for n in ("q", "k", "v"))
  logits = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = np.einsum("bhtd,hdw->btw", probs @ v, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]
  x = x + attn
  h = _ln(x, p["ln2"], cfg.layer_norm_eps)
  h = _act(cfg.act, h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
  return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def _hidden_states(pixels, params, cfg):
  """HF `hidden_states` tuple (depth + 1 entries) in NumPy."""
  p, (b, hgt, wid, c) = cfg.patch_size, pixels.shape
  patches = pixels.reshape(b, hgt // p, p, wid // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
  x = patches @ params["patch_embed"]["kernel"].reshape(p * p * c, -1)
  if cfg.kind == "clip":
    x = np.concatenate([np.broadcast_to(params["cls_token"], (b, 1, x.shape[-1])), x], axis=1)
  else:
    x = x + params["patch_embed"]["bias"]
  x = x + params["pos_embed"]
  if cfg.kind == "clip":
    x = _ln(x, params["pre_layernorm"], cfg.layer_norm_eps)
  states = [x]
  for i in range(cfg.depth):
    states.append(_block(states[-1], params[f"layers_{i}"], cfg))
  return states


@pytest.mark.parametrize("kind,feature_layer,select,post", [
    ("siglip", -1, "full", True),  # Idefics3: last_hidden_state
    ("siglip", -1, "full", False),
    ("siglip", 1, "full", False),
    ("clip", -2, "default", False),  # LLaVA-1.5
    ("clip", 0, "full", True),
    ("clip", -1, "default", True),
])
def test_feature_layer_select_strategy_post_layernorm(kind, feature_layer, select, post):
  cfg = _config(kind, feature_layer=feature_layer, select_strategy=select, post_layernorm=post)
  pixels = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  params = _init(cfg, pixels)
  assert ("cls_token" in params) == ("pre_layernorm" in params) == (kind == "clip")
  assert ("bias" in params["patch_embed"]) == (kind == "siglip") and "post_layernorm" in params
  out = VisionEncoder(cfg, scan_layers=False).apply({"params": params}, pixels)
  np64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  expected = _hidden_states(pixels.astype(np.float64), np64, cfg)[feature_layer]
  if select == "default" and kind == "clip":
    expected = expected[:, 1:]
  if post:
    expected = _ln(expected, np64["post_layernorm"], cfg.layer_norm_eps)
  assert out.shape == (2, cfg.tokens_per_image, WIDTH)
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


def test_scanned_equals_unscanned_and_skips_unneeded_blocks():
  cfg = _config("siglip", feature_layer=1)
  pixels = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  params = _init(cfg, pixels)
  stacked = dict(params)
  stacked["layers"] = jax.tree.map(lambda *a: np.stack(a), *[stacked.pop(f"layers_{i}") for i in range(DEPTH)])
  scanned = VisionEncoder(cfg, scan_layers=True)
  assert jax.tree.structure(nn.unbox(scanned.init(jax.random.key(0), pixels)["params"])) == jax.tree.structure(stacked)
  out_scan = scanned.apply({"params": stacked}, pixels)
  out_loop = VisionEncoder(cfg, scan_layers=False).apply({"params": params}, pixels)
  assert_f32_close(out_scan, out_loop)  # an AVX2 machine was one element off by 1.19e-6
  # feature_layer=1 of 3 blocks: one block's matmuls only (q, k, v, out, 2 attention einsums, fc1, fc2).
  def dots(module, p):
    jaxpr = jax.make_jaxpr(lambda p: module.apply({"params": p}, pixels))(p)
    return str(jaxpr).count("dot_general")
  assert dots(VisionEncoder(cfg, scan_layers=False), params) == 8
  assert dots(VisionEncoder(_config("siglip"), scan_layers=False), params) == 8 * DEPTH
  scan_lengths = [e.params["length"] for e in jax.make_jaxpr(
      lambda p: scanned.apply({"params": p}, pixels))(stacked).jaxpr.eqns if e.primitive.name == "scan"]
  assert scan_lengths == [1]


def test_fuyu_linear_patch_embedding():
  cfg = _config("none", patch_size=8)
  pixels = np.random.RandomState(0).randn(1, 16, 16, 3).astype(np.float32)
  model = VisionEncoder(cfg)
  params = _init(cfg, pixels)
  assert jax.tree.map(np.shape, params) == {"patch_embed": {"kernel": (8 * 8 * 3, WIDTH), "bias": (WIDTH,)}}
  out = np.asarray(model.apply({"params": params}, pixels))
  for i in range(2):  # Fuyu's patchify: patches row-major, each flattened as (row, col, channel)
    for j in range(2):
      patch = pixels[0, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8, :].reshape(-1)
      expected = patch @ params["patch_embed"]["kernel"] + params["patch_embed"]["bias"]
      np.testing.assert_allclose(out[0, i * 2 + j], expected, atol=1e-5)


def test_sincos2d_pos_embed_init():
  """pos_embed_init='sincos2d' starts the learned table at [sin(col f), cos(col f), sin(row f), cos(row f)]
  with f = 10000^(-i / (W/4 - 1)), patches row-major; CLIP's CLS row starts at zero."""
  cfg = _config("siglip", width=8, pos_embed_init="sincos2d")  # 4x4 patches, frequencies (1, 1e-4)
  pixels = np.zeros((1, 16, 16, 3), np.float32)
  table = np.asarray(nn.unbox(VisionEncoder(cfg, scan_layers=False).init(jax.random.key(0), pixels)["params"])["pos_embed"])
  assert table.shape == (16, 8)
  row, col = 2, 3
  f = np.array([1.0, 1e-4])
  want = np.concatenate([np.sin(col * f), np.cos(col * f), np.sin(row * f), np.cos(row * f)])
  np.testing.assert_allclose(table[row * 4 + col], want, rtol=1e-6)
  np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=0)
  clip = _config("clip", width=8, pos_embed_init="sincos2d")
  clip_table = np.asarray(nn.unbox(VisionEncoder(clip, scan_layers=False).init(jax.random.key(0), pixels)["params"])["pos_embed"])
  np.testing.assert_array_equal(clip_table[0], np.zeros(8))
  np.testing.assert_array_equal(clip_table[1:], table)


def test_sincos2d_needs_width_divisible_by_4():
  cfg = _config("siglip", width=6, num_heads=2, pos_embed_init="sincos2d")
  with pytest.raises(ValueError, match="divisible by 4, got 6"):
    VisionEncoder(cfg, scan_layers=False).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
