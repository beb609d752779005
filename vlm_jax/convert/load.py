"""Import Hugging Face checkpoints into vlm_jax: whole VLMs (LLaVA, Idefics3) or backbones (a SigLIP / CLIP vision
model, a Llama causal LM). Safetensors only: pickled `pytorch_model.bin` files are refused, never unpickled.

    load_hf(hf_dir)       -> (ModelConfig, params, Tokenizer)     LLaVA (Llama or Mixtral text model) / Idefics3
    load_vision(hf_dir)   -> (VisionConfig, vision params)        SiglipVisionModel / CLIPVisionModel (or the
                                                                  vision half of a SiglipModel / CLIPModel)
    load_llama(hf_dir)    -> (DecoderConfig, decoder params, Tokenizer)
    import_hf(hf_dir, W)  -> writes a vlm_jax workdir W: config.json, tokenizer/, and the params as the finished
                             stage "import" (Orbax, vlm_jax/checkpoint.py layout), so `init_from=W` starts from it

Every mapped HF tensor must be present with its expected shape and every HF tensor must be used (except the
ones `hf_names.IGNORED` names); otherwise the error names the param path, both shapes and the file. When the
tokenizer lacks special tokens vlm_jax needs (`<image>`, ChatML), they are appended and the embedding (and
lm_head) grow by rows set to the mean of the existing rows: deterministic, and a neutral start.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import numpy as np

from vlm_jax.config import (Config, DataConfig, DecoderConfig, ModelConfig, StageConfig, TokenizerConfig, TrainConfig,
                            VisionConfig, to_dict, validate)
from vlm_jax.convert import hf_config, hf_names
from vlm_jax.inputs import files
from vlm_jax.inputs.tokenizer import IM_END, IM_START, IMAGE_TOKEN, SPECIAL_TOKENS, Tokenizer

IMPORT_STAGE = "import"
CHAT_TOKENS = [IMAGE_TOKEN, IM_START, IM_END]


class Checkpoint:
  """The tensors of an HF directory by canonical (transformers 5 in-memory) key, read lazily from safetensors.
  Mixtral's per-expert tensors (the on-disk layout) appear as the fused in-memory ones (`hf_names.fused_expert_keys`)."""

  def __init__(self, hf_dir: str | pathlib.Path, family: str, keep: Callable[[str], bool] = lambda k: True):
    self.dir = pathlib.Path(hf_dir)
    index = self.dir / "model.safetensors.index.json"
    if index.exists():
      weight_map = files.read_json(index, "safetensors index", "save the model again")["weight_map"]
    elif (self.dir / "model.safetensors").exists():
      from safetensors import safe_open
      with safe_open(self.dir / "model.safetensors", framework="pt") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
      pickled = [p.name for p in self.dir.glob("*.bin")]
      raise FileNotFoundError(f"{self.dir} has no model.safetensors{f' (only {pickled})' if pickled else ''}. "
                              "vlm_jax reads safetensors only; re-save the model with save_pretrained in "
                              "transformers >= 4.35 (safe_serialization is the default).")
    self.keys = {}  # canonical key -> (file name, key in the file)
    for key, file in weight_map.items():
      if keep(key):
        self.keys[hf_names.canonical_key(key, family)] = (file, key)
    # fused key -> per expert, the part keys concatenated into it; the parts leave `keys` (so they count as used
    # exactly when their fused tensor is read) and move to `_parts`.
    self.fused = hf_names.fused_expert_keys(self.keys)
    self._parts = {}
    for key, experts in self.fused.items():
      for part in (p for parts in experts for p in parts):
        self._parts[part] = self.keys.pop(part)
      self.keys[key] = self._parts[experts[0][0]]
    self._open: dict[str, Any] = {}

  def file(self, key: str) -> str:
    return str(self.dir / self.keys[key][0])

  def get(self, key: str) -> np.ndarray:
    """The tensor as float32 numpy (bf16 / f16 checkpoints are upcast)."""
    if key in self.fused:  # [E, ...]: expert e is its parts concatenated on axis 0 (w1 then w3 for gate_up)
      return np.stack([np.concatenate([self._tensor(*self._parts[p]) for p in parts], 0)
                       for parts in self.fused[key]])
    return self._tensor(*self.keys[key])

  def _tensor(self, file: str, original: str) -> np.ndarray:
    from safetensors import safe_open
    if file not in self._open:
      self._open[file] = safe_open(self.dir / file, framework="pt")
    return self._open[file].get_tensor(original).float().numpy()

  def read(self, entries: list[hf_names.Entry], allow_unused: Callable[[str], bool] = lambda k: False
           ) -> dict[str, np.ndarray]:
    """{our unscanned path: array} for `entries`; every other tensor must be IGNORED or `allow_unused`."""
    flat = {}
    for e in entries:
      if e.hf not in self.keys:
        raise KeyError(f"{self.dir}: no tensor {e.hf} for vlm_jax param {e.ours} (expected HF shape {e.hf_shape}, "
                       f"vlm_jax shape {e.shape}).")
      flat[e.ours] = e.from_hf(self.get(e.hf), source=self.file(e.hf))
    used = {e.hf for e in entries}
    unused = sorted(k for k in self.keys if k not in used and not hf_names.IGNORED.search(k) and not allow_unused(k))
    if unused:
      raise ValueError(f"{self.file(unused[0])}: tensors no vlm_jax param maps to: {unused[:8]}"
                       f"{' ...' if len(unused) > 8 else ''}. Is the config ({self.dir / 'config.json'}) the "
                       "model these weights belong to?")
    return flat


