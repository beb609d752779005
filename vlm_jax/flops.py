"""Analytic model FLOPs of a forward pass and of a training step, from the config alone.

Conventions (the usual MFU ones, as in PaLM and MaxText):
- Only matmuls count: a [m, k] x [k, n] product is 2*m*k*n FLOPs. Norms, activations, softmax, RoPE,
  embedding gathers and the loss are left out (a few percent at most).
- Every tile slot (`num_tiles` per row, default `data.max_tiles`) goes through the ViT, as the static-shape
  model does, real or masked; under `data.tile_budget` the budget's tiles per row do (what runs). Every
  sequence position goes through the decoder and the lm_head.
- Causal self-attention counts half of the dense S x S score and value products (the work a causal
  kernel does; MaxText does the same). `causal_as_full=True` counts the dense products, which is what
  XLA's cost analysis sees for a dense masked attention. Packed segments do not reduce the count.
- The ViT runs only up to `vision.feature_layer` (e.g. 23 of 24 blocks for LLaVA's -2).
- MoE layers count the router and each token's top-k experts (active FLOPs, as MaxText does); the one-hot
  dispatch / combine einsums (2*B*S*E*C*D each per MoE layer) and the SwiGLU work of empty capacity slots
  (E*C - k*S per row; C = S when dropless) are work the hardware does but not model FLOPs, so MFU from these
  numbers does not reward a wasteful dispatch. Ours + exactly that work = XLA's count (tests/test_flops.py).
- Rematerialization is not counted: these are model FLOPs, not hardware FLOPs.

Backward pass, per matmul with weight W, input X and output Y = X W (forward f FLOPs):
  dW = X^T dY costs f, needed when W is trainable;
  dX = dY W^T costs f, needed when a trainable parameter lies upstream of the matmul's block, or in it.
So a fully trained model costs 3x forward, a frozen block under a trainable one 2x (activation gradients
only), and a frozen block with nothing trainable upstream (the ViT in the align and instruct stages) 1x.
Blocks, in order: ViT patch embedding, ViT layers, projector, decoder layers (+ embedding table),
lm_head. A block's own parameters count as upstream of its matmuls (so the first decoder layer's input
gradient is counted when anything in the decoder trains, as the embedding table needs it), except for the
projector's first matmul, whose input is the frozen-or-not ViT output.
Trainability comes from the stage's `trainable` regexes, fully matched against the parameter paths of
DESIGN.md (scanned layout: `decoder/layers/...`).
"""
from __future__ import annotations

import dataclasses
import re

from vlm_jax.config import Config, StageConfig, VisionConfig, row_shape, tile_budget_per_row


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One matmul of the forward pass over the whole batch. `weight` is the param path of its kernel (None
  for attention's activation x activation products); `block` orders the backward accounting; `entry`
  marks a matmul that reads the block's input, so the block's own parameters are not upstream of it."""
  name: str
  block: str
  weight: str | None
  flops: float
  entry: bool = False


# Each block and the blocks whose outputs it reads (the contrastive text tower has no upstream).
BLOCK_INPUTS = {
    "vision_embed": (), "vision_layers": ("vision_embed",), "projector": ("vision_layers",),
    "decoder_layers": ("projector",), "lm_head": ("decoder_layers",),
    "contrastive_image": ("vision_layers",), "contrastive_text": (),
    "contrastive_logits": ("contrastive_image", "contrastive_text"),
}


def _upstream(block: str) -> set[str]:
  out, todo = set(), list(BLOCK_INPUTS[block])
  while todo:
    b = todo.pop()
    if b not in out:
      out.add(b)
      todo.extend(BLOCK_INPUTS[b])
  return out


def _decoder_prefixes(cfg: Config) -> tuple[str, str | None, str | None]:
  """Param path prefixes of a decoder layer's attention, of a dense-MLP layer and of an MoE layer (None when
  the model has no such layer), following decoder.py's layouts (scanned groups when MoE is interleaved)."""
  d, scan = cfg.model.decoder, cfg.model.scan_layers
  kinds = [d.is_moe_layer(i) for i in range(d.num_layers)]
  if not scan:
    first = lambda moe: f"decoder/layers_{kinds.index(moe)}" if moe in kinds else None
    return "decoder/layers_0", first(False), first(True)
  n = d.moe.every_n_layers
  if not d.moe.num_experts or n == 1:
    return "decoder/layers", None if d.moe.num_experts else "decoder/layers", (
        "decoder/layers" if d.moe.num_experts else None)
  return "decoder/layers/layers_0", "decoder/layers/layers_0", f"decoder/layers/layers_{n - 1}"


