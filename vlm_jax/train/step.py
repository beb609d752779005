"""Jitted train / eval steps with explicit shardings, gradient accumulation and frozen params passed through.

The train state is a plain dict {step int32 [], params, opt_state}: no RNG. The one feature that draws random
numbers while training, LoRA dropout, keys its masks by fold_in(PRNGKey(lora.dropout_seed), step), so a resumed
step draws the same masks; without it the step has no RNG at all. Its shardings come from the params'
logical axis names (`vlm_jax.sharding`); optimizer moments take the sharding of their param. Call the
steps inside `use_mesh(mesh)` (the mesh and the logical axis rules the model's constraints read while tracing).

Loss averaging: every micro-batch contributes (loss_sum, weight) and gradients of loss_sum; the step divides the
sums by the total weight at the end. For `lm` the weight is the number of supervised tokens, so the loss is the
mean over all supervised tokens of the global batch, whatever grad_accum and the device count (not a mean of
per-row or per-micro-batch means). For `contrastive` a micro-batch is one contrastive batch (its negatives) and
the weight is its number of pairs. A MoE model's router loss (`aux_loss`) is added to the objective, weighted
the same way; its routing metrics (expert load, dropped fraction) are averaged over the micro-batches.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import losses
from vlm_jax.config import Config, LoraConfig, StageConfig
from vlm_jax.model import lora as lora_lib
from vlm_jax.model import vlm
from vlm_jax.sharding import LOGICAL_AXIS_RULES, data_sharding, logical_shardings, replicated
from vlm_jax.train import optimizer as optimizer_lib

State = dict[str, Any]
LORA_INIT_SEED = 0x4C6F5241  # fold_in constant: the adapters' init key, apart from the model's


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
  """The context train/eval steps (and param init) run in: `jax.set_mesh` + the logical axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def param_shardings(config: Config, mesh: Mesh, lora: LoraConfig | None = None) -> tuple[Any, Any]:
  """(ShapeDtypeStruct tree of the params, NamedSharding tree) from the model's logical axis names; with a `lora`
  config of rank > 0 the tree holds its adapters under `lora` (vlm_jax/model/lora.py)."""
  shapes, logical = vlm.abstract_params(config.model)
  if lora is not None:
    shapes, logical = lora_lib.with_abstract(shapes, logical, lora)
  return shapes, logical_shardings(logical, mesh)


def abstract_state(config: Config, stage: StageConfig, mesh: Mesh,
                   tx: optax.GradientTransformation) -> State:
  """The train state as ShapeDtypeStructs carrying their shardings (the restore target and jit in/out spec)."""
  shapes, p_shardings = param_shardings(config, mesh, stage.lora)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  opt_shardings = _like_params(opt_shapes, shapes, p_shardings, replicated(mesh))
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)),
          "params": jax.tree.map(with_sharding, shapes, p_shardings),
          "opt_state": jax.tree.map(with_sharding, opt_shapes, opt_shardings)}


def _like_params(tree: Any, param_shapes: Any, param_shardings: Any, default: NamedSharding) -> Any:
  """Shardings for optimizer-state leaves: a leaf whose key path ends in a param's path (Adam's mu/nu:
  `...mu['decoder']['embed']['embedding']`) and has its shape takes that param's sharding; counts and other
  leaves get `default`."""
  def dict_keys(path):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.append(k.key)
    return tuple(reversed(keys))
  params = {dict_keys(p): (x.shape, s) for (p, x), s in zip(jax.tree_util.tree_flatten_with_path(param_shapes)[0],
                                                           jax.tree.leaves(param_shardings))}
  def pick(path, x):
    shape, sharding = params.get(dict_keys(path), (None, default))
    return sharding if shape == x.shape else default
  return jax.tree_util.tree_map_with_path(pick, tree)


def shardings_of(abstract: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, abstract)


def init_params(config: Config, mesh: Mesh, rng: jax.Array) -> Any:
  """Fresh params, created directly in their shardings."""
  _, p_shardings = param_shardings(config, mesh)
  with use_mesh(mesh):
    return jax.jit(lambda r: vlm.init_params(config.model, r), out_shardings=p_shardings)(rng)


