"""Evaluation: scores per question type and per source, a blind baseline (grey images), caption token F1.

`evaluate(...)` asks a generator for answers to every question of a split, once with the real images and
once blind, and writes `W/eval/results.json`, every answer to `W/eval/predictions.jsonl` and a PNG grid of
samples. Scoring functions are pure (the metrics themselves live in vlm_jax/metrics.py).

Each question is scored against its references: the record's stored reference answers for that turn (all 10
of a VQAv2 question), else the assistant turn's text. The metric is `metric` (vqav2, anls, relaxed, exact) or,
by default, chosen per question by `metrics.choose_metric` (its source's name, else vqav2 with 10 references,
else exact match). Datasets that carry sources or references (hf_parquet) also get scores per source, and
their predictions carry what lmms-eval logs: question_id, references, source, metric and score.

How questions are asked: each assistant turn of a record is one question, asked on its own as a single user
turn (`<image>\n` per record image, then the question text; greedy decoding), not after the record's earlier
questions and answers. The answer then depends on the images and that question only, every question is scored
under the same conditions whatever its place in the record, and the prompt has the shape of a record's first
turn in training. The blind pass asks the same questions with every image replaced by a mid-grey image of
the same size (same prompt, same tiles), so `accuracy - blind_accuracy` is what the images contribute.
The caption score asks with the `caption` training task's prompt (user turn `<image>` per image) and
compares to the record's caption by token F1.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
import tqdm
from etils import epath

from vlm_jax import metrics
from vlm_jax.config import Config
from vlm_jax.inputs.examples import caption_prompt
from vlm_jax.inputs.images import grey_image
from vlm_jax.inputs.tokenizer import IMAGE_TOKEN
from vlm_jax.metrics import exact_match, normalize_answer, token_f1  # noqa: F401  (evaluate's API too)

UNNAMED_SOURCE = "unnamed"


def accuracy_by_type(types: Sequence[str], scores: Sequence[float], empty: str = "untyped") -> dict[str, float]:
  """{'overall': mean, type: mean per type} of per-question scores in [0, 1] (or bools); types sorted for
  stable output, "" counted as `empty`."""
  if len(types) != len(scores):
    raise ValueError(f"{len(types)} question types but {len(scores)} scores.")
  per: dict[str, list[float]] = collections.defaultdict(list)
  for t, c in zip(types, scores):
    per[t or empty].append(float(c))
  out = {t: float(np.mean(per[t])) for t in sorted(per)}
  out["overall"] = float(np.mean(np.asarray(scores, np.float64))) if len(scores) else 0.0
  return out


def _rows(label: str, scores: dict, blind: dict, extra: dict | None = None) -> list[str]:
  width = max([12, len(label)] + [len(k) for k in scores])
  head = f"{label:<{width}} " + (f"{'metric':<14} " if extra is not None else "")
  rows = [head + f"{'images':>7} {'blind':>7} {'gain':>7}"]
  for t in [k for k in scores if k != "overall"] + ["overall"]:
    b = blind.get(t, float("nan"))
    metric = f"{(extra or {}).get(t, ''):<14} " if extra is not None else ""
    rows.append(f"{t:<{width}} {metric}{scores[t]:7.3f} {b:7.3f} {scores[t] - b:+7.3f}")
  return rows


def format_table(results: dict) -> str:
  """The score table printed by `vlm-jax eval` and the demo: per type, then per source when there are sources."""
  rows = _rows("type", results["accuracy"], results.get("blind_accuracy", {}))
  if "by_source" in results:
    rows += _rows("source", results["by_source"], results.get("blind_by_source", {}), results.get("metrics", {}))
  if "caption_f1" in results:
    rows.append(f"{'caption F1':<12} {results['caption_f1']:7.3f}")
  rows.append(f"n = {results['n']} questions")
  return "\n".join(rows)


def save_grid(path: str | epath.PathLike, images: Iterable[np.ndarray], captions: Iterable[str],
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
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:  # local or gs://
    canvas.save(f, format="PNG")


def results_path(workdir: str | epath.PathLike) -> epath.Path:
  """W/eval/results.json (local or gs://)."""
  return epath.Path(workdir) / "eval" / "results.json"


def predictions_path(workdir: str | epath.PathLike) -> epath.Path:
  """W/eval/predictions.jsonl."""
  return epath.Path(workdir) / "eval" / "predictions.jsonl"


def write_results(workdir: str | epath.PathLike, results: dict) -> epath.Path:
  out = results_path(workdir)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2, sort_keys=True))
  return out


