"""Shared by the training tests: overrides that shrink a config to a seconds-fast model (16 px images, one tile of 4
`<image>` tokens, decoder width 32, vocab 64), a hand-made LM batch, and a reader of the TensorBoard events a run
wrote."""
import shutil

import numpy as np

from vlm_jax import checkpoint
from vlm_jax import config as config_lib
from vlm_jax import losses

TINY = ["model.vision.image_size=16", "model.vision.width=16", "model.vision.depth=1", "model.vision.num_heads=2",
        "model.vision.mlp_dim=32", "model.decoder.vocab_size=64", "model.decoder.width=32",
        "model.decoder.num_layers=1", "model.decoder.num_heads=2", "model.decoder.num_kv_heads=2",
        "model.decoder.mlp_dim=64", "model.contrastive.width=16", "model.contrastive.depth=1",
        "model.contrastive.num_heads=2", "model.contrastive.mlp_dim=32", "model.contrastive.embed_dim=16",
        "model.contrastive.max_text_len=8", "model.contrastive.hard_negatives=0",  # hand-built batches: no negatives
        "model.dtype=float32", "model.scan_layers=True"]  # the tests' tolerances are float32 ones; scan is the TPU path


def tiny_config(name: str = "shapes_tiny", overrides: tuple[str, ...] | list[str] = ()) -> config_lib.Config:
  """Config `name` shrunk by TINY, then `overrides` (later keys win)."""
  return config_lib.load(name, TINY + list(overrides))


def lm_batch(cfg, rows=8, seq=16, seed=0):
  """Rows start with one tile of `<image>` ids; row b supervises its last 3 + b % 5 tokens (37 over 8 rows)."""
  rng = np.random.default_rng(seed)
  m = cfg.model
  ids = rng.integers(10, m.decoder.vocab_size, (rows, seq)).astype(np.int32)
  ids[:, :m.image_tokens_per_tile] = m.image_token_id
  labels = np.full_like(ids, losses.IGNORE_ID)
  for b in range(rows):
    n = 3 + b % 5
    labels[b, seq - n:] = ids[b, seq - n:]
  size = m.vision.image_size
  return {"input_ids": ids, "labels": labels, "segment_ids": np.ones_like(ids),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
          "pixel_values": rng.normal(size=(rows, 1, size, size, 3)).astype(np.float32),
          "tile_mask": np.ones((rows, 1), bool)}


def rewound_copy(workdir, to, stage, drop_step, later=("instruct",)):
  """A copy of `workdir` at `to` as if it had stopped before `stage` saved `drop_step`: that step's checkpoint,
  the stage's FINISHED marker and the `later` stages gone. -> `to`."""
  shutil.copytree(workdir, to)
  (checkpoint.stage_dir(to, stage) / checkpoint.FINISHED).unlink()
  shutil.rmtree(checkpoint.stage_dir(to, stage) / str(drop_step))
  for name in later:
    shutil.rmtree(checkpoint.stage_dir(to, name))
  return to


def tensorboard_events(directory):
  """Every Event proto in the TFRecord event files of `directory` (length, crc, data, crc per record)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  events = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events
