"""uint8 pixels normalized on the device, and the tile budget: the loader's shards of rows within budget (exact
counts of deferred / dropped / empty rows, exact resume), the model's per-shard gather (logits and the train step's
gradients equal the every-slot path; the ViT's input is [B * K, ...]; no pixels cross devices)."""
import dataclasses
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_data import SHAPES_TINY, shapes_data_dir  # noqa: F401  (fixture)
from fixtures_numerics import assert_f32_close, assert_trees_f32_close
from fixtures_train import tiny_config

from vlm_jax import config as config_lib
from vlm_jax import datasets
from vlm_jax.config import NO_TILE, MeshConfig
from vlm_jax.inputs import images, loader, packing, tile_budget
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.losses import IGNORE_ID
from vlm_jax.model import vlm
from vlm_jax.sharding import make_mesh
from vlm_jax.train import step

COLLECTIVE = r"= .*\b(all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)\("
SEQ, SLOTS = 24, 3  # rows of 24 tokens and 3 tile slots of 4 <image> tokens (the tiny model's 16 px tiles)


def tiny():
  return tiny_config(overrides=[f"data.max_tiles={SLOTS}", f"data.seq_len={SEQ}"])


def make_rows(cfg, tile_counts, seed=0):
  """One row per count: its tiles' <image> ids first, then text supervised on its last 4 tokens; uint8 pixels."""
  rng = np.random.default_rng(seed)
  m = cfg.model
  size, per_tile = m.vision.image_size, m.image_tokens_per_tile
  rows = []
  for t in tile_counts:
    ids = rng.integers(10, m.decoder.vocab_size, SEQ).astype(np.int32)
    ids[:t * per_tile] = m.image_token_id
    labels = np.full(SEQ, IGNORE_ID, np.int32)
    labels[-4:] = ids[-4:]
    tiles = rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8)
    rows.append(packing.make_row([{"input_ids": ids, "labels": labels, "tiles": tiles}], SEQ, SLOTS, pad_id=0))
  return rows


def budget_stream(rows, per_row, bin_rows, bins):
  """The tile budget's iterator over a finite list of rows."""
  source = grain.MapDataset.source(rows).to_iter_dataset()
  return iter(tile_budget.TileBudgetIterDataset(source, per_row, bin_rows, bins, pad_id=0))


def conv_inputs(jaxpr):
  """Shapes of every conv_general_dilated lhs in a jaxpr and its sub-jaxprs (the ViT's patch embedding)."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      shapes.append(eqn.invars[0].aval.shape)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          shapes += conv_inputs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          shapes += conv_inputs(sub)
  return shapes


@pytest.fixture(scope="module")
def mesh_params():
  """A mesh of 4 batch shards and the tiny model's params (one init compile for the module)."""
  mesh = make_mesh(MeshConfig(data=4), jax.devices()[:4])
  return mesh, jax.device_get(step.init_params(tiny(), mesh, jax.random.PRNGKey(0)))


def test_uint8_pixels_normalized_on_the_device_match_the_host(mesh_params):
  cfg = tiny()
  m = cfg.model
  mesh, params = mesh_params
  batch = packing.collate(make_rows(cfg, [3, 1, 0, 2]))
  pixels = batch["pixel_values"]
  host = images.normalize(pixels, m.vision.image_mean, m.vision.image_std)  # what the loader shipped before
  assert pixels.dtype == np.uint8 and host.dtype == np.float32 and host.nbytes == 4 * pixels.nbytes
  model = vlm.VLM(m)
  embed = jax.jit(lambda p, x: model.apply({"params": p}, x, batch["tile_mask"], method=vlm.VLM.embed_images))
  assert_f32_close(embed(params, pixels), embed(params, host))  # the ViT normalizes (contrastive_embeddings too)
  device = loader.to_global(batch, mesh)["pixel_values"]
  assert device.dtype == jnp.uint8 and device.addressable_shards[0].data.nbytes == pixels.nbytes // 4
  with pytest.raises(TypeError, match="uint8"):
    embed(params, pixels.astype(np.int32))


