"""Images -> uint8 NHWC tiles, and the prompt string each image stands for.

Tiles stay uint8 on the host and travel to the device as such (4x fewer bytes than float32); the ViT
normalizes them there (`vlm_jax.model.vision.normalize_pixels`, equal to `normalize` to an ulp).
`normalize` here is the host-side reference, for comparing with HF processors' float pixel_values.

Two layouts:
- One tile (`data.image_splitting=False`): each image resized to image_size x image_size (the SigLIP
  processor's resize; Idefics3's unsplit square resize), or with `data.image_resize=shortest_edge_crop` its
  shortest edge resized to image_size and the centre square cut (CLIPImageProcessor, LLaVA-1.5's); prompt
  `<image>` * image_tokens_per_tile for MLP-projector (LLaVA) models, Idefics3's
  `<fake_token_around_image><global-img><image>*N<fake_...>` for pixel-shuffle models.
- Idefics3 / SmolVLM tiling (`data.image_splitting=True`), matching transformers' Idefics3ImageProcessor and
  Idefics3Processor: resize so the longest edge is `max_image_size` (up or down, aspect kept, the short
  edge rounded up to even), then grow each side to a multiple of image_size, cut a rows x cols grid of
  image_size tiles (row-major) and append the whole image resized to image_size as a global tile.

Resizes run in PIL on uint8, like the PIL image processors of transformers, so pixels match them.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from vlm_jax.config import Config
from vlm_jax.inputs.tokenizer import FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, row_col_token

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
RESCALE_FACTOR = 1 / 255
HF_MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the resized longest edge


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
  """tiles: uint8 [n, H, W, 3] in prompt order; rows = cols = 0 when the image was not split."""
  tiles: np.ndarray
  rows: int
  cols: int
  prompt: str


def grey_image(size: int) -> np.ndarray:
  """A uint8 [size, size, 3] mid-grey image (128): the blind baseline's stand-in for every image."""
  return np.full((size, size, 3), 128, np.uint8)


def resize(image: np.ndarray, height: int, width: int, resample: str) -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [height, width, 3] with PIL."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), resample=RESAMPLE[resample]))


def shortest_edge_crop(image: np.ndarray, size: int, resample: str) -> np.ndarray:
  """uint8 [h, w, 3] -> [size, size, 3]: the shortest edge resized to `size`, the other to int(size * long /
  short), then the centre square (top-left rounded down), as CLIPImageProcessor does."""
  h, w = image.shape[:2]
  long = int(size * max(h, w) / min(h, w))
  h, w = (long, size) if w <= h else (size, long)
  image = resize(image, h, w, resample)
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std, rounded like transformers (rescale in float64, which for
  uint8 equals float32 x / 255; the device's normalize_pixels agrees to an ulp)."""
  x = (image.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def image_prompt(rows: int, cols: int, tokens_per_tile: int, idefics3: bool) -> str:
  """The text an image's `<image>` placeholder expands to: LLaVA's `<image>` * tokens_per_tile, or
  Idefics3Processor's string (pixel-shuffle models), whose rows = cols = 0 form is the unsplit image."""
  tile = IMAGE_TOKEN * tokens_per_tile
  if not idefics3:
    return tile
  global_part = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{tile}{FAKE_IMAGE_TOKEN}"
  if rows == 0 and cols == 0:
    return global_part
  grid = "".join("".join(f"{FAKE_IMAGE_TOKEN}{row_col_token(r, c)}{tile}" for c in range(1, cols + 1)) + "\n"
                 for r in range(1, rows + 1))
  return f"{grid}\n{global_part}"


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
  """(h, w) with the longest edge set to `longest`, aspect kept, the other edge rounded up to even, then
  capped at HF_MAX_IMAGE_SIZE (Idefics3's two-step size rule, integer truncation included)."""
  aspect = width / height
  if width >= height:
    width, height = longest, int(longest / aspect)
    height += height % 2
  else:
    height, width = longest, int(longest * aspect)
    width += width % 2
  height, width = max(height, 1), max(width, 1)
  aspect = width / height
  if width >= height and width > HF_MAX_IMAGE_SIZE:
    width, height = HF_MAX_IMAGE_SIZE, int(HF_MAX_IMAGE_SIZE / aspect)
  elif height > width and height > HF_MAX_IMAGE_SIZE:
    height, width = HF_MAX_IMAGE_SIZE, int(HF_MAX_IMAGE_SIZE * aspect)
  return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
  """(h, w) grown to multiples of `tile`: the longest edge first, the other from the aspect ratio."""
  aspect = width / height
  if width >= height:
    width = math.ceil(width / tile) * tile
    height = math.ceil(int(width / aspect) / tile) * tile
  else:
    height = math.ceil(height / tile) * tile
    width = math.ceil(int(height * aspect) / tile) * tile
  return height, width


def split_tiles(image: np.ndarray, tile: int, resample: str) -> tuple[list[np.ndarray], int, int]:
  """uint8 [h, w, 3] with h, w multiples of `tile` -> (grid tiles row-major + global tile, rows, cols);
  an image no bigger than one tile is returned alone with rows = cols = 0."""
  h, w = image.shape[:2]
  if h <= tile and w <= tile:
    return [image], 0, 0
  rows, cols = h // tile, w // tile
  tiles = [image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
  tiles.append(resize(image, tile, tile, resample))  # the global view, from the resized image like HF
  return tiles, rows, cols


def process_image(image: np.ndarray, config: Config) -> ProcessedImage:
  """uint8 [h, w, 3] (or [h, w] grey) -> ProcessedImage with tiles uint8 [n, S, S, 3], S = image_size."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.dtype != np.uint8 or image.shape[-1] != 3:
    raise ValueError(f"Expected a uint8 [h, w, 3] RGB image, got {image.dtype} {image.shape}.")
  data = config.data
  size, resample = config.model.vision.image_size, data.resample
  tokens = config.model.image_tokens_per_tile
  if not data.image_splitting:
    square = shortest_edge_crop(image, size, resample) if data.image_resize == "shortest_edge_crop" else \
        resize(image, size, size, resample)
    tiles, rows, cols = [square], 0, 0
  else:
    longest = data.max_image_size or 4 * size
    image = resize(image, *longest_edge_size(*image.shape[:2], longest), resample)
    image = resize(image, *tile_multiple_size(*image.shape[:2], size), resample)
    tiles, rows, cols = split_tiles(image, size, resample)
  idefics3 = config.model.projector.kind == "pixel_shuffle"
  return ProcessedImage(np.stack(tiles), rows, cols, image_prompt(rows, cols, tokens, idefics3))


def tile_grid(height: int, width: int, config: Config) -> tuple[int, int]:
  """(rows, cols) of the tile grid `process_image` cuts from an h x w image, without touching pixels;
  (0, 0) when it makes a single tile."""
  if not config.data.image_splitting:
    return 0, 0
  size = config.model.vision.image_size
  h, w = tile_multiple_size(*longest_edge_size(height, width, config.data.max_image_size or 4 * size), size)
  return (0, 0) if h <= size and w <= size else (h // size, w // size)


def tile_count(rows: int, cols: int) -> int:
  """Tiles of a rows x cols grid: the grid plus the global tile, or the one tile of an unsplit image."""
  return rows * cols + 1 if rows else 1
