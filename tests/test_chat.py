"""ChatML rendering: exact text, exact labelled spans, generation prompt, placeholder expansion."""
import numpy as np
import pytest

from vlm_jax.inputs import chat
from vlm_jax.inputs.tokenizer import train_sentencepiece
from vlm_jax.losses import IGNORE_ID

CORPUS = (["<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
           "A red circle and two blue squares.\nHow many shapes are there? Three."] * 30)
TURNS = [{"role": "user", "content": "<image>\nWhat colour?"},
         {"role": "assistant", "content": "Red."},
         {"role": "user", "content": "How many?"},
         {"role": "assistant", "content": "Two"}]


@pytest.fixture(scope="module")
def tok():
  return train_sentencepiece(CORPUS, 400)


def labelled_spans(ids, labels, tok):
  """Decoded maximal runs of labelled tokens."""
  spans, run = [], []
  for i, l in zip(ids, labels):
    if l != IGNORE_ID:
      assert l == i
      run.append(int(i))
    elif run:
      spans.append(tok.decode(run))
      run = []
  return spans + ([tok.decode(run)] if run else [])


def test_render_exact(tok):
  ids, labels = chat.render(TURNS, ["<image>" * 3], tok)
  text = tok.decode(ids)
  assert text == ("<|im_start|>user\n<image><image><image>\nWhat colour?<|im_end|>\n"
                  "<|im_start|>assistant\nRed.<|im_end|>\n"
                  "<|im_start|>user\nHow many?<|im_end|>\n"
                  "<|im_start|>assistant\nTwo<|im_end|>\n")
  assert labelled_spans(ids, labels, tok) == ["Red.<|im_end|>", "Two<|im_end|>"]
  assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape
  # The `\n` after each <|im_end|> is not labelled; the <|im_end|> ids are.
  im_end = np.flatnonzero(ids == tok.im_end_id)
  assert labels[im_end].tolist() == [IGNORE_ID, tok.im_end_id, IGNORE_ID, tok.im_end_id]
  assert labels[-1] == IGNORE_ID and tok.decode(ids[-1:]) == "\n"
  assert (ids == tok.image_id).sum() == 3


def test_per_turn_tokens_equal_whole_string(tok):
  ids, _ = chat.render(TURNS, ["<image>" * 3], tok)
  assert ids.tolist() == tok.encode(chat.render_text(TURNS, ["<image>" * 3]))


def test_generation_prompt(tok):
  ids, labels = chat.render(TURNS[:1], ["<image>"], tok, generation_prompt=True)
  assert tok.decode(ids) == "<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n"
  assert np.all(labels == IGNORE_ID)
  assert chat.render_text(TURNS[:1], ["<image>"], generation_prompt=True) == tok.decode(ids)


def test_images_replaced_in_order_across_turns(tok):
  turns = [{"role": "user", "content": "<image>A<image>"}, {"role": "assistant", "content": "ok"},
           {"role": "user", "content": "B<image>"}]
  assert chat.render_text(turns, ["[1]", "[2]", "[3]"]) == (
      "<|im_start|>user\n[1]A[2]<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nB[3]<|im_end|>\n")
  parts = chat.tokenize_turns(turns, ["[1]", "[2]", "[3]"], tok)
  assert [p.images for p in parts] == [2, 0, 1]
  with pytest.raises(ValueError, match="3 <image> placeholders but 2 images"):
    chat.render(turns, ["x", "y"], tok)
  with pytest.raises(ValueError, match="Unknown chat role"):
    chat.render([{"role": "bot", "content": "hi"}], [], tok)
