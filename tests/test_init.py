"""`vlm-jax init`: a VLM composed from a tiny random SiglipVisionModel or CLIPVisionModel and a SmolLM2-shaped
LlamaForCausalLM (tied embeddings, ChatML template, byte-level BPE tokenizer), all built offline.

After init the towers' params equal the HF tensors exactly; before training the logits equal those of a
transformers Idefics3 (smolvlm_256m: SigLIP + pixel shuffle) or LLaVA (llava15_7b: CLIP layer -2, CLS dropped, MLP)
assembled from the same two checkpoints and our fresh projector (1e-4, float32, and the same greedy tokens). Tower
shapes come from the checkpoints and each change is printed; contradicting `--set`s and a tower given for the
other one are one-line errors naming the key or file. An import-hf -> export round trip keeps a LLaVA's own
vocabulary and template: bit-identical tensors, same keys and shapes. Two steps of align then instruct on a tiny
the_cauldron parquet (the README's commands at tiny size): after align both towers are bit-identical to the
checkpoints; after instruct, transformers' generate on the export gives the tokens vlm-jax generate gives.
"""
import contextlib
import io
import json

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from fixtures_tokenizer import bpe_tokenizer
from safetensors.torch import load_file

from fixtures_convert import CORPUS, TURNS, assert_logits_and_greedy_match_hf, build_llava, prompt_and_pixels
from vlm_jax import cli, init
from vlm_jax import config as config_lib
from vlm_jax import workdir as workdir_lib
from vlm_jax.config import InputError
from vlm_jax.convert import export, hf_names, hf_tokens, load
from vlm_jax.generate import Generator
from vlm_jax.inputs import chat, images
from vlm_jax.inputs.tokenizer import IM_END, IM_START, Tokenizer

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
FLOAT32 = ["model.dtype=float32"]


def _randomize(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.05)
  return model.eval()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
  """SmolLM2-shaped LlamaForCausalLM (tied, GQA, theta 1e5, eps 1e-5) in safetensors shards, whose tokenizer has
  ChatML (`<|im_end|>` is eos) and a ChatML template, as SmolLM2-Instruct's has."""
  path = tmp_path_factory.mktemp("smollm2")
  tk = bpe_tokenizer(CORPUS)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=IM_END, bos_token="<|endoftext|>",
                                              additional_special_tokens=[IM_START, IM_END], chat_template=CHATML)
  fast.save_pretrained(path)
  torch.manual_seed(0)
  model = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=len(fast), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
      rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=fast.bos_token_id,
      eos_token_id=fast.eos_token_id)), 1)
  model.save_pretrained(path, max_shard_size="100KB")  # sharded, as 7B checkpoints are
  assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
  return model, path


def _save_vision(path, model, processor):
  """A vision tower checkpoint as the Hub has it: weights, config.json, preprocessor_config.json."""
  model.save_pretrained(path)
  processor.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  torch.manual_seed(1)
  model = _randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION, layer_norm_eps=1e-6)), 2)
  return _save_vision(tmp_path_factory.mktemp("siglip"), model,
                      transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  torch.manual_seed(2)
  model = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, layer_norm_eps=1e-5)), 3)
  return _save_vision(tmp_path_factory.mktemp("clip"), model, transformers.CLIPImageProcessorPil(
      size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))


