"""Typed, frozen configs and `load(config, overrides)`.

A config file is a Python module with `get_config() -> Config` (big_vision style). Overrides use dotted
paths; stages are addressed by name: `train.stages.align.steps=100`. Unknown keys and wrong types are
errors that name the key, the expected type and the closest valid keys. Nothing mutates a config after
load: overrides build new frozen dataclasses with `dataclasses.replace`.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
import typing
from typing import Any

from vlm_jax import cpu_features

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
  """A config or an override is invalid; the message says where and what to do."""


class InputError(ValueError):
  """Other bad input from the user (an unreadable image, a dataset option, a prompt that does not fit its
  images, a missing launch flag); the message says what was wrong, where, and what to do. The `vlm-jax` command
  prints it in one line, as it does a ConfigError, a missing file or a bad path."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT encoder. kind: 'siglip' (no CLS, post-LN, tanh GELU), 'clip' (CLS, pre-LN, quick GELU) or
  'none' (Fuyu-style: patches go through one linear patch embedding straight to the projector)."""
  kind: str = "siglip"
  image_size: int = 48
  patch_size: int = 8
  num_channels: int = 3
  width: int = 128
  depth: int = 3
  num_heads: int = 4
  mlp_dim: int = 512
  layer_norm_eps: float = 1e-6
  act: str = "gelu_tanh"  # gelu_tanh | quick_gelu | gelu
  # Index into hidden_states (0 = embeddings after pre-LN, i = output of block i, -1 = last block),
  # as in LLaVA's `vision_feature_layer`.
  feature_layer: int = -1
  select_strategy: str = "full"  # full | default (drop CLS), LLaVA's vision_feature_select_strategy
  # Init of the (learned) position embedding: 'normal' (std width^-0.5) or 'sincos2d' (big_vision's fixed 2-D
  # sin/cos table, as large as the patch embeddings, so patch features keep where they are).
  pos_embed_init: str = "normal"
  post_layernorm: bool = False  # apply post_layernorm to the selected features (Idefics3 does)
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + (1 if self.kind == "clip" else 0)

  @property
  def tokens_per_image(self) -> int:
    """Vision tokens handed to the projector per tile."""
    if self.kind == "clip" and self.select_strategy == "full":
      return self.num_patches + 1
    return self.num_patches


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """kind: 'mlp' (linear -> act -> linear, LLaVA-1.5) or 'pixel_shuffle' (space-to-depth by
  scale_factor, then a bias-free linear; nanoVLM/Idefics3)."""
  kind: str = "mlp"
  act: str = "gelu"
  scale_factor: int = 2


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-experts MLPs (Mixtral-style top-k routing; vlm_jax/model/moe.py). num_experts=0: dense.

  Layer i (0-based) is MoE iff (i + 1) % every_n_layers == 0. With scan_layers and every_n_layers > 1 the
  scan runs over groups of every_n_layers layers (n-1 dense + 1 MoE), so num_layers must be a multiple.
  """
  num_experts: int = 0
  experts_per_token: int = 2  # top-k
  every_n_layers: int = 1  # 1: every layer is MoE
  expert_mlp_dim: int = 0  # hidden size of each expert's SwiGLU; 0: decoder.mlp_dim
  capacity_factor: float = 0.0  # 0.0: dropless (capacity = tokens per row); else ceil(S * k / E * factor)
  router_aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
  router_z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Llama-family decoder: RMSNorm (fp32), half-split RoPE, GQA, SwiGLU."""
  vocab_size: int = 512
  width: int = 192
  num_layers: int = 3
  num_heads: int = 6
  num_kv_heads: int = 2
  head_dim: int = 0  # 0 means width // num_heads
  mlp_dim: int = 512
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  moe: MoeConfig = MoeConfig()
  # The dense MLP runs on this many consecutive pieces of the sequence, one after another (the same result):
  # the [tokens, mlp_dim] float32 products of a piece stay in cache. A CPU setting: bench_cpu's train step
  # was 5-8% faster with 2 pieces of 1024 tokens, no faster with 4. A sequence it does not divide (decoding)
  # runs whole.
  mlp_chunks: int = 1

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.width // self.num_heads

  @property
  def resolved_expert_mlp_dim(self) -> int:
    return self.moe.expert_mlp_dim or self.mlp_dim

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer i (0-based) has a mixture-of-experts MLP."""
    return self.moe.num_experts > 0 and (i + 1) % self.moe.every_n_layers == 0


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  """Text tower and temperature for CLIP/SigLIP-style pretraining of the ViT (stage loss 'contrastive')."""
  enabled: bool = False
  loss: str = "clip"  # clip (symmetric InfoNCE) | siglip (pairwise sigmoid)
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  embed_dim: int = 128  # shared image/text embedding size
  max_text_len: int = 32
  # Per image, up to this many of its record's `negative_captions` join the batch's texts as extra negatives
  # (NegCLIP-style hard negatives); 0 uses none.
  hard_negatives: int = 0
  # global: one pooled embedding (image_pool) per image and per text | token: per-patch and per-token embeddings
  # compared by late interaction (losses.similarity)
  similarity: str = "global"
  # global similarity's image pooling: map (big_vision's attention pooling + MLP) | gap (the mean of the patch
  # features, so the image embedding is linear in them and what the text asks for must be linear in the patches)
  image_pool: str = "map"
  init_temperature: float = 10.0  # logit scale starts at log(init_temperature)
  init_bias: float = -10.0  # SigLIP only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: VisionConfig = VisionConfig()
  projector: ProjectorConfig = ProjectorConfig()
  decoder: DecoderConfig = DecoderConfig()
  contrastive: ContrastiveConfig = ContrastiveConfig()
  image_token_id: int = 4  # id of `<image>`; image features replace these embeddings in order
  # compute dtype: float32 | bfloat16 | auto (vlm_jax/cpu_features.py); params stay float32. W/config.json keeps
  # "auto": each machine that trains or loads the workdir resolves it itself (and logs what it chose).
  dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"  # none | full | dots | minimal | save_dot_except_mlp | save_qkv_proj | offload_dot_except_mlp
  kernels: str = "auto"  # auto | cpu | plain | tpu: the backend's kernels (vlm_jax/model/kernels)

  @property
  def compute_dtype(self) -> str:
    """The dtype the model computes in: `dtype`, with 'auto' resolved for this machine (cpu_features.resolve)."""
    return cpu_features.resolve(self.dtype)[0]

  @property
  def image_tokens_per_tile(self) -> int:
    """`<image>` tokens per tile in the prompt = projector outputs per tile."""
    n = self.vision.tokens_per_image
    if self.projector.kind == "pixel_shuffle":
      n //= self.projector.scale_factor ** 2
    return n


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh. ICI axes within a slice, DCN axes across slices; -1 fills with remaining devices."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1  # shards the experts of MoE layers (and, like data, the batch)
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1
  dcn_expert: int = 1


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  kind: str = "sentencepiece"  # sentencepiece | hf (tokenizer.json)
  path: str = ""  # empty: the model trained at prepare time and stored with the dataset
  vocab_size: int = 512  # for a tokenizer trained at prepare time


