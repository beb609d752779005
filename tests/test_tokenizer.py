"""Tokenizer: sentencepiece training with exact special ids and lossless round trips; HF tokenizer.json path."""
import json

import pytest
from fixtures_tokenizer import bpe_tokenizer

from vlm_jax.inputs.tokenizer import SPECIAL_TOKENS, Tokenizer, train_sentencepiece

CORPUS = (["<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
           "A red circle and two blue squares.\nHow many shapes are there?  Three."] * 30)
CHAT = ("<|im_start|>user\n<image><image>\nWhat   colour is\tthe circle?\n\n<|im_end|>\n"
        "<|im_start|>assistant\n Red ✓ café, 42<|im_end|>\n<fake_token_around_image><row_2_col_3><global-img>")


@pytest.fixture(scope="module")
def sp():
  return train_sentencepiece(CORPUS, 400)


def hf_bpe_json() -> str:
  return bpe_tokenizer(CORPUS).to_str()


def test_sentencepiece_special_ids(sp):
  assert [sp.id_to_token(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  assert (sp.pad_id, sp.token_to_id("<unk>"), sp.bos_id, sp.eos_id) == (0, 1, 2, 3)
  assert (sp.image_id, sp.im_start_id, sp.im_end_id) == (4, 5, 6)
  assert len(SPECIAL_TOKENS) == 5 + 36
  for i, token in enumerate(SPECIAL_TOKENS):
    assert sp.token_to_id(token) == 4 + i
    assert sp.encode(token) == [4 + i]
    assert sp.id_to_token(4 + i) == token
  assert sp.token_to_id("<row_1_col_1>") == 9 and sp.token_to_id("<row_6_col_6>") == 44
  assert sp.token_to_id("<not_a_token>") is None
  assert sp.vocab_size <= 400


def test_sentencepiece_round_trip(sp):
  for text in [CHAT, "\n", "  two  spaces ", "ünïcödé ✓ 漢字", "line1\r\nline2"]:
    ids = sp.encode(text)
    assert sp.decode(ids) == text
  ids = sp.encode(CHAT)
  assert ids[:2] == [5, sp.encode("user")[0]]  # <|im_start|> then `user`, no dummy prefix piece
  assert ids.count(4) == 2 and ids.count(6) == 2


def test_sentencepiece_save_load(sp, tmp_path):
  sp.save(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["special_tokens.json", "tokenizer.model"]
  back = Tokenizer.load(tmp_path)
  assert back.kind == "sentencepiece" and back.vocab_size == sp.vocab_size
  assert back.encode(CHAT) == sp.encode(CHAT)
  assert Tokenizer.load(tmp_path / "tokenizer.model").encode(CHAT) == sp.encode(CHAT)
  with pytest.raises(ValueError, match="cannot grow"):
    back.add_special_tokens(["<brand_new>"])


def test_hf_add_special_tokens_is_deterministic(tmp_path):
  tok = Tokenizer(hf_json=hf_bpe_json(), roles={"eos": "<|endoftext|>"})
  assert tok.vocab_size == 300 and tok.token_to_id("<image>") is None
  assert tok.add_special_tokens() == 300 + len(SPECIAL_TOKENS)
  assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(300, 341))
  assert tok.add_special_tokens() == 341  # nothing left to add
  again = Tokenizer(hf_json=hf_bpe_json(), roles={"eos": "<|endoftext|>"})
  again.add_special_tokens()
  tok.save(tmp_path / "a")
  again.save(tmp_path / "b")
  assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()
  # Tokens already present keep their ids; only the missing ones are appended, in list order.
  partial = Tokenizer(hf_json=hf_bpe_json())
  partial.add_special_tokens(["<|im_end|>"])
  assert partial.add_special_tokens() == 341
  assert partial.im_end_id == 300 and partial.image_id == 301 and partial.token_to_id("<row_6_col_6>") == 340


def test_hf_encode_decode_save_load(tmp_path):
  tok = Tokenizer(hf_json=hf_bpe_json(), roles={"eos": "<|endoftext|>"})
  tok.add_special_tokens()
  ids = tok.encode(CHAT)
  assert tok.decode(ids) == CHAT
  assert tok.encode("<image>") == [300] and tok.encode("a<image>b").count(300) == 1
  assert tok.eos_id == 0 and tok.pad_id == 0  # no pad token: eos pads
  tok.save(tmp_path)
  assert json.loads((tmp_path / "special_tokens.json").read_text())["eos"] == "<|endoftext|>"
  back = Tokenizer.load(tmp_path)
  assert back.kind == "hf" and back.encode(CHAT) == ids and back.eos_id == 0


def test_hf_dir_roles_from_tokenizer_config(tmp_path):
  """An HF checkpoint's tokenizer dir (no special_tokens.json) takes its roles from tokenizer_config.json."""
  tok = Tokenizer(hf_json=hf_bpe_json())
  tok.add_special_tokens()
  tok.save(tmp_path)
  (tmp_path / "special_tokens.json").unlink()
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}))
  back = Tokenizer.load(tmp_path)
  assert (back.eos_id, back.pad_id, back.bos_id) == (302, 0, None)
