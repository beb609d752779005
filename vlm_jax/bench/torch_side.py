"""transformers' side of the benchmark: the same random-init model, exported with vlm_jax/convert/export.py
(LLaVA or Idefics3), timed on the same inputs in the same process.

Train step: forward with labels (HF's shifted token cross-entropy) + backward + clip_grad_norm_ + AdamW, with
requires_grad only on the params the stage trains (the same regexes, through the export name map), so both
sides skip the frozen ViT's weight gradients. float32, or bfloat16 autocast (float32 params and optimizer).
Generation: `model.generate` greedy with its KV cache on the same left-padded token ids and pixels, with
min_new_tokens = max_new_tokens so no row stops early; float32, or bfloat16 autocast.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from typing import Any

import numpy as np

from vlm_jax.bench import measure
from vlm_jax.config import Config, StageConfig
from vlm_jax.convert import export, hf_config, hf_names
from vlm_jax.flops import is_trainable
from vlm_jax.inputs import images

DTYPES = ("float32", "bfloat16")
# OpenMP threads that spin at barriers collapse when the cores are shared (seen here, with another job on the
# 2 cores: a tiny train step took 1.06 s spinning vs 0.013 s passive). Read once, when torch loads its OpenMP
# runtime: it applies only if torch was not imported before this module (bench records which).
TORCH_PRELOADED = "torch" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_threads() -> dict[str, Any]:
  """torch uses every core of the machine (its default may be fewer) -> {threads, omp_wait_policy}."""
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  policy = "default (torch was imported first)" if TORCH_PRELOADED else os.environ["OMP_WAIT_POLICY"]
  return {"threads": torch.get_num_threads(), "omp_wait_policy": policy}


def load_exported(config: Config, params: Any, tokenizer_dir: pathlib.Path, out_dir: pathlib.Path) -> Any:
  """Exports params (float32) as a transformers directory and loads it back -> the torch model (eval mode)."""
  import transformers
  export.export(jax_to_numpy(params), config.model, tokenizer_dir, out_dir, dtype="float32", data=config.data)
  return transformers.AutoModelForImageTextToText.from_pretrained(out_dir).eval()


def jax_to_numpy(params: Any) -> Any:
  import jax
  return jax.tree.map(np.asarray, params)


def _autocast(dtype: str):
  import torch
  if dtype == "bfloat16":
    return torch.autocast("cpu", dtype=torch.bfloat16)
  return contextlib.nullcontext()


def torch_inputs(config: Config, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """Our batch -> the HF model's keyword arguments: input_ids, attention_mask, pixel_values (Idefics3
  [B, N, C, H, W] for the tile slots; LLaVA [images, C, H, W] for the real tiles), labels if present."""
  import torch
  pixels, vision = batch["pixel_values"], config.model.vision
  if pixels.dtype == np.uint8:  # our loader's tiles; HF models take normalized floats
    pixels = images.normalize(pixels, vision.image_mean, vision.image_std)
  pixels = pixels.transpose(0, 1, 4, 2, 3)
  if hf_config.check_exportable(config.model) == "llava":
    pixels = pixels[batch["tile_mask"]]
  out = {"input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)),
         "attention_mask": torch.from_numpy((batch["segment_ids"] > 0).astype(np.int64)),
         "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels))}
  if "labels" in batch:
    out["labels"] = torch.from_numpy(batch["labels"].astype(np.int64))
  return out


def time_train_step(model: Any, config: Config, stage: StageConfig, batch: dict[str, np.ndarray], dtype: str,
                    steps: int, warmup: int) -> float:
  """Median seconds of a transformers train step (see the module docstring) on `batch`."""
  import torch
  names = {e.hf: e.ours for e in hf_names.model_entries(config.model)}
  trainable = []
  for name, p in model.named_parameters():
    p.requires_grad_(is_trainable(names.get(name, ""), stage.trainable))
    if p.requires_grad:
      trainable.append(p)
  optimizer = torch.optim.AdamW(trainable, lr=stage.lr, betas=(stage.b1, stage.b2), weight_decay=stage.weight_decay)
  inputs = torch_inputs(config, batch)
  model.train()

  def step():
    optimizer.zero_grad(set_to_none=True)
    with _autocast(dtype):
      loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, stage.grad_clip)
    optimizer.step()
    return loss.item()
  try:
    return measure.median_seconds(step, steps, warmup)
  finally:
    model.eval()


def time_generation(model: Any, config: Config, batch: dict[str, np.ndarray], dtype: str, new_tokens: int,
                    repeats: int) -> dict[str, float]:
  """transformers' greedy generate on our prepared batch -> {prefill_s, total_s, decode_s}: the fastest of
  `repeats` 1-token generates (prefill + the first token) and of as many new_tokens ones, taken in turns;
  decode_s = total_s - prefill_s, the new_tokens - 1 cached decode steps (what vlm_jax.bench.ours.time_generation
  times directly). Minimums, not medians: a difference of two medians went negative when another process
  shared the cores (noise only ever adds time)."""
  import torch
  inputs = torch_inputs(config, batch)
  prompt = inputs["input_ids"].shape[1]

  def generate(n):
    with torch.inference_mode(), _autocast(dtype):
      out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    if out.shape[1] != prompt + n:
      raise RuntimeError(f"transformers generated {out.shape[1] - prompt} tokens, not {n}.")
    return out
  generate(new_tokens)  # warm-up
  pairs = [(measure.seconds(lambda: generate(1)), measure.seconds(lambda: generate(new_tokens)))
           for _ in range(repeats)]
  prefill_s, total_s = (min(ts) for ts in zip(*pairs))
  if total_s <= prefill_s:
    raise RuntimeError(f"transformers' {new_tokens}-token generate ({total_s:.4f} s) was not slower than its "
                       f"1-token one ({prefill_s:.4f} s): the machine is too busy to time decoding; rerun "
                       f"`vlm-jax bench` with nothing else running.")
  return {"prefill_s": prefill_s, "total_s": total_s, "decode_s": total_s - prefill_s}
