"""Ahead-of-time compilation for a TPU topology on any machine: does a config fit, and how fast could it be?

`aot_report(config, "v5e:2x4")` builds the config's mesh over the devices of a TPU topology description
(libtpu compiles for it; no TPU needed), then lowers and compiles the real train step of a stage
(vlm_jax/train/step.py: params, optimizer state and batch with their shardings, state donated) and a
prefill (the forward pass over a batch of prompts, returning last-position logits). From the compiled
executables it reads the per-device memory (XLA's buffer assignment) and compares it with the chip's HBM;
with the analytic model FLOPs (vlm_jax/flops.py) it gives a roofline bound on the step time:

  compute time = model FLOPs / (chips * peak bf16 FLOP/s)
  memory time  = bytes per device / HBM bandwidth, bytes = arguments read once + outputs written once +
                 the peak temporaries written and read once (a lower bound on HBM traffic)
  step time   >= max(compute time, memory time);  MFU <= compute time / step time bound.

The HLO roofline reads XLA's own per-device `flops` and `bytes accessed` of the compiled train step (after
fusion, remat and layout) and estimates the step time and MFU from them:

  roofline time = max(XLA flops / device peak, XLA bytes accessed / device HBM bandwidth)
  estimated MFU = model FLOPs / (chips * peak * roofline time)

XLA counts a loop body once, so these come from compiles without loops: unscanned (`roofline="unscanned"`),
or unscanned at 2k and 4k decoder layers (k = the MoE interleave; the ViT likewise at 2 and 4 blocks)
extrapolated linearly, c(L) = c(2k) + (L - 2k) / 2k * (c(4k) - c(2k)) (`"extrapolate"`, much cheaper for big
models). An unscanned model also unrolls the chunked loss; the cost compiles turn off XLA:TPU's windowed
einsums (FSDP's all-gather + dot as a loop of partial dots: same FLOPs, other schedule) and run the stage's
micro-batches as one (grad_accum 1: same FLOPs). Loops still left are reported (`xla_cost["loops"]`; e.g.
XLA:TPU's gather of a tile budget's pixels, which moves bytes only). Pallas
kernels are custom calls XLA does not count: their model FLOPs (`flops.attention_kernel_flops`) are added at
peak. XLA:TPU's own `optimal_seconds` is shown only where it is sane (positive and not below the roofline); on
v5e and on some whole steps it comes out negative.

A compile that runs out of HBM (XLA fails with RESOURCE_EXHAUSTED) is reported as not fitting.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import topologies

from vlm_jax import cpu_features
from vlm_jax import flops as flops_lib
from vlm_jax.compile_cache import fresh_compiles
from vlm_jax.config import Config, ConfigError, apply_overrides, row_shape, tile_budget_per_row
from vlm_jax.model import lora as lora_lib
from vlm_jax.model import vlm
from vlm_jax.sharding import data_sharding, make_mesh
from vlm_jax.train import optimizer as optimizer_lib
from vlm_jax.train import step as step_lib

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip numbers: HBM capacity, dense bf16 peak, HBM bandwidth."""
  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float


# Public spec-sheet numbers per chip, the one table of them (a v4 / v5p chip holds two TensorCores; a
# topology description may list each core as a device, then each gets half).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.82e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.76e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12),
}


def topology_devices(topology: str) -> tuple[Chip, list[Any], int]:
  """'v5e:2x4' -> (chip, the topology's devices, number of chips). Works without a TPU (libtpu only)."""
  kind = topology.split(":")[0]
  if kind not in CHIPS or ":" not in topology:
    raise ConfigError(f"Topology {topology!r}: expected <chip>:<shape> with chip one of {sorted(CHIPS)}, "
                      f"e.g. v5e:2x4, v5p:2x2x2, v4:2x2x2, v6e:2x4.")
  # Compiling touches no TPU, so let libtpu load next to another process that holds it (a run, or a
  # parallel test); without this libtpu refuses with "Internal error when accessing libtpu lockfile".
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except RuntimeError as e:  # jax.errors.JaxRuntimeError: e.g. a shape this chip does not come in
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    raise ConfigError(f"Topology {topology!r}: libtpu could not describe it ({reason}). Check the shape (one the "
                      f"chip comes in, e.g. v5e:2x4, v5p:2x2x2, v4:2x2x2, v6e:2x4) and that libtpu is installed "
                      f"(`pip install -e .[tpu]`).") from e
  chips = len({tuple(d.coords) for d in devices})
  return CHIPS[kind], devices, chips


