"""Remat policies (layers.REMAT_POLICIES): what each one's backward pass keeps of a decoder layer, by checkpoint
name and shape, that every one gives the no-remat gradients, and where offload_dot_except_mlp puts its residuals
on CPU (the same RAM: it runs as save_dot_except_mlp) and on TPU (host memory, from a libtpu compile)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints, as data
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fixtures_numerics import assert_trees_f32_close
from vlm_jax.compile_cache import fresh_compiles
from vlm_jax.config import DecoderConfig
from vlm_jax.model import kernels
from vlm_jax.model.attention import make_attention_mask
from vlm_jax.model.decoder import DecoderLayer
from vlm_jax.model.layers import ATTENTION_NAMES, MLP_NAMES, QKV_NAMES, REMAT_POLICIES, maybe_remat, stack_layers
from vlm_jax.model.vision import EncoderBlock

CFG = DecoderConfig(vocab_size=64, width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96, max_seq_len=64)
B, S, HD = 2, 16, 8
SHAPES = {"query_proj": (B, S, 4, HD), "key_proj": (B, S, 2, HD), "value_proj": (B, S, 2, HD), "out_proj": (B, S, 32),
          "mlp_gate": (B, S, 96), "mlp_up": (B, S, 96)}
SEGMENTS = jnp.ones((B, S), jnp.int32)
POSITIONS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
MASK = make_attention_mask(SEGMENTS, SEGMENTS)
X = jax.random.normal(jax.random.key(0), (B, S, CFG.width))


def layer_loss(policy, cfg=CFG, seq=S):
  """(params, x [B, seq, width]) -> sum of squares of one DecoderLayer under `policy`."""
  layer = maybe_remat(DecoderLayer, policy, scanned=False)(cfg, jnp.float32)
  segments = jnp.ones((B, seq), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (B, seq))
  mask = make_attention_mask(segments, segments)
  return lambda params, x: jnp.sum(layer.apply(params, x, positions, mask, None, segments)[0] ** 2)


def layer_params(cfg=CFG, seq=S):
  x, segments = jnp.zeros((B, seq, cfg.width)), jnp.ones((B, seq), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (B, seq))
  return DecoderLayer(cfg, jnp.float32).init(jax.random.key(1), x, positions, make_attention_mask(segments, segments),
                                             None, segments)


def activations(fn, *args):
  """The residuals the backward pass of fn keeps that are computed in the forward pass (not params, constants,
  the input x, nor the loss's own 2*y): [(checkpoint name or the op, shape, memory space)]."""
  out = []
  for aval, source in saved_residuals(fn, *args):
    ours = __file__ in source and "device_put" not in source  # the loss's 2*y
    if ours or source.startswith(("from the argument", "from a constant", "from a literal")):
      continue
    named = re.match(r"named '(\w+)'", source)
    op = re.match(r"output of (?:jitted function ')?(\w+)", source)
    out.append((named.group(1) if named else op.group(1), aval.shape, str(aval.memory_space).split(".")[-1]))
  return out


def test_every_policy_is_tested():
  assert set(REMAT_POLICIES) == {"full", "dots", "minimal", "save_dot_except_mlp", "save_qkv_proj",
                                 "offload_dot_except_mlp"}
  with pytest.raises(ValueError, match="Unknown remat 'save_all'; choose none, full, dots"):
    maybe_remat(DecoderLayer, "save_all", scanned=False)


@pytest.mark.parametrize("policy,names", [
    ("full", ()),  # the layer input alone (an argument, not listed)
    ("save_qkv_proj", QKV_NAMES),
    ("save_dot_except_mlp", ATTENTION_NAMES),
    # mlp_down is named too, but its only consumer is the residual add: backward needs nothing of it.
    ("minimal", ATTENTION_NAMES + MLP_NAMES[:2]),
])
def test_named_policies_keep_exactly_their_names(policy, names):
  with kernels.use("plain"):  # the TPU / GPU path (autodiff, no hand-written VJPs)
    saved = activations(layer_loss(policy), layer_params(), X)
  assert saved == [(n, SHAPES[n], "Device") for n in names]


def test_dots_keeps_every_matmul_output_and_none_keeps_everything():
  with kernels.use("plain"):
    dots = activations(layer_loss("dots"), layer_params(), X)
    none = activations(layer_loss("none"), layer_params(), X)
  # q, k, v, the scores [B, KV, S, G, S] and probabilities . v of attention, o, gate, up: matmuls only.
  assert [op for op, _, _ in dots] == ["dot_general"] * 8
  assert sorted(shape for _, shape, _ in dots) == sorted([SHAPES["query_proj"], SHAPES["key_proj"],
                                                          SHAPES["value_proj"], (B, 2, S, 2, S), (B, 2, HD, 2, S),
                                                          (B, S, 32), (B, S, 96), (B, S, 96)])
  ops = [op for op, _, _ in none]
  assert {"mlp_gate", "mlp_up", "value_proj", "rsqrt", "exp", "sin", "cos", "silu"} <= set(ops)
  assert (B, 2, 2, S, S) in [shape for _, shape, _ in none]  # attention probabilities: S x S per head
  assert len(none) == 33 and len(dots) < len(none)


def test_offload_keeps_attention_names_in_host_memory():
  with kernels.use("plain"):
    saved = activations(layer_loss("offload_dot_except_mlp"), layer_params(), X)
  assert saved == [("device_put", SHAPES[n], "Host") for n in ATTENTION_NAMES]


def test_scanned_stack_keeps_names_per_layer():
  """Under nn.scan (the TPU path) the policy still applies: save_qkv_proj keeps q/k/v stacked [layers, ...]
  beside the carried layer inputs; full keeps the carried inputs only."""
  class Stack(nn.Module):
    policy: str

    @nn.compact
    def __call__(self, x):
      run = stack_layers(DecoderLayer, dict(config=CFG, dtype=jnp.float32), num_layers=2, scanned=True,
                         remat=self.policy, broadcast_args=4)
      return run(x, POSITIONS, MASK, None, SEGMENTS)

  def saved(policy):
    model = Stack(policy)
    params = model.init(jax.random.key(1), X)
    return sorted(shape for _, shape, _ in activations(lambda p, x: jnp.sum(model.apply(p, x) ** 2), params, X))
  with kernels.use("plain"):
    assert saved("full") == [(2, B, S, 32)]
    assert saved("save_qkv_proj") == sorted([(2, B, S, 32)] + [(2, *SHAPES[n]) for n in QKV_NAMES])


def test_named_policies_keep_nothing_of_a_vit_block():
  """Only the decoder names its tensors: a ViT / text-tower block under a named policy keeps its input alone
  (as with full)."""
  block = maybe_remat(EncoderBlock, "minimal", scanned=False)(num_heads=2, mlp_dim=64, eps=1e-6, act="gelu_tanh",
                                                               dtype=jnp.float32)
  params = block.init(jax.random.key(1), X)
  with kernels.use("plain"):
    assert activations(lambda p, x: jnp.sum(block.apply(p, x)[0] ** 2), params, X) == []


@pytest.mark.parametrize("kernel_set", ["plain", "cpu"])
def test_every_policy_gives_the_no_remat_gradients(kernel_set):
  policies = ("none", *REMAT_POLICIES)
  with kernels.use(kernel_set):
    params = layer_params()
    # One program for all policies: one compile instead of seven.
    grads = jax.jit(lambda p, x: [jax.grad(layer_loss(policy), argnums=(0, 1))(p, x) for policy in policies])(
        params, X)
  reference = grads[0]
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(reference)) > 1e-2
  for policy, got in zip(policies[1:], grads[1:]):
    assert_trees_f32_close({policy: got}, {policy: reference})  # the path names the policy


