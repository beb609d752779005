"""llava15_7b with Llama-3-8B as its LLM: CLIP ViT-L/14-336 (penultimate layer, CLS dropped) + 2-layer GELU MLP +
Llama-3-8B (GQA 32/8 heads, vocab 128256, RoPE theta 500000), rows of 8192 tokens.

Sized for 8 v5p chips (v5p:2x2x2) with FSDP: 58.8 of 95 GiB a chip at batch 32 x 8192 (docs/tpu.md). The tower
is CLIP-L/14-336, as in LLaVA-NeXT-8B: SigLIP-so400m/14-384 would need 384 px in whole 14 px patches (27.4 a
side), which VisionConfig does not take. Stages follow LLaVA-1.5 at its tokens per step: align (projector only, lr 1e-3),
then instruct (projector + LLM, lr 2e-5), each about one epoch (at ~8 and ~7 records per packed row).

  hf download openai/clip-vit-large-patch14-336 --local-dir ckpt/clip-vit-large-patch14-336
  hf download meta-llama/Meta-Llama-3-8B --local-dir ckpt/Meta-Llama-3-8B
  vlm-jax init --config llama3_8b --workdir gs://YOUR_BUCKET/llama3_8b \
      --vision ckpt/clip-vit-large-patch14-336 --decoder ckpt/Meta-Llama-3-8B
  vlm-jax train --config llama3_8b --workdir gs://YOUR_BUCKET/llama3_8b

init appends `<image>` and ChatML's two tokens after id 128255 and grows the table to the tokenizer (128259).
"""
import dataclasses

from vlm_jax import config as config_lib
from vlm_jax.config import Config, DecoderConfig, TokenizerConfig


def get_config() -> Config:
  base = config_lib.load("llava15_7b")  # its CLIP tower, projector, image handling and mesh
  decoder = DecoderConfig(vocab_size=128256, width=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336,
                          rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=False, max_seq_len=8192)
  model = dataclasses.replace(
      base.model, decoder=decoder,
      image_token_id=128002,  # <|reserved_special_token_0|> until init appends `<image>` (then 128256)
      # Fits (58.8 of 95 GiB) and recomputes less than full: the compute-bound step 4% shorter (docs/tpu.md).
      remat="save_dot_except_mlp")
  data = dataclasses.replace(
      base.data, tokenizer=TokenizerConfig(kind="hf", path="gs://YOUR_BUCKET/llama3_8b/tokenizer"),
      seq_len=8192, max_tiles=8)  # 8 images of 576 tokens: about as many records as a packed row of 8192 holds
  align, instruct = base.train.stages
  stages = (  # LLaVA-1.5's 256 x 2048 and 128 x 2048 tokens per step, as rows of 8192
      dataclasses.replace(align, steps=1090, batch_size=64, warmup_steps=33),
      dataclasses.replace(instruct, steps=2970, batch_size=32, warmup_steps=90))
  return dataclasses.replace(base, name="llama3_8b", model=model, data=data,
                             train=dataclasses.replace(base.train, stages=stages))
