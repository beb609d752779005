"""LoRA (vlm_jax/model/lora.py): step 0 equals the base, merged = base + adapters, a LoRA stage leaves the base
bit-identical with optimizer state for the adapters and the projector only, adapters handed on or merged between
stages, exact resume from a mid-stage checkpoint (align trains with LoRA dropout), adapter shardings on an
8-device mesh, the exports: merged and PEFT adapter give vlm_jax's logits and greedy tokens under transformers /
peft, and the adapter imports back; LoRA dropout: a hand-made reference with the same masks, rate 0 equals the
folded path, masks keyed by the step (deterministic, resume-exact), and no RNG at all in a step without dropout."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
from fixtures_convert import (assert_logits_and_greedy_match_hf, build_llava, prompt_and_pixels,  # noqa: F401
                              save_with_tokenizer, tokenizer_dir)
from fixtures_data import shapes_data_dir  # noqa: F401  (fixture)
from fixtures_train import lm_batch, rewound_copy, tiny_config
from jax.sharding import NamedSharding, PartitionSpec as P
from test_resume import CONFIG, losses_by_step
from transformers import AutoModelForImageTextToText

from vlm_jax import checkpoint
from vlm_jax import config as config_lib
from vlm_jax.config import LoraConfig, MeshConfig
from vlm_jax.convert import export, hf_names, load, peft
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.model import layers, lora, vlm
from vlm_jax.sharding import make_mesh
from vlm_jax.train import optimizer, run, step

# align: LoRA on the decoder (rank 4, dropout 0.1) + the projector in full, bf16, remat, 2 micro-batches,
# tensor-parallel mesh; instruct: the same adapters handed on unmerged (no dropout), the rest of the decoder in full.
LORA_RUN = ["model.dtype=bfloat16", "model.remat=full", "mesh.data=4", "mesh.tensor=2",
            "train.stages.align.grad_accum=2", "train.stages.align.lora.rank=4", "train.stages.align.lora.alpha=8",
            "train.stages.align.lora.dropout=0.1",
            "train.stages.instruct.lora.rank=4", "train.stages.instruct.lora.alpha=8"]
ADAPTED = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate", "mlp/up", "mlp/down")


def bytes_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def tree_bytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def randomized(adapters, seed=0, std=0.05):
  """Adapters with non-zero B (and fresh A), so they change the model."""
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def lora_run(shapes_data_dir, tmp_path_factory):  # noqa: F811
  """Both stages of tests/tiny_run_config.py with LORA_RUN, start to finish in this process: (config, workdir)."""
  cfg = config_lib.load(CONFIG, [f"data.data_dir={shapes_data_dir}"] + LORA_RUN)
  workdir = tmp_path_factory.mktemp("lora_run")
  run.run(cfg, str(workdir))
  return cfg, workdir


def finished_params(cfg, workdir, stage):
  """A finished stage's params (with its adapters), on one device, as numpy."""
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  shapes, shardings = step.param_shardings(cfg, mesh, cfg.train.stage(stage).lora)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return jax.device_get(checkpoint.final_params(workdir, stage, target))


def test_step0_equals_base_and_merged_equals_base_plus_adapters():
  cfg = tiny_config()
  batch = lm_batch(cfg)
  params = vlm.init_params(cfg.model, jax.random.PRNGKey(0))
  lc = LoraConfig(rank=4, alpha=8.0, targets=(config_lib.LORA_DECODER, "vision/layers/attn/(q|out)/kernel",
                                              "projector/.*/kernel"))
  adapters = lora.init(params, lc, jax.random.PRNGKey(1))
  forward = jax.jit(lambda p: vlm.VLM(cfg.model).apply({"params": p}, batch)["logits"])
  base = np.asarray(forward(params))
  np.testing.assert_array_equal(np.asarray(forward(lora.apply(params, adapters, lc))), base)
  trained = randomized(adapters)
  with_adapters = np.asarray(forward(lora.apply(params, trained, lc)))
  np.testing.assert_allclose(np.asarray(forward(lora.merge(params, trained, lc))), with_adapters, atol=1e-5, rtol=0)
  assert np.abs(with_adapters - base).max() > 1e-2  # the adapters do change the model
  # bf16: the adapted kernels in the compute dtype; at step 0 the logits are the base's, bit for bit.
  bf16 = dataclasses.replace(cfg.model, dtype="bfloat16")
  model = vlm.VLM(bf16)
  logits = jax.jit(lambda p, a: model.apply({"params": lora.apply(p, a, lc, jnp.bfloat16) if a else p},
                                             batch)["logits"])
  np.testing.assert_array_equal(np.asarray(logits(params, adapters)), np.asarray(logits(params, None)))