def memory_stats(compiled: Any) -> dict[str, int]:
  """Per-device bytes of a compiled executable: argument, output, alias (outputs reusing donated inputs),
  temp, generated_code, and total = generated code + the larger of XLA's peak estimate and
  arguments + outputs - aliases + temps (the two disagree either way by a few percent to 25%; the larger
  one is the safe side for `fits`)."""
  m = compiled.memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
         "temp": m.temp_size_in_bytes, "generated_code": m.generated_code_size_in_bytes}
  live = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["total"] = max(getattr(m, "peak_memory_in_bytes", 0), live) + out["generated_code"]
  return out


# For cost compiles only: FSDP's all-gather + dot as one dot, not a while loop XLA's cost analysis counts once.
COST_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                         "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compile_memory(fn: Any, *args: Any, compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Lowers and compiles fn(*args) -> {"memory": memory_stats, "error": None, "compile_seconds", "compiled"
  (the executable: its input_shardings, as_text())}, or memory and compiled None and the error message when
  XLA finds it does not fit in HBM."""
  start = time.perf_counter()
  try:
    with fresh_compiles():  # the persistent cache could not load a topology's executable back (no TPU client)
      compiled = fn.lower(*args).compile(compiler_options=compiler_options)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"memory": None, "error": str(e).splitlines()[0], "compile_seconds": time.perf_counter() - start,
            "compiled": None}
  return {"memory": memory_stats(compiled), "error": None, "compile_seconds": time.perf_counter() - start,
          "compiled": compiled}


def xla_cost(compiled: Any) -> dict[str, float]:
  """XLA's per-device cost analysis of a compiled executable: flops, bytes (accessed), optimal_seconds
  (XLA:TPU's cost-model time; -1.0 where the backend gives none) and loops: the while loops in the program,
  each body counted once."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
          "optimal_seconds": float(cost.get("optimal_seconds", -1.0)), "loops": float(count_loops(compiled))}


def count_loops(compiled: Any) -> int:
  """While loops in a compiled program's HLO."""
  return len(re.findall(r"\bwhile\(", compiled.as_text()))


def roofline_seconds(cost: dict[str, float], chip: Chip, per_chip: int, kernel_flops: float = 0.0) -> float:
  """max(flops / device peak, bytes / device HBM bandwidth) of one device's cost, seconds; `kernel_flops`
  (custom calls XLA does not count) join the flops."""
  return max((cost["flops"] + kernel_flops) / (chip.peak_flops / per_chip),
             cost["bytes"] / (chip.hbm_bandwidth / per_chip))


def sane_optimal_seconds(optimal_seconds: float, roofline: float) -> float | None:
  """XLA:TPU's optimal_seconds where it can be believed (positive, not below the roofline), else None."""
  return optimal_seconds if optimal_seconds > 0 and optimal_seconds >= roofline else None


def extrapolate(base: dict[str, float], more: dict[str, float], base_layers: int, more_layers: int,
                layers: int) -> dict[str, float]:
  """The part of a cost linear in a layer count: base + (layers - base_layers) / (more_layers - base_layers) *
  (more - base), per key (base, more: costs with base_layers and more_layers layers)."""
  t = (layers - base_layers) / (more_layers - base_layers)
  return {k: base[k] + t * (more[k] - base[k]) for k in base}


