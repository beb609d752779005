"""Mixture of experts: routing and losses vs NumPy, dropless and capacity dispatch vs a token loop, aux losses
out of the VLM, scan groups vs loop, KV cache, sharding over the expert axis, shapes_moe active params."""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_model import (IMG, assert_decode_equals_full_forward, jit_apply, make_batch, make_row, random_pixels,
                            sharded_value_and_grad)
from fixtures_numerics import assert_f32_close, assert_trees_f32_close
from jax.sharding import PartitionSpec as P

from vlm_jax import config, sharding
from vlm_jax.config import DecoderConfig, MeshConfig, ModelConfig, MoeConfig, ProjectorConfig, VisionConfig
from vlm_jax.losses import token_cross_entropy
from vlm_jax.model import moe
from vlm_jax.model.layers import Dense
from vlm_jax.model.vlm import VLM, abstract_params, init_params

E, K, D, F = 4, 2, 16, 8


def _np_softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _np_route(logits, k):
  probs = _np_softmax(logits)
  experts = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
  weights = np.take_along_axis(probs, experts, -1)
  return probs, weights / weights.sum(-1, keepdims=True), experts


def _np_router_losses(logits, mask, k):
  """HF Mixtral load_balancing_loss_func (one layer, attention mask) and the mean squared logsumexp."""
  probs, _, experts = _np_route(logits, k)
  valid = mask.reshape(-1)
  flat_probs, flat_experts = probs.reshape(-1, logits.shape[-1])[valid], experts.reshape(-1, k)[valid]
  tokens_per_expert = np.bincount(flat_experts.reshape(-1), minlength=logits.shape[-1]) / valid.sum()
  load_balancing = logits.shape[-1] * np.sum(tokens_per_expert * flat_probs.mean(0))
  lse = np.log(np.exp(logits.reshape(-1, logits.shape[-1])[valid]).sum(-1))
  return load_balancing, np.mean(lse ** 2), tokens_per_expert / k


def _np_moe(x, mask, params, k, capacity):
  """Token loop: each row's choices claim expert slots first-choices-first, in token order; kept choices add
  weight * SwiGLU_e(x). Returns (y, dropped count)."""
  router, gate_up, down = (np.asarray(params["router"]["kernel"], np.float64),
                           np.asarray(params["experts"]["gate_up"], np.float64),
                           np.asarray(params["experts"]["down"], np.float64))
  y, dropped = np.zeros(x.shape), 0
  for b in range(x.shape[0]):
    _, weights, experts = _np_route(x[b] @ router, k)
    fill = np.zeros(router.shape[1], int)
    for j in range(k):
      for s in range(x.shape[1]):
        if not mask[b, s]:
          continue
        e = experts[s, j]
        if fill[e] >= capacity:
          dropped += 1
          continue
        fill[e] += 1
        h = np.einsum("d,dtf->tf", x[b, s], gate_up[e])
        y[b, s] += weights[s, j] * ((h[0] / (1 + np.exp(-h[0])) * h[1]) @ down[e])
  return y, dropped


def _block(capacity_factor=0.0):
  return moe.MoeBlock(DecoderConfig(width=D, mlp_dim=2 * F, moe=MoeConfig(
      num_experts=E, experts_per_token=K, expert_mlp_dim=F, capacity_factor=capacity_factor,
      router_aux_loss_coef=0.1, router_z_loss_coef=0.01)), jnp.float32)


def _block_inputs(seed=0):
  x = np.random.RandomState(seed).randn(2, 6, D).astype(np.float32)
  mask = np.ones((2, 6), bool)
  mask[1, 4:] = False  # right padding
  return x, mask


