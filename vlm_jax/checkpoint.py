"""Orbax checkpoints: one CheckpointManager per stage under W/<stage>/, stage handoff, restore onto any mesh.

A step directory holds two items: `state` (params, opt_state, step; StandardSave) and `data` (the grain
iterators' positions, one file per data shard, `data/shard_<s>-of-<n>.json`: see `vlm_jax.inputs.shards`).
Restores go through abstract ShapeDtypeStructs that carry the *target* shardings, so a checkpoint written on
one mesh (or number of processes) loads onto another. A stage is finished when its final step is saved and
W/<stage>/FINISHED names that step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import re
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from vlm_jax.config import StageConfig

FINISHED = "FINISHED"  # marker file in W/<stage>/ holding the final step, written once that step is on disk
LEGACY_STATE_KEYS = ("rng",)  # train-state entries older checkpoints hold and today's state does not


def absolute(path: str | epath.PathLike) -> epath.Path:
  """Orbax wants absolute paths: local paths are resolved, gs:// stays as is."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(path.expanduser().resolve())


def stage_dir(workdir: str | epath.PathLike, stage_name: str) -> epath.Path:
  """W/<stage>, absolute."""
  return absolute(workdir) / stage_name


class DataHandler(ocp.CheckpointHandler):
  """Orbax handler for the data position: one JSON file per data shard, `shard_<s>-of-<n>.json`. Each process
  writes and reads the files of the shards it holds, so a checkpoint restores on any process count that
  divides n. The item is a `shards.ShardedLoader` ({shard: iterator}), or a plain grain iterator, which is
  shard jax.process_index() of jax.process_count(). Reads grain's own `process_<i>-of-<n>.json` files too
  (checkpoints from before data shards: process i read shard i of n)."""

  def save(self, directory: epath.Path, args: "DataSave") -> None:
    iterators, count = _shard_iterators(args.item)
    for shard, it in iterators.items():
      state = it.get_state()
      text = state.decode() if isinstance(state, bytes) else json.dumps(state, indent=1)
      (directory / f"shard_{shard}-of-{count}.json").write_text(text)

  def restore(self, directory: epath.Path, args: "DataRestore") -> Any:
    iterators, count = _shard_iterators(args.item)
    saved = _shard_count(directory)
    if saved != count:
      raise ValueError(f"The checkpoint's data position has {saved} shards ({directory}); this run reads "
                       f"{count}. Leave data.num_shards at 0 (or set it to {saved}) to resume exactly.")
    for shard, it in iterators.items():
      path = directory / f"shard_{shard}-of-{count}.json"
      text = (path if path.exists() else directory / f"process_{shard}-of-{count}.json").read_text()
      it.set_state(text.encode() if isinstance(it.get_state(), bytes) else json.loads(text))
      if hasattr(it, "start_prefetch"):  # grain DataLoader iterators prefetch only once told to
        it.start_prefetch()
    return args.item


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


def _shard_iterators(item: Any) -> tuple[dict[int, Any], int]:
  if hasattr(item, "shard_iterators"):
    return item.shard_iterators, item.num_shards
  return {jax.process_index(): item}, jax.process_count()


def _shard_count(directory: epath.Path) -> int | None:
  """n of the `shard_<s>-of-<n>.json` files in a step's data directory (None when there are none)."""
  counts = {int(m.group(1)) for f in directory.glob("*-of-*.json")
            if (m := re.fullmatch(r"(?:shard|process)_\d+-of-(\d+)\.json", f.name))}
  if len(counts) > 1:
    raise ValueError(f"{directory} mixes data positions of different shard counts: {sorted(counts)}.")
  return counts.pop() if counts else None


def data_shards(mngr: ocp.CheckpointManager, step: int) -> int | None:
  """How many data shards the checkpoint at `step` holds positions for (None: no data item)."""
  directory = epath.Path(mngr.directory) / str(step) / "data"
  return _shard_count(directory) if directory.exists() else None


def _handlers() -> dict[str, Any]:
  return {"state": ocp.StandardCheckpointHandler(), "data": DataHandler()}


@functools.cache  # once per process
def _plain_array_saves_on_cpu() -> None:
  """On CPU the devices share host memory: replica-parallel saving (each replica of a replicated array writes a
  slice of it) moves nothing faster there, and costs a compile per slice shape (4 s of a tiny run's first save).
  Accelerators keep Orbax's default."""
  if jax.default_backend() == "cpu":
    with _quiet("overriding"):  # Orbax warns of every override, ours too
      ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                              override=True)


