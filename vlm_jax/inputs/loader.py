"""grain input pipeline: TFDS records -> sharded, shuffled, mixed, resumable host batches -> global arrays.

For each dataset of a stage's mixture: the split's records are cut to a multiple of the process count and
sliced so that process i reads records i, i + n, i + 2n, ... (disjoint shards that together cover the
split), shuffled by seed (a new order every epoch) and repeated forever. Datasets are interleaved in
proportion to their weights (grain `MapDataset.mix`: a fixed, deterministic pattern). Each record becomes
an example (`examples.Preprocessor`); dropped records are filtered out; examples are padded (or packed) into
rows of fixed shape and batched with drop_remainder, so every batch has the same shapes.

`make_loader` returns a grain `DatasetIterator`. Save and restore its position with Orbax:
`grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)` (one JSON per process);
a restored iterator yields exactly the batch that would have come next.
"""
from __future__ import annotations

import math
import os
from typing import Any

import grain
import jax
import numpy as np

from vlm_jax.config import Config, InputError, StageConfig, row_shape, tile_budget_per_row
from vlm_jax.inputs import examples, packing, tile_budget
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.sharding import data_sharding, feed_group, make_mesh


# ---------------------------------------------------------------------------------------------------
# Records


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _references(raw: dict, num_answers: int) -> list[list[str]]:
  """Stored (turn, text) pairs -> one list of reference answers per assistant turn; [] when none are stored."""
  pairs = raw.get("references")
  if pairs is None or not len(pairs["text"]):
    return []
  out: list[list[str]] = [[] for _ in range(num_answers)]
  for turn, text in zip(pairs["turn"], pairs["text"]):
    out[int(turn)].append(_text(text))
  return out


def normalize_record(raw: dict) -> dict:
  """What a TFDS data source returns -> the record of DESIGN.md: str fields, turns as a list of
  {"role", "content"}, images as a list of uint8 [h, w, 3] arrays; `source` "" and `references` [] for
  datasets that store none."""
  turns = raw["turns"]
  roles = [_text(r) for r in turns["role"]]
  return {
      "id": _text(raw["id"]),
      "images": [np.asarray(im, np.uint8) for im in raw["images"]],
      "caption": _text(raw["caption"]),
      "turns": [{"role": r, "content": _text(c)} for r, c in zip(roles, turns["content"])],
      "question_types": [_text(q) for q in raw["question_types"]],
      "negative_captions": [_text(c) for c in raw.get("negative_captions", [])],
      "source": _text(raw.get("source", "")),
      "references": _references(raw, roles.count("assistant")),
  }


class RecordSource:
  """Random access to the normalized records of one prepared split (grain's data source protocol).

  With a `cache` dict, each record is read and decoded once, then served from the dict (`data.cache_records`);
  its image arrays are made read-only, so code that wrote into a served record would fail, not corrupt it."""

  def __init__(self, tfds_source, name: str, cache: dict[int, dict] | None = None):
    self._source = tfds_source
    self.name = name
    self._cache = cache

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    if self._cache is None:
      return normalize_record(self._source[index])
    record = self._cache.get(index)
    if record is None:  # two threads may both decode a record; either copy is the same
      record = normalize_record(self._source[index])
      for image in record["images"]:
        image.flags.writeable = False
      self._cache[index] = record
    return record

  def __repr__(self) -> str:  # grain prints sources in its debug output
    return f"RecordSource({self.name!r}, {len(self)} records)"


# data.cache_records: (prepared dataset dir, split) -> {index: record}, shared by every stage of the process.
_RECORD_CACHES: dict[tuple[str, str], dict[int, dict]] = {}


