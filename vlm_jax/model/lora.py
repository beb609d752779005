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
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlm_jax.config import ConfigError, LoraConfig

KEY = "lora"
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
  return out_shapes, out_specs


def with_abstract(shapes: Any, logical: Any, cfg: LoraConfig) -> tuple[Any, Any]:
  """(shapes, logical specs) of the param tree a stage with `cfg` trains: the base's, plus its adapters' under
  `lora` when cfg.rank > 0."""
  if not cfg.rank:
    return shapes, logical
  adapter_shapes, adapter_logical = abstract(shapes, logical, cfg)
  return {**shapes, KEY: adapter_shapes}, {**logical, KEY: adapter_logical}


def init(params: Any, cfg: LoraConfig, rng: jax.Array) -> dict[str, Any]:
  """Fresh adapters for `params` (arrays or ShapeDtypeStructs): lora_a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
  fan_in the product of the input axes (PEFT's kaiming_uniform(a=sqrt(5)) on lora_A), lora_b = 0; the base's
  dtype. Each kernel's key is fold_in(rng, its index in path order)."""
  base = _paths(params)
  out: dict[str, Any] = {}
  for i, path in enumerate(target_paths(params, cfg)):
    x = base[path]
    lead, n_in = split_axes(path, tuple(x.shape))
    a_shape, b_shape = adapter_shapes(path, tuple(x.shape), cfg.rank)
    bound = 1.0 / math.sqrt(math.prod(x.shape[lead:lead + n_in]))
    a = jax.random.uniform(jax.random.fold_in(rng, i), a_shape, jnp.float32, -bound, bound).astype(x.dtype)
    _set(out, f"{path}/lora_a", a)
    _set(out, f"{path}/lora_b", jnp.zeros(b_shape, x.dtype))
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
  for path, _ in _paths(adapters).items():
    if not path.endswith("/lora_a"):
      continue
    kernel_path = path[:-len("/lora_a")]
    ab = _get(adapters, kernel_path)
    w = _get(params, kernel_path)
    d = delta(w.shape, ab["lora_a"], ab["lora_b"], cfg.alpha / cfg.rank, dtype)
    _set(out, kernel_path, w.astype(dtype) + d.astype(dtype) if cast_base else (w + d).astype(w.dtype))
  return out


def apply(params: Any, adapters: Any, cfg: LoraConfig, dtype: Any = jnp.float32) -> Any:
  """The params the model runs with: each targeted kernel becomes W + scale * A @ B, in `dtype` (the model's
  compute dtype: the kernel is rounded to it there anyway); everything else is `params` unchanged. Differentiable
  in the adapters (and in W)."""
  return _fold(params, adapters, cfg, jnp.dtype(dtype), cast_base=True)


def merge(params: Any, adapters: Any, cfg: LoraConfig) -> Any:
  """The base with the adapters folded in, in the base's dtype (float32 product): a plain param tree."""
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