def abstract_batch(config: Config, loss: str, batch_size: int, seq_len: int, num_tiles: int,
                   mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a global batch, leading axis sharded over (data, fsdp): uint8 pixels, as the loader
  ships them, and under data.tile_budget the tile_index [B, K] that makes the ViT run on B * K tiles."""
  if loss == "contrastive":
    size, length = config.model.vision.image_size, config.model.contrastive.max_text_len
    arrays = {"pixel_values": np.zeros((batch_size, 1, size, size, 3), np.uint8),
              "text_ids": np.zeros((batch_size, length), np.int32), "text_mask": np.ones((batch_size, length), bool)}
    k = config.model.contrastive.hard_negatives
    if k:
      arrays.update(negative_text_ids=np.zeros((batch_size, k, length), np.int32),
                    negative_text_mask=np.ones((batch_size, k, length), bool),
                    negative_valid=np.ones((batch_size, k), bool))
  else:
    arrays = vlm.dummy_batch(config.model, batch_size, seq_len, num_tiles)
    per_row = tile_budget_per_row(config, num_tiles)
    if per_row:
      arrays["tile_index"] = np.zeros((batch_size, per_row), np.int32)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sharding(mesh, v.ndim)) for k, v in arrays.items()}


def compile_train_step(config: Config, stage: Any, mesh: Any, batch: dict,
                       compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compiles the stage's real train step (state donated) for the mesh."""
  shapes, _ = vlm.abstract_params(config.model)
  tx = optimizer_lib.make_optimizer(stage, shapes)
  abstract = step_lib.abstract_state(config, stage, mesh, tx)
  with step_lib.use_mesh(mesh):
    train_step = step_lib.make_train_step(vlm.VLM(config.model), stage, mesh, tx, abstract)
    return compile_memory(train_step, abstract, batch, compiler_options=compiler_options)


def compile_prefill(config: Config, mesh: Any, batch: dict) -> dict[str, Any]:
  """Compiles a prompt forward pass that keeps only the last position's logits ([B, V], what decoding needs)."""
  _, p_shardings = step_lib.param_shardings(config, mesh)
  shapes, _ = vlm.abstract_params(config.model)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, p_shardings)
  model = vlm.VLM(config.model)
  prompt = {k: v for k, v in batch.items() if k not in ("labels", "tile_index")}  # generation runs every tile

  def prefill(params, batch):
    return model.apply({"params": params}, batch)["logits"][:, -1]
  with step_lib.use_mesh(mesh):
    return compile_memory(jax.jit(prefill), params, prompt)


ROOFLINES = ("none", "auto", "unscanned", "extrapolate")


def _with(config: Config, overrides: list[str]) -> Config:
  return apply_overrides(config, overrides) if overrides else config


def whole_step_cost(config: Config, stage: Any, mesh: Any, batch: dict, method: str) -> dict[str, float] | None:
  """XLA's per-device cost of the whole train step, without loops where it can (module docstring): one unscanned
  compile ("unscanned"), or the linear extrapolation from 2k and 4k layers per tower ("extrapolate"). None when
  a compile does not fit in HBM."""
  stage = dataclasses.replace(stage, grad_accum=1)

  def cost(overrides):
    out = compile_train_step(_with(config, ["model.scan_layers=false", *overrides]), stage, mesh, batch,
                             compiler_options=COST_COMPILER_OPTIONS)
    return None if out["compiled"] is None else xla_cost(out["compiled"])
  if method == "unscanned":
    return cost([])
  d, v = config.model.decoder, config.model.vision
  k = d.moe.every_n_layers if d.moe.num_experts else 1
  towers = [("model.decoder.num_layers", 2 * k, 4 * k, d.num_layers)]
  if v.kind != "none" and v.feature_layer < 0 and stage.loss == "lm" and batch["pixel_values"].shape[1]:
    towers.append(("model.vision.depth", 2, 4, v.depth))
  base_overrides = [f"{key}={lo}" for key, lo, _, _ in towers]
  base = cost(base_overrides)
  if base is None:
    return None
  total = dict(base)
  for i, (key, lo, hi, layers) in enumerate(towers):
    more = cost([o if j != i else f"{key}={hi}" for j, o in enumerate(base_overrides)])
    if more is None:
      return None
    grown = extrapolate(base, more, lo, hi, layers)
    total = {name: total[name] + grown[name] - base[name] for name in total}
  return total


