"""Explicit name maps between vlm_jax param paths and Hugging Face transformers state-dict keys.

One map per family: SigLIP / CLIP vision towers, the Llama decoder (Mixtral when it has experts), LLaVA's MLP
projector and Idefics3's pixel-shuffle connector. An `Entry` pairs our '/'-joined path, in its *unscanned* form
('decoder/layers_3/attn/q_proj/kernel'), with an HF key and the transform between the two layouts:

  copy   same array (norm scales/biases, embeddings, position embeddings, CLS token)
  flat   our [H, hd] bias <-> torch [H*hd]
  dense  our Flax kernel [*in, *out] <-> torch weight [prod(out), prod(in)] (reshape, then transpose);
         `n_in` says how many leading dims are inputs: q/k/v [D, H, hd] have 1, out/o_proj [H, hd, D] have 2
  conv   our patch kernel [p, p, C, W] (NHWC) <-> torch Conv2d weight [W, C, p, p] (NCHW)
  experts  `dense` per expert: our stacked kernels [E, *in, *out] <-> torch [E, prod(out), prod(in)] (`n_in` counts
         input dims after the expert axis); Mixtral's fused experts, see vlm_jax/model/moe.py

HF keys are transformers 5's in-memory names (`model.state_dict()`); `canonical_key` maps the other on-disk
spellings of older checkpoints (`language_model.model.*`, `vision_tower.vision_model.*`, ...) onto them, and
`fused_expert_keys` groups Mixtral's on-disk per-expert tensors into the fused in-memory ones.
Scanned param trees keep all layers of a stack under `layers` with a leading layer axis: `flatten` splits that
axis into the unscanned paths the maps use and `unflatten` stacks them back, so one map serves both trees.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np

from vlm_jax.config import DecoderConfig, ModelConfig, VisionConfig

TRANSFORMS = ("copy", "flat", "dense", "conv", "experts")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One param: our unscanned path, its HF key, the layout transform, and our shape."""
  ours: str
  hf: str
  transform: str
  shape: tuple[int, ...]
  n_in: int = 1  # dense / experts only: leading input dims of our kernel (after the expert axis)

  @property
  def hf_shape(self) -> tuple[int, ...]:
    s = self.shape
    if self.transform == "copy":
      return s
    if self.transform == "flat":
      return (math.prod(s),)
    if self.transform == "dense":
      return (math.prod(s[self.n_in:]), math.prod(s[:self.n_in]))
    if self.transform == "conv":
      return (s[3], s[2], s[0], s[1])
    if self.transform == "experts":
      return (s[0], math.prod(s[1 + self.n_in:]), math.prod(s[1:1 + self.n_in]))
    raise ValueError(f"Unknown transform {self.transform!r} for {self.ours}; expected one of {TRANSFORMS}.")

  def to_hf(self, x: Any) -> np.ndarray:
    """Our array (shape `self.shape`) -> the HF tensor's array (shape `self.hf_shape`)."""
    x = np.asarray(x)
    _check(x.shape, self.shape, f"vlm_jax param {self.ours}", self.hf)
    if self.transform == "dense":
      x = x.reshape(math.prod(self.shape[:self.n_in]), -1).T
    elif self.transform == "flat":
      x = x.reshape(-1)
    elif self.transform == "conv":
      x = x.transpose(3, 2, 0, 1)
    elif self.transform == "experts":
      x = x.reshape(self.shape[0], math.prod(self.shape[1:1 + self.n_in]), -1).transpose(0, 2, 1)
    return np.array(x, order="C")  # a fresh, writable copy (torch.from_numpy wants one)

  def from_hf(self, t: Any, source: str = "") -> np.ndarray:
    """The HF tensor's array (shape `self.hf_shape`) -> ours (shape `self.shape`)."""
    t = np.asarray(t)
    _check(t.shape, self.hf_shape, f"HF tensor {self.hf}{f' in {source}' if source else ''}", self.ours)
    if self.transform == "dense":
      t = t.T.reshape(self.shape)
    elif self.transform == "flat":
      t = t.reshape(self.shape)
    elif self.transform == "conv":
      t = t.transpose(2, 3, 1, 0)
    elif self.transform == "experts":
      t = t.transpose(0, 2, 1).reshape(self.shape)
    return np.array(t, order="C")


def _check(got: tuple[int, ...], want: tuple[int, ...], what: str, other: str) -> None:
  if tuple(got) != tuple(want):
    raise ValueError(f"Shape mismatch: {what} has shape {tuple(got)}, expected {tuple(want)} (maps to {other}).")


# ---------------------------------------------------------------------------------------------------
# Family maps


