"""ModelConfig <-> Hugging Face configs: LlavaConfig (SiglipVisionConfig or CLIPVisionConfig + LlamaConfig) for
the mlp projector, Idefics3Config for pixel_shuffle; plus the backbones alone.

Every eps and activation is written explicitly (HF defaults differ between classes). A model HF cannot express
is refused with a `ConversionError` naming the part and what to do instead; nothing is silently approximated.

Mixture of experts: a decoder with `moe.num_experts > 0` becomes a MixtralConfig text model (LLaVA + Mixtral;
transformers has no Idefics3 with Mixtral, so pixel_shuffle + MoE is refused). Mixtral has a sparse MoE block in
every layer, so `moe.every_n_layers` must be 1. Its router is ours (softmax in f32, top-k, weights renormalized
over the k) but *dropless*: no expert capacity. So exported logits equal ours for `capacity_factor=0`; a model
trained with a capacity factor exports (with a warning) and computes what ours computes dropless. HF has no
router z-loss (a training-only term): import sets `router_z_loss_coef=0`, export drops it; `router_jitter_noise`
(training-only input noise in HF) is not implemented here and is written as 0.
"""
from __future__ import annotations

import warnings
from typing import Any

from vlm_jax.config import DecoderConfig, ModelConfig, MoeConfig, ProjectorConfig, VisionConfig

# Our activation names -> transformers' ACT2FN names, and back (gelu_new is the same tanh approximation).
VISION_ACT = {"gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}
PROJECTOR_ACT = {**VISION_ACT, "relu": "relu"}
FROM_HF_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu",
               "gelu": "gelu", "relu": "relu"}
# data.resample -> the PIL.Image.Resampling code HF image processor configs store.
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}


class ConversionError(ValueError):
  """A model cannot be mapped to / from the HF format; the message names the part and what to do."""


# ---------------------------------------------------------------------------------------------------
# vlm_jax -> HF


def check_exportable(cfg: ModelConfig) -> str:
  """Returns the HF family of `cfg` ('llava' or 'idefics3') or raises ConversionError saying why not."""
  v, p = cfg.vision, cfg.projector
  check_moe_exportable(cfg.decoder)
  if cfg.decoder.moe.num_experts and p.kind == "pixel_shuffle":
    raise ConversionError("projector.kind='pixel_shuffle' with an MoE decoder would be Idefics3 + Mixtral, which "
                          "transformers does not have (Idefics3's text model is Llama). Export MoE models with "
                          "projector.kind='mlp' (LLaVA + Mixtral), or set model.decoder.moe.num_experts=0.")
  if v.kind == "none":
    raise ConversionError("model.vision.kind='none' (Fuyu-style linear patch embedding) has no counterpart in "
                          "LLaVA or Idefics3: use vision.kind='siglip' or 'clip' for a model you mean to export.")
  if v.act not in VISION_ACT:
    raise ConversionError(f"model.vision.act={v.act!r} has no transformers activation; use one of {list(VISION_ACT)}.")
  if p.kind == "mlp":
    if v.post_layernorm:
      raise ConversionError("model.vision.post_layernorm=True with the mlp projector: LLaVA never applies the "
                            "vision post_layernorm, so the exported model would compute something else. Train with "
                            "post_layernorm=False, or use projector.kind='pixel_shuffle' (Idefics3).")
    if p.act not in PROJECTOR_ACT:
      raise ConversionError(f"model.projector.act={p.act!r} has no transformers activation; use one of "
                            f"{list(PROJECTOR_ACT)}.")
    return "llava"
  if p.kind == "pixel_shuffle":
    if v.kind != "siglip":
      raise ConversionError(f"projector.kind='pixel_shuffle' with vision.kind={v.kind!r}: Idefics3's vision tower "
                            "is SigLIP-shaped (no CLS token, no pre-LN). Use vision.kind='siglip'.")
    if not v.post_layernorm or v.feature_layer not in (-1, v.depth):
      raise ConversionError("projector.kind='pixel_shuffle': Idefics3 reads the last block's output through the "
                            f"post_layernorm; set vision.feature_layer=-1 (is {v.feature_layer}) and "
                            f"vision.post_layernorm=True (is {v.post_layernorm}).")
    return "idefics3"
  raise ConversionError(f"model.projector.kind={p.kind!r} has no HF counterpart (mlp -> LLaVA, "
                        "pixel_shuffle -> Idefics3).")