def test_route_and_router_losses_equal_numpy():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 5, E).astype(np.float32) * 2
  mask = np.ones((2, 5), bool)
  mask[0, 3:] = False
  probs, weights, experts = jax.jit(moe.route, static_argnums=1)(logits, K)
  ref_probs, ref_weights, ref_experts = _np_route(logits.astype(np.float64), K)
  np.testing.assert_array_equal(np.asarray(experts), ref_experts)
  np.testing.assert_allclose(np.asarray(weights), ref_weights, atol=1e-6)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
  lb, z, load = moe.router_losses(logits, probs, experts, mask)
  ref_lb, ref_z, ref_load = _np_router_losses(logits.astype(np.float64), mask, K)
  np.testing.assert_allclose([float(lb), float(z)], [ref_lb, ref_z], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(load), ref_load, atol=1e-6)
  assert abs(float(np.asarray(load).sum()) - 1.0) < 1e-6 and float(lb) > 1.0  # >= k = 1 only when balanced
  # perfectly uniform routing gives the minimum k (f_e = k/E, P_e = 1/E)
  uniform = np.zeros((1, 4, E), np.float32)
  _, uw, ue = moe.route(uniform, K)
  lb_uniform, _, _ = moe.router_losses(uniform, jnp.full((1, 4, E), 1 / E), jnp.array([[[0, 1], [2, 3], [0, 1],
                                                                                         [2, 3]]]),
                                       np.ones((1, 4), bool))
  np.testing.assert_allclose(float(lb_uniform), K, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(uw), 0.5)


def test_top_k_equals_lax_top_k_with_ties_and_gradients():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 8)), jnp.float32)
  x = x.at[0, 0].set(jnp.asarray([1., 2., 2., 0., 2., -1., 0., 0.]))  # a three-way tie: lower indices first
  for k in (1, 2, 3):
    values, indices = moe.top_k(x, k)
    ref_values, ref_indices = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(indices, ref_indices)
  assert moe.top_k(x, 3)[1][0, 0].tolist() == [1, 2, 4] and moe.top_k(x, 2)[1].dtype == jnp.int32
  grad = jax.grad(lambda x: jnp.sum(moe.top_k(x, 2)[0] * jnp.asarray([3., 5.])))(x)
  ref = jax.grad(lambda x: jnp.sum(jax.lax.top_k(x, 2)[0] * jnp.asarray([3., 5.])))(x)
  np.testing.assert_array_equal(grad, ref)


def test_dropless_block_equals_token_loop():
  x, mask = _block_inputs()
  block = _block()
  params = nn.unbox(block.init(jax.random.key(1), x, mask)["params"])
  assert params["router"]["kernel"].shape == (D, E)
  assert params["experts"]["gate_up"].shape == (E, D, 2, F) and params["experts"]["down"].shape == (E, F, D)
  y, stats = jax.jit(block.apply)({"params": params}, x, mask)
  ref, dropped = _np_moe(x.astype(np.float64), mask, params, K, capacity=6)
  assert dropped == 0 and float(stats["dropped"]) == 0
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(y)[1, 4:], 0)  # padding is not dispatched
  assert np.abs(ref).max() > 0.1
  lb, z, load = _np_router_losses(x.astype(np.float64) @ np.asarray(params["router"]["kernel"], np.float64), mask, K)
  np.testing.assert_allclose(float(stats["aux_loss"]), 0.1 * lb + 0.01 * z, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["expert_load"]), load, atol=1e-6)
  assert float(stats["assignments"]) == K * mask.sum()


def test_block_and_load_balancing_loss_equal_hf_mixtral():
  """The documented export (router.T, gate_up -> gate_up_proj, down -> down_proj) makes transformers'
  MixtralSparseMoeBlock compute our dropless block; our loss equals its load_balancing_loss_func."""
  import torch
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
  x, mask = _block_inputs(seed=4)
  block = _block()
  params = nn.unbox(block.init(jax.random.key(2), x, mask)["params"])
  y, stats = jax.jit(block.apply)({"params": params}, x, mask)
  hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                           num_experts_per_tok=K)).eval()
  router, gate_up, down = (np.asarray(a) for a in (params["router"]["kernel"], params["experts"]["gate_up"],
                                                   params["experts"]["down"]))
  hf.load_state_dict({"gate.weight": torch.tensor(router.T),
                      "experts.gate_up_proj": torch.tensor(gate_up.reshape(E, D, 2 * F).transpose(0, 2, 1).copy()),
                      "experts.down_proj": torch.tensor(down.transpose(0, 2, 1).copy())})
  with torch.no_grad():
    hf_y = hf(torch.tensor(x)).numpy()
  np.testing.assert_allclose(np.asarray(y)[mask], hf_y[mask], atol=1e-5)
  hf_loss = load_balancing_loss_func((torch.tensor(x.reshape(-1, D) @ router),), E, K, torch.tensor(mask))
  np.testing.assert_allclose(float(stats["load_balancing_loss"]), float(hf_loss), rtol=1e-5)


