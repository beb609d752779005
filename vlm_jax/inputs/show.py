"""A readable view of a batch (`describe_batch`), and `show_config_batch` behind `vlm-jax data show`.

Per row: a summary line (segments with their lengths and position ranges, labelled tokens, valid tiles),
the tile grid of each image (Idefics3 layout) or the `<image>` runs (LLaVA layout), then the decoded text of
each segment on one line: newlines shown as `\\n`, runs of `<image>` as `<image>*N`, labelled text in [[...]].
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from vlm_jax.config import Config
from vlm_jax.inputs.tokenizer import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, Tokenizer, load_tokenizer
from vlm_jax.losses import IGNORE_ID

_IMAGE_RUN = re.compile(f"(?:{re.escape(IMAGE_TOKEN)})+")
_ROW_COL = re.compile(r"<row_(\d+)_col_(\d+)>")


def collapse_images(text: str) -> str:
  """`<image><image><image>` -> `<image>*3`."""
  return _IMAGE_RUN.sub(lambda m: f"{IMAGE_TOKEN}*{len(m.group(0)) // len(IMAGE_TOKEN)}", text)


def decode_visible(ids, tokenizer: Tokenizer) -> str:
  """Like tokenizer.decode, but bos/eos/pad stay visible (sentencepiece drops its control tokens)."""
  control = {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None}
  out, run = [], []
  for i in [int(i) for i in ids]:
    if i in control:
      out += [tokenizer.decode(run), tokenizer.id_to_token(i)]
      run = []
    else:
      run.append(i)
  return "".join(out + [tokenizer.decode(run)])


def describe_batch(batch: dict, tokenizer: Tokenizer, rows: int = 2) -> str:
  """Text view of the first `rows` rows of a batch (LM batch or image_text batch)."""
  keys = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in batch.items())
  lines = [f"batch: {keys}"]
  for b in range(min(rows, len(next(iter(batch.values()))))):
    if "text_ids" in batch:
      lines += _describe_image_text(batch, b, tokenizer)
    else:
      lines += _describe_row(batch, b, tokenizer)
  return "\n".join(lines)


def show_config_batch(config: Config, split: str = "train", stage: str | None = None, rows: int = 2) -> str:
  """`vlm-jax data show`: the first batch of `rows` rows the loader makes for a stage (default: the last)
  on `split`, described. Runs in this process (no grain workers)."""
  from vlm_jax.inputs import loader  # pylint: disable=import-outside-toplevel  (grain, TFDS)
  chosen = config.train.stage(stage) if stage else config.train.stages[-1]
  chosen = dataclasses.replace(chosen, split=split, batch_size=rows, grad_accum=1)
  config = dataclasses.replace(config, data=dataclasses.replace(config.data, num_workers=0))
  tokenizer = load_tokenizer(config)
  # batch_shards=1: a tile budget (if any) spans the shown rows, whatever the mesh a train run would use
  batch = next(loader.make_loader(config, chosen, tokenizer, process_index=0, process_count=1, batch_shards=1))
  header = f"stage {chosen.name} (task {chosen.task}) on {split} of {', '.join(n for n, _ in chosen.datasets)}"
  return header + "\n" + describe_batch(batch, tokenizer, rows)


def _describe_row(batch: dict, b: int, tokenizer: Tokenizer) -> list[str]:
  ids, labels = batch["input_ids"][b], batch["labels"][b]
  segment_ids, positions = batch["segment_ids"][b], batch["positions"][b]
  parts = []
  for seg in [int(s) for s in np.unique(segment_ids) if s]:
    pos = positions[segment_ids == seg]
    ok = "" if np.array_equal(pos, np.arange(len(pos))) else " NOT 0..n-1"
    parts.append(f"{seg}:{len(pos)} tokens pos {pos[0]}..{pos[-1]}{ok}")
  pad = int((segment_ids == 0).sum())
  side = " left" if pad and segment_ids[0] == 0 and segment_ids.any() else " right" if pad else ""
  tiles = batch["tile_mask"][b]
  lines = [f"row {b}: segments {' | '.join(parts)} | pad {pad}{side} | labelled {int((labels != IGNORE_ID).sum())}"
           f" | tiles {int(tiles.sum())}/{len(tiles)}"]
  for seg in [int(s) for s in np.unique(segment_ids) if s]:
    where = segment_ids == seg
    text = _labelled_text(ids[where], labels[where], tokenizer)
    lines.append(f"  images {seg}: {_image_layout(text)}")
    lines.append(f"  text {seg}: {collapse_images(text).replace(chr(10), chr(92) + 'n')}")
  return lines


def _labelled_text(ids: np.ndarray, labels: np.ndarray, tokenizer: Tokenizer) -> str:
  """Decoded ids with the labelled spans wrapped in [[...]]."""
  out, start = [], 0
  flags = labels != IGNORE_ID
  for i in range(1, len(ids) + 1):
    if i == len(ids) or flags[i] != flags[start]:
      text = decode_visible(ids[start:i], tokenizer)
      out.append(f"[[{text}]]" if flags[start] else text)
      start = i
  return "".join(out)


def _image_layout(text: str) -> str:
  """'2x2 grid + global' per Idefics3 image, or the `<image>` run lengths of the LLaVA layout."""
  if GLOBAL_IMAGE_TOKEN in text:
    grids = []
    for chunk in text.split(GLOBAL_IMAGE_TOKEN)[:-1]:  # one image's row/col tags precede its global tile
      cells = [(int(r), int(c)) for r, c in _ROW_COL.findall(chunk)]
      grids.append(f"{max(r for r, _ in cells)}x{max(c for _, c in cells)} grid + global" if cells else "global")
    return ", ".join(grids)
  runs = [len(m.group(0)) // len(IMAGE_TOKEN) for m in _IMAGE_RUN.finditer(text)]
  return ", ".join(f"{IMAGE_TOKEN}*{n}" for n in runs) if runs else "none"


def _describe_image_text(batch: dict, b: int, tokenizer: Tokenizer) -> list[str]:
  mask = batch["text_mask"][b]
  ids = batch["text_ids"][b][mask]
  pixels = batch["pixel_values"][b]
  return [f"row {b}: image {list(pixels.shape)} mean {pixels.mean():.3f} | text {int(mask.sum())}/{len(mask)} "
          f"tokens: {decode_visible(ids, tokenizer).replace(chr(10), chr(92) + 'n')}"]