def test_lora_stage_keeps_the_base_and_trains_only_adapters_and_projector(lora_run):
  cfg, workdir = lora_run
  fresh = jax.device_get(step.init_params(cfg, make_mesh(MeshConfig(data=1), jax.devices()[:1]),
                                          jax.random.PRNGKey(cfg.seed)))
  align = finished_params(cfg, workdir, "align")
  base, adapters = lora.split(align)
  assert bytes_equal(base["decoder"], fresh["decoder"]) and bytes_equal(base["vision"], fresh["vision"])
  assert not bytes_equal(base["projector"], fresh["projector"])
  layers = adapters["decoder"]["layers"]
  assert sorted(f"{m}/{n}" for m in layers for n in layers[m]) == sorted(ADAPTED)
  assert all(np.abs(layers[m][n]["kernel"]["lora_b"]).max() > 0 for m, n in (k.split("/") for k in ADAPTED))
  # Optimizer state: Adam's two moments of the adapters and the projector, nothing for the frozen base.
  stage = cfg.train.stage("align")
  shapes, _ = vlm.abstract_params(cfg.model)
  tx = optimizer.make_optimizer(stage, shapes)
  mesh = make_mesh(cfg.mesh)
  state = jax.device_get(checkpoint.restore(checkpoint.manager(workdir, stage), 30,
                                            step.abstract_state(cfg, stage, mesh, tx)))
  param_paths = jax.tree.leaves(optimizer.param_paths(align))
  moments = [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
             for p, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0] if np.ndim(x) > 0]
  owners = {next(q for q in param_paths if path.endswith(f"/{q}")).split("/")[0] for path, _ in moments}
  assert owners == {"lora", "projector"}, owners
  trained = tree_bytes(adapters) + tree_bytes(base["projector"])
  assert sum(x.nbytes for _, x in moments) == 2 * trained


def test_adapters_handed_on_unmerged_or_merged(lora_run):
  cfg, workdir = lora_run
  align, instruct = finished_params(cfg, workdir, "align"), finished_params(cfg, workdir, "instruct")
  # instruct continued align's adapters (same lora config): its adapted kernels are still the fresh init's.
  for name in ADAPTED:
    module, part = name.split("/")
    assert bytes_equal(instruct["decoder"]["layers"][module][part], align["decoder"]["layers"][module][part])
  assert not bytes_equal(instruct["lora"], align["lora"])
  assert not bytes_equal(instruct["decoder"]["embed"], align["decoder"]["embed"])  # trained in full
  # merge_at_end: the next stage starts from W + alpha / r * A @ B and fresh adapters (B = 0).
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  source = dataclasses.replace(cfg.train.stage("align").lora, merge_at_end=True)
  nxt = jax.device_get(step.stage_params(jax.device_put(align), cfg, cfg.train.stage("instruct"), mesh, source))
  merged = lora.merge(*lora.split(align), source)
  assert bytes_equal(lora.split(nxt)[0], jax.device_get(merged))
  factors = zip(jax.tree.leaves(optimizer.param_paths(nxt["lora"])), jax.tree.leaves(nxt["lora"]))
  assert all(np.any(x) if p.endswith("lora_a") else not np.any(x) for p, x in factors)


def test_lora_resume_from_a_mid_stage_checkpoint_reproduces_every_loss_and_param(lora_run, tmp_path, capsys):
  """align's step-25 checkpoint (adapters, projector, Adam, data position), resumed in this process: steps 26-30
  (dropout masks keyed by the step) give the same losses and bytes as the run that went straight through.
  Resuming after a SIGKILL is test_resume's."""
  cfg, reference_dir = lora_run
  resumed = rewound_copy(reference_dir, tmp_path / "resumed", "align", 30)
  capsys.readouterr()
  run.run(cfg, str(resumed), stage="align")
  assert "[align] resumed from step 25." in capsys.readouterr().out
  reference, got = losses_by_step(reference_dir, "align"), losses_by_step(resumed, "align")
  assert sorted(got) == sorted(reference) == list(range(1, 31)) and got == reference
  assert bytes_equal(finished_params(cfg, resumed, "align"), finished_params(cfg, reference_dir, "align"))


