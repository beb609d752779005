"""Data shards: the global batch as a fixed number n of loader shards, spread over the processes.

Shard s of n is `loader.make_loader(..., process_index=s, process_count=n)`: records s, s + n, s + 2n, ...
of each dataset, its own shuffle, batches of batch_size / n rows. A step's global batch is the n shards'
batches in shard order; process p of P reads shards p * n/P ... (p + 1) * n/P - 1, i.e. its consecutive
rows of the global batch. So what a step trains on, and each shard's saved position, depend on n only, not
on P: a run saved by 2 hosts (n = 2) resumes exactly on 1 host holding both shards (or on 2 again). n is
`data.num_shards`, else the count in the checkpoint being resumed, else P at the start of a stage. P must
divide n (a shard's position cannot be split).

P counts feed groups, not processes (`sharding.feed_group`): hosts whose devices hold the same batch shards of
the mesh (e.g. tensor=8 over 2 hosts of 4 chips) read the same data shards and feed the same rows, and each
feed group's rows land on its batch shards (`loader.to_global`). Under pure data parallelism every process is
its own group.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from vlm_jax.config import Config, StageConfig
from vlm_jax.inputs import loader
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.sharding import feed_group, make_mesh


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
  """The shards process `process_index` of `process_count` reads."""
  if num_shards % process_count:
    raise ValueError(f"{num_shards} data shards do not split over {process_count} processes: run on a number "
                     f"of processes that divides {num_shards} (the checkpoint's data position is per shard), "
                     "or start the stage afresh.")
  per_process = num_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


class ShardedLoader:
  """Host batches [batch_size / P, ...] made of this process's shards' batches, concatenated in shard order.

  `shard_iterators` ({shard: grain iterator}) and `num_shards` are what the checkpoint saves and restores
  (`vlm_jax.checkpoint`: one file per shard). `process_index` / `process_count` default to this process's feed
  group and the group count on `mesh` (default: the config's mesh over all devices); `feeds` is that count.
  `num_shards` defaults to data.num_shards, else that count."""

  def __init__(self, config: Config, stage: StageConfig, tokenizer: Tokenizer, num_shards: int | None = None, *,
               process_index: int | None = None, process_count: int | None = None,
               mesh: jax.sharding.Mesh | None = None):
    if process_index is None or process_count is None:
      group, groups = feed_group(make_mesh(config.mesh) if mesh is None else mesh)
      process_index = group if process_index is None else process_index
      process_count = groups if process_count is None else process_count
    num_shards = num_shards or config.data.num_shards or process_count
    self.num_shards, self.feeds = num_shards, process_count
    self.shard_iterators = {s: loader.make_loader(config, stage, tokenizer, process_index=s,
                                                  process_count=num_shards)
                            for s in process_shards(num_shards, process_index, process_count)}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(it) for it in self.shard_iterators.values()]
    if len(batches) == 1:
      return batches[0]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