@pytest.fixture(scope="module")
def smolvlm(siglip_dir, lm_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("init_smolvlm") / "w"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main(["init", "--config", "smolvlm_256m", "--workdir", str(workdir), "--vision", str(siglip_dir[1]),
                     "--decoder", str(lm_dir[1]), "--set", *FLOAT32, "model.projector.scale_factor=2"]) == 0
  return workdir, printed.getvalue()


@pytest.fixture(scope="module")
def llava15(clip_dir, lm_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("init_llava15") / "w"
  config = init.init("llava15_7b", workdir, clip_dir[1], lm_dir[1], FLOAT32, log=lambda line: None)
  return workdir, config


def _assert_towers_equal_hf(params, config, vision_model, lm, base_vocab):
  """Every tower param equals its HF tensor exactly; the new embedding rows are the mean of the old ones."""
  flat = hf_names.flatten(params)
  vision = {k.removeprefix("vision_model."): v for k, v in vision_model.state_dict().items()}
  text = lm.state_dict()
  entries = hf_names.vision_entries(config.model.vision, "") + hf_names.decoder_entries(
      config.model.decoder, "model.", "lm_head.weight")
  for e in entries:
    got = e.to_hf(np.asarray(flat[e.ours]))
    want = (vision if e.ours.startswith("vision/") else text)[e.hf].numpy()
    if e.hf == "model.embed_tokens.weight":
      np.testing.assert_array_equal(got[:base_vocab], want)
      np.testing.assert_allclose(got[base_vocab:], np.broadcast_to(want.mean(0), got[base_vocab:].shape), rtol=1e-6)
    else:
      np.testing.assert_array_equal(got, want, err_msg=e.hf)
  return flat


def _grown_embedding(lm, vocab):
  embed = lm.state_dict()["model.embed_tokens.weight"]
  return torch.cat([embed, embed.mean(0, keepdim=True).repeat(vocab - embed.shape[0], 1)])


def test_smolvlm_init_takes_shapes_and_tensors_from_the_checkpoints(smolvlm, siglip_dir, lm_dir):
  workdir, printed = smolvlm
  config, params, tok = workdir_lib.load(workdir)
  base = Tokenizer.load(lm_dir[1] / "tokenizer.json").vocab_size
  v, d = config.model.vision, config.model.decoder
  assert (v.kind, v.image_size, v.width, v.depth, v.layer_norm_eps, v.post_layernorm) == ("siglip", 32, 32, 2, 1e-6,
                                                                                           True)
  assert (d.width, d.num_layers, d.num_heads, d.num_kv_heads, d.rope_theta, d.tie_embeddings) == (64, 2, 4, 2, 1e5,
                                                                                                  True)
  # The pixel-shuffle prompt's tags (tiles split: smolvlm_256m) are added; the LM's ChatML tokens are kept.
  added = ["<image>", "<fake_token_around_image>", "<global-img>"] + [
      f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
  assert ("added 39 special tokens the prompts need and the tokenizer lacked: " + ", ".join(
      f"{t} ({base + i})" for i, t in enumerate(added))) in printed
  assert d.vocab_size == tok.vocab_size == base + len(added) and config.model.image_token_id == tok.image_id == base
  assert tok.im_start_id < base and tok.eos_id == tok.im_end_id
  for line in ("model.vision.width: 768 -> 32", "model.decoder.num_layers: 30 -> 2",
               f"model.decoder.vocab_size: 49280 -> {base + len(added)}", f"model.image_token_id: 49190 -> {base}"):
    assert line in printed, line
  assert "model.decoder.rope_theta: 100000.0 ->" not in printed  # unchanged values are not listed
  assert [s.name for s in config.train.stages] == ["init", "align", "instruct"]
  _assert_towers_equal_hf(params, config, siglip_dir[0], lm_dir[0], base)


def test_smolvlm_init_logits_equal_idefics3_from_the_same_checkpoints(smolvlm, siglip_dir, lm_dir):
  workdir, _ = smolvlm
  config, params, tok = workdir_lib.load(workdir)
  cfg = config.model
  hf = transformers.Idefics3ForConditionalGeneration(transformers.Idefics3Config(
      vision_config=siglip_dir[0].config.to_dict(), text_config={**lm_dir[0].config.to_dict(), "vocab_size":
                                                                 cfg.decoder.vocab_size},
      scale_factor=2, image_token_id=tok.image_id, tie_word_embeddings=True)).eval()
  state = {f"model.vision_model.{k.removeprefix('vision_model.')}": t for k, t in siglip_dir[0].state_dict().items()
           if not k.removeprefix("vision_model.").startswith("head.")}  # SigLIP's pooling head: Idefics3 has none
  state.update({f"model.text_model.{k.removeprefix('model.')}": t for k, t in lm_dir[0].state_dict().items()
                if k != "lm_head.weight"})
  state["model.text_model.embed_tokens.weight"] = _grown_embedding(lm_dir[0], cfg.decoder.vocab_size)
  state["lm_head.weight"] = state["model.text_model.embed_tokens.weight"]
  flat = hf_names.flatten(params)
  for e in hf_names.idefics3_connector_entries(cfg):  # the one part init made: our fresh projector
    state[e.hf] = torch.from_numpy(e.to_hf(np.asarray(flat[e.ours])))
  hf.load_state_dict(state, strict=True)
  ids, _ = chat.render(TURNS, [images.image_prompt(2, 2, cfg.image_tokens_per_tile, True)], tok,
                       generation_prompt=True)
  pixels = np.random.default_rng(0).normal(size=(1, 5, 3, 32, 32)).astype(np.float32)
  assert_logits_and_greedy_match_hf(hf, cfg, params, ids, pixels, "init smolvlm")


def test_llava15_init_reads_clip_at_layer_minus_2_and_matches_llava(llava15, clip_dir, lm_dir):
  workdir, saved = llava15
  config, params, tok = workdir_lib.load(workdir)
  assert config == saved
  cfg = config.model
  v = cfg.vision
  assert (v.kind, v.feature_layer, v.select_strategy, v.post_layernorm, v.act) == ("clip", -2, "default", False,
                                                                                   "quick_gelu")
  assert v.image_mean == tuple(transformers.CLIPImageProcessorPil().image_mean)
  base = Tokenizer.load(lm_dir[1] / "tokenizer.json").vocab_size
  assert cfg.decoder.vocab_size == base + 1 and tok.image_id == base  # only <image>: no tiling tags for LLaVA
  _assert_towers_equal_hf(params, config, clip_dir[0], lm_dir[0], base)
  hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config=clip_dir[0].config.to_dict(), text_config={**lm_dir[0].config.to_dict(), "vocab_size":
                                                               cfg.decoder.vocab_size},
      image_token_index=tok.image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
      projector_hidden_act="gelu", tie_word_embeddings=True)).eval()
  state = {f"model.vision_tower.{k.removeprefix('vision_model.')}": t for k, t in clip_dir[0].state_dict().items()}
  state.update({f"model.language_model.{k.removeprefix('model.')}": t for k, t in lm_dir[0].state_dict().items()
                if k != "lm_head.weight"})
  state["model.language_model.embed_tokens.weight"] = _grown_embedding(lm_dir[0], cfg.decoder.vocab_size)
  state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
  flat = hf_names.flatten(params)
  for e in hf_names.llava_projector_entries(cfg):
    state[e.hf] = torch.from_numpy(e.to_hf(np.asarray(flat[e.ours])))
  hf.load_state_dict(state, strict=True)
  ids, pixels = prompt_and_pixels(cfg, tok)
  assert (ids == tok.image_id).sum() == 16  # 4x4 patches, CLS dropped
  assert_logits_and_greedy_match_hf(hf, cfg, params, ids, pixels, "init llava15")


def test_train_config_of_an_init_workdir_is_the_one_init_wrote(llava15):
  workdir, saved = llava15
  assert init.train_config("llava15_7b", FLOAT32, workdir) == saved
  assert init.train_config("llava15_7b", FLOAT32, workdir / "elsewhere") == config_lib.load("llava15_7b", FLOAT32)


def test_contradicting_set_names_key_values_and_file(siglip_dir, lm_dir, tmp_path):
  with pytest.raises(InputError) as e:
    init.init("smolvlm_256m", tmp_path / "w", siglip_dir[1], lm_dir[1], ["model.vision.width=48"])
  for part in ("model.vision.width=48", "32", str(siglip_dir[1] / "config.json")):
    assert part in str(e.value), (part, str(e.value))
  with pytest.raises(InputError) as e:
    init.init("smolvlm_256m", tmp_path / "w", siglip_dir[1], lm_dir[1], ["model.decoder.rope_theta=10000.0"])
  for part in ("model.decoder.rope_theta=10000.0", "100000.0", str(lm_dir[1] / "config.json")):
    assert part in str(e.value), (part, str(e.value))
  assert not (tmp_path / "w").exists()  # nothing written


def test_init_into_an_initialised_workdir_is_an_error(smolvlm, siglip_dir, lm_dir):
  workdir, _ = smolvlm
  with pytest.raises(InputError, match="already initialised"):
    init.init("smolvlm_256m", workdir, siglip_dir[1], lm_dir[1])


def test_a_tower_given_for_the_other_is_an_error_naming_the_file(siglip_dir, lm_dir, tmp_path, capsys):
  with pytest.raises(InputError) as e:
    init.init("smolvlm_256m", tmp_path / "w", siglip_dir[1], siglip_dir[1])
  for part in (str(siglip_dir[1] / "config.json"), "'siglip_vision_model'", "decoder", "LlamaForCausalLM",
               "the other tower"):
    assert part in str(e.value), (part, str(e.value))
  argv = ["init", "--config", "smolvlm_256m", "--workdir", str(tmp_path / "w"), "--vision", str(lm_dir[1]),
          "--decoder", str(lm_dir[1])]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "'llama'" in err and "SiglipVisionModel" in err and str(lm_dir[1] / "config.json") in err
  (tmp_path / "qwen2").mkdir()
  (tmp_path / "qwen2" / "config.json").write_text(json.dumps({"model_type": "qwen2",
                                                              "architectures": ["Qwen2ForCausalLM"]}))
  with pytest.raises(InputError, match=r"qwen2/config.json: model_type 'qwen2' .* \(Qwen2 has q/k/v biases"):
    init.init("smolvlm_256m", tmp_path / "w", siglip_dir[1], tmp_path / "qwen2")


@pytest.fixture(scope="module")
def llava_own_vocab(tmp_path_factory):
  """A LLaVA whose tokenizer has `<image>` but no ChatML, and a LLaVA-1.5-style template."""
  path = tmp_path_factory.mktemp("llava_own")
  tk = bpe_tokenizer(CORPUS)
  template = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}{% if message['content'] is string %}"
              "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
              "{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                              additional_special_tokens=["<image>"], chat_template=template)
  fast.save_pretrained(path)
  model = build_llava("clip", len(fast))
  model.config.image_token_index = fast.convert_tokens_to_ids("<image>")
  model.save_pretrained(path)
  return model, path, template, len(fast)


