"""Train step on a tiny real VLM: frozen towers stay bit-identical with no optimizer state, loss averaging over
supervised tokens is exact under grad accumulation, contrastive loss, eval loss."""
import dataclasses

import jax
import numpy as np
import pytest
from fixtures_numerics import assert_trees_f32_close
from fixtures_train import TINY, lm_batch, tiny_config

from vlm_jax import config as config_lib
from vlm_jax import losses
from vlm_jax.config import MeshConfig
from vlm_jax.model import vlm
from vlm_jax.sharding import make_mesh
from vlm_jax.train import optimizer, step

def contrastive_batch(cfg, rows=8, seed=0):
  rng = np.random.default_rng(seed)
  size, length = cfg.model.vision.image_size, cfg.model.contrastive.max_text_len
  mask = np.arange(length)[None] < rng.integers(2, length, (rows, 1))
  return {"pixel_values": rng.normal(size=(rows, 1, size, size, 3)).astype(np.float32),
          "text_ids": np.where(mask, rng.integers(10, 64, (rows, length)), 0).astype(np.int32), "text_mask": mask}


def setup(cfg, stage, mesh):
  """-> (model, tx, abstract state, initial state) for `stage` on `mesh`."""
  model = vlm.VLM(cfg.model)
  shapes, _ = vlm.abstract_params(cfg.model)
  tx = optimizer.make_optimizer(stage, shapes)
  abstract = step.abstract_state(cfg, stage, mesh, tx)
  params = step.init_params(cfg, mesh, jax.random.PRNGKey(0))
  return model, tx, abstract, step.init_state(params, tx, abstract)


def run_steps(cfg, stage_name, batch, steps=2, mesh_cfg=MeshConfig(data=2, fsdp=2, tensor=2), devices=None,
              **stage_fields):
  cfg_stage = dataclasses.replace(cfg.train.stage(stage_name), **{"warmup_steps": 0, **stage_fields})
  mesh = make_mesh(mesh_cfg, devices)
  model, tx, abstract, state = setup(cfg, cfg_stage, mesh)
  start = jax.device_get(state)  # host copies: the step donates its input state
  train_step = step.make_train_step(model, cfg_stage, mesh, tx, abstract)
  metrics = []
  with step.use_mesh(mesh):
    for _ in range(steps):
      state, m = train_step(state, batch)
      metrics.append(jax.device_get(m))
  return start, jax.device_get(state), metrics


def assert_bit_identical(a, b, what):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), f"{what}{jax.tree_util.keystr(path)} changed"


def opt_state_bytes(state):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(state["opt_state"]))


def tree_bytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_alignment_stage_trains_only_the_projector():
  cfg = tiny_config()
  start, end, metrics = run_steps(cfg, "align", lm_batch(cfg))
  for tower in ("vision", "decoder", "contrastive"):
    assert_bit_identical(start["params"][tower], end["params"][tower], tower)
  for x, y in zip(jax.tree.leaves(start["params"]["projector"]), jax.tree.leaves(end["params"]["projector"])):
    assert np.abs(x - y).max() > 1e-5
  # Adam mu + nu for the projector only, plus two int32 counts.
  assert opt_state_bytes(end) == 2 * tree_bytes(end["params"]["projector"]) + 8
  assert int(end["step"]) == 2
  assert metrics[0]["num_tokens"] == sum(3 + b % 5 for b in range(8))  # 37; labels never at position 0
  assert metrics[1]["loss"] < metrics[0]["loss"]


def test_instruct_stage_keeps_the_vision_tower():
  cfg = tiny_config()
  start, end, _ = run_steps(cfg, "instruct", lm_batch(cfg))
  assert_bit_identical(start["params"]["vision"], end["params"]["vision"], "vision")
  assert_bit_identical(start["params"]["contrastive"], end["params"]["contrastive"], "contrastive")
  changed = [np.abs(x - y).max() > 0 for x, y in zip(jax.tree.leaves(start["params"]["decoder"]),
                                                     jax.tree.leaves(end["params"]["decoder"]))]
  assert all(changed)
  trainable = {"projector": end["params"]["projector"], "decoder": end["params"]["decoder"]}
  assert opt_state_bytes(end) == 2 * tree_bytes(trainable) + 8


