"""OpenAI chat-completion bodies -> what the engine takes: turns with `<image>` marks, decoded images, settings.

Every problem raises APIError(status, message, param, code), which api.py sends in OpenAI's error shape. Images
come as `data:image/{png,jpeg,webp};base64,...` URLs, or as local paths (`file://` or plain) when the server
was started with --allow-local-files; http(s) URLs are refused (the server fetches nothing).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
from typing import Any

import numpy as np

from vlm_jax.inputs.tokenizer import IMAGE_TOKEN

MAX_PIXELS = 4096 * 4096  # per image: larger ones are refused before they are decoded
FORMATS = {"PNG", "JPEG", "WEBP"}
ROLES = ("system", "user", "assistant")
_DATA_URL = re.compile(r"data:([^;,]*)(;base64)?,", re.ASCII)


class APIError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A validated body. turns: [{"role", "content" str with one `<image>` per image}]; images uint8 [h, w, 3]."""
  turns: list[dict]
  images: list[np.ndarray]
  max_tokens: int | None
  temperature: float
  top_p: float
  top_k: int
  seed: int
  stop: tuple[str, ...]
  min_tokens: int
  stream: bool
  include_usage: bool


def _number(body: dict, name: str, default, kind=float, low=None, high=None, low_open=False):
  value = body.get(name)
  if value is None:
    return default
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value))
  if not ok:
    raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}.", name,
                   "invalid_type")
  value = kind(value)
  if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
    bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    raise APIError(400, f"'{name}' must be {bounds}, got {value}.", name, "invalid_value")
  return value


def decode_image(url: str, param: str, allow_local_files: bool) -> np.ndarray:
  """An image_url's url -> uint8 [h, w, 3] RGB, upright (EXIF orientation applied, as `generate` reads files)."""
  from PIL import Image, ImageOps, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  if not isinstance(url, str):
    raise APIError(400, f"'{param}' must be a string (a data: URL), got {type(url).__name__}.", param,
                   "invalid_type")
  if url.startswith(("http://", "https://")):
    raise APIError(400, "Image URLs over http(s) are refused: the server fetches nothing. Send the image "
                   "inline as data:image/png;base64,... (PNG, JPEG or WebP).", param, "invalid_image_url")
  match = _DATA_URL.match(url)
  if match:
    if not match.group(2):
      raise APIError(400, "The image data URL must be base64 (data:image/png;base64,...).", param, "invalid_image")
    try:
      data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError) as e:
      raise APIError(400, f"The image data URL holds invalid base64 ({e}).", param, "invalid_image") from e
    source: Any = io.BytesIO(data)
  elif allow_local_files:
    source = url[len("file://"):] if url.startswith("file://") else url
  else:
    raise APIError(400, "An image url must be a data: URL (data:image/png;base64,...); local paths are read only "
                   "when the server runs with --allow-local-files.", param, "invalid_image_url")
  try:
    image = Image.open(source)
  except FileNotFoundError as e:
    raise APIError(400, f"No image file at {source}.", param, "invalid_image") from e
  except Image.DecompressionBombError as e:  # PIL's own limit (far above MAX_PIXELS) refuses before we can
    raise APIError(400, f"The image is too large ({e}).", param, "image_too_large") from e
  except (UnidentifiedImageError, OSError) as e:
    raise APIError(400, "The image bytes are not an image (PNG, JPEG or WebP).", param, "invalid_image") from e
  if image.format not in FORMATS:
    raise APIError(400, f"Images must be PNG, JPEG or WebP; got {image.format}.", param, "invalid_image")
  w, h = image.size
  if w * h > MAX_PIXELS:
    raise APIError(400, f"The image is {w}x{h} ({w * h / 1e6:.1f} megapixels); at most {MAX_PIXELS / 1e6:.1f} "
                   "megapixels are accepted: resize it first.", param, "image_too_large")
  try:
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
  except (OSError, ValueError) as e:
    raise APIError(400, f"The image could not be decoded ({e}).", param, "invalid_image") from e


