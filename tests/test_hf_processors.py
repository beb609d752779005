"""Parity with transformers' processors, built offline around the same tokenizer.json: the ids of a
generation prompt and the pixel values (NCHW there, NHWC here) of Idefics3Processor (tiling) and
LlavaProcessor (one tile) must equal ours."""
import numpy as np
import pytest
from fixtures_numerics import assert_f32_close
from fixtures_tokenizer import bpe_tokenizer
from transformers import (CLIPImageProcessorPil, Idefics3ImageProcessorPil, Idefics3Processor, LlavaProcessor,
                          PreTrainedTokenizerFast, SiglipImageProcessorPil)
from transformers.image_utils import PILImageResampling

from vlm_jax.config import Config, DataConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlm_jax.inputs import chat, images
from vlm_jax.inputs.examples import Preprocessor
from vlm_jax.inputs.tokenizer import Tokenizer

CORPUS = ["What colour is the circle? red blue green square triangle\nHow many shapes are there?"] * 20
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A byte-level BPE tokenizer.json with our special tokens appended, saved our way."""
  tok = Tokenizer(hf_json=bpe_tokenizer(CORPUS).to_str(), roles={"eos": "<|endoftext|>"})
  tok.add_special_tokens()
  path = tmp_path_factory.mktemp("tokenizer")
  tok.save(path)
  return path


def hf_tokenizer(path):
  return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token="<|endoftext|>")


def images_and_record(shapes, seed=0):
  rng = np.random.default_rng(seed)
  imgs = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]
  turns = [{"role": "user", "content": "<image>\nWhat colour is the circle?" + " <image>" * (len(imgs) - 1)},
           {"role": "assistant", "content": "red"}]
  return imgs, {"id": "x", "images": imgs, "caption": "", "turns": turns, "question_types": [""]}


def check_same(ours, hf_ids, hf_pixels, vision):
  """hf_pixels [n, 3, H, W] are compared to our NHWC uint8 tiles, normalized as the ViT does."""
  np.testing.assert_array_equal(ours["input_ids"], np.asarray(hf_ids))
  pixels = np.asarray(hf_pixels, np.float32).transpose(0, 2, 3, 1)
  assert pixels.shape == ours["tiles"].shape and ours["tiles"].dtype == np.uint8
  np.testing.assert_allclose(normalized(ours["tiles"], vision), pixels, atol=1e-5, rtol=0)


def normalized(tiles, vision):
  return images.normalize(tiles, vision.image_mean, vision.image_std)


@pytest.mark.parametrize("shapes, n_tiles", [
    ([(45, 70)], 5),              # landscape, not square: 2x2 grid + global
    ([(45, 70), (90, 30)], 8),    # and a portrait image after it: 2x1 grid + global
])
def test_idefics3_processor_parity(tokenizer_dir, shapes, n_tiles):
  cfg = Config(model=ModelConfig(vision=VisionConfig(image_size=32, patch_size=8),
                                 projector=ProjectorConfig(kind="pixel_shuffle", scale_factor=2), image_token_id=300),
               data=DataConfig(image_splitting=True, max_image_size=64, resample="lanczos", seq_len=512,
                               max_tiles=8))
  tok = Tokenizer.load(tokenizer_dir)
  imgs, record = images_and_record(shapes)
  ours = Preprocessor(cfg, tok).to_prompt(record)
  processor = Idefics3Processor(
      image_processor=Idefics3ImageProcessorPil(
          size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, image_mean=[0.5] * 3,
          image_std=[0.5] * 3, resample=PILImageResampling.LANCZOS),
      tokenizer=hf_tokenizer(tokenizer_dir), image_seq_len=cfg.model.image_tokens_per_tile)
  text = chat.render_text(record["turns"][:1], ["<image>"] * len(imgs), generation_prompt=True)
  hf_out = processor(images=imgs, text=text)
  assert len(ours["tiles"]) == n_tiles
  assert (ours["input_ids"] == tok.image_id).sum() == n_tiles * 4
  check_same(ours, hf_out["input_ids"][0], hf_out["pixel_values"][0], cfg.model.vision)  # [1, n, 3, H, W]


@pytest.mark.parametrize("kind, strategy, mean, std, tokens", [
    ("siglip", "full", (0.5,) * 3, (0.5,) * 3, 16),  # 4x4 patches, no CLS
    ("clip", "default", CLIP_MEAN, CLIP_STD, 16),     # CLS counted by HF (+1), then dropped by 'default' (-1)
])
def test_llava_processor_parity(tokenizer_dir, kind, strategy, mean, std, tokens):
  cfg = Config(model=ModelConfig(vision=VisionConfig(kind=kind, image_size=32, patch_size=8, select_strategy=strategy,
                                                     image_mean=mean, image_std=std), image_token_id=300),
               data=DataConfig(image_splitting=False, resample="bicubic", seq_len=512, max_tiles=1))
  assert cfg.model.image_tokens_per_tile == tokens
  tok = Tokenizer.load(tokenizer_dir)
  imgs, record = images_and_record([(45, 70)], seed=1)
  ours = Preprocessor(cfg, tok).to_prompt(record)
  processor = LlavaProcessor(
      image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=list(mean),
                                              image_std=list(std), resample=PILImageResampling.BICUBIC),
      tokenizer=hf_tokenizer(tokenizer_dir), patch_size=8, vision_feature_select_strategy=strategy,
      num_additional_image_tokens=1 if kind == "clip" else 0)
  text = chat.render_text(record["turns"][:1], ["<image>"], generation_prompt=True)
  hf_out = processor(images=imgs, text=text)
  assert (ours["input_ids"] == tok.image_id).sum() == tokens
  check_same(ours, hf_out["input_ids"][0], hf_out["pixel_values"], cfg.model.vision)  # [images, 3, H, W]


@pytest.mark.parametrize("shape", [(45, 70), (70, 45), (33, 97), (32, 32), (20, 25)])
def test_clip_shortest_edge_and_centre_crop_parity(shape):
  """LLaVA-1.5's CLIPImageProcessor: shortest edge to 32 (aspect kept, rounded down), centre 32 x 32 (offsets
  rounded down); upscaling too (20 x 25)."""
  image = np.random.default_rng(2).integers(0, 256, shape + (3,), dtype=np.uint8)
  cfg = Config(model=ModelConfig(vision=VisionConfig(kind="clip", image_size=32, patch_size=8, image_mean=CLIP_MEAN,
                                                     image_std=CLIP_STD)),
               data=DataConfig(image_resize="shortest_edge_crop", resample="bicubic"))
  ours = normalized(images.process_image(image, cfg).tiles, cfg.model.vision)
  hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=CLIP_MEAN,
                             image_std=CLIP_STD, resample=PILImageResampling.BICUBIC)(images=[image])["pixel_values"]
  assert ours.shape == (1, 32, 32, 3)
  assert_f32_close(ours, np.asarray(hf, np.float32).transpose(0, 2, 3, 1), rtol=1e-6)  # a few ulps of ~2
  square = normalized(images.process_image(image, Config(model=cfg.model, data=DataConfig(resample="bicubic"))).tiles,
                      cfg.model.vision)
  assert shape == (32, 32) or np.abs(square - ours).max() > 0.1  # the crop is not the squashing resize
