"""Packing and padding: exact segment_ids / positions / tile slots for small hand-made examples."""
import numpy as np
import pytest

from vlm_jax.inputs import packing
from vlm_jax.losses import IGNORE_ID

PAD = 0
H = 2  # tiny 2x2 tiles


def example(ids, labelled_from, n_tiles, fill):
  ids = np.asarray(ids, np.int32)
  labels = np.where(np.arange(len(ids)) >= labelled_from, ids, IGNORE_ID).astype(np.int32)
  return {"input_ids": ids, "labels": labels, "tiles": np.full((n_tiles, H, H, 3), fill, np.float32)}


A = example([11, 12, 13], 2, 1, 1.0)
B = example([21, 22], 1, 2, 2.0)
C = example([31, 32, 33, 34], 0, 0, 0.0)


def test_pad_right():
  row = packing.pad_example(A, 6, 3, PAD, "right")
  np.testing.assert_array_equal(row["input_ids"], [11, 12, 13, 0, 0, 0])
  np.testing.assert_array_equal(row["labels"], [-100, -100, 13, -100, -100, -100])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["tile_mask"], [True, False, False])
  assert row["pixel_values"].shape == (3, H, H, 3)
  np.testing.assert_array_equal(row["pixel_values"][:, 0, 0, 0], [1.0, 0.0, 0.0])
  assert {k: v.dtype.name for k, v in row.items()} == {
      "input_ids": "int32", "labels": "int32", "segment_ids": "int32", "positions": "int32",
      "pixel_values": "float32", "tile_mask": "bool"}


def test_pad_left():
  row = packing.pad_example(A, 6, 3, PAD, "left")
  np.testing.assert_array_equal(row["input_ids"], [0, 0, 0, 11, 12, 13])
  np.testing.assert_array_equal(row["labels"], [-100, -100, -100, -100, -100, 13])
  np.testing.assert_array_equal(row["segment_ids"], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(row["positions"], [0, 0, 0, 0, 1, 2])
  np.testing.assert_array_equal(row["tile_mask"], [True, False, False])  # tiles always fill the first slots


def test_pack_segments_positions_tiles():
  rows = packing.pack([A, B, C], seq_len=8, max_tiles=3, pad_id=PAD)
  assert len(rows) == 2  # A+B fill all 3 tile slots (5 tokens); C (4 tokens) would overflow 8 tokens
  first, second = rows
  np.testing.assert_array_equal(first["input_ids"], [11, 12, 13, 21, 22, 0, 0, 0])
  np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(first["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(first["labels"], [-100, -100, 13, -100, 22, -100, -100, -100])
  # a segment's first label is never a target (the previous segment's last token would predict it)
  fully_labelled = {**B, "labels": B["input_ids"].copy()}
  row = packing.make_row([A, fully_labelled], seq_len=8, max_tiles=3, pad_id=PAD)
  np.testing.assert_array_equal(row["labels"], [-100, -100, 13, -100, 22, -100, -100, -100])
  np.testing.assert_array_equal(first["tile_mask"], [True, True, True])
  np.testing.assert_array_equal(first["pixel_values"][:, 0, 0, 0], [1.0, 2.0, 2.0])
  np.testing.assert_array_equal(second["segment_ids"], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(second["positions"], [0, 1, 2, 3, 0, 0, 0, 0])
  np.testing.assert_array_equal(second["tile_mask"], [False, False, False])


def test_packer_closes_row_when_tile_slots_run_out():
  packer = packing.Packer(seq_len=20, max_tiles=2, pad_id=PAD)
  assert packer.add(A) is None
  row = packer.add(B)  # 1 + 2 tiles > 2 slots although tokens fit
  np.testing.assert_array_equal(row["segment_ids"][:4], [1, 1, 1, 0])
  assert packer.add(C) is None
  row = packer.flush()
  np.testing.assert_array_equal(row["segment_ids"][:7], [1, 1, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(row["positions"][:7], [0, 1, 0, 1, 2, 3, 0])
  assert packer.flush() is None
  with pytest.raises(ValueError, match="does not fit"):
    packer.add(example(range(21), 0, 0, 0.0))


def test_collate_and_image_text():
  batch = packing.collate([packing.pad_example(A, 6, 3, PAD), packing.pad_example(C, 6, 3, PAD, "left")])
  assert {k: v.shape for k, v in batch.items()} == {
      "input_ids": (2, 6), "labels": (2, 6), "segment_ids": (2, 6), "positions": (2, 6),
      "pixel_values": (2, 3, H, H, 3), "tile_mask": (2, 3)}
  np.testing.assert_array_equal(batch["positions"][1], [0, 0, 0, 1, 2, 3])
  row = packing.pad_image_text({"pixel_values": np.ones((1, H, H, 3)), "text_ids": [5, 6, 3]}, 5, PAD)
  np.testing.assert_array_equal(row["text_ids"], [5, 6, 3, 0, 0])
  np.testing.assert_array_equal(row["text_mask"], [True, True, True, False, False])
  assert row["pixel_values"].shape == (1, H, H, 3) and row["text_ids"].dtype == np.int32
  assert "negative_text_ids" not in row


def test_image_text_hard_negatives_padded_and_flagged():
  example = {"pixel_values": np.ones((1, H, H, 3)), "text_ids": [5, 6, 3], "negative_text_ids": [[7, 3], [8, 9, 3]]}
  row = packing.pad_image_text(example, 4, PAD, hard_negatives=3)
  np.testing.assert_array_equal(row["negative_text_ids"], [[7, 3, 0, 0], [8, 9, 3, 0], [0, 0, 0, 0]])
  # A missing negative keeps one real (pad) token so its embedding is finite; negative_valid drops it.
  np.testing.assert_array_equal(row["negative_text_mask"].sum(1), [2, 3, 1])
  np.testing.assert_array_equal(row["negative_valid"], [True, True, False])
  row = packing.pad_image_text(example, 4, PAD, hard_negatives=1)
  np.testing.assert_array_equal(row["negative_text_ids"], [[7, 3, 0, 0]])
