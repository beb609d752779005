"""Evaluation while training (stage.eval_every): eval/... scalars at the right steps in metrics.jsonl and
TensorBoard, equal to what vlm_jax.evaluate returns for the checkpoint of that step, from the same answers."""
import dataclasses
import pathlib

import pytest
from fixtures_data import shapes_data_dir  # noqa: F401  (fixture)
from fixtures_train import tensorboard_events

from vlm_jax import checkpoint, evaluate, generate
from vlm_jax import config as config_lib
from vlm_jax.train import metrics, run

CONFIG = str(pathlib.Path(__file__).parent / "tiny_run_config.py")


def test_eval_every_logs_what_evaluate_returns_for_that_step(shapes_data_dir, tmp_path, monkeypatch):  # noqa: F811
  """4 instruct steps, logged every 3, evaluated every 2 on 3 validation records (9 questions): records at steps 2
  (eval), 3 (log) and 4 (log + eval). Each eval's generated texts and scores equal vlm_jax.evaluate's on that
  step's checkpoint, and the two evals answered differently (the params moved)."""
  cfg = config_lib.load(CONFIG, [f"data.data_dir={shapes_data_dir}", "train.stages.instruct.log_every=3",
                                 "train.stages.instruct.eval_every=2", "train.stages.instruct.eval_limit=3",
                                 "train.stages.instruct.checkpoint_every=2"])
  cfg = dataclasses.replace(cfg, train=config_lib.TrainConfig(stages=(cfg.train.stage("instruct"),)))
  texts, generate_batch = [], generate.Generator.generate

  def recording(self, requests, **kwargs):
    results = generate_batch(self, requests, **kwargs)
    texts.extend(r.text for r in results)
    return results
  monkeypatch.setattr(generate.Generator, "generate", recording)
  assert run.run(cfg, str(tmp_path))

  records = {r["step"]: r for r in metrics.read_metrics(tmp_path, "instruct")}
  assert sorted(records) == [2, 3, 4]
  assert not any(k.startswith("eval/") for k in records[3])
  per_eval = len(texts) // 2
  assert per_eval == 2 * 9 + 3  # questions with images, blind, a caption per record
  during_training = {2: texts[:per_eval], 4: texts[per_eval:]}
  assert during_training[2] != during_training[4]
  scalars = {(e.step, v.tag): v.simple_value for e in tensorboard_events(tmp_path / "tensorboard" / "instruct")
             for v in e.summary.value}
  for step in (2, 4):  # checkpoint_every 2 and max_to_keep 2 keep both on disk
    checkpoint.mark_finished(tmp_path, "instruct", step)  # the final params that evaluate reads
    texts.clear()
    results = evaluate.evaluate(tmp_path, split="validation", limit=3, progress=False)
    assert texts == during_training[step], step
    logged = {k: v for k, v in records[step].items() if k.startswith("eval/")}
    assert logged == evaluate.as_metrics(results), step
    assert {"eval/accuracy/overall", "eval/blind_accuracy/count", "eval/caption_f1"} <= set(logged)
    assert logged["eval/questions"] == results["n"] == 9
    assert scalars[(step, "eval/accuracy/overall")] == logged["eval/accuracy/overall"]
    assert scalars[(step, "eval/questions")] == 9


def test_eval_fields_are_checked():
  with pytest.raises(config_lib.ConfigError, match="need eval_every >= 0"):
    config_lib.load(CONFIG, ["train.stages.instruct.eval_every=-1"])
  with pytest.raises(config_lib.ConfigError, match=r"eval_limit > 0 records when evaluating \(got eval_every=5, "
                                                   r"eval_limit=0\)"):
    config_lib.load(CONFIG, ["train.stages.instruct.eval_every=5", "train.stages.instruct.eval_limit=0"])
  assert config_lib.load(CONFIG, ["train.stages.instruct.eval_limit=0"]).train.stage("instruct").eval_every == 0
