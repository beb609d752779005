"""Export vlm_jax params to a Hugging Face transformers directory (LLaVA or Idefics3), or a plain torch state_dict.
An MoE decoder exports as LLaVA with a Mixtral text model (limits in vlm_jax/convert/hf_config.py).

    export(params, model_config, tokenizer_dir, out_dir, fmt="hf")
      -> model.safetensors (sharded above max_shard_size), config.json, generation_config.json and the processor
         (image processor, tokenizer.json as PreTrainedTokenizerFast, ChatML chat template), loadable offline with
         AutoProcessor / AutoModelForImageTextToText.from_pretrained(out_dir).
    export(..., fmt="torch") -> model.safetensors (HF key names, no sharding) + name_map.json

Our sentencepiece tokenizers become a tokenizer.json with identical ids (`sentencepiece_to_tokenizers`). One
difference is inherent to HF: the text "</s>" (or "<s>", "<pad>", "<unk>") typed in a prompt becomes the special
token there, while sentencepiece spells it out in bytes. Unigram models (not BPE) also differ where the text spells
a byte piece ('<0x41>': HF's Unigram matches it whole) and, rarely, on runs of spaces whose segmentations score
equal ('▁▁▁▁'+'▁' or '▁'+'▁▁▁▁': the two Viterbi searches break ties differently).
"""
from __future__ import annotations

import json
import pathlib
import re
import tempfile
from typing import Any

import numpy as np
from etils import epath

from vlm_jax.config import DataConfig, ModelConfig
from vlm_jax.convert import hf_config, hf_names, hf_tokens
from vlm_jax.inputs.tokenizer import IM_END, IMAGE_TOKEN, Tokenizer

# ChatML exactly as vlm_jax/inputs/chat.py renders it. Content is a string with `<image>` placeholders, or a
# list of {"type": "image"} / {"type": "text", "text": ...} parts (what processors' apply_chat_template passes).
# Newlines are written as {{ '\n' }}-style literals because Jinja drops a newline right after a tag.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant' + '\\n' -}}{%- endif -%}")

NAME_MAP_FILE = "name_map.json"


