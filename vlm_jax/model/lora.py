"""LoRA as a transform of the param tree: adapters in their own pytree, folded into the kernels before `apply`.

For a targeted kernel W of shape [*lead, *in, *out] (lead: the scanned `layers` axis and / or the MoE `exp` axis,
which keep one adapter per layer / expert), the adapter is
    lora_a [*lead, *in, r]   lora_b [*lead, r, *out]
and the model runs with W + (alpha / r) * A @ B (the product over r, then reshaped to W's shape). q/k/v kernels
[D, H, hd] have one input axis, o_proj / the ViT's attn out [H, hd, D] two, the patch conv [p, p, C, W] three
(`split_axes`). A starts like PEFT's (kaiming-uniform, bound 1 / sqrt(fan_in)) and B at zero, so at step 0
the model equals its base.

The adapter tree mirrors the base down to each targeted kernel, which becomes {"lora_a", "lora_b"}:
`decoder/layers/attn/q_proj/kernel/lora_a`. A stage with adapters keeps them in its params under `lora`
(`KEY`): {"vision": ..., "decoder": ..., "lora": adapters}; `split` separates the two.

QLoRA-style (`quantize_base`): the targeted base kernels are int8 and each one's float32 scales [*lead, *out]
(vlm_jax/model/quantize.py) sit beside its factors as `base_scale` (`SCALE`, frozen: not an adapter factor);
`apply` / `merge` dequantize before folding, so the rest of the library sees plain kernels.

Dropout (`dropout` > 0, training only): the adapters cannot be folded, since the branch's input is masked. The
step runs `apply_with_dropout`: each adapted `layers.Dense` gets lora_a / lora_b and a mask key per layer beside
its kernel (params, so the layer scan slices them; a Flax RNG stream would not pass the scan, which splits only
`params`), and a method interceptor adds dropout(x) A B alpha / r to the Dense's output.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlm_jax.config import ConfigError, LoraConfig
from vlm_jax.model import quantize
from vlm_jax.model.layers import Dense, matmul

KEY = "lora"
FACTORS = ("lora_a", "lora_b")  # the adapter leaves that train
SCALE = "base_scale"  # an int8 base kernel's scales, beside its factors
MASK_KEY = "lora_key"  # the dropout path's per-layer mask key, beside lora_a / lora_b in a Dense's params
LEAD_AXES = ("layers", "exp")  # logical names of the axes an adapter keeps one copy along
_TWO_INPUT_AXES = re.compile(r".*/(o_proj|attn/out)/kernel")  # [H, hd, D]
_PATCH_CONV = re.compile(r".*patch_embed/kernel")
_EXPERTS = re.compile(r".*/experts/(gate_up|down)")


def _paths(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in flat}


def _get(tree: Any, path: str) -> Any:
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _set(tree: dict, path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for k in parents:
    tree = tree.setdefault(k, {})
  tree[leaf] = value


def split_axes(path: str, shape: tuple[int, ...], logical: tuple[str | None, ...] | None = None) -> tuple[int, int]:
  """(number of leading axes, number of input axes) of a kernel; the rest are output axes. Leading axes are the
  scanned layer axis and the expert axis (read from `logical` names, else from the path)."""
  if logical is not None:
    lead = 0
    while lead < len(logical) and logical[lead] in LEAD_AXES:
      lead += 1
  else:
    lead = int("/layers/" in f"/{path}/") + int(bool(_EXPERTS.fullmatch(path)))
  if _TWO_INPUT_AXES.fullmatch(path):
    return lead, 2
  if _PATCH_CONV.fullmatch(path) and len(shape) - lead == 4:
    return lead, 3
  return lead, 1


def targetable(path: str, shape: tuple[int, ...]) -> bool:
  """Kernels (leaves named `kernel`, MoE expert stacks) with at least one input and one output axis."""
  lead, n_in = split_axes(path, shape)
  return (path.endswith("/kernel") or bool(_EXPERTS.fullmatch(path))) and len(shape) - lead > n_in


def target_paths(params: Any, cfg: LoraConfig) -> list[str]:
  """The '/'-joined paths of the kernels `cfg.targets` selects (a regex matching no kernel is a ConfigError)."""
  kernels = [p for p, x in _paths(params).items() if p.split("/")[0] != KEY and targetable(p, tuple(x.shape))]
  for pattern in cfg.targets:
    if not any(re.fullmatch(pattern, p) for p in kernels):
      raise ConfigError(f"lora.targets: {pattern!r} matches no kernel. Kernels are e.g. {kernels[:3]}; patterns "
                        f"must match the whole path, e.g. 'decoder/layers/attn/q_proj/kernel'.")
  return [p for p in kernels if any(re.fullmatch(r, p) for r in cfg.targets)]


def trained_in_full(params: Any, trainable: tuple[str, ...], cfg: LoraConfig) -> set[str]:
  """Paths of the base params a stage trains in full: those a `trainable` regex fully matches, less the kernels
  `cfg` adapts (they stay frozen; their adapters train). params: the base tree (arrays or ShapeDtypeStructs)."""
  adapted = set(target_paths(params, cfg)) if cfg.rank else set()
  return {p for p in _paths(params) if p not in adapted and any(re.fullmatch(r, p) for r in trainable)}


def adapter_shapes(path: str, shape: tuple[int, ...], rank: int,
                   logical: tuple[str | None, ...] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(lora_a shape [*lead, *in, r], lora_b shape [*lead, r, *out]) for a kernel of `shape`."""
  lead, n_in = split_axes(path, shape, logical)
  return shape[:lead + n_in] + (rank,), shape[:lead] + (rank,) + shape[lead + n_in:]