def test_import_export_round_trip_keeps_vocabulary_and_template(llava_own_vocab, tmp_path):
  model, path, template, vocab = llava_own_vocab
  printed = []
  config = load.import_hf(path, tmp_path / "w", log=printed.append)
  assert printed == [] and config.model.decoder.vocab_size == vocab  # nothing added: 340 stays 340
  out = export.export_workdir(tmp_path / "w", tmp_path / "out")
  before, after = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
  assert sorted(before) == sorted(after)
  for k in before:
    assert before[k].shape == after[k].shape and torch.equal(before[k], after[k]), k
  fast = transformers.AutoTokenizer.from_pretrained(out)
  assert len(fast) == vocab and fast.chat_template == template
  assert fast.convert_tokens_to_ids(IM_START) is None or fast.convert_tokens_to_ids(IM_START) == fast.unk_token_id
  saved = json.loads((out / "config.json").read_text())
  assert saved["image_token_index"] == model.config.image_token_index == vocab - 1


RUN_CONFIG = '''
import dataclasses
from vlm_jax import config as config_lib


def get_config():
  """smolvlm_256m's model and stage kinds; a few steps on a tiny the_cauldron parquet, one 32 px tile per image."""
  cfg = config_lib.load("smolvlm_256m", ["model.dtype=float32", "model.projector.scale_factor=2", "model.remat=none"])
  common = dict(datasets=(("hf_parquet/cauldron_tiny", 1.0),), batch_size=8, steps=2, warmup_steps=1, log_every=1,
                checkpoint_every=2, max_to_keep=1, task="conversation")
  stages = (config_lib.StageConfig(name="align", trainable=("projector/.*",), lr=1e-4, **common),
            config_lib.StageConfig(name="instruct", trainable=("projector/.*", "decoder/.*"), lr=1e-4, **common))
  data = dataclasses.replace(cfg.data, data_dir=DATA_DIR, seq_len=128, max_tiles=1, image_splitting=False,
                             max_image_size=0, packing=False,
                             num_workers=0, read_threads=2)  # no grain worker processes in a test
  return dataclasses.replace(cfg, data=data, mesh=config_lib.MeshConfig(data=-1),
                             train=config_lib.TrainConfig(stages=stages))
'''