def vision_entries(v: VisionConfig, prefix: str, ours: str = "vision") -> list[Entry]:
  """SigLIP or CLIP ViT under the HF prefix of its vision transformer (e.g. 'model.vision_tower.')."""
  if v.kind not in ("siglip", "clip"):
    raise ValueError(f"vision.kind={v.kind!r} has no HF vision tower (only siglip and clip do).")
  w, p, c, f = v.width, v.patch_size, v.num_channels, v.mlp_dim
  h = v.num_heads
  hd = w // h
  is_clip = v.kind == "clip"
  emb = f"{prefix}embeddings."
  out = [Entry(f"{ours}/patch_embed/kernel", emb + "patch_embedding.weight", "conv", (p, p, c, w))]
  if not is_clip:
    out.append(Entry(f"{ours}/patch_embed/bias", emb + "patch_embedding.bias", "copy", (w,)))
  else:
    out.append(Entry(f"{ours}/cls_token", emb + "class_embedding", "copy", (w,)))
  out.append(Entry(f"{ours}/pos_embed", emb + "position_embedding.weight", "copy", (v.num_positions, w)))
  if is_clip:
    out += _layer_norm(f"{ours}/pre_layernorm", prefix + "pre_layrnorm", w)  # sic: HF's spelling
  for i in range(v.depth):
    us, hf = f"{ours}/layers_{i}", f"{prefix}encoder.layers.{i}."
    out += _layer_norm(f"{us}/ln1", hf + "layer_norm1", w) + _layer_norm(f"{us}/ln2", hf + "layer_norm2", w)
    for name in ("q", "k", "v"):
      out.append(Entry(f"{us}/attn/{name}/kernel", hf + f"self_attn.{name}_proj.weight", "dense", (w, h, hd)))
      out.append(Entry(f"{us}/attn/{name}/bias", hf + f"self_attn.{name}_proj.bias", "flat", (h, hd)))
    out.append(Entry(f"{us}/attn/out/kernel", hf + "self_attn.out_proj.weight", "dense", (h, hd, w), n_in=2))
    out.append(Entry(f"{us}/attn/out/bias", hf + "self_attn.out_proj.bias", "copy", (w,)))
    out += _linear(f"{us}/mlp/fc1", hf + "mlp.fc1", w, f) + _linear(f"{us}/mlp/fc2", hf + "mlp.fc2", f, w)
  out += _layer_norm(f"{ours}/post_layernorm", prefix + "post_layernorm", w)
  return out


def decoder_entries(d: DecoderConfig, prefix: str, lm_head: str, ours: str = "decoder") -> list[Entry]:
  """Llama decoder: `prefix` is that of LlamaModel (e.g. 'model.language_model.'), `lm_head` the head's key.
  MoE layers (`d.is_moe_layer(i)`) map to Mixtral's sparse MoE block (MixtralModel when every layer is one)."""
  dm, f, hd = d.width, d.mlp_dim, d.resolved_head_dim
  out = [Entry(f"{ours}/embed/embedding", prefix + "embed_tokens.weight", "copy", (d.vocab_size, dm))]
  for i in range(d.num_layers):
    us, hf = f"{ours}/layers_{i}", f"{prefix}layers.{i}."
    out += [
        Entry(f"{us}/attn_norm/scale", hf + "input_layernorm.weight", "copy", (dm,)),
        Entry(f"{us}/attn/q_proj/kernel", hf + "self_attn.q_proj.weight", "dense", (dm, d.num_heads, hd)),
        Entry(f"{us}/attn/k_proj/kernel", hf + "self_attn.k_proj.weight", "dense", (dm, d.num_kv_heads, hd)),
        Entry(f"{us}/attn/v_proj/kernel", hf + "self_attn.v_proj.weight", "dense", (dm, d.num_kv_heads, hd)),
        Entry(f"{us}/attn/o_proj/kernel", hf + "self_attn.o_proj.weight", "dense", (d.num_heads, hd, dm), n_in=2),
        Entry(f"{us}/mlp_norm/scale", hf + "post_attention_layernorm.weight", "copy", (dm,)),
    ]
    out += _mixtral_moe(d, f"{us}/moe", hf + "mlp.") if d.is_moe_layer(i) else [
        Entry(f"{us}/mlp/gate/kernel", hf + "mlp.gate_proj.weight", "dense", (dm, f)),
        Entry(f"{us}/mlp/up/kernel", hf + "mlp.up_proj.weight", "dense", (dm, f)),
        Entry(f"{us}/mlp/down/kernel", hf + "mlp.down_proj.weight", "dense", (f, dm)),
    ]
  out.append(Entry(f"{ours}/final_norm/scale", prefix + "norm.weight", "copy", (dm,)))
  if not d.tie_embeddings:
    out.append(Entry(f"{ours}/lm_head/kernel", lm_head, "dense", (dm, d.vocab_size)))
  return out