def vision_to_hf(v: VisionConfig) -> Any:
  """SiglipVisionConfig (no pooling head: LLaVA does not use it) or CLIPVisionConfig."""
  import transformers
  common = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                num_attention_heads=v.num_heads, num_channels=v.num_channels, image_size=v.image_size,
                patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, hidden_act=VISION_ACT[v.act],
                attention_dropout=0.0)
  if v.kind == "siglip":
    return transformers.SiglipVisionConfig(**common, vision_use_head=False)
  if v.kind == "clip":
    return transformers.CLIPVisionConfig(**common, projection_dim=v.width)
  raise ConversionError(f"model.vision.kind={v.kind!r} has no HF vision config (siglip and clip do).")


def check_moe_exportable(d: DecoderConfig) -> None:
  """Raises ConversionError when the decoder's MoE layout has no Mixtral counterpart (dense decoders pass)."""
  m = d.moe
  if m.num_experts and m.every_n_layers != 1:
    raise ConversionError(f"model.decoder.moe.every_n_layers={m.every_n_layers}: Mixtral has a sparse MoE block in "
                          "every layer and no dense layers between them; only every_n_layers=1 exports.")


def decoder_to_hf(d: DecoderConfig, *, bos_id: int | None = None, eos_id: int | list[int] | None = None,
                  pad_id: int | None = None) -> Any:
  """LlamaConfig (dense) or MixtralConfig (MoE) with every field our decoder depends on set explicitly."""
  import transformers
  common = dict(
      vocab_size=d.vocab_size, hidden_size=d.width, num_hidden_layers=d.num_layers,
      num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads, head_dim=d.resolved_head_dim,
      hidden_act="silu", max_position_embeddings=d.max_seq_len, rms_norm_eps=d.rms_norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": float(d.rope_theta)},
      tie_word_embeddings=d.tie_embeddings, attention_dropout=0.0, bos_token_id=bos_id, eos_token_id=eos_id,
      pad_token_id=pad_id)
  if not d.moe.num_experts:
    return transformers.LlamaConfig(**common, intermediate_size=d.mlp_dim, attention_bias=False, mlp_bias=False)
  check_moe_exportable(d)
  m = d.moe
  if m.capacity_factor:
    warnings.warn(f"model.decoder.moe.capacity_factor={m.capacity_factor}: transformers' Mixtral routes dropless "
                  "(no expert capacity), so the exported model computes what vlm_jax computes with "
                  "capacity_factor=0; outputs differ wherever this model would drop a choice.", stacklevel=2)
  return transformers.MixtralConfig(
      **common, intermediate_size=d.resolved_expert_mlp_dim, num_local_experts=m.num_experts,
      num_experts_per_tok=m.experts_per_token, router_aux_loss_coef=m.router_aux_loss_coef,
      router_jitter_noise=0.0, output_router_logits=False, sliding_window=None)


