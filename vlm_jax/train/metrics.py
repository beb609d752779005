"""Training metrics: one JSON object per logged step in W/<stage>/metrics.jsonl, plus TensorBoard scalars (and
histograms of vector metrics) in W/tensorboard/<stage>/. Only process 0 writes; elsewhere the writer does nothing."""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath

from vlm_jax.losses import IGNORE_ID


def import_tensorboardx():
  """tensorboardX, without the torch import its writer module makes only to accept torch tensors (1.5 s of every
  training process's start; we log Python floats). A torch already imported stays."""
  import sys  # pylint: disable=import-outside-toplevel
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel  (pulls in protobuf; process 0 only)
  finally:
    del sys.modules["torch"]
  return tensorboardX


def metrics_path(workdir: str | epath.PathLike, stage_name: str) -> epath.Path:
  return epath.Path(workdir) / stage_name / "metrics.jsonl"


def read_metrics(workdir: str | epath.PathLike, stage_name: str) -> list[dict[str, Any]]:
  """The logged records of a stage, in file order ([] when none)."""
  path = metrics_path(workdir, stage_name)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def token_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
  """Tokens of a host batch, three ways (the train log reports each per second as `<name>_per_s`):
  tokens: every position the model computes, padding included ([B, S]: B * S);
  real_tokens: positions that are not padding (segment_ids != 0);
  supervised_tokens: positions the loss scores (the label of the next position is not IGNORE_ID: the step's
  num_tokens). Contrastive batches: text positions, and real ones (text_mask); they have no labels."""
  if "input_ids" not in batch:
    return {"tokens": int(np.size(batch["text_ids"])), "real_tokens": int(np.sum(batch["text_mask"]))}
  return {"tokens": int(np.size(batch["input_ids"])), "real_tokens": int(np.sum(batch["segment_ids"] != 0)),
          "supervised_tokens": int(np.sum(np.asarray(batch["labels"])[:, 1:] != IGNORE_ID))}


def tensorboard_tag(name: str) -> str:
  """'loss' -> 'train/loss'; grouped names ('moe/expert_load/0', 'eval/accuracy/colour') stay as they are."""
  return name if "/" in name else f"train/{name}"


class MetricsWriter:
  """Appends {"step": int, name: float, ...} records. `resume_from(step)` drops records past `step`, so a run
  restarted from its last checkpoint logs each step once."""

  def __init__(self, workdir: str | epath.PathLike, stage_name: str):
    self.enabled = jax.process_index() == 0
    self.path = metrics_path(workdir, stage_name)
    self._tensorboard = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._tensorboard = import_tensorboardx().SummaryWriter(str(epath.Path(workdir) / "tensorboard" / stage_name))

  def resume_from(self, step: int) -> None:
    if not self.enabled or not self.path.exists():
      return
    kept = [r for r in read_metrics(self.path.parent.parent, self.path.parent.name) if r["step"] <= step]
    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

  def write(self, step: int, values: dict[str, Any]) -> None:
    """values: name -> a scalar, or a vector [N] (moe/expert_load [E]) logged as the scalars name/0 .. name/N-1
    and, in TensorBoard, also as a histogram over the indices (bucket i holds value i: one bar per expert).
    TensorBoard tags: `train/<name>` for plain names, the name itself when it has a group (`moe/z_loss`)."""
    if not self.enabled:
      return
    scalars = {}
    for name, value in values.items():
      value = np.asarray(value, np.float64)
      if value.ndim == 0:
        scalars[name] = float(value)
        continue
      scalars.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
      index = np.arange(value.size)
      self._tensorboard.add_histogram_raw(
          tensorboard_tag(name), min=0, max=value.size - 1, num=float(value.sum()), sum=float(index @ value),
          sum_squares=float(index ** 2 @ value), bucket_limits=(index + 0.5).tolist(), bucket_counts=value.tolist(),
          global_step=int(step))
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    for name, value in scalars.items():
      self._tensorboard.add_scalar(tensorboard_tag(name), value, int(step))

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
