"""The real train step on an MoE VLM over a (data 2, expert 2, tensor 2) mesh equals the same step on one device:
loss, router aux_loss, gradients (read off an SGD update with learning rate 1) and the MoE metrics; and all of it
equals a plain reference that sums cross-entropy and weighted router losses over the step's micro-batches.
A training run logs every MoE metric (metrics.jsonl and TensorBoard)."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixtures_data import shapes_data_dir  # noqa: F401  (fixture)
from fixtures_numerics import assert_f32_close
from fixtures_train import lm_batch, tensorboard_events, tiny_config

from vlm_jax import config as config_lib
from vlm_jax import losses
from vlm_jax.config import MeshConfig, StageConfig
from vlm_jax.inputs.tokenizer import load_tokenizer
from vlm_jax.model import vlm
from vlm_jax.sharding import make_mesh
from vlm_jax.train import metrics as metrics_lib
from vlm_jax.train import run, step

TINY_RUN_CONFIG = str(pathlib.Path(__file__).parent / "tiny_run_config.py")

E = 4
# Tiny shapes_moe: 2 scanned MoE layers, 2 of 4 experts per token, capacity factor 1 (8 slots per expert and row
# of 16 tokens), so an unbalanced router drops some choices and dropped_fraction is not trivially 0.
MOE = ["model.decoder.num_layers=2", f"model.decoder.moe.num_experts={E}", "model.decoder.moe.expert_mlp_dim=32",
       "model.decoder.moe.capacity_factor=1.0", "model.decoder.moe.router_aux_loss_coef=0.1",
       "model.decoder.moe.router_z_loss_coef=0.01"]
STAGE = StageConfig(name="moe", steps=1, batch_size=8, grad_accum=2, trainable=(".*",), warmup_steps=0)


def moe_config():
  return tiny_config("shapes_moe", MOE)


def sgd_step(cfg, mesh, batch):
  """One real train step with SGD (lr 1), so params_before - params_after = the step's gradient.
  -> (params before, gradient tree, metrics), on the host."""
  model, tx = vlm.VLM(cfg.model), optax.sgd(1.0)
  abstract = step.abstract_state(cfg, STAGE, mesh, tx)
  params = step.init_params(cfg, mesh, jax.random.PRNGKey(0))
  state = step.init_state(params, tx, abstract)
  before = jax.device_get(state["params"])
  with step.use_mesh(mesh):
    state, metrics = step.make_train_step(model, STAGE, mesh, tx, abstract)(state, batch)
  after = jax.device_get(state["params"])
  return before, jax.tree.map(lambda b, a: b - a, before, after), jax.device_get(metrics)


def reference(cfg, params, batch):
  """(CE sum + aux_loss * supervised tokens) summed over the micro-batches (rows a::2), / all supervised tokens;
  -> (loss, aux_loss, grads, mean expert_load over the micro-batches)."""
  model = vlm.VLM(cfg.model)

  def objective(p):
    loss_sum = aux_sum = weight = 0.0
    loads = []
    for a in range(STAGE.grad_accum):
      micro = jax.tree.map(lambda x: x[a::STAGE.grad_accum], batch)
      out = model.apply({"params": p}, micro)
      ce, count = losses.token_cross_entropy(out["logits"], micro["labels"])
      loss_sum, aux_sum, weight = loss_sum + ce, aux_sum + out["aux_loss"] * count, weight + count
      loads.append(out["moe_metrics"]["expert_load"])
    return (loss_sum + aux_sum) / weight, (loss_sum / weight, aux_sum / weight, jnp.mean(jnp.stack(loads), 0))
  (_, (loss, aux, load)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  return float(loss), float(aux), jax.device_get(grads), np.asarray(load)


def test_moe_train_step_on_data_expert_tensor_mesh_equals_one_device():
  cfg = moe_config()
  batch = lm_batch(cfg)
  sharded_mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  assert dict(sharded_mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
  params, grads, metrics = sgd_step(cfg, sharded_mesh, batch)
  params_1, grads_1, metrics_1 = sgd_step(cfg, make_mesh(MeshConfig(data=1), jax.devices()[:1]), batch)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_1)):
    np.testing.assert_array_equal(a, b)  # the same init on both meshes

  loss, aux, ref_grads, ref_load = reference(cfg, params_1, batch)
  assert metrics["num_tokens"] == metrics_1["num_tokens"] == sum(3 + b % 5 for b in range(8))
  for name, value in (("loss", loss), ("aux_loss", aux)):
    np.testing.assert_allclose(metrics[name], metrics_1[name], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(metrics_1[name], value, atol=1e-5, err_msg=name)
  # 0.1 * load balancing (about k = 2 for a near-uniform router) summed over 2 layers, + z-loss: not negligible.
  assert aux > 0.3
  for name in ["moe/dropped_fraction", "moe/load_balancing_loss", "moe/z_loss", "moe/expert_load"]:
    assert_f32_close(metrics[name], metrics_1[name], err_msg=name)  # means over shards vs one device
  load = metrics["moe/expert_load"]
  assert load.shape == (E,)
  assert_f32_close(load, ref_load)
  np.testing.assert_allclose(load.sum(), 1.0, atol=1e-6)
  assert 0.0 < metrics["moe/dropped_fraction"] < 0.5

  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for (path, g), g1, r in zip(flat, jax.tree.leaves(grads_1), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, g1, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(g1, r, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  router = grads["decoder"]["layers"]["moe"]["router"]["kernel"]
  assert np.abs(router).max() > 1e-3  # the router learns (through the combine weights and the aux loss)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["decoder"]["layers"]["moe"]["experts"]))


def test_micro_batches_split_over_the_expert_axis_too():
  """Batch rows shard over (data, fsdp, expert): 8 rows / grad_accum 4 = 2 rows do not fill 4 expert shards."""
  mesh = make_mesh(MeshConfig(data=1, expert=4, tensor=2))
  with pytest.raises(ValueError, match=r"2 rows per micro-batch do not split over the 4 \('data', 'fsdp', 'expert'\)"):
    step.check_batch_split(dataclasses.replace(STAGE, grad_accum=4), mesh)
  step.check_batch_split(STAGE, mesh)  # 4 rows over 4 batch shards


def test_run_logs_every_moe_metric(shapes_data_dir, tmp_path, monkeypatch):  # noqa: F811
  """4 steps of a tiny MoE VLM through run_stage, logged every 2: each record holds the mean of its 2 steps'
  metrics as the step returned them, expert loads as moe/expert_load/0..E-1 (summing to 1), and TensorBoard gets
  the same scalars plus a per-expert histogram."""
  cfg = config_lib.load(TINY_RUN_CONFIG, [f"data.data_dir={shapes_data_dir}", "mesh.expert=2", *MOE,
                                          "train.stages.instruct.log_every=2",
                                          "train.stages.instruct.checkpoint_every=100"])
  stage = cfg.train.stage("instruct")
  returned, batches, make_train_step = [], [], step.make_train_step

  def recording_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def wrapped(state, batch):
      batches.append(jax.device_get({k: batch[k] for k in ("input_ids", "segment_ids", "labels")}))
      state, metrics = train_step(state, batch)
      returned.append(jax.device_get(metrics))
      return state, metrics
    return wrapped
  monkeypatch.setattr(step, "make_train_step", recording_step)
  mesh = make_mesh(cfg.mesh)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 2, "tensor": 1}
  assert run.run_stage(cfg, stage, str(tmp_path), mesh, load_tokenizer(cfg), previous=None)

  records = metrics_lib.read_metrics(tmp_path, "instruct")
  assert len(returned) == 4 and [r["step"] for r in records] == [2, 4]
  moe_keys = {"moe/dropped_fraction", "moe/load_balancing_loss", "moe/z_loss"}
  assert set(records[0]) == ({"step", "loss", "aux_loss", "grad_norm", "lr", "num_tokens", "tokens_per_s",
                              "real_tokens_per_s", "supervised_tokens_per_s", "step_time_s"} | moe_keys |
                             {f"moe/expert_load/{e}" for e in range(E)})
  for record, steps in zip(records, (returned[:2], returned[2:])):
    for key in ["loss", "aux_loss", "num_tokens"] + sorted(moe_keys):
      np.testing.assert_allclose(record[key], np.mean([m[key] for m in steps]), rtol=1e-6, err_msg=key)
    assert record["lr"] == float(steps[-1]["lr"])
    load = np.array([record[f"moe/expert_load/{e}"] for e in range(E)])
    np.testing.assert_allclose(load, np.mean([m["moe/expert_load"] for m in steps], 0), rtol=1e-6)
    np.testing.assert_allclose(load.sum(), 1.0, atol=1e-6)  # shares of the k * tokens assignments
    assert record["aux_loss"] > 0.1 and 0.0 <= record["moe/dropped_fraction"] < 0.5
  # Throughput over the 2 steps of each record: all positions, non-padding ones, and the ones the loss scores (the
  # steps' own num_tokens); the batches are padded, so the three differ.
  for record, steps, seen in zip(records, (returned[:2], returned[2:]), (batches[:2], batches[2:])):
    seconds = 2 * record["step_time_s"]
    counts = {"tokens": sum(b["input_ids"].size for b in seen),
              "real_tokens": sum(int((b["segment_ids"] != 0).sum()) for b in seen),
              "supervised_tokens": sum(int(m["num_tokens"]) for m in steps)}
    assert counts["tokens"] > counts["real_tokens"] > counts["supervised_tokens"] > 0
    for kind, count in counts.items():
      assert record[f"{kind}_per_s"] * seconds == pytest.approx(count, rel=1e-12), kind

  events = tensorboard_events(tmp_path / "tensorboard" / "instruct")
  scalars = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}
  histograms = {(e.step, v.tag): v.histo for e in events for v in e.summary.value if v.HasField("histo")}
  assert scalars[(4, "train/aux_loss")] == pytest.approx(records[1]["aux_loss"], rel=1e-6)
  assert scalars[(4, "moe/expert_load/3")] == pytest.approx(records[1]["moe/expert_load/3"], rel=1e-6)
  histogram = histograms[(4, "moe/expert_load")]
  assert list(histogram.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
  np.testing.assert_allclose(histogram.bucket, [records[1][f"moe/expert_load/{e}"] for e in range(E)], rtol=1e-6)
