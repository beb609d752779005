"""vlm_jax.flops: hand-computed terms, backward multipliers per stage, and cross-checks against XLA's cost
analysis of the real (unscanned) model's forward pass and of gradients w.r.t. each stage's trainable params."""
import flax
import jax
import jax.numpy as jnp
import pytest

from vlm_jax import config, flops, losses
from vlm_jax.model import vlm as vlm_lib

# Wide enough that matmuls dominate XLA's count (it also counts norms, softmax, activations), small
# enough to compile in seconds. Nothing here runs: only compiled.
WIDE = ["model.scan_layers=false", "model.vision.width=256", "model.vision.mlp_dim=1024", "model.vision.depth=2",
        "model.vision.num_heads=4", "model.decoder.width=256", "model.decoder.num_heads=4",
        "model.decoder.num_kv_heads=2", "model.decoder.mlp_dim=768", "model.decoder.num_layers=2",
        "model.decoder.vocab_size=1024", "model.contrastive.width=256", "model.contrastive.mlp_dim=1024",
        "model.contrastive.embed_dim=128", "model.contrastive.depth=1", "model.contrastive.hard_negatives=0",
        "model.dtype=float32"]
B, S, N = 2, 128, 2
# shapes_tiny's sizes with the LLaVA projector pinned, so the hand-written numbers below stay put.
TINY = ["model.projector.kind=mlp", "model.projector.act=gelu", "model.vision.feature_layer=-1", "model.scan_layers=True",
        "model.dtype=float32"]


def test_hand_computed_terms():
  """shapes_tiny, batch 1, seq 192, 2 tiles: each term written out as 2*m*k*n."""
  cfg = config.load("shapes_tiny", TINY)
  terms = {m.name: m.flops for m in flops.matmuls(cfg, 1, 192, 2)}
  tiles, patches = 2, 36  # 48 px / 8 px patches -> 6x6, SigLIP: no CLS
  assert terms["vision.patch_embed"] == 2 * tiles * patches * (8 * 8 * 3) * 128
  assert terms["vision.attn.q"] == 2 * tiles * patches * 128 * 128 * 3  # 3 layers
  assert terms["vision.attn.scores"] == 2 * tiles * patches * 128 * patches * 3
  assert terms["vision.mlp.fc1"] == 2 * tiles * patches * 128 * 512 * 3
  assert terms["projector.linear_1"] == 2 * tiles * patches * 128 * 192
  assert terms["projector.linear_2"] == 2 * tiles * patches * 192 * 192
  assert terms["decoder.attn.q_proj"] == 2 * 192 * 192 * (6 * 32) * 3  # head_dim 32
  assert terms["decoder.attn.k_proj"] == 2 * 192 * 192 * (2 * 32) * 3  # GQA: 2 kv heads
  assert terms["decoder.attn.scores"] == 2 * 192 * (6 * 32) * 96 * 3  # causal: half of 192 keys
  assert terms["decoder.mlp.down"] == 2 * 192 * 512 * 192 * 3
  assert terms["decoder.lm_head"] == 2 * 192 * 192 * 512
  assert len(terms) == 21  # ViT 9, projector 2, decoder 9, lm_head 1
  assert flops.forward_flops(cfg, 1, 192, 2) == sum(terms.values()) == 634_503_168
  full = flops.forward_flops(cfg, 1, 192, 2, causal_as_full=True)
  assert full - sum(terms.values()) == terms["decoder.attn.scores"] + terms["decoder.attn.values"]


def test_feature_layer_and_pixel_shuffle():
  llava = config.load("llava15_7b")
  terms = {m.name: m.flops for m in flops.matmuls(llava, 1, 2048, 1)}
  assert flops.vision_layers_used(llava) == 23  # feature_layer -2 of 24 blocks
  assert terms["vision.attn.q"] == 2 * 577 * 1024 * 1024 * 23  # 24x24 patches + CLS
  assert terms["projector.linear_1"] == 2 * 576 * 1024 * 4096  # CLS dropped ('default')
  smol = config.load("smolvlm_256m", ["data.tile_budget=0"])  # every slot through the ViT
  terms = {m.name: m.flops for m in flops.matmuls(smol, 1, 2048, 17)}
  assert terms["projector.proj"] == 2 * 17 * 64 * (768 * 16) * 576  # 1024 patches / 16 after the shuffle
  assert terms["decoder.lm_head"] == 2 * 2048 * 576 * 49280  # tied: the embedding table
  assert flops.train_step_breakdown(smol, "instruct", 1, 2048, 17)["lm_head"] == 3 * terms["decoder.lm_head"]