def abstract(shapes: Any, logical: Any, cfg: LoraConfig) -> tuple[Any, Any]:
  """(ShapeDtypeStruct tree, logical PartitionSpec tree) of the adapters of a base given as ShapeDtypeStructs and
  its logical specs. lora_a takes the base's leading and input axis names + None (the rank axis is replicated);
  lora_b its leading names + None + its output names, so each factor is sharded like the side of W it spans."""
  flat, _ = jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, P))
  specs = {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(s) for p, s in flat}
  base = _paths(shapes)
  out_shapes, out_specs = {}, {}
  for path in target_paths(shapes, cfg):
    x = base[path]
    names = specs[path] + (None,) * (len(x.shape) - len(specs[path]))
    lead, n_in = split_axes(path, x.shape, names)
    a, b = adapter_shapes(path, tuple(x.shape), cfg.rank, names)
    _set(out_shapes, f"{path}/lora_a", jax.ShapeDtypeStruct(a, x.dtype))
    _set(out_shapes, f"{path}/lora_b", jax.ShapeDtypeStruct(b, x.dtype))
    _set(out_specs, f"{path}/lora_a", P(*names[:lead + n_in], None))
    _set(out_specs, f"{path}/lora_b", P(*names[:lead], None, *names[lead + n_in:]))
    if cfg.quantize_base:  # scales [*lead, *out]: sharded like the kernel's output side
      _set(out_shapes, f"{path}/{SCALE}", jax.ShapeDtypeStruct(quantize.scale_shape(x.shape, lead, n_in),
                                                               jnp.float32))
      _set(out_specs, f"{path}/{SCALE}", P(*names[:lead], *names[lead + n_in:]))
  return out_shapes, out_specs


def with_abstract(shapes: Any, logical: Any, cfg: LoraConfig) -> tuple[Any, Any]:
  """(shapes, logical specs) of the param tree a stage with `cfg` trains: the base's, plus its adapters' under
  `lora` when cfg.rank > 0; with quantize_base the targeted kernels are int8."""
  if not cfg.rank:
    return shapes, logical
  adapter_shapes, adapter_logical = abstract(shapes, logical, cfg)
  if cfg.quantize_base:
    shapes = jax.tree.map(lambda x: x, shapes)  # a new tree; the targets are replaced below
    for path in target_paths(shapes, cfg):
      _set(shapes, path, jax.ShapeDtypeStruct(_get(shapes, path).shape, jnp.int8))
  return {**shapes, KEY: adapter_shapes}, {**logical, KEY: adapter_logical}


def is_factor(path: str) -> bool:
  """Whether a '/'-joined param path is an adapter factor (trains), e.g. 'lora/.../kernel/lora_a'."""
  return path.startswith(f"{KEY}/") and path.rsplit("/", 1)[-1] in FACTORS


def init(params: Any, cfg: LoraConfig, rng: jax.Array) -> dict[str, Any]:
  """Fresh adapters for `params` (arrays or ShapeDtypeStructs): lora_a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
  fan_in the product of the input axes (PEFT's kaiming_uniform(a=sqrt(5)) on lora_A), lora_b = 0; the base's
  dtype (float32 for an int8 base). Each kernel's key is fold_in(rng, its index in path order)."""
  base = _paths(params)
  out: dict[str, Any] = {}
  for i, path in enumerate(target_paths(params, cfg)):
    x = base[path]
    lead, n_in = split_axes(path, tuple(x.shape))
    a_shape, b_shape = adapter_shapes(path, tuple(x.shape), cfg.rank)
    bound = 1.0 / math.sqrt(math.prod(x.shape[lead:lead + n_in]))
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    a = jax.random.uniform(jax.random.fold_in(rng, i), a_shape, jnp.float32, -bound, bound).astype(dtype)
    _set(out, f"{path}/lora_a", a)
    _set(out, f"{path}/lora_b", jnp.zeros(b_shape, dtype))
  return out