@dataclasses.dataclass(frozen=True)
class DataConfig:
  data_dir: str = "~/tensorflow_datasets"
  tokenizer: TokenizerConfig = TokenizerConfig()
  seq_len: int = 256
  max_tiles: int = 2  # tile slots per batch row; unused slots are masked
  image_splitting: bool = False  # Idefics3 tiling (pixel-shuffle models) vs one tile per image
  max_image_size: int = 0  # splitting: longest edge is resized (up or down) to this, HF size.longest_edge (0: 4 * image_size)
  resample: str = "bicubic"  # bicubic | bilinear | nearest | lanczos (Idefics3)
  # One tile per image (no splitting): square = resize to image_size x image_size (SigLIP, Idefics3);
  # shortest_edge_crop = CLIPImageProcessor: shortest edge to image_size (aspect kept), then the centre square.
  image_resize: str = "square"
  packing: bool = False
  padding_side: str = "right"  # right | left
  shuffle_seed: int = 0
  # Records are decoded, tiled and tokenized by read_threads threads in each of num_workers grain worker processes
  # (0: in the main process). Threads overlap image decoding (PIL frees the GIL); workers add CPU cores. The data
  # order depends on num_workers (each worker batches its own slice of records): keep it fixed for a run.
  # A TPU VM host has 100+ vCPUs; `vlm-jax bench --loader` says whether a config's loader keeps up with its step.
  num_workers: int = 0
  read_threads: int = 16
  # Keep every training record in memory once decoded, for all stages of the process: for datasets that fit
  # (shapes_vqa's 20000 train records: about 330 MB). Reading and decoding a record costs 0.4 ms of a CPU.
  cache_records: bool = False
  # Data shards of the global batch (vlm_jax/inputs/shards.py); 0: the resumed checkpoint's count, else one per
  # process. A fixed count keeps the data order the same on any number of hosts dividing it.
  num_shards: int = 0
  # Tile budget (0: off, the ViT runs on every tile slot, padding included): the ViT runs on at most
  # tile_budget * r tiles for each r rows of one batch shard (one device's rows of a micro-batch), so tile_budget
  # is real tiles per row on average, in max_tiles' units (rows with no more slots than that run them all). The
  # loader packs rows into such shards, defers a row that would overflow one (the shard is topped up with empty
  # rows) and counts both (vlm_jax/inputs/tile_budget.py); the train step gathers the real tiles per shard
  # (vlm_jax/model/vlm.py).
  tile_budget: int = 0