def _read_config(hf_dir: pathlib.Path) -> dict[str, Any]:
  path = hf_dir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{hf_dir} has no config.json.")
  return files.read_json(path, "HF config.json", "save the model again with transformers' save_pretrained")


def _image_processor_config(hf_dir: pathlib.Path) -> dict[str, Any]:
  """The image processor's settings: processor_config.json (transformers 5) or preprocessor_config.json."""
  for name, part in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
    path = hf_dir / name
    if path.exists():
      data = files.read_json(path, f"HF {name}", "save the processor again with transformers' save_pretrained")
      data = data.get(part, {}) if part else data
      if data:
        return data
  return {}


def grow_vocab(flat: dict[str, np.ndarray], decoder: DecoderConfig, vocab_size: int,
               ours: str = "decoder") -> dict[str, np.ndarray]:
  """Appends embedding rows (and lm_head columns) up to `vocab_size`, each the mean of the existing ones."""
  flat = dict(flat)
  grow = vocab_size - decoder.vocab_size
  if grow <= 0:
    return flat
  embed = flat[f"{ours}/embed/embedding"]  # [V, D]
  flat[f"{ours}/embed/embedding"] = np.concatenate([embed, np.repeat(embed.mean(0, keepdims=True), grow, 0)], 0)
  head = f"{ours}/lm_head/kernel"  # [D, V]
  if head in flat:
    flat[head] = np.concatenate([flat[head], np.repeat(flat[head].mean(1, keepdims=True), grow, 1)], 1)
  return flat


def _tokenizer(hf_dir: pathlib.Path, needed: list[str]) -> Tokenizer:
  """The directory's tokenizer.json (HF's own, preferred over a tokenizer.model beside it) + missing `needed`."""
  path = hf_dir / "tokenizer.json"
  if not path.exists():
    raise FileNotFoundError(f"{hf_dir} has no tokenizer.json; save the model's fast tokenizer there first.")
  tok = Tokenizer.load(path)
  tok.add_special_tokens(needed)
  return tok


def load_hf(hf_dir: str | pathlib.Path, *, scan_layers: bool = True) -> tuple[ModelConfig, dict, Tokenizer]:
  """A LLaVA or Idefics3 directory -> (ModelConfig, params (float32 numpy, scanned if `scan_layers`), Tokenizer).
  Image mean/std come from the directory's image processor config."""
  hf_dir = pathlib.Path(hf_dir)
  raw = _read_config(hf_dir)
  cfg = hf_config.from_hf(raw)
  family = raw["model_type"]
  processor = _image_processor_config(hf_dir)
  if "image_mean" in processor:
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(
        cfg.vision, image_mean=tuple(processor["image_mean"]), image_std=tuple(processor["image_std"])))
  ckpt = Checkpoint(hf_dir, family)
  tied = cfg.decoder.tie_embeddings
  flat = ckpt.read(hf_names.model_entries(cfg), allow_unused=lambda k: tied and k == "lm_head.weight")
  tok = _tokenizer(hf_dir, SPECIAL_TOKENS if family == "idefics3" else CHAT_TOKENS)
  if tok.image_id != cfg.image_token_id:
    raise hf_config.ConversionError(f"{hf_dir}: the tokenizer's {IMAGE_TOKEN} id is {tok.image_id} but the config's "
                                    f"image token id is {cfg.image_token_id}.")
  if tok.vocab_size > cfg.decoder.vocab_size:
    flat = grow_vocab(flat, cfg.decoder, tok.vocab_size)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, vocab_size=tok.vocab_size))
  return dataclasses.replace(cfg, scan_layers=scan_layers), hf_names.unflatten(flat, scan_layers), tok


