"""One parquet row (a dict, as pyarrow's `to_pylist` gives it) -> our TFDS example, per Hub dataset format.

Formats (column names in brackets are the defaults; `Columns` holds the user's choice):
  trl       [messages] = [{role, content: [{type: "image"} | {type: "text", text}] or a string}],
            [images] = [{bytes, path}]: each image part is one `<image>` mark, in order (TRL's vision format,
            e.g. HuggingFaceH4/llava-instruct-mix-vsft).
  cauldron  [images] + [texts] = [{user, assistant, source}] (HuggingFaceM4/the_cauldron, nanoVLM's data):
            user turns carry no marks, so `<image>\\n` per image goes before the first user turn.
  vqa       a plain table: [image] (one {bytes, path}, a list of them, raw bytes, or null), [question], and
            [answer] (a string) and/or [answers] (a list of strings or of {answer, ...}, e.g. 10 per VQAv2
            question); optional id, source and question_type columns. The assistant says `answer`, else the
            most common of `answers`; all answers are kept as the question's references, for scoring.

Parts of a TRL turn are joined with "\\n" between an image mark and text (as LLaVA writes `<image>\\n...`),
text parts with nothing. Skipped records raise `records.Skip`, counted by reason (llava_json's reasons plus
`empty_turn`, a turn with no text; `image_missing`, an image struct without bytes).
"""
from __future__ import annotations

import collections
import dataclasses

from vlm_jax.datasets.llava_json import records
from vlm_jax.datasets.llava_json.records import IMAGE_TAG, Skip

FORMATS = ("trl", "cauldron", "vqa")
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Columns:
  """Column names (vqa: the user's, via --set image=... question=... answers=...) and fixed values."""
  images: str = "images"          # trl, cauldron
  messages: str = "messages"      # trl
  texts: str = "texts"            # cauldron
  image: str = "image"            # vqa
  question: str = "question"      # vqa
  answer: str = "answer"          # vqa: the answer to train on ("" = none)
  answers: str = "answers"        # vqa: every reference answer ("" = none)
  id: str = ""                    # column holding the record id ("" = <file stem>:<row>)
  source_column: str = ""         # column naming each record's source (vqa)
  question_type: str = ""         # vqa: column of the question type (e.g. VQAv2's answer_type)
  source: str = ""                # the source name of every record (cauldron: when its texts name none)

  def wanted(self, fmt: str) -> list[str]:
    """Columns `fmt` reads (those that must exist come first; see `required`)."""
    optional = [c for c in (self.id, self.source_column, self.question_type) if c]
    if fmt == "trl":
      return [self.messages, self.images] + optional
    if fmt == "cauldron":
      return [self.texts, self.images] + optional
    return [self.image, self.question] + [c for c in (self.answer, self.answers) if c] + optional


def _text(value, what: str) -> str:
  if value is None:
    return ""
  if not isinstance(value, str):
    raise Skip("invalid_record", f"{what} is a {type(value).__name__}, not text")
  return value


def _image_structs(value) -> list:
  """An image column value -> a list of {bytes, path} structs or raw bytes."""
  if value is None:
    return []
  if isinstance(value, (bytes, dict)):
    return [value]
  if isinstance(value, list):
    return [v for v in value if v is not None]
  raise Skip("invalid_record", f"images must be Image structs, got {type(value).__name__}")


def _image_bytes(structs: list, where: str, max_pixels: int, repairs: list[str]) -> list[bytes]:
  out = []
  for i, struct in enumerate(structs):
    data = struct.get("bytes") if isinstance(struct, dict) else struct
    if not isinstance(data, bytes):
      # The Hub's files embed the bytes; a bare path points into a folder we were not given.
      raise Skip("image_missing", f"{where} image {i} has no bytes (path {struct.get('path')!r})"
                 if isinstance(struct, dict) else f"{where} image {i} is a {type(data).__name__}")
    out.append(records.decode_image(data, f"{where} image {i}", max_pixels, repairs))
  return out


def _trl_content(content) -> str:
  if isinstance(content, str):
    return content
  if not isinstance(content, list):
    raise Skip("invalid_record", f"content is a {type(content).__name__}")
  pieces: list[tuple[bool, str]] = []  # (is an image mark, text)
  for part in content:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image":
      pieces.append((True, IMAGE_TAG))
    elif kind == "text":
      pieces.append((False, _text(part.get("text"), "a text part")))
    else:
      raise Skip("invalid_record", f"content part {part!r} is neither image nor text")
  out = ""
  for i, (is_image, text) in enumerate(pieces):
    if i and (is_image or pieces[i - 1][0]) and not (out.endswith("\n") or text.startswith("\n")):
      out += "\n"
    out += text
  return out


