"""One `Tokenizer` over a sentencepiece model (`tokenizer.model`) or an HF `tokenizer.json`.

Our own tokenizers are sentencepiece models (unigram or BPE) trained in-process by `train_sentencepiece`: identity
normalization, no dummy prefix, no whitespace folding and byte fallback, so `decode(encode(t)) == t` holds
for chat text with newlines. Ids: pad=0, unk=1, bos=2, eos=3, then `SPECIAL_TOKENS` in order (`<image>`=4).
Imported HF tokenizers keep their own ids; `add_special_tokens` appends the ones they lack.

A saved tokenizer is a directory with `tokenizer.model` or `tokenizer.json`, plus `special_tokens.json`
naming the pad/unk/bos/eos tokens. Paths may be local or gs:// (etils.epath).
"""
from __future__ import annotations

import io
import json
import os

from etils import epath

from vlm_jax.inputs import files

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"  # Idefics3 marks the start/end of an image's tiles with it
GLOBAL_IMAGE_TOKEN = "<global-img>"


def row_col_token(row: int, col: int) -> str:
  """Idefics3's tile tag, 1-based: `<row_1_col_2>`."""
  return f"<row_{row}_col_{col}>"


MAX_GRID = 6  # Idefics3 defines row/col tags up to 6 x 6
SPECIAL_TOKENS = [IMAGE_TOKEN, IM_START, IM_END, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN] + [
    row_col_token(i, j) for i in range(1, MAX_GRID + 1) for j in range(1, MAX_GRID + 1)]

# Role -> token of our sentencepiece models (ids 0..3).
SENTENCEPIECE_ROLES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
SPECIAL_TOKENS_FILE = "special_tokens.json"


MODEL_TYPES = ("unigram", "bpe")