def hf_state_dict(params: Any, cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """Our params (scanned or not; jax or numpy arrays on this host) -> {HF in-memory key: torch.Tensor}.
  Every mapped param must be present; params without an HF counterpart (contrastive head) are left out."""
  import torch
  flat = hf_names.flatten(params)
  out = {}
  for e in hf_names.model_entries(cfg):
    if e.ours not in flat:
      raise KeyError(f"vlm_jax param {e.ours} (-> {e.hf}) is missing from the params being exported.")
    out[e.hf] = torch.from_numpy(e.to_hf(np.asarray(flat[e.ours], np.float32))).to(getattr(torch, dtype))
  return out


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def sentencepiece_to_tokenizers(proto: bytes) -> Any:
  """A sentencepiece unigram or BPE model trained the vlm_jax way (identity normalization, no dummy prefix, byte
  fallback; see inputs/tokenizer.py) -> a `tokenizers.Tokenizer` giving the same ids."""
  import tokenizers
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import decoders, models, normalizers, pre_tokenizers
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(proto)
  spec, norm = m.trainer_spec, m.normalizer_spec
  if spec.model_type not in (spec.UNIGRAM, spec.BPE) or norm.add_dummy_prefix or norm.name != "identity" or \
     spec.treat_whitespace_as_suffix or spec.split_digits:
    raise hf_config.ConversionError(
        "Only sentencepiece unigram or BPE models with identity normalization, no dummy prefix and no digit "
        "splitting (vlm_jax.inputs.tokenizer.train_sentencepiece) convert exactly; save this tokenizer as "
        "tokenizer.json.")
  if spec.model_type == spec.UNIGRAM:
    model = models.Unigram([(p.piece, p.score) for p in m.pieces], unk_id=spec.unk_id,
                           byte_fallback=spec.byte_fallback)
  else:
    vocab, merges = sentencepiece_bpe_merges(m)
    # sentencepiece fuses a run of unknown characters into one <unk> (only seen without byte fallback).
    model = models.BPE(vocab, merges, unk_token=m.pieces[spec.unk_id].piece, fuse_unk=True,
                       byte_fallback=spec.byte_fallback)
  tk = tokenizers.Tokenizer(model)
  tk.normalizer = normalizers.Replace(" ", "▁")
  # No pre-splitting: sentencepiece encodes the whole text (between user-defined symbols) at once, and with
  # allow_whitespace_only_pieces it has pieces such as '▁▁' that a split before each '▁' would cut.
  tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
  tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
  user_defined = m.SentencePiece.Type.USER_DEFINED
  tk.add_special_tokens([tokenizers.AddedToken(p.piece, special=True, normalized=False)
                         for p in m.pieces if p.type == user_defined])
  return tk


def sentencepiece_bpe_merges(m: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """A sentencepiece BPE ModelProto -> (vocab {piece: id}, merges in rank order) for `tokenizers.models.BPE`.

  sentencepiece BPE merges the adjacent pair of highest score whose concatenation is any piece but <unk>, by
  any split of that piece (not only the one training found). HF BPE merges the pair of lowest rank. So every
  split of every piece into two pieces is a merge, ranked by the piece's score (highest first; ties by id).
  Both break ties of one pair leftmost first. (The splits of one piece tie in sentencepiece but get consecutive
  ranks here; 160k random strings over 'ab'/'abc' alphabets with ~270 multi-split pieces showed no difference.)
  """
  vocab = {p.piece: i for i, p in enumerate(m.pieces)}
  merges = []
  for i in sorted(range(len(m.pieces)), key=lambda j: (-m.pieces[j].score, j)):
    piece = m.pieces[i].piece
    if i != m.trainer_spec.unk_id:
      merges += [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
  return vocab, merges


def hf_tokenizer(tokenizer_dir: str | pathlib.Path, padding_side: str = "left") -> Any:
  """Our tokenizer directory -> PreTrainedTokenizerFast with its pad/unk/bos/eos roles and the chat template (the
  one saved beside it, vlm_jax/convert/hf_tokens.py, else vlm_jax's ChatML)."""
  from transformers import PreTrainedTokenizerFast
  import tokenizers
  tokenizer_dir = epath.Path(tokenizer_dir)  # a gs:// workdir's tokenizer too
  tok = Tokenizer.load(tokenizer_dir)  # same file choice as here: tokenizer.model before tokenizer.json
  if tok.kind == "sentencepiece":
    backend = sentencepiece_to_tokenizers((tokenizer_dir / "tokenizer.model").read_bytes())
  else:
    backend = tokenizers.Tokenizer.from_str((tokenizer_dir / "tokenizer.json").read_text())
  roles = {f"{r}_token": t for r, t in tok.roles.items() if t is not None}
  return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=padding_side,
                                 chat_template=hf_tokens.saved_template(tokenizer_dir, CHAT_TEMPLATE), **roles)


def hf_processor(cfg: ModelConfig, tokenizer: Any, data: DataConfig = DataConfig()) -> Any:
  """LlavaProcessor (one resized, or resized and centre-cropped, tile) or Idefics3Processor (tiles + global image)
  matching vlm_jax.inputs."""
  import transformers
  v = cfg.vision
  common = dict(image_mean=list(v.image_mean), image_std=list(v.image_std),
                resample=hf_config.PIL_RESAMPLE[data.resample], do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, do_convert_rgb=True)
  if hf_config.check_exportable(cfg) == "llava":
    if data.image_resize == "shortest_edge_crop":
      image_processor = transformers.CLIPImageProcessorPil(
          size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size, "width": v.image_size},
          do_resize=True, do_center_crop=True, **common)
    else:
      image_processor = transformers.SiglipImageProcessorPil(size={"height": v.image_size, "width": v.image_size},
                                                             do_resize=True, **common)
    strategy = v.select_strategy if v.kind == "clip" else "full"
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=v.patch_size,
        vision_feature_select_strategy=strategy, chat_template=tokenizer.chat_template, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if v.kind == "clip" else 0)
  image_processor = transformers.Idefics3ImageProcessorPil(
      size={"longest_edge": data.max_image_size or 4 * v.image_size}, max_image_size={"longest_edge": v.image_size},
      # Unsplit images: HF squares them to max_image_size after the optional longest-edge resize; our
      # pipeline resizes once, straight to the tile, so the longest-edge step is switched off.
      do_image_splitting=data.image_splitting, do_resize=data.image_splitting, **common)
  return transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                        image_seq_len=cfg.image_tokens_per_tile,
                                        chat_template=tokenizer.chat_template)


