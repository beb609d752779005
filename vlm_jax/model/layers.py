"""Building blocks shared by the towers: norms, activations by name, dense layers with logical axes, remat.

Every param carries logical axis names (see `vlm_jax.sharding.LOGICAL_AXIS_RULES`); params are float32 and
the compute dtype is passed in. Norm statistics are always computed in float32. The products, norm scales and
biases go through vlm_jax/model/kernels (`model.kernels` picks the backend's implementation).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.model.kernels import add_bias, matmul, scale_features, swiglu, unembed  # noqa: F401 (re-exported)

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU (torch "gelu")
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # torch "gelu_pytorch_tanh"
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function called `name` (gelu, gelu_tanh, quick_gelu, relu, silu)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def logical(init: Callable[..., Any], axes: Sequence[str | None]) -> Callable[..., Any]:
  """An initializer whose param is annotated with logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names (a no-op outside a mesh / rules context)."""
  return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
  """y = x . kernel (+ bias): contracts the trailing `len(in_axes)` dims of x with a float32 kernel of Flax
  layout [*in, *features], whose dims are named by `axes`; the bias (shape `features`) takes the trailing names.

  Our own, rather than nn.DenseGeneral: that one initializes a flat 2-D kernel and reshapes it, which breaks
  logical-partitioning boxes under a global mesh (flax re-runs param inits abstractly to check shapes).
  """
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  num_in: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  float32_out: bool = False  # return the float32 accumulator (the output head)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = self.num_in, len(self.features)
    init = nn.initializers.lecun_normal(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    shape = tuple(x.shape[x.ndim - n_in:]) + tuple(self.features)
    kernel = self.param("kernel", logical(init, self.axes), shape, jnp.float32)
    y = matmul(x.astype(self.dtype), kernel, n_in, self.float32_out)
    if self.use_bias:
      bias = self.param("bias", logical(nn.initializers.zeros_init(), self.axes[n_in:]), self.features, jnp.float32)
      y = add_bias(y, bias, n_out)
    return y


def dense(features: int | Sequence[int], axes: Sequence[str | None], *, name: str, dtype: Dtype,
          num_in: int = 1, use_bias: bool = True, float32_out: bool = False) -> Dense:
  """A `Dense` on the trailing `num_in` input dims, e.g. dense((H, hd), ("embed", "heads", "head_dim"))."""
  features = (features,) if isinstance(features, int) else tuple(features)
  return Dense(features, tuple(axes), num_in=num_in, use_bias=use_bias, dtype=dtype, float32_out=float32_out,
               name=name)


class Embed(nn.Module):
  """Token embedding table [num_embeddings, features] named (table_vocab, `axis`) for sharding.

  The lookup first gathers the whole table onto every device (FSDP-style weight all-gather): gathering rows
  of a table sharded on its feature axis into batch-sharded activations otherwise makes XLA replicate
  the result ("Involuntary full rematerialization").
  """
  num_embeddings: int
  features: int
  axis: str = "embed"
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", logical(nn.initializers.normal(0.02), ("table_vocab", self.axis)),
                                (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids int [...] -> [..., features] in the compute dtype."""
    table = constrain(self.embedding.astype(self.dtype), ("table_vocab", None))
    return jnp.take(table, ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output head: x [..., features] -> float32 [..., num_embeddings]."""
    return unembed(x.astype(self.dtype), self.embedding)


class RMSNorm(nn.Module):
  """Llama RMSNorm with HF numerics: normalize in float32, cast to the compute dtype, then scale."""
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale_features(x32.astype(self.dtype), scale)


class LayerNorm(nn.Module):
  """LayerNorm with a two-pass float32 variance (matches torch to ~1e-7; Flax's default fast variance
  E[x^2]-E[x]^2 does not)."""
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", logical(nn.initializers.ones_init(), ("norm",)), (width,), jnp.float32)
    bias = self.param("bias", logical(nn.initializers.zeros_init(), ("norm",)), (width,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


# Names the decoder gives its projections' outputs (jax.ad_checkpoint.checkpoint_name), as MaxText does. Only the
# decoder names them: a ViT or text-tower block under a named policy keeps its input alone, as with full.
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
ATTENTION_NAMES = QKV_NAMES + ("out_proj",)
MLP_NAMES = ("mlp_gate", "mlp_up", "mlp_down")
_save = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "minimal": _save(*ATTENTION_NAMES, *MLP_NAMES),  # keep every named projection, recompute attention itself
    "save_dot_except_mlp": _save(*ATTENTION_NAMES),  # keep q/k/v and attention out, recompute the MLP
    "save_qkv_proj": _save(*QKV_NAMES),  # keep q/k/v only
    # TPU / GPU: q/k/v and attention out go to pinned host memory in the forward pass and come back for backward.
    # XLA:CPU has no memory but host RAM: there it compiles to save_dot_except_mlp's program (tests/test_remat.py).
    "offload_dot_except_mlp": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(ATTENTION_NAMES), offload_src="device",
        offload_dst="pinned_host"),
}


def maybe_remat(block: type[nn.Module], remat: str, scanned: bool) -> type[nn.Module]:
  """Wraps a layer class in `nn.remat` with the named policy ('none' returns it unchanged)."""
  if remat == "none":
    return block
  if remat not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat {remat!r}; choose none, {', '.join(REMAT_POLICIES)}.")
  # Inside scan the loop already stops XLA from CSE-ing the recomputation away.
  return nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


def stack_layers(block: type[nn.Module], block_kwargs: dict[str, Any], *, num_layers: int, scanned: bool,
                 remat: str, count: int | None = None, broadcast_args: int = 0,
                 cache: bool = False) -> Callable[..., Any]:
  """Returns f(x, *broadcast) that runs layers 0..count-1 of a stack of `num_layers` `block`s.

  Call it inside a compact method. `block(**block_kwargs)` has `__call__(x, *broadcast) -> (x, None)`.
  Pass `count=num_layers` while initializing so that every layer's params get created.
  Scanned: params (and the 'cache' collection when `cache`) live under `layers` with a leading axis named
  'layers'; unscanned under `layers_0`, `layers_1`, .... With `count < num_layers` (e.g. a ViT read at an
  earlier `feature_layer`) the later layers keep their params but are not computed.
  """
  count = num_layers if count is None else count
  block = maybe_remat(block, remat, scanned)
  if not scanned:
    layers = [block(name=f"layers_{i}", **block_kwargs) for i in range(num_layers)]

    def run(x, *args):
      for layer in layers[:count]:
        x, _ = layer(x, *args)
      return x
    return run

  def scanned_stack(length):
    return nn.scan(block, length=length, variable_axes={"params": 0, "cache": 0} if cache else {"params": 0},
                   split_rngs={"params": True}, in_axes=(nn.broadcast,) * broadcast_args,
                   metadata_params={nn.PARTITION_NAME: "layers"})

  if count == num_layers:
    stack = scanned_stack(num_layers)(name="layers", **block_kwargs)
  else:
    # Read only the first `count` layer slices of the stacked params (init still creates all of them).
    sliced = nn.map_variables(scanned_stack(count), "params",
                              trans_in_fn=lambda v: jax.tree.map(lambda a: a[:count], v))
    stack = sliced(name="layers", **block_kwargs)

  def run(x, *args):
    if count == 0:
      return x
    x, _ = stack(x, *args)
    return x
  return run
