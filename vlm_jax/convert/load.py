"""Import Hugging Face checkpoints into vlm_jax: whole VLMs (LLaVA, Idefics3) or backbones (a SigLIP / CLIP vision
model, a Llama causal LM). Safetensors only: pickled `pytorch_model.bin` files are refused, never unpickled.

    load_hf(hf_dir)       -> (ModelConfig, params, Tokenizer)     LLaVA (Llama or Mixtral text model) / Idefics3
    load_vision(hf_dir)   -> (VisionConfig, vision params)        SiglipVisionModel / CLIPVisionModel (or the
                                                                  vision half of a SiglipModel / CLIPModel)
    load_llama(hf_dir)    -> (DecoderConfig, decoder params, Tokenizer)
    import_hf(hf_dir, W)  -> writes a vlm_jax workdir W: config.json, tokenizer/, and the params as the finished
                             stage "import" (Orbax, vlm_jax/checkpoint.py layout), so `init_from=W` starts from it

Every mapped HF tensor must be present with its expected shape and every HF tensor must be used (except the
ones `hf_names.IGNORED` names); otherwise the error names the param path, both shapes and the file. A model keeps
its own tokens and chat template; only special tokens its prompts need and its tokenizer lacks are appended
(vlm_jax/convert/hf_tokens.py), and the embedding (and lm_head) grow by rows set to the mean of the existing rows:
deterministic, and a neutral start. Paths may be local or gs:// (remote safetensors files are copied to a local
temporary file to be read).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
from etils import epath

from vlm_jax.config import (Config, DataConfig, DecoderConfig, InputError, ModelConfig, StageConfig, TokenizerConfig,
                            TrainConfig, VisionConfig, to_dict, validate)
from vlm_jax.convert import hf_config, hf_names, hf_tokens
from vlm_jax.inputs import files
from vlm_jax.inputs.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, Tokenizer

IMPORT_STAGE = "import"


class Checkpoint:
  """The tensors of an HF directory by canonical (transformers 5 in-memory) key, read lazily from safetensors.
  Mixtral's per-expert tensors (the on-disk layout) appear as the fused in-memory ones (`hf_names.fused_expert_keys`)."""

  def __init__(self, hf_dir: str | os.PathLike, family: str, keep: Callable[[str], bool] = lambda k: True):
    self.dir = epath.Path(hf_dir)
    index = self.dir / "model.safetensors.index.json"
    if index.exists():
      weight_map = files.read_json(index, "safetensors index", "save the model again")["weight_map"]
    elif (self.dir / "model.safetensors").exists():
      with self._safe_open("model.safetensors") as f:
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
    if file not in self._open:
      self._open[file] = self._safe_open(file)
    return self._open[file].get_tensor(original).float().numpy()

  def _safe_open(self, file: str) -> Any:
    """safetensors' reader of one file of the directory; a remote (gs://) file is copied to a local temporary
    file first (safetensors memory-maps local files only), so both kinds of path are read the same way."""
    from safetensors import SafetensorError, safe_open
    with files.reading(self.dir / file, "safetensors file", "download or save the model again: the file is "
                       "damaged or truncated", errors=(SafetensorError, OSError)):
      return safe_open(local_copy(self.dir / file), framework="pt")

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


def _read_config(hf_dir: epath.Path) -> dict[str, Any]:
  path = hf_dir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{hf_dir} has no config.json.")
  return files.read_json(path, "HF config.json", "save the model again with transformers' save_pretrained")


def _image_processor_config(hf_dir: epath.Path) -> dict[str, Any]:
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


def read_tokenizer(hf_dir: str | os.PathLike, needed: list[str] | tuple[str, ...] = ()) -> Tokenizer:
  """The directory's tokenizer.json (HF's own, preferred over a tokenizer.model beside it) + missing `needed`."""
  path = epath.Path(hf_dir) / "tokenizer.json"
  if not path.exists():
    raise FileNotFoundError(f"{hf_dir} has no tokenizer.json; save the model's fast tokenizer there first.")
  tok = Tokenizer.load(path)
  tok.add_special_tokens(list(needed))
  return tok


