"""LLaVA-format JSON records -> our records, repairing what can be repaired and naming why the rest is skipped.

Input: `[{"id", "image": str | [str, ...] | absent, "conversations": [{"from", "value"}, ...]}, ...]`.
Roles: human -> user, gpt -> assistant, system -> system (ChatML has a system turn); any other role skips
the record, since we cannot tell who speaks. Decisions, each counted under its reason:

skipped                                           repaired (the record is kept)
  invalid_record        not a dict / bad fields      mode_<M>         image mode M converted to RGB
  text_not_utf8         undecodable bytes in text    downscaled       over `max_pixels`: resized to fit
  unknown_role          a role we cannot map         image_tag_added  images but no `<image>` mark: one
  no_assistant_turn     nothing to learn from                         `<image>\\n` per image prepended
  image_count_mismatch  `<image>` marks != images                     to the first user turn (LLaVA's rule)
  image_missing         file not found               exif_rotated     EXIF orientation applied (stored
  image_empty           zero-byte file                                sideways; decoders ignore the tag)
  image_unreadable      truncated / not an image / a decompression bomb
"""
from __future__ import annotations

import collections
import io
import warnings

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
from etils import epath

from vlm_jax.config import InputError
from vlm_jax.inputs import files

IMAGE_TAG = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DEFAULT_MAX_PIXELS = 4096 * 4096


class Skip(Exception):
  """A record cannot be used; `reason` is the counter key."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def _text(value) -> str:
  if not isinstance(value, str):
    raise Skip("invalid_record", f"expected a string, got {type(value).__name__}")
  try:
    value.encode("utf-8")  # lone surrogates: bytes that were not UTF-8 (read with surrogateescape)
  except UnicodeEncodeError as e:
    raise Skip("text_not_utf8", str(e)) from None
  return value


def convert_turns(conversations) -> list[dict[str, str]]:
  """[{"from", "value"}] -> [{"role", "content"}]; raises Skip."""
  if not isinstance(conversations, list) or not conversations:
    raise Skip("invalid_record", "conversations must be a non-empty list")
  turns = []
  for turn in conversations:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
      raise Skip("invalid_record", f"turn {turn!r} lacks from/value")
    role = ROLES.get(_text(turn["from"]).lower())
    if role is None:
      raise Skip("unknown_role", repr(turn["from"]))
    turns.append({"role": role, "content": _text(turn["value"])})
  if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
    raise Skip("no_assistant_turn")
  return turns


def image_names(record: dict) -> list[str]:
  names = record.get("image")
  if names is None:
    return []
  names = [names] if isinstance(names, str) else names
  if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
    raise Skip("invalid_record", f"image must be a path or a list of paths, got {names!r}")
  return [_text(n) for n in names]


def place_images(turns: list[dict[str, str]], num_images: int, repairs: list[str]) -> list[dict[str, str]]:
  """Checks that the `<image>` marks match the images; prepends them when there are none."""
  marks = sum(t["content"].count(IMAGE_TAG) for t in turns)
  if marks == num_images:
    return turns
  users = [i for i, t in enumerate(turns) if t["role"] == "user"]
  if marks == 0 and users:
    first = users[0]
    repairs.append("image_tag_added")
    turns = list(turns)
    turns[first] = {"role": "user", "content": f"{IMAGE_TAG}\n" * num_images + turns[first]["content"]}
    return turns
  raise Skip("image_count_mismatch", f"{marks} {IMAGE_TAG} marks, {num_images} images")


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """Any PIL mode -> RGB: alpha composited on white, 16/32-bit and float scaled to 8 bits."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
    image = PIL.Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
  if image.mode == "P":
    image = image.convert("RGBA")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def load_image(path: epath.Path, max_pixels: int, repairs: list[str]) -> bytes:
  """Encoded bytes of an upright RGB image: the file's own bytes when it is a plain RGB JPEG/PNG with no EXIF
  rotation, else PNG."""
  try:
    data = path.read_bytes()
  except (FileNotFoundError, IsADirectoryError):
    raise Skip("image_missing", str(path)) from None
  return decode_image(data, str(path), max_pixels, repairs)


