"""Examples -> fixed-shape rows of the batch contract (DESIGN.md "The batch"), and rows -> a batch.

A row holds input_ids, labels, segment_ids, positions [S] and pixel_values [N, H, W, 3], tile_mask [N]
(S = data.seq_len, N = data.max_tiles). One example per row (`pad_example`, right or left padded; left for
generation) or several (`Packer`, greedy, right padded): segment k of a row is its k-th example (1-based),
positions restart at 0 in each segment, and the tiles of all segments sit in order in the first slots.
Padding: pad_id tokens, IGNORE_ID labels, segment 0, position 0, zero pixels, tile_mask False.
"""
from __future__ import annotations

import numpy as np

from vlm_jax.losses import IGNORE_ID


def _check_fits(example: dict, seq_len: int, max_tiles: int) -> None:
  n, t = len(example["input_ids"]), len(example["tiles"])
  if n > seq_len or t > max_tiles:
    raise ValueError(f"An example of {n} tokens and {t} tiles does not fit a row of {seq_len} tokens and "
                     f"{max_tiles} tiles; the Preprocessor should have cut or dropped it.")


def _tiles(examples: list[dict]) -> np.ndarray:
  """The examples' tiles in order, in their dtype (uint8 from the Preprocessor; floats that are already
  normalized, e.g. an HF processor's). Empty tile arrays join any dtype; mixing uint8 and float would turn pixel
  values 0..255 into 'normalized' floats, so it is an error."""
  tiles = [np.asarray(e["tiles"]) for e in examples]
  filled = [t for t in tiles if len(t)]
  if len({t.dtype for t in filled}) > 1:
    raise ValueError(f"Examples mix tile dtypes {sorted({str(t.dtype) for t in filled})}: give every example uint8 "
                     "tiles (or every one normalized floats).")
  return np.concatenate(filled) if filled else np.zeros((0,) + tiles[0].shape[1:], np.uint8)


def make_row(examples: list[dict], seq_len: int, max_tiles: int, pad_id: int,
             padding_side: str = "right") -> dict:
  """Examples (each input_ids/labels int32 [n_i], tiles uint8 [t_i, H, W, 3]) -> one row.

  Returns input_ids, labels, segment_ids, positions: int32 [seq_len]; pixel_values [max_tiles, H, W, 3] in the
  tiles' dtype (uint8; floats stay floats); tile_mask bool [max_tiles].
  """
  if not examples:
    raise ValueError("A row needs at least one example.")
  if padding_side not in ("right", "left"):
    raise ValueError(f"padding_side={padding_side!r} is not 'right' or 'left'.")
  input_ids = np.concatenate([e["input_ids"] for e in examples]).astype(np.int32)
  # The loss shifts (position t predicts labels[t + 1]): a segment's first label would be predicted by the
  # previous segment's last token, so it is never a target. Loss never crosses segments, like attention.
  labels = np.concatenate([np.concatenate([[IGNORE_ID], e["labels"][1:]]) if len(e["labels"]) else e["labels"]
                           for e in examples]).astype(np.int32)
  segment_ids = np.concatenate([np.full(len(e["input_ids"]), k, np.int32) for k, e in enumerate(examples, 1)])
  positions = np.concatenate([np.arange(len(e["input_ids"]), dtype=np.int32) for e in examples])
  tiles = _tiles(examples)
  n, t = len(input_ids), len(tiles)
  if n > seq_len or t > max_tiles:
    raise ValueError(f"{len(examples)} example(s) of {n} tokens and {t} tiles overflow a row of {seq_len} "
                     f"tokens and {max_tiles} tiles.")
  pad = seq_len - n
  where = (pad, 0) if padding_side == "left" else (0, pad)
  pixel_values = np.zeros((max_tiles,) + tiles.shape[1:], tiles.dtype)
  pixel_values[:t] = tiles
  return {
      "input_ids": np.pad(input_ids, where, constant_values=pad_id),
      "labels": np.pad(labels, where, constant_values=IGNORE_ID),
      "segment_ids": np.pad(segment_ids, where),
      "positions": np.pad(positions, where),
      "pixel_values": pixel_values,
      "tile_mask": np.arange(max_tiles) < t,
  }


