"""LLaVA + Mixtral (MoE decoder) parity: a random HF LlavaForConditionalGeneration with a SigLIP tower and a
MixtralConfig text model -> load_hf -> our VLM gives the same logits (<= 1e-4, float32, dropless routing) and the
same 20 greedy tokens, scanned and not; export back to HF gives bit-identical tensors; the config mapping writes
every MoE field and refuses what Mixtral cannot express."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import (AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration, MixtralConfig,
                          SiglipVisionConfig)

from fixtures_convert import (IMAGE_TOKEN_ID, assert_logits_and_greedy_match_hf, assert_same_state_dicts,
                              prompt_and_pixels, randomize, save_with_tokenizer, tokenizer_dir)  # noqa: F401  (fixture)
from vlm_jax import config as config_lib
from vlm_jax.convert import export, hf_config, hf_names, load
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.model import vlm

E, K = 4, 2


def build_llava_mixtral(vocab_size: int) -> LlavaForConditionalGeneration:
  """Random LLaVA + Mixtral: SigLIP 32x2 on 32 px, patch 8 (16 image tokens, 'full', layer -1); Mixtral 64x2, GQA
  4/2, 4 experts of hidden size 48, top-2."""
  torch.manual_seed(0)
  text = MixtralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=K,
                       router_aux_loss_coef=0.02, rms_norm_eps=1e-5, max_position_embeddings=128, sliding_window=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=2,
                       eos_token_id=3, pad_token_id=0)
  vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, layer_norm_eps=1e-6, vision_use_head=False)
  config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                       vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu")
  model = LlavaForConditionalGeneration(config)
  with torch.no_grad():  # a router scaled up so tokens disagree on their experts (HF inits it near zero)
    for layer in model.model.language_model.layers:
      layer.mlp.gate.weight.normal_(0.0, 0.5)
  return randomize(model)


@pytest.fixture(scope="module")
def hf_mixtral(tokenizer_dir, tmp_path_factory):
  """(HF model, its saved directory with our tokenizer as tokenizer.json)."""
  model = build_llava_mixtral(Tokenizer.load(tokenizer_dir).vocab_size + 3)
  return save_with_tokenizer(model, tokenizer_dir, tmp_path_factory.mktemp("hf_llava_mixtral"))


def test_saved_checkpoint_has_per_expert_tensors(hf_mixtral):
  """transformers 5 writes Mixtral's original per-expert layout, so the import must fuse it."""
  _, hf_dir = hf_mixtral
  with safe_open(hf_dir / "model.safetensors", "pt") as f:
    keys = set(f.keys())
  layer = "language_model.model.layers.1.block_sparse_moe."
  assert {f"{layer}experts.{e}.{w}.weight" for e in range(E) for w in ("w1", "w2", "w3")} <= keys
  assert f"{layer}gate.weight" in keys and not any("gate_up_proj" in k for k in keys)
  fused = hf_names.fused_expert_keys(hf_names.canonical_key(k, "llava") for k in keys)
  assert fused["model.language_model.layers.1.mlp.experts.gate_up_proj"][3] == (
      "model.language_model.layers.1.mlp.experts.3.w1.weight", "model.language_model.layers.1.mlp.experts.3.w3.weight")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_mixtral_logits_and_greedy_match_hf(hf_mixtral, scan_layers):
  model, hf_dir = hf_mixtral
  cfg, params, tok = load.load_hf(hf_dir, scan_layers=scan_layers)
  moe = cfg.decoder.moe
  assert (moe.num_experts, moe.experts_per_token, moe.every_n_layers, moe.expert_mlp_dim) == (E, K, 1, 48)
  assert (moe.capacity_factor, moe.router_aux_loss_coef, moe.router_z_loss_coef) == (0.0, 0.02, 0.0)
  experts = params["decoder"]["layers"]["moe"]["experts"] if scan_layers else \
      params["decoder"]["layers_1"]["moe"]["experts"]
  assert experts["gate_up"].shape == ((2,) if scan_layers else ()) + (E, 64, 2, 48)
  # Expert 2's gate and up of layer 1 are HF's w1 / w3 (gate_up_proj rows [:F] / [F:]), transposed.
  hf_gate_up = model.model.language_model.layers[1].mlp.experts.gate_up_proj[2].detach().numpy()
  ours = experts["gate_up"][1, 2] if scan_layers else experts["gate_up"][2]
  np.testing.assert_array_equal(ours[:, 0], hf_gate_up[:48].T)
  np.testing.assert_array_equal(ours[:, 1], hf_gate_up[48:].T)

  ids, pixels = prompt_and_pixels(cfg, tok)
  assert_logits_and_greedy_match_hf(model, cfg, params, ids, pixels, f"mixtral scan={scan_layers}")
  # Every expert takes a real share of the prompt's tokens: the parity covers all four experts' weights.
  batch = {"input_ids": np.asarray(ids)[None], "segment_ids": np.ones((1, len(ids)), np.int32),
           "positions": np.arange(len(ids), dtype=np.int32)[None], "pixel_values": pixels.transpose(0, 2, 3, 1)[:, None],
           "tile_mask": np.ones((1, 1), bool)}
  load_share = np.asarray(vlm.VLM(cfg).apply({"params": params}, batch)["moe_metrics"]["expert_load"])
  assert load_share.min() > 0.05, load_share