def data_source(name: str, split: str, data_dir: str, cache: bool = False) -> RecordSource:
  """The records of `split` of the prepared dataset `name` ('builder' or 'builder/config'). With `cache`,
  records decoded once stay in this process's memory for every later source of the same split."""
  from vlm_jax import datasets  # pylint: disable=import-outside-toplevel  (the builders import TFDS)
  builder = datasets.get_builder(name, data_dir)
  if not builder.is_prepared():
    where = data_dir
    if "://" not in data_dir and not os.path.isabs(os.path.expanduser(data_dir)):
      where = f"{data_dir} ({os.path.abspath(data_dir)}: a relative data_dir is read from the current directory)"
    raise FileNotFoundError(f"Dataset {name!r} is not prepared under {where}: run `vlm-jax data prepare {name} "
                            f"--data-dir {data_dir}` first, or point to where it is (eval: --data-dir; train: "
                            f"--set data.data_dir=...).")
  if split not in builder.info.splits:
    raise InputError(f"Dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  records = _RECORD_CACHES.setdefault((str(builder.data_path), split), {}) if cache else None
  return RecordSource(builder.as_data_source(split), f"{name}:{split}", records)


def record_dataset(config: Config, stage: StageConfig, process_index: int, process_count: int
                   ) -> grain.MapDataset:
  """This process's endless stream of records of the stage's mixture, as a grain MapDataset."""
  parts, weights = [], []
  for i, (name, weight) in enumerate(stage.datasets):
    if weight <= 0:
      raise ValueError(f"Stage {stage.name!r}: dataset {name!r} has weight {weight}; weights must be > 0.")
    source = data_source(name, stage.split, config.data.data_dir, config.data.cache_records)
    usable = len(source) // process_count * process_count  # equal shards: drop the remainder
    if usable == 0:
      raise InputError(f"{name}:{stage.split} has {len(source)} records, fewer than {process_count} processes.")
    shard = grain.MapDataset.source(source)[process_index:usable:process_count]
    # Per-dataset seeds, so that two datasets of equal size are not shuffled in lockstep.
    parts.append(shard.shuffle(seed=config.data.shuffle_seed * 1009 + i).repeat(None))
    weights.append(float(weight))
  if not parts:
    raise ValueError(f"Stage {stage.name!r} names no datasets.")
  return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


# ---------------------------------------------------------------------------------------------------
# Rows and batches


class _ToRow:
  """record -> a padded row, an unpadded example (when packing), or None (dropped by the Preprocessor)."""

  def __init__(self, config: Config, stage: StageConfig, tokenizer: Tokenizer, pack: bool):
    self.seq_len, self.max_tiles = row_shape(config, stage)
    self.preprocessor = examples.Preprocessor(config, tokenizer, (self.seq_len, self.max_tiles))
    self.task, self.pack, self.padding_side = stage.task, pack, config.data.padding_side
    self.pad_id = tokenizer.pad_id
    self.max_text_len = config.model.contrastive.max_text_len
    self.hard_negatives = config.model.contrastive.hard_negatives

  def __call__(self, record: dict) -> dict | None:
    example = self.preprocessor.to_example(record, self.task)
    if example is None or self.pack:
      return example
    if self.task == "image_text":
      return packing.pad_image_text(example, self.max_text_len, self.pad_id, self.hard_negatives)
    return packing.pad_example(example, self.seq_len, self.max_tiles, self.pad_id, self.padding_side)


class PackedIterDataset(grain.IterDataset):
  """Greedy packing (`packing.Packer`) of a stream of examples into rows."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, max_tiles: int, pad_id: int):
    super().__init__(parent)
    self._args = (seq_len, max_tiles, pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedIterator(self._parent.__iter__(), *self._args)


class _PackedIterator(grain.DatasetIterator):
  """Its state is the parent's state before the open row's first example plus how many examples the open
  row holds: restoring rewinds the parent there and re-adds them, so resume is exact and the state stays
  small JSON (no arrays)."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, max_tiles: int, pad_id: int):
    super().__init__(parent)
    self._args = (seq_len, max_tiles, pad_id)
    self._packer = packing.Packer(*self._args)
    self._row_start = parent.get_state()

  def __next__(self) -> dict:
    while True:
      before = self._parent.get_state()
      try:
        example = next(self._parent)
      except StopIteration:
        row = self._packer.flush()
        if row is None:
          raise
        self._row_start = self._parent.get_state()
        return row
      row = self._packer.add(example)
      if row is not None:  # `example` closed the open row and opened the next one
        self._row_start = before
        return row

  def get_state(self) -> dict:
    return {"parent": self._row_start, "pending": len(self._packer.pending)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._row_start = state["parent"]
    self._packer = packing.Packer(*self._args)
    for _ in range(state["pending"]):
      self._packer.add(next(self._parent))


def host_batch_size(stage: StageConfig, process_count: int) -> int:
  if stage.batch_size % process_count:
    raise ValueError(f"Stage {stage.name!r}: batch_size={stage.batch_size} is not divisible by the "
                     f"{process_count} processes.")
  return stage.batch_size // process_count


def make_loader(config: Config, stage: StageConfig, tokenizer: Tokenizer, *, process_index: int | None = None,
                process_count: int | None = None, batch_shards: int | None = None) -> grain.DatasetIterator:
  """An endless iterator of host-local batches (numpy dicts of DESIGN.md "The batch", or the contrastive
  batch for task image_text), B = stage.batch_size // process_count rows each. The process defaults to
  jax.process_index() / jax.process_count(). Under data.tile_budget the rows come in batch shards of
  stage.batch_size / batch_shards rows within budget (vlm_jax/inputs/tile_budget.py), with tile_index [B, K];
  batch_shards defaults to the mesh's (data, fsdp, expert) size over all devices (`make_mesh(config.mesh)`)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  batch = host_batch_size(stage, process_count)
  pack = config.data.packing and stage.task != "image_text"
  records = record_dataset(config, stage, process_index, process_count)
  read = grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=2 * batch)
  rows = records.map(_ToRow(config, stage, tokenizer, pack)).to_iter_dataset(read)  # drops the Nones
  if pack:
    rows = PackedIterDataset(rows, *row_shape(config, stage), tokenizer.pad_id)
  per_row = tile_budget_per_row(config, row_shape(config, stage)[1]) if stage.task != "image_text" else 0
  if per_row:
    if batch_shards is None:
      mesh = make_mesh(config.mesh)
      batch_shards = math.prod(mesh.shape[a] for a in data_sharding(mesh, 1).spec[0])
    rows = tile_budget.TileBudgetIterDataset(rows, per_row, tile_budget.bin_rows(stage, batch, batch_shards),
                                             stage.grad_accum, tokenizer.pad_id)
  batches = rows.batch(batch, drop_remainder=True)
  if config.data.num_workers > 0:
    # grain's worker processes read absl flags, which a plain (non-absl) program never parsed.
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return iter(batches)


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host-local batch [B_host, ...] -> global jax.Arrays [B_host * groups, ...], the leading axis sharded over
  the mesh's batch axes (data, fsdp, expert). `groups` counts feed groups (`sharding.feed_group`): the hosts of
  one group hold the same batch shards and must pass the same rows (their group's rows of the global batch);
  the global shape is given, so that a host passing another row count fails here instead of training on
  rows of its own."""
  groups = feed_group(mesh)[1]
  return {k: jax.make_array_from_process_local_data(data_sharding(mesh, np.ndim(v)), np.asarray(v),
                                                    (np.shape(v)[0] * groups, *np.shape(v)[1:]))
          for k, v in batch.items()}
