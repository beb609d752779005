"""vlm_jax.aot: compile the real train step for TPU topologies on this CPU machine (libtpu, no TPU) and
check the memory numbers against what the param count says they must be."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import aot, config, flops, sharding
from vlm_jax.model import lora
from vlm_jax.model import vlm as vlm_lib
from vlm_jax.train import optimizer as optimizer_lib

pytestmark = pytest.mark.tpu
MiB = 1024 ** 2


def state_bytes(cfg, stage_name, fsdp=1):
  """(params f32 + Adam mu/nu f32 of the trainable params) bytes per device, and the part of it that cannot
  shard over an fsdp axis of size `fsdp` (leaves whose logical axes map to no fsdp: norms, biases, ...)."""
  shapes, logical = vlm_lib.abstract_params(cfg.model)
  labels = jax.tree.leaves(optimizer_lib.trainable_labels(shapes, cfg.train.stage(stage_name)))
  specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
  total = replicated = 0
  for x, label, spec in zip(jax.tree.leaves(shapes), labels, specs):
    nbytes = math.prod(x.shape) * (12 if label == "train" else 4)
    on_fsdp = "fsdp" in jax.tree.leaves(tuple(sharding.logical_to_spec(tuple(spec))))
    total += nbytes / fsdp if on_fsdp else nbytes
    replicated += 0 if on_fsdp else nbytes
  return total, replicated


def batch_bytes(cfg, batch_size, seq_len):
  """Bytes of a global LM batch: 4 int32 [B, S] arrays, pixels uint8 [B, N, H, W, 3], tile_mask bool [B, N]."""
  v, n = cfg.model.vision, cfg.data.max_tiles
  return batch_size * (4 * 4 * seq_len + n * v.image_size ** 2 * 3 + n)


def test_topology_next_to_the_cpu_backend():
  """conftest already made 8 CPU devices; topology descriptions still work and leave them alone."""
  chip, devices, chips = aot.topology_devices("v5e:2x2")
  assert (chip.name, len(devices), chips) == ("TPU v5e", 4, 4)
  assert devices[0].device_kind == "TPU v5 lite"
  chip, devices, chips = aot.topology_devices("v4:2x2x1")
  assert (chip.hbm_bytes, len(devices), chips) == (32 * 1024 ** 3, 8, 4)  # two TensorCores per v4 chip
  assert jax.device_count() == 8 and jax.devices()[0].platform == "cpu"
  with pytest.raises(config.ConfigError, match="v5e:2x4"):
    aot.topology_devices("v7x:2x2")
  with pytest.raises(config.ConfigError, match=r"Topology 'v5e:3x3': libtpu could not describe it \(.*\)\. Check "
                                               r"the shape \(one the chip comes in, e.g. v5e:2x4"):
    aot.topology_devices("v5e:3x3")


def test_memory_stats_of_a_sharded_matmul():
  _, devices, _ = aot.topology_devices("v5e:2x2")
  mesh = Mesh(np.array(devices).reshape(2, 2), ("a", "b"))
  x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P("a", None)))
  y = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "b")))
  fn = jax.jit(lambda x, y: x @ y, out_shardings=NamedSharding(mesh, P("a", "b")))
  m = aot.compile_memory(fn, x, y)["memory"]
  assert m["argument"] == 2 * 2048 * 4096 * 2  # each device holds half of x and half of y
  assert m["output"] == 2048 * 2048 * 2 and m["alias"] == 0
  assert m["total"] >= m["argument"] + m["output"] + m["generated_code"]


def test_param_counts_of_a_lora_stage():
  """A LoRA stage trains its adapter factors and what `trainable` names in full, not the kernels adapted: rank r
  on a [L, in, out] kernel adds L * r * (in + out) params."""
  cfg = config.load("shapes_tiny", ["train.stages.instruct.lora.rank=4"])
  stage = cfg.train.stage("instruct")
  plain = aot.param_counts(cfg, cfg.train.stage("align"))
  counts = aot.param_counts(cfg, stage)
  assert counts["params"] == plain["params"] and plain["adapter_params"] == 0
  shapes, _ = vlm_lib.abstract_params(cfg.model)
  targets = lora.target_paths(shapes, stage.lora)
  layers = cfg.model.decoder.num_layers  # unscanned: one kernel per layer
  assert len(targets) == 7 * layers and all(p.startswith("decoder/layers_") for p in targets)  # q k v o gate up down
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in
          jax.tree_util.tree_flatten_with_path(shapes)[0]}
  factors = 0
  for path in targets:
    lead, n_in = lora.split_axes(path, flat[path].shape)
    ins, outs = flat[path].shape[lead:lead + n_in], flat[path].shape[lead + n_in:]
    factors += math.prod(flat[path].shape[:lead]) * 4 * (math.prod(ins) + math.prod(outs))
  assert counts["adapter_params"] == factors
  decoder = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["decoder"]))
  projector = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["projector"]))
  adapted = sum(math.prod(flat[p].shape) for p in targets)
  assert counts["trainable_params"] == projector + decoder - adapted + factors


def test_out_of_hbm_is_reported_not_raised(monkeypatch, capsys):
  """A 64k vocabulary at batch 4096 needs ~80 GB of logits per v5e chip: XLA refuses, the report says so,
  and `vlm-jax aot` (main) exits 1."""
  cfg = config.load("shapes_tiny", ["model.decoder.vocab_size=65536", "model.vision.depth=1", "model.dtype=float32",
                                    "model.decoder.num_layers=1"])
  r = aot.aot_report(cfg, "v5e:2x2", "instruct", batch_size=4096, prefill=False)
  train = r["programs"]["train_step"]
  assert not r["fits"] and not train["fits"] and train["memory"] is None
  assert train["error"].startswith("RESOURCE_EXHAUSTED") and "HBM" in train["error"]
  assert r["memory_seconds"] is None and r["step_seconds_bound"] == r["compute_seconds"]
  monkeypatch.setattr(aot, "aot_report", lambda *args, **kwargs: r)
  assert aot.main(cfg, "v5e:2x2", "instruct", 4096) == 1
  out = capsys.readouterr().out
  assert "out of HBM: RESOURCE_EXHAUSTED" in out and out.rstrip().endswith("fits: NO")


# 2 layers per tower and small batches: what a compile proves about sharding, donation and per-device bytes holds
# per layer, and the state bytes are linear in the layers (checked on the full configs without a compile). A
# full-size compile takes libtpu minutes; its figures are `vlm-jax aot`'s (README: TPU, aot).
TWO_LAYERS = ["model.decoder.num_layers=2", "model.vision.depth=2"]
# LLaVA's decoder at an eighth of its width (head_dim 128 and the vocabulary kept): libtpu took ~4 min of CPU to
# compile 2 layers of width 4096, ~1.3 min at 512.
LLAVA_NARROW = ["model.decoder.width=512", "model.decoder.num_heads=4", "model.decoder.num_kv_heads=4",
                "model.decoder.mlp_dim=1376"]


@pytest.mark.slow
def test_smolvlm_256m_instruct_on_v5e_2x4_is_data_parallel():
  """Data parallel over 8 v5e chips (batch 8 x 256 tokens, one 512 px tile per row): each device holds the whole
  f32 state (params + Adam moments of the trainable ones), updated in place, and an eighth of the batch."""
  cfg = config.load("smolvlm_256m", TWO_LAYERS + ["data.max_tiles=1"])
  r = aot.aot_report(cfg, "v5e:2x4", "instruct", batch_size=8, seq_len=256, prefill=False)
  assert r["fits"] and r["mesh"]["data"] == 8 and r["num_chips"] == 8
  train = r["programs"]["train_step"]["memory"]
  state, _ = state_bytes(cfg, "instruct")
  assert train["argument"] == pytest.approx(state + batch_bytes(cfg, 8, 256) / 8, rel=0.02)
  assert train["alias"] == pytest.approx(state, rel=0.02)
  assert r["flops_per_step"] == flops.train_step_flops(cfg, "instruct", 8, 256, 1)
  full = config.load("smolvlm_256m")
  assert state_bytes(full, "instruct")[0] < 3 * 1024 ** 3  # replicated on a 16 GiB v5e chip: the rest is batch


@pytest.mark.slow
def test_llava15_7b_instruct_on_v5p_2x2x2_shards_the_state_with_fsdp():
  """7B params + Adam for the 6.8B trainable ones (~82 GB) only fit when FSDP shards them over 8 chips: the
  compiled step (CLIP-L/14-336 at 2 layers, a narrow 2-layer decoder, batch 8 x 640) takes every leaf but the
  unshardable ones split 8 ways; the full model's bytes follow by the same count."""
  cfg = config.load("llava15_7b", TWO_LAYERS + LLAVA_NARROW)
  r = aot.aot_report(cfg, "v5p:2x2x2", "instruct", batch_size=8, seq_len=640, prefill=False)
  assert r["fits"] and r["mesh"]["fsdp"] == 8
  train = r["programs"]["train_step"]["memory"]
  state, replicated = state_bytes(cfg, "instruct", fsdp=8)
  batch = batch_bytes(cfg, 8, 640) / 8
  # Everything but the unshardable leaves is split 8 ways; those few MB bound the tolerance (plus padding).
  assert state + batch <= train["argument"] <= (state + batch + replicated) * 1.01
  assert train["argument"] < state_bytes(cfg, "instruct")[0] / 7
  # The full model by the same count: what does not shard stays small, the sharded state fits beside the batch.
  full = config.load("llava15_7b")
  shapes, _ = vlm_lib.abstract_params(full.model)
  labels = jax.tree.leaves(optimizer_lib.trainable_labels(shapes, full.train.stage("instruct")))
  sizes = [math.prod(x.shape) for x in jax.tree.leaves(shapes)]
  assert sum(sizes) == pytest.approx(7.06e9, rel=0.01)
  assert sum(n for n, label in zip(sizes, labels) if label == "train") == pytest.approx(6.76e9, rel=0.01)
  unsharded, _ = state_bytes(full, "instruct")
  per_device, _ = state_bytes(full, "instruct", fsdp=8)
  assert unsharded > 80e9 and per_device + batch_bytes(full, 128, 2048) / 8 < 11 * 1024 ** 3


