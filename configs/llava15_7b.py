"""LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 (penultimate layer, CLS dropped) + 2-layer GELU MLP + Llama-2-7B.

Sized for a v5p-8 / v4-32 with FSDP. Stages follow LLaVA-1.5: align on LLaVA-Pretrain-558K (projector only,
lr 1e-3, batch 256), then instruct on LLaVA-Instruct-665K (projector + LLM, lr 2e-5, batch 128).

The backbones, downloaded once and composed by `vlm-jax init` (tower shapes come from the checkpoints; CLIP is
read at layer -2 with CLS dropped; a fresh projector joins them):

  hf download openai/clip-vit-large-patch14-336 --local-dir ckpt/clip-vit-large-patch14-336
  hf download meta-llama/Llama-2-7b-hf --local-dir ckpt/Llama-2-7b-hf   # or lmsys/vicuna-7b-v1.5
  vlm-jax init --config llava15_7b --workdir gs://YOUR_BUCKET/llava15 \
      --vision ckpt/clip-vit-large-patch14-336 --decoder ckpt/Llama-2-7b-hf
  vlm-jax train --config llava15_7b --workdir gs://YOUR_BUCKET/llava15

vlm_jax reads safetensors and tokenizer.json only: a checkpoint that ships pytorch_model*.bin or only a
tokenizer.model (vicuna-7b-v1.5) must be re-saved once with transformers' save_pretrained (model and fast tokenizer).
"""
from vlm_jax.config import (Config, DataConfig, DecoderConfig, MeshConfig, ModelConfig, ProjectorConfig,
                            StageConfig, TokenizerConfig, TrainConfig, VisionConfig)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config() -> Config:
  model = ModelConfig(
      vision=VisionConfig(kind="clip", image_size=336, patch_size=14, width=1024, depth=24, num_heads=16,
                          mlp_dim=4096, layer_norm_eps=1e-5, act="quick_gelu", feature_layer=-2,
                          select_strategy="default", post_layernorm=False, image_mean=CLIP_MEAN, image_std=CLIP_STD),
      projector=ProjectorConfig(kind="mlp", act="gelu"),
      decoder=DecoderConfig(vocab_size=32064, width=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                            mlp_dim=11008, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False,
                            max_seq_len=4096),
      image_token_id=32000, dtype="bfloat16", scan_layers=True,
      # Fits v5p:2x2x2 (70.4 of 95 GiB); recomputing less makes the compute-bound step 8% shorter: docs/tpu.md.
      remat="save_dot_except_mlp")
  data = DataConfig(data_dir="gs://YOUR_BUCKET/tensorflow_datasets",
                    tokenizer=TokenizerConfig(kind="hf", path="gs://YOUR_BUCKET/llava15/tokenizer"),
                    seq_len=2048, max_tiles=1, image_splitting=False, packing=True,
                    image_resize="shortest_edge_crop")  # the llava-1.5-hf CLIPImageProcessor's 336 crop
  stages = (
      StageConfig(name="align", steps=2180, batch_size=256, trainable=("projector/.*",), task="conversation",
                  datasets=(("llava_json/blip_laion_cc_sbu_558k", 1.0),), lr=1e-3, warmup_steps=65, weight_decay=0.0,
                  checkpoint_every=500),
      StageConfig(name="instruct", steps=5200, batch_size=128, trainable=("projector/.*", "decoder/.*"),
                  task="conversation", datasets=(("llava_json/llava_v1_5_mix665k", 1.0),), lr=2e-5, warmup_steps=156,
                  weight_decay=0.0, checkpoint_every=500),
  )
  return Config(name="llava15_7b", model=model, mesh=MeshConfig(data=1, fsdp=-1, tensor=1), data=data,
                train=TrainConfig(stages=stages))