def pad_example(example: dict, seq_len: int, max_tiles: int, pad_id: int, padding_side: str = "right") -> dict:
  """One example alone in a row (segment 1), padded on `padding_side`; see make_row for shapes."""
  _check_fits(example, seq_len, max_tiles)
  return make_row([example], seq_len, max_tiles, pad_id, padding_side)


class Packer:
  """Greedy packing in arrival order: an example joins the open row if its tokens and tiles still fit,
  otherwise the open row is closed and returned, and the example opens the next one."""

  def __init__(self, seq_len: int, max_tiles: int, pad_id: int):
    self.seq_len, self.max_tiles, self.pad_id = seq_len, max_tiles, pad_id
    self.pending: list[dict] = []  # examples of the open row
    self._tokens = self._tiles = 0

  def add(self, example: dict) -> dict | None:
    """Adds an example; returns the row it closed, if any."""
    _check_fits(example, self.seq_len, self.max_tiles)
    n, t = len(example["input_ids"]), len(example["tiles"])
    row = None
    if self._tokens + n > self.seq_len or self._tiles + t > self.max_tiles:
      row = self.flush()
    self.pending.append(example)
    self._tokens += n
    self._tiles += t
    return row

  def flush(self) -> dict | None:
    """Closes and returns the open row (None if empty)."""
    if not self.pending:
      return None
    row = make_row(self.pending, self.seq_len, self.max_tiles, self.pad_id)
    self.pending, self._tokens, self._tiles = [], 0, 0
    return row


def pack(examples, seq_len: int, max_tiles: int, pad_id: int) -> list[dict]:
  """All examples packed greedily into rows (the last one flushed)."""
  packer = Packer(seq_len, max_tiles, pad_id)
  rows = [r for r in (packer.add(e) for e in examples) if r is not None]
  last = packer.flush()
  return rows + ([last] if last is not None else [])


def _pad_text(ids, max_text_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.asarray(ids, np.int32)
  if len(ids) > max_text_len:
    raise ValueError(f"text_ids of length {len(ids)} exceed max_text_len={max_text_len}.")
  return np.pad(ids, (0, max_text_len - len(ids)), constant_values=pad_id), np.arange(max_text_len) < len(ids)


def pad_image_text(example: dict, max_text_len: int, pad_id: int, hard_negatives: int = 0) -> dict:
  """{"pixel_values" [1, H, W, 3], "text_ids" [m], "negative_text_ids" (optional) list of [m_j]} ->
  pixel_values uint8 [1, H, W, 3] (as given), text_ids int32 [L], text_mask bool [L] (L = max_text_len), padded on the
  right; with hard_negatives = K > 0 also negative_text_ids int32 [K, L], negative_text_mask bool [K, L] and
  negative_valid bool [K] (False for the missing ones when the record has fewer than K)."""
  ids, mask = _pad_text(example["text_ids"], max_text_len, pad_id)
  out = {"pixel_values": np.asarray(example["pixel_values"]), "text_ids": ids, "text_mask": mask}
  if hard_negatives:
    negatives = list(example.get("negative_text_ids", []))[:hard_negatives]
    padded = [_pad_text(n, max_text_len, pad_id) for n in negatives]
    # A missing negative is one real pad token (an all-masked row could give NaN), masked out of the loss.
    padded += [_pad_text([pad_id], max_text_len, pad_id)] * (hard_negatives - len(padded))
    out["negative_text_ids"] = np.stack([p[0] for p in padded])
    out["negative_text_mask"] = np.stack([p[1] for p in padded])
    out["negative_valid"] = np.arange(hard_negatives) < len(negatives)
  return out


def collate(rows: list[dict]) -> dict:
  """Rows with equal keys and shapes -> a batch dict of numpy arrays with a leading [B] axis."""
  if not rows:
    raise ValueError("collate needs at least one row.")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