def test_capacity_drops_overflowing_choices():
  x, mask = _block_inputs(seed=2)
  x[..., 0] = 4.0  # with the router below every token's top-2 is (expert 0, expert 1)
  block = _block(capacity_factor=0.5)
  params = nn.unbox(block.init(jax.random.key(1), x, mask)["params"])
  router = 0.05 * np.random.RandomState(3).randn(D, E).astype(np.float32)
  router[0] = [1.0, 0.5, -0.5, -1.0]
  params = {**params, "router": {"kernel": jnp.asarray(router)}}
  capacity = moe.expert_capacity(6, E, K, 0.5)
  assert capacity == math.ceil(6 * K / E * 0.5) == 2
  y, stats = jax.jit(block.apply)({"params": params}, x, mask)
  ref, dropped = _np_moe(x.astype(np.float64), mask, params, K, capacity)
  # Row 0: 6 first and 6 second choices for 2 + 2 slots; row 1 (4 real tokens): 4 + 4 for 2 + 2.
  assert dropped == 8 + 4 and float(stats["dropped"]) == dropped
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
  # Tokens 2.. of each row lost both choices: exactly zero; tokens 0, 1 kept both.
  np.testing.assert_array_equal(np.asarray(y)[:, 2:], 0)
  assert np.abs(np.asarray(y)[:, :2]).min(axis=-1).max() > 0
  _, metrics = moe.summarize(stats, 1)
  np.testing.assert_allclose(float(metrics["dropped_fraction"]), 12 / (K * 10), rtol=1e-6)