def aot_report(config: Config, topology: str, stage_name: str | None = None, batch_size: int | None = None,
               seq_len: int | None = None, prefill: bool = True, roofline: str = "none") -> dict[str, Any]:
  """Compiles a stage's train step (and a prefill) for a TPU topology; returns memory, FLOPs and roofline.

  Defaults: the last stage, its global batch_size and row shape (`config.row_shape`: its seq_len and tile slots,
  else data's).
  Memory numbers are bytes per device; `fits` says whether every compiled program fits the device's HBM.
  roofline: none | unscanned | extrapolate | auto (the main compile's own cost when the config is unscanned,
  else extrapolate): how XLA's whole-step cost is found for the HLO roofline (module docstring).
  """
  if roofline not in ROOFLINES:
    raise ConfigError(f"roofline={roofline!r}: choose one of {', '.join(ROOFLINES)}.")
  if config.model.kernels == "auto":  # resolve for the target, not for this host's backend
    config = apply_overrides(config, ["model.kernels=tpu"])
  if config.model.dtype == "auto":  # likewise: a TPU computes in bf16 (cpu_features.resolve)
    config = apply_overrides(config, [f"model.dtype={cpu_features.resolve('auto', 'tpu')[0]}"])
  stage = config.train.stage(stage_name) if stage_name else config.train.stages[-1]
  batch_size = stage.batch_size if batch_size is None else batch_size
  row_tokens, num_tiles = row_shape(config, stage)
  seq_len = row_tokens if seq_len is None else seq_len
  chip, devices, num_chips = topology_devices(topology)
  per_chip = len(devices) // num_chips
  mesh = make_mesh(config.mesh, devices)
  batch_axes = data_sharding(mesh, 1).spec[0]
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
  if batch_size % batch_shards:
    raise ConfigError(f"batch_size={batch_size} is not divisible by the {batch_shards} batch shards (mesh axes "
                      f"{'*'.join(batch_axes)}) on {topology}.")
  batch = abstract_batch(config, stage.loss, batch_size, seq_len, num_tiles, mesh)
  counts = param_counts(config, stage)
  hbm = chip.hbm_bytes // per_chip

  programs = {"train_step": compile_train_step(config, stage, mesh, batch)}
  if prefill and stage.loss == "lm":
    programs["prefill"] = compile_prefill(config, mesh, batch)
  for p in programs.values():
    p["fits"] = p["memory"] is not None and p["memory"]["total"] <= hbm

  step_flops = flops_lib.train_step_flops(config, stage, batch_size, seq_len, num_tiles)
  compute_seconds = step_flops / (num_chips * chip.peak_flops)
  train_memory = programs["train_step"]["memory"]
  if train_memory:
    moved = train_memory["argument"] + train_memory["output"] + 2 * train_memory["temp"]
    memory_seconds = moved / (chip.hbm_bandwidth / per_chip)
  else:
    moved = memory_seconds = None
  bound = max(compute_seconds, memory_seconds or 0.0)
  estimate = hlo_estimate(config, stage, mesh, batch, programs["train_step"], roofline, chip, per_chip,
                          num_chips, step_flops)
  return {**estimate,
      "config": config.name, "topology": topology, "chip": chip.name, "num_chips": num_chips,
      "num_devices": len(devices), "mesh": dict(mesh.shape), "stage": stage.name, "batch_size": batch_size,
      "seq_len": seq_len, "num_tiles": num_tiles if stage.loss == "lm" else 1, "grad_accum": stage.grad_accum,
      **counts,
      "hbm_per_device": hbm, "programs": programs,
      "fits": all(p["fits"] for p in programs.values()),
      "flops_per_step": step_flops, "hbm_bytes_moved_per_device": moved,
      "compute_seconds": compute_seconds, "memory_seconds": memory_seconds, "step_seconds_bound": bound,
      "mfu_bound": compute_seconds / bound if bound else None,
  }