def to_hf(cfg: ModelConfig, **token_ids: Any) -> Any:
  """LlavaConfig or Idefics3Config for `cfg`. token_ids: bos_id, eos_id, pad_id for the text config."""
  import transformers
  family = check_exportable(cfg)
  v, d = cfg.vision, cfg.decoder
  text = decoder_to_hf(d, **token_ids)
  if family == "llava":
    # SigLIP has no CLS token: our 'default' equals 'full', while HF's 'default' would drop the first patch.
    strategy = v.select_strategy if v.kind == "clip" else "full"
    return transformers.LlavaConfig(
        vision_config=vision_to_hf(v), text_config=text, image_token_index=cfg.image_token_id,
        projector_hidden_act=PROJECTOR_ACT[cfg.projector.act], multimodal_projector_bias=True,
        vision_feature_layer=v.feature_layer, vision_feature_select_strategy=strategy,
        image_seq_length=v.tokens_per_image, tie_word_embeddings=d.tie_embeddings)
  vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                num_attention_heads=v.num_heads, num_channels=v.num_channels, image_size=v.image_size,
                patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, hidden_act=VISION_ACT[v.act],
                attention_dropout=0.0)
  return transformers.Idefics3Config(
      vision_config=vision, text_config=text, scale_factor=cfg.projector.scale_factor,
      image_token_id=cfg.image_token_id, tie_word_embeddings=d.tie_embeddings, pad_token_id=token_ids.get("pad_id"))


# ---------------------------------------------------------------------------------------------------
# HF -> vlm_jax


def _get(config: Any, name: str, default: Any = None) -> Any:
  return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def _act(name: str, part: str) -> str:
  if name not in FROM_HF_ACT:
    raise ConversionError(f"{part}: activation {name!r} is not one vlm_jax implements ({sorted(FROM_HF_ACT)}).")
  return FROM_HF_ACT[name]


def vision_from_hf(vc: Any, *, feature_layer: int = -1, select_strategy: str = "full",
                   post_layernorm: bool = False) -> VisionConfig:
  """A SigLIP / CLIP / Idefics3 vision config -> VisionConfig (image mean/std stay default: they live in the
  image processor's config, which load.py reads)."""
  model_type = _get(vc, "model_type", "")
  if model_type in ("siglip_vision_model", "idefics3_vision"):
    kind = "siglip"
  elif model_type == "clip_vision_model":
    kind = "clip"
  else:
    raise ConversionError(f"vision_config.model_type={model_type!r}: only SigLIP, CLIP and Idefics3 vision towers "
                          "map to vlm_jax's ViT.")
  if kind == "siglip" and select_strategy == "default":
    raise ConversionError("vision_feature_select_strategy='default' with a SigLIP tower drops the first *patch* "
                          "(SigLIP has no CLS token); vlm_jax does not reproduce that. Use 'full'.")
  return VisionConfig(
      kind=kind, image_size=_get(vc, "image_size"), patch_size=_get(vc, "patch_size"),
      num_channels=_get(vc, "num_channels", 3), width=_get(vc, "hidden_size"), depth=_get(vc, "num_hidden_layers"),
      num_heads=_get(vc, "num_attention_heads"), mlp_dim=_get(vc, "intermediate_size"),
      layer_norm_eps=float(_get(vc, "layer_norm_eps")), act=_act(_get(vc, "hidden_act"), "vision_config.hidden_act"),
      feature_layer=feature_layer, select_strategy=select_strategy, post_layernorm=post_layernorm)


