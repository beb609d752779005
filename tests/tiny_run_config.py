"""A seconds-long two-stage run of a tiny VLM on shapes_vqa/tiny, for tests/test_resume.py.

Load it with the override `data.data_dir=<where shapes_vqa/tiny is prepared>`.
"""
import dataclasses

from vlm_jax import config as config_lib

TINY = ["model.vision.image_size=16", "model.vision.width=16", "model.vision.depth=1", "model.vision.num_heads=2",
        "model.vision.mlp_dim=32", "model.decoder.width=32", "model.decoder.num_layers=1",
        "model.decoder.num_heads=2", "model.decoder.num_kv_heads=2", "model.decoder.mlp_dim=64",
        "data.seq_len=64", "mesh.data=-1", "model.dtype=float32", "model.scan_layers=True"]


def get_config() -> config_lib.Config:
  cfg = config_lib.load("shapes_tiny", TINY)
  common = dict(datasets=(("shapes_vqa/tiny", 1.0),), batch_size=8, warmup_steps=2, log_every=1,
                checkpoint_every=5, max_to_keep=2, lr=1e-2)
  stages = (config_lib.StageConfig(name="align", steps=30, trainable=("projector/.*",), task="caption", **common),
            config_lib.StageConfig(name="instruct", steps=4, trainable=("decoder/.*",), task="conversation",
                                   **common))
  model = dataclasses.replace(cfg.model, contrastive=config_lib.ContrastiveConfig(enabled=False))
  return dataclasses.replace(cfg, model=model, train=config_lib.TrainConfig(stages=stages))