def param_counts(config: Config, stage: Any) -> dict[str, int]:
  """params (the base's), adapter_params (a LoRA stage's factors, 0 without) and trainable_params (what gets
  optimizer state: the adapter factors and the params the stage trains in full, not the kernels adapted)."""
  shapes, logical = vlm.abstract_params(config.model)
  tree, _ = lora_lib.with_abstract(shapes, logical, stage.lora)
  labels = jax.tree.leaves(optimizer_lib.trainable_labels(tree, stage))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  size = lambda x: math.prod(x.shape)
  is_factor = lambda path: jax.tree_util.keystr(path[-1:], simple=True) in ("lora_a", "lora_b")
  return {"params": sum(size(x) for x in jax.tree.leaves(shapes)),
          "adapter_params": sum(size(x) for path, x in leaves if is_factor(path)),
          "trainable_params": sum(size(x) for (_, x), l in zip(leaves, labels) if l == optimizer_lib.TRAIN)}


def hlo_estimate(config: Config, stage: Any, mesh: Any, batch: dict, train: dict, method: str, chip: Chip,
                 per_chip: int, num_chips: int, step_flops: float) -> dict[str, Any]:
  """The report's HLO roofline keys: xla_cost (per device, whole step), kernel_flops (per device, the Pallas
  kernels' model FLOPs XLA does not count), roofline_method, roofline_seconds,
  roofline_bound ('compute' | 'memory'), mfu_estimate, optimal_seconds (None unless sane), optimal_mfu."""
  out = dict(xla_cost=None, kernel_flops=None, roofline_method=method, roofline_seconds=None,
             roofline_bound=None, mfu_estimate=None, optimal_seconds=None, optimal_mfu=None)
  if method == "auto":
    method = "unscanned" if not config.model.scan_layers else "extrapolate"
    out["roofline_method"] = method
  if method == "none" or train["compiled"] is None:
    return out
  cost = None
  if method == "unscanned" and not config.model.scan_layers:
    cost = xla_cost(train["compiled"])
    cost = cost if not cost["loops"] else None  # else the program that runs is not whole: compile one that is
  if cost is None:
    cost = whole_step_cost(config, stage, mesh, batch, method)
  if cost is not None:
    kernel = 0.0
    if config.model.kernels == "tpu" and "input_ids" in batch:
      (b, length), pixels = batch["input_ids"].shape, batch.get("pixel_values")
      kernel = flops_lib.attention_kernel_flops(config, stage, b, length, 0 if pixels is None else pixels.shape[1])
    out.update(estimate_from_cost(cost, chip, per_chip, num_chips, step_flops, kernel))
  return out


def estimate_from_cost(cost: dict[str, float], chip: Chip, per_chip: int, num_chips: int,
                       step_flops: float, kernel_flops: float = 0.0) -> dict[str, Any]:
  """XLA's whole-step cost per device -> xla_cost, kernel_flops (per device, added at peak), roofline_seconds,
  roofline_bound, mfu_estimate (model FLOPs over chips * peak * roofline), optimal_seconds (None unless sane)
  and optimal_mfu. kernel_flops: the whole step's, over all chips."""
  per_device = kernel_flops / (num_chips * per_chip)
  seconds = roofline_seconds(cost, chip, per_chip, per_device)
  compute = (cost["flops"] + per_device) / (chip.peak_flops / per_chip)
  optimal = sane_optimal_seconds(cost["optimal_seconds"], seconds)
  mfu = lambda t: step_flops / (num_chips * chip.peak_flops * t)
  return dict(xla_cost=cost, kernel_flops=per_device, roofline_seconds=seconds, roofline_bound="compute" if compute >= seconds else "memory",
              mfu_estimate=mfu(seconds), optimal_seconds=optimal, optimal_mfu=None if optimal is None else mfu(optimal))