def manager(workdir: str | epath.PathLike, stage: StageConfig) -> ocp.CheckpointManager:
  """The stage's CheckpointManager: saves every stage.checkpoint_every steps (the final step is forced by
  the caller), keeps stage.max_to_keep, writes asynchronously (call wait_until_finished before exiting)."""
  _plain_array_saves_on_cpu()
  # Only the fixed interval: Orbax's default would also save the first step of every (re)start.
  policy = ocp.checkpoint_managers.FixedIntervalPolicy(max(stage.checkpoint_every, 1))
  options = ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=stage.max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(stage_dir(workdir, stage.name), options=options, item_handlers=_handlers())


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any], data_iterator: Iterator | None = None,
         *, force: bool = False) -> bool:
  """Saves state (and the data iterator's position) at `step` if the interval says so or `force`.
  Returns whether a save started."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = DataSave(data_iterator)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def check_shapes(saved: Any, target: Any, what: str = "params") -> None:
  """Raises ValueError naming the first param path whose saved shape differs from the target's (or that
  only one side has). saved: tree of Orbax ArrayMetadata; target: tree of arrays / ShapeDtypeStructs."""
  def shapes(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in flat}
  have, want = shapes(saved), shapes(target)
  for path in sorted(set(have) | set(want)):
    if path not in have:
      raise ValueError(f"Checkpoint has no {what}/{path} (target shape {want[path]}): the config's model "
                       "differs from the checkpoint's.")
    if path not in want:
      raise ValueError(f"Checkpoint has {what}/{path} with shape {have[path]}, which the target model lacks: "
                       "the config's model differs from the checkpoint's.")
    if have[path] != want[path]:
      raise ValueError(f"Shape mismatch at {what}/{path}: checkpoint has {have[path]}, the target model wants "
                       f"{want[path]}. Did the model config change since this checkpoint was written?")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict[str, Any],
            data_iterator: Iterator | None = None) -> dict[str, Any]:
  """Restores the state at `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs), and the
  data iterator's position in place. Param shapes are checked against the checkpoint's metadata first."""
  saved = mngr.item_metadata(step)["state"]
  check_shapes(saved["params"], abstract_state["params"])
  # Older train states also held an unused `rng` uint32 [2]: such a checkpoint still resumes (read, then dropped).
  legacy = {k: jax.ShapeDtypeStruct(saved[k].shape, saved[k].dtype, sharding=abstract_state["step"].sharding)
            for k in LEGACY_STATE_KEYS if k in saved and k not in abstract_state}
  items = {"state": ocp.args.StandardRestore({**abstract_state, **legacy})}
  if data_iterator is not None:
    items["data"] = DataRestore(data_iterator)
  state = mngr.restore(step, args=ocp.args.Composite(**items))["state"]
  return {k: v for k, v in state.items() if k not in legacy}


def mark_finished(workdir: str | epath.PathLike, stage_name: str, step: int) -> None:
  """Records that the stage's final checkpoint (`step`) is complete. Call after wait_until_finished, on every
  process: process 0 writes the marker, and no process returns before it is written (the next stage's
  `final_params` reads it on every process)."""
  if jax.process_index() == 0:
    (stage_dir(workdir, stage_name) / FINISHED).write_text(json.dumps({"step": step}) + "\n")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"vlm_jax finished {stage_name}")


def finished_step(workdir: str | epath.PathLike, stage_name: str) -> int | None:
  """The final step of a finished stage, or None while it is unfinished (or never started)."""
  marker = stage_dir(workdir, stage_name) / FINISHED
  return json.loads(marker.read_text())["step"] if marker.exists() else None


def resolve_init_from(path: str) -> tuple[str, str]:
  """`init_from` -> (workdir, stage name). `path` is W/<stage>, or a workdir W, meaning its last finished stage
  in config.json order."""
  p = epath.Path(path).expanduser()
  if (p / FINISHED).exists():
    return str(p.parent), p.name
  config_file = p / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"init_from={path!r} is neither a finished stage dir (no {FINISHED}) nor a workdir "
                            "(no config.json).")
  names = [s["name"] for s in json.loads(config_file.read_text())["train"]["stages"]]
  done = [n for n in names if finished_step(p, n) is not None]
  if not done:
    raise FileNotFoundError(f"init_from={path!r}: no finished stage among {names}.")
  return str(p), done[-1]


def final_params(workdir: str | epath.PathLike, stage_name: str, target: Any) -> Any:
  """Only the params of a finished stage (no optimizer state, no iterator), restored onto `target`
  (a tree of ShapeDtypeStructs with shardings). Raises if the stage is unfinished or shapes differ."""
  step = finished_step(workdir, stage_name)
  if step is None:
    raise FileNotFoundError(f"Stage {stage_name!r} in {workdir} is not finished (no {FINISHED} marker in "
                            f"{stage_dir(workdir, stage_name)}); run it first.")
  directory = stage_dir(workdir, stage_name)
  with _reader(directory, _handlers()) as reader:
    check_shapes(reader.item_metadata(step)["state"]["params"], target)
  # The PyTree handler can restore a subtree (partial_restore); the format is the one StandardSave wrote.
  with _reader(directory, {"state": ocp.PyTreeCheckpointHandler()}) as reader:
    item = {"params": target}
    args = ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return reader.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]


class _Quiet(logging.Filter):
  """Drops orbax's absl warnings that contain one of `phrases`."""

  def __init__(self, *phrases: str):
    super().__init__()
    self.phrases = phrases

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(p in message for p in self.phrases)


@contextlib.contextmanager
def _quiet(*phrases: str) -> Iterator[None]:
  quiet, logger = _Quiet(*phrases), logging.getLogger("absl")
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _reader(directory: epath.Path, handlers: dict[str, Any]) -> ocp.CheckpointManager:
  """A read-only CheckpointManager of a stage directory (writes nothing, creates nothing). Orbax's two warnings
  that it is read-only (one per stage handoff, twice) are dropped."""
  with _quiet("read only", "read_only=True"):
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                 item_handlers=handlers)