def _content(content, where: str, role: str, images: list, allow_local_files: bool) -> str:
  """A message's content (a string, or text / image_url parts joined by newlines) -> text with `<image>` marks."""
  if isinstance(content, str):
    pieces = [content]
  elif isinstance(content, list) and content:
    pieces = []
    for j, part in enumerate(content):
      p = f"{where}.content[{j}]"
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text":
        if not isinstance(part.get("text"), str):
          raise APIError(400, f"'{p}.text' must be a string.", f"{p}.text", "invalid_type")
        pieces.append(part["text"])
      elif kind == "image_url":
        if role != "user":
          raise APIError(400, f"Only user messages may hold images ('{p}' is in a {role} message).", p)
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        images.append(decode_image(url, f"{p}.image_url.url", allow_local_files))
        pieces.append(IMAGE_TOKEN)
      else:
        raise APIError(400, f"'{p}' must be an object with type 'text' or 'image_url'.", p, "invalid_type")
  else:
    raise APIError(400, f"'{where}.content' must be a string or a non-empty list of content parts.",
                   f"{where}.content", "invalid_type")
  for piece in pieces:
    if piece != IMAGE_TOKEN and IMAGE_TOKEN in piece:
      raise APIError(400, f"The text of '{where}' holds {IMAGE_TOKEN}: send images as image_url parts.",
                     f"{where}.content")
  return "\n".join(pieces)


def parse(body: Any, *, model_id: str, max_images: int, allow_local_files: bool) -> ChatRequest:
  """A decoded JSON body -> ChatRequest, or APIError saying what is wrong and where."""
  if not isinstance(body, dict):
    raise APIError(400, "The request body must be a JSON object.", None, "invalid_type")
  model = body.get("model")
  if not isinstance(model, str):
    raise APIError(400, "'model' must be a string: the id GET /v1/models lists.", "model", "invalid_type")
  if model != model_id:
    raise APIError(404, f"The model '{model}' does not exist: this server serves '{model_id}'.", "model",
                   "model_not_found")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise APIError(400, "'messages' must be a non-empty list of {role, content} objects.", "messages",
                   "invalid_type" if messages is not None and not isinstance(messages, list) else "missing")
  turns, images = [], []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise APIError(400, f"'{where}' must be an object with role one of {', '.join(ROLES)}.", f"{where}.role",
                     "invalid_value")
    turns.append({"role": m["role"], "content": _content(m.get("content"), where, m["role"], images,
                                                          allow_local_files)})
    if len(images) > max_images:
      raise APIError(400, f"The conversation holds more than {max_images} images, the most this server takes "
                     "(--max-images).", where, "too_many_images")
  n = _number(body, "n", 1, int)
  if n != 1:
    raise APIError(400, f"Only n=1 is supported, got n={n}.", "n", "invalid_value")
  max_tokens = _number(body, "max_completion_tokens", None, int, 1)
  max_tokens = _number(body, "max_tokens", max_tokens, int, 1)
  stop = body.get("stop")
  stop = [stop] if isinstance(stop, str) else stop
  if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
    raise APIError(400, "'stop' must be a string or a list of non-empty strings.", "stop", "invalid_type")
  stream = body.get("stream", False)
  options = body.get("stream_options") or {}
  if not isinstance(stream, bool) or not isinstance(options, dict):
    raise APIError(400, "'stream' must be a boolean and 'stream_options' an object.", "stream", "invalid_type")
  top_k = _number(body, "top_k", 0, int, -1)
  return ChatRequest(turns, images, max_tokens, temperature=_number(body, "temperature", 0.0, float, 0, 2),
                     top_p=_number(body, "top_p", 1.0, float, 0, 1, low_open=True), top_k=max(top_k, 0),
                     seed=_number(body, "seed", 0, int, 0, 2**32 - 1), stop=tuple(stop or ()),
                     min_tokens=_number(body, "min_tokens", 0, int, 0), stream=stream,
                     include_usage=bool(options.get("include_usage", False)))
