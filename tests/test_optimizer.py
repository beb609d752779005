"""Optimizer: trainable/frozen labels, no state for frozen params, schedule, weight-decay mask, LR multipliers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.config import ConfigError, StageConfig
from vlm_jax.train import optimizer


def toy_params():
  """A param tree with the project's names: a big 'vision' tower, a projector and a small decoder."""
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "vision": {"pos_embed": f(16, 8), "layers": {"mlp": {"fc1": {"kernel": f(2, 8, 32), "bias": f(2, 32)}}},
                 "post_layernorm": {"scale": f(8), "bias": f(8)}},
      "projector": {"linear_1": {"kernel": f(8, 12), "bias": f(12)}, "linear_2": {"kernel": f(12, 12), "bias": f(12)}},
      "decoder": {"embed": {"embedding": f(20, 12)}, "final_norm": {"scale": f(12)},
                  "lm_head": {"kernel": f(12, 20)}},
  }


def stage(**kw):
  base = dict(name="align", steps=10, warmup_steps=2, lr=1e-2, end_lr_fraction=0.1, trainable=("projector/.*",))
  return StageConfig(**{**base, **kw})


def test_labels_follow_full_match_regexes():
  trainable = ("projector/linear_1/.*", "decoder/lm_head/kernel")
  labels = optimizer.trainable_labels(toy_params(), stage(trainable=trainable))
  flat = dict(zip(jax.tree.leaves(optimizer.param_paths(toy_params())), jax.tree.leaves(labels)))
  assert sorted(p for p, l in flat.items() if l == "train") == [
      "decoder/lm_head/kernel", "projector/linear_1/bias", "projector/linear_1/kernel"]
  assert len(flat) == 12 and sum(l == "frozen" for l in flat.values()) == 9
  # 'projector' alone does not fully match 'projector/linear_1/kernel'.
  with pytest.raises(ConfigError, match=r"'projector' matches no param.*\['decoder', 'projector', 'vision'\]"):
    optimizer.trainable_labels(toy_params(), stage(trainable=("projector",)))


def test_frozen_params_get_no_optimizer_state_and_never_move():
  params = toy_params()
  tx = optimizer.make_optimizer(stage(), params)
  opt_state = tx.init(params)
  trainable = params["projector"]
  n_train = len(jax.tree.leaves(trainable))
  train_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
  leaves = jax.tree.leaves(opt_state)
  # Adam mu + nu for the 4 projector leaves, plus two int32 step counts (Adam's and the schedule's);
  # nothing for vision/decoder.
  assert len(leaves) == 2 * n_train + 2
  assert sum(x.nbytes for x in leaves) == 2 * train_bytes + 8
  grads = jax.tree.map(jnp.ones_like, params)
  new = params
  for _ in range(3):
    updates, opt_state = tx.update(grads, opt_state, new)
    new = optax.apply_updates(new, updates)
  for name in ("vision", "decoder"):
    for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(new[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(np.abs(np.asarray(a) - np.asarray(b)).min() > 0
             for a, b in zip(jax.tree.leaves(params["projector"]), jax.tree.leaves(new["projector"])))


def test_schedule_warmup_then_cosine_to_end_fraction():
  s = optimizer.schedule(stage(steps=10, warmup_steps=2, lr=1e-2, end_lr_fraction=0.1))
  np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 6, 10)],
                             [0.0, 5e-3, 1e-2, 1e-3 + 9e-3 * 0.5, 1e-3], rtol=1e-6)


