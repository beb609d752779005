"""Losses: next-token cross-entropy (sum + count, so grad accumulation and hosts can average exactly),
and the CLIP / SigLIP contrastive losses. Everything is computed in float32."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

IGNORE_ID = -100  # label of positions that carry no loss (HF convention)


def next_token_targets(labels: jax.Array) -> jax.Array:
  """labels int [B, S] -> the token each position predicts, int [B, S]: labels shifted left by one, IGNORE_ID last."""
  return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_ID)], axis=1)


def supervised_tokens(labels: jax.Array) -> jax.Array:
  """labels int [B, S] -> how many positions `token_cross_entropy` scores, int32 []."""
  return jnp.sum(next_token_targets(labels) != IGNORE_ID, dtype=jnp.int32)


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [B, S, V], labels int [B, S] at the same positions as input_ids (HF: logits[:, t] predicts
  labels[:, t + 1]) -> (summed NLL f32 [], number of scored tokens int32 []). Labels == IGNORE_ID are skipped.

  NLL = logsumexp(logits) - the target's logit, the target's logit picked by comparing a vocab iota with the
  target: unlike slicing off the last position and gathering from log_softmax, nothing [B, S, V] is copied,
  and the gradient (softmax - one-hot) is elementwise, with no scatter into a zeroed [B, S, V] buffer."""
  targets = next_token_targets(labels)
  return _summed_nll(logits, targets), jnp.sum(targets != IGNORE_ID, dtype=jnp.int32)


def _summed_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits [..., V], targets int [...] (IGNORE_ID skipped) -> summed NLL, f32 []."""
  logits = logits.astype(jnp.float32)
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  picked = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
  return jnp.sum(jnp.where(targets != IGNORE_ID, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0))


LOSS_CHUNK = 512  # sequence positions per chunk of `chunked_token_cross_entropy`


def chunk_length(seq_len: int, chunk: int = LOSS_CHUNK) -> int:
  """The largest divisor of seq_len that is at most `chunk`."""
  return max(c for c in range(1, min(chunk, seq_len) + 1) if seq_len % c == 0)


def chunked_token_cross_entropy(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], labels: jax.Array,
                                chunk: int = LOSS_CHUNK, unroll: bool = False) -> tuple[jax.Array, jax.Array]:
  """`token_cross_entropy(head(hidden), labels)` without the [B, S, V] logits: hidden [B, S, D] goes through
  head ([B, c, D] -> float32 [B, c, V]) and the loss in sequence chunks of c = `chunk_length(S, chunk)`, each
  rematerialized in the backward pass, so one chunk's logits exist at a time. -> (summed NLL f32 [], int32 []).
  unroll: unroll the chunk loop (an unscanned model does, so that XLA's cost analysis counts every chunk)."""
  b, s, d = hidden.shape
  c = chunk_length(s, chunk)
  targets = next_token_targets(labels)
  pieces = (hidden.reshape(b, s // c, c, d).swapaxes(0, 1), targets.reshape(b, s // c, c).swapaxes(0, 1))

  chunk_nll = jax.checkpoint(lambda h, t: _summed_nll(head(h), t))
  total, _ = jax.lax.scan(lambda acc, xs: (acc + chunk_nll(*xs), None), jnp.zeros((), jnp.float32), pieces,
                          unroll=unroll)
  return total, jnp.sum(targets != IGNORE_ID, dtype=jnp.int32)


def similarity(image: jax.Array, text: jax.Array, text_mask: jax.Array | None = None) -> jax.Array:
  """Cosine similarities of every image with every text -> f32 [B, T].

  Global embeddings: image [B, E], text [T, E]. Token embeddings (`contrastive.similarity="token"`, FILIP-style
  late interaction): image [B, P, E] patches, text [T, L, E] tokens with text_mask [T, L]; a pair's similarity
  is the mean over the text's real tokens of the token's best patch. Every word must then find a patch that
  matches it, which puts what is where into the patch features (a pooled embedding can do without).
  """
  image, text = image.astype(jnp.float32), text.astype(jnp.float32)
  if image.ndim == 2:
    return jnp.einsum("ie,te->it", image, text)
  best = jnp.max(jnp.einsum("ipe,tle->itlp", image, text), axis=-1)  # [B, T, L]
  mask = jnp.ones(text.shape[:2], jnp.float32) if text_mask is None else text_mask.astype(jnp.float32)
  return jnp.sum(best * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def own_similarity(image: jax.Array, negatives: jax.Array, negative_mask: jax.Array | None = None) -> jax.Array:
  """Similarity of each image with its own K texts -> f32 [B, K]: image [B, E] or [B, P, E]; negatives
  [B, K, E] or [B, K, L, E] with negative_mask [B, K, L] (as `similarity`)."""
  b, k = negatives.shape[:2]
  if image.ndim == 2:
    return jnp.einsum("ie,ike->ik", image.astype(jnp.float32), negatives.astype(jnp.float32))
  mask = None if negative_mask is None else negative_mask[:, None]
  per_image = jax.vmap(similarity)(image[:, None], negatives, mask)  # [B, 1, K]
  return per_image.reshape(b, k)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
              negative_emb: jax.Array | None = None, negative_valid: jax.Array | None = None,
              text_mask: jax.Array | None = None, negative_mask: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE over the [B, B] `similarity` matrix times logit_scale (already exp'd); embeddings
  normalized, global [B, E] or per token (see `similarity`, with text_mask).
  Hard negatives (NegCLIP): negative_emb [B, K, ...] are texts false for their own image only; they join the
  image->text softmax of that image (where negative_valid bool [B, K]) and nothing else.
  Returns the mean of the image->text and text->image cross-entropies, f32 []."""
  logits = logit_scale * similarity(image_emb, text_emb, text_mask)
  diagonal = jnp.diagonal(logits)
  row_logits = logits
  if negative_emb is not None:
    negative = logit_scale * own_similarity(image_emb, negative_emb, negative_mask)
    if negative_valid is not None:
      negative = jnp.where(negative_valid, negative, -jnp.inf)
    row_logits = jnp.concatenate([logits, negative], axis=1)
  image_to_text = jnp.mean(jax.nn.logsumexp(row_logits, axis=1) - diagonal)
  text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diagonal)
  return 0.5 * (image_to_text + text_to_image)


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array,
                negative_emb: jax.Array | None = None, negative_valid: jax.Array | None = None,
                text_mask: jax.Array | None = None, negative_mask: jax.Array | None = None) -> jax.Array:
  """Pairwise sigmoid loss (SigLIP): -sum log sigmoid(z_ij * (scale * sim_ij + bias)) / B with z = +1 on
  matching pairs, -1 elsewhere (sim as in `similarity`). Hard negatives negative_emb [B, K, ...] (where
  negative_valid [B, K]) add one z = -1 pair each with their own image. f32 []."""
  logits = logit_scale * similarity(image_emb, text_emb, text_mask) + logit_bias
  signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  total = jnp.sum(jax.nn.log_sigmoid(signs * logits))
  if negative_emb is not None:
    negative = logit_scale * own_similarity(image_emb, negative_emb, negative_mask) + logit_bias
    valid = jnp.ones(negative.shape, bool) if negative_valid is None else negative_valid
    total += jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(-negative), 0.0))
  return -total / logits.shape[0]