def test_adapter_shardings_on_an_8_device_mesh():
  cfg = tiny_config()
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  stage = dataclasses.replace(cfg.train.stages[-1], lora=LoraConfig(rank=4, targets=(
      config_lib.LORA_DECODER, "vision/layers/mlp/fc1/kernel")))
  base = step.param_shardings(cfg, mesh)[0]  # only the adapters are made: the base's shapes suffice
  params = step.stage_params(base, cfg, stage, mesh)
  specs = jax.tree.map(lambda x: x.sharding.spec, params["lora"])
  d = specs["decoder"]["layers"]
  want = {"attn/q_proj": (P(None, "fsdp", None), P(None, None, "tensor", None)),
          "attn/k_proj": (P(None, "fsdp", None), P(None, None, "tensor", None)),
          "attn/o_proj": (P(None, "tensor", None, None), P(None, None, "fsdp")),
          "mlp/gate": (P(None, "fsdp", None), P(None, None, "tensor")),
          "mlp/down": (P(None, "tensor", None), P(None, None, "fsdp"))}
  for name, (a, b) in want.items():
    module, part = name.split("/")
    assert (d[module][part]["kernel"]["lora_a"], d[module][part]["kernel"]["lora_b"]) == (a, b), name
  fc1 = specs["vision"]["layers"]["mlp"]["fc1"]["kernel"]
  assert (fc1["lora_a"], fc1["lora_b"]) == (P(None, "fsdp", None), P(None, None, "tensor"))
  # Adam's moments of an adapter take its sharding.
  tx = optimizer.make_optimizer(stage, vlm.abstract_params(cfg.model)[0])
  abstract = step.abstract_state(cfg, stage, mesh, tx)
  o_proj_a = "lora/decoder/layers/attn/o_proj/kernel/lora_a"
  mu = [x.sharding for p, x in jax.tree_util.tree_flatten_with_path(abstract["opt_state"])[0]
        if jax.tree_util.keystr(p, simple=True, separator="/").endswith(o_proj_a)]
  assert mu and all(s == NamedSharding(mesh, P(None, "tensor", None, None)) for s in mu)


# ---------------------------------------------------------------------------------------------------
# Exports: merged transformers model, PEFT adapter, import back


@pytest.fixture(scope="module")
def hf_lora(tokenizer_dir, tmp_path_factory):  # noqa: F811
  """A random HF LLaVA imported (scanned), random adapters on the decoder, ViT attention, the patch conv and
  projector linear_1, and a retrained projector linear_2 (saved whole): (hf_dir, cfg, params, adapters, lora cfg,
  full, the trained params)."""
  vocab = Tokenizer.load(tokenizer_dir).vocab_size + 3
  _, hf_dir = save_with_tokenizer(build_llava("siglip", vocab), tokenizer_dir, tmp_path_factory.mktemp("hf_base"))
  cfg, params, _ = load.load_hf(hf_dir, scan_layers=True)
  lc = LoraConfig(rank=4, alpha=8.0, targets=(config_lib.LORA_DECODER, "vision/layers/attn/(q|out)/kernel",
                                              "vision/patch_embed/kernel", "projector/linear_1/kernel"))
  adapters = randomized(lora.init(params, lc, jax.random.PRNGKey(2)), seed=3)
  linear_2 = randomized(params["projector"]["linear_2"], seed=4, std=0.2)
  trained = {**params, "projector": {**params["projector"], "linear_2": linear_2}}
  full = {f"projector/linear_2/{k}": v for k, v in linear_2.items()}
  return hf_dir, cfg, trained, adapters, lc, full