def stage_params(params: Any, config: Config, stage: StageConfig, mesh: Mesh,
                 source: LoraConfig | None = None) -> Any:
  """A stage's starting params from a previous stage's (or a fresh init's) `params`, whose adapters (if any)
  follow the `source` lora config: they are merged into the base when the source says merge_at_end or this
  stage's lora config differs, else handed on; a stage with LoRA and no handed-on adapters gets fresh ones
  (keyed by config.seed, apart from the model's init). Placed on the stage's param shardings."""
  base, adapters = lora_lib.split(params)
  shapes, shardings = param_shardings(config, mesh, stage.lora)
  base_shardings = lora_lib.split(shardings)[0]
  if adapters is not None and (source.merge_at_end or not lora_lib.same_adapters(source, stage.lora)):
    base = jax.jit(lambda b, a: lora_lib.merge(b, a, source), out_shardings=base_shardings,
                   donate_argnums=0)(base, adapters)
    adapters = None
  if not stage.lora.rank:
    return base
  if adapters is None:
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), LORA_INIT_SEED)
    fresh = lambda: lora_lib.init(lora_lib.split(shapes)[0], stage.lora, rng)
    if not stage.lora.quantize_base:
      adapters = jax.jit(fresh, out_shardings=shardings[lora_lib.KEY])()
    else:  # the float base (fresh, or merged above) becomes int8, its scales go beside the adapters
      base, adapters = jax.jit(lambda b: lora_lib.quantize_targets(b, fresh(), stage.lora), donate_argnums=0,
                               out_shardings=(base_shardings, shardings[lora_lib.KEY]))(base)
  return {**base, lora_lib.KEY: adapters}


def init_state(params: Any, tx: optax.GradientTransformation, abstract: State) -> State:
  """A stage's step-0 state: `params` (already sharded) and fresh optimizer state."""
  opt_state = jax.jit(tx.init, out_shardings=shardings_of(abstract["opt_state"]))(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), abstract["step"].sharding)
  return {"step": step, "params": params, "opt_state": opt_state}


def _loss_terms(model: vlm.VLM, stage: StageConfig, params: Any, batch: dict[str, jax.Array],
                rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
  """-> (loss_sum, aux_sum, weight, moe_metrics) of one micro-batch: loss_sum, aux_sum, weight f32 [], mean loss =
  loss_sum / weight; the MoE router loss enters as aux_loss * weight, so dividing by the total weight averages it
  over micro-batches. moe_metrics: the model's (vlm_jax/model/moe.py `summarize`; {} for a dense decoder).
  Adapters under params['lora'] are folded into their kernels first, in the compute dtype; with `rng` (LoRA
  dropout while training) they run unfolded, their input dropped out (`lora.apply_with_dropout`)."""
  params, adapters = lora_lib.split(params)
  apply = model.apply
  if adapters is not None and rng is not None:
    dtype = model.config.compute_dtype
    apply = lambda v, *a, **k: lora_lib.apply_with_dropout(model, v["params"], adapters, stage.lora, rng, dtype,
                                                          *a, **k)
  elif adapters is not None:
    params = lora_lib.apply(params, adapters, stage.lora, model.config.compute_dtype)
  if stage.loss == "contrastive":
    b, k = batch["text_ids"].shape[0], model.config.contrastive.hard_negatives
    negative_mask = batch["negative_text_mask"] if k else None
    # One text-tower call over the captions and their hard negatives: [B + B * K, L].
    flat = lambda key: jnp.concatenate([batch[f"text_{key}"]] + ([batch[f"negative_text_{key}"].reshape(
        b * k, -1)] if k else []))
    image, text, scale, bias = apply({"params": params}, batch["pixel_values"], flat("ids"), flat("mask"),
                                     method=vlm.VLM.contrastive_embeddings)
    text, negatives = text[:b], (text[b:].reshape(b, k, *text.shape[1:]) if k else None)
    masks = dict(negative_valid=batch.get("negative_valid"), text_mask=batch["text_mask"],
                 negative_mask=negative_mask)
    if model.config.contrastive.loss == "siglip":
      loss = losses.siglip_loss(image, text, scale, bias, negatives, **masks)
    else:
      loss = losses.clip_loss(image, text, scale, negatives, **masks)
    pairs = jnp.asarray(image.shape[0], jnp.float32)
    return loss * pairs, jnp.zeros((), jnp.float32), pairs, {}
  out = apply({"params": params}, batch, lm_loss=True)  # chunked: no [B, S, V] logits
  loss_sum, count = out["loss_sum"], out["num_tokens"]
  weight = count.astype(jnp.float32)
  aux_sum = jnp.asarray(out.get("aux_loss", 0.0), jnp.float32) * weight
  return loss_sum, aux_sum, weight, dict(out.get("moe_metrics", {}))


def batch_weight(stage: StageConfig, batch: dict[str, jax.Array]) -> jax.Array:
  """The weight `_loss_terms` reports for the whole batch, from the batch alone, f32 []: its supervised tokens
  (`lm`), or its image-text pairs (`contrastive`)."""
  if stage.loss == "contrastive":
    return jnp.asarray(batch["text_ids"].shape[0], jnp.float32)
  return losses.supervised_tokens(batch["labels"]).astype(jnp.float32)


def _micro_batches(batch: dict[str, jax.Array], grad_accum: int, mesh: Mesh) -> dict[str, jax.Array]:
  """[B, ...] -> [grad_accum, B / grad_accum, ...]. Micro-batch a takes rows a, a + A, a + 2A, ... so each
  device's local rows spread over all micro-batches and every micro-batch keeps the batch sharding."""
  batch_axes = data_sharding(mesh, 1).spec[0]

  def split(x):
    x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, batch_axes)))
  return jax.tree.map(split, batch)