def test_weight_decay_only_on_kernels():
  params = toy_params()
  st = stage(trainable=(".*",), weight_decay=0.5, warmup_steps=0, lr=0.1, grad_clip=1e9)
  tx = optimizer.make_optimizer(st, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  paths = jax.tree.leaves(optimizer.param_paths(params))
  for path, u, p in zip(paths, jax.tree.leaves(updates), jax.tree.leaves(params)):
    if path.endswith("kernel"):  # zero grad: the whole update is -lr * wd * p
      np.testing.assert_allclose(np.asarray(u), -0.1 * 0.5 * np.asarray(p), rtol=1e-6, err_msg=path)
    else:  # norms, biases, embedding table, pos_embed
      np.testing.assert_array_equal(np.asarray(u), 0.0, err_msg=path)


def test_lr_multipliers_first_match_wins():
  params = toy_params()
  st = stage(trainable=("projector/.*", "decoder/.*"), warmup_steps=0)
  scaled = dataclasses.replace(st, lr_multipliers=(("projector/linear_1/.*", 0.1), ("projector/.*", 0.5)))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
  base, _ = optimizer.make_optimizer(st, params).update(grads, optimizer.make_optimizer(st, params).init(params),
                                                        params)
  tx = optimizer.make_optimizer(scaled, params)
  mult, _ = tx.update(grads, tx.init(params), params)
  for name, factor in (("linear_1", 0.1), ("linear_2", 0.5)):
    for a, b in zip(jax.tree.leaves(base["projector"][name]), jax.tree.leaves(mult["projector"][name])):
      np.testing.assert_allclose(np.asarray(b), factor * np.asarray(a), rtol=1e-6)
      assert np.abs(np.asarray(a)).min() > 0
  for a, b in zip(jax.tree.leaves(base["decoder"]), jax.tree.leaves(mult["decoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clipping_ignores_frozen_grads():
  params = toy_params()
  tx = optimizer.make_optimizer(stage(grad_clip=0.1, warmup_steps=0), params)
  grads = jax.tree.map(jnp.ones_like, params)
  huge = {**grads, "vision": jax.tree.map(lambda g: 1e6 * g, grads["vision"])}
  a, _ = tx.update(grads, tx.init(params), params)
  b, _ = tx.update(huge, tx.init(params), params)
  for x, y in zip(jax.tree.leaves(a["projector"]), jax.tree.leaves(b["projector"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_moe_expert_weights_decay_like_kernels():
  """shapes_moe's real param tree: every matmul weight decays (Dense kernels and the experts' stacked gate_up /
  down matrices, which are not named kernel); norms, biases, embeddings, pos_embed and scalars do not."""
  from vlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from vlm_jax.model.vlm import abstract_params  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load("shapes_moe")
  shapes, _ = abstract_params(cfg.model)
  paths = jax.tree.leaves(optimizer.param_paths(shapes))
  decayed = {p for p, d in zip(paths, jax.tree.leaves(optimizer.weight_decay_mask(shapes))) if d}
  layers = range(cfg.model.decoder.num_layers)
  experts = {f"decoder/layers_{i}/moe/experts/{m}" for i in layers for m in ("gate_up", "down")}
  assert cfg.model.decoder.moe.num_experts == 4 and not cfg.model.scan_layers and experts <= set(paths)
  kernels = {p for p in paths if p.endswith("/kernel")}
  assert decayed == kernels | experts
  assert {p.split("/")[-1] for p in set(paths) - decayed} == {
      "bias", "scale", "embedding", "pos_embed", "logit_bias", "logit_scale"}
  # The optimizer applies it: a zero gradient moves exactly the decayed params, by -lr * wd * p (one MoE layer).
  layer = {"decoder": {"layers_0": shapes["decoder"]["layers_0"]}}
  layer = jax.tree.map(lambda s: np.full(s.shape, 2.0, s.dtype), layer)
  st = stage(trainable=(".*",), weight_decay=0.5, warmup_steps=0, lr=0.1, grad_clip=1e9)
  tx = optimizer.make_optimizer(st, layer)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, layer), tx.init(layer), layer)
  for path, u in zip(jax.tree.leaves(optimizer.param_paths(layer)), jax.tree.leaves(updates)):
    np.testing.assert_array_equal(np.unique(np.asarray(u)), np.float32([-0.1 if path in decayed else 0.0]),
                                  err_msg=path)