TINY = ModelConfig(
    vision=VisionConfig(kind="siglip", image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32),
    projector=ProjectorConfig(kind="mlp", act="gelu"),
    decoder=DecoderConfig(vocab_size=64, width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
    image_token_id=IMG)
T = TINY.image_tokens_per_tile


def _moe_cfg(every_n=1, scan=True, capacity_factor=0.0, num_layers=2, remat="none"):
  m = MoeConfig(num_experts=E, experts_per_token=K, every_n_layers=every_n, expert_mlp_dim=32,
                capacity_factor=capacity_factor, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
  return dataclasses.replace(TINY, scan_layers=scan, remat=remat, decoder=dataclasses.replace(TINY.decoder, moe=m,
                                                                                 num_layers=num_layers))


def _batch(rows, seed=0):
  return make_batch(rows, random_pixels(len(rows), 1, seed=seed), np.ones((len(rows), 1), bool))


def _text_batch(n=4, length=12):
  return _batch([make_row([2, *[IMG] * T, 9 + i, 10, 11 + 2 * i, 12][:length - 1 - i % 2], length)
                 for i in range(n)])


def test_vlm_aux_loss_is_weighted_sum_of_layer_router_losses():
  cfg = _moe_cfg(every_n=1, scan=False)
  params = init_params(cfg, jax.random.key(0))
  assert set(params["decoder"]["layers_0"]) == {"attn_norm", "attn", "mlp_norm", "moe"}
  batch = _text_batch()
  is_router = lambda mdl, _: isinstance(mdl, Dense) and mdl.name == "router"
  out, state = jax.jit(functools.partial(VLM(cfg).apply, capture_intermediates=is_router, mutable=["intermediates"]))(
      {"params": params}, batch)
  mask = batch["segment_ids"] > 0
  expected, loads = 0.0, []
  for i in range(2):
    logits = np.asarray(state["intermediates"]["decoder"][f"layers_{i}"]["moe"]["router"]["__call__"][0], np.float64)
    lb, z, load = _np_router_losses(logits, mask, K)
    expected += 0.1 * lb + 0.01 * z
    loads.append(load)
  np.testing.assert_allclose(float(out["aux_loss"]), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["moe_metrics"]["expert_load"]), np.mean(loads, 0), atol=1e-6)
  assert float(out["moe_metrics"]["dropped_fraction"]) == 0.0
  dense = jit_apply(TINY)({"params": init_params(TINY, jax.random.key(0))}, batch)
  assert float(dense["aux_loss"]) == 0.0 and dense["moe_metrics"] == {}


def test_scanned_groups_equal_unscanned_layers():
  """every_n_layers=2 over 4 layers: layers 1 and 3 are MoE; scanned params are layers/layers_{j} per group."""
  loop_cfg, scan_cfg = _moe_cfg(every_n=2, scan=False, num_layers=4), _moe_cfg(every_n=2, scan=True, num_layers=4)
  params = init_params(loop_cfg, jax.random.key(0))
  assert [sorted(params["decoder"][f"layers_{i}"])[-1] for i in range(4)] == ["mlp_norm", "moe", "mlp_norm", "moe"]
  assert "mlp" in params["decoder"]["layers_0"] and "mlp" not in params["decoder"]["layers_1"]
  decoder = dict(params["decoder"])
  layers = [decoder.pop(f"layers_{i}") for i in range(4)]
  decoder["layers"] = {f"layers_{j}": jax.tree.map(lambda *a: jnp.stack(a), *layers[j::2]) for j in range(2)}
  vision = dict(params["vision"])
  vision["layers"] = vision.pop("layers_0")
  vision["layers"] = jax.tree.map(lambda a: a[None], vision["layers"])  # depth 1
  scanned = {**params, "decoder": decoder, "vision": vision}
  shapes, _ = abstract_params(scan_cfg)
  assert jax.tree.map(lambda a: a.shape, scanned) == jax.tree.map(lambda s: s.shape, shapes)
  assert shapes["decoder"]["layers"]["layers_1"]["moe"]["experts"]["gate_up"].shape == (2, E, 32, 2, 32)
  batch = _text_batch()
  loop, scan = jit_apply(loop_cfg)({"params": params}, batch), jit_apply(scan_cfg)({"params": scanned}, batch)
  assert_f32_close(scan["logits"], loop["logits"])
  np.testing.assert_allclose(float(scan["aux_loss"]), float(loop["aux_loss"]), rtol=1e-6)
  assert float(loop["aux_loss"]) > 0.1 * 2 * 1.0  # two MoE layers, load balancing >= 1 each


@pytest.mark.parametrize("every_n,scan", [(1, False), (2, True)])
def test_kv_cache_decode_equals_full_forward(every_n, scan):
  cfg = _moe_cfg(every_n=every_n, scan=scan)
  params = init_params(cfg, jax.random.key(0))
  prompt0, prompt1 = [2, *[IMG] * T, 9, 10], [2, *[IMG] * T]  # row 1 is left-padded by 2
  generated = [[20, 21, 22], [30, 31, 32]]
  p_len, total = len(prompt0), len(prompt0) + 3
  full = _batch([make_row(prompt0 + generated[0], total), make_row(prompt1 + generated[1], total, offset=2)], seed=2)
  assert_decode_equals_full_forward(cfg, params, full, p_len, total)


@pytest.mark.parametrize("mesh_cfg,every_n,capacity_factor,remat", [
    (MeshConfig(data=2, expert=2, tensor=2), 1, 0.0, "none"),
    (MeshConfig(data=1, fsdp=2, expert=2, tensor=2), 2, 1.0, "full"),
])
def test_sharded_loss_and_grads_equal_single_device(mesh_cfg, every_n, capacity_factor, remat):
  cfg = _moe_cfg(every_n=every_n, capacity_factor=capacity_factor, remat=remat)
  mesh = sharding.make_mesh(mesh_cfg)
  params = init_params(cfg, jax.random.key(0))
  batch = _text_batch()

  def loss_fn(p, batch):
    out = VLM(cfg).apply({"params": p}, batch)
    total, count = token_cross_entropy(out["logits"], batch["labels"])
    return total / count + out["aux_loss"], out["moe_metrics"]
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)

  _, logical = abstract_params(cfg)
  shardings = sharding.logical_shardings(logical, mesh)
  layers = shardings["decoder"]["layers"] if every_n == 1 else shardings["decoder"]["layers"]["layers_1"]
  assert layers["moe"]["experts"]["gate_up"].spec == P(None, "expert", "fsdp", None, "tensor")
  assert layers["moe"]["experts"]["down"].spec == P(None, "expert", "tensor", "fsdp")
  assert layers["moe"]["router"]["kernel"].spec == P(None, "fsdp", None)
  assert sharding.data_sharding(mesh, 2).spec == P(("data", "fsdp", "expert"), None)
  # No whole-batch collective: routing too stays sharded over the batch axes (moe.top_k).
  (sharded_loss, sharded_metrics), sharded_grads = sharded_value_and_grad(loss_fn, params, batch, mesh, shardings,
                                                                          has_aux=True)
  np.testing.assert_allclose(float(sharded_loss), float(loss), rtol=1e-5)
  assert_trees_f32_close((sharded_grads, sharded_metrics), (grads, metrics))
  router_grad = (grads["decoder"]["layers"] if every_n == 1 else grads["decoder"]["layers"]["layers_1"])["moe"]
  assert float(jnp.abs(router_grad["router"]["kernel"]).max()) > 1e-4 and float(loss) > 1.0
  if capacity_factor:
    assert float(metrics["dropped_fraction"]) > 0  # capacity 3 slots per row and expert: some choices drop


