"""grain loader: process shards, exact resume through Orbax, mixture weights, static shapes, global arrays."""
import collections
import dataclasses
import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures_data import SHAPES_TINY, shapes_data_dir  # noqa: F401  (fixture)

from vlm_jax import config as config_lib
from vlm_jax import datasets
from vlm_jax.inputs import loader
from vlm_jax.inputs.examples import Preprocessor
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.sharding import make_mesh

CHAT = "llava_json/chat"


@pytest.fixture(scope="module")
def data_dir(shapes_data_dir, tmp_path_factory):  # noqa: F811
  """The tiny shapes_vqa plus a text-only llava_json of 10 records, in one data_dir."""
  d = tmp_path_factory.mktemp("chat")
  records = [{"id": f"chat_{i}", "conversations": [{"from": "human", "value": f"say {i}"},
                                                   {"from": "gpt", "value": f"{i} {i}"}]} for i in range(10)]
  (d / "chat.json").write_text(json.dumps(records))
  datasets.prepare(CHAT, shapes_data_dir, json_path=str(d / "chat.json"))
  return shapes_data_dir


def _setup(data_dir, stage_name="instruct", *overrides, **stage_fields):
  cfg = config_lib.load("shapes_tiny", [f"data.data_dir={data_dir}", "data.seq_len=128", *overrides])
  fields = {"datasets": ((SHAPES_TINY, 1.0),), "batch_size": 4} | stage_fields
  stage = dataclasses.replace(cfg.train.stage(stage_name), **fields)
  tok = Tokenizer.load(datasets.get_builder(SHAPES_TINY, data_dir).data_path / "tokenizer")
  return cfg, stage, tok


def test_process_shards_are_disjoint_and_cover_the_split(data_dir):
  cfg, stage, _ = _setup(data_dir)
  epochs = {}
  for p in (0, 1):
    stream = loader.record_dataset(cfg, stage, process_index=p, process_count=2)
    epochs[p] = [stream[i]["id"] for i in range(64)]  # two epochs of a 32-record shard
  first = {p: set(ids[:32]) for p, ids in epochs.items()}
  assert len(first[0]) == len(first[1]) == 32
  assert not first[0] & first[1]
  assert first[0] | first[1] == {f"train_{i:06d}" for i in range(64)}
  for p in (0, 1):  # the next epoch: same shard, new order
    assert set(epochs[p][32:]) == first[p] and epochs[p][32:] != epochs[p][:32]
  odd = loader.record_dataset(cfg, stage, process_index=1, process_count=3)
  assert len({odd[i]["id"] for i in range(21)}) == 21  # 64 // 3 = 21 records per shard, the rest dropped


def test_mixture_follows_the_weights(data_dir):
  cfg, stage, _ = _setup(data_dir, datasets=((SHAPES_TINY, 3.0), (CHAT, 1.0)))
  stream = loader.record_dataset(cfg, stage, process_index=0, process_count=1)
  n = 400
  from_chat = sum(stream[i]["id"].startswith("chat_") for i in range(n))
  assert abs(from_chat / n - 0.25) < 0.02
  again = loader.record_dataset(cfg, stage, process_index=0, process_count=1)  # deterministic: a second stream
  assert [stream[i]["id"] for i in range(n)] == [again[i]["id"] for i in range(n)]


def test_cached_records_are_read_once_and_batches_unchanged(data_dir, monkeypatch):
  cfg, stage, tok = _setup(data_dir, "instruct", "data.cache_records=false", task="caption")
  monkeypatch.setattr(loader, "_RECORD_CACHES", {})  # not what other tests of this process cached
  plain = loader.make_loader(cfg, stage, tok, process_index=0, process_count=1)
  expected = [next(plain) for _ in range(20)]  # 80 rows: more than the 64-record split, so records repeat
  reads = collections.Counter()
  normalize = loader.normalize_record

  def counting(raw):
    record = normalize(raw)
    reads[record["id"]] += 1
    return record
  monkeypatch.setattr(loader, "normalize_record", counting)
  cached_cfg = config_lib.apply_overrides(cfg, ["data.cache_records=true"])
  for attempt in range(2):  # a second loader (the next stage) reads nothing: the cache outlives the first
    cached = loader.make_loader(cached_cfg, stage, tok, process_index=0, process_count=1)
    for want in expected:
      got = next(cached)
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    if attempt == 0:
      # Every record of the split was read (the rows came from 64+ records), and fewer times than served
      # (two reader threads may both decode one record at an epoch's seam).
      assert len(reads) == 64 and sum(reads.values()) < 72
      reads.clear()
  assert not reads
  record = loader.data_source(SHAPES_TINY, "train", data_dir, cache=True)[0]
  with pytest.raises(ValueError, match="read-only"):
    record["images"][0][0, 0, 0] = 1


@pytest.mark.parametrize("task", ["conversation", "caption", "text", "image_text"])
def test_static_shapes_per_task(data_dir, task):
  cfg, stage, tok = _setup(data_dir, task=task)
  it = loader.make_loader(cfg, stage, tok, process_index=0, process_count=1)
  batches = [next(it) for _ in range(3)]
  if task == "image_text":
    expected = {"pixel_values": ((4, 1, 48, 48, 3), np.uint8), "text_ids": ((4, 32), np.int32),
                "text_mask": ((4, 32), np.bool_), "negative_text_ids": ((4, 2, 32), np.int32),
                "negative_text_mask": ((4, 2, 32), np.bool_), "negative_valid": ((4, 2), np.bool_)}
  else:
    expected = {"input_ids": ((4, 128), np.int32), "labels": ((4, 128), np.int32),
                "segment_ids": ((4, 128), np.int32), "positions": ((4, 128), np.int32),
                "pixel_values": ((4, 2, 48, 48, 3), np.uint8), "tile_mask": ((4, 2), np.bool_)}
    if task == "text":  # no tile slots: the model skips the vision tower on text-only batches
      expected.update(pixel_values=((4, 0, 48, 48, 3), np.uint8), tile_mask=((4, 0), np.bool_))
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  if task in ("conversation", "caption"):
    assert batches[0]["tile_mask"][:, 0].all() and (batches[0]["input_ids"] == tok.image_id).any()


