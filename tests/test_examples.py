"""Preprocessor: each task's example, truncation on turn boundaries, drops counted by reason."""
import dataclasses

import numpy as np
import pytest

from vlm_jax.config import Config, ContrastiveConfig, DataConfig, ModelConfig, VisionConfig
from vlm_jax.inputs import chat
from vlm_jax.inputs.examples import Preprocessor
from vlm_jax.inputs.tokenizer import train_sentencepiece
from vlm_jax.losses import IGNORE_ID

CORPUS = (["<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
           "A red circle and two blue squares.\nHow many shapes are there? Three."] * 30)


@pytest.fixture(scope="module")
def tok():
  return train_sentencepiece(CORPUS, 400)


def make_config(seq_len=200, max_tiles=2, splitting=False):
  # 16 px tiles, patch 8, SigLIP + MLP: 4 <image> tokens per tile.
  return Config(model=ModelConfig(vision=VisionConfig(image_size=16, patch_size=8),
                                  contrastive=ContrastiveConfig(max_text_len=6)),
                data=DataConfig(seq_len=seq_len, max_tiles=max_tiles, image_splitting=splitting, max_image_size=32))


def record(n_images=1, turns=None, caption="A red circle."):
  turns = turns or [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Red."},
                    {"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Two"}]
  return {"id": "r0", "images": [np.full((10, 14, 3), 255, np.uint8)] * n_images, "caption": caption,
          "turns": turns, "question_types": ["color", "count"]}


def decoded_labels(tok, ex):
  keep = ex["labels"] != IGNORE_ID
  return tok.decode(ex["input_ids"][keep])


def test_conversation(tok):
  pre = Preprocessor(make_config(), tok)
  ex = pre.to_example(record(), "conversation")
  assert tok.decode(ex["input_ids"]) == (
      "<|im_start|>user\n" + "<image>" * 4 + "\nWhat colour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
      "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\nTwo<|im_end|>\n")
  assert decoded_labels(tok, ex) == "Red.<|im_end|>Two<|im_end|>"
  assert ex["tiles"].shape == (1, 16, 16, 3) and ex["tiles"].dtype == np.uint8
  np.testing.assert_array_equal(ex["tiles"], 255)  # white, uint8 (the ViT normalizes on the device)
  assert ex["input_ids"].dtype == np.int32 and ex["labels"].shape == ex["input_ids"].shape
  assert pre.counts == {"kept": 1}


def test_truncation_on_turn_boundary(tok):
  full = Preprocessor(make_config(), tok).to_example(record(), "conversation")
  first_two = chat.render(record()["turns"][:2], ["<image>" * 4], tok)[0]
  assert len(first_two) < len(full["input_ids"])
  pre = Preprocessor(make_config(seq_len=len(full["input_ids"]) - 1), tok)
  ex = pre.to_example(record(), "conversation")
  np.testing.assert_array_equal(ex["input_ids"], first_two)
  assert decoded_labels(tok, ex) == "Red.<|im_end|>"
  assert pre.counts == {"kept": 1, "truncated": 1}
  pre = Preprocessor(make_config(seq_len=len(first_two) - 1), tok)
  assert pre.to_example(record(), "conversation") is None
  assert pre.counts == {"dropped_too_long": 1}


def test_images_of_cut_turns_are_dropped_with_them(tok):
  turns = [{"role": "user", "content": "<image> A?"}, {"role": "assistant", "content": "a"},
           {"role": "user", "content": "<image> B?"}, {"role": "assistant", "content": "b"}]
  pre = Preprocessor(make_config(max_tiles=1), tok)
  ex = pre.to_example(record(2, turns), "conversation")
  assert len(ex["tiles"]) == 1 and (ex["input_ids"] == tok.image_id).sum() == 4
  assert decoded_labels(tok, ex) == "a<|im_end|>"
  assert pre.counts == {"kept": 1, "truncated": 1}
  pre = Preprocessor(make_config(max_tiles=1, splitting=True), tok)  # 2x2 grid + global = 5 tiles > 1
  assert pre.to_example(record(2, turns), "conversation") is None
  assert pre.counts == {"dropped_too_many_tiles": 1}


def test_placeholders_added_or_mismatch(tok):
  pre = Preprocessor(make_config(), tok)
  turns = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}]
  ex = pre.to_example(record(1, turns), "conversation")
  assert tok.decode(ex["input_ids"]).startswith("<|im_start|>user\n<image><image><image><image>\nWhat colour?")
  turns = [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}]
  assert pre.to_example(record(1, turns), "conversation") is None
  only_user = [{"role": "user", "content": "<image>hi"}]
  assert pre.to_example(record(1, only_user), "conversation") is None
  assert pre.counts == {"kept": 1, "dropped_image_count_mismatch": 1, "dropped_no_assistant_turn": 1}