def test_tile_budget_counts_the_tiles_the_vit_runs():
  """smolvlm_256m ships data.tile_budget=14 for its 17 slots: the ViT and the projector run on 14 tiles a row
  (vlm.gather_tiles), the decoder on every position."""
  smol = config.load("smolvlm_256m")
  assert smol.data.tile_budget == 14 and smol.data.max_tiles == 17
  budget = {m.name: m.flops for m in flops.matmuls(smol, 2, 2048, 17)}
  slots = {m.name: m.flops for m in flops.matmuls(config.load("smolvlm_256m", ["data.tile_budget=0"]), 2, 2048, 17)}
  assert budget.keys() == slots.keys()
  for name, f in budget.items():
    assert f == (slots[name] * 14 / 17 if name.split(".")[0] in ("vision", "projector") else slots[name]), name
  assert budget["projector.proj"] == 2 * 2 * 14 * 64 * (768 * 16) * 576
  # 14 or more slots: the budget is off, every slot runs
  assert flops.forward_flops(smol, 2, 2048, 14) == flops.forward_flops(
      config.load("smolvlm_256m", ["data.tile_budget=0"]), 2, 2048, 14)


def test_attention_kernel_flops():
  """The attention products the TPU splash kernel runs (XLA's cost analysis does not see inside it): the
  decoder's at rows in whole 128 blocks, the ViT's at 128 positions or more; forward, backward (2x) and under
  remat the forward again where a backward runs."""
  def attention(cfg, tower, *shape):
    by_name = {m.name: m.flops for m in flops.matmuls(cfg, *shape)}
    return by_name[f"{tower}.attn.scores"] + by_name[f"{tower}.attn.values"]
  tiny = config.load("shapes_tiny", TINY + ["model.remat=full"])  # ViT of 36 positions: XLA's attention
  decoder = attention(tiny, "decoder", 2, 256, 2)
  assert flops.attention_kernel_flops(tiny, "instruct", 2, 256, 2) == 4 * decoder
  assert flops.attention_kernel_flops(tiny, "align", 2, 256, 2) == 4 * decoder  # frozen, gradients pass
  assert flops.attention_kernel_flops(config.load("shapes_tiny", TINY), "instruct", 2, 256, 2) == 3 * decoder
  assert flops.attention_kernel_flops(tiny, "instruct", 2, 192, 2) == 0  # 192 % 128: XLA's attention
  llava = config.load("llava15_7b")  # remat save_dot_except_mlp; CLIP-L/14-336: 577 positions, frozen
  assert llava.model.remat == "save_dot_except_mlp"
  assert flops.attention_kernel_flops(llava, "instruct", 4, 2048, 1) == (
      4 * attention(llava, "decoder", 4, 2048, 1) + attention(llava, "vision", 4, 2048, 1))


def test_backward_multipliers_per_stage():
  """Frozen with nothing trainable upstream: 1x; frozen under a trainable block: 2x; trainable: 3x."""
  cfg = config.load("shapes_tiny", TINY)
  fwd = {}
  for m in flops.matmuls(cfg, 4, 64, 2):
    fwd[m.block] = fwd.get(m.block, 0) + m.flops
  by_name = {m.name: m.flops for m in flops.matmuls(cfg, 4, 64, 2)}
  attention = by_name["decoder.attn.scores"] + by_name["decoder.attn.values"]  # no weights: 2 input grads
  align = flops.train_step_breakdown(cfg, "align", 4, 64, 2)
  assert align["vision_embed"] == fwd["vision_embed"] and align["vision_layers"] == fwd["vision_layers"]
  # linear_1 reads the frozen ViT: weight gradient only; linear_2 also passes gradients down to linear_1.
  assert align["projector"] == 2 * by_name["projector.linear_1"] + 3 * by_name["projector.linear_2"]
  assert align["decoder_layers"] == 2 * (fwd["decoder_layers"] - attention) + 3 * attention
  assert align["lm_head"] == 2 * fwd["lm_head"]
  instruct = flops.train_step_breakdown(cfg, "instruct", 4, 64, 2)
  assert instruct["vision_layers"] == fwd["vision_layers"]
  assert instruct["decoder_layers"] == 3 * fwd["decoder_layers"] and instruct["lm_head"] == 3 * fwd["lm_head"]
  everything = flops.train_step_breakdown(cfg, config.StageConfig(trainable=(".*",)), 4, 64, 2)
  assert everything["vision_embed"] == 2 * fwd["vision_embed"]  # no gradient w.r.t. pixels
  assert everything["total"] == 3 * sum(fwd.values()) - fwd["vision_embed"]
  text = flops.train_step_breakdown(cfg, "text_pretrain", 4, 64, 0)  # a batch without pixel_values
  assert set(text) == {"decoder_layers", "lm_head", "total"}
  assert text["total"] == 3 * (fwd["decoder_layers"] + fwd["lm_head"])
  defaults = (cfg.train.stage("instruct").batch_size, cfg.data.seq_len, cfg.data.max_tiles)
  assert flops.train_step_flops(cfg, "instruct") == flops.train_step_breakdown(cfg, "instruct", *defaults)["total"]


