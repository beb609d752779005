"""The CPU default: a ~2M-param VLM trained from scratch on the synthetic shapes_vqa dataset.

Offline there is no pretrained encoder or LLM, so the recipe first makes its own (contrastive ViT pretraining,
then captioning with ViT, projector and decoder together; causal-LM text pretraining), then runs the LLaVA recipe
unchanged: align (projector only), instruct (projector + decoder, ViT frozen). How it was found, and how much
its result moves with the seed: docs/recipe-shapes.md.
"""
from vlm_jax.config import (Config, ContrastiveConfig, DataConfig, DecoderConfig, MeshConfig, ModelConfig,
                            ProjectorConfig, StageConfig, TokenizerConfig, TrainConfig, VisionConfig)


def get_config() -> Config:
  model = ModelConfig(
      vision=VisionConfig(kind="siglip", image_size=48, patch_size=8, width=128, depth=3, num_heads=4,
                          mlp_dim=512, layer_norm_eps=1e-6, act="gelu_tanh", feature_layer=-1,
                          select_strategy="full", post_layernorm=True, pos_embed_init="sincos2d"),
      # sincos2d: from a small random init the features barely keep where a patch sits (position questions stay
      # at chance). 6x6 patches -> pixel shuffle 2 -> 3x3 image tokens, one per cell of the scenes' 3x3 grid.
      projector=ProjectorConfig(kind="pixel_shuffle", scale_factor=2),
      decoder=DecoderConfig(vocab_size=512, width=192, num_layers=3, num_heads=6, num_kv_heads=2, mlp_dim=512,
                            rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False, max_seq_len=256),
      # Hard negatives (one shape's kind or position changed): in-batch captions differ mostly by colour.
      # image_pool gap: what the captions say must be linear in the patches the projector reads (better than MAP).
      contrastive=ContrastiveConfig(enabled=True, loss="clip", width=128, depth=2, num_heads=4, mlp_dim=512,
                                    embed_dim=128, max_text_len=32, hard_negatives=2, image_pool="gap"),
      # auto: bf16 compute (f32 params and accumulation) where the CPU has native bf16 dots, else float32 (bf16
      # is slower than float32 there); unscanned layers: the fastest on XLA:CPU (2.5x the steps).
      image_token_id=4, dtype="auto", scan_layers=False, remat="none")
  data = DataConfig(data_dir="runs/tensorflow_datasets", tokenizer=TokenizerConfig(kind="sentencepiece", vocab_size=512),
                    seq_len=96, max_tiles=2, image_splitting=False, packing=False, padding_side="right",
                    cache_records=True,  # the five stages read each of the 20000 records about ten times
                    num_workers=0, read_threads=2)  # a 2-core machine: the step needs the cores
  common = dict(datasets=(("shapes_vqa", 1.0),), checkpoint_every=200, log_every=10, warmup_steps=20)
  stages = (
      # lr 5e-4, not 2e-3: with bf16 compute the ViT keeps more of the shapes' kind.
      StageConfig(name="vision_pretrain", steps=300, batch_size=64, trainable=("vision/.*", "contrastive/.*"),
                  loss="contrastive", task="image_text", lr=5e-4, **common),
      # CapPa-style captioning (ViT, projector and decoder write the caption together): contrastive pretraining
      # alone tells apart colour and position, hardly kind. Kind is learnt last, hence the steps. One-image
      # captions fit 56 tokens x 1 tile (the 96 x 2 rows of the other stages would be half padding).
      StageConfig(name="vision_caption", steps=1200, batch_size=64, seq_len=56, max_tiles=1,
                  trainable=("vision/.*", "projector/.*", "decoder/.*"), task="caption", lr=1e-3, **common),
      StageConfig(name="text_pretrain", steps=200, batch_size=32, trainable=("decoder/.*",), task="text",
                  lr=2e-3, **common),
      StageConfig(name="align", steps=150, batch_size=32, trainable=("projector/.*",), task="caption",
                  lr=2e-3, **common),
      # lr 5e-4, not 1e-3: at 1e-3 the result swung with the data order and with bf16 rounding.
      StageConfig(name="instruct", steps=1800, batch_size=32, trainable=("projector/.*", "decoder/.*"),
                  task="conversation", lr=5e-4, **common),
  )
  return Config(name="shapes_tiny", seed=0, model=model, mesh=MeshConfig(data=-1), data=data,
                train=TrainConfig(stages=stages))