def quantize_targets(params: Any, adapters: Any, cfg: LoraConfig) -> tuple[Any, Any]:
  """(params with the kernels `adapters` adapt in int8, adapters with each one's `base_scale`) from a float base."""
  params, adapters = jax.tree.map(lambda x: x, (params, adapters))  # new trees; leaves replaced below
  for path in _adapted(adapters):
    w = _get(params, path)
    q, scale = quantize.quantize(w, *split_axes(path, tuple(w.shape)))
    _set(params, path, q)
    _set(adapters, f"{path}/{SCALE}", scale)
  return params, adapters


def _adapted(adapters: Any) -> list[str]:
  """The kernel paths an adapter tree adapts."""
  return [p[:-len("/lora_a")] for p in _paths(adapters) if p.endswith("/lora_a")]


def _base_kernel(params: Any, adapters: Any, path: str, dtype: Any) -> jax.Array:
  """The base kernel at `path` in `dtype`, dequantized when the adapters hold its scales."""
  w, ab = _get(params, path), _get(adapters, path)
  if SCALE in ab:
    return quantize.dequantize(w, ab[SCALE], *split_axes(path, tuple(w.shape)), dtype)
  return w.astype(dtype)


def dequantized(params: Any, adapters: Any, dtype: Any = jnp.float32) -> Any:
  """`params` with every int8 kernel of a quantize_base stage dequantized to `dtype` (the others unchanged)."""
  out = jax.tree.map(lambda x: x, params)
  for path in _adapted(adapters):
    if SCALE in _get(adapters, path):
      _set(out, path, _base_kernel(params, adapters, path, dtype))
  return out


def delta(kernel_shape: tuple[int, ...], a: jax.Array, b: jax.Array, scale: float,
          dtype: Any = jnp.float32) -> jax.Array:
  """scale * A @ B reshaped to the kernel's shape, the product in `dtype` with float32 accumulation."""
  r = a.shape[-1]
  lead = a.ndim + b.ndim - 2 - len(kernel_shape)  # a: [*lead, *in, r], b: [*lead, r, *out]
  a2 = a.astype(dtype).reshape(*a.shape[:lead], math.prod(a.shape[lead:-1]), r)
  b2 = b.astype(dtype).reshape(*b.shape[:lead], r, -1)
  product = jnp.matmul(a2, b2, preferred_element_type=jnp.float32)
  return (scale * product).reshape(kernel_shape)


def _fold(params: Any, adapters: Any, cfg: LoraConfig, dtype: Any, cast_base: bool) -> Any:
  out = jax.tree.map(lambda x: x, params)  # a new tree; the kernels are replaced below
  for kernel_path in _adapted(adapters):
    ab = _get(adapters, kernel_path)
    w = _get(params, kernel_path)
    d = delta(w.shape, ab["lora_a"], ab["lora_b"], cfg.alpha / cfg.rank, dtype)
    if SCALE in ab:  # int8: dequantized to the compute dtype (apply) or float32 (merge)
      w = _base_kernel(params, adapters, kernel_path, dtype if cast_base else jnp.float32)
    _set(out, kernel_path, w.astype(dtype) + d.astype(dtype) if cast_base else (w + d).astype(w.dtype))
  return out


def apply(params: Any, adapters: Any, cfg: LoraConfig, dtype: Any = jnp.float32) -> Any:
  """The params the model runs with: each targeted kernel becomes W + scale * A @ B, in `dtype` (the model's
  compute dtype: the kernel is rounded to it there anyway); everything else is `params` unchanged. Differentiable
  in the adapters (and in W)."""
  return _fold(params, adapters, cfg, jnp.dtype(dtype), cast_base=True)


def merge(params: Any, adapters: Any, cfg: LoraConfig) -> Any:
  """The base with the adapters folded in, in the base's dtype (float32 product; float32 for an int8 base): a
  plain param tree."""
  return _fold(params, adapters, cfg, jnp.float32, cast_base=False)


def split(params: Any) -> tuple[Any, Any]:
  """(base params, adapters or None) of a param tree that may hold adapters under `lora`."""
  if isinstance(params, dict) and KEY in params:
    return {k: v for k, v in params.items() if k != KEY}, params[KEY]
  return params, None


def merged(params: Any, cfg: LoraConfig) -> Any:
  """A param tree with or without adapters under `lora` -> the plain merged tree."""
  base, adapters = split(params)
  return base if adapters is None else merge(base, adapters, cfg)


