"""Name maps and config mapping against transformers 5.23 itself: every mapped key and shape equals an HF model's
state_dict built from our config, every path and shape equals our model's params; configs round-trip; models HF
cannot express are refused with a message naming the part."""
import dataclasses

import numpy as np
import pytest
import torch
import transformers

from vlm_jax.config import DecoderConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlm_jax.convert import hf_config, hf_names
from vlm_jax.model import vlm

DECODER = DecoderConfig(vocab_size=64, width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        rope_theta=5000.0, rms_norm_eps=1e-5, max_seq_len=128)
SIGLIP = VisionConfig(kind="siglip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=48)
CLIP = dataclasses.replace(SIGLIP, kind="clip", act="quick_gelu", layer_norm_eps=1e-5, feature_layer=-2,
                           select_strategy="default")
CONFIGS = {
    "llava_siglip": ModelConfig(vision=SIGLIP, decoder=DECODER, image_token_id=7),
    "llava_clip_unscanned": ModelConfig(vision=CLIP, decoder=DECODER, scan_layers=False),
    "idefics3_tied": ModelConfig(vision=dataclasses.replace(SIGLIP, image_size=32, post_layernorm=True),
                                 projector=ProjectorConfig(kind="pixel_shuffle", scale_factor=2),
                                 decoder=dataclasses.replace(DECODER, tie_embeddings=True)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_name_map_matches_hf_state_dict_and_our_params(name):
  cfg = CONFIGS[name]
  entries = hf_names.model_entries(cfg)
  with torch.device("meta"):
    model = transformers.AutoModelForImageTextToText.from_config(hf_config.to_hf(cfg))
  hf = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  mapped = {e.hf: e.hf_shape for e in entries}
  assert len(mapped) == len(entries)  # no HF key used twice
  # A tied head is an alias of the embedding in HF's state_dict, not a param of its own.
  assert set(hf) - set(mapped) == ({"lm_head.weight"} if cfg.decoder.tie_embeddings else set())
  assert {k: hf[k] for k in mapped} == mapped
  shapes, _ = vlm.abstract_params(cfg)
  ours = {k: tuple(v.shape) for k, v in hf_names.flatten(shapes).items()}
  assert ours == {e.ours: e.shape for e in entries}
  # Counted by hand: ViT 3 (+2 CLIP pre-LN) + 16 per block + 2 post-LN; projector 4 (Idefics3 1);
  # decoder embed + 9 per layer + final norm (+ lm_head when untied).
  assert len(entries) == {"llava_siglip": 62, "llava_clip_unscanned": 64, "idefics3_tied": 58}[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_roundtrip(name):
  cfg = dataclasses.replace(CONFIGS[name], scan_layers=True)
  hf = hf_config.to_hf(cfg)
  assert hf_config.from_hf(hf) == cfg
  assert hf_config.from_hf(hf.to_dict()) == cfg  # from a config.json dict too


def test_hf_config_fields_are_explicit():
  clip = hf_config.to_hf(CONFIGS["llava_clip_unscanned"], bos_id=2, eos_id=[6, 3], pad_id=0)
  v, t = clip.vision_config, clip.text_config
  assert (type(v).__name__, v.layer_norm_eps, v.hidden_act, v.intermediate_size) == (
      "CLIPVisionConfig", 1e-5, "quick_gelu", 48)
  assert (clip.vision_feature_layer, clip.vision_feature_select_strategy, clip.image_token_index) == (-2, "default", 4)
  assert (t.rms_norm_eps, t.rope_parameters["rope_theta"], t.num_key_value_heads, t.head_dim) == (1e-5, 5000.0, 2, 8)
  assert (t.eos_token_id, t.pad_token_id, clip.projector_hidden_act) == ([6, 3], 0, "gelu")
  siglip = hf_config.to_hf(dataclasses.replace(CONFIGS["llava_siglip"], vision=dataclasses.replace(
      SIGLIP, select_strategy="default")))
  # SigLIP has no CLS: our 'default' keeps every patch, which is HF's 'full' (HF's 'default' drops patch 0).
  assert siglip.vision_feature_select_strategy == "full" and siglip.vision_config.vision_use_head is False
  assert (siglip.vision_config.layer_norm_eps, siglip.vision_config.hidden_act) == (1e-6, "gelu_pytorch_tanh")
  idefics3 = hf_config.to_hf(CONFIGS["idefics3_tied"])
  assert (idefics3.scale_factor, idefics3.tie_word_embeddings, idefics3.vision_config.layer_norm_eps) == (2, True, 1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(vision=dataclasses.replace(SIGLIP, kind="none")), "vision.kind='none'"),
    (dict(vision=dataclasses.replace(SIGLIP, post_layernorm=True)), "LLaVA never applies the vision post_layernorm"),
    (dict(vision=dataclasses.replace(CLIP, post_layernorm=True, select_strategy="default"),
          projector=ProjectorConfig(kind="pixel_shuffle")), "Idefics3's vision tower is SigLIP-shaped"),
    (dict(projector=ProjectorConfig(kind="pixel_shuffle")), "vision.post_layernorm=True (is False)"),
])
def test_unexportable_models_are_refused(change, message):
  cfg = dataclasses.replace(CONFIGS["llava_siglip"], **change)
  with pytest.raises(hf_config.ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
    hf_config.to_hf(cfg)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(vision_feature_select_strategy="default"), "drops the first \\*patch\\*"),
    (lambda d: d.update(vision_feature_layer=[-2, -5]), "not a concatenation"),
    (lambda d: d["text_config"].update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "rope type"),
    (lambda d: d["text_config"].update(model_type="qwen2"), "only Llama and Mixtral decoders"),
    (lambda d: d["text_config"].update(attention_bias=True), "no biases"),
    (lambda d: d.update(projector_hidden_act="silu"), "projector_hidden_act"),
])
def test_unimportable_configs_are_refused(edit, message):
  d = hf_config.to_hf(CONFIGS["llava_siglip"]).to_dict()
  edit(d)
  with pytest.raises(hf_config.ConversionError, match=message):
    hf_config.from_hf(d)