def test_grad_accumulation_averages_over_all_supervised_tokens():
  cfg = tiny_config()
  batch = lm_batch(cfg)
  mesh = make_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
  results = {}
  for accum in (1, 2):
    stage = dataclasses.replace(cfg.train.stage("instruct"), grad_accum=accum, batch_size=8)
    model, _, abstract, state = setup(cfg, stage, mesh)
    labels = optimizer.trainable_labels(abstract["params"], stage)

    @jax.jit
    def mean_loss_and_grads(params, batch, stage=stage, model=model, labels=labels):
      trainable, frozen = step.split_trainable(params, labels)
      loss_sum, _, weight, grads, _ = step.accumulate_grads(model, stage, mesh, trainable, frozen, batch)
      return loss_sum / weight, weight, grads
    with step.use_mesh(mesh):
      results[accum] = jax.device_get(mean_loss_and_grads(state["params"], batch))
  # Reference: one forward over the whole batch, summed NLL / supervised tokens.
  logits = jax.jit(model.apply)({"params": jax.device_get(state["params"])}, batch)["logits"]
  loss_sum, count = losses.token_cross_entropy(logits, batch["labels"])
  assert int(count) == 37 and results[1][1] == 37
  assert float(step.batch_weight(cfg.train.stage("instruct"), batch)) == 37  # known before the forward
  np.testing.assert_allclose(results[1][0], float(loss_sum / count), rtol=1e-6)
  np.testing.assert_allclose(results[2][0], results[1][0], rtol=1e-5)
  assert results[2][1] == 37
  assert_trees_f32_close(results[2][2], results[1][2])  # two micro-batches' partial sums vs one
  # A mean of per-micro-batch means would differ: the rows hold 3..7 supervised tokens.
  halves = [losses.token_cross_entropy(logits[i::2], batch["labels"][i::2]) for i in (0, 1)]
  mean_of_means = np.mean([float(s / c) for s, c in halves])
  assert abs(mean_of_means - results[2][0]) > 1e-4


def test_grad_accumulation_train_step_metrics_match():
  cfg = tiny_config()
  batch = lm_batch(cfg, seed=1)
  one = run_steps(cfg, "instruct", batch, steps=1)[2][0]
  two = run_steps(cfg, "instruct", batch, steps=1, grad_accum=2)[2][0]
  assert one["aux_loss"] == 0.0  # dense decoder
  for key in ("loss", "grad_norm", "lr", "num_tokens"):
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)


def test_contrastive_stage_loss_and_frozen_decoder():
  cfg = tiny_config()
  batch = contrastive_batch(cfg)
  # One device: on 8 virtual CPU devices XLA:CPU's concurrency-optimized scheduler deadlocks this step (two
  # all-gathers wait on each other; --xla_cpu_enable_concurrency_optimized_scheduler=false avoids it).
  start, end, metrics = run_steps(cfg, "vision_pretrain", batch, steps=1, mesh_cfg=MeshConfig(data=1),
                                  devices=jax.devices()[:1])
  embed = jax.jit(lambda p, b: vlm.VLM(cfg.model).apply({"params": p}, b["pixel_values"], b["text_ids"],
                                                        b["text_mask"], method=vlm.VLM.contrastive_embeddings))
  image, text, scale, _ = embed(start["params"], batch)
  np.testing.assert_allclose(metrics[0]["loss"], float(losses.clip_loss(image, text, scale)), rtol=1e-5)
  assert metrics[0]["num_tokens"] == 8
  assert float(step.batch_weight(cfg.train.stage("vision_pretrain"), batch)) == 8  # its pairs
  for tower in ("decoder", "projector"):
    assert_bit_identical(start["params"][tower], end["params"][tower], tower)
  assert np.abs(start["params"]["vision"]["pos_embed"] - end["params"]["vision"]["pos_embed"]).max() > 0


@pytest.mark.parametrize("similarity", ["global", "token"])
def test_contrastive_step_with_hard_negatives(similarity):
  cfg = config_lib.load("shapes_tiny", TINY + ["model.contrastive.hard_negatives=2",
                                               f"model.contrastive.similarity={similarity}"])
  batch = contrastive_batch(cfg)
  rng = np.random.default_rng(1)
  length = cfg.model.contrastive.max_text_len
  batch["negative_text_mask"] = np.arange(length)[None, None] < rng.integers(2, length, (8, 2, 1))
  batch["negative_text_ids"] = np.where(batch["negative_text_mask"], rng.integers(10, 64, (8, 2, length)), 0
                                        ).astype(np.int32)
  batch["negative_valid"] = rng.random((8, 2)) < 0.7
  start, _, metrics = run_steps(cfg, "vision_pretrain", batch, steps=1, mesh_cfg=MeshConfig(data=1),
                                devices=jax.devices()[:1])
  embed = jax.jit(lambda p, ids, mask: vlm.VLM(cfg.model).apply(
      {"params": p}, batch["pixel_values"], ids, mask, method=vlm.VLM.contrastive_embeddings))
  image, text, scale, _ = embed(start["params"], batch["text_ids"], batch["text_mask"])
  _, negative, _, _ = embed(start["params"], batch["negative_text_ids"].reshape(16, length),
                            batch["negative_text_mask"].reshape(16, length))
  masks = dict(text_mask=batch["text_mask"], negative_mask=batch["negative_text_mask"])
  expected = losses.clip_loss(image, text, scale, negative.reshape(8, 2, *negative.shape[1:]),
                              batch["negative_valid"], **masks)
  np.testing.assert_allclose(metrics[0]["loss"], float(expected), rtol=1e-5)
  assert metrics[0]["loss"] > float(losses.clip_loss(image, text, scale, text_mask=batch["text_mask"])) + 1e-3


