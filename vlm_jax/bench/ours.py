"""vlm_jax's side of the benchmark: the real train step (vlm_jax/train/step.py) and the real generator
(vlm_jax/generate.py), timed on synthetic inputs; compile times with the persistent compilation cache off.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from vlm_jax import flops as flops_lib
from vlm_jax.bench import measure
from vlm_jax.compile_cache import fresh_compiles
from vlm_jax.config import Config, StageConfig
from vlm_jax.generate import Generator
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.model import vlm
from vlm_jax.sharding import data_sharding
from vlm_jax.train import optimizer as optimizer_lib
from vlm_jax.train import step as step_lib


def with_dtype(config: Config, dtype: str) -> Config:
  """The config with the model's compute dtype replaced (params stay float32)."""
  return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=dtype))


def time_train_step(config: Config, stage: StageConfig, mesh: Any, params: Any, batch: dict[str, np.ndarray],
                    steps: int, warmup: int, fresh: bool = True) -> dict[str, float]:
  """Compiles the stage's train step for `batch` and times it -> {step_s (median of `steps` after `warmup`
  untimed steps), compile_s (lower + compile, no cache), flops_per_step (vlm_jax.flops, model FLOPs)}.
  `params` are copied into a fresh train state (the step donates its state)."""
  shapes, _ = vlm.abstract_params(config.model)
  tx = optimizer_lib.make_optimizer(stage, shapes)
  abstract = step_lib.abstract_state(config, stage, mesh, tx)
  state = step_lib.init_state(jax.tree.map(lambda x: x.copy(), params), tx, abstract)
  batch = {k: jax.device_put(v, data_sharding(mesh, v.ndim)) for k, v in batch.items()}
  with step_lib.use_mesh(mesh):
    train_step = step_lib.make_train_step(vlm.VLM(config.model), stage, mesh, tx, abstract)
    start = time.perf_counter()
    with fresh_compiles(fresh):
      compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start

    def one_step():
      nonlocal state
      state, metrics = compiled(state, batch)
      return state, metrics
    step_s = measure.median_seconds(one_step, steps, warmup)
  b, s = batch["input_ids"].shape
  tiles = batch["pixel_values"].shape[1]
  return {"step_s": step_s, "compile_s": compile_s,
          "flops_per_step": flops_lib.train_step_flops(config, stage, b, s, tiles)}


def compile_seconds(config: Config, stage: StageConfig, mesh: Any, batch_size: int, seq_len: int,
                    num_tiles: int, fresh: bool = True) -> float:
  """Lower + compile time of the stage's train step from abstract inputs (nothing allocated, no cache)."""
  from vlm_jax.aot import abstract_batch  # pylint: disable=import-outside-toplevel
  shapes, _ = vlm.abstract_params(config.model)
  tx = optimizer_lib.make_optimizer(stage, shapes)
  abstract = step_lib.abstract_state(config, stage, mesh, tx)
  batch = abstract_batch(config, "lm", batch_size, seq_len, num_tiles, mesh)
  with step_lib.use_mesh(mesh), fresh_compiles(fresh):
    start = time.perf_counter()
    step_lib.make_train_step(vlm.VLM(config.model), stage, mesh, tx, abstract).lower(abstract, batch).compile()
    return time.perf_counter() - start


def with_layers(config: Config, num_layers: int) -> Config:
  """The config with a decoder this deep, scanned (the compile-time comparison measures what scan buys)."""
  decoder = dataclasses.replace(config.model.decoder, num_layers=num_layers)
  return dataclasses.replace(config, model=dataclasses.replace(config.model, decoder=decoder, scan_layers=True))


def time_generation(config: Config, params: Any, tokenizer: Tokenizer, batch: dict[str, np.ndarray],
                    new_tokens: int, repeats: int) -> dict[str, float]:
  """Greedy generation of a prepared batch (`Generator.prepare`) -> {prefill_s, decode_s}: the median times
  of `Generator.prefill` (the prompts, cache sized for new_tokens) and of `Generator.decode` (first token from
  the prefill logits, then new_tokens - 1 cached decode steps) with stop tokens barred (min_new_tokens), so
  every row decodes all new_tokens. Each is run once untimed first (compile)."""
  generator = Generator(config, params, tokenizer)
  logits, cache = generator.prefill(batch, new_tokens)
  prefill_s = measure.median_seconds(lambda: generator.prefill(batch, new_tokens), repeats)

  def decode():
    return generator.decode(batch, logits, cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
  decode_s = measure.median_seconds(decode, repeats)
  if np.isin(np.asarray(decode()), generator.stop_ids).any():
    raise RuntimeError("A row stopped early although min_new_tokens = max_new_tokens.")
  return {"prefill_s": prefill_s, "decode_s": decode_s}
