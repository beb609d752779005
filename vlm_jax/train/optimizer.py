"""A stage's optimizer: trainable/frozen labels from regexes, AdamW on the trainable params, nothing on the rest.

The big_vision pattern: every param gets a label from its '/'-joined path (`decoder/layers/attn/q_proj/kernel`);
`optax.multi_transform` sends "train" params through clip -> AdamW (warmup + cosine) and "frozen" params through
`set_to_zero`, which keeps no state, so frozen params cost no optimizer memory and never move.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import optax

from vlm_jax.config import ConfigError, LoraConfig, StageConfig
from vlm_jax.model import lora as lora_lib

TRAIN, FROZEN = "train", "frozen"


def param_paths(params: Any) -> Any:
  """Pytree of the same structure as `params` whose leaves are '/'-joined paths, e.g. 'vision/pos_embed'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), params)


def trainable_labels(params: Any, stage: StageConfig) -> Any:
  """Pytree of "train" / "frozen": a param trains when its path fully matches one of `stage.trainable`.
  With LoRA (params holding adapters under `lora`): the adapters train and the kernels they adapt are frozen (an
  int8 base's scales too).

  A regex that matches no param is a config error (it names the regex and the top-level paths), so a typo
  cannot silently freeze the whole model.
  """
  base, adapters = lora_lib.split(params)
  paths = jax.tree.leaves(param_paths(base))
  for pattern in stage.trainable:
    if not any(re.fullmatch(pattern, p) for p in paths):
      tops = sorted({p.split("/")[0] for p in paths})
      raise ConfigError(f"train.stages.{stage.name}.trainable: {pattern!r} matches no param. Params start with "
                        f"{tops}, e.g. {paths[0]!r}; patterns must match the whole path, e.g. 'projector/.*'.")
  full = lora_lib.trained_in_full(base, stage.trainable, stage.lora if adapters is not None else LoraConfig())
  label = lambda p: TRAIN if p in full or lora_lib.is_factor(p) else FROZEN
  return jax.tree.map(label, param_paths(params))


def schedule(stage: StageConfig) -> optax.Schedule:
  """Linear warmup from 0 to stage.lr over warmup_steps, then cosine to lr * end_lr_fraction at stage.steps."""
  warmup = min(stage.warmup_steps, stage.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=stage.lr, warmup_steps=warmup, decay_steps=max(stage.steps, warmup + 1),
      end_value=stage.lr * stage.end_lr_fraction)


def weight_decay_mask(params: Any) -> Any:
  """True for matmul weights (kernels, MoE expert matrices) and LoRA factors: norms, biases, embedding tables,
  position embeddings, CLS tokens and scalars (all other leaf names, or 1-D) are not decayed."""
  return jax.tree.map(lambda p, x: _is_matmul_weight(p, x.shape) or (
      p.split("/")[-1] in ("lora_a", "lora_b") and len(x.shape) >= 2), param_paths(params), params)


def _is_matmul_weight(path: str, shape: tuple[int, ...]) -> bool:
  """Dense kernels and the MoE experts' stacked matrices (`.../experts/gate_up [E,D,2,F]`, `.../experts/down
  [E,F,D]`, which are not named kernel)."""
  *_, parent, name = ("", *path.split("/"))
  return len(shape) >= 2 and (name == "kernel" or (parent == "experts" and name in ("gate_up", "down")))


def lr_multipliers(params: Any, stage: StageConfig) -> Any:
  """Pytree of floats: the multiplier of the first (regex, mult) in stage.lr_multipliers matching the path, else 1."""
  def multiplier(path):
    for pattern, mult in stage.lr_multipliers:
      if re.fullmatch(pattern, path):
        return float(mult)
    return 1.0
  return jax.tree.map(multiplier, param_paths(params))


def _scale_by_tree(stage: StageConfig) -> optax.GradientTransformation:
  """Multiplies each update by its own constant factor (per-module learning rates)."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, f: u * f, updates,
                                                                   lr_multipliers(updates, stage)))


def make_optimizer(stage: StageConfig, params: Any) -> optax.GradientTransformation:
  """The stage's optimizer for a param tree (arrays or ShapeDtypeStructs; only paths and ranks are read).

  train: clip_by_global_norm(grad_clip) (the norm over trainable grads) -> AdamW(schedule, b1, b2,
  weight_decay on kernels); frozen: set_to_zero (no state). lr_multipliers scale the final updates.
  """
  trainable_labels(params, stage)  # config errors now, not at the first update
  labels = lambda tree: trainable_labels(tree, stage)  # any tree: with or without the stage's adapters
  train = optax.chain(
      optax.clip_by_global_norm(stage.grad_clip),
      optax.adamw(schedule(stage), b1=stage.b1, b2=stage.b2, weight_decay=stage.weight_decay,
                  mask=weight_decay_mask))
  tx = optax.multi_transform({TRAIN: train, FROZEN: optax.set_to_zero()}, labels)
  if stage.lr_multipliers:
    tx = optax.chain(tx, _scale_by_tree(stage))
  return tx