def load_vision(hf_dir: str | pathlib.Path, *, feature_layer: int = -1, select_strategy: str = "full",
                post_layernorm: bool = False, scan_layers: bool = True) -> tuple[VisionConfig, dict]:
  """A SigLIP / CLIP vision model directory (or a dual-tower SiglipModel / CLIPModel, whose text half is skipped)
  -> (VisionConfig, params of the `vision` subtree). The keyword arguments are the VLM's choices of how to
  read the tower (LLaVA's vision_feature_layer etc.)."""
  hf_dir = pathlib.Path(hf_dir)
  raw = _read_config(hf_dir)
  dual = raw.get("model_type") in ("siglip", "clip")
  vision = hf_config.vision_from_hf(raw["vision_config"] if dual else raw, feature_layer=feature_layer,
                                    select_strategy=select_strategy, post_layernorm=post_layernorm)
  processor = _image_processor_config(hf_dir)
  if "image_mean" in processor:
    vision = dataclasses.replace(vision, image_mean=tuple(processor["image_mean"]),
                                 image_std=tuple(processor["image_std"]))
  keep = (lambda k: k.startswith("vision_model.")) if dual else (lambda k: True)
  flat = Checkpoint(hf_dir, "vision", keep).read(hf_names.vision_entries(vision, ""))
  return vision, hf_names.unflatten(flat, scan_layers)["vision"]


def load_llama(hf_dir: str | pathlib.Path, *, scan_layers: bool = True,
               add_tokens: tuple[str, ...] = tuple(SPECIAL_TOKENS)) -> tuple[DecoderConfig, dict, Tokenizer]:
  """A LlamaForCausalLM directory -> (DecoderConfig, params of the `decoder` subtree, Tokenizer with `add_tokens`
  appended; the vocabulary grows to fit them)."""
  hf_dir = pathlib.Path(hf_dir)
  decoder = hf_config.decoder_from_hf(_read_config(hf_dir))
  tied = decoder.tie_embeddings
  flat = Checkpoint(hf_dir, "llama").read(hf_names.decoder_entries(decoder, "model.", "lm_head.weight"),
                                          allow_unused=lambda k: tied and k == "lm_head.weight")
  tok = _tokenizer(hf_dir, list(add_tokens))
  if tok.vocab_size > decoder.vocab_size:
    flat = grow_vocab(flat, decoder, tok.vocab_size)
    decoder = dataclasses.replace(decoder, vocab_size=tok.vocab_size)
  return decoder, hf_names.unflatten(flat, scan_layers)["decoder"], tok


def import_hf(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path, *, scan_layers: bool = True) -> Config:
  """Writes workdir W from a LLaVA / Idefics3 directory (see the module docstring); returns the Config saved in
  W/config.json. Train from it with `train.stages.<first>.init_from=W`."""
  from vlm_jax import checkpoint
  hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir).expanduser().resolve()
  model, params, tok = load_hf(hf_dir, scan_layers=scan_layers)
  processor = _image_processor_config(hf_dir)
  size = processor.get("size", {})
  resample_names = {code: name for name, code in hf_config.PIL_RESAMPLE.items()}
  tokenizer_dir = workdir / "tokenizer"
  data = DataConfig(
      tokenizer=TokenizerConfig(kind="hf", path=str(tokenizer_dir), vocab_size=tok.vocab_size),
      seq_len=min(DataConfig.seq_len, model.decoder.max_seq_len),  # rows fit the model's positions
      image_splitting=model.projector.kind == "pixel_shuffle" and processor.get("do_image_splitting", True),
      max_image_size=size.get("longest_edge", 0) if model.projector.kind == "pixel_shuffle" else 0,
      resample=resample_names.get(processor.get("resample"), "bicubic"),
      # LLaVA-1.5's CLIPImageProcessor: shortest edge, then the centre crop
      image_resize="shortest_edge_crop" if model.projector.kind == "mlp" and processor.get("do_center_crop")
      and "shortest_edge" in size else "square")
  stage = StageConfig(name=IMPORT_STAGE, steps=0, checkpoint_every=1, max_to_keep=1)
  config = validate(Config(name=f"import_{hf_dir.name}", model=model, data=data,
                           train=TrainConfig(stages=(stage,))))
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(to_dict(config), indent=1) + "\n")
  tok.save(tokenizer_dir)
  with checkpoint.manager(workdir, stage) as mngr:
    checkpoint.save(mngr, 0, {"params": params}, force=True)
    mngr.wait_until_finished()
  checkpoint.mark_finished(workdir, IMPORT_STAGE, 0)
  return config