def test_merged_export_matches_vlm_jax(hf_lora, tokenizer_dir, tmp_path):  # noqa: F811
  _, cfg, params, adapters, lc, _ = hf_lora
  merged = lora.merge(params, adapters, lc)
  out = export.export(jax.tree.map(np.asarray, merged), cfg, tokenizer_dir, tmp_path / "merged")
  ids, pixels = prompt_and_pixels(cfg, Tokenizer.load(tokenizer_dir))
  assert_logits_and_greedy_match_hf(AutoModelForImageTextToText.from_pretrained(out), cfg, merged, ids, pixels,
                                    "merged export")


def test_peft_adapter_loads_in_peft_and_imports_back(hf_lora, tokenizer_dir, tmp_path):  # noqa: F811
  hf_dir, cfg, params, adapters, lc, full = hf_lora
  out = peft.save_adapter(tmp_path / "adapter", adapters, dataclasses.replace(lc, dropout=0.05), cfg, full)
  assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.05
  base = AutoModelForImageTextToText.from_pretrained(hf_dir)
  model = hf_peft.PeftModel.from_pretrained(base, out).eval()
  assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2 * 7 + 2 * 2 + 1 + 1
  ids, pixels = prompt_and_pixels(cfg, Tokenizer.load(tokenizer_dir))
  # vlm_jax runs base + adapters (not merged) here: the PEFT model is compared with the LoRA forward itself.
  applied = jax.tree.map(np.asarray, lora.apply(params, adapters, lc))
  assert_logits_and_greedy_match_hf(model, cfg, applied, ids, pixels, "peft adapter")
  back, back_config, back_full = peft.load_adapter(out, cfg)
  assert (back_config.rank, back_config.alpha, back_config.dropout) == (lc.rank, lc.alpha, 0.05)
  assert jax.tree.structure(back) == jax.tree.structure(adapters) and bytes_equal(back, adapters)
  assert bytes_equal(hf_names.flatten(back_full), [full[k] for k in sorted(full)])
  assert lora.target_paths(params, back_config) == lora.target_paths(params, lc)
  # `vlm-jax import-hf --adapter`: the workdir holds the base with the adapters merged, linear_2 replaced
  logged = []
  load.import_hf(hf_dir, tmp_path / "imported", adapter=out, log=logged.append)
  want = jax.tree.map(np.asarray, lora.merge(params, adapters, lc))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
  imported = checkpoint.final_params(tmp_path / "imported", load.IMPORT_STAGE, target)
  assert bytes_equal(imported, want)
  assert logged == [f"merged the PEFT adapter {out}: rank 4, alpha 8, 11 target kernel(s); 2 param(s) saved whole "
                    "replaced"]  # linear_2's kernel and bias


def test_workdir_export_adapter_on_base_equals_merged(lora_run, tmp_path):
  """`vlm-jax export` of a LoRA stage: --base + --adapter under peft give the default (merged) export's logits."""
  _, workdir = lora_run
  outs = {part: export.export_workdir(workdir, tmp_path / part, stage="instruct", part=part)
          for part in ("merged", "base", "adapter")}
  ids = torch.tensor([[2, 5, 9, 11, 30, 7, 12, 40, 41]])  # text only: this stage adapts and trains the decoder
  merged = AutoModelForImageTextToText.from_pretrained(outs["merged"]).eval()
  base = AutoModelForImageTextToText.from_pretrained(outs["base"]).eval()
  with torch.no_grad():
    want, before = merged(input_ids=ids).logits, base(input_ids=ids).logits
    got = hf_peft.PeftModel.from_pretrained(base, outs["adapter"]).eval()(input_ids=ids).logits
  np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)
  assert np.abs(want.numpy() - before.numpy()).max() > 1e-3  # the adapters do change the model
  config = hf_peft.PeftConfig.from_pretrained(outs["adapter"])
  assert "model.text_model.embed_tokens" in config.modules_to_save  # instruct trains the rest of the decoder in full


# ---------------------------------------------------------------------------------------------------
# LoRA dropout: x W + dropout(x) A B alpha / r while training


class _TwoCalls(nn.Module):
  """A layer calling its Dense twice (as the chunked MLP does): each call draws its own mask."""

  @nn.compact
  def __call__(self, x):
    proj = layers.dense(8, ("embed", "mlp"), name="proj", dtype=jnp.float32, use_bias=False)
    return proj(x) + proj(2.0 * x), None


class _Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.stack_layers(_TwoCalls, {}, num_layers=2, scanned=True, remat="full")(x)


