"""Conversion I/O: the sentencepiece -> tokenizer.json conversion keeps ids, the chat template renders our ChatML,
fmt='torch' and bfloat16 exports, backbone imports (SigLIP / CLIP vision, Llama with added special tokens) match
HF numerically, errors name path / shapes / file, older on-disk key spellings load, and import_hf writes a
workdir whose checkpoint restores through vlm_jax.checkpoint."""
import dataclasses
import json
import random

import jax
import numpy as np
import pytest
import torch
import transformers
from fixtures_tokenizer import bpe_tokenizer
from safetensors.torch import load_file, save_file

from fixtures_convert import CORPUS, build_llava, randomize, tokenizer_dir  # noqa: F401  (fixture)
from vlm_jax import checkpoint
from vlm_jax import workdir as workdir_lib
from vlm_jax.convert import export, hf_config, load
from vlm_jax.inputs import chat
from vlm_jax.inputs.tokenizer import SPECIAL_TOKENS, Tokenizer
from vlm_jax.model import vlm
from vlm_jax.model.decoder import Decoder
from vlm_jax.model.vision import VisionEncoder

CHAT = [{"role": "system", "content": "You answer  briefly."},
        {"role": "user", "content": "<image>\nWhat colour is the circle?\n\n(ünïcode 日本 🙂)"},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "<image><row_1_col_2><global-img> How many?\t3 ?"}]


def test_sentencepiece_to_tokenizer_json_keeps_ids(tokenizer_dir):
  ours = Tokenizer.load(tokenizer_dir)
  fast = export.hf_tokenizer(tokenizer_dir)
  text = chat.render_text(CHAT, ["<image>", "<image>"], generation_prompt=True)
  ids = ours.encode(text)
  assert fast(text, add_special_tokens=False).input_ids == ids
  assert fast.decode(ids) == ours.decode(ids) == text
  assert {ours.token_to_id(t) for t in SPECIAL_TOKENS} == set(range(4, 4 + len(SPECIAL_TOKENS)))
  assert (fast.pad_token_id, fast.unk_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2, 3)
  rng = random.Random(0)  # random strings of corpus characters, whitespace runs, specials and rare characters
  alphabet = list("abcdefghijklmnopqrstuvwxyz ?.,:3\n\t  ") + ["<image>", "<|im_end|>", "é", "🙂", "日"]
  for _ in range(500):
    s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    assert fast(s, add_special_tokens=False).input_ids == ours.encode(s), repr(s)


def test_chat_template_renders_our_chatml(tokenizer_dir):
  fast = export.hf_tokenizer(tokenizer_dir)
  ids, _ = chat.render(CHAT, ["<image>", "<image>"], Tokenizer.load(tokenizer_dir), generation_prompt=True)
  assert fast.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
      chat.render_text(CHAT, ["<image>", "<image>"], generation_prompt=True)
  assert list(fast.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)) == \
      ids.tolist()


def test_hf_json_tokenizer_exports_unchanged(tmp_path):
  ours = Tokenizer(hf_json=bpe_tokenizer(CORPUS).to_str(), roles={"eos": "<|endoftext|>"})
  ours.add_special_tokens()
  ours.save(tmp_path)
  fast = export.hf_tokenizer(tmp_path)
  text = chat.render_text(CHAT, ["<image>", "<image>"])
  assert fast(text, add_special_tokens=False).input_ids == ours.encode(text)
  assert fast.eos_token_id == ours.eos_id and fast.pad_token_id is None


@pytest.fixture(scope="module")
def llava_dir(tokenizer_dir, tmp_path_factory):
  model = build_llava("siglip", Tokenizer.load(tokenizer_dir).vocab_size)
  path = tmp_path_factory.mktemp("llava")
  model.save_pretrained(path)
  export.hf_tokenizer(tokenizer_dir).save_pretrained(path)
  return model, path


def test_torch_and_bfloat16_exports(llava_dir, tokenizer_dir, tmp_path):
  model, path = llava_dir
  cfg, params, _ = load.load_hf(path)
  export.export(params, cfg, tokenizer_dir, tmp_path / "torch", fmt="torch")
  state = load_file(tmp_path / "torch" / "model.safetensors")
  original = model.state_dict()
  assert sorted(state) == sorted(original) and all(torch.equal(state[k], original[k]) for k in state)
  name_map = json.loads((tmp_path / "torch" / export.NAME_MAP_FILE).read_text())
  assert name_map["family"] == "llava" and len(name_map["entries"]) == len(state)
  q = next(e for e in name_map["entries"] if e["ours"] == "decoder/layers_1/attn/q_proj/kernel")
  assert (q["hf"], q["transform"], q["shape"]) == ("model.language_model.layers.1.self_attn.q_proj.weight", "dense",
                                                    [64, 4, 16])
  export.export(params, cfg, tokenizer_dir, tmp_path / "bf16", dtype="bfloat16")
  reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16")
  assert reloaded.dtype == torch.bfloat16
  for k, v in reloaded.state_dict().items():
    assert torch.equal(v, original[k].to(torch.bfloat16)), k
  with pytest.raises(hf_config.ConversionError, match="vision.kind='none'"):
    export.export(params, dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, kind="none")),
                  tokenizer_dir, tmp_path / "none")


