"""ChatML rendering with labels on what the assistant says.

    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{content}<|im_end|>\\n

Labels are the ids themselves on assistant content and its `<|im_end|>` (the model must learn to stop),
IGNORE_ID everywhere else, the `\\n` after `<|im_end|>` included. Each `<image>` placeholder in the contents
is replaced, in order, by that image's prompt string (`images.image_prompt`).

Text is tokenized per turn: every turn starts with the special `<|im_start|>`, which no tokenizer merges
across, so the ids equal those of the whole rendered string; a turn's pieces with the same label flag are
tokenized together.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vlm_jax.inputs.tokenizer import IM_END, IM_START, IMAGE_TOKEN, Tokenizer
from vlm_jax.losses import IGNORE_ID

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class TokenizedTurn:
  """One rendered turn: input_ids and labels, int32 [n]; `images` = how many images its content holds."""
  input_ids: np.ndarray
  labels: np.ndarray
  images: int


def turn_segments(role: str, content: str, generation_prompt: bool = False) -> list[tuple[str, bool]]:
  """(text, labelled) pieces of one turn; with generation_prompt, the open header an answer follows."""
  if role not in ROLES:
    raise ValueError(f"Unknown chat role {role!r}; expected one of {ROLES}.")
  header = f"{IM_START}{role}\n"
  if generation_prompt:
    return [(header, False)]
  if role == "assistant":
    return [(header, False), (f"{content}{IM_END}", True), ("\n", False)]
  return [(f"{header}{content}{IM_END}\n", False)]


def expand_images(turns: list[dict], image_prompts: list[str]) -> list[dict]:
  """Replaces the k-th `<image>` across all turns by image_prompts[k]."""
  found = sum(t["content"].count(IMAGE_TOKEN) for t in turns)
  if found != len(image_prompts):
    raise ValueError(f"The turns hold {found} {IMAGE_TOKEN} placeholders but {len(image_prompts)} images came.")
  prompts = iter(image_prompts)
  out = []
  for t in turns:
    parts = t["content"].split(IMAGE_TOKEN)
    content = parts[0] + "".join(next(prompts) + p for p in parts[1:])
    out.append({"role": t["role"], "content": content})
  return out


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, labels) int32 [n]; runs of equally labelled text are tokenized as one string."""
  ids, labels = [], []
  run, flag = "", None
  for text, labelled in segments + [("", None)]:
    if labelled != flag and run:
      run_ids = tokenizer.encode(run)
      ids += run_ids
      labels += run_ids if flag else [IGNORE_ID] * len(run_ids)
      run = ""
    run, flag = run + text, labelled
  return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def tokenize_turns(turns: list[dict], image_prompts: list[str], tokenizer: Tokenizer,
                   generation_prompt: bool = False) -> list[TokenizedTurn]:
  """Per-turn ids and labels; with generation_prompt one more, unlabelled part `<|im_start|>assistant\\n`."""
  expanded = expand_images(turns, image_prompts)
  out = []
  for raw, t in zip(turns, expanded):
    ids, labels = tokenize_segments(turn_segments(t["role"], t["content"]), tokenizer)
    out.append(TokenizedTurn(ids, labels, raw["content"].count(IMAGE_TOKEN)))
  if generation_prompt:
    ids, labels = tokenize_segments(turn_segments("assistant", "", generation_prompt=True), tokenizer)
    out.append(TokenizedTurn(ids, labels, 0))
  return out


def render(turns: list[dict], image_prompts: list[str], tokenizer: Tokenizer,
           generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """A whole conversation -> (input_ids, labels), int32 [n] each."""
  parts = tokenize_turns(turns, image_prompts, tokenizer, generation_prompt)
  if not parts:
    return np.zeros([0], np.int32), np.zeros([0], np.int32)
  return np.concatenate([p.input_ids for p in parts]), np.concatenate([p.labels for p in parts])


def render_text(turns: list[dict], image_prompts: list[str], generation_prompt: bool = False) -> str:
  """The rendered string (for reading and for feeding HF processors); labels are not shown."""
  text = "".join(s for t in expand_images(turns, image_prompts) for s, _ in turn_segments(t["role"], t["content"]))
  return text + (f"{IM_START}assistant\n" if generation_prompt else "")