# The decoder's attention and MLP kernels (dense or MoE experts), scanned (`layers`) or not (`layers_<i>`).
LORA_DECODER = r"decoder/layers(_\d+)?/(attn/[qkvo]_proj/kernel|mlp/(gate|up|down)/kernel|moe/experts/(gate_up|down))"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters of a stage (vlm_jax/model/lora.py): kernel W -> W + alpha / rank * A @ B, only A and B train.
  `targets` regexes fully match '/'-joined kernel paths (as `trainable` does); the targeted kernels stay frozen
  whatever `trainable` says. merge_at_end: the next stage gets W + alpha / rank * A @ B as its base (else it
  continues these adapters when its lora config is the same but for dropout, and merges them otherwise)."""
  rank: int = 0  # 0: no adapters
  alpha: float = 16.0
  targets: tuple[str, ...] = (LORA_DECODER,)
  merge_at_end: bool = False
  # PEFT's lora_dropout, on the adapter branch's input while training: y = x W + dropout(x) A B alpha / rank (eval
  # and generation fold the adapters). Masks are keyed by fold_in(PRNGKey(dropout_seed), step): resume-exact.
  dropout: float = 0.0
  dropout_seed: int = 0
  # QLoRA-style: the targeted base kernels are stored int8 with a float32 scale per output channel (absmax) and
  # dequantized to the compute dtype in the step (vlm_jax/model/quantize.py).
  quantize_base: bool = False


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One training stage. `trainable` regexes match '/'-joined param paths; the rest is frozen."""
  name: str = "train"
  steps: int = 100
  batch_size: int = 32  # global batch, across all hosts
  trainable: tuple[str, ...] = (".*",)
  loss: str = "lm"  # lm (token cross-entropy) | contrastive
  task: str = "conversation"  # conversation | caption | text | image_text
  datasets: tuple[tuple[str, float], ...] = (("shapes_vqa", 1.0),)  # (name, weight) mixture
  split: str = "train"
  # Rows of this stage: tokens and tile slots (0: data.seq_len, data.max_tiles). Shorter rows for a stage whose
  # examples are short (captions) skip the padding; examples that do not fit are dropped and counted.
  seq_len: int = 0
  max_tiles: int = 0
  lr: float = 1e-3
  warmup_steps: int = 10
  end_lr_fraction: float = 0.1  # cosine decays to lr * end_lr_fraction
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  grad_accum: int = 1
  lr_multipliers: tuple[tuple[str, float], ...] = ()  # (regex, multiplier), first match wins
  init_from: str = ""  # "": previous stage's final params; or a workdir[/stage] path
  checkpoint_every: int = 100
  max_to_keep: int = 2
  log_every: int = 10
  # > 0: every eval_every steps, score the model on the first eval_limit records of eval_split (vlm_jax/evaluate.py:
  # each question with images and blind, a caption per record) and log eval/accuracy/<type>, ... with the metrics.
  eval_every: int = 0
  eval_split: str = "validation"
  eval_limit: int = 32
  lora: LoraConfig = LoraConfig()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  stages: tuple[StageConfig, ...] = (StageConfig(),)

  def stage(self, name: str) -> StageConfig:
    for s in self.stages:
      if s.name == name:
        return s
    raise ConfigError(_unknown(name, [s.name for s in self.stages], "stage"))


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "default"
  seed: int = 0
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()


