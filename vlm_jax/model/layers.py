"""Building blocks shared by the towers: norms, activations by name, dense layers with logical axes, remat.

Every param carries logical axis names (see `vlm_jax.sharding.LOGICAL_AXIS_RULES`); params are float32 and
the compute dtype is passed in. Norm statistics are always computed in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def _dims(lhs_contract, rhs_contract):
  return ((tuple(lhs_contract), tuple(rhs_contract)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x: jax.Array, kernel: jax.Array, n_in: int, float32_out: bool = False) -> jax.Array:
  """x [..., *in] . kernel [*in, *out] (float32 master weights) -> [..., *out] in x's dtype (bf16 or f32), or
  with `float32_out` the float32 accumulator itself (the output head: the loss reads float32 logits, and rounding
  them to bf16 first cost a bf16 copy and a float32 copy of [B, S, V] per step).

  Every product takes x's dtype for its inputs and accumulates in float32 (for bf16: bf16 x bf16 -> f32, then one
  rounding), forward and backward, and the kernel gradient comes out in float32, unrounded, as x^T . g in the
  kernel's own layout. Plain autodiff does worse on XLA:CPU for both dtypes: with bf16 it runs the backward on
  float32 cotangents (f32 dots, 2-3x slower than bf16 -> f32 ones); with f32 it writes the kernel gradient as
  (g^T . x)^T, an [out, in] product and then a transpose copy (bench_cpu's f32 train step 3.28 -> 2.37 s).
  """
  return _matmul_fwd(x, kernel, n_in, float32_out)[0]


def _matmul_fwd(x, kernel, n_in, float32_out):
  k = kernel.astype(x.dtype)
  y = jax.lax.dot_general(x, k, _dims(range(x.ndim - n_in, x.ndim), range(n_in)),
                          preferred_element_type=jnp.float32)
  return (y if float32_out else y.astype(x.dtype)), (x, k)


def _matmul_bwd(n_in, float32_out, residuals, g):
  x, k = residuals
  g = g.astype(x.dtype)
  batch, n_out = x.ndim - n_in, k.ndim - n_in
  dx = jax.lax.dot_general(g, k, _dims(range(batch, batch + n_out), range(n_in, k.ndim)),
                           preferred_element_type=jnp.float32)
  dk = jax.lax.dot_general(x, g, _dims(range(batch), range(batch)), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def unembed(x: jax.Array, table: jax.Array) -> jax.Array:
  """x [..., D] . table [V, D]^T (a float32 embedding table) -> the float32 accumulator [..., V]: a tied output
  head, with `matmul`'s numerics (x's dtype in, float32 sums, bf16 cotangents for bf16 x).

  The table's gradient comes out [V, D], in its own layout, as g^T . x. Written as `matmul(x, table.T)` it came
  out [D, V] and was transposed back: a copy of the whole table every step.
  """
  return _unembed_fwd(x, table)[0]


def _unembed_fwd(x, table):
  t = table.astype(x.dtype)
  return jax.lax.dot_general(x, t, _dims([x.ndim - 1], [1]), preferred_element_type=jnp.float32), (x, t)


def _unembed_bwd(residuals, g):
  x, t = residuals
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, t, _dims([g.ndim - 1], [0]), preferred_element_type=jnp.float32)
  rows = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
  return dx.astype(x.dtype), jax.lax.dot_general(*rows, _dims([0], [0]), preferred_element_type=jnp.float32)


unembed.defvjp(_unembed_fwd, _unembed_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, computed in float32 and returned in gate's dtype: Llama's MLP activation.

  Forward and backward each run as one float32 pass with one rounding at the end. Autodiff of
  `nn.silu(gate) * up` in bf16 rounds after every op of the sigmoid and its derivative; on XLA:CPU that also ran
  2x slower (bench_cpu, [2048, 1536]: forward 3.0 -> 1.35 ms, backward 4.3 -> 2.0 ms).
  """
  return _swiglu_fwd(gate, up)[0]


def _swiglu_fwd(gate, up):
  g = gate.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype), (gate, up)


def _swiglu_bwd(residuals, d):
  gate, up = residuals
  g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), d.astype(jnp.float32)
  s = jax.nn.sigmoid(g)
  return (d * u * s * (1 + g * (1 - s))).astype(gate.dtype), (d * g * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def scale_features(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x [..., D] * scale [D] (a float32 param, cast to x's dtype first) -> x's dtype: a norm's learned scale.

  Its gradient, the sum over every position of g * x, is a ones-vector dot in float32: autodiff's reduce over
  the B*S positions is rewritten by XLA:CPU into a reduce-window that took ~3 ms per norm on bench_cpu.
  """
  return _scale_features_fwd(x, scale)[0]


def _scale_features_fwd(x, scale):
  return scale.astype(x.dtype) * x, (x, scale)


def _scale_features_bwd(residuals, g):
  x, scale = residuals
  return g * scale.astype(g.dtype), _sum_over_positions(g.astype(jnp.float32) * x.astype(jnp.float32), 1)


def _sum_over_positions(x: jax.Array, n_features: int) -> jax.Array:
  """x [..., *F] summed over every leading dim -> float32 [*F] (F = the trailing n_features dims), as a
  ones-vector dot with float32 accumulation: XLA:CPU rewrites a plain reduce over many positions into a float32
  copy and a slow reduce-window. The gradient of a per-feature parameter (norm scale, bias)."""
  features = x.shape[x.ndim - n_features:]
  rows = x.reshape(-1, math.prod(features))
  return jnp.dot(jnp.ones(rows.shape[0], x.dtype), rows, preferred_element_type=jnp.float32).reshape(features)


scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def add_bias(y: jax.Array, bias: jax.Array, n_out: int) -> jax.Array:
  """y [..., *F] + bias [*F] (a float32 param, cast to y's dtype first; F = the trailing n_out dims).

  The bias gradient, the sum of g over every position, is a ones-vector dot with float32 accumulation, rounded
  to y's dtype as autodiff's (the cast's transpose) is. Autodiff's reduce became a float32 copy of g and a
  reduce-window on XLA:CPU: 31 of 327 busy thread-ms in the demo's captioning step (ViT trainable); with this,
  that step took 0.209 / 0.213 s instead of 0.229 / 0.237 s.
  """
  return _add_bias_fwd(y, bias, n_out)[0]


def _add_bias_fwd(y, bias, n_out):
  return y + bias.astype(y.dtype), None


def _add_bias_bwd(n_out, _, g):
  return g, _sum_over_positions(g, n_out).astype(g.dtype).astype(jnp.float32)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


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
  float32_out: bool = False  # return the float32 accumulator (see `matmul`)

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


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
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
