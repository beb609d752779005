"""Dataset record -> one unpadded model example, per stage task (DESIGN.md "Dataset records").

Tasks:
- conversation: ChatML over the record's turns, labels on assistant turns. Too long for data.seq_len or
  too many tiles for data.max_tiles: cut after the last assistant turn that fits (whole turns only, so an
  image's tokens are never split); dropped when not even the first assistant turn fits.
- caption: LLaVA pretraining, user `<image>` (one per image of the record, `caption_prompt`) and the caption
  as the assistant's answer.
- text: the record's caption and turn texts without images, joined by `\\n`, then eos; all labelled.
  Cut to seq_len (any prefix of plain text is still good language-model data).
- image_text: the image as one square tile + the caption ids (cut, then eos) for contrastive training, and
  the ids of up to `contrastive.hard_negatives` of the record's `negative_captions`. Records with several
  images are dropped: their caption describes all of them, so it is no pair for any one image.

`Preprocessor.counts` counts kept, truncated and dropped records by reason.
"""
from __future__ import annotations

import collections

import numpy as np

from vlm_jax.config import Config
from vlm_jax.inputs import chat, images
from vlm_jax.losses import IGNORE_ID
from vlm_jax.inputs.tokenizer import IMAGE_TOKEN, MAX_GRID, Tokenizer

TASKS = ("conversation", "caption", "text", "image_text")


