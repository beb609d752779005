"""vlm_jax.model.kernels: the backend switch, the plain kernels against the CPU ones, the splash attention
kernel's own code (Pallas interpret mode) against the reference attention, and the CPU-only huge-page re-exec."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config, host_memory, losses
from vlm_jax.model import kernels
from vlm_jax.model import vlm as vlm_lib
from vlm_jax.model.attention import make_attention_mask
from vlm_jax.model.kernels import cpu, plain


def test_auto_resolves_by_backend_and_use_scopes_the_choice():
  assert jax.default_backend() == "cpu" and kernels.resolve("auto") == "cpu" and kernels.current() == "cpu"
  with kernels.use("plain") as name:
    assert name == "plain" == kernels.current()
    with kernels.use("tpu"):
      assert kernels.current() == "tpu"
    assert kernels.current() == "plain"
  assert kernels.current() == "cpu"
  with pytest.raises(ValueError, match="Unknown kernels 'gpu'"):
    kernels.resolve("gpu")
  with pytest.raises(config.ConfigError, match="model.kernels"):
    config.load("shapes_tiny", ["model.kernels=fast"])


@functools.partial(jax.jit, static_argnums=0)
def _vjp(fn, *args):
  out, back = jax.vjp(fn, *args)
  return out, back(jax.random.normal(jax.random.key(9), out.shape, out.dtype))


@pytest.mark.parametrize("name", ["matmul", "unembed", "swiglu", "scale_features", "add_bias", "attention"])
def test_plain_equals_cpu_kernels_in_float32(name):
  """Same values and gradients (float32) from plain autodiff and the hand-written CPU VJPs."""
  r = lambda i, *shape: jax.random.normal(jax.random.key(i), shape, jnp.float32)
  seg = jnp.asarray([[1] * 5 + [2] * 2 + [0], [1] * 8])
  mask = make_attention_mask(seg, seg)
  cases = {
      "matmul": (lambda m: lambda x, k: m.matmul(x, k, 2), (r(0, 2, 3, 4, 5), r(1, 4, 5, 6))),
      "unembed": (lambda m: m.unembed, (r(0, 2, 3, 8), r(1, 16, 8))),
      "swiglu": (lambda m: m.swiglu, (r(0, 3, 16), r(1, 3, 16))),
      "scale_features": (lambda m: m.scale_features, (r(0, 2, 3, 8), r(1, 8))),
      "add_bias": (lambda m: lambda y, b: m.add_bias(y, b, 2), (r(0, 2, 3, 4, 5), r(1, 4, 5))),
      "attention": (lambda m: lambda q, k, v: m.dot_product_attention(q, k, v, mask),
                    (r(0, 2, 8, 4, 16), r(1, 2, 8, 2, 16), r(2, 2, 8, 2, 16))),
  }
  make, args = cases[name]
  (y_cpu, g_cpu), (y_plain, g_plain) = _vjp(make(cpu), *args), _vjp(make(plain), *args)
  valid = (seg > 0)[:, :, None, None] if name == "attention" else True
  np.testing.assert_allclose(jnp.where(valid, y_plain, 0), jnp.where(valid, y_cpu, 0), rtol=1e-5, atol=1e-5)
  for a, b in zip(g_plain, g_cpu):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_model_kernels_setting_switches_the_whole_model():
  """A tiny VLM's loss and gradients are the same with model.kernels=plain and =cpu (float32), and the traced
  programs differ: the CPU one carries the custom VJPs."""
  tiny = ["model.dtype=float32", "model.decoder.num_layers=1", "model.vision.depth=1", "model.scan_layers=false"]
  cfgs = {k: config.load("shapes_tiny", tiny + [f"model.kernels={k}"]).model for k in ("cpu", "plain")}
  params = vlm_lib.init_params(cfgs["cpu"], jax.random.key(0))
  batch = vlm_lib.dummy_batch(cfgs["cpu"], 2, 16, 2)
  batch["input_ids"] = np.asarray(jax.random.randint(jax.random.key(1), (2, 16), 5, 500), np.int32)
  batch["labels"] = batch["input_ids"]
  batch["pixel_values"] = np.asarray(jax.random.normal(jax.random.key(2), batch["pixel_values"].shape))

  def loss(cfg):
    def f(p):
      return losses.token_cross_entropy(vlm_lib.VLM(cfg).apply({"params": p}, batch)["logits"], batch["labels"])[0]
    return f
  (l_cpu, g_cpu), (l_plain, g_plain) = (jax.jit(jax.value_and_grad(loss(cfgs[k])))(params) for k in ("cpu", "plain"))
  np.testing.assert_allclose(l_plain, l_cpu, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_cpu)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  jaxprs = {k: str(jax.make_jaxpr(loss(cfgs[k]))(params)) for k in cfgs}
  assert "custom_vjp_call" in jaxprs["cpu"] and "custom_vjp_call" not in jaxprs["plain"]


@functools.partial(jax.jit, static_argnums=0)
def _vjp_with(fn, g, *args):
  out, back = jax.vjp(fn, *args)
  return out, back(g)


def test_splash_kernel_in_interpret_mode_equals_reference_attention():
  """The TPU kernel's own code (Pallas interpret mode): causal, two packed segments and padding, GQA (2 query
  heads on 1 KV head), two 128-blocks (the masked upper block skipped); outputs and gradients at real tokens."""
  from vlm_jax.model.kernels import tpu  # pylint: disable=import-outside-toplevel
  b, s, h, kv, d = 1, 256, 2, 1, 64
  q, k, v, g = (jax.random.normal(jax.random.key(i), shape) for i, shape in
                enumerate([(b, s, h, d), (b, s, kv, d), (b, s, kv, d), (b, s, h, d)]))
  seg = jnp.asarray([[1] * 100 + [2] * 100 + [0] * 56])
  valid = (seg > 0)[:, :, None, None]
  g = g * valid  # padding outputs are garbage in both, and carry no loss
  assert tpu.supports(q, k) and tpu.block_sizes(s).block_q == 128
  splash = lambda q, k, v: tpu.splash_attention(q, k, v, seg, interpret=True)
  (out, grads), (ref, ref_grads) = (_vjp_with(f, g, q, k, v) for f in (
      splash, lambda q, k, v: plain.dot_product_attention(q, k, v, make_attention_mask(seg, seg))))
  np.testing.assert_allclose(jnp.where(valid, out, 0), jnp.where(valid, ref, 0), atol=2e-6)
  for name, a, e in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(a, e, atol=2e-5, err_msg=f"d{name}")

  # Bidirectional (the ViT's): 130 tokens padded to two blocks, the padding unseen.
  q, k, v, g = (x[:, :130, :1] for x in (q, k, v, g))
  assert tpu.supports(q, k, causal=False) and not tpu.supports(q, k)
  (out, grads), (ref, ref_grads) = (_vjp_with(f, g, q, k, v) for f in (
      lambda q, k, v: tpu.splash_attention(q, k, v, causal=False, interpret=True), plain.dot_product_attention))
  np.testing.assert_allclose(out, ref, atol=2e-6)
  for name, a, e in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(a, e, atol=2e-5, err_msg=f"bidirectional d{name}")


def test_huge_page_reexec_only_on_cpu_hosts(monkeypatch):
  assert host_memory.cpu_host({"JAX_PLATFORMS": "cpu"}) and not host_memory.cpu_host({"JAX_PLATFORMS": "tpu,cpu"})
  assert host_memory.tuned_env({"JAX_PLATFORMS": "tpu"}) is None
  assert host_memory.tuned_env({"JAX_PLATFORMS": "cuda"}) is None
  assert host_memory.tuned_env({"JAX_PLATFORMS": "cpu"})["GLIBC_TUNABLES"] == host_memory.TUNABLE
  monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: ["/dev/vfio/0"] if "vfio" in pattern else [])
  assert not host_memory.cpu_host({}) and host_memory.tuned_env({}) is None  # a TPU VM (v5e / v5p / v6e)
  calls = []
  monkeypatch.setattr(host_memory.os, "execve", lambda *args: calls.append(args))
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(host_memory.OPT_OUT, raising=False)
  host_memory.reexec_tuned()
  assert calls == []


def test_chunked_cross_entropy_equals_full_logits():
  """Sequence chunks (4 of 8 positions each, rematerialized) give today's loss and gradients to 1e-6 (float32),
  for the hidden states and the head weight; a VLM's lm_loss=True equals the loss of its logits."""
  b, s, d, vocab = 2, 8, 16, 32
  hidden = jax.random.normal(jax.random.key(0), (b, s, d))
  table = jax.random.normal(jax.random.key(1), (vocab, d))
  labels = jax.random.randint(jax.random.key(2), (b, s), 0, vocab).at[0, :3].set(losses.IGNORE_ID)
  head = lambda t: lambda h: kernels.unembed(h, t)
  full = lambda h, t: losses.token_cross_entropy(head(t)(h), labels)[0]
  chunked = lambda h, t: losses.chunked_token_cross_entropy(h, head(t), labels, chunk=4)[0]
  assert losses.chunk_length(8, 4) == 4 and losses.chunk_length(2048) == 512 and losses.chunk_length(96) == 96
  assert losses.chunk_length(1000) == 500
  (l_full, g_full), (l_chunk, g_chunk) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, table)
                                          for f in (full, chunked))
  np.testing.assert_allclose(l_chunk, l_full, rtol=1e-6)
  for a, e in zip(g_chunk, g_full):
    np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
  # unrolled (as an unscanned model runs it, for XLA's cost analysis): no loop left, the same loss and gradients
  unrolled = lambda h, t: losses.chunked_token_cross_entropy(h, head(t), labels, chunk=4, unroll=True)[0]
  loops = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(hidden, table).compile().as_text().count(
      " while(")
  assert loops(chunked) >= 1 and loops(unrolled) == 0
  l_unrolled, g_unrolled = jax.jit(jax.value_and_grad(unrolled, argnums=(0, 1)))(hidden, table)
  np.testing.assert_allclose(l_unrolled, l_chunk, rtol=1e-6)
  for a, e in zip(g_unrolled, g_chunk):
    np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
  count = losses.chunked_token_cross_entropy(hidden, head(table), labels, chunk=4)[1]
  assert count == losses.supervised_tokens(labels) == 2 * 7 - 2  # labels 1 and 2 of row 0 are ignored

  cfg = config.load("shapes_tiny", ["model.dtype=float32", "model.decoder.num_layers=1", "model.vision.depth=1",
                                    "model.scan_layers=false"]).model
  params = vlm_lib.init_params(cfg, jax.random.key(0))
  batch = vlm_lib.dummy_batch(cfg, 2, 16, 1)
  batch["input_ids"] = np.asarray(jax.random.randint(jax.random.key(3), (2, 16), 5, 500), np.int32)
  batch["labels"] = batch["input_ids"]
  model = vlm_lib.VLM(cfg)
  out = jax.jit(lambda p: model.apply({"params": p}, batch, lm_loss=True))(params)
  assert "logits" not in out
  ref = jax.jit(lambda p: losses.token_cross_entropy(model.apply({"params": p}, batch)["logits"], batch["labels"]))(
      params)
  np.testing.assert_allclose(out["loss_sum"], ref[0], rtol=1e-6)
  assert out["num_tokens"] == ref[1] == 2 * 15
