"""Evaluation: exact match per question type, a blind baseline (grey images), caption token F1.

`evaluate(...)` asks a generator for answers to every question of a split, once with the real images and
once blind, and writes `W/eval/results.json` and a PNG grid of samples. Scoring functions are pure.
"""
from __future__ import annotations

import collections
import json
import pathlib
import re
import string
from typing import Callable, Iterable, Sequence

import numpy as np

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
  """Lower-case, strip punctuation and articles, fold whitespace (VQA-style normalization)."""
  words = _PUNCT.sub(" ", text.lower()).split()
  return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(reference)


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD-style token F1 between normalized strings (1.0 when both are empty)."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def accuracy_by_type(types: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
  """{'overall': mean, type: mean per type}; types sorted for stable output."""
  if len(types) != len(correct):
    raise ValueError(f"{len(types)} question types but {len(correct)} scores.")
  per: dict[str, list[bool]] = collections.defaultdict(list)
  for t, c in zip(types, correct):
    per[t or "untyped"].append(bool(c))
  out = {t: float(np.mean(per[t])) for t in sorted(per)}
  out["overall"] = float(np.mean(correct)) if len(correct) else 0.0
  return out


def format_table(results: dict) -> str:
  """The accuracy table printed by `vlm-jax eval` and the demo."""
  acc, blind = results["accuracy"], results.get("blind_accuracy", {})
  rows = [f"{'type':<12} {'images':>7} {'blind':>7} {'gain':>7}"]
  for t in [k for k in acc if k != "overall"] + ["overall"]:
    b = blind.get(t, float("nan"))
    rows.append(f"{t:<12} {acc[t]:7.3f} {b:7.3f} {acc[t] - b:+7.3f}")
  if "caption_f1" in results:
    rows.append(f"{'caption F1':<12} {results['caption_f1']:7.3f}")
  rows.append(f"n = {results['n']} questions")
  return "\n".join(rows)


def save_grid(path: str | pathlib.Path, images: Iterable[np.ndarray], captions: Iterable[str],
              cols: int = 4, cell: int = 160) -> None:
  """Writes a PNG grid: each image [h, w, 3] uint8 scaled into a cell with its text underneath."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  images, captions = list(images), list(captions)
  rows = max(1, -(-len(images) // cols))
  text_h = 64
  canvas = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (img, cap) in enumerate(zip(images, captions)):
    r, c = divmod(i, cols)
    pil = Image.fromarray(np.asarray(img, np.uint8))
    pil.thumbnail((cell - 8, cell - 8), Image.NEAREST)
    canvas.paste(pil, (c * cell + 4, r * (cell + text_h) + 4))
    lines = [cap[j:j + 26] for j in range(0, min(len(cap), 26 * 4), 26)]
    draw.multiline_text((c * cell + 4, r * (cell + text_h) + cell), "\n".join(lines), fill="black")
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)


def write_results(workdir: str | pathlib.Path, results: dict) -> pathlib.Path:
  out = pathlib.Path(workdir) / "eval" / "results.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2, sort_keys=True))
  return out


Answerer = Callable[[list[dict]], list[str]]  # questions (images, prompt turns) -> answers