def test_eval_step_matches_the_reference_loss():
  cfg = tiny_config()
  batch = lm_batch(cfg, seed=2)
  stage = cfg.train.stage("instruct")
  mesh = make_mesh(MeshConfig(data=4, tensor=2))
  model, _, abstract, state = setup(cfg, stage, mesh)
  with step.use_mesh(mesh):
    out = jax.device_get(step.make_eval_step(model, stage, mesh, abstract)(state["params"], batch))
  logits = jax.jit(model.apply)({"params": jax.device_get(state["params"])}, batch)["logits"]
  loss_sum, count = losses.token_cross_entropy(logits, batch["labels"])
  np.testing.assert_allclose(out["loss"], float(loss_sum / count), rtol=1e-5)
  assert out["num_tokens"] == int(count)


def test_micro_batches_must_split_over_the_batch_devices():
  cfg = tiny_config()
  with pytest.raises(ValueError, match=r"8 / 4 = 2 rows per micro-batch do not split over the 4 "
                                       r"\('data', 'fsdp', 'expert'\)"):
    run_steps(cfg, "align", lm_batch(cfg), grad_accum=4, batch_size=8)


def test_unknown_trainable_regex_is_a_config_error():
  cfg = tiny_config()
  with pytest.raises(config_lib.ConfigError, match="'projektor/.*' matches no param"):
    run_steps(cfg, "align", lm_batch(cfg), trainable=("projektor/.*",))


@pytest.mark.parametrize("name", ["smolvlm_256m", "llava15_7b"])
def test_bf16_steps_of_the_real_model_families_match_float32(name):
  """Two instruct steps of the SmolVLM shape (SigLIP, pixel shuffle, tied output head) and of the LLaVA shape
  (CLIP, MLP projector), shrunk, in bf16 on XLA:CPU: the losses equal float32's to bf16 rounding. The tied head
  once stopped bf16 training here ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32")."""
  losses_by_dtype = {}
  for dtype in ("float32", "bfloat16"):
    cfg = tiny_config(name, ["model.vision.patch_size=4", "model.decoder.max_seq_len=64", "data.seq_len=32",
                             "data.max_tiles=1", "data.image_splitting=False", f"model.dtype={dtype}"])
    # One device, as on a single CPU host (sharded over 8 virtual devices, XLA compiled the old head fine).
    _, _, metrics = run_steps(cfg, "instruct", lm_batch(cfg, seq=32), mesh_cfg=MeshConfig(data=1),
                              devices=jax.devices()[:1])
    losses_by_dtype[dtype] = [float(m["loss"]) for m in metrics]
  assert config_lib.load(name).model.decoder.tie_embeddings == (name == "smolvlm_256m")
  np.testing.assert_allclose(losses_by_dtype["bfloat16"], losses_by_dtype["float32"], rtol=2e-3)
  assert losses_by_dtype["float32"][1] < losses_by_dtype["float32"][0]  # the first step trained


def test_token_counts_tell_padding_from_real_and_supervised_tokens():
  """Row 0 packs two sequences and pads the end; row 1 is left-padded. Its label at position 0 is never scored
  (nothing predicts the first token), so supervised tokens are the shifted labels the loss reads."""
  from vlm_jax.train import metrics, run  # pylint: disable=import-outside-toplevel
  x = losses.IGNORE_ID
  batch = {"input_ids": np.ones((2, 6), np.int32),
           "segment_ids": np.array([[1, 1, 1, 2, 2, 0], [0, 0, 1, 1, 1, 1]]),
           "labels": np.array([[9, x, 5, x, 7, x], [x, x, x, 3, 4, 6]])}
  counts = metrics.token_counts(batch)
  assert counts == {"tokens": 12, "real_tokens": 9, "supervised_tokens": 5}
  assert int(losses.supervised_tokens(batch["labels"])) == 5  # what the step reports as num_tokens
  contrastive = {"text_ids": np.ones((2, 4), np.int32), "text_mask": np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)}
  assert metrics.token_counts(contrastive) == {"tokens": 8, "real_tokens": 5}
  # Two logged steps of that batch in 4 s.
  steps = [{"loss": np.float32(2.0), "lr": np.float32(0.1)}, {"loss": np.float32(1.0), "lr": np.float32(0.2)}]
  values = run.summarize(steps, {k: 2 * n for k, n in counts.items()}, seconds=4.0)
  assert values == {"loss": 1.5, "lr": np.float32(0.2), "tokens_per_s": 6.0, "real_tokens_per_s": 4.5,
                    "supervised_tokens_per_s": 2.5, "step_time_s": 2.0}
