"""Compose a VLM workdir from two Hugging Face checkpoints: a vision tower and a causal LM, joined by a new projector.

    vlm-jax init --config C --workdir W --vision HF_DIR --decoder HF_DIR [--set ...]

writes W as `import-hf` does: W/config.json, W/tokenizer/ and the finished stage "init" (Orbax) with the params:
  - vision: a SiglipVisionModel, a SiglipModel's vision half, a CLIPVisionModel or a CLIPModel's vision half,
    tensors as they are;
  - decoder: a LlamaForCausalLM (Llama, SmolLM2), tensors as they are;
  - projector: C's kind, freshly initialised (seed C.seed);
  - tokenizer: the LM's tokenizer.json with the special tokens the prompts need appended (`<image>`, ChatML's
    two when the LM lacks them, Idefics3's image tags for a pixel-shuffle projector: vlm_jax/convert/hf_tokens.py);
    each new embedding row (and lm_head column) is the mean of the existing ones, the usual neutral start.
Shapes come from the checkpoints (config.json, the image processor's mean/std, the tokenizer's size) and replace
C's; each value that changes is logged. A CLIP tower is read the LLaVA-1.5 way: layer -2, CLS dropped, no
post-layernorm. C supplies the rest: projector, data, stages. A `--set` of a shape that contradicts a
checkpoint is an InputError naming the key, both values and the file.

`vlm-jax train --config C --workdir W` runs C's stages from the init stage (`train_config`): W/init/towers.json
records what the checkpoints decided, and the stages become ("init", *C's stages), so the first of C's stages
starts from the init params.

The LM's chat template: vlm_jax trains and generates in ChatML. An LM whose template is ChatML (SmolLM2-Instruct)
needs no new tokens; one without a template or with another one (Llama-2) gets `<|im_start|>`/`<|im_end|>` and
is trained in ChatML, which is logged.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import linen as nn

from vlm_jax import checkpoint
from vlm_jax import config as config_lib
from vlm_jax.config import Config, InputError, StageConfig
from vlm_jax.convert import hf_tokens, load
from vlm_jax.inputs import files
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.model.projector import Projector

INIT_STAGE = "init"
TOWERS_FILE = "towers.json"  # in W/init/: {"values": {dotted key: value}, "sources": {dotted key: file}}

VISION_KEYS = ("kind", "image_size", "patch_size", "num_channels", "width", "depth", "num_heads", "mlp_dim",
               "layer_norm_eps", "act")
CLIP_READING = {"feature_layer": -2, "select_strategy": "default", "post_layernorm": False}  # LLaVA-1.5
DECODER_KEYS = ("vocab_size", "width", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "rope_theta", "rms_norm_eps", "tie_embeddings", "max_seq_len")


def towers(config: Config, vision_dir: str | os.PathLike, decoder_dir: str | os.PathLike,
           tokenizer_path: str) -> tuple[dict[str, Any], dict[str, str], Tokenizer, list[str]]:
  """What the two checkpoints decide, read from their configs and tokenizer (no tensors):
  ({dotted config key: value}, {dotted config key: the file it comes from}, the tokenizer with its new special
  tokens, the tokens added)."""
  vision_dir, decoder_dir = epath.Path(vision_dir), epath.Path(decoder_dir)
  values, sources = {}, {}

  def put(key: str, value: Any, source: epath.Path | str) -> None:
    values[key], sources[key] = value, str(source)

  vision = load.vision_config(vision_dir)
  for key in VISION_KEYS:
    put(f"model.vision.{key}", getattr(vision, key), vision_dir / "config.json")
  processor = next((vision_dir / n for n in ("preprocessor_config.json", "processor_config.json")
                    if (vision_dir / n).exists()), None)
  if processor is not None:
    put("model.vision.image_mean", vision.image_mean, processor)
    put("model.vision.image_std", vision.image_std, processor)
  if vision.kind == "clip":
    for key, value in CLIP_READING.items():
      put(f"model.vision.{key}", value, f"{vision_dir / 'config.json'} (a CLIP tower, read as LLaVA-1.5 does)")
  decoder = load.llama_config(decoder_dir)
  for key in DECODER_KEYS:
    put(f"model.decoder.{key}", getattr(decoder, key), decoder_dir / "config.json")
  tok = load.read_tokenizer(decoder_dir)
  # The pipeline renders ChatML whatever the LM's own template is (module docstring).
  needed = hf_tokens.needed_tokens(None, config.model.projector.kind, config.data.image_splitting)
  added = hf_tokens.missing_tokens(tok, needed)
  tok.add_special_tokens(needed)
  tokenizer_file = decoder_dir / "tokenizer.json"
  # The embedding grows to the tokenizer (a checkpoint's padded rows, more than its tokens, stay).
  put("model.decoder.vocab_size", max(decoder.vocab_size, tok.vocab_size), tokenizer_file)
  put("model.image_token_id", tok.image_id, tokenizer_file)
  for key, value in (("kind", "hf"), ("path", tokenizer_path), ("vocab_size", tok.vocab_size)):
    put(f"data.tokenizer.{key}", value, tokenizer_file)
  return values, sources, tok, added


def compose(config: Config, overrides: list[str] | tuple[str, ...], values: dict[str, Any],
            sources: dict[str, str]) -> tuple[Config, list[str]]:
  """`config` (C with `overrides` applied) with the checkpoints' `values` in place of C's, and the stage "init"
  first -> (validated Config, one line per value changed). An override of a key in `values` must agree."""
  set_keys = {item.split("=", 1)[0].strip() for item in overrides}
  for key in sorted(set_keys & set(values)):
    if not _same(_get(config, key), values[key]):
      raise InputError(f"--set {key}={_get(config, key)!r} contradicts the checkpoint: {sources[key]} gives "
                       f"{values[key]!r}. Drop the --set (init takes tower shapes from the checkpoints) or pass "
                       "another checkpoint.")
  changes = [f"{key}: {_get(config, key)!r} -> {value!r} (from {sources[key]})" for key, value in values.items()
             if not _same(_get(config, key), value)]
  for key, value in values.items():
    config = _set(config, key, tuple(value) if isinstance(value, list) else value)
  if any(s.name == INIT_STAGE for s in config.train.stages):
    raise InputError(f"Config {config.name!r} has a stage named {INIT_STAGE!r}, the name vlm-jax init gives its "
                     "own stage; rename that stage.")
  init_stage = StageConfig(name=INIT_STAGE, steps=0, checkpoint_every=1, max_to_keep=1)
  config = dataclasses.replace(config, train=dataclasses.replace(
      config.train, stages=(init_stage,) + tuple(config.train.stages)))
  return config_lib.validate(config), changes


def init(config_name: str, workdir: str | os.PathLike, vision_dir: str | os.PathLike,
         decoder_dir: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
         log: Callable[[str], None] = print) -> Config:
  """Writes workdir W (module docstring) and returns the Config saved in W/config.json."""
  workdir = checkpoint.absolute(workdir)
  if checkpoint.finished_step(workdir, INIT_STAGE) is not None:
    raise InputError(f"{workdir} is already initialised ({checkpoint.stage_dir(workdir, INIT_STAGE)} is finished): "
                     "train it with `vlm-jax train --config ... --workdir ...`, or init into a new --workdir.")
  user = config_lib.load(config_name, overrides)
  values, sources, tok, added = towers(user, vision_dir, decoder_dir, str(workdir / "tokenizer"))
  config, changes = compose(user, overrides, values, sources)
  for line in changes:
    log(line)
  template = hf_tokens.chat_template(decoder_dir)
  if not hf_tokens.is_chatml(template):
    log(f"{decoder_dir}: the LM's chat template is not ChatML; vlm_jax trains and generates in ChatML")
  if added:
    log(hf_tokens.added_message(added, tok))
  params = load_params(config, vision_dir, decoder_dir, tuple(hf_tokens.needed_tokens(
      None, config.model.projector.kind, config.data.image_splitting)))
  load.write_workdir(workdir, config, params, tok, config.train.stages[0])
  (checkpoint.stage_dir(workdir, INIT_STAGE) / TOWERS_FILE).write_text(
      json.dumps({"values": values, "sources": sources}, indent=1) + "\n")
  return config


def load_params(config: Config, vision_dir: str | os.PathLike, decoder_dir: str | os.PathLike,
                add_tokens: tuple[str, ...]) -> dict[str, Any]:
  """{vision, projector, decoder} float32 numpy params: the towers' tensors, a fresh projector."""
  m = config.model
  v = m.vision
  vision_cfg, vision = load.load_vision(vision_dir, feature_layer=v.feature_layer, select_strategy=v.select_strategy,
                                        post_layernorm=v.post_layernorm, scan_layers=m.scan_layers)
  decoder_cfg, decoder, _ = load.load_llama(decoder_dir, scan_layers=m.scan_layers, add_tokens=add_tokens)
  for what, got, want, keys in (("vision", vision_cfg, v, VISION_KEYS), ("decoder", decoder_cfg, m.decoder,
                                                                          DECODER_KEYS)):
    if any(getattr(got, k) != getattr(want, k) for k in keys):  # the files changed since `towers` read them
      raise InputError(f"init: the {what} checkpoint's config.json changed while init read it; run init again.")
  features = jnp.zeros((1, v.tokens_per_image, v.width), jnp.float32)  # [B, T, W], what the vision tower gives
  projector = nn.unbox(Projector(m.projector, m.decoder.width).init(jax.random.PRNGKey(config.seed), features))
  return {"vision": vision, "projector": jax.tree.map(np.asarray, projector["params"]), "decoder": decoder}


def train_config(config_name: str, overrides: list[str] | tuple[str, ...], workdir: str | os.PathLike) -> Config:
  """The Config `vlm-jax train --config C --workdir W` runs: C with `overrides`, and, when W was written by
  `vlm-jax init`, the checkpoints' values of W/init/towers.json and the stage "init" first (as `init` composed it)."""
  user = config_lib.load(config_name, overrides)
  record = checkpoint.stage_dir(workdir, INIT_STAGE) / TOWERS_FILE
  if not record.exists():
    return user
  saved = files.read_json(record, "vlm-jax init record", f"run vlm-jax init again into {workdir}")
  return compose(user, overrides, saved["values"], saved["sources"])[0]


def _get(config: Any, key: str) -> Any:
  for part in key.split("."):
    config = getattr(config, part)
  return config


def _set(config: Any, key: str, value: Any) -> Any:
  head, _, rest = key.partition(".")
  if not rest:
    return dataclasses.replace(config, **{head: value})
  return dataclasses.replace(config, **{head: _set(getattr(config, head), rest, value)})


def _same(a: Any, b: Any) -> bool:
  norm = lambda x: tuple(x) if isinstance(x, (list, tuple)) else x
  return norm(a) == norm(b)
