"""Orbax checkpoints: one CheckpointManager per stage under W/<stage>/, stage handoff, restore onto any mesh.

A step directory holds two items: `state` (params, opt_state, step, rng; StandardSave) and `data` (the grain
iterator's position, one file per process). Restores go through abstract ShapeDtypeStructs that carry the
*target* shardings, so a checkpoint written on one mesh loads onto another. A stage is finished when its final
step is saved and W/<stage>/FINISHED names that step.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import grain.python as grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from vlm_jax.config import StageConfig

FINISHED = "FINISHED"  # marker file in W/<stage>/ holding the final step, written once that step is on disk


def absolute(path: str | epath.PathLike) -> epath.Path:
  """Orbax wants absolute paths: local paths are resolved, gs:// stays as is."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(path.expanduser().resolve())


def stage_dir(workdir: str | epath.PathLike, stage_name: str) -> epath.Path:
  """W/<stage>, absolute."""
  return absolute(workdir) / stage_name


def _handlers() -> dict[str, Any]:
  return {"state": ocp.StandardCheckpointHandler(), "data": grain.PyGrainCheckpointHandler()}


def manager(workdir: str | epath.PathLike, stage: StageConfig) -> ocp.CheckpointManager:
  """The stage's CheckpointManager: saves every stage.checkpoint_every steps (the final step is forced by
  the caller), keeps stage.max_to_keep, writes asynchronously (call wait_until_finished before exiting)."""
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
    items["data"] = grain.PyGrainCheckpointSave(data_iterator)
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
  check_shapes(mngr.item_metadata(step)["state"]["params"], abstract_state["params"])
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
  return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def mark_finished(workdir: str | epath.PathLike, stage_name: str, step: int) -> None:
  """Records that the stage's final checkpoint (`step`) is complete. Call after wait_until_finished."""
  if jax.process_index() == 0:
    (stage_dir(workdir, stage_name) / FINISHED).write_text(json.dumps({"step": step}) + "\n")


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
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options, item_handlers=_handlers()) as reader:
    check_shapes(reader.item_metadata(step)["state"]["params"], target)
  # The PyTree handler can restore a subtree (partial_restore); the format is the one StandardSave wrote.
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options,
                             item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as reader:
    item = {"params": target}
    args = ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return reader.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