def test_dropout_branch_equals_a_hand_made_reference_with_the_same_masks():
  model, x = _Stack(), jax.random.normal(jax.random.PRNGKey(0), (3, 5, 8))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), x)["params"])
  lc = LoraConfig(rank=4, alpha=2.0, targets=("layers/proj/kernel",), dropout=0.25)
  adapters = randomized(lora.init(params, lc, jax.random.PRNGKey(2)), std=0.5)
  rng = jax.random.PRNGKey(3)
  got = np.asarray(jax.jit(lambda p, a, r: lora.apply_with_dropout(model, p, a, lc, r, jnp.float32, x))(
      params, adapters, rng))
  # Layer l's key: split(fold_in(rng, target index 0), layers)[l]; the n-th call of the Dense folds in n (n > 0).
  w = np.asarray(params["layers"]["proj"]["kernel"], np.float64)
  a, b = (np.asarray(adapters["layers"]["proj"]["kernel"][n], np.float64) for n in ("lora_a", "lora_b"))
  keys = jax.random.split(jax.random.fold_in(rng, 0), 2)
  masks = []

  def dense(layer, v, n):
    key = keys[layer] if n == 0 else jax.random.fold_in(keys[layer], n)
    keep = np.asarray(jax.random.bernoulli(key, 0.75, v.shape))
    masks.append(keep)
    return v @ w[layer] + (np.where(keep, v / 0.75, 0.0) @ a[layer] @ b[layer]) * (2.0 / 4)
  want = np.asarray(x, np.float64)
  for layer in range(2):
    want = dense(layer, want, 0) + dense(layer, 2.0 * want, 1)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert all(0.6 < m.mean() < 0.9 for m in masks) and len({m.tobytes() for m in masks}) == 4
  # Without dropout on the branch the output is the folded model's.
  folded = np.asarray(model.apply({"params": lora.apply(params, adapters, lc)}, x))
  assert np.abs(got - folded).max() > 0.1
  no_drop = dataclasses.replace(lc, dropout=0.0)
  np.testing.assert_allclose(np.asarray(lora.apply_with_dropout(model, params, adapters, no_drop, rng, jnp.float32, x)),
                             folded, rtol=1e-5, atol=1e-5)


def test_dropout_on_the_tiny_vlm_rate_0_is_the_folded_path_and_b_0_is_the_base():
  cfg = tiny_config()
  batch = lm_batch(cfg)
  model = vlm.VLM(cfg.model)
  params = vlm.init_params(cfg.model, jax.random.PRNGKey(0))
  lc = LoraConfig(rank=4, alpha=8.0, targets=(config_lib.LORA_DECODER, "vision/layers/attn/(q|out)/kernel"),
                  dropout=0.5)
  fresh = lora.init(params, lc, jax.random.PRNGKey(1))
  trained = randomized(fresh)
  dropped = jax.jit(lambda a, r, c: lora.apply_with_dropout(model, params, a, c, r, jnp.float32, batch)["logits"],
                    static_argnums=2)
  folded = jax.jit(lambda a: model.apply({"params": lora.apply(params, a, lc)}, batch)["logits"])
  rng = jax.random.PRNGKey(5)
  np.testing.assert_allclose(np.asarray(dropped(trained, rng, dataclasses.replace(lc, dropout=0.0))),
                             np.asarray(folded(trained)), rtol=0, atol=1e-5)
  # B = 0: the branch is zero whatever the mask, the logits are the base's (up to XLA's f32 reassociation: 3.5e-6).
  base = np.asarray(jax.jit(lambda: model.apply({"params": params}, batch)["logits"])())
  np.testing.assert_allclose(np.asarray(dropped(fresh, rng, lc)), base, rtol=0, atol=1e-5)
  once, again, other = (np.asarray(dropped(trained, r, lc)) for r in (rng, rng, jax.random.PRNGKey(6)))
  assert once.tobytes() == again.tobytes()
  assert np.abs(once - np.asarray(folded(trained))).max() > 1e-2 and np.abs(once - other).max() > 1e-2
  with pytest.raises(config_lib.ConfigError, match="patch_embed"):  # an nn.Conv: no dropout path
    conv = dataclasses.replace(lc, targets=("vision/patch_embed/kernel",))
    lora.apply_with_dropout(model, params, lora.init(params, conv, rng), conv, rng, jnp.float32, batch)
  with pytest.raises(config_lib.ConfigError, match="dropout"):
    tiny_config(overrides=["train.stages.instruct.lora.dropout=0.1"])  # no adapters (rank 0)


