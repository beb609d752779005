"""`vlm-jax demo` itself at a tiny size: prepare, train both stages, evaluate, generate, export to transformers.

The config is tests/tiny_run_config.py (a 1-layer decoder on shapes_vqa/tiny); align runs 0 steps (its stage is
finished at the fresh init, one train-step compile fewer) and instruct 30, enough to answer some questions."""
import collections
import json
import pathlib

import numpy as np
import PIL.Image
from fixtures_data import shapes_data_dir  # noqa: F401  (fixture)

from vlm_jax import checkpoint, cli, demo, evaluate
from vlm_jax import config as config_lib
from vlm_jax.convert import export
from vlm_jax.train import metrics

TINY_RUN_CONFIG = str(pathlib.Path(__file__).parent / "tiny_run_config.py")
STEPS = 30
LIMIT = 4  # test records evaluated


def test_demo_from_prepare_to_export(shapes_data_dir, tmp_path, capsys):  # noqa: F811
  workdir = tmp_path / "demo"
  overrides = [f"data.data_dir={shapes_data_dir}", "train.stages.align.steps=0",
               f"train.stages.instruct.steps={STEPS}", "train.stages.instruct.checkpoint_every=100"]
  assert cli.main(["demo", "--config", TINY_RUN_CONFIG, "--workdir", str(workdir), "--limit", str(LIMIT),
                   "--set", *overrides]) == 0
  out = capsys.readouterr().out
  assert "shapes_vqa/tiny 1.1.0 at" in out  # the prepare step's report
  summary = json.loads(out.strip().splitlines()[-1])

  # Training: both stages finished; instruct logged every step and its loss fell.
  assert checkpoint.finished_step(workdir, "align") == 0 and checkpoint.finished_step(workdir, "instruct") == STEPS
  records = metrics.read_metrics(workdir, "instruct")
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]]) - 1.0

  # Evaluation: results.json agrees with the answers in predictions.jsonl (shapes_vqa scores by exact match).
  results = json.loads(evaluate.results_path(workdir).read_text())
  lines = [json.loads(line) for line in evaluate.predictions_path(workdir).read_text().splitlines()]
  questions = [p for p in lines if p["type"] != "caption"]
  assert set(results) == {"accuracy", "blind_accuracy", "caption_f1", "n"}
  assert results["n"] == len(questions) > LIMIT and len(lines) - len(questions) == LIMIT  # one caption per record
  types = collections.Counter(p["type"] for p in questions)
  for kind, answer in (("accuracy", "answer"), ("blind_accuracy", "blind_answer")):
    assert set(results[kind]) == set(types) | {"overall"}
    correct = collections.Counter(p["type"] for p in questions if evaluate.exact_match(p[answer], p["reference"]))
    for t, n in types.items():
      assert results[kind][t] == correct[t] / n, (kind, t)
    assert results[kind]["overall"] == sum(correct.values()) / len(questions)
  assert 0.0 < results["accuracy"]["overall"] < 1.0 and 0.0 <= results["caption_f1"] <= 1.0

  # Generation: `vlm-jax generate` on the demo's question gives the demo's answer, and the exported transformers
  # model generates the same tokens greedily.
  cfg = config_lib.load(TINY_RUN_CONFIG, overrides)
  images, question, _ = demo.demo_question(cfg)
  image_path = tmp_path / "question.png"
  PIL.Image.fromarray(images[0]).save(image_path)
  assert cli.main(["generate", "--workdir", str(workdir), "--image", str(image_path), "--prompt", question,
                   "--max-new-tokens", "16", "--json"]) == 0
  ours = json.loads(capsys.readouterr().out)
  assert ours["text"] == summary["answer"] == summary["hf_answer"] and len(ours["token_ids"]) > 0
  hf_text, hf_ids = export.hf_generate(workdir / "hf", images, question, max_new_tokens=16)
  assert hf_ids == ours["token_ids"] and hf_text == ours["text"] and summary["hf_same_tokens"] is True
