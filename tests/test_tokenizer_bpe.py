"""sentencepiece BPE next to unigram: whole-word pieces, fixed special ids, lossless round trips, and the exported
tokenizer.json (PreTrainedTokenizerFast) giving our ids on every string, whitespace-only pieces included."""
import random

import pytest
from sentencepiece import sentencepiece_model_pb2

from vlm_jax.convert import export
from vlm_jax.inputs.tokenizer import SPECIAL_TOKENS, Tokenizer, train_sentencepiece

# Chat-formatted, with runs of spaces so both model types learn whitespace-only pieces ('▁▁', '▁▁▁▁').
CORPUS = ["<|im_start|>user\n<image>\nIs there a large red circle?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n",
          "<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\nthree<|im_end|>\n",
          "A large blue square and a small red circle.\n    Two  shapes:  left    and right."] * 30
PROMPT = "<|im_start|>user\nIs there a large circle?<|im_end|>\n<|im_start|>assistant\n"
TRICKY = ["", " ", "\n", "    ", "     ", "a  b    c     d      e", "  large  ", "\n\n\tlarge\r\n",
          PROMPT + "yes<|im_end|>\n", "<image><image>\nHow many?\n\n", "large<image>large<|im_end|>circle",
          "<fake_token_around_image><row_1_col_2><global-img><row_6_col_6>", "café ✓ 日本 🙂 ünïcode",
          "xyzzy QWERTY 12345 !@#$%^&*()", "<unk-ish> <im_end>", "Is there a   large\u00a0circle?"]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def tokenizer_dir(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(f"sp_{request.param}")
  train_sentencepiece(CORPUS, 400, model_type=request.param).save(path)
  return path


@pytest.fixture(scope="module")
def bpe():
  return train_sentencepiece(CORPUS, 400, model_type="bpe")


def test_bpe_gives_one_piece_per_word(bpe):
  assert bpe.vocab_size == 400
  assert [bpe.id_to_token(i) for i in bpe.encode(PROMPT)] == [
      "<|im_start|>", "user", "\n", "Is", "▁there", "▁a", "▁large", "▁circle", "?", "<|im_end|>", "\n",
      "<|im_start|>", "assistant", "\n"]
  unigram = train_sentencepiece(CORPUS, 400)  # on this corpus unigram stops at 346 pieces and splits 'user'
  assert unigram.vocab_size == 346 and len(unigram.encode(PROMPT)) == 27
  assert {"▁▁", "▁▁▁▁"} <= {bpe.id_to_token(i) for i in range(bpe.vocab_size)}


def test_bpe_special_ids_and_round_trip(bpe):
  assert [bpe.id_to_token(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  for i, token in enumerate(SPECIAL_TOKENS):
    assert bpe.token_to_id(token) == 4 + i and bpe.encode(token) == [4 + i]
  assert bpe.encode("a<image>b").count(4) == 1 and bpe.encode(PROMPT).count(5) == 2
  for text in TRICKY:
    assert bpe.decode(bpe.encode(text)) == text, repr(text)


def test_unknown_model_type_is_an_error():
  with pytest.raises(ValueError, match="model_type='word'.*unigram or bpe"):
    train_sentencepiece(CORPUS, 400, model_type="word")


def test_bpe_merges_are_ranked_by_piece_score(bpe):
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(bpe._sp.serialized_model_proto())  # pylint: disable=protected-access
  vocab, merges = export.sentencepiece_bpe_merges(m)
  score = {p.piece: p.score for p in m.pieces}
  ranks = [score[a + b] for a, b in merges]
  assert ranks == sorted(ranks, reverse=True)
  assert merges[0] == ("▁", "▁") and vocab["▁▁"] == 4 + len(SPECIAL_TOKENS) + 256  # the first piece learned
  assert len(merges) == 72 and [(a, b) for a, b in merges if a + b == "▁large"] == [("▁l", "arge")]
  # Every split into two pieces is a merge, not only the one training found (sentencepiece merges any of them).
  assert [(a, b) for a, b in merges if a + b == "▁are"] == [("▁", "are"), ("▁a", "re")]


@pytest.mark.torch
def test_exported_tokenizer_gives_our_ids(tokenizer_dir):
  ours = Tokenizer.load(tokenizer_dir)
  fast = export.hf_tokenizer(tokenizer_dir)
  assert (fast.pad_token_id, fast.unk_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2, 3)
  assert [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(4, 4 + len(SPECIAL_TOKENS)))
  for text in TRICKY:
    ids = ours.encode(text)
    assert fast(text, add_special_tokens=False).input_ids == ids, repr(text)
    assert fast.decode(ids) == text, repr(text)


@pytest.mark.torch
def test_exported_bpe_matches_on_random_strings(bpe, tmp_path):
  """Random strings of corpus words, characters, whitespace runs, specials and rare characters, and text that
  spells a byte piece. (BPE only: unigram can tie between '▁▁▁▁'+'▁' and '▁'+'▁▁▁▁', and sentencepiece and HF
  break Viterbi ties differently; HF's Unigram also matches the text '<0x41>' as the byte piece.)"""
  bpe.save(tmp_path)
  fast = export.hf_tokenizer(tmp_path)
  for s in ["<0x41>", "a<0x0A>b", "<0x"]:
    assert fast(s, add_special_tokens=False).input_ids == bpe.encode(s) and len(bpe.encode(s)) == len(s), s
  rng = random.Random(0)
  alphabet = list("abcdefghilnorstuy ?.:,\n\t  ") + ["   ", "large", " circle", "user", "<image>", "<|im_end|>",
                                                       "é", "🙂", "日", "Z"]
  for _ in range(1000):
    s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    assert fast(s, add_special_tokens=False).input_ids == bpe.encode(s), repr(s)