Answerer = Callable[[list[dict]], list[str]]  # questions (images, prompt turns) -> answers


ANSWER_TOKENS = 8  # shapes_vqa answers are one word
CAPTION_TOKENS = 64
GRID_SAMPLES = 8


@dataclasses.dataclass(frozen=True)
class Question:
  """One typed question of a record, as a request: images uint8 [h, w, 3] each, prompt one user turn.
  `stored_references`: the record's reference answers for this turn (often none); `question_id`: the record id,
  with `_k` for its k-th assistant turn when it has several."""
  images: list[np.ndarray]
  prompt: str
  answer: str
  type: str
  record_id: str
  source: str = ""
  stored_references: tuple[str, ...] = ()
  question_id: str = ""

  @property
  def text(self) -> str:
    """The question without its image marks."""
    return self.prompt.replace(IMAGE_TOKEN, "").strip()

  @property
  def references(self) -> list[str]:
    """What an answer is scored against: the stored references, else the assistant turn's text."""
    return list(self.stored_references) or [self.answer]


def questions(records: Iterable[dict]) -> list[Question]:
  """Every assistant turn of every record as a standalone Question (its user turn without the record's
  `<image>` marks, `<image>\n` per record image in front)."""
  out = []
  for record in records:
    turns, types = record["turns"], iter(record["question_types"])
    references = record.get("references") or []
    num_answers = sum(t["role"] == "assistant" for t in turns)
    k = -1
    for i, turn in enumerate(turns):
      if turn["role"] != "assistant":
        continue
      qtype, k = next(types, ""), k + 1
      if i == 0 or turns[i - 1]["role"] != "user":
        continue
      text = turns[i - 1]["content"].replace(IMAGE_TOKEN, "").strip()
      prompt = f"{IMAGE_TOKEN}\n" * len(record["images"]) + text
      out.append(Question(list(record["images"]), prompt, turn["content"], qtype, record["id"],
                          record.get("source", ""), tuple(references[k]) if k < len(references) else (),
                          record["id"] if num_answers == 1 else f"{record['id']}_{k}"))
  return out


def question_metric(question: Question, metric: str = "auto") -> str:
  """The metric `question` is scored with: `metric`, or for "auto" `metrics.choose_metric`'s choice."""
  if metric == "auto":
    return metrics.choose_metric(question.source, len(question.stored_references))
  if metric not in metrics.METRICS:
    raise ValueError(f"Unknown metric {metric!r}; expected auto or one of {metrics.METRICS}.")
  return metric