# ---------------------------------------------------------------------------------------------------
# Dropout: the unfolded path, x W + dropout(x) A B alpha / r, while training


def same_adapters(a: LoraConfig, b: LoraConfig) -> bool:
  """Whether adapters trained under `a` continue unchanged under `b` (dropout acts only while training)."""
  unmasked = lambda c: dataclasses.replace(c, dropout=0.0, dropout_seed=0)
  return unmasked(a) == unmasked(b)


def unfolded(params: Any, adapters: Any, dtype: Any, rng: jax.Array) -> Any:
  """The params the dropout path runs with: the base (int8 kernels dequantized to `dtype`) and, beside each
  adapted kernel in its module, lora_a, lora_b and `lora_key` (uint32 [*lead, 2]: one mask key per layer /
  expert, from fold_in(rng, the kernel's index in path order))."""
  out = dequantized(params, adapters, dtype)
  for i, path in enumerate(_adapted(adapters)):
    if not path.endswith("/kernel"):
      raise ConfigError(f"lora.dropout > 0 needs every target to be a Dense kernel; {path} is not (MoE expert "
                        "stacks have no dropout path): drop it from lora.targets or set lora.dropout=0.")
    module, ab, shape = path[:-len("/kernel")], _get(adapters, path), tuple(_get(params, path).shape)
    lead = shape[:split_axes(path, shape)[0]]
    keys = jax.random.split(jax.random.fold_in(rng, i), math.prod(lead))
    _set(out, f"{module}/lora_a", ab["lora_a"])
    _set(out, f"{module}/lora_b", ab["lora_b"])
    _set(out, f"{module}/{MASK_KEY}", keys.reshape(*lead, *keys.shape[1:]))
  return out


def dropout_branch(x: jax.Array, a: jax.Array, b: jax.Array, key: jax.Array, rate: float, scale: float,
                   dtype: Any) -> jax.Array:
  """dropout(x) A B * scale in `dtype`: x [..., *in] keeps each element with probability 1 - rate, scaled by
  1 / (1 - rate) (PEFT's nn.Dropout); a [*in, r], b [r, *out]."""
  n_in = a.ndim - 1
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  x = jnp.where(keep, x.astype(dtype) / jnp.asarray(1.0 - rate, dtype), jnp.zeros((), dtype))
  return matmul(matmul(x, a, n_in), b, 1) * jnp.asarray(scale, dtype)


def _interceptor(cfg: LoraConfig, called: dict[str, bool], calls: dict[Any, int]) -> Callable[..., Any]:
  """Adds the dropout branch to each Dense holding lora_a; records every module called (True where adapted).
  A Dense called n times in one layer (the chunked MLP) folds n into its key: calls are counted per scope,
  which a new trace of the layer makes afresh."""
  def intercept(next_fun, args, kwargs, context):
    module, y = context.module, next_fun(*args, **kwargs)
    path = "/".join(module.path)
    adapted = (context.method_name == "__call__" and isinstance(module, Dense)
               and module.has_variable("params", "lora_a"))
    called[path] = called.get(path, False) or adapted
    if not adapted:
      return y
    a, b, key = (module.get_variable("params", n) for n in ("lora_a", "lora_b", MASK_KEY))
    n = calls[module.scope] = calls.get(module.scope, -1) + 1
    key = jax.random.fold_in(key, n) if n else key
    branch = dropout_branch(args[0], a, b, key, cfg.dropout, cfg.alpha / cfg.rank, module.dtype)
    return y + branch.astype(y.dtype)
  return intercept


def apply_with_dropout(model: nn.Module, params: Any, adapters: Any, cfg: LoraConfig, rng: jax.Array,
                       dtype: Any, *args, **kwargs) -> Any:
  """`model.apply({"params": ...}, *args, **kwargs)` with the adapters unfolded and their input dropped out
  (masks from `rng`). A targeted kernel whose module runs but is not a `layers.Dense` (the ViT's patch nn.Conv,
  the untied lm_head) is a ConfigError rather than an adapter silently left out."""
  called: dict[str, bool] = {}
  with nn.intercept_methods(_interceptor(cfg, called, {})):
    out = model.apply({"params": unfolded(params, adapters, dtype, rng)}, *args, **kwargs)
  skipped = [p for p in _adapted(adapters) if called.get(p[:-len("/kernel")]) is False]
  if skipped:
    raise ConfigError(f"lora.dropout > 0: {skipped} are not kernels of Dense layers (vlm_jax/model/layers.py), "
                      "which the dropout path needs; drop them from lora.targets or set lora.dropout=0.")
  return out
