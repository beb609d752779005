"""SmolVLM-256M shapes: SigLIP-B/16-512 + pixel shuffle 4 + SmolLM2-135M (the nanoVLM / Idefics3 design).

Real users start from the pretrained backbones, downloaded once, composed by `vlm-jax init` (the towers' shapes
below are then replaced by the checkpoints' own and a fresh projector joins them), then align and instruct:

  hf download google/siglip-base-patch16-512 --local-dir ckpt/siglip-base-patch16-512
  hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir ckpt/SmolLM2-135M-Instruct
  vlm-jax init --config smolvlm_256m --workdir gs://YOUR_BUCKET/smolvlm \
      --vision ckpt/siglip-base-patch16-512 --decoder ckpt/SmolLM2-135M-Instruct
  vlm-jax train --config smolvlm_256m --workdir gs://YOUR_BUCKET/smolvlm

(SmolLM2-360M-Instruct works the same way.) Sized for a TPU v5e-8.
"""
from vlm_jax.config import (Config, DataConfig, DecoderConfig, MeshConfig, ModelConfig, ProjectorConfig,
                            StageConfig, TokenizerConfig, TrainConfig, VisionConfig)


def get_config() -> Config:
  model = ModelConfig(
      vision=VisionConfig(kind="siglip", image_size=512, patch_size=16, width=768, depth=12, num_heads=12,
                          mlp_dim=3072, layer_norm_eps=1e-6, act="gelu_tanh", feature_layer=-1,
                          select_strategy="full", post_layernorm=True),
      projector=ProjectorConfig(kind="pixel_shuffle", scale_factor=4),
      decoder=DecoderConfig(vocab_size=49280, width=576, num_layers=30, num_heads=9, num_kv_heads=3, mlp_dim=1536,
                            rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192),
      image_token_id=49190, dtype="bfloat16", scan_layers=True,
      # Fits v5e:2x4 (12.0 of 16 GiB) with the best HLO roofline, 0.3% ahead of full (memory-bound): docs/tpu.md.
      remat="save_dot_except_mlp")
  data = DataConfig(data_dir="gs://YOUR_BUCKET/tensorflow_datasets",
                    tokenizer=TokenizerConfig(kind="hf", path="gs://YOUR_BUCKET/smolvlm/tokenizer"),
                    seq_len=2048, max_tiles=17, image_splitting=True, max_image_size=2048, resample="lanczos", packing=True,
                    # 17 tiles of 512 px cost ~0.4 CPU-s a record: 128 rows per ~2 s step need ~25 cores of a host.
                    num_workers=32,
                    # The ViT runs 14 tiles a row on average: 4:3 / 3:4 images (COCO, GQA, VG, TextVQA) cut 13, squares 17.
                    tile_budget=14)
  stages = (
      StageConfig(name="align", steps=2000, batch_size=256, trainable=("projector/.*",), task="conversation",
                  datasets=(("llava_json/blip_laion_cc_sbu_558k", 1.0),), lr=1e-3, warmup_steps=100, checkpoint_every=500),
      StageConfig(name="instruct", steps=5000, batch_size=128, trainable=("projector/.*", "decoder/.*"),
                  task="conversation", datasets=(("llava_json/llava_v1_5_mix665k", 1.0),), lr=2e-5, warmup_steps=150,
                  lr_multipliers=(("projector/.*", 10.0),), weight_decay=0.0, checkpoint_every=500),
  )
  return Config(name="smolvlm_256m", model=model, mesh=MeshConfig(data=-1, fsdp=1, tensor=1), data=data,
                train=TrainConfig(stages=stages))