def test_moe_counts_active_experts():
  """Interleaved MoE (every 3rd of 3 layers): router + top-2 of 8 experts on one layer, dense SwiGLU on two."""
  cfg = config.load("shapes_tiny", TINY + ["model.decoder.moe.num_experts=8", "model.decoder.moe.experts_per_token=2",
                                           "model.decoder.moe.every_n_layers=3", "model.decoder.moe.expert_mlp_dim=256"])
  terms = {m.name: m for m in flops.matmuls(cfg, 1, 192, 2)}
  assert terms["decoder.mlp.gate"].flops == 2 * 192 * 192 * 512 * 2  # two dense layers
  assert terms["decoder.moe.router"].flops == 2 * 192 * 192 * 8
  assert terms["decoder.moe.gate_up"].flops == 2 * (192 * 2) * 192 * (2 * 256)  # each token in 2 experts
  assert terms["decoder.moe.down"].flops == 2 * (192 * 2) * 256 * 192
  assert terms["decoder.moe.down"].weight == "decoder/layers/layers_2/moe/experts/down"
  assert terms["decoder.attn.q_proj"].weight == "decoder/layers/layers_0/attn/q_proj/kernel"
  instruct = flops.train_step_breakdown(cfg, "instruct", 1, 192, 2)
  assert instruct["decoder_layers"] == 3 * sum(m.flops for m in terms.values() if m.block == "decoder_layers")


def test_llava_instruct_is_about_six_flops_per_param_per_token():
  """Decoder-dominated: ~6 * decoder params * tokens, plus attention and the frozen ViT's forward."""
  cfg = config.load("llava15_7b")
  tokens = 128 * 2048
  d = cfg.model.decoder
  decoder_params = d.num_layers * (4 * d.width ** 2 + 3 * d.width * d.mlp_dim) + d.width * d.vocab_size
  total = flops.train_step_flops(cfg, "instruct")
  assert 6 * decoder_params * tokens < total < 1.1 * 6 * decoder_params * tokens
  assert total == pytest.approx(1.0871e16, rel=1e-3)


@pytest.mark.parametrize("name, overrides", [
    ("shapes_tiny", []),
    ("smolvlm_256m", ["model.vision.depth=1", "model.decoder.num_layers=1", "model.vision.image_size=64"]),
    ("llava15_7b", ["model.vision.depth=2", "model.decoder.num_layers=1", "model.vision.image_size=56",
                    "model.decoder.width=64", "model.decoder.num_heads=2", "model.decoder.num_kv_heads=2",
                    "model.decoder.vocab_size=128", "model.vision.width=64", "model.vision.num_heads=2"]),
    ("shapes_tiny", ["model.decoder.moe.num_experts=4"]),
    ("shapes_tiny", ["model.decoder.moe.num_experts=4", "model.decoder.moe.every_n_layers=3"]),
    ("shapes_tiny", ["model.contrastive.image_pool=map"]),
])
@pytest.mark.parametrize("scan", [True, False])
def test_param_paths_exist_in_the_model(name, overrides, scan):
  """flops decides what trains from DESIGN.md's param paths: every one of them must exist in the model."""
  cfg = config.load(name, overrides + [f"model.scan_layers={scan}"])
  shapes, _ = vlm_lib.abstract_params(cfg.model)
  real = set(flax.traverse_util.flatten_dict(shapes, sep="/"))
  used = {p for paths in flops._block_params(cfg).values() for p in paths}  # pylint: disable=protected-access
  used |= {m.weight for m in flops.matmuls(cfg, 1, 8, 1) if m.weight}
  if cfg.model.contrastive.enabled:
    used |= {m.weight for m in flops.matmuls(cfg, 1, 8, loss="contrastive") if m.weight}
  expected_missing = set()  # paths that this model flavour does not have
  if not cfg.model.contrastive.enabled:
    expected_missing |= {p for p in used if p.startswith("contrastive/")}
  if cfg.model.vision.kind == "clip":
    expected_missing.add("vision/patch_embed/bias")
  else:
    expected_missing |= {"vision/cls_token", "vision/pre_layernorm/scale", "vision/pre_layernorm/bias"}
  assert used - real == expected_missing


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def _wide_model():
  cfg = config.load("shapes_tiny", WIDE)
  params, _ = vlm_lib.abstract_params(cfg.model)
  return cfg, vlm_lib.VLM(cfg.model), params


