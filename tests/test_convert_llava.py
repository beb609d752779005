"""LLaVA parity: a random HF LlavaForConditionalGeneration (SigLIP 'full' at layer -1; CLIP 'default' at layer -2)
-> load_hf -> our VLM gives the same logits (<= 1e-4, float32) and the same 20 greedy tokens, scanned and not;
export back to HF gives bit-identical tensors; the exported directory with its processor loads offline and
generates, from the processor's own inputs, exactly what our pipeline + model generate."""
import dataclasses

import pytest
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

from fixtures_convert import (IMAGE_TOKEN_ID, assert_export_generates_like_ours, assert_logits_and_greedy_match_hf,
                              assert_same_state_dicts, build_llava, prompt_and_pixels, save_with_tokenizer,
                              tokenizer_dir)  # noqa: F401  (fixture)
from vlm_jax.config import DataConfig
from vlm_jax.convert import export, load
from vlm_jax.inputs.tokenizer import Tokenizer

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def hf_llava(tokenizer_dir, tmp_path_factory):
  """kind -> (HF model, its saved directory with our tokenizer as tokenizer.json), built once per kind."""
  built = {}

  def get(kind):
    if kind not in built:
      vocab = Tokenizer.load(tokenizer_dir).vocab_size + 3  # a padded vocab, as llava-1.5 has
      built[kind] = save_with_tokenizer(build_llava(kind, vocab), tokenizer_dir,
                                        tmp_path_factory.mktemp(f"hf_llava_{kind}"))
    return built[kind]
  return get


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
  assert_logits_and_greedy_match_hf(model, cfg, params, ids, pixels, f"{kind} scan={scan_layers}")


@pytest.fixture(scope="module", params=["siglip", "clip"])
def exported(request, hf_llava, tmp_path_factory, tokenizer_dir):
  """Our import of the HF model, exported back with a processor (CLIP with CLIP's normalization)."""
  kind = request.param
  model, hf_dir = hf_llava(kind)
  cfg, params, _ = load.load_hf(hf_dir)
  mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else ((0.5,) * 3, (0.5,) * 3)
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_mean=mean, image_std=std))
  out = tmp_path_factory.mktemp(f"export_{kind}")
  export.export(params, cfg, tokenizer_dir, out, data=data_for(kind))
  return kind, model, cfg, params, out


def data_for(kind):
  """CLIP exports with LLaVA-1.5's shortest-edge resize and centre crop; SigLIP with the square resize."""
  return DataConfig(resample="bicubic", image_resize="shortest_edge_crop" if kind == "clip" else "square")


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
  processor, _ = assert_export_generates_like_ours(out, cfg, params, tokenizer_dir, data_for(kind))
  assert processor.tokenizer.padding_side == "left"
  assert type(processor.image_processor).__name__.startswith("CLIPImageProcessor" if kind == "clip" else
                                                             "SiglipImageProcessor")


def test_import_hf_takes_the_resize_from_the_processor(exported, tmp_path):
  kind, _, _, _, out = exported
  config = load.import_hf(out, tmp_path / "imported")
  assert config.data.image_resize == data_for(kind).image_resize
  assert config.data.resample == "bicubic"