def test_caption_text_image_text(tok):
  pre = Preprocessor(make_config(), tok)
  ex = pre.to_example(record(), "caption")
  assert tok.decode(ex["input_ids"]) == ("<|im_start|>user\n" + "<image>" * 4 + "<|im_end|>\n"
                                         "<|im_start|>assistant\nA red circle.<|im_end|>\n")
  assert decoded_labels(tok, ex) == "A red circle.<|im_end|>"
  ex = pre.to_example(record(), "text")
  assert tok.decode(ex["input_ids"]) == "A red circle.\nWhat colour?\nRed.\nHow many?\nTwo"
  assert ex["input_ids"][0] == tok.bos_id and ex["input_ids"][-1] == tok.eos_id
  # every token but the leading bos is a target
  assert ex["labels"][0] == -100 and np.array_equal(ex["labels"][1:], ex["input_ids"][1:])
  assert ex["tiles"].shape == (0, 16, 16, 3)
  ex = pre.to_example(record(caption="A red circle and two blue squares."), "image_text")
  assert ex["pixel_values"].shape == (1, 16, 16, 3)
  assert len(ex["text_ids"]) == 6 and ex["text_ids"][-1] == tok.eos_id  # cut to max_text_len - 1, then eos
  assert ex["text_ids"][:5].tolist() == tok.encode("A red circle and two blue squares.")[:5]
  assert pre.to_example(record(caption=""), "caption") is None
  assert pre.to_example(record(0), "image_text") is None
  assert pre.to_example(record(2), "image_text") is None  # a caption of two images is no pair for one
  assert pre.counts == {"kept": 3, "dropped_no_caption": 1, "dropped_no_image": 1, "dropped_multi_image": 1}
  with pytest.raises(ValueError, match="Unknown task"):
    pre.to_example(record(), "vqa")


def test_caption_of_two_images_shows_both(tok):
  ex = Preprocessor(make_config(), tok).to_example(record(2, caption="Two circles."), "caption")
  assert tok.decode(ex["input_ids"]) == ("<|im_start|>user\n" + "<image>" * 4 + "\n" + "<image>" * 4 + "<|im_end|>\n"
                                         "<|im_start|>assistant\nTwo circles.<|im_end|>\n")
  assert ex["tiles"].shape == (2, 16, 16, 3)


def test_image_text_hard_negatives(tok):
  cfg = make_config()
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, contrastive=ContrastiveConfig(
      max_text_len=32, hard_negatives=2)))
  negatives = ["A blue circle.", "A red square.", "Two red circles."]
  ex = Preprocessor(cfg, tok).to_example({**record(caption="A red circle."), "negative_captions": negatives},
                                         "image_text")
  assert [tok.decode(n[:-1]) for n in ex["negative_text_ids"]] == negatives[:2]
  assert all(n[-1] == tok.eos_id for n in ex["negative_text_ids"])
  assert Preprocessor(cfg, tok).to_example(record(), "image_text")["negative_text_ids"] == []


def test_text_truncated_to_seq_len(tok):
  pre = Preprocessor(make_config(seq_len=5), tok)
  ex = pre.to_example(record(), "text")
  assert ex["input_ids"].tolist() == [tok.bos_id] + tok.encode("A red circle.\nWhat colour?\nRed.\nHow many?\nTwo")[:4]
  assert pre.counts == {"kept": 1, "truncated": 1}


def test_config_must_agree_with_tokenizer(tok):
  cfg = make_config()
  with pytest.raises(ValueError, match="set model.image_token_id=4"):
    Preprocessor(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_token_id=7)), tok)
  wide = dataclasses.replace(cfg.data, image_splitting=True, max_image_size=7 * 16)
  with pytest.raises(ValueError, match="keep it <= 96"):
    Preprocessor(dataclasses.replace(cfg, data=wide), tok)
  small = dataclasses.replace(cfg.model.decoder, vocab_size=100)
  with pytest.raises(ValueError, match="more than model.decoder.vocab_size=100"):
    Preprocessor(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decoder=small)), tok)


def test_to_prompt(tok):
  pre = Preprocessor(make_config(), tok)
  p = pre.to_prompt(record(), assistant_turn=1)
  assert tok.decode(p["input_ids"]) == (
      "<|im_start|>user\n" + "<image>" * 4 + "\nWhat colour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
      "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n")
  assert p["answer"] == "Two" and p["tiles"].shape == (1, 16, 16, 3)