def test_forward_matches_xla_cost_analysis():
  cfg, model, params = _wide_model()
  batch = jax.tree.map(jnp.asarray, vlm_lib.dummy_batch(cfg.model, B, S, N))
  xla = _xla_flops(lambda p, b: model.apply({"params": p}, b)["logits"], params, batch)
  # XLA sees the dense masked attention, hence causal_as_full.
  assert flops.forward_flops(cfg, B, S, N, causal_as_full=True) == pytest.approx(xla, rel=0.03)


@pytest.mark.parametrize("stage", ["text_pretrain", "text_only_batch", "align", "instruct", "everything"])
def test_train_step_matches_xla_gradients(stage):
  """XLA's count of value-and-grad w.r.t. the stage's trainable params only: it drops the gradients nobody
  needs (a frozen ViT's backward), as our accounting says."""
  cfg, model, params = _wide_model()
  st = config.StageConfig(name="everything") if stage == "everything" else cfg.train.stage(
      "text_pretrain" if stage == "text_only_batch" else stage)
  tiles = 0 if stage == "text_only_batch" else N
  batch = jax.tree.map(jnp.asarray, vlm_lib.dummy_batch(cfg.model, B, S, max(tiles, 1)))
  if not tiles:
    batch = {**batch, "pixel_values": batch["pixel_values"][:, :0], "tile_mask": batch["tile_mask"][:, :0]}
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  trainable = {k: v for k, v in flat.items() if flops.is_trainable(k, st.trainable)}
  frozen = {k: v for k, v in flat.items() if k not in trainable}

  def loss(trainable, frozen, batch):
    p = flax.traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")
    return jnp.mean(jnp.square(model.apply({"params": p}, batch)["logits"]))  # every logit gets a gradient

  xla = _xla_flops(jax.value_and_grad(loss), trainable, frozen, batch)
  ours = flops.train_step_flops(cfg, st, B, S, tiles)
  dense_half = sum(m.flops for m in flops.matmuls(cfg, B, S, tiles) if m.name.startswith("decoder.attn.s")
                   or m.name.startswith("decoder.attn.values"))
  assert ours + 3 * dense_half == pytest.approx(xla, rel=0.03)  # the masked half of attention, fwd + bwd


@pytest.mark.parametrize("pool", ["map", "gap"])
def test_contrastive_matches_xla_gradients(pool):
  cfg = config.load("shapes_tiny", WIDE + [f"model.contrastive.image_pool={pool}"])
  model, (params, _) = vlm_lib.VLM(cfg.model), vlm_lib.abstract_params(cfg.model)
  st = cfg.train.stage("vision_pretrain")
  length = cfg.model.contrastive.max_text_len
  pixels = jnp.zeros((B * 4, 1, 48, 48, 3))
  text = jnp.zeros((B * 4, length), jnp.int32)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  trainable = {k: v for k, v in flat.items() if flops.is_trainable(k, st.trainable)}
  frozen = {k: v for k, v in flat.items() if k not in trainable}

  def loss(trainable, frozen):
    p = flax.traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")
    image, txt, _, _ = model.apply({"params": p}, pixels, text, text == 0, method=vlm_lib.VLM.contrastive_embeddings)
    return jnp.mean(jnp.square(image @ txt.T))

  assert flops.forward_flops(cfg, B * 4, loss="contrastive") == pytest.approx(
      _xla_flops(lambda p: loss(p, {}), flat), rel=0.05)
  assert flops.train_step_flops(cfg, st, B * 4) == pytest.approx(
      _xla_flops(jax.value_and_grad(loss), trainable, frozen), rel=0.05)