def decoder_from_hf(tc: Any, tie_embeddings: bool | None = None) -> DecoderConfig:
  """A LlamaConfig or MixtralConfig -> DecoderConfig; refuses features our decoder lacks (biases, scaled RoPE,
  sliding-window attention, other archs). Mixtral: every layer MoE, dropless, no z-loss (module docstring)."""
  model_type = _get(tc, "model_type", "")
  if model_type not in ("llama", "mixtral"):
    raise ConversionError(f"text_config.model_type={model_type!r}: only Llama and Mixtral decoders map to vlm_jax's "
                          "decoder.")
  window = _get(tc, "sliding_window")
  if model_type == "mixtral" and window is not None and window < _get(tc, "max_position_embeddings", 0):
    raise ConversionError(f"text_config.sliding_window={window}: vlm_jax's attention is full causal; it matches "
                          "only when sliding_window is None or >= max_position_embeddings.")
  for flag in ("attention_bias", "mlp_bias"):
    if _get(tc, flag, False):
      raise ConversionError(f"text_config.{flag}=True: vlm_jax's Llama decoder has no biases.")
  if _get(tc, "hidden_act", "silu") != "silu":
    raise ConversionError(f"text_config.hidden_act={_get(tc, 'hidden_act')!r}: the decoder MLP is SwiGLU (silu).")
  rope = _get(tc, "rope_parameters") or _get(tc, "rope_scaling") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ConversionError(f"text_config rope type {rope.get('rope_type', rope.get('type'))!r}: vlm_jax implements "
                          "only plain RoPE (rope_type 'default').")
  # Each class's own default theta (MixtralConfig: 1e6) when a raw config.json leaves it out.
  theta = rope.get("rope_theta", _get(tc, "rope_theta", 1e6 if model_type == "mixtral" else 10000.0))
  width, heads = _get(tc, "hidden_size"), _get(tc, "num_attention_heads")
  head_dim = _get(tc, "head_dim") or width // heads
  tie = _get(tc, "tie_word_embeddings", False) if tie_embeddings is None else tie_embeddings
  moe = MoeConfig()
  if model_type == "mixtral":
    moe = MoeConfig(num_experts=_get(tc, "num_local_experts", 8), experts_per_token=_get(tc, "num_experts_per_tok", 2),
                    every_n_layers=1, expert_mlp_dim=_get(tc, "intermediate_size"), capacity_factor=0.0,
                    router_aux_loss_coef=float(_get(tc, "router_aux_loss_coef", 0.001)), router_z_loss_coef=0.0)
  return DecoderConfig(
      vocab_size=_get(tc, "vocab_size"), width=width, num_layers=_get(tc, "num_hidden_layers"), num_heads=heads,
      num_kv_heads=_get(tc, "num_key_value_heads") or heads, head_dim=0 if head_dim * heads == width else head_dim,
      mlp_dim=_get(tc, "intermediate_size"), rope_theta=float(theta), rms_norm_eps=float(_get(tc, "rms_norm_eps")),
      tie_embeddings=bool(tie), max_seq_len=_get(tc, "max_position_embeddings", 2048), moe=moe)


def from_hf(config: Any) -> ModelConfig:
  """A LlavaConfig / Idefics3Config (object or config.json dict) -> ModelConfig."""
  model_type = _get(config, "model_type", "")
  if model_type == "llava":
    layer = _get(config, "vision_feature_layer", -2)
    if not isinstance(layer, int):
      raise ConversionError(f"vision_feature_layer={layer!r}: vlm_jax reads one layer, not a concatenation.")
    if not _get(config, "multimodal_projector_bias", True):
      raise ConversionError("multimodal_projector_bias=False: vlm_jax's mlp projector has biases.")
    vision = vision_from_hf(_get(config, "vision_config"), feature_layer=layer,
                            select_strategy=_get(config, "vision_feature_select_strategy", "default"))
    projector = ProjectorConfig(kind="mlp", act=_act(_get(config, "projector_hidden_act", "gelu"),
                                                     "projector_hidden_act"))
    image_token = _get(config, "image_token_index", _get(config, "image_token_id"))
  elif model_type == "idefics3":
    vision = vision_from_hf(_get(config, "vision_config"), feature_layer=-1, post_layernorm=True)
    projector = ProjectorConfig(kind="pixel_shuffle", scale_factor=_get(config, "scale_factor", 2))
    image_token = _get(config, "image_token_id")
  else:
    raise ConversionError(f"model_type={model_type!r}: vlm_jax imports 'llava' and 'idefics3' models.")
  text = _get(config, "text_config")
  if model_type == "idefics3" and _get(text, "model_type", "") == "mixtral":
    raise ConversionError("Idefics3 with a Mixtral text model: transformers has no such model and vlm_jax maps "
                          "Idefics3 with a Llama text model only.")
  tie = _get(config, "tie_word_embeddings", None)
  if model_type == "llava":  # LLaVA ties if either level says so
    tie = bool(tie) or bool(_get(text, "tie_word_embeddings", False))
  decoder = decoder_from_hf(text, tie_embeddings=tie)
  return ModelConfig(vision=vision, projector=projector, decoder=decoder, image_token_id=image_token)

