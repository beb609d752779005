"""The main job end to end (`make demo`): prepare shapes_vqa, train every stage, evaluate, generate, export.

Offline there is no pretrained ViT or LLM, so `configs/shapes_tiny.py` makes its own (contrastive ViT
pretraining, text pretraining) and then runs the LLaVA recipe (align, instruct) unchanged.
"""
from __future__ import annotations

import json
import time

import numpy as np

from vlm_jax import config as config_lib
from vlm_jax import datasets, distributed, evaluate, generate, workdir as workdir_lib
from vlm_jax.inputs import loader
from vlm_jax.train import run as run_lib


def _banner(text: str) -> None:
  print(f"\n=== {text} ===", flush=True)


def demo_question(cfg: config_lib.Config, split: str = "test") -> tuple[list[np.ndarray], str, str]:
  """The first question of the first test record with one image: (images, question, reference answer)."""
  name = cfg.train.stages[-1].datasets[0][0]
  source = loader.data_source(name, split, cfg.data.data_dir)
  for i in range(len(source)):
    record = source[i]
    if len(record["images"]) == 1:
      question = record["turns"][0]["content"].replace("<image>", "").strip()
      return record["images"], question, record["turns"][1]["content"]
  raise ValueError(f"{name}/{split} has no single-image record.")


def run_demo(config: str, workdir: str, overrides: list[str] | tuple[str, ...] = (), *, limit: int | None = None,
             export: bool = True) -> dict:
  """Runs the whole recipe; returns the evaluation results dict (also in W/eval/results.json)."""
  cfg = config_lib.load(config, overrides)
  start = time.time()
  names = sorted({n for s in cfg.train.stages for n, _ in s.datasets})
  _banner(f"1/5 prepare data ({', '.join(names)})")
  for name in names:
    print(datasets.prepare(name, cfg.data.data_dir), flush=True)

  _banner(f"2/5 train stages: {' -> '.join(s.name for s in cfg.train.stages)}")
  if not run_lib.run(cfg, workdir):  # preempted (SIGTERM): a checkpoint is saved, re-run to resume
    raise SystemExit(distributed.PREEMPTED_EXIT_CODE)
  trained = time.time()

  _banner("3/5 evaluate (with images, and blind: grey images)")
  results = evaluate.evaluate(workdir, split="test", limit=limit)
  print(evaluate.format_table(results))
  print(f"results: {evaluate.results_path(workdir)}", flush=True)

  _banner("4/5 generate")
  images, question, reference = demo_question(cfg)
  loaded_cfg, params, tokenizer = workdir_lib.load(workdir)
  ours = generate.Generator(loaded_cfg, params, tokenizer).generate([(images, question)], max_new_tokens=16)[0]
  print(f"Q: {question}\nreference: {reference}\nvlm_jax:   {ours.text}")
  summary = {"train_s": trained - start, "total_s": None, "question": question, "answer": ours.text}

  if export:
    _banner("5/5 export to Hugging Face transformers and generate there")
    from vlm_jax.convert import export as export_lib  # pylint: disable=import-outside-toplevel
    out = f"{workdir}/hf"
    export_lib.export_workdir(workdir, out)
    text, ids = export_lib.hf_generate(out, images, question, max_new_tokens=16)
    print(f"transformers: {text}\nsame tokens as vlm_jax: {ids == ours.token_ids}")
    summary["hf_answer"], summary["hf_same_tokens"] = text, ids == ours.token_ids
  summary["total_s"] = time.time() - start
  print(f"\ndemo wall time {summary['total_s'] / 60:.1f} min (training {summary['train_s'] / 60:.1f} min)")
  print(json.dumps(summary))
  return results
