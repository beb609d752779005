"""QLoRA-style int8 base (lora.quantize_base, vlm_jax/model/quantize.py): the per-channel round-trip bound, the tiny
model's logits on its int8 base, and a two-stage run: the int8 kernels and their scales come out of both stages
bit-identical to the quantized fresh init, only the adapters (and the projector) get optimizer state, a resume
from a checkpoint reproduces the losses and the params, and a merge dequantizes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_data import shapes_data_dir  # noqa: F401  (fixture)
from fixtures_train import lm_batch, rewound_copy, tiny_config
from test_resume import CONFIG, losses_by_step

from vlm_jax import checkpoint
from vlm_jax import config as config_lib
from vlm_jax import workdir as workdir_lib
from vlm_jax.config import LoraConfig, MeshConfig
from vlm_jax.model import lora, quantize, vlm
from vlm_jax.sharding import make_mesh
from vlm_jax.train import optimizer, run, step

QLORA_RUN = ["train.stages.align.steps=4", "train.stages.align.checkpoint_every=2", "train.stages.instruct.steps=2",
             "train.stages.align.lora.rank=4", "train.stages.align.lora.quantize_base=true",
             "train.stages.instruct.lora.rank=4", "train.stages.instruct.lora.quantize_base=true"]
DECODER_KERNELS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate", "mlp/up", "mlp/down")


def bytes_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def test_round_trip_error_is_at_most_half_a_step_per_channel():
  # [layers 3, in (4, 8), out 5] with two input axes (o_proj's layout), one all-zero channel.
  w = np.random.default_rng(0).normal(size=(3, 4, 8, 5)).astype(np.float32) * np.array([1e-3, 1, 30, 1, 1])
  w[1, :, :, 3] = 0
  q, scale = quantize.quantize(jnp.asarray(w), lead=1, n_in=2)
  assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == (3, 5) and scale.dtype == jnp.float32
  back = np.asarray(quantize.dequantize(q, scale, lead=1, n_in=2))
  err = np.abs(back - w).max(axis=(1, 2))  # [3, 5]
  s = np.asarray(scale)
  absmax = np.abs(w).max(axis=(1, 2))
  np.testing.assert_allclose(s, np.where(absmax > 0, absmax / 127, 1), rtol=1e-6, atol=0)  # XLA: x * (1 / 127)
  # |W - q s| <= s / 2, exact up to float32's rounding of W / s and of q * s (a few ulps of W).
  assert np.all(err <= s / 2 * (1 + 1e-6) + 4 * np.finfo(np.float32).eps * absmax)
  assert np.abs(np.asarray(q)).max() == 127 and not np.any(np.asarray(q)[1, :, :, 3]) and s[1, 3] == 1.0
  assert (err / s).max() > 0.45  # the bound is tight, not loose by a factor


def test_int8_base_logits_stay_close_to_the_float_base():
  cfg = tiny_config()
  batch = lm_batch(cfg)
  model = vlm.VLM(cfg.model)
  params = vlm.init_params(cfg.model, jax.random.PRNGKey(0))
  lc = LoraConfig(rank=4, quantize_base=True)
  base_q, adapters = lora.quantize_targets(params, lora.init(params, lc, jax.random.PRNGKey(1)), lc)
  assert all(base_q["decoder"]["layers"][m][n]["kernel"].dtype == jnp.int8
             for m, n in (k.split("/") for k in DECODER_KERNELS))
  forward = jax.jit(lambda p: model.apply({"params": p}, batch)["logits"])
  want = np.asarray(forward(params))
  got = np.asarray(forward(lora.apply(base_q, adapters, lc)))
  # Measured on this float32 model: logits of std 1.005, int8 kernels move them by 0.0677 at most and 0.0093 on
  # average (rounding every param to bf16 instead: 0.043 at most).
  err = np.abs(got - want)
  assert 0.01 < err.max() < 0.1 and 1e-3 < err.mean() < 0.015, (err.max(), err.mean())
  np.testing.assert_array_equal(got.argmax(-1)[batch["labels"] >= 0], want.argmax(-1)[batch["labels"] >= 0])
  # merge: a plain float32 tree, the dequantized kernels plus the (here zero) adapter delta.
  merged = lora.merge(base_q, adapters, lc)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(merged))
  assert bytes_equal(merged, lora.dequantized(base_q, adapters))


@pytest.fixture(scope="module")
def qlora_run(shapes_data_dir, tmp_path_factory):  # noqa: F811
  """tests/tiny_run_config.py shortened to 4 + 2 steps, both stages QLoRA rank 4: (config, workdir, align's
  starting params: the fresh init with its targets quantized, on one device as numpy)."""
  cfg = config_lib.load(CONFIG, [f"data.data_dir={shapes_data_dir}"] + QLORA_RUN)
  run.run(cfg, str(workdir := tmp_path_factory.mktemp("qlora_run")))
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  start = step.stage_params(step.init_params(cfg, mesh, jax.random.PRNGKey(cfg.seed)), cfg,
                            cfg.train.stage("align"), mesh)
  return cfg, workdir, jax.device_get(start)


def finished_params(workdir, stage):
  """A finished stage's params with its adapters and int8 kernels (workdir.load, merge=False), as numpy."""
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  return jax.device_get(workdir_lib.load(workdir, stage, mesh=mesh, merge=False)[1])


