"""`vlm-jax bench`: training and generation speed against the machine's matmul peak and against transformers.

`run(config, compare_torch=..., plan=FULL)` measures, in one process:
  peak      a plan.peak_size^3 matmul, f32 and bf16 inputs with f32 accumulation (measure.matmul_peak), timed
            before and again after the main train steps; the higher of the two is the peak (the machine's
            speed drifts with other load on the host, and a low peak would flatter MFU)
  train     the real train step of the config's last stage on a synthetic batch of the stage's batch_size x
            data.seq_len with data.max_tiles tiles per row, in the config's dtype and in the other one (float32
            / bfloat16): median step time, tokens/s, images/s, model FLOPs (vlm_jax.flops), MFU = FLOPs /
            step_s / peak of that dtype's matmul path, compile time, peak RSS
  generate  8 prompts with an image each, greedy, plan.new_tokens new tokens with stop tokens barred:
            prefill and decode tokens/s (ours.time_generation says how they are split)
  scaling   step time vs seq len and tiles per image; compile time of a plan.layers[0]- vs plan.layers[1]-layer
            decoder
  torch     (compare_torch, last) the same model exported to transformers: its train step and generate, in
            float32 and bfloat16 autocast; speedups are their time / ours, per dtype and best dtype vs best dtype.
Returns nested dicts (report.py prints the table, writes the JSON).
"""
from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import jax

from vlm_jax import host_memory
from vlm_jax.bench import measure, ours, report
from vlm_jax.bench.measure import FULL, QUICK, Plan
from vlm_jax.config import Config, row_shape
from vlm_jax.generate import Generator
from vlm_jax.inputs.tokenizer import train_sentencepiece
from vlm_jax.sharding import make_mesh
from vlm_jax.train import step as step_lib

__all__ = ["FULL", "QUICK", "Plan", "run", "main"]
PEAK_KEY = {"float32": "f32_gflops", "bfloat16": "bf16_gflops"}


def _train_numbers(timing: dict[str, float], batch_size: int, seq_len: int, tiles: int,
                   peak_gflops: float) -> dict[str, float]:
  step_s, flops = timing["step_s"], timing["flops_per_step"]
  return {**timing, "tokens_per_s": batch_size * seq_len / step_s, "images_per_s": batch_size * tiles / step_s,
          "achieved_gflops": flops / step_s / 1e9, "peak_gflops": peak_gflops,
          "mfu": flops / step_s / (peak_gflops * 1e9)}


def _generate_numbers(timing: dict[str, float], prompt_tokens: int, rows: int, new_tokens: int) -> dict[str, float]:
  return {**timing, "prefill_tokens_per_s": prompt_tokens / timing["prefill_s"],
          "decode_tokens_per_s": rows * (new_tokens - 1) / timing["decode_s"]}