def test_mixtral_hf_roundtrip_is_bit_identical(hf_mixtral, tokenizer_dir, tmp_path):
  model, hf_dir = hf_mixtral
  cfg, params, _ = load.load_hf(hf_dir)
  out = export.export(params, cfg, tokenizer_dir, tmp_path / "export")
  reloaded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
  assert type(reloaded) is LlavaForConditionalGeneration
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert_same_state_dicts(model.state_dict(), reloaded.state_dict())
  text = reloaded.config.text_config
  assert (text.model_type, text.num_local_experts, text.num_experts_per_tok, text.intermediate_size) == (
      "mixtral", E, K, 48)
  assert (text.router_aux_loss_coef, text.sliding_window, text.router_jitter_noise) == (0.02, None, 0.0)
  # And back again: the exported directory imports to the same params.
  _, again, _ = load.load_hf(out)
  flat, flat_again = hf_names.flatten(params), hf_names.flatten(again)
  assert list(flat) == list(flat_again)
  for (path, a), b in zip(flat.items(), flat_again.values()):
    np.testing.assert_array_equal(a, b, err_msg=path)


def test_our_moe_model_exports_and_matches_hf(tokenizer_dir, tmp_path):
  """vlm_jax -> HF for a model born here (its own config, fresh init): HF's logits and greedy tokens equal ours."""
  tok = Tokenizer.load(tokenizer_dir)
  overrides = ["model.projector.kind=mlp", "model.vision.post_layernorm=false", "model.vision.image_size=32",
               "model.vision.width=32", "model.vision.depth=2", "model.vision.num_heads=2", "model.vision.mlp_dim=64",
               "model.decoder.width=64", "model.decoder.num_layers=2", "model.decoder.num_heads=4",
               "model.decoder.num_kv_heads=2", f"model.decoder.vocab_size={tok.vocab_size}",
               "model.decoder.moe.expert_mlp_dim=48", "model.decoder.max_seq_len=256", "model.dtype=float32"]
  cfg = config_lib.load("shapes_moe", overrides).model
  params = jax.device_get(vlm.init_params(cfg, jax.random.PRNGKey(3)))
  out = export.export(params, cfg, tokenizer_dir, tmp_path / "export")
  model = AutoModelForImageTextToText.from_pretrained(out).eval()
  assert type(model.config.text_config) is MixtralConfig
  ids, pixels = prompt_and_pixels(cfg, tok)
  assert_logits_and_greedy_match_hf(model, cfg, params, ids, pixels, "born in vlm_jax")


def _llava_moe(**moe):
  """shapes_moe (every layer MoE) with the LLaVA projector and a SigLIP tower read without post-LN."""
  overrides = ["model.projector.kind=mlp", "model.vision.post_layernorm=false"]
  overrides += [f"model.decoder.moe.{k}={v}" for k, v in moe.items()]
  return config_lib.load("shapes_moe", overrides).model


def test_mixtral_config_mapping_and_refusals():
  cfg = _llava_moe()
  hf = hf_config.to_hf(cfg, bos_id=2, eos_id=[6, 3], pad_id=0)
  text = hf.text_config
  assert type(text) is MixtralConfig and hf.model_type == "llava"
  m, d = cfg.decoder.moe, cfg.decoder
  assert (text.num_local_experts, text.num_experts_per_tok, text.intermediate_size) == (4, 2, 256)
  assert (text.router_aux_loss_coef, text.hidden_size, text.num_hidden_layers) == (0.01, d.width, d.num_layers)
  assert (text.sliding_window, text.output_router_logits, text.rms_norm_eps) == (None, False, d.rms_norm_eps)
  back = hf_config.from_hf(hf.to_dict())
  assert back.decoder.moe == dataclasses.replace(m, router_z_loss_coef=0.0)  # HF has no z-loss
  assert dataclasses.replace(back.decoder, mlp_dim=d.mlp_dim, moe=m) == d  # dense mlp_dim: unused, not in Mixtral

  with pytest.raises(hf_config.ConversionError, match="every_n_layers=3: Mixtral has a sparse MoE block in every"):
    hf_config.to_hf(_llava_moe(every_n_layers=3))
  with pytest.raises(hf_config.ConversionError, match="Idefics3 \\+ Mixtral, which transformers does not have"):
    hf_config.check_exportable(config_lib.load("shapes_moe").model)  # pixel shuffle + MoE
  with pytest.warns(UserWarning, match="capacity_factor=1.25: transformers' Mixtral routes dropless"):
    hf_config.to_hf(_llava_moe(capacity_factor=1.25))

  raw = hf.to_dict()
  raw["text_config"]["sliding_window"] = 64
  with pytest.raises(hf_config.ConversionError, match="sliding_window=64: vlm_jax's attention is full causal"):
    hf_config.from_hf(raw)
  raw["text_config"]["sliding_window"] = raw["text_config"]["max_position_embeddings"]  # no window in effect
  assert hf_config.from_hf(raw).decoder.moe.num_experts == 4
  with pytest.raises(ValueError, match=r"missing \['x.mlp.experts.1.w3.weight'\]"):
    hf_names.fused_expert_keys([f"x.mlp.experts.{e}.{w}.weight" for e in range(2) for w in ("w1", "w2", "w3")
                                if (e, w) != (1, "w3")])