def _with_tokenizer(flat: dict[str, np.ndarray], decoder: DecoderConfig, tok: Tokenizer
                    ) -> tuple[dict[str, np.ndarray], DecoderConfig]:
  """Grows the embedding (mean rows) when the tokenizer got more tokens than the decoder has rows."""
  if tok.vocab_size <= decoder.vocab_size:
    return flat, decoder
  return grow_vocab(flat, decoder, tok.vocab_size), dataclasses.replace(decoder, vocab_size=tok.vocab_size)


def hf_needed_tokens(hf_dir: str | os.PathLike) -> list[str]:
  """The special tokens a LLaVA / Idefics3 directory's prompts need (`hf_tokens.needed_tokens`)."""
  hf_dir = epath.Path(hf_dir)
  idefics3 = _read_config(hf_dir).get("model_type") == "idefics3"
  splitting = idefics3 and _image_processor_config(hf_dir).get("do_image_splitting", True)
  return hf_tokens.needed_tokens(hf_tokens.chat_template(hf_dir), "pixel_shuffle" if idefics3 else "mlp", splitting)


def load_hf(hf_dir: str | os.PathLike, *, scan_layers: bool = True) -> tuple[ModelConfig, dict, Tokenizer]:
  """A LLaVA or Idefics3 directory -> (ModelConfig, params (float32 numpy, scanned if `scan_layers`), Tokenizer).
  Image mean/std come from the directory's image processor config. The tokenizer gains only the special tokens
  its prompts lack (`hf_needed_tokens`)."""
  hf_dir = epath.Path(hf_dir)
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
  tok = read_tokenizer(hf_dir, hf_needed_tokens(hf_dir))
  if tok.image_id != cfg.image_token_id:
    raise hf_config.ConversionError(f"{hf_dir}: the tokenizer's {IMAGE_TOKEN} id is {tok.image_id} but the config's "
                                    f"image token id is {cfg.image_token_id}.")
  flat, decoder = _with_tokenizer(flat, cfg.decoder, tok)
  cfg = dataclasses.replace(cfg, decoder=decoder, scan_layers=scan_layers)
  return cfg, hf_names.unflatten(flat, scan_layers), tok


# ---------------------------------------------------------------------------------------------------
# Backbones: one vision tower, one causal LM

VISION_MODELS = {"siglip_vision_model": "SiglipVisionModel", "siglip": "SiglipModel (its vision tower)",
                 "clip_vision_model": "CLIPVisionModel", "clip": "CLIPModel (its vision tower)"}
DECODER_MODELS = {"llama": "LlamaForCausalLM (Llama, SmolLM2)"}
_WHY_NOT = {"qwen2": "Qwen2 has q/k/v biases, which vlm_jax's decoder does not have",
            "mistral": "Mistral's sliding-window attention is not vlm_jax's full causal attention"}


def _backbone_config(hf_dir: epath.Path, supported: dict[str, str], other: dict[str, str], flag: str) -> Any:
  """config.json as transformers' config class of its model_type, with that class's defaults for what the file
  leaves out (hub checkpoints often store only non-default fields of sub-configs). A model_type outside
  `supported` raises InputError naming the file, what it is and what was expected."""
  import transformers
  raw = _read_config(hf_dir)
  model_type = raw.get("model_type")
  if model_type not in supported:
    what = f"model_type {model_type!r} (architectures {raw.get('architectures')})"
    hint = (f"; it is a {other[model_type]} checkpoint: is it the other tower?" if model_type in other else
            f" ({_WHY_NOT[model_type]})" if model_type in _WHY_NOT else "")
    raise InputError(f"{hf_dir / 'config.json'}: {what} is not a supported {flag} checkpoint{hint}. Expected one of: "
                     f"{', '.join(sorted(set(supported.values())))}.")
  kwargs = {k: v for k, v in raw.items() if k != "model_type"}
  return transformers.AutoConfig.for_model(model_type, **kwargs)