def test_budget_stream_counts_and_resume_exactly():
  """Budget 1 per row, bins of 2 rows (2 tiles each): the stream of tile counts 1 1 | 2 [1 deferred] | 1 [3 dropped]
  0 | 2 [2 deferred] | 2 [1 deferred] | 1 (end) -> 3 deferred, 1 dropped, 4 empty rows."""
  cfg = tiny()
  counts = [1, 1, 2, 1, 3, 0, 2, 2, 1]
  rows = make_rows(cfg, counts)
  out = list(budget_stream(rows, per_row=1, bin_rows=2, bins=1))
  ids = [next((i for i, r in enumerate(rows) if np.array_equal(r["input_ids"], o["input_ids"])), None) for o in out]
  assert ids == [0, 1, 2, None, 3, 5, 6, None, 7, None, 8, None]
  empty = out[3]
  assert not empty["tile_mask"].any() and not empty["segment_ids"].any() and (empty["labels"] == IGNORE_ID).all()
  # Each entry is relative to its row (minus k * 3 slots): row 1 names its own tile 0 (slot 3 - 3), and the empty
  # row after row 2 names row 2's second tile (slot 1 - 3).
  np.testing.assert_array_equal(np.stack([o["tile_index"] for o in out[:4]]), [[0], [0], [0], [-2]])
  np.testing.assert_array_equal(out[5]["tile_index"], [NO_TILE])  # row 5 has no tiles: its entry is unused
  it = budget_stream(rows, per_row=1, bin_rows=2, bins=1)
  for _ in out:
    next(it)
  assert tile_budget.tile_budget_counts(it) == {"deferred_rows": 3, "dropped_rows": 1, "padding_rows": 4}
  for k in range(len(out)):  # restore after any row: the same rest and the same final counts
    it = budget_stream(rows, per_row=1, bin_rows=2, bins=1)
    for _ in range(k):
      next(it)
    fresh = budget_stream(rows, per_row=1, bin_rows=2, bins=1)
    fresh.set_state(it.get_state())
    rest = list(fresh)
    assert len(rest) == len(out) - k
    for got, want in zip(rest, out[k:]):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert tile_budget.tile_budget_counts(fresh) == {"deferred_rows": 3, "dropped_rows": 1, "padding_rows": 4}
  # Two micro-batch bins per shard: bin a's row k is emitted at 2k + a; tile counts 1 0 | 2 0 -> rows 0 2 1 3.
  two = list(budget_stream(make_rows(cfg, [1, 0, 2, 0]), per_row=1, bin_rows=2, bins=2))
  assert [int(r["tile_mask"].sum()) for r in two] == [1, 2, 0, 0]


def test_budget_logits_and_train_step_grads_equal_every_slot(mesh_params):
  """Mixed tile counts (0-3 of 3 slots) under a budget of 2 per row: forward logits on a 4-shard mesh, and the
  train step's gradients with grad_accum 2 (bins interleaved per micro-batch), equal the path that runs every
  slot."""
  cfg = tiny()
  mesh, host_params = mesh_params
  counts = np.random.default_rng(1).integers(0, SLOTS + 1, 40)
  stage = dataclasses.replace(cfg.train.stage("instruct"), batch_size=16, grad_accum=2)
  it = budget_stream(make_rows(cfg, counts), per_row=2, bin_rows=tile_budget.bin_rows(stage, 16, 4),
                     bins=stage.grad_accum)
  batch = packing.collate([next(it) for _ in range(16)])
  real = int(batch["tile_mask"].sum())
  assert 16 * 2 >= real > 16 and tile_budget.tile_budget_counts(it)["deferred_rows"] >= 1
  plain = {k: v for k, v in batch.items() if k != "tile_index"}
  model = vlm.VLM(cfg.model)
  _, shardings = step.param_shardings(cfg, mesh)
  params = jax.device_put(host_params, shardings)
  with step.use_mesh(mesh):
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b)["logits"])
    # one micro-batch: rows 0, 2, 4, ... hold the first bin of each shard
    micro = lambda b: {k: v[::2] for k, v in b.items()}
    assert_f32_close(forward(params, micro(batch)), forward(params, micro(plain)))
    jaxpr = jax.make_jaxpr(lambda p, b: model.apply({"params": p}, b))(params, micro(batch)).jaxpr
    assert conv_inputs(jaxpr) == [(8 * 2, 16, 16, 3)]  # the ViT's input: 8 rows x budget 2, not 8 x 3 slots
  results = []
  for b in (batch, plain):
    b = loader.to_global(b, mesh)
    with step.use_mesh(mesh):  # the train step's gradients: micro-batches scanned, all params trainable
      grads = jax.jit(lambda p, b: step.accumulate_grads(model, stage, mesh, p, jax.tree.map(lambda _: None, p), b))
      compiled = grads.lower(params, b).compile()
      results.append(jax.device_get(compiled(params, b)[:4]))
    if "tile_index" in b:  # the gather stays within each device's rows: no collective moves pixels (u8)
      assert not [line for line in compiled.as_text().splitlines() if "u8[" in line and re.search(COLLECTIVE, line)]
  (loss_sum, _, weight, budget_grads), (plain_loss_sum, _, plain_weight, plain_grads) = results
  assert weight == plain_weight > 0
  assert_f32_close(loss_sum, plain_loss_sum)
  assert_trees_f32_close(budget_grads, plain_grads)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(budget_grads["vision"])) > 0  # the ViT trains