def test_transforms_put_each_value_where_torch_reads_it():
  rng = np.random.default_rng(0)
  out = hf_names.Entry("a/out/kernel", "o.weight", "dense", (3, 4, 5), n_in=2)  # [H, hd, D] -> [D, H*hd]
  k = rng.normal(size=out.shape)
  w = out.to_hf(k)
  assert w.shape == (5, 12) and w[2, 1 * 4 + 3] == k[1, 3, 2]
  q = hf_names.Entry("a/q/kernel", "q.weight", "dense", (5, 3, 4))  # [D, H, hd] -> [H*hd, D]
  k = rng.normal(size=q.shape)
  assert q.to_hf(k)[2 * 4 + 1, 3] == k[3, 2, 1]
  conv = hf_names.Entry("a/kernel", "c.weight", "conv", (8, 8, 3, 6))  # [p, p, C, W] -> [W, C, p, p]
  k = rng.normal(size=conv.shape)
  assert conv.to_hf(k)[5, 2, 1, 7] == k[1, 7, 2, 5]
  for e in (out, q, conv, hf_names.Entry("b", "b", "flat", (3, 4))):
    x = rng.normal(size=e.shape).astype(np.float32)
    np.testing.assert_array_equal(e.from_hf(e.to_hf(x)), x)
  with pytest.raises(ValueError, match=r"HF tensor q.weight in f.safetensors has shape \(5, 12\), expected \(12, 5\)"):
    q.from_hf(np.zeros((5, 12)), source="f.safetensors")


def test_flatten_unflatten_scanned_and_unscanned():
  stacked = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  params = {"decoder": {"layers": {"mlp": {"up": {"kernel": stacked}}}, "final_norm": {"scale": np.ones(4)}}}
  flat = hf_names.flatten(params)
  assert sorted(flat) == ["decoder/final_norm/scale", "decoder/layers_0/mlp/up/kernel",
                          "decoder/layers_1/mlp/up/kernel"]
  np.testing.assert_array_equal(flat["decoder/layers_1/mlp/up/kernel"], stacked[1])
  unscanned = hf_names.unflatten(flat, scanned=False)
  assert sorted(unscanned["decoder"]) == ["final_norm", "layers_0", "layers_1"]
  back = hf_names.unflatten(hf_names.flatten(unscanned), scanned=True)
  np.testing.assert_array_equal(back["decoder"]["layers"]["mlp"]["up"]["kernel"], stacked)
  with pytest.raises(ValueError, match="layer indices"):
    hf_names.unflatten({"x/layers_1/w": np.ones(1)}, scanned=True)


@pytest.mark.parametrize("key, family, canonical", [
    ("language_model.model.layers.0.self_attn.q_proj.weight", "llava",
     "model.language_model.layers.0.self_attn.q_proj.weight"),
    ("language_model.lm_head.weight", "llava", "lm_head.weight"),
    ("vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias", "llava",
     "model.vision_tower.encoder.layers.1.mlp.fc1.bias"),
    ("vision_tower.embeddings.patch_embedding.weight", "llava", "model.vision_tower.embeddings.patch_embedding.weight"),
    ("multi_modal_projector.linear_2.bias", "llava", "model.multi_modal_projector.linear_2.bias"),
    ("model.language_model.norm.weight", "llava", "model.language_model.norm.weight"),
    ("model.connector.modality_projection.proj.weight", "idefics3", "model.connector.modality_projection.proj.weight"),
    ("vision_model.post_layernorm.weight", "vision", "post_layernorm.weight"),
    ("model.layers.0.mlp.up_proj.weight", "llama", "model.layers.0.mlp.up_proj.weight"),
])
def test_canonical_keys(key, family, canonical):
  assert hf_names.canonical_key(key, family) == canonical