def test_offload_on_cpu_runs_as_save_dot_except_mlp():
  """XLA:CPU has no memory apart from host RAM: the offloading policy compiles to a program with no host buffers
  and the same temporaries as save_dot_except_mlp (its residuals stay where they are)."""
  with kernels.use("plain"):
    params = layer_params()
    memory = {p: jax.jit(jax.grad(layer_loss(p))).lower(params, X).compile().memory_analysis()
              for p in ("full", "save_dot_except_mlp", "offload_dot_except_mlp")}
  offload, saving = memory["offload_dot_except_mlp"], memory["save_dot_except_mlp"]
  assert offload.host_temp_size_in_bytes == 0
  assert offload.temp_size_in_bytes == saving.temp_size_in_bytes != memory["full"].temp_size_in_bytes


@pytest.mark.tpu
def test_offload_on_tpu_moves_the_attention_residuals_to_host_memory():
  """Compiled for one v5e chip (libtpu, no TPU): q/k/v and attention out (float32) are XLA's host temporaries,
  to the byte, copied there asynchronously; save_dot_except_mlp keeps no host buffers. Widths and sequence are
  multiples of 128 so that TPU tiles pad nothing."""
  from vlm_jax import aot  # pylint: disable=import-outside-toplevel
  _, devices, _ = aot.topology_devices("v5e:2x2")
  replicated = NamedSharding(Mesh(np.array(devices[:1]), ("d",)), P())
  cfg = DecoderConfig(vocab_size=64, width=128, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=256,
                      max_seq_len=128)
  with kernels.use("plain"):
    shapes = jax.eval_shape(lambda: layer_params(cfg, 128))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)
    x = jax.ShapeDtypeStruct((B, 128, cfg.width), jnp.float32, sharding=replicated)
    with fresh_compiles():  # the persistent cache cannot load a topology's executable back
      compiled = {p: jax.jit(jax.grad(layer_loss(p, cfg, 128))).lower(params, x).compile()
                  for p in ("save_dot_except_mlp", "offload_dot_except_mlp")}
  offloaded = B * 128 * (4 * 32 + 2 * 32 + 2 * 32 + 128) * 4  # q, k, v, out: float32 [B, S, heads, head_dim]
  assert compiled["offload_dot_except_mlp"].memory_analysis().host_temp_size_in_bytes == offloaded
  assert compiled["save_dot_except_mlp"].memory_analysis().host_temp_size_in_bytes == 0
  assert compiled["offload_dot_except_mlp"].as_text().count("copy-start") >= len(ATTENTION_NAMES)
