"""The VLM: ViT -> projector -> image features spliced into the decoder's `<image>` embeddings.

Entry points (all take / return plain pytrees; params are float32, compute in `config.compute_dtype`):
  VLM(cfg).apply({"params": p}, batch) -> {"logits": [B, S, V] f32, "aux_loss": f32 [] (MoE router losses,
                                     coef-weighted, summed over layers; 0.0 dense), "moe_metrics": {} dense, else
                                     expert_load [E], dropped_fraction [], load_balancing_loss [], z_loss [],
                                     "hidden_states": [B, S, D] if asked}
  method=VLM.embed_images            pixel_values [B, N, H, W, 3] (uint8, or normalized floats), tile_mask [B, N]
                                     (, tile_index [B, K]) -> [B, N*T, D]
  method=VLM.contrastive_embeddings  -> (image_emb [B, E], text_emb [B, E], logit_scale, logit_bias)
  method=VLM.prefill / VLM.decode_step  KV-cached calls for generation, with mutable=["cache"] and the cache
                                     from `init_cache` (protocol in vlm_jax/model/decoder.py)
  init_params(cfg, rng), abstract_params(cfg), init_cache(cfg, batch_size, max_len), dummy_batch(...)
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import ContrastiveConfig, ModelConfig, VisionConfig
from vlm_jax.model import kernels
from vlm_jax.model.decoder import Decoder
from vlm_jax.model.layers import constrain, dense, logical
from vlm_jax.model.projector import Projector
from vlm_jax.model.text_encoder import TextEncoder
from vlm_jax.model.vision import MAPHead, VisionEncoder


def image_features_at_tokens(input_ids: jax.Array, features: jax.Array,
                             image_token_id: int) -> tuple[jax.Array, jax.Array]:
  """Lines image features up with the `<image>` ids of each row: the k-th `<image>` of row b gets
  features[b, k] (cumsum indexing, static shapes).

  input_ids int [B, S], features [B, M, D] -> (is_image bool [B, S], values [B, S, D]).
  """
  is_image = input_ids == image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
  return is_image, jax.vmap(lambda f, i: f[i])(features, index)


def batch_shard_count(rows: int) -> int:
  """How many batch shards the current mesh cuts `rows` into (the mesh axes of `act_batch` under the logical axis
  rules in scope); 1 outside a mesh, or when the rows do not split evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  spec = nn.logical_to_mesh_axes(("act_batch",))[0]
  if mesh.empty or spec is None:
    return 1
  shards = math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec))
  return shards if rows % shards == 0 else 1


def gather_tiles(pixel_values: jax.Array, tile_index: jax.Array, shards: int) -> tuple[jax.Array, jax.Array]:
  """The tiles a tile budget names, gathered within each batch shard (no pixels cross devices).

  pixel_values [B, N, H, W, C]; tile_index int [B, K]: entry j of row b names the tile slot
  b * N + tile_index[b, j] of the batch (so a row's entries may name tiles of other rows of its shard;
  config.NO_TILE for an unused entry), as the loader builds them (vlm_jax/inputs/tile_budget.py) ->
  (tiles [B * K, H, W, C], zeros at unused entries; slots int32 [S, R * K]: each tile's slot among its shard's
  R * N, R = B / S rows per shard, S = shards).
  """
  b, n = pixel_values.shape[:2]
  k, rows = tile_index.shape[1], b // shards
  local = tile_index.astype(jnp.int32) + (jnp.arange(b, dtype=jnp.int32) % rows * n)[:, None]
  slots = local.reshape(shards, rows * k)
  pixels = pixel_values.reshape(shards, rows * n, *pixel_values.shape[2:])
  pixels = constrain(pixels, ("act_batch",) + (None,) * (pixels.ndim - 1))
  tiles = jax.vmap(lambda p, i: p.at[i].get(mode="fill", fill_value=0))(pixels, slots)
  tiles = tiles.reshape(b * k, *pixel_values.shape[2:])
  return constrain(tiles, ("act_batch",) + (None,) * (tiles.ndim - 1)), slots