def train_sentencepiece(texts, vocab_size: int, path: str | os.PathLike | None = None,
                        model_type: str = "unigram") -> "Tokenizer":
  """Trains a sentencepiece model on an iterable of strings; writes it to `path` if given.

  `model_type`: "unigram" or "bpe" (the kind Llama's tokenizer.model is). On small, repetitive corpora bpe
  spends the vocabulary on whole words (' large', 'user') where unigram keeps many single characters, so bpe
  gives shorter sequences. Both export to an HF tokenizer.json with the same ids
  (vlm_jax.convert.export.sentencepiece_to_tokenizers).
  The vocabulary may come out smaller than `vocab_size` on a small corpus (hard_vocab_limit=False);
  read `tokenizer.vocab_size`.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r}: train_sentencepiece supports {' or '.join(MODEL_TYPES)}.")
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
      # Chat text must survive: keep newlines, runs of spaces and the exact characters.
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, allow_whitespace_only_pieces=True,
      user_defined_symbols=SPECIAL_TOKENS, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
      num_threads=1, minloglevel=2)
  tok = Tokenizer(sentencepiece_proto=model.getvalue())
  if path is not None:
    epath.Path(path).write_bytes(model.getvalue())
  return tok


class Tokenizer:
  """Text <-> ids. Special tokens in text (`<image>`, `<|im_end|>`, ...) always encode to one id each."""

  def __init__(self, *, sentencepiece_proto: bytes | None = None, hf_json: str | None = None,
               roles: dict[str, str | None] | None = None):
    if (sentencepiece_proto is None) == (hf_json is None):
      raise ValueError("Give exactly one of sentencepiece_proto or hf_json.")
    if sentencepiece_proto is not None:
      import sentencepiece as spm
      self.kind = "sentencepiece"
      self._sp = spm.SentencePieceProcessor(model_proto=sentencepiece_proto)
      self._hf = None
      self.roles = dict(SENTENCEPIECE_ROLES)
    else:
      import tokenizers
      self.kind = "hf"
      self._sp = None
      self._hf = tokenizers.Tokenizer.from_str(hf_json)
      self.roles = {"pad": None, "unk": None, "bos": None, "eos": None}
    self.roles.update(roles or {})

  # ----- construction and storage

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads a directory (tokenizer.model or tokenizer.json [+ special_tokens.json / HF tokenizer_config.json])
    or a single `.model` / `.json` file."""
    path = epath.Path(os.path.expanduser(os.fspath(path)))
    directory = path if path.is_dir() else path.parent
    if path.is_dir():
      candidates = [directory / "tokenizer.model", directory / "tokenizer.json"]
      found = [p for p in candidates if p.exists()]
      if not found:
        raise FileNotFoundError(f"{path} holds neither tokenizer.model nor tokenizer.json.")
      path = found[0]
    roles = _read_roles(directory)
    if path.suffix == ".model":
      proto = path.read_bytes()
      # protobuf does not say where parsing stopped: the size tells a truncated file
      with files.reading(path, f"sentencepiece model of {len(proto)} bytes",
                         "copy or save the tokenizer again (a truncated file?)"):
        return cls(sentencepiece_proto=proto, roles=roles)
    hint = "copy or save the tokenizer again (a truncated file?), e.g. with transformers' save_pretrained"
    text = files.read_text(path, "tokenizer.json", hint)
    with files.reading(path, "HF tokenizer.json", hint, errors=(Exception,)):  # tokenizers raises a bare Exception
      return cls(hf_json=text, roles=roles)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes tokenizer.model or tokenizer.json, plus special_tokens.json."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if self._sp is not None:
      (directory / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
    else:
      (directory / "tokenizer.json").write_text(self._hf.to_str())
    (directory / SPECIAL_TOKENS_FILE).write_text(json.dumps(
        {"kind": self.kind, **self.roles, "special_tokens": SPECIAL_TOKENS}, indent=1) + "\n")

  def add_special_tokens(self, tokens: list[str] | None = None) -> int:
    """Appends the tokens of `tokens` (default SPECIAL_TOKENS) the vocabulary lacks, in list order, so the
    new ids are deterministic. Returns the new vocab size (the model's embedding must grow to it)."""
    tokens = SPECIAL_TOKENS if tokens is None else tokens
    missing = [t for t in tokens if self.token_to_id(t) is None]
    if missing and self._hf is None:
      raise ValueError(f"A sentencepiece model cannot grow; it lacks {missing}. Retrain with train_sentencepiece.")
    if missing:
      import tokenizers
      self._hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
    return self.vocab_size

  # ----- text <-> ids

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no bos/eos added."""
    if self._sp is not None:
      return self._sp.encode(text)
    return self._hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """Text of `ids`, special tokens included (sentencepiece drops pad/bos/eos, which are control pieces)."""
    ids = [int(i) for i in ids]
    if self._sp is not None:
      return self._sp.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    if self._sp is not None:
      i = self._sp.piece_to_id(token)
      # sentencepiece maps unknown pieces to unk; only the unk piece itself may return unk_id.
      return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
    return self._hf.token_to_id(token)

  def id_to_token(self, i: int) -> str:
    if self._sp is not None:
      return self._sp.id_to_piece(int(i))
    return self._hf.id_to_token(int(i))

  @property
  def vocab_size(self) -> int:
    if self._sp is not None:
      return self._sp.get_piece_size()
    return self._hf.get_vocab_size(with_added_tokens=True)

  # ----- ids the pipeline needs

  def _required(self, token: str | None, what: str) -> int:
    i = None if token is None else self.token_to_id(token)
    if i is None:
      raise KeyError(f"The tokenizer has no {what} token ({token!r}); set it in {SPECIAL_TOKENS_FILE} "
                     f"or call add_special_tokens().")
    return i

  @property
  def pad_id(self) -> int:
    # HF tokenizers often lack a pad token; padded positions are masked, so eos serves.
    return self._required(self.roles.get("pad") or self.roles.get("eos"), "pad")

  @property
  def eos_id(self) -> int:
    return self._required(self.roles.get("eos"), "eos")

  @property
  def bos_id(self) -> int | None:
    token = self.roles.get("bos")
    return None if token is None else self.token_to_id(token)

  @property
  def image_id(self) -> int:
    return self._required(IMAGE_TOKEN, "image")

  @property
  def im_start_id(self) -> int:
    return self._required(IM_START, "im_start")

  @property
  def im_end_id(self) -> int:
    return self._required(IM_END, "im_end")


def _read_roles(directory: epath.Path) -> dict[str, str | None]:
  """pad/unk/bos/eos tokens from our special_tokens.json, else from an HF tokenizer_config.json."""
  ours = directory / SPECIAL_TOKENS_FILE
  if ours.exists():
    data = files.read_json(ours, "tokenizer's special-tokens file", "save the tokenizer again")
    return {k: data.get(k) for k in ("pad", "unk", "bos", "eos")}
  hf = directory / "tokenizer_config.json"
  if not hf.exists():
    return {}
  data = files.read_json(hf, "HF tokenizer_config.json", "save the tokenizer again with transformers")
  roles = {}
  for role in ("pad", "unk", "bos", "eos"):
    value = data.get(f"{role}_token")
    if isinstance(value, dict):  # older configs store AddedToken dicts
      value = value.get("content")
    if value is not None:
      roles[role] = value
  return roles


def load_tokenizer(config) -> Tokenizer:
  """The tokenizer of a run: `data.tokenizer.path` if set, else the one stored under `<data_path>/tokenizer/`
  by preparing the first dataset of the stages (in stage order) that has one (shapes_vqa trains its own)."""
  tok_config = config.data.tokenizer
  if tok_config.path:
    tok = Tokenizer.load(tok_config.path)
  else:
    from vlm_jax import datasets  # pylint: disable=import-outside-toplevel  (imports TFDS)
    names = list(dict.fromkeys(name for stage in config.train.stages for name, _ in stage.datasets))
    dirs = [epath.Path(datasets.get_builder(n, config.data.data_dir).data_path) / "tokenizer" for n in names]
    found = [d for d in dirs if d.exists()]
    if not found:
      raise FileNotFoundError(f"data.tokenizer.path is empty and no prepared dataset of {names} under "
                              f"{config.data.data_dir} stored a tokenizer (looked in {[str(d) for d in dirs]}); "
                              f"prepare the data first or set data.tokenizer.path.")
    tok = Tokenizer.load(found[0])
  if tok.kind != tok_config.kind:
    raise ValueError(f"data.tokenizer.kind={tok_config.kind!r} but the tokenizer found is {tok.kind!r}.")
  return tok