def test_dropout_train_step_masks_follow_the_step():
  """Two steps from the same state are bit-identical; resuming from step 1's state gives step 2 again; the loss
  differs from the no-dropout loss and with the seed."""
  cfg = tiny_config()
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  stage = dataclasses.replace(cfg.train.stage("instruct"), batch_size=8, grad_accum=2, warmup_steps=0,
                              lora=LoraConfig(rank=4, alpha=8.0, dropout=0.2, dropout_seed=7))
  tx = optimizer.make_optimizer(stage, vlm.abstract_params(cfg.model)[0])
  abstract = step.abstract_state(cfg, stage, mesh, tx)
  params = step.stage_params(step.init_params(cfg, mesh, jax.random.PRNGKey(0)), cfg, stage, mesh)
  params = {**params, "lora": jax.device_put(randomized(jax.device_get(params["lora"])),
                                             step.shardings_of(abstract["params"]["lora"]))}
  start = jax.device_get(step.init_state(params, tx, abstract))
  train_step = step.make_train_step(vlm.VLM(cfg.model), stage, mesh, tx, abstract)
  put = lambda host: jax.device_put(host, step.shardings_of(abstract))
  batches = [lm_batch(cfg, seed=i) for i in range(2)]
  with step.use_mesh(mesh):
    s1, m1 = train_step(put(start), batches[0])
    after_1 = jax.device_get(s1)
    s2, m2 = train_step(s1, batches[1])
    s2_again, m2_again = train_step(put(after_1), batches[1])
    _, m1_again = train_step(put(start), batches[0])
  assert np.asarray(m1["loss"]).tobytes() == np.asarray(m1_again["loss"]).tobytes()
  assert np.asarray(m2["loss"]).tobytes() == np.asarray(m2_again["loss"]).tobytes()
  assert bytes_equal(jax.device_get(s2["params"]), jax.device_get(s2_again["params"]))
  # The same step's loss under other keys (none: the folded path, as eval runs) differs.
  model, labels = vlm.VLM(cfg.model), optimizer.trainable_labels(abstract["params"], stage)

  @jax.jit
  def loss(params, batch, rng):
    trainable, frozen = step.split_trainable(params, labels)
    loss_sum, _, weight, _, _ = step.accumulate_grads(model, stage, mesh, trainable, frozen, batch, rng)
    return loss_sum / weight
  with step.use_mesh(mesh):
    folded = step.make_eval_step(model, stage, mesh, abstract)(put(start)["params"], batches[0])["loss"]
    keyed = [float(loss(put(start)["params"], batches[0], step.lora_dropout_key(stage.lora, jnp.int32(0)))),
             float(loss(put(start)["params"], batches[0], jax.random.PRNGKey(8)))]
  assert keyed[0] == pytest.approx(float(m1["loss"]), abs=1e-6)
  assert abs(keyed[0] - float(folded)) > 1e-4 and abs(keyed[0] - keyed[1]) > 1e-4


def test_a_step_without_dropout_draws_no_random_numbers():
  """lora.dropout=0: the step lowers to the same program whatever dropout_seed (the LoRA step as it was before
  dropout existed); dropout > 0 brings the threefry RNG in."""
  cfg = tiny_config()
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])

  def lowered(**fields):
    stage = dataclasses.replace(cfg.train.stage("instruct"), batch_size=8, lora=LoraConfig(rank=4, **fields))
    tx = optimizer.make_optimizer(stage, vlm.abstract_params(cfg.model)[0])
    abstract = step.abstract_state(cfg, stage, mesh, tx)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lm_batch(cfg))
    with step.use_mesh(mesh):
      return step.make_train_step(vlm.VLM(cfg.model), stage, mesh, tx, abstract).lower(abstract, batch).as_text()
  plain, seeded, dropped = lowered(), lowered(dropout_seed=5), lowered(dropout=0.1)
  assert plain == seeded and "threefry" not in plain
  assert "threefry" in dropped