def decode_image(data: bytes, where: str, max_pixels: int, repairs: list[str]) -> bytes:
  """`load_image` on bytes already read (`where` names them in Skip details)."""
  if not data:
    raise Skip("image_empty", where)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
      image = PIL.Image.open(io.BytesIO(data))
      image.load()  # truncated files fail here, not at open
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError,
          PIL.Image.DecompressionBombWarning) as e:
    raise Skip("image_unreadable", f"{where}: {e}") from None
  original_format, changed = image.format, False
  # A photo stored sideways: decoders ignore the tag, transformers' load_image applies it (exif_transpose).
  if image.getexif().get(PIL.ExifTags.Base.Orientation, 1) != 1:
    image, changed = PIL.ImageOps.exif_transpose(image), True
    repairs.append("exif_rotated")
  if image.mode != "RGB":
    repairs.append(f"mode_{image.mode}")
    image, changed = _to_rgb(image), True
  if image.width * image.height > max_pixels:
    scale = (max_pixels / (image.width * image.height)) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    image, changed = image.resize(size, PIL.Image.BICUBIC), True
    repairs.append("downscaled")
  if not changed and original_format in ("JPEG", "PNG"):
    return data
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()


def convert_record(record, index: int, image_dir: epath.Path, max_pixels: int = DEFAULT_MAX_PIXELS
                   ) -> tuple[dict, list[str]]:
  """One LLaVA record -> (our TFDS example dict, repairs). Raises Skip with the reason."""
  if not isinstance(record, dict):
    raise Skip("invalid_record", f"record {index} is a {type(record).__name__}")
  repairs: list[str] = []
  turns = convert_turns(record.get("conversations"))
  names = image_names(record)
  turns = place_images(turns, len(names), repairs)
  images = [load_image(image_dir / n, max_pixels, repairs) for n in names]
  record_id = record.get("id", index)
  return {"id": _text(str(record_id)), "images": images, "caption": "", "turns": turns,
          "question_types": [""] * sum(t["role"] == "assistant" for t in turns), "negative_captions": []}, repairs


def read_json(path: epath.Path) -> list:
  """The JSON list at `path`; bytes that are not UTF-8 survive as lone surrogates (skipped per record).
  A file that does not parse (say, truncated) or is not a list raises InputError naming the line and column."""
  text = path.read_bytes().decode("utf-8", errors="surrogateescape")
  records = files.parse_json(text, path, "LLaVA JSON file", "repair or export the file again: it must be one "
                             "complete JSON list of records")
  if not isinstance(records, list):
    raise InputError(f"{path}: expected a JSON list of records ([{{\"id\", \"image\", \"conversations\"}}, "
                     f"...]), got a {type(records).__name__}; give the LLaVA-format file.")
  return records


class Counts:
  """Kept / skipped-by-reason / repaired-by-reason tallies of one prepare."""

  def __init__(self):
    self.kept = 0
    self.skipped: collections.Counter = collections.Counter()
    self.repaired: collections.Counter = collections.Counter()

  def take(self, convert, *args) -> dict | None:
    """convert(*args) -> (example, repairs), tallied: the example, or None when it raised Skip."""
    try:
      example, repairs = convert(*args)
    except Skip as skip:
      self.skipped[skip.reason] += 1
      return None
    self.kept += 1
    self.repaired.update(repairs)
    return example

  def as_dict(self) -> dict:
    return {"kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
            "repaired": dict(sorted(self.repaired.items()))}

  def finish(self, name: str, where: str, total: int, hint: str) -> dict:
    """The tallies (`as_dict`) after all `total` records, printed under `name`; InputError naming `where`
    and `hint` when none was kept."""
    if not self.kept:
      raise InputError(f"{where}: no usable record out of {total} (skipped: {dict(self.skipped)}); {hint}.")
    summary = self.as_dict()
    print(f"{name}: kept {self.kept} of {total} records; skipped {summary['skipped']}; "
          f"repaired {summary['repaired']}")
    return summary
