"""vlm_jax LoRA adapters <-> PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

PEFT names the LoRA of an HF module M (a Linear, or the SigLIP / CLIP patch Conv2d) `base_model.model.M.lora_A.weight`
[r, in] and `base_model.model.M.lora_B.weight` [out, r] (conv: [r, C, p, p] and [W, r, 1, 1]); its delta is
lora_alpha / r * B @ A. Ours (vlm_jax/model/lora.py) are lora_a [*in, r] and lora_b [r, *out] of a Flax kernel
[*in, *out], whose torch weight is the transpose of its flattened form (hf_names' `dense`), so
    lora_A = lora_a.reshape(prod(in), r).T        lora_B = lora_b.reshape(r, prod(out)).T.
Module names come from hf_names' LLaVA / Idefics3 maps. Params trained in full beside the adapters (a stage's
`trainable`, e.g. LLaVA's projector) are saved whole, as PEFT's `modules_to_save` (`base_model.model.M.weight`).
MoE expert stacks have no PEFT Linear to adapt: export those models merged.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np

from vlm_jax.config import InputError, LoraConfig, ModelConfig
from vlm_jax.convert import hf_config, hf_names

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_LAYER = re.compile(r"/layers_\d+/")


def _module(entry: hf_names.Entry) -> str:
  return entry.hf.rsplit(".", 1)[0]


def _to_peft(entry: hf_names.Entry, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Our (lora_a, lora_b) of one unscanned kernel -> PEFT's (lora_A.weight, lora_B.weight)."""
  r = a.shape[-1]
  if entry.transform == "dense":
    return a.reshape(-1, r).T, b.reshape(r, -1).T
  if entry.transform == "conv":  # a [p, p, C, r] is a conv into r channels, b [r, W] a 1x1 conv
    return a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
  raise hf_config.ConversionError(f"{entry.ours} ({entry.transform}) has no PEFT LoRA layout; export the merged "
                                  "model instead (`vlm-jax export` without --adapter).")