def check_batch_split(stage: StageConfig, mesh: Mesh) -> None:
  """Every micro-batch must split evenly over the batch devices. (Uneven splits pad rows; on CPU, XLA then added
  garbage from the padding rows into the embedding gradient on a (data 2, fsdp 2, tensor 2) mesh.)"""
  batch_axes = data_sharding(mesh, 1).spec[0]
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  rows = stage.batch_size // stage.grad_accum
  if rows % shards:
    raise ValueError(f"Stage {stage.name!r}: batch_size / grad_accum = {stage.batch_size} / {stage.grad_accum} = "
                     f"{rows} rows per micro-batch do not split over the {shards} {batch_axes} devices of the "
                     f"mesh {dict(mesh.shape)}; change batch_size, grad_accum or mesh.")


def split_trainable(params: Any, labels: Any) -> tuple[Any, Any]:
  """Two trees shaped like params with None in place of the other group's leaves."""
  pick = lambda want: jax.tree.map(lambda p, l: p if l == want else None, params, labels)
  return pick(optimizer_lib.TRAIN), pick(optimizer_lib.FROZEN)


def _merge(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def accumulate_grads(model: vlm.VLM, stage: StageConfig, mesh: Mesh, trainable: Any, frozen: Any,
                     batch: dict[str, jax.Array], rng: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array, Any, dict]:
  """-> (loss_sum, aux_sum, weight, grads), the first three summed over stage.grad_accum micro-batches
  (lax.scan), grads = d(loss_sum + aux_sum) / d trainable / max(weight, 1): the gradient of the mean; and the MoE
  metrics averaged over the micro-batches ({} for a dense decoder). Divide the sums by the weight to get means.

  trainable / frozen: the params split by label (None in place of the other group's leaves); only `trainable`
  is differentiated, so frozen towers cost no backward pass. The weight is known from the batch before the
  forward (`batch_weight`), so each micro-batch's objective is divided by it and the gradients come out averaged:
  dividing the gradient tree afterwards is one more pass over every trainable param (~4% of bench_cpu's step).
  rng: the LoRA dropout key of this step (None: no dropout); micro-batch a draws with fold_in(rng, a).
  """
  scale = 1.0 / jnp.maximum(batch_weight(stage, batch), 1.0)  # no supervised tokens: zero grads, not NaN

  def objective(t, micro, key):
    loss_sum, aux_sum, weight, moe_metrics = _loss_terms(model, stage, _merge(t, frozen), micro, key)
    return (loss_sum + aux_sum) * scale, (loss_sum, aux_sum, weight, moe_metrics)

  def grads_of(micro, key=None):
    (_, (loss_sum, aux_sum, weight, moe_metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
        trainable, micro, key)
    return loss_sum, aux_sum, weight, grads, moe_metrics

  if stage.grad_accum == 1:
    return grads_of(batch, None if rng is None else jax.random.fold_in(rng, 0))

  def body(carry, micro):
    if rng is not None:  # scanned with the micro-batch index
      micro, index = micro
      return jax.tree.map(jnp.add, carry, grads_of(micro, jax.random.fold_in(rng, index))), None
    return jax.tree.map(jnp.add, carry, grads_of(micro)), None
  micro_batches = _micro_batches(batch, stage.grad_accum, mesh)
  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(grads_of, first))
  xs = micro_batches if rng is None else (micro_batches, jnp.arange(stage.grad_accum, dtype=jnp.uint32))
  *sums, moe_sums = jax.lax.scan(body, zeros, xs)[0]
  return (*sums, jax.tree.map(lambda x: x / stage.grad_accum, moe_sums))


def make_train_step(model: vlm.VLM, stage: StageConfig, mesh: Mesh, tx: optax.GradientTransformation,
                    abstract: State) -> Callable[[State, dict], tuple[State, dict]]:
  """A jitted `(state, batch) -> (state, metrics)`; the input state is donated. Call it inside use_mesh(mesh).

  batch: the global batch (DESIGN.md contract, or the contrastive keys), leading axis sharded over the batch axes
  of `data_sharding` (data, fsdp, expert).
  metrics (replicated f32): loss (mean over supervised tokens), aux_loss (MoE router losses, 0.0 dense),
  grad_norm (trainable grads, before clipping), lr (of this update), num_tokens (supervised tokens; image-text
  pairs for contrastive), all []; an MoE model adds the model's routing metrics under `moe/`: moe/expert_load [E]
  (each expert's share of the routed assignments, sums to 1), moe/dropped_fraction, moe/load_balancing_loss,
  moe/z_loss [] (means over the micro-batches).
  Only trainable params are differentiated; frozen params come out bit-identical.
  """
  check_batch_split(stage, mesh)
  labels = optimizer_lib.trainable_labels(abstract["params"], stage)
  lr_schedule = optimizer_lib.schedule(stage)
  dropout = lora_lib.KEY in abstract["params"] and stage.lora.dropout > 0

  def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
    trainable, frozen = split_trainable(state["params"], labels)
    rng = lora_dropout_key(stage.lora, state["step"]) if dropout else None
    loss_sum, aux_sum, weight, grads, moe_metrics = accumulate_grads(model, stage, mesh, trainable, frozen, batch,
                                                                     rng)
    denominator = jnp.maximum(weight, 1.0)  # a batch without supervised tokens: zero loss, not NaN
    full_grads = _merge(grads, jax.tree.map(jnp.zeros_like, frozen))  # set_to_zero never reads these
    updates, opt_state = tx.update(full_grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    # Frozen leaves are taken as they were (p + 0 would turn -0.0 into +0.0).
    new_params = jax.tree.map(lambda l, new, old: old if l == optimizer_lib.FROZEN else new,
                              labels, new_params, state["params"])
    metrics = {"loss": loss_sum / denominator, "aux_loss": aux_sum / denominator, "grad_norm": optax.global_norm(grads),
               "lr": jnp.asarray(lr_schedule(state["step"]), jnp.float32), "num_tokens": weight,
               **{f"moe/{name}": value for name, value in moe_metrics.items()}}
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, metrics

  state_shardings = shardings_of(abstract)
  return jax.jit(train_step, in_shardings=(state_shardings, data_sharding(mesh, 1)),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def lora_dropout_key(cfg: LoraConfig, step: jax.Array) -> jax.Array:
  """The LoRA dropout key of train step `step` (the state's step before the update): from the step alone, so
  a resumed run draws the same masks."""
  return jax.random.fold_in(jax.random.PRNGKey(cfg.dropout_seed), step)


def make_eval_step(model: vlm.VLM, stage: StageConfig, mesh: Mesh, abstract: State) -> Callable[[Any, dict], dict]:
  """A jitted `(params, batch) -> {"loss", "num_tokens"}` (mean over supervised tokens). Call inside use_mesh."""
  def eval_step(params, batch):
    loss_sum, _, weight, _ = _loss_terms(model, stage, params, batch)
    return {"loss": loss_sum / jnp.maximum(weight, 1.0), "num_tokens": weight}
  return jax.jit(eval_step, in_shardings=(shardings_of(abstract["params"]), data_sharding(mesh, 1)),
                 out_shardings=replicated(mesh))
