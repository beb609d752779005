"""Idefics3 parity: a random HF Idefics3ForConditionalGeneration (SigLIP + post-LN + pixel shuffle + bias-free
linear, tied embeddings like SmolVLM) on a 2x2 tile grid + global image -> load_hf -> our VLM gives the same logits
(<= 1e-4, float32) and the same 20 greedy tokens; export back to HF gives bit-identical tensors; the exported
directory with its processor loads offline and generates, from the processor's inputs, what our pipeline +
model generate."""
import numpy as np
import pytest
import torch
from transformers import (AutoModelForImageTextToText, AutoProcessor, Idefics3Config,
                          Idefics3ForConditionalGeneration, LlamaConfig)

from fixtures_convert import (assert_same_state_dicts, hf_logits_and_greedy, ours_greedy, randomize,
                              tokenizer_dir)  # noqa: F401  (fixture)
from vlm_jax.config import Config, DataConfig
from vlm_jax.convert import export, load
from vlm_jax.generate import Generator
from vlm_jax.inputs import chat, images
from vlm_jax.inputs.tokenizer import Tokenizer

IMAGE_TOKEN_ID = 4
TURNS = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}]
DATA = DataConfig(image_splitting=True, max_image_size=64, resample="lanczos")  # 45x70 -> 2x2 grid of 32 px


def build_idefics3(vocab_size: int) -> Idefics3ForConditionalGeneration:
  torch.manual_seed(0)
  text = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=2,
                     eos_token_id=3, pad_token_id=0, tie_word_embeddings=True)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
  config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2, image_token_id=IMAGE_TOKEN_ID,
                          tie_word_embeddings=True, pad_token_id=0)
  return randomize(Idefics3ForConditionalGeneration(config))


@pytest.fixture(scope="module")
def hf_idefics3(tokenizer_dir, tmp_path_factory):
  model = build_idefics3(Tokenizer.load(tokenizer_dir).vocab_size)
  hf_dir = tmp_path_factory.mktemp("hf_idefics3")
  model.save_pretrained(hf_dir)
  export.hf_tokenizer(tokenizer_dir).save_pretrained(hf_dir)
  return model, hf_dir


def test_idefics3_logits_and_greedy_match_hf(hf_idefics3):
  model, hf_dir = hf_idefics3
  cfg, params, tok = load.load_hf(hf_dir)
  assert (cfg.projector.kind, cfg.projector.scale_factor, cfg.vision.post_layernorm) == ("pixel_shuffle", 2, True)
  assert cfg.decoder.tie_embeddings and "lm_head" not in params["decoder"]
  assert cfg.image_tokens_per_tile == 4 and cfg.image_token_id == tok.image_id
  ids, _ = chat.render(TURNS, [images.image_prompt(2, 2, cfg.image_tokens_per_tile, True)], tok,
                       generation_prompt=True)
  assert (ids == IMAGE_TOKEN_ID).sum() == 5 * 4  # 2x2 grid + global tile
  pixels = np.random.default_rng(0).normal(size=(1, 5, 3, 32, 32)).astype(np.float32)
  hf_logits, hf_tokens = hf_logits_and_greedy(model, ids, pixels)
  logits, tokens = ours_greedy(cfg, params, ids, pixels.transpose(0, 1, 3, 4, 2))
  diff = np.abs(logits - hf_logits).max()
  print(f"idefics3 max|diff|={diff:.2e}")
  assert diff <= 1e-4, diff
  assert np.abs(hf_logits).max() > 0.1
  np.testing.assert_array_equal(tokens, hf_tokens)


@pytest.fixture(scope="module")
def exported(hf_idefics3, tmp_path_factory, tokenizer_dir):
  model, hf_dir = hf_idefics3
  cfg, params, _ = load.load_hf(hf_dir, scan_layers=False)  # the unscanned tree exports too
  out = tmp_path_factory.mktemp("export_idefics3")
  export.export(params, cfg, tokenizer_dir, out, data=DATA)
  return model, cfg, params, out


def test_idefics3_hf_roundtrip_is_bit_identical(exported):
  model, _, _, out = exported
  reloaded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
  assert type(reloaded) is Idefics3ForConditionalGeneration
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert_same_state_dicts(model.state_dict(), reloaded.state_dict())
  assert reloaded.lm_head.weight.data_ptr() == reloaded.model.text_model.embed_tokens.weight.data_ptr()


def test_idefics3_export_processor_generates_like_ours(exported, tokenizer_dir, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  _, cfg, params, out = exported
  processor = AutoProcessor.from_pretrained(out)
  model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  image = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
  messages = [{"role": "user",
               "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour is the circle?"}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  assert text == chat.render_text(TURNS, ["<image>"], generation_prompt=True)
  inputs = processor(images=[image], text=[text], return_tensors="pt")
  tok = Tokenizer.load(tokenizer_dir)
  processed = images.process_image(image, Config(model=cfg, data=DATA))
  assert (processed.rows, processed.cols) == (2, 2)
  ids, _ = chat.render(TURNS, [processed.prompt], tok, generation_prompt=True)
  np.testing.assert_array_equal(inputs["input_ids"][0].numpy(), ids)
  np.testing.assert_allclose(inputs["pixel_values"][0].numpy().transpose(0, 2, 3, 1), processed.tiles, atol=1e-5)
  _, ours = ours_greedy(cfg, params, ids, processed.tiles[None])
  with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=len(ours), do_sample=False)[0, len(ids):].numpy()
  # HF stops at <|im_end|> / eos (generation_config.json); ours ran the full length.
  assert len(generated) >= 1
  np.testing.assert_array_equal(generated, ours[:len(generated)])
  stops = {tok.im_end_id, tok.eos_id}
  assert len(generated) == len(ours) or generated[-1] in stops
  # vlm_jax.generate (KV cache, stops at the same ids, drops the stop token) from the raw image and prompt.
  result = Generator(Config(model=cfg, data=DATA), params, tok).generate(
      [([image], TURNS[0]["content"])], max_new_tokens=len(ours))[0]
  assert result.token_ids == (generated[:-1] if generated[-1] in stops else generated).tolist()
