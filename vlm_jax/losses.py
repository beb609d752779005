"""Losses: next-token cross-entropy (sum + count, so grad accumulation and hosts can average exactly),
and the CLIP / SigLIP contrastive losses. Everything is computed in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_ID = -100  # label of positions that carry no loss (HF convention)


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [B, S, V], labels int [B, S] at the same positions as input_ids (HF: logits[:, t] predicts
  labels[:, t + 1]) -> (summed NLL f32 [], number of scored tokens int32 []). Labels == IGNORE_ID are skipped."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  valid = targets != IGNORE_ID
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
              negative_emb: jax.Array | None = None, negative_valid: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE. image_emb, text_emb [B, E] (normalized); logit_scale: the multiplier (already exp'd).
  Hard negatives (NegCLIP): negative_emb [B, K, E] are texts false for their own image only; they join the
  image->text softmax of that image (where negative_valid bool [B, K]) and nothing else.
  Returns the mean of the image->text and text->image cross-entropies, f32 []."""
  logits = logit_scale * jnp.einsum("ie,te->it", image_emb.astype(jnp.float32), text_emb.astype(jnp.float32))
  diagonal = jnp.diagonal(logits)
  row_logits = logits
  if negative_emb is not None:
    negative = logit_scale * jnp.einsum("ie,ike->ik", image_emb.astype(jnp.float32),
                                        negative_emb.astype(jnp.float32))
    if negative_valid is not None:
      negative = jnp.where(negative_valid, negative, -jnp.inf)
    row_logits = jnp.concatenate([logits, negative], axis=1)
  image_to_text = jnp.mean(jax.nn.logsumexp(row_logits, axis=1) - diagonal)
  text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diagonal)
  return 0.5 * (image_to_text + text_to_image)


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array,
                negative_emb: jax.Array | None = None, negative_valid: jax.Array | None = None) -> jax.Array:
  """Pairwise sigmoid loss (SigLIP): -sum log sigmoid(z_ij * (scale * <img_i, txt_j> + bias)) / B with
  z = +1 on matching pairs, -1 elsewhere. Hard negatives negative_emb [B, K, E] (where negative_valid
  [B, K]) add one z = -1 pair each with their own image. f32 []."""
  logits = logit_scale * jnp.einsum("ie,te->it", image_emb.astype(jnp.float32), text_emb.astype(jnp.float32))
  logits = logits + logit_bias
  signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  total = jnp.sum(jax.nn.log_sigmoid(signs * logits))
  if negative_emb is not None:
    negative = logit_scale * jnp.einsum("ie,ike->ik", image_emb.astype(jnp.float32),
                                        negative_emb.astype(jnp.float32)) + logit_bias
    valid = jnp.ones(negative.shape, bool) if negative_valid is None else negative_valid
    total += jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(-negative), 0.0))
  return -total / logits.shape[0]
