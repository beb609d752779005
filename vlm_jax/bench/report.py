"""The benchmark's ratios against transformers, its printed table (markdown) and its JSON file."""
from __future__ import annotations

import json
from typing import Any

from etils import epath


def add_ratios(results: dict[str, Any]) -> None:
  """Their time / ours (> 1: vlm_jax is faster), per dtype and each side at its best dtype:
  train.speedup_vs_torch (step time), generate.decode_speedup_vs_torch and prefill_speedup_vs_torch
  (tokens/s, ours / theirs)."""
  train, gen, theirs = results["train"], results["generate"], results["torch"]
  for dtype, ours in train["by_dtype"].items():
    ours["torch_step_s"] = theirs["train"][dtype]["step_s"]
    ours["speedup_vs_torch"] = ours["torch_step_s"] / ours["step_s"]
  best_ours = min(train["by_dtype"], key=lambda d: train["by_dtype"][d]["step_s"])
  best_theirs = min(theirs["train"], key=lambda d: theirs["train"][d]["step_s"])
  train["best_dtype"], train["torch_best_dtype"] = best_ours, best_theirs
  train["speedup_vs_torch"] = theirs["train"][best_theirs]["step_s"] / train["by_dtype"][best_ours]["step_s"]
  for kind in ("decode", "prefill"):
    key = f"{kind}_tokens_per_s"
    for dtype, ours in gen["by_dtype"].items():
      ours[f"torch_{key}"] = theirs["generate"][dtype][key]
      ours[f"{kind}_speedup_vs_torch"] = ours[key] / ours[f"torch_{key}"]
    best = max(o[key] for o in gen["by_dtype"].values())
    gen[f"{kind}_speedup_vs_torch"] = best / max(t[key] for t in theirs["generate"].values())


def write_json(results: dict[str, Any], path: str) -> None:
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1) + "\n")


def _row(cells: list[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def table(r: dict[str, Any]) -> str:
  """One markdown table: a row per measurement, a column per (side, dtype)."""
  train, gen, torch = r["train"], r["generate"], r.get("torch")
  dtypes = list(train["by_dtype"])
  columns = [f"vlm_jax {d}" for d in dtypes] + ([f"torch {d}" for d in dtypes] if torch else [])
  lines = [f"{r['config']}: batch {train['batch_size']} x {train['seq_len']} tokens, {train['num_tiles']} tile(s) "
           f"per row, {r['devices']} JAX device(s)" + (f", {torch['threads']} torch threads (OMP_WAIT_POLICY {torch['omp_wait_policy']})" if torch else "") +
           f"; peak matmul {r['peak']['f32_gflops']:.0f} GFLOP/s f32, {r['peak']['bf16_gflops']:.0f} GFLOP/s "
           f"bf16 in / f32 acc (the higher of {len(r['peak']['measured'])} timings: bf16 "
           + ", ".join(f"{p['bf16_gflops']:.0f}" for p in r['peak']['measured']) + ")"
           + f"; host malloc: {r.get('host_malloc', 'system')}",
           "", _row(["measurement"] + columns), _row(["---"] * (len(columns) + 1))]

  def add(name, ours_fn, theirs_fn=None, fmt="{:.3g}"):
    cells = [fmt.format(ours_fn(d)) for d in dtypes]
    if torch:
      cells += [fmt.format(theirs_fn(d)) if theirs_fn else "" for d in dtypes]
    lines.append(_row([name] + cells))
  t, g = train["by_dtype"], gen["by_dtype"]
  add("train step (s)", lambda d: t[d]["step_s"], lambda d: torch["train"][d]["step_s"])
  add("train tokens/s", lambda d: t[d]["tokens_per_s"],
      lambda d: train["batch_size"] * train["seq_len"] / torch["train"][d]["step_s"], "{:.0f}")
  add("train images/s", lambda d: t[d]["images_per_s"], fmt="{:.1f}")
  add("train MFU (of that dtype's peak)", lambda d: t[d]["mfu"], fmt="{:.2f}")
  add("train compile (s)", lambda d: t[d]["compile_s"], fmt="{:.1f}")
  add("prefill tokens/s", lambda d: g[d]["prefill_tokens_per_s"], lambda d: torch["generate"][d]["prefill_tokens_per_s"],
      "{:.0f}")
  add("decode tokens/s", lambda d: g[d]["decode_tokens_per_s"], lambda d: torch["generate"][d]["decode_tokens_per_s"],
      "{:.0f}")
  if torch:
    add("train speedup vs torch (same dtype)", lambda d: t[d]["speedup_vs_torch"], fmt="{:.2f}x")
    add("decode speedup vs torch (same dtype)", lambda d: g[d]["decode_speedup_vs_torch"], fmt="{:.2f}x")
  lines.append("")
  lines.append(f"model FLOPs per train step {train['flops_per_step']:.3e}; peak RSS {train['peak_rss_mb']:.0f} MiB; "
               f"generation: {gen['rows']} prompts ({gen['prompt_tokens']} prompt tokens), {gen['new_tokens']} new "
               f"tokens each")
  if torch:
    lines.append(f"best dtype vs best dtype: train speedup vs torch {train['speedup_vs_torch']:.2f}x "
                 f"(vlm_jax {train['best_dtype']}, torch {train['torch_best_dtype']}); decode speedup vs torch "
                 f"{gen['decode_speedup_vs_torch']:.2f}x; prefill speedup vs torch {gen['prefill_speedup_vs_torch']:.2f}x")
  seq = ", ".join(f"{k}: {v['step_s']:.3g} s" for k, v in r["scaling"]["seq_len"].items())
  tiles = ", ".join(f"{k}: {v['step_s']:.3g} s" for k, v in r["scaling"]["tiles"].items())
  lines.append(f"train step ({train['dtype']}) vs seq len: {seq}; vs tiles per image: {tiles}")
  c = r["compile"]
  layers = [k for k in c if k.startswith("layers_")]
  lines.append(f"train step compile: " + ", ".join(f"{k[len('layers_'):-2]} decoder layers {c[k]:.1f} s"
                                                  for k in layers) + f" (ratio {c['ratio']:.2f})")
  return "\n".join(lines)