def scatter_tiles(features: jax.Array, slots: jax.Array, batch: int, num_tiles: int) -> jax.Array:
  """Inverse of `gather_tiles`: features [B * K, T, D] of the gathered tiles, slots [S, R * K] ->
  [B, N * T, D] with every other tile slot (padding, unused entries) zero."""
  shards, per_shard = slots.shape
  t, d = features.shape[1:]
  features = features.reshape(shards, per_shard, t, d)
  empty = jnp.zeros((batch // shards * num_tiles, t, d), features.dtype)
  out = jax.vmap(lambda f, i: empty.at[i].set(f, mode="drop"))(features, slots)
  return out.reshape(batch, num_tiles * t, d)


class Contrastive(nn.Module):
  """Image pooling + text tower + projections into a shared space, and the learned temperature / bias."""
  config: ContrastiveConfig
  vision: VisionConfig
  vocab_size: int
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: str = "none"

  @nn.compact
  def __call__(self, image_features, text_ids, text_mask):
    c = self.config
    tokens = c.similarity == "token"  # per-patch / per-token embeddings, no pooling
    if tokens:
      image = image_features
    elif c.image_pool == "gap":
      image = jnp.mean(image_features.astype(jnp.float32), axis=1).astype(self.dtype)
    else:
      image = MAPHead(self.vision.num_heads or 1, self.vision.mlp_dim, self.dtype, name="image_pool")(image_features)
    image = dense(c.embed_dim, ("vision_embed", None), name="image_proj", dtype=self.dtype)(image)
    text = TextEncoder(c, self.vocab_size, self.dtype, self.scan_layers, self.remat, name="text")(
        text_ids, text_mask, pooled=not tokens)
    text = dense(c.embed_dim, ("vision_embed", None), name="text_proj", dtype=self.dtype)(text)
    logit_scale = self.param("logit_scale", logical(nn.initializers.constant(np.log(c.init_temperature)), ()), (),
                             jnp.float32)
    logit_bias = self.param("logit_bias", logical(nn.initializers.constant(c.init_bias), ()), (), jnp.float32)

    def normalize(e):
      e = e.astype(jnp.float32)
      return e * jax.lax.rsqrt(jnp.sum(jnp.square(e), axis=-1, keepdims=True) + 1e-12)
    return normalize(image), normalize(text), jnp.exp(logit_scale), logit_bias


def _with_kernels(method):
  """Runs a VLM method inside `kernels.use(config.kernels)` (the backend switch read while tracing)."""
  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    with kernels.use(self.config.kernels):
      return method(self, *args, **kwargs)
  return wrapped


class VLM(nn.Module):
  config: ModelConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.compute_dtype)
    self.vision = VisionEncoder(c.vision, dtype, c.scan_layers, c.remat)
    self.projector = Projector(c.projector, c.decoder.width, dtype)
    self.decoder = Decoder(c.decoder, dtype, c.scan_layers, c.remat)
    if c.contrastive.enabled:
      self.contrastive = Contrastive(c.contrastive, c.vision, c.decoder.vocab_size, dtype, c.scan_layers, c.remat)

  @_with_kernels
  def embed_images(self, pixel_values: jax.Array, tile_mask: jax.Array,
                   tile_index: jax.Array | None = None) -> jax.Array:
    """pixel_values [B, N, H, W, 3]: uint8 (normalized on the device) or floats already normalized (see
    vision.normalize_pixels); tile_mask bool [B, N] -> [B, N * T, D] (padding tiles zeroed).

    With tile_index int [B, K] (a batch built under data.tile_budget, K < N) the ViT and projector run on the
    B * K tiles it names (`gather_tiles`, within each batch shard), not on all B * N slots."""
    b, n = pixel_values.shape[:2]
    if tile_index is not None:
      tiles, slots = gather_tiles(pixel_values, tile_index, batch_shard_count(b))
      return scatter_tiles(self.projector(self.vision(tiles)), slots, b, n)
    features = self.projector(self.vision(pixel_values.reshape(b * n, *pixel_values.shape[2:])))
    features = features.reshape(b, n, *features.shape[1:])
    features = jnp.where(tile_mask[:, :, None, None], features, 0)
    return features.reshape(b, -1, features.shape[-1])

  def _replace(self, batch: dict[str, jax.Array]):
    pixel_values = batch.get("pixel_values")
    if pixel_values is None or pixel_values.shape[1] == 0:
      return None
    features = self.embed_images(pixel_values, batch["tile_mask"], batch.get("tile_index"))
    return image_features_at_tokens(batch["input_ids"], features, self.config.image_token_id)

  @_with_kernels
  def __call__(self, batch: dict[str, jax.Array], *, return_hidden_states: bool = False,
               lm_loss: bool = False) -> dict[str, jax.Array]:
    """batch (DESIGN.md contract) -> {"logits": f32 [B, S, V], "aux_loss": f32 [] (add it to the training loss),
    "moe_metrics": dict (vlm_jax/model/moe.py `summarize`), "hidden_states": [B, S, D] (final norm output)}.
    With `lm_loss`, "loss_sum" f32 [] and "num_tokens" int32 [] (`losses.token_cross_entropy` of the logits and
    batch["labels"], computed in sequence chunks) replace "logits"."""
    logits, hidden, aux_loss, moe_metrics = self.decoder(batch["input_ids"], batch["segment_ids"],
                                                         batch["positions"], replace=self._replace(batch),
                                                         with_aux=True, labels=batch["labels"] if lm_loss else None)
    if self.is_initializing() and self.config.contrastive.enabled:
      v, b = self.config.vision, batch["input_ids"].shape[0]
      text = jnp.zeros((b, self.config.contrastive.max_text_len), jnp.int32)
      pixels = jnp.zeros((b, v.image_size, v.image_size, v.num_channels), jnp.float32)
      self.contrastive_embeddings(pixels, text, text == 0)  # creates contrastive/ params
    out = {"aux_loss": aux_loss, "moe_metrics": moe_metrics}
    if lm_loss:
      out["loss_sum"], out["num_tokens"] = logits
    else:
      out["logits"] = logits
    if return_hidden_states:
      out["hidden_states"] = hidden
    return out

  @_with_kernels
  def contrastive_embeddings(self, pixel_values: jax.Array, text_ids: jax.Array, text_mask: jax.Array):
    """pixel_values [B, H, W, 3] or [B, 1, H, W, 3] (uint8 or normalized floats), text_ids int [B, L], text_mask
    bool [B, L] ->
    (image_emb f32 [B, E], text_emb f32 [B, E], both L2-normalized; logit_scale = exp(param) [];
    logit_bias []). With contrastive.similarity="token": image_emb [B, P, E] per patch, text_emb [B, L, E]
    per token, each vector normalized."""
    if pixel_values.ndim == 5:
      pixel_values = pixel_values[:, 0]
    return self.contrastive(self.vision(pixel_values), text_ids, text_mask)

  @_with_kernels
  def prefill(self, batch: dict[str, jax.Array]) -> jax.Array:
    """Runs a left-padded prompt batch on an empty cache (mutable=["cache"]) -> logits f32 [B, S, V]."""
    logits, _ = self.decoder(batch["input_ids"], batch["segment_ids"], batch["positions"],
                             replace=self._replace(batch), decode=True)
    return logits

  @_with_kernels
  def decode_step(self, input_ids: jax.Array, positions: jax.Array,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """input_ids, positions int [B, 1] (segment_ids default 1) -> logits f32 [B, 1, V]; writes the cache."""
    if segment_ids is None:
      segment_ids = jnp.ones_like(input_ids)
    logits, _ = self.decoder(input_ids, segment_ids, positions, decode=True)
    return logits


def dummy_batch(cfg: ModelConfig, batch_size: int = 1, seq_len: int = 8, max_tiles: int = 1) -> dict[str, Any]:
  """An all-text batch of the contract's shapes (uint8 zero pixels, all tiles valid) for init and tests."""
  size, ch = cfg.vision.image_size, cfg.vision.num_channels
  ids = np.zeros((batch_size, seq_len), np.int32)
  return {"input_ids": ids, "labels": np.full_like(ids, -100), "segment_ids": np.ones_like(ids),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy(),
          "pixel_values": np.zeros((batch_size, max_tiles, size, size, ch), np.uint8),
          "tile_mask": np.ones((batch_size, max_tiles), bool)}


def _boxed_init(cfg: ModelConfig, rng: jax.Array) -> Any:
  return VLM(cfg).init(rng, dummy_batch(cfg))["params"]


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
  """Freshly initialized float32 params (plain arrays)."""
  return nn.unbox(jax.jit(_boxed_init, static_argnums=0)(cfg, rng))


def abstract_params(cfg: ModelConfig) -> tuple[Any, Any]:
  """(ShapeDtypeStruct tree, logical PartitionSpec tree) of the params, without allocating anything."""
  boxed = jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0))
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Any:
  """An empty KV cache (the "cache" collection) for `batch_size` rows of up to `max_len` tokens."""
  ids = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: VLM(cfg).init(jax.random.key(0), ids, ids, ids, method=VLM.decode_step)["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