def _block_params(cfg: Config) -> dict[str, tuple[str, ...]]:
  """Representative parameter paths per block (DESIGN.md's tree) used to decide what trains."""
  layers = "layers" if cfg.model.scan_layers else "layers_0"
  v = f"vision/{layers}"
  attn, dense_mlp, moe = _decoder_prefixes(cfg)
  mlp_params = tuple(f"{dense_mlp}/{p}" for p in ("mlp/gate/kernel", "mlp/up/kernel", "mlp/down/kernel")
                     ) if dense_mlp else ()
  if moe:
    mlp_params += tuple(f"{moe}/moe/{p}" for p in ("router/kernel", "experts/gate_up", "experts/down"))
  head = "decoder/embed/embedding" if cfg.model.decoder.tie_embeddings else "decoder/lm_head/kernel"
  projector = (("projector/proj/kernel",) if cfg.model.projector.kind == "pixel_shuffle" else
               ("projector/linear_1/kernel", "projector/linear_1/bias", "projector/linear_2/kernel",
                "projector/linear_2/bias"))
  encoder_block = ("ln1/scale", "ln1/bias", "attn/q/kernel", "attn/k/kernel", "attn/v/kernel", "attn/out/kernel",
                   "attn/q/bias", "attn/k/bias", "attn/v/bias", "attn/out/bias", "ln2/scale", "ln2/bias",
                   "mlp/fc1/kernel", "mlp/fc1/bias", "mlp/fc2/kernel", "mlp/fc2/bias")
  map_pool = tuple(f"contrastive/image_pool/{p}" for p in (
      "probe", "q/kernel", "k/kernel", "v/kernel", "out/kernel", "ln/scale", "mlp/fc1/kernel", "mlp/fc2/kernel")
  ) if cfg.model.contrastive.image_pool == "map" else ()  # image_pool='gap' has no params of its own
  return {
      "vision_embed": ("vision/patch_embed/kernel", "vision/patch_embed/bias", "vision/cls_token",
                       "vision/pos_embed", "vision/pre_layernorm/scale", "vision/pre_layernorm/bias"),
      "vision_layers": tuple(f"{v}/{p}" for p in encoder_block) + (
          "vision/post_layernorm/scale", "vision/post_layernorm/bias"),
      "projector": projector,
      "decoder_layers": ("decoder/embed/embedding",) + tuple(f"{attn}/{p}" for p in (
          "attn_norm/scale", "attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel",
          "attn/o_proj/kernel", "mlp_norm/scale")) + mlp_params,
      "lm_head": ("decoder/final_norm/scale", head),
      "contrastive_image": map_pool + ("contrastive/image_proj/kernel",),
      "contrastive_text": ("contrastive/text/embed/embedding", "contrastive/text/pos_embed",
                           "contrastive/text/final_norm/scale", "contrastive/text_proj/kernel") + tuple(
          f"contrastive/text/{layers}/{p}" for p in encoder_block),
      "contrastive_logits": ("contrastive/logit_scale", "contrastive/logit_bias"),
  }


def vision_layers_used(cfg: Config) -> int:
  """ViT blocks whose output the VLM needs: hidden_states[feature_layer], 0 being the embeddings."""
  v = cfg.model.vision
  if v.kind == "none":
    return 0
  return v.depth + 1 + v.feature_layer if v.feature_layer < 0 else v.feature_layer


class _Terms:
  """Collects Matmul terms; add(...) takes the [m, k] x [k, n] sizes and a repeat count."""

  def __init__(self):
    self.items: list[Matmul] = []

  def add(self, name, block, weight, m, k, n, count=1, entry=False):
    self.items.append(Matmul(name, block, weight, 2.0 * m * k * n * count, entry))

  def encoder(self, prefix, block, params, rows, length, width, mlp_dim, count):
    """`count` pre-LN blocks on `rows` tokens in sequences of `length` (dense bidirectional attention)."""
    for proj in ("q", "k", "v", "out"):
      self.add(f"{prefix}.attn.{proj}", block, f"{params}/attn/{proj}/kernel", rows, width, width, count)
    # Scores Q K^T and probabilities x V, summed over heads: [L, W] x [W, L] and [L, L] x [L, W] per sequence.
    self.add(f"{prefix}.attn.scores", block, None, rows, width, length, count)
    self.add(f"{prefix}.attn.values", block, None, rows, length, width, count)
    self.add(f"{prefix}.mlp.fc1", block, f"{params}/mlp/fc1/kernel", rows, width, mlp_dim, count)
    self.add(f"{prefix}.mlp.fc2", block, f"{params}/mlp/fc2/kernel", rows, mlp_dim, width, count)