def test_int8_base_is_bit_identical_after_both_stages_and_only_adapters_train(qlora_run):
  cfg, workdir, want = qlora_run
  for name in ("align", "instruct"):
    got = finished_params(workdir, name)
    layers, scales = got["decoder"]["layers"], got["lora"]["decoder"]["layers"]
    for m, n in (k.split("/") for k in DECODER_KERNELS):
      assert layers[m][n]["kernel"].dtype == np.int8, (name, m, n)
      assert bytes_equal(layers[m][n]["kernel"], want["decoder"]["layers"][m][n]["kernel"]), (name, m, n)
      assert bytes_equal(scales[m][n]["kernel"][lora.SCALE], want["lora"]["decoder"]["layers"][m][n]["kernel"][
          lora.SCALE]), (name, m, n)
      assert np.abs(scales[m][n]["kernel"]["lora_b"]).max() > 0  # the adapters did train
  # Optimizer state: Adam's moments of the adapter factors and the projector; none for int8 kernels or scales.
  stage = cfg.train.stage("align")
  tx = optimizer.make_optimizer(stage, vlm.abstract_params(cfg.model)[0])
  abstract = step.abstract_state(cfg, stage, make_mesh(cfg.mesh), tx)
  state = jax.device_get(checkpoint.restore(checkpoint.manager(workdir, stage), 4, abstract))
  moments = [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
             for p, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0] if np.ndim(x) > 0]
  paths = [p for p in jax.tree.leaves(optimizer.param_paths(state["params"]))]
  owners = {next(q for q in paths if p.endswith(f"/{q}")) for p, _ in moments}
  assert owners and all(lora.is_factor(p) or p.startswith("projector/") for p in owners), owners
  factor_bytes = sum(np.asarray(x).nbytes for p, x in zip(paths, jax.tree.leaves(state["params"])) if lora.is_factor(p))
  projector_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state["params"]["projector"]))
  assert sum(x.nbytes for _, x in moments) == 2 * (factor_bytes + projector_bytes)


def test_resume_from_a_checkpoint_reproduces_losses_and_int8_params(qlora_run, tmp_path):
  """Align's step-2 checkpoint (int8 kernels + scales + adapters + Adam) resumed to step 4: the same losses and
  bit-identical params as the run that went straight through."""
  cfg, workdir, _ = qlora_run
  resumed = rewound_copy(workdir, tmp_path / "resumed", "align", 4)
  run.run(cfg, str(resumed), stage="align")
  want, got = losses_by_step(workdir, "align"), losses_by_step(resumed, "align")
  assert sorted(got) == [1, 2, 3, 4] and all(got[s] == want[s] for s in (3, 4)), (got, want)
  assert bytes_equal(finished_params(resumed, "align"), finished_params(workdir, "align"))


def test_merge_at_end_dequantizes_and_a_float_stage_follows(qlora_run):
  cfg, workdir, _ = qlora_run
  align = finished_params(workdir, "align")
  source = dataclasses.replace(cfg.train.stage("align").lora, merge_at_end=True)
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  plain = dataclasses.replace(cfg.train.stage("instruct"), lora=LoraConfig())
  nxt = jax.device_get(step.stage_params(jax.device_put(align), cfg, plain, mesh, source))
  assert "lora" not in nxt and all(x.dtype == np.float32 for x in jax.tree.leaves(nxt))
  want = jax.device_get(lora.merge(*lora.split(align), source))
  assert bytes_equal(nxt, want)
  q = align["decoder"]["layers"]["attn"]["q_proj"]["kernel"]
  ab = align["lora"]["decoder"]["layers"]["attn"]["q_proj"]["kernel"]
  w = q.astype(np.float32) * ab[lora.SCALE][:, None] + np.einsum("ldr,lrhk->ldhk", ab["lora_a"], ab["lora_b"]) * (
      source.alpha / source.rank)
  np.testing.assert_allclose(nxt["decoder"]["layers"]["attn"]["q_proj"]["kernel"], w, rtol=1e-5, atol=1e-6)