def vision_config(hf_dir: str | os.PathLike, *, feature_layer: int = -1, select_strategy: str = "full",
                  post_layernorm: bool = False) -> VisionConfig:
  """The VisionConfig of a SigLIP / CLIP vision model directory (or of a dual-tower SiglipModel / CLIPModel's vision
  half), image mean/std from its image processor. The keyword arguments are the VLM's choices of how to read the
  tower (LLaVA's vision_feature_layer etc.)."""
  hf_dir = epath.Path(hf_dir)
  hf = _backbone_config(hf_dir, VISION_MODELS, DECODER_MODELS, "vision tower")
  vision = hf_config.vision_from_hf(getattr(hf, "vision_config", hf), feature_layer=feature_layer,
                                    select_strategy=select_strategy, post_layernorm=post_layernorm)
  processor = _image_processor_config(hf_dir)
  if "image_mean" in processor:
    vision = dataclasses.replace(vision, image_mean=tuple(processor["image_mean"]),
                                 image_std=tuple(processor["image_std"]))
  return vision


def load_vision(hf_dir: str | os.PathLike, *, feature_layer: int = -1, select_strategy: str = "full",
                post_layernorm: bool = False, scan_layers: bool = True) -> tuple[VisionConfig, dict]:
  """A SigLIP / CLIP vision model directory (or a dual-tower SiglipModel / CLIPModel, whose text half is skipped)
  -> (VisionConfig (`vision_config`), params of the `vision` subtree)."""
  hf_dir = epath.Path(hf_dir)
  vision = vision_config(hf_dir, feature_layer=feature_layer, select_strategy=select_strategy,
                         post_layernorm=post_layernorm)
  dual = _read_config(hf_dir).get("model_type") in ("siglip", "clip")
  keep = (lambda k: k.startswith("vision_model.")) if dual else (lambda k: True)
  flat = Checkpoint(hf_dir, "vision", keep).read(hf_names.vision_entries(vision, ""))
  return vision, hf_names.unflatten(flat, scan_layers)["vision"]


def llama_config(hf_dir: str | os.PathLike) -> DecoderConfig:
  """The DecoderConfig of a LlamaForCausalLM directory (vocab_size: the checkpoint's embedding rows)."""
  hf_dir = epath.Path(hf_dir)
  hf = _backbone_config(hf_dir, DECODER_MODELS, VISION_MODELS, "decoder")
  try:
    return hf_config.decoder_from_hf(hf)
  except hf_config.ConversionError as e:
    raise InputError(f"{hf_dir / 'config.json'}: {e}") from None


def load_llama(hf_dir: str | os.PathLike, *, scan_layers: bool = True,
               add_tokens: tuple[str, ...] = tuple(SPECIAL_TOKENS)) -> tuple[DecoderConfig, dict, Tokenizer]:
  """A LlamaForCausalLM directory -> (DecoderConfig, params of the `decoder` subtree, Tokenizer with the tokens of
  `add_tokens` it lacks appended; the vocabulary grows to fit them, new rows the mean of the existing ones)."""
  hf_dir = epath.Path(hf_dir)
  decoder = llama_config(hf_dir)
  tied = decoder.tie_embeddings
  flat = Checkpoint(hf_dir, "llama").read(hf_names.decoder_entries(decoder, "model.", "lm_head.weight"),
                                          allow_unused=lambda k: tied and k == "lm_head.weight")
  tok = read_tokenizer(hf_dir, add_tokens)
  flat, decoder = _with_tokenizer(flat, decoder, tok)
  return decoder, hf_names.unflatten(flat, scan_layers)["decoder"], tok