_CHOICES = {
    "model.vision.kind": ("siglip", "clip", "none"),
    "model.vision.act": ("gelu_tanh", "quick_gelu", "gelu"),
    "model.vision.select_strategy": ("full", "default"),
    "model.vision.pos_embed_init": ("normal", "sincos2d"),
    "model.contrastive.image_pool": ("map", "gap"),
    "model.projector.kind": ("mlp", "pixel_shuffle"),
    "model.projector.act": ("gelu", "gelu_tanh", "quick_gelu", "relu"),
    "model.contrastive.loss": ("clip", "siglip"),
    "model.contrastive.similarity": ("global", "token"),
    "model.dtype": cpu_features.DTYPES,
    "model.remat": ("none", "full", "dots", "minimal", "save_dot_except_mlp", "save_qkv_proj",
                    "offload_dot_except_mlp"),
    "model.kernels": ("auto", "cpu", "plain", "tpu"),
    "data.tokenizer.kind": ("sentencepiece", "hf"),
    "data.resample": ("bicubic", "bilinear", "nearest", "lanczos"),
    "data.image_resize": ("square", "shortest_edge_crop"),
    "data.padding_side": ("right", "left"),
}
_STAGE_CHOICES = {"loss": ("lm", "contrastive"), "task": ("conversation", "caption", "text", "image_text")}


def _unknown(key: str, valid: list[str], what: str = "key") -> str:
  close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
  hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
  listing = f" Valid: {', '.join(valid)}." if len(valid) <= 25 else " (`vlm-jax config show C` lists all keys.)"
  return f"Unknown {what} {key!r}.{hint}{listing}"


def row_shape(cfg: Config, stage: StageConfig) -> tuple[int, int]:
  """(tokens, tile slots) of a stage's batch rows: its own seq_len and max_tiles, else data's; text-only stages
  get no tile slots, so the model skips the vision tower."""
  tiles = 0 if stage.task == "text" else (stage.max_tiles or cfg.data.max_tiles)
  return stage.seq_len or cfg.data.seq_len, tiles


# A tile_index entry that names no tile: past every slot, so the model's gather fills zeros and its scatter drops it.
NO_TILE = 2 ** 30


def tile_budget_per_row(cfg: Config, max_tiles: int) -> int:
  """ViT tiles per row (on average over a batch shard) for rows of `max_tiles` slots: data.tile_budget when it
  is below the slots, else 0 (off: every slot goes through the ViT)."""
  return cfg.data.tile_budget if 0 < cfg.data.tile_budget < max_tiles else 0


