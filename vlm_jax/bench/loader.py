"""`vlm-jax bench --loader`: how fast one host's input pipeline makes a stage's batches, against its step.

The loader of a stage (default the config's last) is built as `vlm-jax train` builds it for one feed group of
`hosts` (`inputs/shards.py`: hosts that hold the same batch shards count once) and timed over whole host
batches of batch_size / hosts rows, after a first batch that pays for start-up (worker processes, first
reads). It reports, per host:
  records_per_s  examples that reached a row (after dropped records; packed rows hold several)
  rows_per_s     rows of the stage's shape (seq_len x max_tiles)
  tiles_per_s    real image tiles (tile_mask), tokens_per_s real tokens (segment_ids > 0)
  batch_s        seconds per host batch
With `step_seconds` (the step time the run expects, e.g. `vlm-jax aot --roofline ...`'s roofline_seconds) it
also gives rows_needed_per_s = host rows / step_seconds and `keeps_up`: batch_s <= step_seconds. A loader
slower than the step leaves the chips idle; raise data.num_workers / data.read_threads (or prepare smaller
images) and measure again.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from vlm_jax.config import Config, InputError, row_shape
from vlm_jax.inputs import loader as loader_lib
from vlm_jax.inputs.tokenizer import load_tokenizer


def batch_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
  """Rows, examples (distinct non-zero segment ids of a row; a contrastive row is one), real tiles and real
  tokens of one host batch."""
  if "segment_ids" in batch:
    segments = np.asarray(batch["segment_ids"])
    records, tokens = sum(len(np.unique(row[row > 0])) for row in segments), int((segments > 0).sum())
  else:  # task image_text: one image and its caption per row
    records, tokens = len(batch["text_ids"]), int(np.asarray(batch["text_mask"]).sum())
  tiles = int(np.asarray(batch["tile_mask"]).sum()) if "tile_mask" in batch else records
  return {"rows": len(batch["pixel_values"]), "records": int(records), "tiles": tiles, "tokens": tokens}


def run(config: Config, *, stage: str | None = None, hosts: int = 1, batches: int = 8,
        step_seconds: float | None = None) -> dict[str, Any]:
  """Times `batches` host batches of `stage` for one of `hosts` feed groups -> the numbers of the docstring."""
  chosen = config.train.stage(stage) if stage else config.train.stages[-1]
  if hosts < 1 or chosen.batch_size % hosts:
    raise InputError(f"--hosts {hosts} must be >= 1 and divide the stage's batch_size {chosen.batch_size}.")
  if batches < 1 or (step_seconds is not None and step_seconds <= 0):
    raise InputError(f"--batches must be >= 1 and --step-seconds > 0 (got {batches}, {step_seconds}).")
  tokenizer = load_tokenizer(config)
  start = time.perf_counter()
  it = loader_lib.make_loader(config, chosen, tokenizer, process_index=0, process_count=hosts)
  next(it)
  first_s = time.perf_counter() - start
  totals = {"rows": 0, "records": 0, "tiles": 0, "tokens": 0}
  start = time.perf_counter()
  for _ in range(batches):
    for k, v in batch_counts(next(it)).items():
      totals[k] += v
  seconds = time.perf_counter() - start
  seq_len, max_tiles = row_shape(config, chosen)
  out: dict[str, Any] = {
      "config": config.name, "stage": chosen.name, "hosts": hosts, "host_rows": chosen.batch_size // hosts,
      "seq_len": seq_len, "max_tiles": max_tiles, "num_workers": config.data.num_workers,
      "read_threads": config.data.read_threads, "batches": batches, "first_batch_s": first_s,
      "batch_s": seconds / batches, **{f"{k}_per_s": v / seconds for k, v in totals.items()},
      "step_seconds": step_seconds}
  if step_seconds is not None:
    out["rows_needed_per_s"] = out["host_rows"] / step_seconds
    out["keeps_up"] = out["batch_s"] <= step_seconds
  return out


def table(r: dict[str, Any]) -> str:
  """The printed report: per-host rates, and the verdict against the step when its time is known."""
  lines = [f"loader of {r['config']}:{r['stage']}, one host of {r['hosts']}: {r['host_rows']} rows of "
           f"{r['seq_len']} tokens x {r['max_tiles']} tiles per step; num_workers {r['num_workers']}, "
           f"read_threads {r['read_threads']}",
           f"  first batch {r['first_batch_s']:.2f} s (start-up), then {r['batch_s']:.3f} s per batch over "
           f"{r['batches']} batches",
           f"  records/s {r['records_per_s']:9.1f}   rows/s {r['rows_per_s']:9.1f}   tiles/s "
           f"{r['tiles_per_s']:9.1f}   tokens/s {r['tokens_per_s']:11.0f}"]
  if r["step_seconds"] is None:
    lines.append("  no step time given: pass --step-seconds (e.g. the roofline_seconds of `vlm-jax aot "
                 "--roofline auto`) to compare")
  elif r["keeps_up"]:
    lines.append(f"  the step ({r['step_seconds']:.3f} s) needs {r['rows_needed_per_s']:.1f} rows/s: the loader "
                 f"keeps up ({r['batch_s'] / r['step_seconds']:.2f} of the step)")
  else:
    lines.append(f"  FINDING: the loader is slower than the step: {r['batch_s']:.3f} s per batch against "
                 f"{r['step_seconds']:.3f} s per step ({r['rows_per_s']:.1f} of the {r['rows_needed_per_s']:.1f} "
                 "rows/s the step needs); raise data.num_workers / data.read_threads, or feed smaller images")
  return "\n".join(lines)
