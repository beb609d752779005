"""Reading files the user names (JSON, tokenizers, images, parquet), with one-line errors.

A file that exists but cannot be parsed raises `config.InputError` naming the file, where in it the parser
stopped (line and column for JSON) and what to do; the `vlm-jax` command prints it in one line, exit 2.
A missing file stays a FileNotFoundError (also one line). Paths may be local or gs:// (etils.epath).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

from etils import epath

from vlm_jax.config import InputError

JSON_HINT = "repair or write the file again: it must hold one complete JSON document"


def json_error(path: str | os.PathLike, error: json.JSONDecodeError, what: str = "JSON file",
               hint: str = JSON_HINT) -> InputError:
  """The InputError for JSON that failed to parse: file, line, column, the parser's reason, what to do."""
  at_end = error.pos >= len(error.doc.rstrip())
  ends = " (the text ends there: is the file truncated?)" if at_end else ""
  return InputError(f"{path}: this {what} is not valid JSON at line {error.lineno}, column {error.colno}: "
                    f"{error.msg}{ends}; {hint}.")


def parse_json(text: str, path: str | os.PathLike, what: str = "JSON file", hint: str = JSON_HINT) -> Any:
  """json.loads(text), whose bad syntax raises InputError naming `path` and the line and column."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise json_error(path, e, what, hint) from None


def read_text(path: str | os.PathLike, what: str = "file", hint: str = "save it as UTF-8 text") -> str:
  """The file's text (UTF-8); undecodable bytes raise InputError naming the byte offset."""
  data = epath.Path(path).expanduser().read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: this {what} is not UTF-8 text at byte {e.start} of {len(data)} "
                     f"({e.reason}); {hint}.") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", hint: str = JSON_HINT) -> Any:
  """The parsed JSON at `path` (local or gs://). Bad syntax or bytes -> InputError with file and position;
  a missing file -> FileNotFoundError."""
  return parse_json(read_text(path, what, hint), path, what, hint)


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, hint: str,
            errors: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)) -> Iterator[None]:
  """Turns a parser's error (one of `errors`) raised inside the block into an InputError that names `path`,
  `what` it should be, the parser's own message (which says where, when the parser knows) and `hint`.

  with files.reading(path, "parquet file", "re-download it"):
    table = pyarrow.parquet.read_table(path)
  """
  try:
    yield
  except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
    raise
  except errors as e:
    reason = " ".join(str(e).split())[:300] or type(e).__name__  # one line, however long the parser's text
    raise InputError(f"{path}: cannot read this {what} ({type(e).__name__}: {reason}); {hint}.") from None