def run(config: Config, *, compare_torch: bool = False, plan: Plan = FULL, log=print) -> dict[str, Any]:
  """Runs the benchmark (module docstring) -> nested results."""
  stage = config.train.stages[-1]
  b, (s, n) = stage.batch_size, row_shape(config, stage)
  mesh = make_mesh(config.mesh)
  dtype = config.model.compute_dtype
  dtypes = [dtype] + [d for d in ("float32", "bfloat16") if d != dtype and plan.both_dtypes]
  results: dict[str, Any] = {"config": config.name, "devices": len(jax.devices()), "plan": plan.__dict__,
                             "host_malloc": host_memory.active()}

  log(f"peak: {plan.peak_size}^3 matmul")
  peaks = [measure.matmul_peak(plan.peak_size, plan.peak_repeats)]
  params = step_lib.init_params(config, mesh, jax.random.PRNGKey(config.seed))
  timings: dict[tuple[str, int, int], dict[str, float]] = {}

  def train_timing(dtype_, seq_len, tiles, steps):
    """Each (dtype, seq_len, tiles) is compiled and timed once."""
    key = (dtype_, seq_len, tiles)
    if key not in timings:
      log(f"train step: {dtype_}, seq_len {seq_len}, {tiles} tile(s) per row")
      timings[key] = ours.time_train_step(ours.with_dtype(config, dtype_), stage, mesh, params,
                                          measure.train_batch(config, b, seq_len, tiles), steps, plan.warmup,
                                          plan.fresh_compiles)
    return timings[key]

  def train_numbers(dtype_, seq_len, tiles, steps):
    return _train_numbers(train_timing(dtype_, seq_len, tiles, steps), b, seq_len, tiles,
                          results["peak"][PEAK_KEY[dtype_]])

  for d in dtypes:
    train_timing(d, s, n, plan.steps)
  log(f"peak: {plan.peak_size}^3 matmul, again")
  peaks.append(measure.matmul_peak(plan.peak_size, plan.peak_repeats))
  results["peak"] = {**{k: max(p[k] for p in peaks) for k in peaks[0]}, "matmul_size": plan.peak_size,
                     "measured": peaks}
  train = {"dtype": dtype, "batch_size": b, "seq_len": s, "num_tiles": n,
           "by_dtype": {d: train_numbers(d, s, n, plan.steps) for d in dtypes}}
  train.update(train["by_dtype"][dtype])
  train["peak_rss_mb"] = measure.peak_rss_mb()  # before torch runs in this process
  results["train"] = train

  with tempfile.TemporaryDirectory() as tmp:
    tokenizer_dir = pathlib.Path(tmp) / "tokenizer"
    tokenizer = train_sentencepiece(measure.CORPUS, 400)  # prompts only; model ids past it are never drawn
    tokenizer.save(tokenizer_dir)
    prompts = Generator(config, params, tokenizer).prepare(measure.requests(plan.rows))
    prompt_tokens = int((prompts["segment_ids"] > 0).sum())
    rows = prompts["input_ids"].shape[0]
    gen = {"dtype": dtype, "rows": rows, "prompt_len": prompts["input_ids"].shape[1],
           "prompt_tokens": prompt_tokens, "new_tokens": plan.new_tokens, "by_dtype": {}}
    for d in dtypes:
      log(f"generate: {d}")
      timing = ours.time_generation(ours.with_dtype(config, d), params, tokenizer, prompts, plan.new_tokens,
                                    plan.generate_repeats)
      gen["by_dtype"][d] = _generate_numbers(timing, prompt_tokens, rows, plan.new_tokens)
    gen.update(gen["by_dtype"][dtype])
    results["generate"] = gen
    # All of ours before transformers runs in this process: measured after it, the sequence-512 step took
    # 2.76-2.99 s in three runs, and 2.33 s before it.
    results["scaling"] = {
        "seq_len": {str(x): train_numbers(dtype, x, n, plan.scaling_steps) for x in sorted({s, *plan.seq_lens})},
        "tiles": {str(x): train_numbers(dtype, s, x, plan.scaling_steps) for x in sorted({n, *plan.tiles})}}
    compile_ = {}
    for layers in plan.layers:
      log(f"compile: {layers}-layer decoder")
      compile_[f"layers_{layers}_s"] = ours.compile_seconds(ours.with_layers(config, layers), stage, mesh, b, s, n,
                                                            plan.fresh_compiles)
    compile_["ratio"] = compile_[f"layers_{plan.layers[1]}_s"] / compile_[f"layers_{plan.layers[0]}_s"]
    results["compile"] = compile_
    if compare_torch:
      results["torch"] = _torch(config, stage, params, tokenizer_dir, pathlib.Path(tmp) / "hf",
                                measure.train_batch(config, b, s, n), prompts, plan, log)
      report.add_ratios(results)

  return results


def _torch(config, stage, params, tokenizer_dir, hf_dir, batch, prompts, plan, log) -> dict[str, Any]:
  from vlm_jax.bench import torch_side  # pylint: disable=import-outside-toplevel
  out = {**torch_side.set_threads(), "train": {}, "generate": {}}
  log("torch: export")
  model = torch_side.load_exported(config, params, tokenizer_dir, hf_dir)
  rows, new_tokens = prompts["input_ids"].shape[0], plan.new_tokens
  prompt_tokens = int((prompts["segment_ids"] > 0).sum())
  for dtype in torch_side.DTYPES:
    log(f"torch: generate {dtype}")
    timing = torch_side.time_generation(model, config, prompts, dtype, new_tokens, plan.generate_repeats)
    out["generate"][dtype] = _generate_numbers(timing, prompt_tokens, rows, new_tokens)
  for dtype in torch_side.DTYPES:
    log(f"torch: train step {dtype}")
    out["train"][dtype] = {"step_s": torch_side.time_train_step(model, config, stage, batch, dtype,
                                                                plan.torch_steps, 1)}
  return out


def main(config: Config, *, compare_torch: bool, json_out: str | None, quick: bool, serve: bool = False,
         loader: dict[str, Any] | None = None) -> int:
  """`vlm-jax bench`: runs, prints the table, writes the JSON if asked. With `serve`, bench/serve.py instead;
  with `loader` (bench/loader.py's run options), the input pipeline."""
  if loader is not None:
    from vlm_jax.bench import loader as loader_bench  # pylint: disable=import-outside-toplevel
    results = loader_bench.run(config, **loader)
    print(loader_bench.table(results))
  elif serve:
    from vlm_jax.bench import serve as serve_bench  # pylint: disable=import-outside-toplevel
    results = serve_bench.run(config, QUICK if quick else FULL)
    print(serve_bench.table(results))
  else:
    results = run(config, compare_torch=compare_torch, plan=QUICK if quick else FULL)
    print(report.table(results))
  if json_out:
    report.write_json(results, json_out)
    print(f"wrote {json_out}")
  return 0