def test_loader_batches_keep_every_shard_within_budget(shapes_data_dir):  # noqa: F811
  """shapes_tiny rows (1 or 2 tiles of 2 slots) under a budget of 1 per row, batch shards of 2 rows: each shard's
  tile_index names exactly its real tiles, and the empty rows seen are the ones counted."""
  cfg = config_lib.load("shapes_tiny", [f"data.data_dir={shapes_data_dir}", "data.tile_budget=1"])
  stage = dataclasses.replace(cfg.train.stage("instruct"), datasets=((SHAPES_TINY, 1.0),), batch_size=8)
  tok = Tokenizer.load(datasets.get_builder(SHAPES_TINY, shapes_data_dir).data_path / "tokenizer")
  it = loader.make_loader(cfg, stage, tok, process_index=0, process_count=1, batch_shards=4)
  empty = 0
  for _ in range(8):
    batch = next(it)
    assert batch["tile_index"].shape == (8, 1) and batch["pixel_values"].dtype == np.uint8
    for shard in range(4):
      rows = slice(2 * shard, 2 * shard + 2)
      mask, index = batch["tile_mask"][rows], batch["tile_index"][rows]
      named = sorted(int(i) + k * 2 for k, i in enumerate(index[:, 0]) if i != NO_TILE)
      assert named == list(np.flatnonzero(mask.reshape(-1)))  # within budget: 2 tiles per shard at most
    empty += int((batch["segment_ids"] == 0).all(axis=1).sum())
  counts = tile_budget.tile_budget_counts(it)
  assert counts["padding_rows"] == empty and counts["deferred_rows"] >= 1 and counts["dropped_rows"] == 0
  pretrain = dataclasses.replace(cfg.train.stage("vision_pretrain"), datasets=((SHAPES_TINY, 1.0),), batch_size=8)
  contrastive = loader.make_loader(cfg, pretrain, tok, process_index=0, process_count=1)
  assert "tile_index" not in next(contrastive)  # image_text rows have one image each: no budget


def test_config_validates_the_budget():
  cfg = tiny()
  assert config_lib.tile_budget_per_row(config_lib.apply_overrides(cfg, ["data.tile_budget=2"]), SLOTS) == 2
  assert config_lib.tile_budget_per_row(config_lib.apply_overrides(cfg, ["data.tile_budget=2"]), 1) == 0  # 1 slot
  with pytest.raises(config_lib.ConfigError, match="data.tile_budget=-1 must be >= 0"):
    config_lib.apply_overrides(cfg, ["data.tile_budget=-1"])
  stage = dataclasses.replace(cfg.train.stage("instruct"), batch_size=12, grad_accum=2)
  with pytest.raises(ValueError, match="whole shards"):
    tile_budget.bin_rows(stage, 12, 4)  # 12 rows over 4 shards x 2 micro-batches


def test_run_logs_the_budget_counts(shapes_data_dir, tmp_path):  # noqa: F811
  """4 instruct steps of the tiny run config under a budget (8 batch shards), logged every 2: each record carries the loader's counts
  so far, those of the same stream rebuilt here and advanced as many batches."""
  import pathlib  # pylint: disable=import-outside-toplevel
  from vlm_jax.inputs import shards  # pylint: disable=import-outside-toplevel
  from vlm_jax.inputs.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  from vlm_jax.train import metrics, run  # pylint: disable=import-outside-toplevel
  run_config = str(pathlib.Path(__file__).parent / "tiny_run_config.py")
  cfg = config_lib.load(run_config, [f"data.data_dir={shapes_data_dir}", "data.tile_budget=1",
                                     "train.stages.instruct.log_every=2", "train.stages.instruct.checkpoint_every=100"])
  stage, tok = cfg.train.stage("instruct"), load_tokenizer(cfg)
  mesh = make_mesh(cfg.mesh)
  assert run.run_stage(cfg, stage, str(tmp_path), mesh, tok, previous=None)
  records = metrics.read_metrics(tmp_path, "instruct")
  assert [r["step"] for r in records] == [2, 4]
  data, seen = shards.ShardedLoader(cfg, stage, tok, 1, mesh=mesh), 0
  for record in records:
    for _ in range(record["step"] - seen):
      next(data)
    seen = record["step"]
    want = tile_budget.tile_budget_counts(data)
    assert {k: record[f"tile_budget/{k}"] for k in tile_budget.BUDGET_COUNTS} == want
  # One row per batch shard holds one tile: the 2-tile rows are dropped (3 in the first 2 batches, 7 in 4).
  assert [r["tile_budget/dropped_rows"] for r in records] == [3, 7]