def test_import_errors_name_path_shapes_and_file(llava_dir, tmp_path):
  _, path = llava_dir
  def copy_with(config_edit=None, state_edit=None):
    d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    if config_edit:
      config_edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    state = load_file(path / "model.safetensors")
    if state_edit:
      state_edit(state)
    save_file(state, d / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json"):
      (d / f).write_bytes((path / f).read_bytes())
    return d
  bad_shape = copy_with(config_edit=lambda c: c["text_config"].update(intermediate_size=80))
  with pytest.raises(ValueError) as e:
    load.load_hf(bad_shape)
  for part in ("decoder/layers_0/mlp/gate/kernel", "(96, 64)", "(80, 64)", str(bad_shape / "model.safetensors")):
    assert part in str(e.value)
  missing = copy_with(state_edit=lambda s: s.pop("multi_modal_projector.linear_2.bias"))
  with pytest.raises(KeyError, match="projector/linear_2/bias"):
    load.load_hf(missing)
  extra = copy_with(state_edit=lambda s: s.update({"multi_modal_projector.linear_3.weight": torch.zeros(2)}))
  with pytest.raises(ValueError, match="no vlm_jax param maps to.*linear_3"):
    load.load_hf(extra)
  (tmp_path / "pickled").mkdir()
  (tmp_path / "pickled" / "config.json").write_text((path / "config.json").read_text())
  (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="safetensors only"):
    load.load_hf(tmp_path / "pickled")


def test_other_key_spellings_load_the_same(llava_dir, tmp_path):
  model, path = llava_dir
  on_disk = load_file(path / "model.safetensors")  # transformers 5 saves language_model.model.*, vision_tower.*
  assert "language_model.lm_head.weight" in on_disk and "vision_tower.post_layernorm.weight" in on_disk
  spellings = {
      # llava-hf checkpoints of transformers 4.x nest the tower as vision_tower.vision_model.*
      "legacy": {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in on_disk.items()},
      "in_memory": {k: v.contiguous() for k, v in model.state_dict().items()},  # model.language_model.*, lm_head
  }
  _, want, _ = load.load_hf(path)
  for name, state in spellings.items():
    d = tmp_path / name
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
      (d / f).write_bytes((path / f).read_bytes())
    save_file(state, d / "model.safetensors")
    _, got, _ = load.load_hf(d)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_vision_backbones_match_hf(tmp_path):
  torch.manual_seed(0)
  common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                patch_size=8)
  siglip = randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common)))  # with its head
  siglip.save_pretrained(tmp_path / "siglip")
  clip = randomize(transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=common, text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=50), projection_dim=16)))
  clip.save_pretrained(tmp_path / "clip")
  pixels = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    want_siglip = siglip(torch.tensor(pixels)).last_hidden_state.numpy()  # post-LN, Idefics3's reading
    want_clip = clip.vision_model(torch.tensor(pixels), output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
  for name, kwargs, want in [("siglip", dict(post_layernorm=True), want_siglip),
                             ("clip", dict(feature_layer=-2, select_strategy="default"), want_clip)]:
    vision, params = load.load_vision(tmp_path / name, scan_layers=name == "siglip", **kwargs)
    assert vision.kind == name and vision.layer_norm_eps == (1e-6 if name == "siglip" else 1e-5)
    got = VisionEncoder(vision, scan_layers=name == "siglip").apply({"params": params}, pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0, err_msg=name)


def test_llama_backbone_gets_special_tokens_and_matches_hf(tmp_path):
  tk = bpe_tokenizer(CORPUS)
  vocab = tk.get_vocab_size()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(tmp_path)
  torch.manual_seed(0)
  llama = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64)))
  llama.save_pretrained(tmp_path)
  decoder, params, tok = load.load_llama(tmp_path, scan_layers=False)
  assert decoder.vocab_size == tok.vocab_size == vocab + len(SPECIAL_TOKENS)
  assert tok.image_id == vocab and tok.eos_id == tk.token_to_id("<|endoftext|>")
  embed = np.asarray(params["embed"]["embedding"])
  np.testing.assert_allclose(embed[vocab:], np.broadcast_to(embed[:vocab].mean(0), (len(SPECIAL_TOKENS), 32)),
                             rtol=1e-6)
  assert params["lm_head"]["kernel"].shape == (32, decoder.vocab_size)
  ids = np.asarray([tok.encode("How many shapes are there? There are 3")], np.int32)
  with torch.no_grad():
    want = llama(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  logits, _ = Decoder(decoder, scan_layers=False).apply({"params": params}, ids, np.ones_like(ids),
                                                        np.arange(ids.shape[1])[None])
  np.testing.assert_allclose(np.asarray(logits)[..., :vocab], want, atol=1e-4, rtol=0)


def test_import_hf_writes_a_workdir_the_checkpoint_code_restores(llava_dir, tmp_path):
  _, path = llava_dir
  workdir = tmp_path / "w"
  config = load.import_hf(path, workdir)
  cfg, params, _ = load.load_hf(path)
  saved = workdir_lib.read_config(workdir)  # validates, as every reader of the workdir does
  assert saved == config and saved.model == cfg and saved.data.tokenizer.kind == "hf"
  assert saved.data.seq_len == cfg.decoder.max_seq_len == 128  # rows no longer than the model's positions
  assert Tokenizer.load(saved.data.tokenizer.path).encode("<|im_start|>user\nred") == \
      Tokenizer.load(path).encode("<|im_start|>user\nred")
  assert checkpoint.resolve_init_from(str(workdir)) == (str(workdir), load.IMPORT_STAGE)
  shapes, _ = vlm.abstract_params(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  restored = checkpoint.final_params(workdir, load.IMPORT_STAGE, target)
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_sharded_export_reimports(llava_dir, tokenizer_dir, tmp_path):
  _, path = llava_dir
  cfg, params, _ = load.load_hf(path)
  export.export(params, cfg, tokenizer_dir, tmp_path, max_shard_size="100KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  again, reread, _ = load.load_hf(tmp_path)
  assert again == cfg
  jax.tree.map(np.testing.assert_array_equal, reread, params)
