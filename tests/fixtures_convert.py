"""Shared pieces of the HF conversion tests: a sentencepiece tokenizer, random-HF-model perturbation, a tiny random
LLaVA, the demo question as a prompt, our model's logits + greedy decoding and HF's, and the two parity checks
(logits + greedy tokens; an exported directory's processor + generate against our pipeline).

Import the fixture into a test module (`from fixtures_convert import tokenizer_dir`).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, SiglipVisionConfig)

from vlm_jax.config import Config, DataConfig
from vlm_jax.convert import export
from vlm_jax.generate import Generator
from vlm_jax.inputs import chat, images
from vlm_jax.inputs.tokenizer import Tokenizer, train_sentencepiece
from vlm_jax.model import vlm

CORPUS = ["What colour is the circle? It is red.\nHow many shapes are there? There are 3 shapes.",
          "Is there a square on the left?  No, a triangle and a blue circle.\n"] * 40
GENERATE_STEPS = 20
IMAGE_TOKEN_ID = 4  # our sentencepiece tokenizer's `<image>`
TURNS = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """Our sentencepiece tokenizer (pad 0, unk 1, bos 2, eos 3, `<image>` 4, ChatML, Idefics3 tags), saved our way."""
  path = tmp_path_factory.mktemp("sp_tokenizer")
  train_sentencepiece(CORPUS, 400).save(path)
  return path


def save_with_tokenizer(model, tokenizer_dir, hf_dir):
  """Saves a HF model and our tokenizer (as tokenizer.json) into hf_dir, as a hub checkpoint holds them.
  -> (model, hf_dir)."""
  model.save_pretrained(hf_dir)
  export.hf_tokenizer(tokenizer_dir).save_pretrained(hf_dir)
  return model, hf_dir


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
  """Adds noise to every parameter, so biases are non-zero and norm scales are not 1: a swapped or dropped
  norm / bias then shows in the logits."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * std)
  return model.eval()


def build_llava(kind: str, vocab_size: int) -> LlavaForConditionalGeneration:
  """Random LLaVA: 'siglip' (no head, 'full', layer -1) or 'clip' ('default', layer -2); 32 px, patch 8 (16 image
  tokens), ViT 32x2, decoder 64x2 with GQA 4/2."""
  torch.manual_seed(0)
  text = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=2,
                     eos_token_id=3, pad_token_id=0)
  common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)
  if kind == "siglip":
    vision, layer, strategy = SiglipVisionConfig(**common, layer_norm_eps=1e-6, vision_use_head=False), -1, "full"
  else:
    vision, layer, strategy = CLIPVisionConfig(**common, layer_norm_eps=1e-5), -2, "default"
  config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                       vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                       projector_hidden_act="gelu")
  return randomize(LlavaForConditionalGeneration(config))


def ours_greedy(cfg, params, prompt_ids, pixel_values, steps: int = GENERATE_STEPS):
  """Our model on one prompt: (prompt logits f32 [n, V], greedy ids int [steps]).

  Full recompute in a fixed [1, n + steps] buffer (slots past the current length carry segment 0, so one jit
  compile serves every step). pixel_values: NHWC tiles [1, N, H, W, 3].
  """
  n = len(prompt_ids)
  total = n + steps
  ids = np.zeros((1, total), np.int32)
  ids[0, :n] = prompt_ids
  tile_mask = np.ones(pixel_values.shape[:2], bool)

  @jax.jit
  def forward(params, ids, length):
    batch = {"input_ids": ids, "segment_ids": (jnp.arange(total) < length).astype(jnp.int32)[None],
             "positions": jnp.arange(total, dtype=jnp.int32)[None], "pixel_values": pixel_values,
             "tile_mask": tile_mask}
    return vlm.VLM(cfg).apply({"params": params}, batch)["logits"][0]

  prompt_logits = np.asarray(forward(params, ids, n))[:n]
  for t in range(steps):
    logits = forward(params, ids, n + t)
    ids[0, n + t] = int(jnp.argmax(logits[n + t - 1]))
  return prompt_logits, ids[0, n:]