def test_llama3_8b_state_by_count_on_v5p_2x2x2():
  """Llama-3-8B's shapes (GQA 32/8, vocab 128256) give Meta's 8.03B decoder params; with CLIP-L and the projector
  the f32 params and Adam moments of the instruct stage (~98 GB) take 11.4 GiB of each of 8 v5p chips under FSDP,
  with 4 MiB unsharded (norms, biases). Its full compile at 8192 is `vlm-jax aot`'s (docs/tpu.md): this is the
  count alone, no compile."""
  full = config.load("llama3_8b")
  shapes, _ = vlm_lib.abstract_params(full.model)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["decoder"])) == 8_030_261_248
  labels = jax.tree.leaves(optimizer_lib.trainable_labels(shapes, full.train.stage("instruct")))
  sizes = [math.prod(x.shape) for x in jax.tree.leaves(shapes)]
  assert sum(sizes) == pytest.approx(8.355e9, rel=1e-3)
  assert sum(n for n, label in zip(sizes, labels) if label == "train") == pytest.approx(8.051e9, rel=1e-3)
  assert state_bytes(full, "instruct")[0] == pytest.approx(97.83e9, rel=1e-3)
  per_device, replicated = state_bytes(full, "instruct", fsdp=8)
  assert per_device == pytest.approx(11.39 * 1024 ** 3, rel=1e-3) and replicated < 5 * MiB