def test_config_validation():
  with pytest.raises(config.ConfigError, match="experts_per_token=5 must be in"):
    config.load("shapes_moe", ["model.decoder.moe.experts_per_token=5"])
  with pytest.raises(config.ConfigError, match="every_n_layers=2 must divide num_layers=3 with scan_layers"):
    config.load("shapes_moe", ["model.decoder.moe.every_n_layers=2", "model.scan_layers=true"])
  cfg = config.load("shapes_moe", ["model.decoder.moe.every_n_layers=2", "model.scan_layers=false"])
  assert [cfg.model.decoder.is_moe_layer(i) for i in range(3)] == [False, True, False]
  with pytest.raises(config.ConfigError, match="not divisible by the expert mesh axis"):
    config.load("shapes_moe", ["mesh.expert=8"])
  assert not config.load("shapes_tiny").model.decoder.is_moe_layer(0)


def _decoder_counts(cfg):
  """(all decoder params, params one token goes through): experts count k / E of their stacked weights."""
  shapes, _ = abstract_params(cfg.model)
  total = active = 0
  for path, s in jax.tree_util.tree_leaves_with_path(shapes["decoder"]):
    n = math.prod(s.shape)
    total += n
    is_expert = any(getattr(p, "key", None) == "experts" for p in path)
    m = cfg.model.decoder.moe
    active += n * m.experts_per_token // m.num_experts if is_expert else n
  return total, active, shapes


def test_shapes_moe_has_the_active_params_of_shapes_tiny():
  tiny, moe_cfg = config.load("shapes_tiny"), config.load("shapes_moe")
  assert moe_cfg.train == tiny.train and moe_cfg.data == tiny.data
  assert dataclasses.replace(moe_cfg.model.decoder, moe=MoeConfig()) == tiny.model.decoder
  dense_shapes, _ = abstract_params(tiny.model)
  dense = sum(math.prod(s.shape) for s in jax.tree.leaves(dense_shapes["decoder"]))
  total, active, shapes = _decoder_counts(moe_cfg)
  d = moe_cfg.model.decoder
  router = d.num_layers * d.width * d.moe.num_experts
  layer = 2 * d.width + d.width * d.resolved_head_dim * (2 * d.num_heads + 2 * d.num_kv_heads) + 3 * d.width * d.mlp_dim
  assert active - router == dense == 2 * d.vocab_size * d.width + d.num_layers * layer + d.width
  assert total - router == dense + d.num_layers * 3 * d.width * d.mlp_dim  # the experts double the MLP weights
  for tower in ("vision", "projector", "contrastive"):
    assert jax.tree.map(lambda s: s.shape, shapes[tower]) == jax.tree.map(lambda s: s.shape, dense_shapes[tower])
