"""Tile budget (`data.tile_budget`): rows grouped into batch shards whose real tiles fit the ViT's budget.

The train step runs the ViT on tile_budget * R tiles per batch shard of R rows (vlm_jax/model/vlm.py
`gather_tiles`), not on R * max_tiles slots. Here the loader's rows are put into such shards in arrival order:
a row that would overflow its shard is deferred to the next shard and the shard is topped up with empty rows;
a row with more tiles than a whole shard holds is dropped. Every row gets `tile_index` int32 [tile_budget]: the
shard's real tiles spread over its rows (`shard_tile_index`). Deferred, dropped and empty rows are counted in
the iterator's state, so they survive checkpoints (`tile_budget_counts`).
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from vlm_jax.config import NO_TILE, StageConfig
from vlm_jax.losses import IGNORE_ID

BUDGET_COUNTS = ("deferred_rows", "dropped_rows", "padding_rows")


def shard_tile_index(tile_masks: list[np.ndarray], per_row: int) -> np.ndarray:
  """The tile_index rows of one batch shard of R rows (DESIGN.md "The batch"): its real tiles, slot k * N + s for
  tile s of row k, listed in order over R * per_row entries (NO_TILE after the last), row k holding entries
  k * per_row ... (k + 1) * per_row - 1, each written relative to its own row (minus k * N).

  tile_masks: R bool [N] -> int32 [R, per_row]."""
  rows, n = len(tile_masks), len(tile_masks[0])
  slots = np.concatenate([k * n + np.flatnonzero(m) for k, m in enumerate(tile_masks)])
  if len(slots) > rows * per_row:
    raise ValueError(f"{len(slots)} tiles overflow a budget of {per_row} per row over {rows} rows.")
  flat = np.full(rows * per_row, NO_TILE, np.int64)
  flat[:len(slots)] = slots
  index = flat.reshape(rows, per_row) - np.arange(rows)[:, None] * n
  return np.where(flat.reshape(rows, per_row) == NO_TILE, NO_TILE, index).astype(np.int32)


class TileBudgetIterDataset(grain.IterDataset):
  """Rows -> rows in groups of `bins` x `bin_rows` (the rows of one batch shard: bin a is its rows of micro-batch
  a), each bin holding at most per_row * bin_rows real tiles, with `tile_index` [per_row] added to every row.

  A bin takes rows in arrival order; a row that would overflow it is deferred to the next bin (which it opens)
  and the bin is topped up with empty rows (no tokens, no tiles). A row with more tiles than a whole bin holds is
  dropped. Both are counted in the iterator's state (`tile_budget_counts`). Rows are emitted bin-interleaved
  (row k of bin a at k * bins + a), because the train step's micro-batch a takes rows a, a + bins, ... of each
  shard (vlm_jax/train/step.py `_micro_batches`); with bins = 1 the order is unchanged."""

  def __init__(self, parent: grain.IterDataset, per_row: int, bin_rows: int, bins: int, pad_id: int):
    super().__init__(parent)
    self._args = (per_row, bin_rows, bins, pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return _TileBudgetIterator(self._parent.__iter__(), *self._args)


class _TileBudgetIterator(grain.DatasetIterator):
  """Its state: the parent's state before the open group's first row, the rows of that group already returned,
  and the counts before it; restoring rewinds the parent there and rebuilds the group (like _PackedIterator)."""

  def __init__(self, parent: grain.DatasetIterator, per_row: int, bin_rows: int, bins: int, pad_id: int):
    super().__init__(parent)
    self._per_row, self._bin_rows, self._bins, self._pad_id = per_row, bin_rows, bins, pad_id
    self._counts = dict.fromkeys(BUDGET_COUNTS, 0)
    self._group: list[dict] = []  # the open group's rows, in emission order
    self._emitted = 0
    self._start = parent.get_state()  # before the open group's first row
    self._counts_before = dict(self._counts)
    self._carry: tuple[Any, dict] | None = None  # (parent state before it, row): read but not yet placed

  def _read(self) -> tuple[Any, dict]:
    if self._carry is not None:
      carried, self._carry = self._carry, None
      return carried
    before = self._parent.get_state()
    return before, next(self._parent)

  def _empty_row(self, like: dict) -> dict:
    row = {k: np.zeros_like(v) for k, v in like.items()}
    row["input_ids"][:] = self._pad_id
    row["labels"][:] = IGNORE_ID
    return row

  def _build_group(self) -> None:
    self._counts_before = dict(self._counts)
    self._start = self._carry[0] if self._carry is not None else self._parent.get_state()
    capacity = self._per_row * self._bin_rows
    bins: list[list[dict]] = [[] for _ in range(self._bins)]
    a = tiles = 0
    while a < self._bins:
      if len(bins[a]) == self._bin_rows:
        a, tiles = a + 1, 0
        continue
      try:
        before, row = self._read()
      except StopIteration:
        if not bins[0]:
          raise
        break  # a finite stream's last group: top it up
      n = int(np.sum(row["tile_mask"]))
      if n > capacity:
        self._counts["dropped_rows"] += 1
      elif tiles + n > capacity:  # closes this bin; the row opens the next one
        self._counts["deferred_rows"] += 1
        self._carry = (before, row)
        a, tiles = a + 1, 0
      else:
        bins[a].append(row)
        tiles += n
    like = bins[0][0]
    for rows in bins:
      self._counts["padding_rows"] += self._bin_rows - len(rows)
      rows += [self._empty_row(like) for _ in range(self._bin_rows - len(rows))]
      index = shard_tile_index([r["tile_mask"] for r in rows], self._per_row)
      rows[:] = [{**r, "tile_index": i} for r, i in zip(rows, index)]
    self._group = [bins[a][k] for k in range(self._bin_rows) for a in range(self._bins)]
    self._emitted = 0

  def __next__(self) -> dict:
    if self._emitted == len(self._group):
      self._build_group()
    self._emitted += 1
    return self._group[self._emitted - 1]

  def get_state(self) -> dict:
    if self._emitted < len(self._group):
      return {"parent": self._start, "emitted": self._emitted, "tile_budget": dict(self._counts_before)}
    start = self._carry[0] if self._carry is not None else self._parent.get_state()
    return {"parent": start, "emitted": 0, "tile_budget": dict(self._counts)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._carry, self._group, self._emitted = None, [], 0
    self._counts = dict(state["tile_budget"])
    if state["emitted"]:
      self._build_group()
      self._emitted = state["emitted"]


def tile_budget_counts(iterator: Any) -> dict[str, int]:
  """Rows the tile budget deferred (they opened the next bin), dropped (more tiles than a bin holds) and the empty
  rows it added, so far: from the state of a loader (`loader.make_loader`'s iterator, or a `shards.ShardedLoader`:
  summed over its shards and over grain worker processes); all 0 without a budget."""
  totals = dict.fromkeys(BUDGET_COUNTS, 0)

  def walk(state):
    if isinstance(state, dict):
      if isinstance(state.get("tile_budget"), dict):
        for k in BUDGET_COUNTS:
          totals[k] += int(state["tile_budget"][k])
      for value in state.values():
        walk(value)
    elif isinstance(state, (list, tuple)):
      for value in state:
        walk(value)
  for it in getattr(iterator, "shard_iterators", {0: iterator}).values():
    walk(it.get_state())
  return totals


def bin_rows(stage: StageConfig, host_batch: int, batch_shards: int) -> int:
  """Rows of one tile-budget bin: one batch shard's rows of a micro-batch, batch_size / (shards * grad_accum);
  a host batch must be whole shards of them."""
  shard_rows = stage.batch_size // batch_shards
  if stage.batch_size % (batch_shards * stage.grad_accum) or host_batch % shard_rows:
    raise ValueError(f"Stage {stage.name!r}: data.tile_budget counts tiles per batch shard, but batch_size="
                     f"{stage.batch_size} over {batch_shards} batch shards x grad_accum={stage.grad_accum} (host "
                     f"batches of {host_batch} rows) does not give whole shards per host batch: make batch_size a "
                     f"multiple of shards x grad_accum and the data shards divide the batch shards, or set "
                     f"data.tile_budget=0.")
  return shard_rows // stage.grad_accum