@pytest.mark.slow
def test_shapes_moe_experts_shard_over_the_expert_axis_on_v5e_2x4():
  """The MoE demo model on 8 v5e chips as data 4 x expert 2: the compiled step takes each expert weight (and its
  Adam moments) split over `expert` along the expert dim (2 of 4 experts per device); the state is otherwise
  replicated, so per device it is the replicated state less half the expert bytes."""
  cfg = config.load("shapes_moe", ["mesh.expert=2", "model.scan_layers=true"])  # TPU runs scan the layers
  r = aot.aot_report(cfg, "v5e:2x4", "instruct", prefill=False)
  assert r["fits"] and r["mesh"] == {"data": 4, "fsdp": 1, "expert": 2, "tensor": 1} and r["batch_size"] == 32
  (state, _), _ = r["programs"]["train_step"]["compiled"].input_shardings
  shapes, _ = vlm_lib.abstract_params(cfg.model)
  experts = shapes["decoder"]["layers"]["moe"]["experts"]
  assert experts["gate_up"].shape == (3, 4, 192, 2, 256) and experts["down"].shape == (3, 4, 256, 192)
  # The params and Adam's mu and nu of each expert weight: [layers, experts, ...] with experts over `expert`.
  shardings = [(path, s) for path, s in jax.tree_util.tree_flatten_with_path(state)[0]
               if "['experts']" in jax.tree_util.keystr(path)]
  assert len(shardings) == 6
  for path, sharding in shardings:
    x = experts[path[-1].key]
    assert sharding.spec[1] == "expert", jax.tree_util.keystr(path)
    assert sharding.shard_shape(x.shape) == (3, 2, *x.shape[2:]), jax.tree_util.keystr(path)
  expert_bytes = sum(math.prod(x.shape) for x in experts.values()) * 12  # f32 params + Adam mu, nu (trainable)
  state_total, _ = state_bytes(cfg, "instruct")
  expected = state_total - expert_bytes / 2 + batch_bytes(cfg, 32, cfg.data.seq_len) / 8 + 4 + 8
  train = r["programs"]["train_step"]["memory"]
  assert expected <= train["argument"] <= 1.12 * expected
  assert train["argument"] < (state_total - expert_bytes / 4)  # not the replicated state
  assert train["total"] < 16 * 1024 ** 3