def test_stage_row_shape_overrides_the_data_config(data_dir):
  """A caption stage with its own short rows and one tile slot: the rows have that shape, and exactly the
  records that do not fit (two images; captions longer than the row) are left out."""
  cfg, stage, tok = _setup(data_dir, task="caption", seq_len=40, max_tiles=1, batch_size=8)
  assert config_lib.row_shape(cfg, stage) == (40, 1)
  assert config_lib.row_shape(cfg, dataclasses.replace(stage, task="text")) == (40, 0)
  batch = next(loader.make_loader(cfg, stage, tok, process_index=0, process_count=1))
  assert batch["input_ids"].shape == (8, 40) and batch["pixel_values"].shape == (8, 1, 48, 48, 3)
  assert batch["tile_mask"].all() and ((batch["labels"] >= 0).sum(1) > 0).all()
  short = Preprocessor(cfg, tok, (40, 1))
  source = loader.data_source(SHAPES_TINY, "train", data_dir)
  fits = [short.to_example(source[i], "caption") is not None for i in range(len(source))]
  full = Preprocessor(cfg, tok)
  lengths = [len(e["input_ids"]) if (e := full.to_example(source[i], "caption")) else None
             for i in range(len(source))]
  expected = [n is not None and n <= 40 and len(source[i]["images"]) == 1 for i, n in enumerate(lengths)]
  assert fits == expected and 0 < sum(fits) < len(fits)
  assert short.counts["dropped_too_many_tiles"] == sum(len(source[i]["images"]) > 1 and bool(source[i]["caption"])
                                                      for i in range(len(source)))
  with pytest.raises(config_lib.ConfigError, match="seq_len"):
    config_lib.load("shapes_tiny", ["train.stages.vision_caption.seq_len=100000"])


def test_host_batch_is_the_process_share(data_dir):
  cfg, stage, tok = _setup(data_dir, batch_size=8)
  batch = next(loader.make_loader(cfg, stage, tok, process_index=1, process_count=2))
  assert batch["input_ids"].shape == (4, 128)
  with pytest.raises(ValueError, match="not divisible"):
    loader.make_loader(cfg, dataclasses.replace(stage, batch_size=6), tok, process_index=0, process_count=4)


@pytest.mark.parametrize("packing", [False, True])
def test_restored_iterator_yields_exactly_the_next_batch(data_dir, tmp_path, packing):
  # packed rows with room for several examples
  longer = ("data.seq_len=320", "model.decoder.max_seq_len=320", "data.max_tiles=4") if packing else ()
  cfg, stage, tok = _setup(data_dir, "instruct", f"data.packing={packing}", *longer)
  it = loader.make_loader(cfg, stage, tok)
  for _ in range(3):
    next(it)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  saved = json.loads((tmp_path / "ckpt" / "3" / "data" / "process_0-of-1.json").read_text())
  if packing:  # the open row holds examples that restoring must re-add
    assert saved["pending"] >= 1 and "parent" in saved
  expected = [next(it) for _ in range(2)]
  fresh = loader.make_loader(cfg, stage, tok)
  first_of_fresh = next(fresh)
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for want in expected:
    got = next(fresh)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert not np.array_equal(first_of_fresh["input_ids"], expected[0]["input_ids"])
  if packing:
    assert max(int(b["segment_ids"].max()) for b in expected) >= 2  # rows really hold several examples


def test_to_global_shards_the_batch_over_data_axes(data_dir):
  cfg, stage, tok = _setup(data_dir, batch_size=8)
  batch = next(loader.make_loader(cfg, stage, tok))
  mesh = make_mesh(config_lib.MeshConfig(data=4, fsdp=2))
  arrays = loader.to_global(batch, mesh)
  assert collections.Counter(type(a).__name__ for a in arrays.values()) == {"ArrayImpl": 6}
  for k, a in arrays.items():
    assert a.shape == batch[k].shape
    assert a.sharding.spec[0] == ("data", "fsdp", "expert")
    np.testing.assert_array_equal(np.asarray(a), batch[k])
  assert arrays["pixel_values"].addressable_shards[0].data.shape == (1, 2, 48, 48, 3)
  assert jax.device_count() == 8


def test_read_threads_decode_in_parallel_without_changing_the_batches(data_dir):
  cfg, stage, tok = _setup(data_dir)
  assert cfg.data.read_threads == 2 and cfg.data.num_workers == 0  # shapes_tiny: a small machine
  batches = {}
  for threads in (1, 4):
    threaded = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, read_threads=threads))
    it = loader.make_loader(threaded, stage, tok, process_index=0, process_count=1)
    batches[threads] = [next(it) for _ in range(3)]
  for one, four in zip(*batches.values()):
    for key in one:
      np.testing.assert_array_equal(one[key], four[key])
  with pytest.raises(config_lib.ConfigError, match="data.read_threads=0 >= 1"):
    config_lib.load("shapes_tiny", ["data.read_threads=0"])
  with pytest.raises(config_lib.ConfigError, match="data.num_workers=-1 must be >= 0"):
    config_lib.load("shapes_tiny", ["data.num_workers=-1"])
