"""Which special tokens and chat template a model brought from Hugging Face keeps or gains.

A model keeps its own tokens: a token is appended only when a prompt vlm_jax renders for it needs one the
tokenizer lacks. The prompts are
  - the image prompt: `<image>` always; for the pixel-shuffle (Idefics3) prompt also `<fake_token_around_image>`
    and `<global-img>`, and the `<row_i_col_j>` tile tags only when images are split into tiles;
  - the chat template: vlm_jax renders conversations in ChatML (vlm_jax/inputs/chat.py), so `<|im_start|>` and
    `<|im_end|>` are needed when the chosen template is ChatML, or when the model has none (ChatML is then chosen).
A model whose own template is something else (a LLaVA's `USER: ... ASSISTANT:`) keeps it and gets no ChatML tokens,
so an import -> export round trip leaves its vocabulary as it was.

The chosen template is saved as `chat_template.jinja` beside the workdir's tokenizer when it is not vlm_jax's
ChatML (`export.CHAT_TEMPLATE`); export writes it back.
"""
from __future__ import annotations

import os

from etils import epath

from vlm_jax.inputs import files
from vlm_jax.inputs.tokenizer import (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IM_END, IM_START, IMAGE_TOKEN, MAX_GRID,
                                      Tokenizer, row_col_token)

TEMPLATE_FILE = "chat_template.jinja"
CHAT_TOKENS = [IM_START, IM_END]


def chat_template(directory: str | os.PathLike) -> str | None:
  """A model directory's own chat template, or None: `chat_template.jinja` (what transformers >= 4.51 saves),
  else a processor's chat_template.json (llava-hf checkpoints), else tokenizer_config.json's `chat_template` (a
  string, or a list of named templates: the 'default' one)."""
  directory = epath.Path(directory)
  if (directory / TEMPLATE_FILE).exists():
    return files.read_text(directory / TEMPLATE_FILE, "chat template")
  for name in ("chat_template.json", "tokenizer_config.json"):
    if (directory / name).exists():
      template = files.read_json(directory / name, f"HF {name}", "save it again with transformers").get(
          "chat_template")
      if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
      if template:
        return template
  return None


def is_chatml(template: str | None) -> bool:
  """Whether vlm_jax renders this template's conversations: ChatML, or no template at all."""
  return template is None or IM_START in template


def needed_tokens(template: str | None, projector_kind: str, image_splitting: bool) -> list[str]:
  """The special tokens prompts use (module docstring), in the order they are appended when missing."""
  tokens = [IMAGE_TOKEN] + (CHAT_TOKENS if is_chatml(template) else [])
  if projector_kind == "pixel_shuffle":
    tokens += [FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN]
    if image_splitting:
      tokens += [row_col_token(i, j) for i in range(1, MAX_GRID + 1) for j in range(1, MAX_GRID + 1)]
  return tokens


def missing_tokens(tokenizer: Tokenizer, tokens: list[str]) -> list[str]:
  """The tokens of `tokens` the tokenizer lacks (the ones `add_special_tokens(tokens)` will append)."""
  return [t for t in tokens if tokenizer.token_to_id(t) is None]


def added_message(added: list[str], tokenizer: Tokenizer) -> str:
  """One line saying which tokens were appended (with their ids) and how their embedding rows start."""
  listed = ", ".join(f"{t} ({tokenizer.token_to_id(t)})" for t in added)
  return (f"added {len(added)} special token{'s' if len(added) > 1 else ''} the prompts need and the tokenizer "
          f"lacked: {listed}; each new embedding row is the mean of the existing rows")


def save_template(template: str | None, tokenizer_dir: str | os.PathLike) -> None:
  """Writes `template` beside a saved tokenizer (None: vlm_jax's ChatML, nothing written)."""
  if template is not None:
    (epath.Path(tokenizer_dir) / TEMPLATE_FILE).write_text(template)


def saved_template(tokenizer_dir: str | os.PathLike, default: str) -> str:
  """The template saved beside a workdir's tokenizer, else `default` (vlm_jax's ChatML)."""
  path = epath.Path(tokenizer_dir) / TEMPLATE_FILE
  return files.read_text(path, "chat template") if path.exists() else default