def _cauldron_parquet(path, rows=8):
  """the_cauldron's layout: images = [{bytes, path}] (PNG), texts = [{user, assistant, source}]."""
  rng = np.random.default_rng(0)
  images, texts = [], []
  for i in range(rows):
    png = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8)).save(png, format="PNG")
    images.append([{"bytes": png.getvalue(), "path": f"{i}.png"}])
    texts.append([{"user": "What colour is the circle?", "assistant": ["red", "blue"][i % 2], "source": "tiny"}])
  path.parent.mkdir(parents=True)
  pq.write_table(pa.table({"images": images, "texts": texts}), path)


def test_align_then_instruct_from_init_keeps_towers_then_exports_like_generate(siglip_dir, lm_dir, tmp_path):
  _cauldron_parquet(tmp_path / "the_cauldron" / "tiny" / "train-00000-of-00001.parquet")
  data_dir = str(tmp_path / "tfds")
  assert cli.main(["data", "prepare", "hf_parquet/cauldron_tiny", "--data-dir", data_dir, "--parquet",
                   str(tmp_path / "the_cauldron" / "tiny" / "train-*.parquet"), "--format", "cauldron"]) == 0
  config_file = tmp_path / "run_config.py"
  config_file.write_text(f"DATA_DIR = {data_dir!r}\n" + RUN_CONFIG)
  workdir = tmp_path / "w"
  init.init(str(config_file), workdir, siglip_dir[1], lm_dir[1], log=lambda line: None)
  assert cli.main(["train", "--config", str(config_file), "--workdir", str(workdir)]) == 0
  config, params, _ = workdir_lib.load(workdir, "align")
  base = Tokenizer.load(lm_dir[1] / "tokenizer.json").vocab_size
  _assert_towers_equal_hf(params, config, siglip_dir[0], lm_dir[0], base)  # frozen: bit-identical
  _, init_params, _ = workdir_lib.load(workdir, "init")
  assert not np.array_equal(params["projector"]["proj"]["kernel"], init_params["projector"]["proj"]["kernel"])
  config, params, tok = workdir_lib.load(workdir)
  out = export.export_workdir(workdir, tmp_path / "hf")
  image = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
  _, hf_ids = export.hf_generate(out, [image], "What colour is the circle?", max_new_tokens=8)
  ours = Generator(config, params, tok).generate([([image], "What colour is the circle?")], max_new_tokens=8)[0]
  assert len(hf_ids) > 0 and ours.token_ids == hf_ids