class Preprocessor:
  """Turns records into examples: {"input_ids" int32 [n], "labels" int32 [n], "tiles" uint8 [t, H, W, 3]}
  for the language-model tasks, {"pixel_values" uint8 [1, H, W, 3], "text_ids" int32 [m],
  "negative_text_ids": list of int32 [m_j]} for image_text."""

  def __init__(self, config: Config, tokenizer: Tokenizer, row_shape: tuple[int, int] | None = None):
    """row_shape: (tokens, tiles) an example must fit, default (data.seq_len, data.max_tiles)."""
    self.config = config
    self.tokenizer = tokenizer
    self.seq_len, self.max_tiles = row_shape or (config.data.seq_len, config.data.max_tiles)
    self.tokens_per_tile = config.model.image_tokens_per_tile
    self.counts = collections.Counter()
    # The model swaps the embeddings of model.image_token_id for image features: it must be the tokenizer's.
    if config.model.image_token_id != tokenizer.image_id:
      raise ValueError(f"model.image_token_id={config.model.image_token_id} but the tokenizer's <image> id is "
                       f"{tokenizer.image_id}; set model.image_token_id={tokenizer.image_id}.")
    size = config.model.vision.image_size
    if config.data.image_splitting and (config.data.max_image_size or 4 * size) > MAX_GRID * size:
      raise ValueError(f"data.max_image_size={config.data.max_image_size} allows grids wider than the "
                       f"{MAX_GRID}x{MAX_GRID} <row_i_col_j> tokens; keep it <= {MAX_GRID * size}.")
    if tokenizer.vocab_size > config.model.decoder.vocab_size:
      raise ValueError(f"The tokenizer has {tokenizer.vocab_size} tokens, more than model.decoder.vocab_size="
                       f"{config.model.decoder.vocab_size}.")

  def to_example(self, record: dict, task: str) -> dict | None:
    """One example, or None when the record is dropped (the reason is counted in self.counts)."""
    if task not in TASKS:
      raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
    example = getattr(self, f"_{task}")(record)
    if example is not None:
      self.counts["kept"] += 1
    return example

  def _drop(self, reason: str) -> None:
    self.counts[f"dropped_{reason}"] += 1

  # ----- tasks

  def _conversation(self, record: dict) -> dict | None:
    turns = with_image_placeholders(record["turns"], len(record["images"]))
    if turns is None:
      return self._drop("image_count_mismatch")
    prompts, tiles_per_image = self._image_prompts(record["images"])
    parts = chat.tokenize_turns(turns, prompts, self.tokenizer)
    keep, reason = self._fitting_prefix(turns, parts, tiles_per_image)
    if keep == 0:
      return self._drop(reason)
    if keep < len(turns):
      self.counts["truncated"] += 1
    used_images = sum(p.images for p in parts[:keep])
    return self._assemble(parts[:keep], record["images"][:used_images])

  def _caption(self, record: dict) -> dict | None:
    if not record["images"]:
      return self._drop("no_image")
    if not record["caption"]:
      return self._drop("no_caption")
    turns = [{"role": "user", "content": caption_prompt(len(record["images"]))},
             {"role": "assistant", "content": record["caption"]}]
    prompts, tiles_per_image = self._image_prompts(record["images"])
    if sum(tiles_per_image) > self.max_tiles:
      return self._drop("too_many_tiles")
    parts = chat.tokenize_turns(turns, prompts, self.tokenizer)
    if sum(len(p.input_ids) for p in parts) > self.seq_len:
      return self._drop("too_long")
    return self._assemble(parts, record["images"])

  def _text(self, record: dict) -> dict | None:
    texts = [record["caption"]] + [t["content"].replace(IMAGE_TOKEN, "") for t in record["turns"]]
    text = "\n".join(t.strip() for t in texts if t.strip())
    if not text:
      return self._drop("no_text")
    # A leading bos makes the first word a target too (a position's label is predicted from the one before).
    bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
    ids = bos + self.tokenizer.encode(text) + [self.tokenizer.eos_id]
    if len(ids) > self.seq_len:
      ids = ids[:self.seq_len]
      self.counts["truncated"] += 1
    ids = np.asarray(ids, np.int32)
    labels = ids.copy()
    labels[:len(bos)] = IGNORE_ID
    size = self.config.model.vision.image_size
    return {"input_ids": ids, "labels": labels, "tiles": np.zeros([0, size, size, 3], np.uint8)}

  def _image_text(self, record: dict) -> dict | None:
    if not record["images"]:
      return self._drop("no_image")
    if len(record["images"]) > 1:
      return self._drop("multi_image")
    if not record["caption"]:
      return self._drop("no_caption")
    contrastive = self.config.model.contrastive
    encode = lambda text: np.asarray(self.tokenizer.encode(text)[:contrastive.max_text_len - 1]
                                     + [self.tokenizer.eos_id], np.int32)
    negatives = record.get("negative_captions", [])[:contrastive.hard_negatives]
    size = self.config.model.vision.image_size
    image = images.resize(np.asarray(record["images"][0]), size, size, self.config.data.resample)
    return {"pixel_values": image[None],
            "text_ids": encode(record["caption"]), "negative_text_ids": [encode(t) for t in negatives]}

  # ----- prompts for generation

  def to_prompt(self, record: dict, assistant_turn: int = 0) -> dict:
    """The conversation up to (not including) its `assistant_turn`-th assistant turn, ending with
    `<|im_start|>assistant\\n`: {"input_ids" int32 [n], "tiles" uint8 [t, H, W, 3], "answer": str}."""
    turns = with_image_placeholders(record["turns"], len(record["images"]))
    if turns is None:
      raise ValueError(f"Record {record.get('id')!r}: image placeholders do not match its images.")
    answers = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    cut = answers[assistant_turn]
    n_images = sum(t["content"].count(IMAGE_TOKEN) for t in turns[:cut])
    prompts, _ = self._image_prompts(record["images"][:n_images])
    parts = chat.tokenize_turns(turns[:cut], prompts, self.tokenizer, generation_prompt=True)
    example = self._assemble(parts, record["images"][:n_images])
    return {"input_ids": example["input_ids"], "tiles": example["tiles"], "answer": turns[cut]["content"]}

  # ----- shared steps

  def _image_prompts(self, record_images) -> tuple[list[str], list[int]]:
    """Prompt string and tile count of each image, from its size alone."""
    prompts, counts = [], []
    for image in record_images:
      rows, cols = images.tile_grid(*np.shape(image)[:2], self.config)
      prompts.append(images.image_prompt(rows, cols, self.tokens_per_tile,
                                         self.config.model.projector.kind == "pixel_shuffle"))
      counts.append(images.tile_count(rows, cols))
    return prompts, counts

  def _fitting_prefix(self, turns, parts, tiles_per_image) -> tuple[int, str]:
    """(leading turns to keep, ending on an assistant turn; why not more). Keeping 0 means dropping."""
    keep, reason = 0, "no_assistant_turn"
    tokens = tiles = image_index = 0
    for i, (turn, part) in enumerate(zip(turns, parts)):
      tokens += len(part.input_ids)
      tiles += sum(tiles_per_image[image_index:image_index + part.images])
      image_index += part.images
      if tiles > self.max_tiles:
        return keep, "too_many_tiles"
      if tokens > self.seq_len:
        return keep, "too_long"
      if turn["role"] == "assistant":
        keep = i + 1
    return keep, reason

  def _assemble(self, parts, record_images) -> dict:
    input_ids = np.concatenate([p.input_ids for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    size = self.config.model.vision.image_size
    processed = [images.process_image(np.asarray(im), self.config).tiles for im in record_images]
    tiles = np.concatenate(processed) if processed else np.zeros([0, size, size, 3], np.uint8)
    n_image_ids = int((input_ids == self.tokenizer.image_id).sum())
    if n_image_ids != len(tiles) * self.tokens_per_tile:
      raise ValueError(f"{n_image_ids} {IMAGE_TOKEN} ids for {len(tiles)} tiles of {self.tokens_per_tile} "
                       f"tokens: does the tokenizer keep {IMAGE_TOKEN} as one token?")
    return {"input_ids": input_ids, "labels": labels, "tiles": tiles}


def caption_prompt(n_images: int) -> str:
  """The user turn of the caption task: one `<image>` per image, one per line (a caption describes them all)."""
  return "\n".join([IMAGE_TOKEN] * n_images)


def with_image_placeholders(turns: list[dict], n_images: int) -> list[dict] | None:
  """The turns with one `<image>` per image: as they are if the counts match; with `<image>\\n` * n put
  before the first user turn's text if there are none (LLaVA data places them so); None on a mismatch."""
  found = sum(t["content"].count(IMAGE_TOKEN) for t in turns)
  if found == n_images:
    return list(turns)
  if found or not any(t["role"] == "user" for t in turns):
    return None
  first = next(i for i, t in enumerate(turns) if t["role"] == "user")
  turns = list(turns)
  turns[first] = {"role": "user", "content": f"{IMAGE_TOKEN}\n" * n_images + turns[first]["content"]}
  return turns