# ---------------------------------------------------------------------------------------------------
# Export


def export(params: Any, model_config: ModelConfig, tokenizer_dir: str | pathlib.Path, out_dir: str | pathlib.Path,
           *, dtype: str = "float32", fmt: str = "hf", data: DataConfig = DataConfig(), padding_side: str = "left",
           max_shard_size: str = "5GB") -> pathlib.Path:
  """Writes `out_dir` (see the module docstring) and returns it.

  params: the model's params (scanned or unscanned), fully addressable on this host (gather them first on a
  multi-host mesh). dtype: float32 | bfloat16 | float16 of the written tensors. data: image processor settings
  (resample, max_image_size, image_splitting). padding_side: of the exported tokenizer (left for batched
  generation).
  """
  if is_remote(out_dir):  # transformers and safetensors write local files: write them here, then copy them up
    with tempfile.TemporaryDirectory() as tmp:
      export(params, model_config, tokenizer_dir, tmp, dtype=dtype, fmt=fmt, data=data, padding_side=padding_side,
             max_shard_size=max_shard_size)
      return upload(tmp, out_dir)
  import torch
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if fmt not in ("hf", "torch"):
    raise ValueError(f"fmt={fmt!r}: choose 'hf' (transformers directory) or 'torch' (plain state_dict).")
  family = hf_config.check_exportable(model_config)
  state = hf_state_dict(params, model_config, dtype)
  if fmt == "torch":
    from safetensors.torch import save_file
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "family": family})
    entries = [dict(ours=e.ours, hf=e.hf, transform=e.transform, shape=list(e.shape), n_in=e.n_in)
               for e in hf_names.model_entries(model_config)]
    (out / NAME_MAP_FILE).write_text(json.dumps({"family": family, "entries": entries}, indent=1) + "\n")
    return out

  import transformers
  tokenizer = hf_tokenizer(tokenizer_dir, padding_side)
  ours = Tokenizer.load(tokenizer_dir)
  if ours.image_id != model_config.image_token_id:
    raise hf_config.ConversionError(f"The tokenizer's {IMAGE_TOKEN} id is {ours.image_id} but "
                                    f"model.image_token_id={model_config.image_token_id}.")
  if ours.vocab_size > model_config.decoder.vocab_size:
    raise hf_config.ConversionError(f"The tokenizer has {ours.vocab_size} tokens, more than the decoder's "
                                    f"vocab_size={model_config.decoder.vocab_size}.")
  eos = eos_ids(ours)
  ids = dict(bos_id=ours.bos_id, eos_id=eos, pad_id=ours.pad_id)
  config = hf_config.to_hf(model_config, **ids)
  config.dtype = dtype
  with torch.device("meta"):
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
  if model_config.decoder.tie_embeddings:  # HF lists the tied head as its own key
    state["lm_head.weight"] = state[next(k for k in state if k.endswith("embed_tokens.weight"))]
  model.load_state_dict(state, strict=True, assign=True)  # raises on any missing / unexpected key
  model.tie_weights()
  # Ids past the tokenizer (vocab padded for sharding) are never generated, as in vlm_jax.generate.
  padded = list(range(ours.vocab_size, model_config.decoder.vocab_size)) or None
  model.generation_config = transformers.GenerationConfig(
      bos_token_id=ids["bos_id"], eos_token_id=eos, pad_token_id=ids["pad_id"], suppress_tokens=padded)
  model.save_pretrained(out, max_shard_size=max_shard_size)
  hf_processor(model_config, tokenizer, data).save_pretrained(out)
  return out


def is_remote(path: str | pathlib.Path) -> bool:
  """gs:// and other URLs (etils.epath reads and writes them), not paths on this machine."""
  return "://" in str(path)


