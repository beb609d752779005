"""A workdir as training leaves it (config.json, tokenizer/, finished stages of random params), built in tests.

`make_workdir` writes W/config.json and W/tokenizer/ like `train.run` and saves params through
vlm_jax.checkpoint, marking the named stages finished.
"""
import json

import jax

from vlm_jax import checkpoint
from vlm_jax.config import (Config, DataConfig, DecoderConfig, ModelConfig, ProjectorConfig, StageConfig,
                            TrainConfig, VisionConfig, to_dict)
from vlm_jax.model.vlm import init_params


def tiny_config(vocab_size: int, data_dir: str = "", dataset: str = "shapes_vqa/tiny") -> Config:
  """16 px images (patch 8: 4 <image> tokens per tile), decoder width 32, 2 layers; stages align, instruct."""
  model = ModelConfig(
      vision=VisionConfig(kind="siglip", image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32),
      projector=ProjectorConfig(kind="mlp"),
      decoder=DecoderConfig(vocab_size=vocab_size, width=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            mlp_dim=64),
      image_token_id=4)
  stages = tuple(StageConfig(name=n, steps=1, batch_size=2, task=t, datasets=((dataset, 1.0),))
                 for n, t in (("align", "caption"), ("instruct", "conversation")))
  return Config(name="tiny_eval", model=model, data=DataConfig(data_dir=data_dir, max_tiles=2),
                train=TrainConfig(stages=stages))


def make_workdir(workdir, config: Config, tokenizer, finished=("align",), seed: int = 0):
  """Writes a workdir whose `finished` stages hold random params (seed + stage index); returns
  {stage: params}."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(to_dict(config), indent=1) + "\n")
  tokenizer.save(workdir / "tokenizer")
  saved = {}
  for i, stage in enumerate(config.train.stages):
    if stage.name not in finished:
      continue
    params = init_params(config.model, jax.random.key(seed + i))
    mngr = checkpoint.manager(workdir, stage)
    checkpoint.save(mngr, stage.steps, {"params": params}, force=True)
    mngr.wait_until_finished()
    checkpoint.mark_finished(workdir, stage.name, stage.steps)
    saved[stage.name] = params
  return saved