def blind(images: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Each image replaced by mid-grey pixels of its own size (so prompts and tile counts stay the same)."""
  return [np.broadcast_to(grey_image(1), np.shape(im)).copy() for im in images]


def _answers(generator: Any, requests: list[tuple[list[np.ndarray], str]], max_new_tokens: int,
             batch_size: int, bar: tqdm.tqdm) -> list[str]:
  out = []
  for start in range(0, len(requests), batch_size):
    chunk = requests[start:start + batch_size]
    out += [r.text for r in generator.generate(chunk, max_new_tokens=max_new_tokens)]
    bar.update(len(chunk))
  return out


def score(generator: Any, records: Sequence[dict], *, batch_size: int = 16, progress: bool = True,
          metric: str = "auto", answer_tokens: int = ANSWER_TOKENS) -> tuple[dict, list[dict]]:
  """Asks `generator` (anything with `generate(requests, max_new_tokens=...) -> [Result]`, greedy) every
  question with images and blind (up to `answer_tokens` tokens), and a caption per record with images and a
  caption; scores each answer by `question_metric(q, metric)` against `q.references`.

  Returns (results, predictions): results {"accuracy": {type: x, "overall": x}, "blind_accuracy": {...},
  "caption_f1": x, "n": questions}, plus, when the records carry sources or references or `metric` is not
  "auto", "by_source" and "blind_by_source" ({source: x, "overall": x}) and "metrics" ({source: the metrics
  used}). predictions: one dict per question, in `questions(records)` order ("id", "type", "question",
  "reference", "answer", "blind_answer"; with sources or references also "question_id", "source",
  "references", "metric", "score", "blind_score"), then one per caption ("id", "type": "caption",
  "reference", "answer").
  """
  qs = questions(records)
  captioned = [r for r in records if r["images"] and r["caption"]]
  with tqdm.tqdm(total=2 * len(qs) + len(captioned), desc="eval", unit="q", disable=not progress) as bar:
    answers = _answers(generator, [(q.images, q.prompt) for q in qs], answer_tokens, batch_size, bar)
    blind_answers = _answers(generator, [(blind(q.images), q.prompt) for q in qs], answer_tokens, batch_size,
                             bar)
    captions = _answers(generator, [(r["images"], caption_prompt(len(r["images"]))) for r in captioned],
                        CAPTION_TOKENS, batch_size, bar)
  chosen = [question_metric(q, metric) for q in qs]
  scores = [metrics.metric_score(m, a, q.references) for m, a, q in zip(chosen, answers, qs)]
  blind_scores = [metrics.metric_score(m, a, q.references) for m, a, q in zip(chosen, blind_answers, qs)]
  types = [q.type for q in qs]
  results = {
      "accuracy": accuracy_by_type(types, scores),
      "blind_accuracy": accuracy_by_type(types, blind_scores),
      "caption_f1": float(np.mean([token_f1(c, r["caption"]) for c, r in zip(captions, captioned)]))
                    if captioned else 0.0,
      "n": len(qs),
  }
  predictions = [{"id": q.record_id, "type": q.type, "question": q.text, "reference": q.answer, "answer": a,
                  "blind_answer": b} for q, a, b in zip(qs, answers, blind_answers)]
  if metric != "auto" or any(q.source or q.stored_references for q in qs):
    sources = [q.source for q in qs]
    results["by_source"] = accuracy_by_type(sources, scores, UNNAMED_SOURCE)
    results["blind_by_source"] = accuracy_by_type(sources, blind_scores, UNNAMED_SOURCE)
    used = collections.defaultdict(set)
    for q, m in zip(qs, chosen):
      used[q.source or UNNAMED_SOURCE].add(m)
    results["metrics"] = {k: ", ".join(sorted(v)) for k, v in sorted(used.items())}
    for p, q, m, x, y in zip(predictions, qs, chosen, scores, blind_scores):
      p.update(question_id=q.question_id, source=q.source, references=q.references, metric=m, score=x,
               blind_score=y)
  predictions += [{"id": r["id"], "type": "caption", "reference": r["caption"], "answer": c}
                  for r, c in zip(captioned, captions)]
  return results, predictions


def grid_samples(records: Sequence[dict], predictions: Sequence[dict]) -> list[tuple[np.ndarray, str]]:
  """~GRID_SAMPLES questions spread over the split, as (images side by side uint8 [h, w, 3], "got | ref |
  question") for `save_grid`."""
  qs = questions(records)
  picks = np.unique(np.linspace(0, len(qs) - 1, min(GRID_SAMPLES, len(qs))).astype(int)) if qs else []
  return [(side_by_side(qs[i].images), f"got {predictions[i]['answer']} | ref {qs[i].answer} | {qs[i].text}")
          for i in picks]


def side_by_side(images: Sequence[np.ndarray]) -> np.ndarray:
  """The images of a question in one uint8 [h, w, 3] picture (white gap, bottoms padded white)."""
  if not images:
    return np.full((8, 8, 3), 255, np.uint8)
  height = max(np.shape(im)[0] for im in images)
  parts = []
  for im in images:
    parts += [np.pad(np.asarray(im, np.uint8), ((0, height - np.shape(im)[0]), (0, 0), (0, 0)),
                     constant_values=255), np.full((height, 4, 3), 255, np.uint8)]
  return np.concatenate(parts[:-1], axis=1)


def eval_records(config: Config, split: str = "test", limit: int | None = None, data_dir: str | None = None,
                 dataset: str | None = None) -> list[dict]:
  """The first `limit` records (all when None) of `split` of `dataset` (default: the first dataset of the config's
  last conversation stage, else of its last stage) in data_dir (default: config.data.data_dir)."""
  from vlm_jax.inputs import loader  # pylint: disable=import-outside-toplevel  (TFDS only when evaluating)
  if dataset is None:
    stages = [s for s in config.train.stages if s.task == "conversation"] or list(config.train.stages)
    dataset = stages[-1].datasets[0][0]
  source = loader.data_source(dataset, split, data_dir or config.data.data_dir)
  return [source[i] for i in range(len(source) if limit is None else min(limit, len(source)))]


def as_metrics(results: dict) -> dict[str, float]:
  """`score` results as flat scalars for the training metrics log: eval/accuracy/<type>,
  eval/blind_accuracy/<type> (both with 'overall'), eval/by_source/<source> and eval/blind_by_source/<source>
  when present, eval/caption_f1, eval/questions."""
  kinds = ("accuracy", "blind_accuracy", "by_source", "blind_by_source")
  out = {f"eval/{kind}/{t}": x for kind in kinds if kind in results for t, x in results[kind].items()}
  return {**out, "eval/caption_f1": results["caption_f1"], "eval/questions": float(results["n"])}


def evaluate(workdir: str | epath.PathLike, *, split: str = "test", limit: int | None = None, batch_size: int = 16,
             data_dir: str | None = None, stage: str | None = None, dataset: str | None = None,
             generator: Any = None, progress: bool = True, metric: str = "auto",
             answer_tokens: int = ANSWER_TOKENS) -> dict:
  """Scores a workdir's model (`stage`, default its last finished stage; or `generator`) on `split` of
  `dataset` (default the first dataset of its last conversation stage), the first `limit` records only if
  given, by `metric` (see `score`). Writes W/eval/results.json, W/eval/predictions.jsonl (one line per answer, see `score`) and
  W/eval/samples.png; returns the results (see `score`). In a multi-host run every process asks every question
  (the generator's batches run over the whole mesh) and only process 0 writes the files."""
  # pylint: disable=import-outside-toplevel  (model and checkpoint imports only when evaluating)
  from vlm_jax import workdir as workdir_lib
  from vlm_jax.generate import Generator
  question_metric(Question([], "", "", "", ""), metric)  # an unknown metric fails before the model loads
  config = workdir_lib.read_config(workdir)
  if generator is None:
    generator = Generator(*workdir_lib.load(workdir, stage))
  records = eval_records(config, split, limit, data_dir, dataset)
  writer = jax.process_index() == 0
  results, predictions = score(generator, records, batch_size=batch_size, progress=progress and writer,
                               metric=metric, answer_tokens=answer_tokens)
  if not writer:
    return results
  write_results(workdir, results)
  predictions_path(workdir).write_text("".join(json.dumps(p) + "\n" for p in predictions))
  samples = grid_samples(records, predictions)
  save_grid(epath.Path(workdir) / "eval" / "samples.png", [im for im, _ in samples], [t for _, t in samples])
  return results
