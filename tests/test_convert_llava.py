"""LLaVA parity: a random HF LlavaForConditionalGeneration (SigLIP 'full' at layer -1; CLIP 'default' at layer -2)
-> load_hf -> our VLM gives the same logits (<= 1e-4, float32) and the same 20 greedy tokens, scanned and not;
export back to HF gives bit-identical tensors; the exported directory with its processor loads offline and
generates, from the processor's own inputs, exactly what our pipeline + model generate."""
import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from fixtures_convert import (IMAGE_TOKEN_ID, assert_same_state_dicts, build_llava, hf_logits_and_greedy, ours_greedy,
                              tokenizer_dir)  # noqa: F401  (fixture)
from vlm_jax.config import Config, DataConfig
from vlm_jax.convert import export, load
from vlm_jax.generate import Generator
from vlm_jax.inputs import chat, images
from vlm_jax.inputs.tokenizer import Tokenizer

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TURNS = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}]


@pytest.fixture(scope="module")
def hf_llava(tokenizer_dir, tmp_path_factory):
  """kind -> (HF model, its saved directory with our tokenizer as tokenizer.json), built once per kind."""
  built = {}

  def get(kind):
    if kind not in built:
      vocab = Tokenizer.load(tokenizer_dir).vocab_size + 3  # a padded vocab, as llava-1.5 has
      model = build_llava(kind, vocab)
      hf_dir = tmp_path_factory.mktemp(f"hf_llava_{kind}")
      model.save_pretrained(hf_dir)
      export.hf_tokenizer(tokenizer_dir).save_pretrained(hf_dir)
      built[kind] = model, hf_dir
    return built[kind]
  return get


def prompt_and_pixels(cfg, tok, seed=0):
  """ChatML prompt ids with one image's `<image>` run, and pixel values NCHW [1, 3, H, W]."""
  ids, _ = chat.render(TURNS, [images.image_prompt(0, 0, cfg.image_tokens_per_tile, False)], tok,
                       generation_prompt=True)
  size = cfg.vision.image_size
  return ids, np.random.default_rng(seed).normal(size=(1, 3, size, size)).astype(np.float32)


# Unscanned params for one family (the name maps are shared, and each variant costs a compile).
@pytest.mark.parametrize("kind, scan_layers", [("siglip", True), ("siglip", False), ("clip", True)])
def test_llava_logits_and_greedy_match_hf(hf_llava, kind, scan_layers):
  model, hf_dir = hf_llava(kind)
  cfg, params, tok = load.load_hf(hf_dir, scan_layers=scan_layers)
  assert (cfg.vision.kind, cfg.vision.feature_layer, cfg.vision.select_strategy) == (
      ("siglip", -1, "full") if kind == "siglip" else ("clip", -2, "default"))
  assert cfg.image_token_id == tok.image_id == IMAGE_TOKEN_ID and cfg.image_tokens_per_tile == 16
  layers = params["decoder"]["layers"]["attn"]["q_proj"]["kernel"].shape if scan_layers else \
      params["decoder"]["layers_1"]["attn"]["q_proj"]["kernel"].shape
  assert layers == ((2, 64, 4, 16) if scan_layers else (64, 4, 16))
  ids, pixels = prompt_and_pixels(cfg, tok)
  hf_logits, hf_tokens = hf_logits_and_greedy(model, ids, pixels)
  logits, tokens = ours_greedy(cfg, params, ids, pixels.transpose(0, 2, 3, 1)[:, None])
  diff = np.abs(logits - hf_logits).max()
  print(f"{kind} scan={scan_layers} max|diff|={diff:.2e}")
  assert diff <= 1e-4, diff
  assert np.abs(hf_logits).max() > 0.1  # the comparison is not between near-zero logits
  np.testing.assert_array_equal(tokens, hf_tokens)


@pytest.fixture(scope="module", params=["siglip", "clip"])
def exported(request, hf_llava, tmp_path_factory, tokenizer_dir):
  """Our import of the HF model, exported back with a processor (CLIP with CLIP's normalization)."""
  kind = request.param
  model, hf_dir = hf_llava(kind)
  cfg, params, _ = load.load_hf(hf_dir)
  mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else ((0.5,) * 3, (0.5,) * 3)
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_mean=mean, image_std=std))
  out = tmp_path_factory.mktemp(f"export_{kind}")
  export.export(params, cfg, tokenizer_dir, out, data=DataConfig(resample="bicubic"))
  return kind, model, cfg, params, out


def test_llava_hf_roundtrip_is_bit_identical(exported):
  _, model, _, _, out = exported
  reloaded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
  assert type(reloaded) is LlavaForConditionalGeneration
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert_same_state_dicts(model.state_dict(), reloaded.state_dict())
  assert reloaded.config.vision_feature_layer == model.config.vision_feature_layer
  assert reloaded.config.vision_feature_select_strategy == model.config.vision_feature_select_strategy


def test_llava_export_processor_generates_like_ours(exported, tokenizer_dir, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  kind, _, cfg, params, out = exported
  processor = AutoProcessor.from_pretrained(out)
  model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert processor.tokenizer.padding_side == "left"
  image = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
  messages = [{"role": "user",
               "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour is the circle?"}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  assert text == chat.render_text(TURNS, ["<image>"], generation_prompt=True)
  inputs = processor(images=[image], text=[text], return_tensors="pt")
  # Our pipeline on the same image and turns.
  tok = Tokenizer.load(tokenizer_dir)
  processed = images.process_image(image, Config(model=cfg, data=DataConfig(resample="bicubic")))
  ids, _ = chat.render(TURNS, [processed.prompt], tok, generation_prompt=True)
  np.testing.assert_array_equal(inputs["input_ids"][0].numpy(), ids)
  np.testing.assert_allclose(inputs["pixel_values"][0].numpy().transpose(1, 2, 0), processed.tiles[0], atol=1e-5)
  _, ours = ours_greedy(cfg, params, ids, processed.tiles[None])
  with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=len(ours), do_sample=False, min_new_tokens=0)
  generated = generated[0, len(ids):].numpy()
  # HF stops at <|im_end|> / eos (generation_config.json); ours ran the full length.
  assert len(generated) >= 1
  np.testing.assert_array_equal(generated, ours[:len(generated)])
  stops = {tok.im_end_id, tok.eos_id}
  assert len(generated) == len(ours) or generated[-1] in stops
  # vlm_jax.generate (KV cache, stops at the same ids, drops the stop token) from the raw image and prompt.
  result = Generator(Config(model=cfg, data=DataConfig(resample="bicubic")), params, tok).generate(
      [([image], TURNS[0]["content"])], max_new_tokens=len(ours))[0]
  assert result.token_ids == (generated[:-1] if generated[-1] in stops else generated).tolist()
