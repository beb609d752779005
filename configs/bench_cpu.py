"""The benchmark model for `vlm-jax bench`: mid-size for a CPU, shaped like SmolVLM (SigLIP + pixel shuffle +
Llama, exportable as Idefics3 so transformers can run the same weights).

128 px tiles, patch 16 (64 patches), pixel shuffle 2 -> 16 `<image>` tokens per tile; ViT 256 x 6 layers;
decoder 512 x 8 layers with GQA 8/4; vocab 8192; 256 tokens x 8 rows per step. One instruct-like stage: the
projector and decoder train, the ViT is frozen.

The MLP runs on 2 halves of the sequence (`mlp_chunks`) so that a half's float32 products stay in cache (with
huge pages for malloc it hardly matters).
Unscanned layers: on XLA:CPU the scanned stack's train step is about 2x slower. The bench's compile-time
comparison (4 vs 24 layers) still scans: that is what scan is for. Measurements: docs/performance.md.
"""
from vlm_jax.config import (Config, DataConfig, DecoderConfig, MeshConfig, ModelConfig, ProjectorConfig,
                            StageConfig, TokenizerConfig, TrainConfig, VisionConfig)


def get_config() -> Config:
  model = ModelConfig(
      vision=VisionConfig(kind="siglip", image_size=128, patch_size=16, width=256, depth=6, num_heads=4,
                          mlp_dim=1024, layer_norm_eps=1e-6, act="gelu_tanh", feature_layer=-1,
                          select_strategy="full", post_layernorm=True),
      projector=ProjectorConfig(kind="pixel_shuffle", scale_factor=2),
      decoder=DecoderConfig(vocab_size=8192, width=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1536,
                            rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False, max_seq_len=2048,
                            mlp_chunks=2),
      image_token_id=4, dtype="bfloat16", scan_layers=False, remat="none")
  data = DataConfig(tokenizer=TokenizerConfig(kind="sentencepiece", vocab_size=8192), seq_len=256, max_tiles=1,
                    image_splitting=False, packing=False, padding_side="right")
  stages = (StageConfig(name="bench", steps=1000, batch_size=8, trainable=("projector/.*", "decoder/.*"),
                        task="conversation", lr=1e-4, warmup_steps=10),)
  return Config(name="bench_cpu", seed=0, model=model, mesh=MeshConfig(data=-1), data=data,
                train=TrainConfig(stages=stages))