def validate(cfg: Config) -> Config:
  """Checks choices and cross-field constraints; returns cfg unchanged or raises ConfigError."""
  for path, choices in _CHOICES.items():
    value = _get(cfg, path.split("."))
    if value not in choices:
      raise ConfigError(f"{path}={value!r} is not one of {choices}.")
  names = [s.name for s in cfg.train.stages]
  if len(set(names)) != len(names):
    raise ConfigError(f"train.stages has duplicate names: {names}.")
  for s in cfg.train.stages:
    for field, choices in _STAGE_CHOICES.items():
      if getattr(s, field) not in choices:
        raise ConfigError(f"train.stages.{s.name}.{field}={getattr(s, field)!r} is not one of {choices}.")
    if s.steps < 0 or s.batch_size <= 0 or s.grad_accum <= 0 or s.batch_size % s.grad_accum:
      raise ConfigError(f"train.stages.{s.name}: need steps >= 0 and batch_size > 0 divisible by "
                        f"grad_accum (got steps={s.steps}, batch_size={s.batch_size}, "
                        f"grad_accum={s.grad_accum}).")
    if cfg.data.num_workers < 0 or cfg.data.read_threads < 1:
      raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0 and data.read_threads="
                        f"{cfg.data.read_threads} >= 1.")
    if cfg.data.num_shards < 0 or (cfg.data.num_shards and s.batch_size % cfg.data.num_shards):
      raise ConfigError(f"data.num_shards={cfg.data.num_shards} must be >= 0 and divide "
                        f"train.stages.{s.name}.batch_size={s.batch_size}.")
    if s.seq_len < 0 or s.max_tiles < 0 or s.seq_len > cfg.model.decoder.max_seq_len:
      raise ConfigError(f"train.stages.{s.name}: need 0 <= seq_len <= model.decoder.max_seq_len="
                        f"{cfg.model.decoder.max_seq_len} and max_tiles >= 0 (0: data.seq_len, data.max_tiles); "
                        f"got seq_len={s.seq_len}, max_tiles={s.max_tiles}.")
    if s.loss == "contrastive" and not cfg.model.contrastive.enabled:
      raise ConfigError(f"train.stages.{s.name}.loss='contrastive' needs model.contrastive.enabled=True.")
    if s.lr < 0 or s.warmup_steps < 0 or s.weight_decay < 0 or s.grad_clip < 0:
      raise ConfigError(f"train.stages.{s.name}: lr, warmup_steps, weight_decay and grad_clip must be >= 0 (got "
                        f"lr={s.lr}, warmup_steps={s.warmup_steps}, weight_decay={s.weight_decay}, "
                        f"grad_clip={s.grad_clip}).")
    if s.lora.rank < 0 or (s.lora.rank and (s.lora.alpha <= 0 or not s.lora.targets)):
      raise ConfigError(f"train.stages.{s.name}.lora: need rank >= 0 (0: off) and, with adapters, alpha > 0 and at "
                        f"least one targets regex (got rank={s.lora.rank}, alpha={s.lora.alpha}, "
                        f"targets={s.lora.targets}).")
    if not 0 <= s.lora.dropout < 1 or ((s.lora.dropout or s.lora.quantize_base) and not s.lora.rank):
      raise ConfigError(f"train.stages.{s.name}.lora: need 0 <= dropout < 1, and rank > 0 for dropout or "
                        f"quantize_base (they act on adapters); got dropout={s.lora.dropout}, quantize_base="
                        f"{s.lora.quantize_base}, rank={s.lora.rank}.")
    if s.eval_every < 0 or (s.eval_every and s.eval_limit <= 0):
      raise ConfigError(f"train.stages.{s.name}: need eval_every >= 0 (0: no evaluation while training) and "
                        f"eval_limit > 0 records when evaluating (got eval_every={s.eval_every}, "
                        f"eval_limit={s.eval_limit}).")
  if cfg.data.tile_budget < 0:
    raise ConfigError(f"data.tile_budget={cfg.data.tile_budget} must be >= 0: the real tiles per row, on average, "
                      f"that the ViT runs on (0, or not below a stage's tile slots: off).")
  v, d = cfg.model.vision, cfg.model.decoder
  sizes = {f"model.decoder.{f}": getattr(d, f) for f in ("vocab_size", "width", "num_layers", "num_heads",
                                                           "num_kv_heads", "mlp_dim", "max_seq_len")}
  vision_fields = ("image_size", "patch_size", "width")  # kind 'none' still embeds patches
  if v.kind != "none":
    vision_fields += ("depth", "num_heads", "mlp_dim")
  sizes.update({f"model.vision.{f}": getattr(v, f) for f in vision_fields})
  sizes["data.seq_len"] = cfg.data.seq_len
  for path, size in sizes.items():
    if size <= 0:
      raise ConfigError(f"{path}={size} must be a positive size.")
  if cfg.data.seq_len > d.max_seq_len:
    raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than model.decoder.max_seq_len={d.max_seq_len} "
                      f"(the RoPE / cache length the model is built for): raise max_seq_len or shorten seq_len.")
  if v.image_size % v.patch_size:
    raise ConfigError(f"model.vision.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}.")
  if v.kind != "none" and v.width % v.num_heads:
    raise ConfigError(f"model.vision.width={v.width} is not divisible by num_heads={v.num_heads}.")
  if v.kind != "none" and v.pos_embed_init == "sincos2d" and v.width % 4:
    raise ConfigError(f"model.vision.pos_embed_init='sincos2d' needs a width divisible by 4 (sin and cos of "
                      f"rows and columns), got width={v.width}; use pos_embed_init='normal' or a width like "
                      f"{v.width + 4 - v.width % 4}.")
  if d.mlp_chunks < 1:
    raise ConfigError(f"model.decoder.mlp_chunks={d.mlp_chunks} must be at least 1 (1 runs the MLP on the whole "
                      f"sequence at once).")
  if d.num_heads % d.num_kv_heads:
    raise ConfigError(f"model.decoder.num_heads={d.num_heads} is not a multiple of num_kv_heads={d.num_kv_heads}.")
  if not d.head_dim and d.width % d.num_heads:
    raise ConfigError(f"model.decoder.width={d.width} is not divisible by num_heads={d.num_heads}; set head_dim.")
  _validate_moe(d, cfg.model.scan_layers, cfg.mesh)
  if cfg.data.image_splitting and cfg.model.projector.kind != "pixel_shuffle":
    raise ConfigError("data.image_splitting (Idefics3 tiling) needs model.projector.kind='pixel_shuffle'; "
                      "LLaVA-style MLP models take one tile per image.")
  if cfg.model.projector.kind == "pixel_shuffle":
    side = v.image_size // v.patch_size
    if v.select_strategy == "full" and v.kind == "clip":
      raise ConfigError("pixel_shuffle needs a square patch grid: use select_strategy='default' with CLIP.")
    if side % cfg.model.projector.scale_factor:
      raise ConfigError(f"pixel_shuffle scale_factor={cfg.model.projector.scale_factor} does not divide the "
                        f"{side}x{side} patch grid.")
  return cfg


