"""Training metrics: one JSON object per logged step in W/<stage>/metrics.jsonl, plus TensorBoard scalars in
W/tensorboard/<stage>/. Only process 0 writes; on other processes the writer does nothing."""
from __future__ import annotations

import json
from typing import Any

import jax
from etils import epath


def metrics_path(workdir: str | epath.PathLike, stage_name: str) -> epath.Path:
  return epath.Path(workdir) / stage_name / "metrics.jsonl"


def read_metrics(workdir: str | epath.PathLike, stage_name: str) -> list[dict[str, Any]]:
  """The logged records of a stage, in file order ([] when none)."""
  path = metrics_path(workdir, stage_name)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
  """Appends {"step": int, name: float, ...} records. `resume_from(step)` drops records past `step`, so a run
  restarted from its last checkpoint logs each step once."""

  def __init__(self, workdir: str | epath.PathLike, stage_name: str):
    self.enabled = jax.process_index() == 0
    self.path = metrics_path(workdir, stage_name)
    self._tensorboard = None
    if self.enabled:
      import tensorboardX  # pylint: disable=import-outside-toplevel  (pulls in protobuf; process 0 only)
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._tensorboard = tensorboardX.SummaryWriter(str(epath.Path(workdir) / "tensorboard" / stage_name))

  def resume_from(self, step: int) -> None:
    if not self.enabled or not self.path.exists():
      return
    kept = [r for r in read_metrics(self.path.parent.parent, self.path.parent.name) if r["step"] <= step]
    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in values.items():
      self._tensorboard.add_scalar(f"train/{name}", float(value), int(step))

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