def _mixtral_moe(d: DecoderConfig, ours: str, hf: str) -> list[Entry]:
  """transformers 5's MixtralSparseMoeBlock (in-memory, fused experts): router `gate.weight` [E, D]; experts
  `gate_up_proj` [E, 2F, D] (gate rows, then up rows) and `down_proj` [E, D, F]."""
  e, dm, f = d.moe.num_experts, d.width, d.resolved_expert_mlp_dim
  return [Entry(f"{ours}/router/kernel", hf + "gate.weight", "dense", (dm, e)),
          Entry(f"{ours}/experts/gate_up", hf + "experts.gate_up_proj", "experts", (e, dm, 2, f)),
          Entry(f"{ours}/experts/down", hf + "experts.down_proj", "experts", (e, f, dm))]


def llava_projector_entries(cfg: ModelConfig, prefix: str = "model.multi_modal_projector.") -> list[Entry]:
  """LLaVA's linear_1 -> act -> linear_2, both with biases."""
  w, dm = cfg.vision.width, cfg.decoder.width
  return _linear("projector/linear_1", prefix + "linear_1", w, dm) + _linear("projector/linear_2",
                                                                              prefix + "linear_2", dm, dm)


def idefics3_connector_entries(cfg: ModelConfig, prefix: str = "model.connector.") -> list[Entry]:
  """Idefics3's bias-free linear after the pixel shuffle: ours [W*s*s, D] <-> torch [D, W*s*s]."""
  s = cfg.projector.scale_factor
  return [Entry("projector/proj/kernel", prefix + "modality_projection.proj.weight", "dense",
                (cfg.vision.width * s * s, cfg.decoder.width))]


def llava_entries(cfg: ModelConfig) -> list[Entry]:
  """LlavaForConditionalGeneration (transformers 5 in-memory keys)."""
  return (vision_entries(cfg.vision, "model.vision_tower.") + llava_projector_entries(cfg)
          + decoder_entries(cfg.decoder, "model.language_model.", "lm_head.weight"))


def idefics3_entries(cfg: ModelConfig) -> list[Entry]:
  """Idefics3ForConditionalGeneration (transformers 5 in-memory keys)."""
  return (vision_entries(cfg.vision, "model.vision_model.") + idefics3_connector_entries(cfg)
          + decoder_entries(cfg.decoder, "model.text_model.", "lm_head.weight"))


def model_entries(cfg: ModelConfig) -> list[Entry]:
  """The map of a whole VLM: LLaVA for the mlp projector, Idefics3 for pixel_shuffle. The contrastive
  pretraining head has no HF counterpart and is not mapped."""
  return idefics3_entries(cfg) if cfg.projector.kind == "pixel_shuffle" else llava_entries(cfg)


def _layer_norm(ours: str, hf: str, width: int) -> list[Entry]:
  return [Entry(f"{ours}/scale", hf + ".weight", "copy", (width,)),
          Entry(f"{ours}/bias", hf + ".bias", "copy", (width,))]


def _linear(ours: str, hf: str, fan_in: int, fan_out: int) -> list[Entry]:
  return [Entry(f"{ours}/kernel", hf + ".weight", "dense", (fan_in, fan_out)),
          Entry(f"{ours}/bias", hf + ".bias", "copy", (fan_out,))]


# ---------------------------------------------------------------------------------------------------
# On-disk key spellings -> transformers 5 in-memory keys

# (pattern, replacement) applied in order; the first that matches wins. Older LLaVA checkpoints nest the
# language model as `language_model.model.*` with `language_model.lm_head`, and CLIP / SigLIP towers as
# `vision_tower.vision_model.*`; transformers 5 saves `vision_tower.*`, `language_model.model.*`.
_LLAVA_KEYS = [
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "model.vision_tower."),
    (r"^(?:model\.)?multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^(?:language_model\.)?lm_head\.", "lm_head."),
]
_IDEFICS3_KEYS = [(r"^(?:model\.)?(vision_model|connector|text_model)\.", r"model.\1."), (r"^lm_head\.", "lm_head.")]
# Standalone backbones: SiglipVisionModel / CLIPVisionModel (transformers 5 drops the `vision_model.` level
# older checkpoints have), LlamaForCausalLM.
_VISION_KEYS = [(r"^vision_model\.", "")]
_LLAMA_KEYS: list[tuple[str, str]] = []  # LlamaForCausalLM saves its in-memory names
KEY_RULES = {"llava": _LLAVA_KEYS, "idefics3": _IDEFICS3_KEYS, "vision": _VISION_KEYS, "llama": _LLAMA_KEYS}

