"""Idefics3 parity: a random HF Idefics3ForConditionalGeneration (SigLIP + post-LN + pixel shuffle + bias-free
linear, tied embeddings like SmolVLM) on a 2x2 tile grid + global image -> load_hf -> our VLM gives the same logits
(<= 1e-4, float32) and the same 20 greedy tokens; export back to HF gives bit-identical tensors; the exported
directory with its processor loads offline and generates, from the processor's inputs, what our pipeline +
model generate."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig

from fixtures_convert import (TURNS, assert_export_generates_like_ours, assert_logits_and_greedy_match_hf,
                              assert_same_state_dicts, randomize, save_with_tokenizer,
                              tokenizer_dir)  # noqa: F401  (fixture)
from vlm_jax.config import DataConfig
from vlm_jax.convert import export, load
from vlm_jax.inputs import chat, images
from vlm_jax.inputs.tokenizer import Tokenizer

IMAGE_TOKEN_ID = 4
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
  return save_with_tokenizer(model, tokenizer_dir, tmp_path_factory.mktemp("hf_idefics3"))


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
  assert_logits_and_greedy_match_hf(model, cfg, params, ids, pixels, "idefics3")


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
  _, processed = assert_export_generates_like_ours(out, cfg, params, tokenizer_dir, DATA)
  assert (processed.rows, processed.cols) == (2, 2)
