"""`vlm-jax bench --quick --compare-torch` on a tiny bench_cpu: the JSON holds the issue's keys, its derived
numbers follow exactly from the recorded ones, its FLOPs are vlm_jax.flops' count, and the transformers side
gives finite ratios."""
import json
import math

import pytest

from vlm_jax import cli, config, flops, host_memory

pytestmark = pytest.mark.torch

# bench_cpu shrunk: 32 px tiles, patch 8, pixel shuffle 2 -> 4 <image> tokens; ViT 32 x 1; decoder 64 x 2.
TINY = ["model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=1",
        "model.vision.num_heads=2", "model.vision.mlp_dim=64", "model.decoder.width=64", "model.decoder.num_layers=2",
        "model.decoder.num_heads=4", "model.decoder.num_kv_heads=2", "model.decoder.mlp_dim=128",
        "model.decoder.vocab_size=512", "data.seq_len=32"]
REQUIRED = ["peak.f32_gflops", "peak.bf16_gflops", "train.step_s", "train.tokens_per_s", "train.mfu",
            "train.speedup_vs_torch", "generate.prefill_tokens_per_s", "generate.decode_tokens_per_s",
            "generate.decode_speedup_vs_torch", "compile.layers_4_s", "compile.layers_24_s"]
MALLOC = "glibc.malloc.hugetlb=1 (as reported by host_memory.active)"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  with pytest.MonkeyPatch.context() as patch:  # what host_memory reports reaches the JSON (see test_host_memory)
    patch.setattr(host_memory, "active", lambda: MALLOC)
    assert cli.main(["bench", "--config", "bench_cpu", "--quick", "--compare-torch", "--json", str(out),
                     "--set", *TINY]) == 0
  return json.loads(out.read_text())


def get(tree, dotted):
  for key in dotted.split("."):
    tree = tree[key]
  return tree


def test_required_keys_are_positive_numbers(results):
  for key in REQUIRED:
    value = get(results, key)
    assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
  assert results["host_malloc"] == MALLOC
  assert 0 < results["train"]["mfu"] < 1  # below the peak of its own dtype path


def test_throughput_and_mfu_follow_from_the_recorded_numbers(results):
  t = results["train"]
  assert (t["dtype"], t["batch_size"], t["seq_len"], t["num_tiles"]) == ("bfloat16", 8, 32, 1)
  assert t["mfu"] == t["flops_per_step"] / t["step_s"] / (results["peak"]["bf16_gflops"] * 1e9)
  measured = results["peak"]["measured"]  # before and after the train steps; the peak is the higher
  assert len(measured) == 2 and results["peak"]["bf16_gflops"] == max(p["bf16_gflops"] for p in measured)
  assert t["tokens_per_s"] == 8 * 32 / t["step_s"]
  assert t["images_per_s"] == 8 / t["step_s"]
  g = results["generate"]
  assert (g["rows"], g["new_tokens"]) == (8, 48)
  assert g["decode_tokens_per_s"] == 8 * 47 / g["decode_s"]  # 47 cached steps after the prefill's token
  assert g["prefill_tokens_per_s"] == g["prompt_tokens"] / g["prefill_s"]


def test_flops_are_a_hand_count(results):
  """The JSON's FLOPs per step, counted here by hand for TINY (2 m k n per matmul, per row of 32 tokens and one
  32 px tile): the ViT is frozen (forward only), the projector trains its weight (no input gradient: nothing
  upstream trains), the decoder layers and head train (forward, input and weight gradients: 3x)."""
  patches, vit_w, vit_f = 16, 32, 64  # 32 px / patch 8 -> 4 x 4 patches, SigLIP (no CLS)
  vit_layer = (4 * 2 * patches * vit_w * vit_w  # q, k, v, out
               + 2 * 2 * patches * vit_w * patches  # scores and values over 16 keys
               + 2 * 2 * patches * vit_w * vit_f)  # fc1, fc2
  assert vit_layer == 294_912
  patch_embed = 2 * patches * (8 * 8 * 3) * vit_w
  projector = 2 * (patches // 4) * (vit_w * 4) * 64  # pixel shuffle 2: 4 tokens of 4 x 32 features -> width 64
  s, d, q_dim, kv_dim, f = 32, 64, 4 * 16, 2 * 16, 128  # 4 heads / 2 kv heads of 16
  decoder_layer = (2 * s * d * q_dim + 2 * 2 * s * d * kv_dim + 2 * s * q_dim * d  # q, k, v, o
                   + 2 * 2 * s * q_dim * (s / 2)  # causal scores and values: half of the 32 keys on average
                   + 3 * 2 * s * d * f)  # gate, up, down
  assert decoder_layer == 2_490_368
  lm_head = 2 * s * d * 512
  per_row = patch_embed + vit_layer + 2 * projector + 3 * (2 * decoder_layer + lm_head)
  assert results["train"]["flops_per_step"] == 8 * per_row
  cfg = config.load("bench_cpu", TINY)
  assert results["train"]["flops_per_step"] == flops.train_step_flops(cfg, "bench", 8, 32, 1)
  # ViT frozen (forward only), projector and decoder trained: the count is not the 3x-forward one.
  assert results["train"]["flops_per_step"] < 3 * flops.forward_flops(cfg, 8, 32, 1)


def test_torch_ratios(results):
  t, g, theirs = results["train"], results["generate"], results["torch"]
  assert theirs["threads"] >= 1
  assert t["speedup_vs_torch"] == min(x["step_s"] for x in theirs["train"].values()) / t["step_s"]
  assert t["by_dtype"]["bfloat16"]["speedup_vs_torch"] == theirs["train"]["bfloat16"]["step_s"] / t["step_s"]
  best_theirs = max(x["decode_tokens_per_s"] for x in theirs["generate"].values())
  assert g["decode_speedup_vs_torch"] == g["decode_tokens_per_s"] / best_theirs
  for x in [*theirs["train"].values(), *theirs["generate"].values()]:
    assert all(math.isfinite(v) and v > 0 for v in x.values()), x


def test_train_batch_has_the_loaders_dtypes_and_shapes():
  """The bench times the step the loader feeds: uint8 pixels (normalized in the step), the contract's shapes."""
  from vlm_jax.bench import measure  # pylint: disable=import-outside-toplevel
  from vlm_jax.model import vlm as vlm_lib  # pylint: disable=import-outside-toplevel
  cfg = config.load("shapes_tiny")
  batch = measure.train_batch(cfg, 3, 40, 2)
  like = vlm_lib.dummy_batch(cfg.model, 3, 40, 2)
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {k: (v.dtype, v.shape) for k, v in like.items()}
  assert batch["pixel_values"].min() < 20 and batch["pixel_values"].max() > 235  # the full uint8 range
  images = 2 * cfg.model.image_tokens_per_tile
  assert (batch["input_ids"][:, :images] == cfg.model.image_token_id).all()
  assert (batch["labels"][:, :images] == -100).all() and (batch["labels"][:, images:] >= 0).all()