@pytest.mark.parametrize("similarity", ["global", "token"])
def test_contrastive_hard_negatives_match_xla(similarity):
  """K hard negatives per image: the text tower runs on B * (1 + K) texts, plus each image's [K] negative
  similarities. similarity=token: patches and text tokens are projected, and pairs compared token by patch."""
  k = 3
  cfg = config.load("shapes_tiny", WIDE + [f"model.contrastive.hard_negatives={k}",
                                           f"model.contrastive.similarity={similarity}"])
  params, _ = vlm_lib.abstract_params(cfg.model)
  model, rows, length = vlm_lib.VLM(cfg.model), B * 4, cfg.model.contrastive.max_text_len
  pixels = jnp.zeros((rows, 1, 48, 48, 3))
  text = jnp.zeros((rows * (1 + k), length), jnp.int32)

  def forward(p):
    image, txt, _, _ = model.apply({"params": p}, pixels, text, text == 0, method=vlm_lib.VLM.contrastive_embeddings)
    return (losses.similarity(image, txt[:rows]),
            losses.own_similarity(image, txt[rows:].reshape(rows, k, *txt.shape[1:])))
  assert flops.forward_flops(cfg, rows, loss="contrastive") == pytest.approx(_xla_flops(forward, params), rel=0.05)


def test_moe_forward_matches_xla_plus_dispatch_work():
  """Every layer MoE (4 experts, top-2, dropless): XLA also counts what model FLOPs leave out, the one-hot dispatch
  and combine einsums (2*B*S*E*C*D each) and the empty capacity slots (E*C slots per row and expert layer, C = S
  dropless, of which k*S hold a token). Adding exactly that work to our count gives XLA's number."""
  moe = ["model.decoder.moe.num_experts=4", "model.decoder.moe.experts_per_token=2",
         "model.decoder.moe.expert_mlp_dim=256", "model.decoder.moe.capacity_factor=0.0"]
  cfg = config.load("shapes_tiny", WIDE + moe)
  params, _ = vlm_lib.abstract_params(cfg.model)
  model = vlm_lib.VLM(cfg.model)
  batch = jax.tree.map(jnp.asarray, vlm_lib.dummy_batch(cfg.model, B, S, N))
  xla = _xla_flops(lambda p, b: model.apply({"params": p}, b)["logits"], params, batch)
  d = cfg.model.decoder
  e, k, f, c = 4, 2, 256, S
  terms = {m.name: m.flops for m in flops.matmuls(cfg, B, S, N)}
  assert "decoder.mlp.gate" not in terms
  assert terms["decoder.moe.gate_up"] == 2 * (B * S * k) * d.width * (2 * f) * d.num_layers
  dispatch_and_combine = 2 * (2 * B * S * e * c * d.width)
  empty_slots = (B * e * c - B * S * k) * (2 * d.width * 2 * f + 2 * f * d.width)
  ours = flops.forward_flops(cfg, B, S, N, causal_as_full=True)
  assert ours + d.num_layers * (dispatch_and_combine + empty_slots) == pytest.approx(xla, rel=0.03)
  assert xla > 1.5 * ours  # the hardware-only work is large here: the check would see it missing


def test_kernel_flops_follow_the_kernels_own_rule():
  """flops.py may not import model/kernels (LAYOUT.md), so it restates the splash kernel's block rule: the
  decoder's attention counts in the kernel exactly where `kernels.tpu.supports` takes it (causal), and the
  ViT's where it takes a bidirectional sequence of that many positions."""
  from vlm_jax.model.kernels import tpu  # pylint: disable=import-outside-toplevel
  tiny = config.load("shapes_tiny", TINY)
  heads, kv, hd = tiny.model.decoder.num_heads, tiny.model.decoder.num_kv_heads, 8
  for seq_len in (96, 128, 192, 200, 256, 384):
    q, k = jnp.zeros((1, seq_len, heads, hd)), jnp.zeros((1, seq_len, kv, hd))
    counted = flops.attention_kernel_flops(tiny, "instruct", 2, seq_len, 2) > 0
    assert counted == tpu.supports(q, k, causal=True), seq_len
  for size, patch in ((48, 8), (96, 8), (88, 8), (64, 4)):
    cfg = config.load("shapes_tiny", TINY + [f"model.vision.image_size={size}", f"model.vision.patch_size={patch}",
                                             "train.stages.instruct.trainable=('vision/.*',)"])
    n = cfg.model.vision.num_positions
    x = jnp.zeros((1, n, 4, 8))
    vision = {m.name: m.flops for m in flops.matmuls(cfg, 2, 128, 1)}
    ours = flops.attention_kernel_flops(cfg, "instruct", 2, 96, 1)  # 96: the decoder stays on XLA's attention
    assert (ours > 0) == tpu.supports(x, x, causal=False), n
    if ours:
      assert ours == 3 * (vision["vision.attn.scores"] + vision["vision.attn.values"])
