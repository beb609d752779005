"""What every part of the benchmark shares: the plan (how much to measure), timers, the machine's matmul peak,
peak RSS, a synthetic training batch and the generation prompts.

Timing rule: a function is called `warmup` times (compiles, first allocations), then `repeats` times, each
call blocked until its outputs are ready; the median of the timed calls is reported. No absolute time is
stable on a shared CPU, so the report is mostly ratios taken within one run.
"""
from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import Config
from vlm_jax.losses import IGNORE_ID

# Ids 4 .. 44 are our tokenizer's special tokens (<image>, ChatML, Idefics3 tags): random text stays above.
FIRST_TEXT_ID = 64


@dataclasses.dataclass(frozen=True)
class Plan:
  """How much the benchmark measures. `FULL` is the issue's protocol; `QUICK` is for tests."""
  steps: int = 10  # timed train steps (median), after `warmup` untimed ones
  warmup: int = 2
  peak_size: int = 2048  # n of the n^3 matmul
  peak_repeats: int = 10
  both_dtypes: bool = True  # also time the dtype (float32 / bfloat16) the config does not use
  seq_lens: tuple[int, ...] = (256, 512, 1024)  # scaling: step time vs sequence length (+ the config's)
  tiles: tuple[int, ...] = (1, 5)  # scaling: step time vs tiles per image (+ the config's)
  scaling_steps: int = 5
  layers: tuple[int, int] = (4, 24)  # compile time of a decoder this deep vs that deep
  fresh_compiles: bool = True  # False: timed compiles may be persistent-cache hits (when a cache is set up)
  rows: int = 8  # generation: prompts with one image each
  new_tokens: int = 64
  generate_repeats: int = 3
  torch_steps: int = 5


FULL = Plan()
# Tests: the config's dtype and shapes only (the scaling sweep is its one point), compiles cached. 48 new tokens
# in 3 rounds: with 8 in 2, another pytest worker's compile made transformers' 1-token generate of the tiny model
# slower than its 8-token one (0.228 vs 0.194 s), and the decode time came out negative.
QUICK = Plan(steps=3, warmup=1, peak_size=1024, peak_repeats=3, both_dtypes=False, seq_lens=(), tiles=(),
             scaling_steps=2, fresh_compiles=False, new_tokens=48, generate_repeats=3, torch_steps=2)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """Median wall time of fn() over `repeats` calls after `warmup` calls; outputs are blocked on."""
  return statistics.median(_timed_calls(fn, repeats, warmup))


def fastest_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """The fastest of `repeats` calls of fn() after `warmup` calls, seconds."""
  return min(_timed_calls(fn, repeats, warmup))


def _timed_calls(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  return [seconds(fn) for _ in range(repeats)]


def seconds(fn: Callable[[], Any]) -> float:
  """Wall time of one fn() call, its output blocked on."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def matmul_peak(size: int, repeats: int) -> dict[str, float]:
  """GFLOP/s of a [n, n] x [n, n] matmul: f32, and bf16 inputs with f32 accumulation (jnp.dot with
  preferred_element_type=f32), the two dtype paths the model's matmuls take. From the fastest of `repeats`
  calls: the best this machine did, so that a busy moment lowers the peak (and raises MFU) less."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((size, size)), jnp.float32) for _ in range(2))
  out = {}
  for name, dtype in (("f32_gflops", jnp.float32), ("bf16_gflops", jnp.bfloat16)):
    x, y = a.astype(dtype), b.astype(dtype)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    out[name] = 2 * size ** 3 / fastest_seconds(lambda: matmul(x, y), repeats) / 1e9
  return out


def peak_rss_mb() -> float:
  """The process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_batch(config: Config, batch_size: int, seq_len: int, num_tiles: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch of the DESIGN.md contract: each row starts with its tiles' `<image>` ids, then random text,
  all of it supervised except the image positions; random uint8 pixels (as the training loader ships them: the
  step normalizes on the device), every tile slot real.
  input_ids / labels / segment_ids / positions int32 [B, S], pixel_values uint8 [B, N, H, W, 3], tile_mask [B, N]."""
  m = config.model
  images = num_tiles * m.image_tokens_per_tile
  if images >= seq_len:
    raise ValueError(f"{num_tiles} tile(s) of {m.image_tokens_per_tile} image tokens do not fit seq_len={seq_len}.")
  rng = np.random.default_rng(seed)
  ids = rng.integers(FIRST_TEXT_ID, m.decoder.vocab_size, (batch_size, seq_len), dtype=np.int32)
  ids[:, :images] = m.image_token_id
  labels = np.where(ids == m.image_token_id, IGNORE_ID, ids).astype(np.int32)
  size, channels = m.vision.image_size, m.vision.num_channels
  return {"input_ids": ids, "labels": labels, "segment_ids": np.ones_like(ids),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy(),
          "pixel_values": rng.integers(0, 256, (batch_size, num_tiles, size, size, channels), dtype=np.uint8),
          "tile_mask": np.ones((batch_size, num_tiles), bool)}


QUESTIONS = ["What colour is the circle?", "How many shapes are there in the picture?",
             "Is there a square on the left of the triangle?", "Describe the image.",
             "Which shape is the largest one, and where is it?", "Is the blue circle above the red square?",
             "What is in the top right corner?", "Count the triangles and name their colours, one by one."]
CORPUS = [q + " " + a for q in QUESTIONS for a in ("It is red.", "There are 3 shapes.", "No, a triangle.",
                                                 "A blue circle on the left and a green square.")] * 20


def requests(rows: int, seed: int = 0) -> list[tuple[list[np.ndarray], str]]:
  """`rows` generation requests: one random RGB image (sizes vary) and a question each (lengths vary)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(rows):
    h, w = rng.integers(40, 200, 2)
    out.append(([rng.integers(0, 256, (h, w, 3), dtype=np.uint8)], QUESTIONS[i % len(QUESTIONS)]))
  return out