# config.json of google/siglip-base-patch16-512 and HuggingFaceTB/SmolLM2-135M-Instruct as the Hub has them (the
# SiglipModel's vision_config stores only non-default fields).
SIGLIP_B16_512 = {"architectures": ["SiglipModel"], "model_type": "siglip", "initializer_factor": 1.0,
                  "text_config": {"hidden_size": 768, "intermediate_size": 3072, "model_type": "siglip_text_model",
                                  "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 32000},
                  "vision_config": {"hidden_size": 768, "image_size": 512, "intermediate_size": 3072,
                                    "model_type": "siglip_vision_model", "num_attention_heads": 12,
                                    "num_hidden_layers": 12, "patch_size": 16}}
SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
                "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536, "max_position_embeddings": 8192,
                "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
                "pad_token_id": 2, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
                "tie_word_embeddings": True, "vocab_size": 49152}


CLIP_L14_336 = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
                "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                "num_hidden_layers": 12, "model_type": "clip_text_model"},
                "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                                  "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                                  "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
                                  "model_type": "clip_vision_model"}}
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
             "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
             "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000}


@pytest.mark.parametrize("name, vision_json, decoder_json, vocab, added", [
    ("smolvlm_256m", SIGLIP_B16_512, SMOLLM2_135M, 49152, 39),  # <image> + Idefics3's tags
    ("llava15_7b", CLIP_L14_336, LLAMA2_7B, 32000, 1)])  # <image> (the test tokenizer has ChatML)
def test_the_real_checkpoints_configs_give_the_shipped_shapes(lm_dir, tmp_path, name, vision_json, decoder_json,
                                                              vocab, added):
  vision, decoder = tmp_path / "vision", tmp_path / "decoder"
  for path, config in ((vision, vision_json), (decoder, decoder_json)):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
  (decoder / "tokenizer.json").write_bytes((lm_dir[1] / "tokenizer.json").read_bytes())
  shipped = config_lib.load(name)
  values, _, _, new_tokens = init.towers(shipped, vision, decoder, "tok")
  different = {k: v for k, v in values.items() if init._get(shipped, k) != v}  # pylint: disable=protected-access
  # The configs are sized for these checkpoints: only the vocabulary (the LM's rows, not the shipped VLM's padded
  # count), the image token's id and the tokenizer differ.
  assert sorted(different) == ["data.tokenizer.path", "data.tokenizer.vocab_size", "model.decoder.vocab_size",
                               "model.image_token_id"], different
  assert values["model.decoder.vocab_size"] == vocab and len(new_tokens) == added


def test_a_models_own_template_is_found_where_transformers_saves_it(tmp_path):
  assert hf_tokens.chat_template(tmp_path) is None  # none: vlm_jax's ChatML, and its two tokens, are chosen
  assert hf_tokens.needed_tokens(None, "mlp", False) == ["<image>", IM_START, IM_END]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
      {"name": "tool_use", "template": "T"}, {"name": "default", "template": "USER: {{ messages }}"}]}))
  assert hf_tokens.chat_template(tmp_path) == "USER: {{ messages }}"
  assert hf_tokens.needed_tokens("USER: {{ messages }}", "pixel_shuffle", False) == [
      "<image>", "<fake_token_around_image>", "<global-img>"]  # no ChatML, no tile tags for unsplit images
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ '<|im_start|>' }}"}))  # llava-hf
  assert hf_tokens.chat_template(tmp_path) == "{{ '<|im_start|>' }}"
  (tmp_path / "chat_template.jinja").write_text("J")
  assert hf_tokens.chat_template(tmp_path) == "J"