# HF params our model has no counterpart for and never uses: SigLIP's attention-pooling head and CLIP's
# projection (LLaVA and Idefics3 read hidden states, not the pooled output), RoPE buffers of old checkpoints.
IGNORED = re.compile(r"(^|\.)(head\.|visual_projection\.)|rotary_emb\.inv_freq$")


def canonical_key(key: str, family: str) -> str:
  """An on-disk key of `family` (llava | idefics3 | vision | llama) -> the transformers 5 in-memory key (Mixtral's
  per-expert tensors only get their module renamed; `fused_expert_keys` groups them)."""
  key = _MIXTRAL_BLOCK.sub(".mlp.", key)
  for pattern, repl in KEY_RULES[family]:
    new, n = re.subn(pattern, repl, key, count=1)
    if n:
      return new
  return key


# Mixtral on disk (hub checkpoints, and what transformers 5's save_pretrained writes back): the MoE block is
# `block_sparse_moe` and each expert has its own `experts.{e}.w1` (gate) / `w3` (up) [F, D] and `w2` (down) [D, F].
# In memory transformers 5 fuses them: gate_up_proj [E, 2F, D] = stack over e of cat(w1, w3), down_proj = stack(w2).
_MIXTRAL_BLOCK = re.compile(r"\.block_sparse_moe\.")
_EXPERT_PART = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w[123])\.weight$")


def fused_expert_keys(keys: Any) -> dict[str, list[tuple[str, ...]]]:
  """Canonical keys -> {fused in-memory key: per expert e, the keys whose tensors concatenate (axis 0) into [e]}:
  `...mlp.experts.gate_up_proj` <- [(w1_e, w3_e)], `...mlp.experts.down_proj` <- [(w2_e,)]. {} for other models."""
  found: dict[str, dict[tuple[int, str], str]] = {}
  for key in keys:
    m = _EXPERT_PART.match(key)
    if m:
      found.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = key
  out = {}
  for prefix, parts in found.items():
    n = 1 + max(e for e, _ in parts)
    missing = [f"{prefix}.{e}.{w}.weight" for e in range(n) for w in ("w1", "w2", "w3") if (e, w) not in parts]
    if missing:
      raise ValueError(f"Mixtral experts under {prefix}: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}.")
    out[f"{prefix}.gate_up_proj"] = [(parts[e, "w1"], parts[e, "w3"]) for e in range(n)]
    out[f"{prefix}.down_proj"] = [(parts[e, "w2"],) for e in range(n)]
  return out


# ---------------------------------------------------------------------------------------------------
# Scanned <-> unscanned param trees

_LAYER = re.compile(r"^(.*?)/layers_(\d+)/(.*)$")


def flatten(params: Any) -> dict[str, Any]:
  """Nested params -> {unscanned '/'-joined path: array}. A scanned stack (`.../layers/...` with a leading
  layer axis) becomes `.../layers_0/...`, `.../layers_1/...`; unscanned trees pass through."""
  flat: dict[str, Any] = {}

  def walk(node, path, stacked):
    if isinstance(node, dict) or hasattr(node, "items"):
      for k, v in node.items():
        if k == "layers":
          walk(v, path + ["layers"], True)
        else:
          walk(v, path + [str(k)], stacked)
      return
    if not stacked:
      flat["/".join(path)] = node
      return
    i = len(path) - 1 - path[::-1].index("layers")
    for n in range(node.shape[0]):
      flat["/".join(path[:i] + [f"layers_{n}"] + path[i + 1:])] = _layer_slice(node, n)
  walk(params, [], False)
  return flat


def _layer_slice(node: Any, n: int) -> Any:
  if isinstance(node, jax.ShapeDtypeStruct):  # abstract params (shapes only)
    return jax.ShapeDtypeStruct(node.shape[1:], node.dtype)
  return node[n]


def unflatten(flat: dict[str, Any], scanned: bool) -> dict[str, Any]:
  """{unscanned path: array} -> nested dict; with `scanned`, `.../layers_i/...` are stacked (i = 0..n-1) into
  `.../layers/...` with a leading layer axis."""
  out: dict[str, Any] = {}
  stacks: dict[tuple[str, str], dict[int, Any]] = {}
  for path, value in flat.items():
    m = _LAYER.match(path) if scanned else None
    if m:
      stacks.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
    else:
      _set(out, path, value)
  for (head, tail), layers in stacks.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"{head}/layers_*/{tail}: layer indices {sorted(layers)} are not 0..{len(layers) - 1}.")
    _set(out, f"{head}/layers/{tail}", np.stack([np.asarray(layers[i]) for i in range(len(layers))]))
  return out


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value