def _from_peft(entry: hf_names.Entry, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's (lora_A.weight, lora_B.weight) -> our (lora_a, lora_b) of one unscanned kernel."""
  r = a.shape[0]
  if entry.transform == "dense":
    return a.T.reshape(*entry.shape[:entry.n_in], r), b.T.reshape(r, *entry.shape[entry.n_in:])
  return a.transpose(2, 3, 1, 0), b[:, :, 0, 0].T


def adapter_tensors(adapters: Any, model_config: ModelConfig, full: dict[str, Any] | None = None
                    ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """-> ({PEFT key: float32 array}, target modules, modules saved whole). adapters: our adapter tree (scanned or
  not); full: {our unscanned param path: array} of params trained in full, saved with their whole module."""
  entries = {e.ours: e for e in hf_names.model_entries(model_config)}
  flat = hf_names.flatten(adapters)
  tensors, targets = {}, []
  for path in sorted(p[:-len("/lora_a")] for p in flat if p.endswith("/lora_a")):
    if path not in entries:
      raise hf_config.ConversionError(f"LoRA target {path} has no HF counterpart in the "
                                      f"{hf_config.check_exportable(model_config)} map.")
    e = entries[path]
    a, b = _to_peft(e, np.asarray(flat[f"{path}/lora_a"], np.float32), np.asarray(flat[f"{path}/lora_b"], np.float32))
    tensors[f"{PREFIX}{_module(e)}.lora_A.weight"], tensors[f"{PREFIX}{_module(e)}.lora_B.weight"] = a, b
    targets.append(_module(e))
  saved = sorted({_module(entries[p]) for p in (full or {}) if p in entries})
  for e in entries.values():  # a module saved whole keeps all its params (the frozen ones are the base's)
    if _module(e) in saved:
      if e.ours not in (full or {}):
        raise ValueError(f"{e.ours}: modules saved whole need all their params; pass it in `full`.")
      tensors[PREFIX + e.hf] = e.to_hf(np.asarray(full[e.ours], np.float32))
  return tensors, targets, saved


def save_adapter(out_dir: str | pathlib.Path, adapters: Any, lora_config: LoraConfig, model_config: ModelConfig,
                 full: dict[str, Any] | None = None, base_model: str | None = None) -> pathlib.Path:
  """Writes a PEFT LoRA directory that `peft.PeftModel.from_pretrained(hf_base, out_dir)` loads. full: see
  `adapter_tensors`; base_model: adapter_config's base_model_name_or_path."""
  import peft
  from safetensors.numpy import save_file
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tensors, targets, saved = adapter_tensors(adapters, model_config, full)
  peft.LoraConfig(r=lora_config.rank, lora_alpha=lora_config.alpha, target_modules=targets,
                  modules_to_save=saved or None, lora_dropout=lora_config.dropout, bias="none",
                  base_model_name_or_path=base_model, inference_mode=True).save_pretrained(str(out))
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
            metadata={"format": "pt"})
  return out


def load_adapter(adapter_dir: str | pathlib.Path, model_config: ModelConfig) -> tuple[Any, LoraConfig, Any]:
  """A PEFT LoRA directory -> (our adapter tree, LoraConfig, tree of the params it saves whole), laid out like the
  model's params (scanned when model_config.scan_layers). In a scanned stack, layers the adapter leaves out get
  zero factors (no change). Raises InputError for LoRA variants with another delta (rslora, DoRA, patterns)."""
  from safetensors.numpy import load_file
  directory = pathlib.Path(adapter_dir)
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not (directory / name).exists():
      raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: it has no {name}.")
  cfg = json.loads((directory / CONFIG_FILE).read_text())
  unsupported = {k: cfg.get(k) for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
                 if cfg.get(k)}
  if cfg.get("peft_type") != "LORA" or unsupported:
    raise InputError(f"{directory / CONFIG_FILE}: only plain LoRA adapters import (peft_type LORA without "
                     f"{sorted(unsupported) or 'other types'}); merge it in transformers and import the model.")
  tensors = load_file(str(directory / WEIGHTS_FILE))
  flat, full = {}, {}
  for e in hf_names.model_entries(model_config):
    key = f"{PREFIX}{_module(e)}"
    if f"{key}.lora_A.weight" in tensors:
      a, b = _from_peft(e, tensors.pop(f"{key}.lora_A.weight"), tensors.pop(f"{key}.lora_B.weight"))
      flat[f"{e.ours}/lora_a"], flat[f"{e.ours}/lora_b"] = a, b
    if PREFIX + e.hf in tensors:
      full[e.ours] = e.from_hf(tensors.pop(PREFIX + e.hf), str(directory))
  if tensors:
    raise InputError(f"{directory / WEIGHTS_FILE}: {len(tensors)} tensors match no module of this model, e.g. "
                     f"{sorted(tensors)[:3]}; is it an adapter of another model?")
  scanned = model_config.scan_layers
  if scanned:
    _fill_stacks(flat, model_config)
  kernels = sorted({_LAYER.sub("/layers/", p) if scanned else p for p in flat})
  kernels = sorted({k.rsplit("/", 1)[0] for k in kernels})
  lora_config = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                           targets=tuple(re.escape(k) for k in kernels), dropout=float(cfg.get("lora_dropout") or 0.0))
  return hf_names.unflatten(flat, scanned), lora_config, hf_names.unflatten(full, scanned)


def _fill_stacks(flat: dict[str, np.ndarray], model_config: ModelConfig) -> None:
  """Zero factors for the layers of a stack an adapter leaves out (a scanned stack has one adapter per layer)."""
  stacked = lambda path: _LAYER.sub("/layers/", path)
  present = {stacked(p): x for p, x in flat.items()}
  for e in hf_names.model_entries(model_config):
    for factor in ("lora_a", "lora_b"):
      path = f"{e.ours}/{factor}"
      if stacked(path) in present and path not in flat:
        flat[path] = np.zeros_like(present[stacked(path)])