def _validate_moe(d: DecoderConfig, scan_layers: bool, mesh: MeshConfig) -> None:
  m = d.moe
  if m.num_experts < 0:
    raise ConfigError(f"model.decoder.moe.num_experts={m.num_experts} must be >= 0 (0 = dense MLPs).")
  if not m.num_experts:
    return
  if not 1 <= m.experts_per_token <= m.num_experts:
    raise ConfigError(f"model.decoder.moe.experts_per_token={m.experts_per_token} must be in "
                      f"[1, num_experts={m.num_experts}].")
  if not 1 <= m.every_n_layers <= d.num_layers:
    raise ConfigError(f"model.decoder.moe.every_n_layers={m.every_n_layers} must be in [1, num_layers="
                      f"{d.num_layers}] (layer i is MoE iff (i + 1) % every_n_layers == 0).")
  if scan_layers and d.num_layers % m.every_n_layers:
    raise ConfigError(f"model.decoder.moe.every_n_layers={m.every_n_layers} must divide num_layers="
                      f"{d.num_layers} with scan_layers (the scan repeats a group of every_n_layers layers); "
                      f"change one of them or set model.scan_layers=false.")
  if m.expert_mlp_dim < 0 or m.capacity_factor < 0 or m.router_aux_loss_coef < 0 or m.router_z_loss_coef < 0:
    raise ConfigError(f"model.decoder.moe: expert_mlp_dim, capacity_factor and the loss coefs must be >= 0, got "
                      f"{m}.")
  shards = (mesh.expert if mesh.expert > 0 else 1) * mesh.dcn_expert
  if m.num_experts % shards:
    raise ConfigError(f"model.decoder.moe.num_experts={m.num_experts} is not divisible by the expert mesh axis "
                      f"(mesh.expert * mesh.dcn_expert = {shards}).")


# ---------------------------------------------------------------------------------------------------
# Overrides


def _get(obj: Any, parts: list[str]) -> Any:
  for p in parts:
    obj = _child(obj, p, parts)
  return obj


def _child(obj: Any, part: str, parts: list[str]) -> Any:
  if isinstance(obj, tuple) and obj and all(isinstance(s, StageConfig) for s in obj):
    for s in obj:
      if s.name == part:
        return s
    raise ConfigError(_unknown(part, [s.name for s in obj], "stage"))
  if not dataclasses.is_dataclass(obj):
    raise ConfigError(f"{'.'.join(parts)}: {part!r} is below a leaf value.")
  names = [f.name for f in dataclasses.fields(obj)]
  if part not in names:
    raise ConfigError(_unknown(part, names, f"key in {'.'.join(parts)}:"))
  return getattr(obj, part)


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
  out = []
  if isinstance(obj, tuple) and obj and all(isinstance(s, StageConfig) for s in obj):
    for s in obj:
      out += _all_keys(s, f"{prefix}{s.name}.")
    return out
  for f in dataclasses.fields(obj):
    v = getattr(obj, f.name)
    if dataclasses.is_dataclass(v) or (isinstance(v, tuple) and v and isinstance(v[0], StageConfig)):
      out += _all_keys(v, f"{prefix}{f.name}.")
    else:
      out.append(prefix + f.name)
  return out