# ---------------------------------------------------------------------------------------------------
# Workdirs


def write_workdir(workdir: str | os.PathLike, config: Config, params: Any, tok: Tokenizer, stage: StageConfig,
                  chat_template: str | None = None) -> None:
  """W/config.json, W/tokenizer/ (+ the chat template when it is not vlm_jax's ChatML) and `params` as the
  finished stage `stage` (Orbax, vlm_jax/checkpoint.py layout)."""
  from vlm_jax import checkpoint
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(to_dict(config), indent=1) + "\n")
  tok.save(workdir / "tokenizer")
  hf_tokens.save_template(chat_template, workdir / "tokenizer")
  with checkpoint.manager(str(workdir), stage) as mngr:
    checkpoint.save(mngr, stage.steps, {"params": params}, force=True)
    mngr.wait_until_finished()
  checkpoint.mark_finished(str(workdir), stage.name, stage.steps)


def import_hf(hf_dir: str | os.PathLike, workdir: str | os.PathLike, *, scan_layers: bool = True,
              adapter: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> Config:
  """Writes workdir W from a LLaVA / Idefics3 directory (see the module docstring); returns the Config saved in
  W/config.json. Train from it with `train.stages.<first>.init_from=W`. Logs each special token it had to add.
  adapter: a PEFT LoRA directory of this base (`vlm-jax export --adapter` writes one): its adapters are merged
  into the weights and the modules it saves whole replace the base's, so W holds the fine-tuned model."""
  from vlm_jax import checkpoint
  hf_dir, workdir = epath.Path(hf_dir), checkpoint.absolute(workdir)
  model, params, tok = load_hf(hf_dir, scan_layers=scan_layers)
  if adapter is not None:
    params = merge_adapter(params, adapter, model, log)
  added = hf_tokens.missing_tokens(read_tokenizer(hf_dir), hf_needed_tokens(hf_dir))
  if added:
    log(hf_tokens.added_message(added, tok))
  processor = _image_processor_config(hf_dir)
  size = processor.get("size", {})
  resample_names = {code: name for name, code in hf_config.PIL_RESAMPLE.items()}
  tokenizer_dir = epath.Path(workdir) / "tokenizer"
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
  write_workdir(workdir, config, params, tok, stage, hf_tokens.chat_template(hf_dir))
  return config


def merge_adapter(params: Any, adapter_dir: str | os.PathLike, model: ModelConfig,
                  log: Callable[[str], None] = print) -> Any:
  """params with a PEFT LoRA directory's adapters merged in (W + A B alpha / r, in float32) and the params it
  saves whole put in place of the base's."""
  import jax  # pylint: disable=import-outside-toplevel
  from vlm_jax.convert import peft  # pylint: disable=import-outside-toplevel
  from vlm_jax.model import lora  # pylint: disable=import-outside-toplevel
  adapters, lora_config, whole = peft.load_adapter(adapter_dir, model)
  merged = jax.tree.map(np.asarray, lora.merge(params, adapters, lora_config))
  replaced = hf_names.flatten(whole)
  flat = {**hf_names.flatten(merged), **replaced}
  log(f"merged the PEFT adapter {adapter_dir}: rank {lora_config.rank}, alpha {lora_config.alpha:g}, "
      f"{len(lora_config.targets)} target kernel(s); {len(replaced)} param(s) saved whole replaced")
  return hf_names.unflatten(flat, model.scan_layers)


def local_copy(path: epath.Path) -> str:
  """A local file path holding `path`'s bytes: `path` itself when it is local, else a temporary copy (gs://),
  removed when the process exits."""
  if "://" not in str(path):
    return os.fspath(path)
  directory = tempfile.mkdtemp(prefix="vlm_jax_hf_")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  local = os.path.join(directory, path.name)
  with path.open("rb") as src, open(local, "wb") as dst:
    shutil.copyfileobj(src, dst, 64 << 20)
  return local