def hf_logits_and_greedy(model, prompt_ids, pixel_values, steps: int = GENERATE_STEPS, **extra):
  """HF's (prompt logits f32 [n, V], greedy ids [steps]); pixel_values as HF wants them (NCHW)."""
  from transformers import GenerationConfig
  ids = torch.tensor(np.asarray(prompt_ids)[None], dtype=torch.long)
  pixels = torch.tensor(np.asarray(pixel_values))
  with torch.no_grad():
    logits = model(input_ids=ids, pixel_values=pixels, **extra).logits[0].numpy()
    out = model.generate(input_ids=ids, pixel_values=pixels, generation_config=GenerationConfig(
        max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0), **extra)
  assert out.shape[1] == len(prompt_ids) + steps
  return logits, out[0, len(prompt_ids):].numpy()


def assert_same_state_dicts(a: dict, b: dict) -> None:
  """Same keys and bit-identical tensors."""
  assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
  different = [k for k in a if not torch.equal(a[k], b[k])]
  assert not different, different


def prompt_and_pixels(cfg, tok, seed=0):
  """TURNS as ChatML prompt ids with one tile's `<image>` run (LLaVA), and pixel values NCHW [1, 3, H, W]."""
  ids, _ = chat.render(TURNS, [images.image_prompt(0, 0, cfg.image_tokens_per_tile, False)], tok,
                       generation_prompt=True)
  size = cfg.vision.image_size
  return ids, np.random.default_rng(seed).normal(size=(1, 3, size, size)).astype(np.float32)


def assert_logits_and_greedy_match_hf(model, cfg, params, prompt_ids, pixel_values, name: str) -> None:
  """HF's `model` and ours on one prompt: prompt logits within 1e-4 (float32, and not near zero) and the same
  GENERATE_STEPS greedy tokens. pixel_values as HF takes them: NCHW [1, 3, H, W] (one tile) or [1, N, 3, H, W]."""
  hf_logits, hf_tokens = hf_logits_and_greedy(model, prompt_ids, pixel_values)
  tiles = np.moveaxis(pixel_values, -3, -1)
  logits, tokens = ours_greedy(cfg, params, prompt_ids, tiles if tiles.ndim == 5 else tiles[:, None])
  np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0, err_msg=name)
  assert np.abs(hf_logits).max() > 0.1  # the comparison is not between near-zero logits
  np.testing.assert_array_equal(tokens, hf_tokens)


def assert_export_generates_like_ours(out, cfg, params, tokenizer_dir, data: DataConfig):
  """An exported directory loaded offline (AutoProcessor, AutoModelForImageTextToText) against our pipeline on a
  45x70 image and TURNS: the same chat text and ids, the same pixels (HF NCHW, ours NHWC), HF's greedy tokens
  equal ours for all GENERATE_STEPS steps (no early stop), and vlm_jax.generate returns them too.
  -> (HF processor, our processed image)."""
  processor = AutoProcessor.from_pretrained(out)
  model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  image = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
  messages = [{"role": "user",
               "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour is the circle?"}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  assert text == chat.render_text(TURNS, ["<image>"], generation_prompt=True)
  inputs = processor(images=[image], text=[text], return_tensors="pt")
  # Our pipeline on the same image and turns.
  tok = Tokenizer.load(tokenizer_dir)
  processed = images.process_image(image, Config(model=cfg, data=data))
  ids, _ = chat.render(TURNS, [processed.prompt], tok, generation_prompt=True)
  np.testing.assert_array_equal(inputs["input_ids"][0].numpy(), ids)
  hf_tiles = np.moveaxis(inputs["pixel_values"][0].numpy(), -3, -1)
  ours_tiles = images.normalize(processed.tiles, cfg.vision.image_mean, cfg.vision.image_std)  # as the ViT does
  np.testing.assert_allclose(hf_tiles.reshape(processed.tiles.shape), ours_tiles, atol=1e-5)
  _, ours = ours_greedy(cfg, params, ids, processed.tiles[None])
  with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=len(ours), do_sample=False, min_new_tokens=0)
  generated = generated[0, len(ids):].numpy()
  # HF stops at <|im_end|> / eos (generation_config.json); ours ran the full length. These seeds give no early
  # stop, so the parity covers every step (a stop token as the last one is fine).
  assert len(generated) == len(ours) == GENERATE_STEPS, generated
  np.testing.assert_array_equal(generated, ours)
  stops = {tok.im_end_id, tok.eos_id}
  # vlm_jax.generate (KV cache, stops at the same ids, drops the stop token) from the raw image and prompt.
  result = Generator(Config(model=cfg, data=data), params, tok).generate(
      [([image], TURNS[0]["content"])], max_new_tokens=len(ours))[0]
  assert result.token_ids == (generated[:-1] if generated[-1] in stops else generated).tolist()
  return processor, processed