def _check_turns(turns: list[dict]) -> list[dict]:
  for turn in turns:
    if not turn["content"].replace(IMAGE_TAG, "").strip() and IMAGE_TAG not in turn["content"]:
      raise Skip("empty_turn", f"an empty {turn['role']} turn")
  if not any(t["role"] == "assistant" for t in turns):
    raise Skip("no_assistant_turn")
  return turns


def _marks_match(turns: list[dict], num_images: int) -> None:
  marks = sum(t["content"].count(IMAGE_TAG) for t in turns)
  if marks != num_images:
    raise Skip("image_count_mismatch", f"{marks} {IMAGE_TAG} marks, {num_images} images")


def trl_turns(messages) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise Skip("invalid_record", "messages must be a non-empty list")
  turns = []
  for message in messages:
    if not isinstance(message, dict):
      raise Skip("invalid_record", f"message {message!r} is not a struct")
    role = message.get("role")
    if role not in ROLES:
      raise Skip("unknown_role", repr(role))
    turns.append({"role": role, "content": _trl_content(message.get("content"))})
  return _check_turns(turns)


def cauldron_turns(texts, num_images: int) -> tuple[list[dict], str]:
  """(turns, the first source the texts name)."""
  if not isinstance(texts, list) or not texts:
    raise Skip("invalid_record", "texts must be a non-empty list")
  turns, sources = [], []
  for pair in texts:
    if not isinstance(pair, dict):
      raise Skip("invalid_record", f"text {pair!r} is not a struct")
    turns += [{"role": "user", "content": _text(pair.get("user"), "user")},
              {"role": "assistant", "content": _text(pair.get("assistant"), "assistant")}]
    sources.append(_text(pair.get("source"), "source"))
  _check_turns(turns)
  if num_images and not any(IMAGE_TAG in t["content"] for t in turns):
    turns[0] = {"role": "user", "content": f"{IMAGE_TAG}\n" * num_images + turns[0]["content"]}
  return turns, next((s for s in sources if s), "")


def _question_type(value) -> str:
  """A question type cell: text, or a list of them (DocVQA's question_types) joined with "/"."""
  if isinstance(value, list):
    return "/".join(_text(v, "question_type") for v in value)
  return _text(value, "question_type")


def _answers(value) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  if not isinstance(value, list):
    raise Skip("invalid_record", f"answers is a {type(value).__name__}")
  return [_text(a.get("answer") if isinstance(a, dict) else a, "an answer") for a in value]


def vqa_turns(row: dict, columns: Columns, num_images: int) -> tuple[list[dict], list[str]]:
  """(turns, reference answers) of a one-question row."""
  question = _text(row.get(columns.question), "question").strip()
  references = [a for a in (_answers(row.get(columns.answers)) if columns.answers else []) if a.strip()]
  answer = _text(row.get(columns.answer), "answer").strip() if columns.answer else ""
  if not answer and references:
    answer = collections.Counter(references).most_common(1)[0][0]  # ties: the first given
  if not question or not answer:
    raise Skip("empty_turn", "no question" if not question else "no answer")
  if IMAGE_TAG in question:
    _marks_match([{"content": question}], num_images)
  else:
    question = f"{IMAGE_TAG}\n" * num_images + question
  return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], references or [answer]


def convert_row(fmt: str, row: dict, key: str, columns: Columns, max_pixels: int) -> tuple[dict, list[str]]:
  """One row -> (TFDS example of hf_parquet's features, repairs). `key` ("<file stem>:<row>") names it in
  details and is its id unless `columns.id` names an id column. Raises Skip."""
  repairs: list[str] = []
  structs = _image_structs(row.get(columns.image if fmt == "vqa" else columns.images))
  source, references = columns.source, []
  if fmt == "trl":
    turns = trl_turns(row.get(columns.messages))
    _marks_match(turns, len(structs))
  elif fmt == "cauldron":
    turns, named = cauldron_turns(row.get(columns.texts), len(structs))
    _marks_match(turns, len(structs))
    source = named or source
  else:
    turns, answers = vqa_turns(row, columns, len(structs))
    references = [{"turn": 0, "text": a} for a in answers]
  if columns.source_column:
    source = _text(row.get(columns.source_column), "source") or source
  images = _image_bytes(structs, key, max_pixels, repairs)
  record_id = str(row.get(columns.id)) if columns.id and row.get(columns.id) is not None else key
  num_answers = sum(t["role"] == "assistant" for t in turns)
  qtype = _question_type(row.get(columns.question_type)) if columns.question_type else ""
  return {"id": record_id, "images": images, "caption": "", "turns": turns,
          "question_types": [qtype] * num_answers, "negative_captions": [], "source": source,
          "references": references}, repairs