def _gib(n: int | None) -> str:
  if n is None:
    return "-"
  return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 1024 ** 2:.1f} MiB"


def format_report(r: dict[str, Any]) -> str:
  """A plain-text table of an aot_report."""
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"{r['config']} / stage {r['stage']} on {r['topology']}: {r['num_chips']} x {r['chip']} "
           f"({r['num_devices']} devices, mesh {mesh})",
           f"global batch {r['batch_size']} x seq {r['seq_len']}, {r['num_tiles']} tile(s)/row, grad_accum "
           f"{r['grad_accum']}; params {r['params'] / 1e6:.1f}M, trainable {r['trainable_params'] / 1e6:.1f}M"
           + (f" ({r['adapter_params'] / 1e6:.2f}M in LoRA adapters)" if r.get("adapter_params") else ""),
           "",
           f"{'per device':<12}{'argument':>12}{'output':>12}{'alias':>12}{'temp':>12}{'code':>12}{'total':>12}"
           f"{'HBM':>12}  fits  compile"]
  for name, p in r["programs"].items():
    m = p["memory"]
    if m is None:
      lines.append(f"{name:<12}{'out of HBM: ' + p['error']}")
      continue
    cells = "".join(f"{_gib(m[k]):>12}" for k in ("argument", "output", "alias", "temp", "generated_code", "total"))
    lines.append(f"{name:<12}{cells}{_gib(r['hbm_per_device']):>12}  {'yes' if p['fits'] else 'NO ':<4}"
                 f"  {p['compile_seconds']:.1f}s")
  lines += ["", f"model FLOPs per step   {r['flops_per_step']:.3e}",
            f"compute time           {r['compute_seconds'] * 1e3:.1f} ms at peak"]
  if r["memory_seconds"] is not None:
    lines += [f"HBM time               {r['memory_seconds'] * 1e3:.1f} ms "
              f"({_gib(r['hbm_bytes_moved_per_device'])} per device, lower bound)",
              f"step time bound        {r['step_seconds_bound'] * 1e3:.1f} ms -> MFU <= {r['mfu_bound']:.0%}"]
  if r.get("roofline_seconds") is not None:
    cost = r["xla_cost"]
    optimal = ("no estimate" if r["optimal_seconds"] is None else
               f"{r['optimal_seconds'] * 1e3:.1f} ms -> est. MFU {r['optimal_mfu']:.2f}")
    loops = int(cost.get("loops", 0))
    lines += [f"XLA per device         {cost['flops'] / 1e12:.3f} TFLOP + {r['kernel_flops'] / 1e12:.3f} in kernels, "
              f"{cost['bytes'] / 1e9:.2f} GB accessed (whole step, {r['roofline_method']})"
              + (f"; {loops} while loop(s) left, each body counted once" if loops else ""),
              f"HLO roofline           {r['roofline_seconds'] * 1e3:.1f} ms ({r['roofline_bound']}) -> est. MFU "
              f"{r['mfu_estimate']:.2f}",
              f"XLA optimal_seconds    {optimal}"]
  lines.append(f"fits: {'yes' if r['fits'] else 'NO'}")
  return "\n".join(lines)


def main(config: Config, topology: str, stage_name: str | None = None, batch_size: int | None = None,
         seq_len: int | None = None, roofline: str = "auto") -> int:
  """`vlm-jax aot`: prints the report; exit code 0 when everything fits, 1 when not."""
  report = aot_report(config, topology, stage_name, batch_size, seq_len, roofline=roofline)
  print(format_report(report))
  return 0 if report["fits"] else 1
