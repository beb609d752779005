"""vlm_jax.aot's HLO roofline: XLA's whole-step cost of the compiled TPU program, the estimated step time and MFU
from it, and XLA:TPU's optimal_seconds only where it is sane. One tiny unscanned compile for v5e:2x2 (and its prefill)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import aot, config, flops

from test_aot import batch_bytes, state_bytes

pytestmark = pytest.mark.tpu
TINY = ["model.scan_layers=false", "model.decoder.num_layers=2", "model.vision.depth=1", "model.decoder.width=128",
        "model.decoder.num_heads=2", "model.decoder.num_kv_heads=1"]


@pytest.fixture(scope="module")
def report():
  cfg = config.load("shapes_tiny", TINY)
  return aot.aot_report(cfg, "v5e:2x2", "instruct", batch_size=4, seq_len=1024, roofline="auto")


def test_memory_of_a_data_parallel_step_on_v5e_2x2(report):
  """Replicated params (f32) and Adam moments of the trainable ones, a quarter of the batch, step and rng; TPU
  layouts pad small arrays to (8, 128) tiles, which adds a few percent on a model this small."""
  r, cfg = report, config.load("shapes_tiny", TINY)
  assert r["mesh"]["data"] == 4 and math.prod(r["mesh"].values()) == 4 and r["fits"]
  train = r["programs"]["train_step"]["memory"]
  state, _ = state_bytes(cfg, "instruct")
  assert r["params"] * 4 + r["trainable_params"] * 8 == state
  expected = state + batch_bytes(cfg, 4, 1024) / 4 + 4 + 8
  assert expected <= train["argument"] <= 1.12 * expected
  assert state <= train["alias"] <= 1.12 * state  # the donated state is updated in place
  assert r["compute_seconds"] == pytest.approx(r["flops_per_step"] / (4 * 197e12))
  assert r["step_seconds_bound"] == max(r["compute_seconds"], r["memory_seconds"])
  assert r["programs"]["prefill"]["fits"] and r["programs"]["prefill"]["memory"]["total"] > 0


def test_roofline_is_max_of_xla_flops_and_bytes_over_the_chip(report):
  """Unscanned config: the compile itself is the whole step; roofline and MFU follow from its cost_analysis."""
  r = report
  compiled = r["programs"]["train_step"]["compiled"]
  cost = aot.xla_cost(compiled)
  assert r["roofline_method"] == "unscanned" and r["xla_cost"] == cost
  assert cost["loops"] == 0  # the two loss chunks of 512 are unrolled in an unscanned model
  raw = compiled.cost_analysis()
  assert cost["flops"] == raw["flops"] > 0 and cost["bytes"] == raw["bytes accessed"] > 0
  v5e = aot.CHIPS["v5e"]
  assert (v5e.peak_flops, v5e.hbm_bandwidth) == (197e12, 0.82e12)
  tiny = config.load("shapes_tiny", TINY)
  kernel = flops.attention_kernel_flops(tiny, "instruct", 4, 1024) / 4  # per device: the decoder's splash calls
  assert r["kernel_flops"] == pytest.approx(kernel, rel=1e-12) and kernel > 0
  compute = (cost["flops"] + kernel) / 197e12  # one device per v5e chip
  expected = max(compute, cost["bytes"] / 0.82e12)
  assert r["roofline_seconds"] == pytest.approx(expected, rel=1e-12)
  assert r["roofline_bound"] == ("compute" if compute >= cost["bytes"] / 0.82e12 else "memory")
  model_flops = flops.train_step_flops(tiny, "instruct", 4, 1024)
  assert r["flops_per_step"] == model_flops
  assert r["mfu_estimate"] == pytest.approx(model_flops / (4 * 197e12 * expected), rel=1e-12)
  # everything counted: the hardware's work covers the model's, so the estimate cannot pass 1
  assert 4 * (cost["flops"] + kernel) >= model_flops
  assert 0 < r["mfu_estimate"] < 1


def test_optimal_seconds_only_where_sane(report):
  """The compile's own optimal_seconds shows when it is positive and not below the roofline; a negative one
  (seen on whole v5e train steps: -1129 s for smolvlm_256m) prints "no estimate"."""
  r = report
  own = r["xla_cost"]["optimal_seconds"]
  if own > 0 and own >= r["roofline_seconds"]:
    assert r["optimal_seconds"] == own
    assert r["optimal_mfu"] == pytest.approx(r["mfu_estimate"] * r["roofline_seconds"] / own)
  else:
    assert r["optimal_seconds"] is None
  negative = dict(r["xla_cost"], optimal_seconds=-1129.0)
  bad = {**r, **aot.estimate_from_cost(negative, aot.CHIPS["v5e"], 1, 4, r["flops_per_step"])}
  assert bad["optimal_seconds"] is None and bad["optimal_mfu"] is None
  assert bad["roofline_seconds"] == r["roofline_seconds"] and bad["mfu_estimate"] == r["mfu_estimate"]
  text = aot.format_report(bad)
  assert "XLA optimal_seconds    no estimate" in text
  assert f"HLO roofline           {r['roofline_seconds'] * 1e3:.1f} ms ({r['roofline_bound']}) -> est. MFU" in text
  sane = dict(r["xla_cost"], optimal_seconds=2 * r["roofline_seconds"])
  good = {**r, **aot.estimate_from_cost(sane, aot.CHIPS["v5e"], 1, 4, r["flops_per_step"])}
  assert f"XLA optimal_seconds    {2 * r['roofline_seconds'] * 1e3:.1f} ms -> est. MFU" in aot.format_report(good)


def test_sane_optimal_seconds():
  assert aot.sane_optimal_seconds(-1129.0, 0.48) is None
  assert aot.sane_optimal_seconds(0.3, 0.48) is None  # below the roofline: not believable
  assert aot.sane_optimal_seconds(2.27, 1.78) == 2.27


def test_extrapolation_over_layers_of_both_towers(monkeypatch):
  """whole_step_cost('extrapolate') compiles 2/4 decoder layers and 2/4 ViT blocks unscanned and adds each
  tower's linear growth: with a cost exactly linear in both counts it recovers the full model's cost."""
  cfg = config.load("shapes_tiny", ["model.decoder.num_layers=30", "model.vision.depth=12"])
  seen = []

  class Fake:
    def __init__(self, c):
      self.c = c

    def as_text(self):
      return ""

    def cost_analysis(self):
      d, v = self.c.model.decoder.num_layers, self.c.model.vision.depth
      return {"flops": 10.0 + 3.0 * d + 5.0 * v, "bytes accessed": 1.0 + 7.0 * d + 2.0 * v,
              "optimal_seconds": -1.0 + 0.5 * d}

  def fake_compile(c, stage, mesh, batch, compiler_options=None):
    assert not c.model.scan_layers and stage.grad_accum == 1
    assert compiler_options == aot.COST_COMPILER_OPTIONS
    seen.append((c.model.decoder.num_layers, c.model.vision.depth))
    return {"compiled": Fake(c)}
  monkeypatch.setattr(aot, "compile_train_step", fake_compile)
  batch = {"pixel_values": type("S", (), {"shape": (8, 2, 48, 48, 3)})()}
  cost = aot.whole_step_cost(cfg, cfg.train.stage("instruct"), None, batch, "extrapolate")
  assert seen == [(2, 2), (4, 2), (2, 4)]
  assert cost == pytest.approx({"flops": 10 + 90 + 60, "bytes": 1 + 210 + 24, "optimal_seconds": -1 + 15,
                                "loops": 0})
  assert aot.extrapolate({"x": 1.0}, {"x": 3.0}, 2, 4, 32) == {"x": 31.0}


def test_tpu_program_runs_the_splash_attention_kernel(report):
  """model.kernels=auto compiles for the target: the decoder's causal attention is the Pallas splash kernel
  (custom calls named splash_mha_*, forward and backward), under the data-parallel mesh."""
  hlo = report["programs"]["train_step"]["compiled"].as_text()
  assert "custom_call_target=\"tpu_custom_call\"" in hlo
  for phase in ("fwd", "dq", "dkv"):
    assert f"splash_mha_{phase}_segmented" in hlo, phase


def test_cost_compiles_count_fsdp_matmuls_whole():
  """Weights sharded over fsdp: XLA:TPU makes all-gather + dot a windowed einsum, a while loop of partial dots
  that cost_analysis counts once (a quarter of the FLOPs here). The cost compiles' options turn it off: no
  loop, and XLA's count is the matmuls' 2 * (forward + weight gradient) FLOPs per device."""
  _, devices, _ = aot.topology_devices("v5p:2x2x2")
  mesh = Mesh(np.array(devices).reshape(-1), ("fsdp",))
  x = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
  w = jax.ShapeDtypeStruct((4096, 16384), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32)), argnums=1))
  windowed = aot.compile_memory(grad, x, w)["compiled"]
  whole = aot.compile_memory(grad, x, w, compiler_options=aot.COST_COMPILER_OPTIONS)["compiled"]
  expected = 2 * (2 * 8192 * 4096 * 16384) / len(devices)
  assert aot.count_loops(windowed) >= 1 and aot.xla_cost(windowed)["flops"] < 0.8 * expected
  cost = aot.xla_cost(whole)
  assert cost["loops"] == 0 and cost["flops"] == pytest.approx(expected, rel=2e-3)