def upload(local_dir: str | pathlib.Path, out_dir: str | pathlib.Path) -> epath.Path:
  """Copies every file under `local_dir` to the same relative path under `out_dir` (local or gs://)."""
  out = epath.Path(out_dir)
  for path in sorted(pathlib.Path(local_dir).rglob("*")):
    if path.is_file():
      target = out / path.relative_to(local_dir).as_posix()
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(path.read_bytes())
  return out


def eos_ids(tokenizer: Tokenizer) -> list[int]:
  """Ids generation stops at: `<|im_end|>` (ChatML turn end; a model with its own template may lack it) and the
  tokenizer's eos."""
  im_end = tokenizer.token_to_id(IM_END)
  return ([] if im_end is None else [im_end]) + ([tokenizer.eos_id] if tokenizer.roles.get("eos") else [])


def export_workdir(workdir: str | pathlib.Path, out_dir: str | pathlib.Path, *, stage: str | None = None,
                   dtype: str = "float32", fmt: str = "hf", part: str = "merged") -> pathlib.Path:
  """Exports the params of `stage` (default: the last finished one) of a vlm_jax workdir. part (LoRA stages):
  merged (the adapters folded into the model), adapter (a PEFT adapter directory, vlm_jax/convert/peft.py, with
  the stage's fully trained params as modules_to_save) or base (the model without its adapters)."""
  import jax
  from vlm_jax import sharding, workdir as workdir_lib
  from vlm_jax.config import InputError, MeshConfig
  from vlm_jax.model import lora
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])  # gathered on one device of this host
  config, params, _ = workdir_lib.load(workdir, stage, mesh=mesh, merge=part == "merged")
  params = jax.tree.map(np.asarray, params)
  if part != "merged":
    stage_config = config.train.stage(stage or workdir_lib.last_finished_stage(workdir, config))
    params, adapters = lora.split(params)
    if adapters is None:
      raise InputError(f"Stage {stage_config.name!r} of {workdir} has no LoRA adapters (lora.rank=0): export it "
                       "without --adapter / --base.")
    params = lora.dequantized(params, adapters)  # a quantize_base stage's int8 kernels: float32 again
    if part == "adapter":
      from vlm_jax.convert import peft
      trained = lora.trained_in_full(params, stage_config.trainable, stage_config.lora)
      stacked = (lambda p: re.sub(r"/layers_\d+/", "/layers/", p)) if config.model.scan_layers else (lambda p: p)
      full = {p: x for p, x in hf_names.flatten(params).items() if stacked(p) in trained}
      if is_remote(out_dir):
        with tempfile.TemporaryDirectory() as tmp:
          peft.save_adapter(tmp, adapters, stage_config.lora, config.model, full)
          return upload(tmp, out_dir)
      return peft.save_adapter(out_dir, adapters, stage_config.lora, config.model, full)
  return export(params, config.model, epath.Path(workdir) / workdir_lib.TOKENIZER_DIR, out_dir, dtype=dtype,
                fmt=fmt, data=config.data)


def hf_generate(hf_dir: str | pathlib.Path, images: list[np.ndarray], prompt: str, *,
                max_new_tokens: int = 32) -> tuple[str, list[int]]:
  """Greedy answer of an exported model under transformers (AutoProcessor + AutoModelForImageTextToText) to one
  user turn: `prompt` with `<image>` placeholders (images are put first when it has none). Returns the text
  and the generated ids without the stop token, the same shape `vlm_jax.generate` returns."""
  import torch
  import transformers
  processor = transformers.AutoProcessor.from_pretrained(hf_dir)
  model = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
  if IMAGE_TOKEN not in prompt:
    prompt = f"{IMAGE_TOKEN}\n" * len(images) + prompt  # as vlm_jax.inputs.examples puts them
  messages = [{"role": "user", "content": prompt}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  inputs = processor(images=[list(images)] if images else None, text=[text], return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
  ids = out[0, inputs["input_ids"].shape[1]:].tolist()
  stops = set(model.generation_config.eos_token_id or [])
  if ids and ids[-1] in stops:
    ids = ids[:-1]
  return processor.tokenizer.decode(ids), ids