def _map_pool(t: _Terms, v: VisionConfig, batch_size: int, features: int) -> None:
  """The MAP head of image_pool='map': a learned probe attends over the patches, then a residual MLP."""
  pool = "contrastive/image_pool"
  t.add("contrastive.pool.q", "contrastive_image", f"{pool}/q/kernel", batch_size, v.width, v.width)
  for proj in ("k", "v"):
    t.add(f"contrastive.pool.{proj}", "contrastive_image", f"{pool}/{proj}/kernel", features, v.width, v.width)
  t.add("contrastive.pool.scores", "contrastive_image", None, batch_size, v.width, v.tokens_per_image)
  t.add("contrastive.pool.values", "contrastive_image", None, batch_size, v.tokens_per_image, v.width)
  t.add("contrastive.pool.out", "contrastive_image", f"{pool}/out/kernel", batch_size, v.width, v.width)
  t.add("contrastive.pool.fc1", "contrastive_image", f"{pool}/mlp/fc1/kernel", batch_size, v.width, v.mlp_dim)
  t.add("contrastive.pool.fc2", "contrastive_image", f"{pool}/mlp/fc2/kernel", batch_size, v.mlp_dim, v.width)


def matmuls(cfg: Config, batch_size: int, seq_len: int | None = None, num_tiles: int | None = None, *,
            loss: str = "lm", causal_as_full: bool = False) -> list[Matmul]:
  """The forward matmuls over a whole batch, in forward order.

  loss 'lm': input_ids [batch_size, seq_len], pixel_values [batch_size, num_tiles, H, W, 3]
  (defaults data.seq_len, data.max_tiles; num_tiles=0 is a text-only batch).
  loss 'contrastive': one image and (1 + contrastive.hard_negatives) texts of contrastive.max_text_len
  tokens per row, the [batch, embed] x [embed, batch] similarity matrix and each image's [K] negative logits.
  """
  m = cfg.model
  v, d = m.vision, m.decoder
  layers = "layers" if m.scan_layers else "layers_0"
  t = _Terms()
  if loss == "contrastive":
    num_tiles = 1
  else:
    num_tiles = cfg.data.max_tiles if num_tiles is None else num_tiles
    num_tiles = tile_budget_per_row(cfg, num_tiles) or num_tiles  # the ViT runs on the budget, not the slots
  tiles = batch_size * num_tiles
  if tiles:
    t.add("vision.patch_embed", "vision_embed", "vision/patch_embed/kernel", tiles * v.num_patches,
          v.patch_size * v.patch_size * v.num_channels, v.width)
    t.encoder("vision", "vision_layers", f"vision/{layers}", tiles * v.num_positions, v.num_positions, v.width,
              v.mlp_dim, vision_layers_used(cfg))
  features = tiles * v.tokens_per_image

  if loss == "contrastive":
    c = m.contrastive
    texts = batch_size * (1 + c.hard_negatives)
    t.encoder("contrastive.text", "contrastive_text", f"contrastive/text/{layers}", texts * c.max_text_len,
              c.max_text_len, c.width, c.mlp_dim, c.depth)
    if c.similarity == "token":  # no pooling: every patch and every text token is projected and compared
      t.add("contrastive.image_proj", "contrastive_image", "contrastive/image_proj/kernel", features, v.width,
            c.embed_dim)
      t.add("contrastive.text_proj", "contrastive_text", "contrastive/text_proj/kernel", texts * c.max_text_len,
            c.width, c.embed_dim)
      pairs = batch_size * (batch_size + c.hard_negatives)  # [B, B] similarity matrix + each image's negatives
      t.add("contrastive.logits", "contrastive_logits", None, pairs * c.max_text_len, c.embed_dim,
            v.tokens_per_image)
      return t.items
    if c.image_pool == "map":
      _map_pool(t, v, batch_size, features)
    t.add("contrastive.image_proj", "contrastive_image", "contrastive/image_proj/kernel", batch_size, v.width,
          c.embed_dim)
    t.add("contrastive.text_proj", "contrastive_text", "contrastive/text_proj/kernel", texts, c.width,
          c.embed_dim)
    t.add("contrastive.logits", "contrastive_logits", None, batch_size, c.embed_dim, batch_size)
    if c.hard_negatives:
      t.add("contrastive.negative_logits", "contrastive_logits", None, batch_size, c.embed_dim, c.hard_negatives)
    return t.items

  if tiles:
    if m.projector.kind == "pixel_shuffle":
      s2 = m.projector.scale_factor ** 2
      t.add("projector.proj", "projector", "projector/proj/kernel", features // s2, v.width * s2, d.width, entry=True)
    else:
      t.add("projector.linear_1", "projector", "projector/linear_1/kernel", features, v.width, d.width, entry=True)
      t.add("projector.linear_2", "projector", "projector/linear_2/kernel", features, d.width, d.width)

  seq_len = cfg.data.seq_len if seq_len is None else seq_len
  tokens, hd, width, n = batch_size * seq_len, d.resolved_head_dim, d.width, d.num_layers
  attn, dense_mlp, moe = _decoder_prefixes(cfg)
  t.add("decoder.attn.q_proj", "decoder_layers", f"{attn}/attn/q_proj/kernel", tokens, width, d.num_heads * hd, n)
  for proj in ("k_proj", "v_proj"):
    t.add(f"decoder.attn.{proj}", "decoder_layers", f"{attn}/attn/{proj}/kernel", tokens, width,
          d.num_kv_heads * hd, n)
  attended = seq_len if causal_as_full else seq_len / 2  # keys per query on average under the causal mask
  t.add("decoder.attn.scores", "decoder_layers", None, tokens, d.num_heads * hd, attended, n)
  t.add("decoder.attn.values", "decoder_layers", None, tokens, attended, d.num_heads * hd, n)
  t.add("decoder.attn.o_proj", "decoder_layers", f"{attn}/attn/o_proj/kernel", tokens, d.num_heads * hd, width, n)
  n_moe = sum(d.is_moe_layer(i) for i in range(n))
  if dense_mlp:
    for proj in ("gate", "up"):
      t.add(f"decoder.mlp.{proj}", "decoder_layers", f"{dense_mlp}/mlp/{proj}/kernel", tokens, width, d.mlp_dim,
            n - n_moe)
    t.add("decoder.mlp.down", "decoder_layers", f"{dense_mlp}/mlp/down/kernel", tokens, d.mlp_dim, width, n - n_moe)
  if moe:
    # Active FLOPs: each token through its top-k experts. The one-hot dispatch / combine einsums and empty
    # capacity slots are work the hardware does but not model FLOPs (as MaxText counts MoE).
    e, k, f = d.moe.num_experts, d.moe.experts_per_token, d.resolved_expert_mlp_dim
    t.add("decoder.moe.router", "decoder_layers", f"{moe}/moe/router/kernel", tokens, width, e, n_moe)
    t.add("decoder.moe.gate_up", "decoder_layers", f"{moe}/moe/experts/gate_up", tokens * k, width, 2 * f, n_moe)
    t.add("decoder.moe.down", "decoder_layers", f"{moe}/moe/experts/down", tokens * k, f, width, n_moe)
  head = "decoder/embed/embedding" if d.tie_embeddings else "decoder/lm_head/kernel"
  t.add("decoder.lm_head", "lm_head", head, tokens, width, d.vocab_size)
  return t.items


def forward_flops(cfg: Config, batch_size: int, seq_len: int | None = None, num_tiles: int | None = None, *,
                  loss: str = "lm", causal_as_full: bool = False) -> float:
  """Matmul FLOPs of one forward pass over the batch (see `matmuls` and the module docstring)."""
  return sum(mm.flops for mm in matmuls(cfg, batch_size, seq_len, num_tiles, loss=loss,
                                        causal_as_full=causal_as_full))


def is_trainable(path: str, trainable: tuple[str, ...]) -> bool:
  """A param path trains when one of the stage's regexes matches it whole."""
  return any(re.fullmatch(rx, path) for rx in trainable)


def _stage(cfg: Config, stage: StageConfig | str | None) -> StageConfig:
  if isinstance(stage, StageConfig):
    return stage
  return cfg.train.stage(stage) if stage else cfg.train.stages[-1]


def _step_shape(cfg: Config, stage: StageConfig | str | None, batch_size: int | None, seq_len: int | None,
                num_tiles: int | None) -> tuple[StageConfig, int, int, int]:
  """The defaults of a train step's shape: the stage's batch_size and the row shape its loader fills."""
  stage = _stage(cfg, stage)
  row_tokens, row_tiles = row_shape(cfg, stage)
  return (stage, stage.batch_size if batch_size is None else batch_size, row_tokens if seq_len is None else seq_len,
          row_tiles if num_tiles is None else num_tiles)


def train_step_breakdown(cfg: Config, stage: StageConfig | str | None = None, batch_size: int | None = None,
                         seq_len: int | None = None, num_tiles: int | None = None) -> dict[str, float]:
  """FLOPs of one training step (all micro-batches), forward + backward, per block and 'total'.

  Defaults: the last stage, its global batch_size and the row shape its loader fills (`config.row_shape`: its
  seq_len and tile slots, else data's; no tile slots for 'text').
  """
  stage, batch_size, seq_len, num_tiles = _step_shape(cfg, stage, batch_size, seq_len, num_tiles)
  out = dict.fromkeys(BLOCK_INPUTS, 0.0)
  for mm, times in _step_matmuls(cfg, stage, batch_size, seq_len, num_tiles):
    out[mm.block] += mm.flops * times
  out = {b: f for b, f in out.items() if f}
  out["total"] = sum(out.values())
  return out


def _step_matmuls(cfg: Config, stage: StageConfig, batch_size: int, seq_len: int, num_tiles: int):
  """Yields (forward matmul, how many times its FLOPs count in a train step: 1 + its backward products)."""
  trains = {b: any(is_trainable(p, stage.trainable) for p in paths) for b, paths in _block_params(cfg).items()}
  before = {b: any(trains[u] for u in _upstream(b)) for b in BLOCK_INPUTS}
  for mm in matmuls(cfg, batch_size, seq_len, num_tiles, loss=stage.loss):
    weight_grad = mm.weight is not None and is_trainable(mm.weight, stage.trainable)
    input_grad = before[mm.block] or (trains[mm.block] and not mm.entry)
    if mm.block == "vision_embed":
      input_grad = False  # nothing needs d(pixels)
    if mm.weight is None:  # scores / values: both operands are activations, each gets a gradient
      yield mm, 3 if input_grad else 1
    else:
      yield mm, 1 + weight_grad + input_grad


KERNEL_MIN_BLOCK = 128  # vlm_jax/model/kernels/tpu.py's MIN_BLOCK: shorter sequences keep XLA's attention


def attention_kernel_flops(cfg: Config, stage: StageConfig | str | None = None, batch_size: int | None = None,
                           seq_len: int | None = None, num_tiles: int | None = None) -> float:
  """Model FLOPs of a train step's self-attention products (scores and values) that run in the TPU splash kernel
  (model.kernels=tpu): custom calls, which XLA's cost analysis does not count. The decoder's causal attention
  (rows in whole 128 blocks) and the ViT's (at least 128 positions). Each counts as in train_step_breakdown,
  plus one more forward under remat where a backward runs (the kernel's output is no dot a policy can save).
  Defaults as in train_step_breakdown."""
  stage, batch_size, seq_len, num_tiles = _step_shape(cfg, stage, batch_size, seq_len, num_tiles)
  if stage.loss != "lm":
    return 0.0
  runs = {"decoder": seq_len % KERNEL_MIN_BLOCK == 0,
          "vision": cfg.model.vision.num_positions >= KERNEL_MIN_BLOCK}
  total = 0.0
  for mm, times in _step_matmuls(cfg, stage, batch_size, seq_len, num_tiles):
    tower = mm.name.split(".")[0]
    if mm.weight is None and mm.name.split(".")[1] == "attn" and runs.get(tower, False):
      total += mm.flops * (times + (times > 1 and cfg.model.remat != "none"))
  return total


def train_step_flops(cfg: Config, stage: StageConfig | str | None = None, batch_size: int | None = None,
                     seq_len: int | None = None, num_tiles: int | None = None) -> float:
  """Model FLOPs of one training step over the global batch (see train_step_breakdown)."""
  return train_step_breakdown(cfg, stage, batch_size, seq_len, num_tiles)["total"]