def _coerce(key: str, text: str, typ: Any) -> Any:
  """Parses an override string into `typ` (int, float, bool, str, tuple[...])."""
  def fail(why=""):
    raise ConfigError(f"{key}={text!r}: expected {_type_name(typ)}.{' ' + why if why else ''}")
  if typ is str:
    return text
  if typ is bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    fail("Use true or false.")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    fail()
  if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if typ is int and isinstance(value, int) and not isinstance(value, bool):
    return value
  if typing.get_origin(typ) is tuple:
    if isinstance(value, list):
      value = tuple(value)
    if isinstance(value, tuple) and _matches(value, typ):
      return tuple(tuple(v) if isinstance(v, list) else v for v in value)
  fail()


def _matches(value: Any, typ: Any) -> bool:
  origin = typing.get_origin(typ)
  if origin is tuple:
    args = typing.get_args(typ)
    if not isinstance(value, (tuple, list)):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_matches(v, args[0]) for v in value)
    return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
  if typ is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, typ)


def _type_name(typ: Any) -> str:
  return getattr(typ, "__name__", None) if typing.get_origin(typ) is None else str(typ).replace("typing.", "")


def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _replace(obj: Any, parts: list[str], text: str, full: str, root: Config) -> Any:
  head, rest = parts[0], parts[1:]
  if isinstance(obj, tuple):  # stages, addressed by name
    for i, s in enumerate(obj):
      if s.name == head:
        if not rest:
          raise ConfigError(f"{full}: name a field of stage {head!r}, e.g. {full}.steps=100.")
        return obj[:i] + (_replace(s, rest, text, full, root),) + obj[i + 1:]
    raise ConfigError(_unknown(head, [s.name for s in obj], f"stage in {full}:"))
  names = [f.name for f in dataclasses.fields(obj)]
  if head not in names:
    raise ConfigError(_unknown(full, _all_keys(root), "config key"))
  current = getattr(obj, head)
  if rest:
    if not (dataclasses.is_dataclass(current) or isinstance(current, tuple) and current
            and isinstance(current[0], StageConfig)):
      raise ConfigError(f"{full}: {head!r} is a {type(current).__name__} value, it has no sub-keys.")
    return dataclasses.replace(obj, **{head: _replace(current, rest, text, full, root)})
  if dataclasses.is_dataclass(current):
    raise ConfigError(f"{full}: is a group; set one of its keys, e.g. {full}.{dataclasses.fields(current)[0].name}=...")
  typ = _field_types(type(obj))[head]
  return dataclasses.replace(obj, **{head: _coerce(full, text, typ)})


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
  """Applies `key=value` overrides (dotted keys, stages by name) and validates the result."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"Override {item!r} must look like key=value, e.g. train.stages.align.steps=100.")
    key, text = item.split("=", 1)
    key = key.strip()
    cfg = _replace(cfg, key.split("."), text.strip(), key, cfg)
  return validate(cfg)


def load(config: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
  """Loads `configs/NAME.py` (or a path to a .py file), calls its get_config(), applies overrides."""
  path = pathlib.Path(config)
  if path.suffix != ".py":
    path = CONFIGS_DIR / f"{config}.py"
  if not path.exists():
    known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
    raise ConfigError(_unknown(config, known, "config") + f" (looked for {path})")
  spec = importlib.util.spec_from_file_location(f"vlm_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config() function.")
  cfg = module.get_config()
  if not isinstance(cfg, Config):
    raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected vlm_jax.config.Config.")
  return apply_overrides(cfg, overrides)


def to_dict(cfg: Any) -> Any:
  """JSON-friendly nested dict (stages stay a list)."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, tuple):
    return [to_dict(v) for v in cfg]
  return cfg


def from_dict(cls: type, d: dict) -> Any:
  """Inverse of to_dict for a config dataclass (used to read a workdir's saved config.json)."""
  hints = _field_types(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in d:
      continue
    kwargs[f.name] = _from_value(hints[f.name], d[f.name])
  return cls(**kwargs)


def _from_value(typ: Any, v: Any) -> Any:
  if dataclasses.is_dataclass(typ):
    return from_dict(typ, v)
  if typing.get_origin(typ) is tuple:
    args = typing.get_args(typ)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_from_value(args[0], x) for x in v)
    return tuple(_from_value(a, x) for a, x in zip(args, v))
  if typ is float:
    return float(v)
  return v
