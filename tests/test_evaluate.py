"""Scoring: normalization, exact match per type, caption token F1, the printed table; the evaluation loop."""
import json

import numpy as np
from fixtures_data import SHAPES_TINY, shapes_data_dir  # noqa: F401  (pytest fixture)
from fixtures_workdir import make_workdir, tiny_config
from PIL import Image

from vlm_jax import datasets, evaluate
from vlm_jax import workdir as workdir_lib
from vlm_jax.config import to_dict
from vlm_jax.generate import Generator, Result
from vlm_jax.inputs import loader
from vlm_jax.inputs.tokenizer import Tokenizer


def test_normalize_and_exact_match():
  assert evaluate.normalize_answer("  The Red, circle! ") == "red circle"
  assert evaluate.exact_match("Yes.", "yes")
  assert not evaluate.exact_match("yes no", "yes")
  assert evaluate.exact_match("a square", "square")


def test_token_f1():
  assert evaluate.token_f1("a red circle on the left", "a red circle on the left") == 1.0
  # pred {red, circle, on, right} vs ref {red, circle, on, left}: 3 common, p = r = 3/4
  assert abs(evaluate.token_f1("red circle on the right", "red circle on the left") - 0.75) < 1e-12
  assert evaluate.token_f1("blue", "red") == 0.0
  assert evaluate.token_f1("", "") == 1.0


def test_accuracy_by_type():
  acc = evaluate.accuracy_by_type(["colour", "colour", "count", "shape"], [True, False, True, True])
  assert acc == {"colour": 0.5, "count": 1.0, "shape": 1.0, "overall": 0.75}


def test_table_and_results_file(tmp_path):
  results = {"accuracy": {"colour": 0.9, "overall": 0.8}, "blind_accuracy": {"colour": 0.25, "overall": 0.3},
             "caption_f1": 0.5, "n": 10}
  table = evaluate.format_table(results)
  assert table.splitlines()[1] == "colour         0.900   0.250  +0.650"
  assert table.splitlines()[2] == "overall        0.800   0.300  +0.500"
  path = evaluate.write_results(tmp_path, results)
  assert json.loads(path.read_text()) == results


def test_grid_png(tmp_path):
  img = np.zeros((48, 64, 3), np.uint8)
  img[:, :32] = 255
  evaluate.save_grid(tmp_path / "g.png", [img] * 5, ["q? a"] * 5, cols=4, cell=100)
  out = Image.open(tmp_path / "g.png")
  assert out.size == (400, 2 * (100 + 64))
  assert out.getpixel((10, 10)) == (255, 255, 255) and out.getpixel((60, 10)) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------------
# The evaluation loop: stub generators over the tiny prepared shapes_vqa, then a tiny random model.


def _tokenizer(data_dir):
  return Tokenizer.load(datasets.get_builder(SHAPES_TINY, data_dir).data_path / "tokenizer")


def _records(data_dir, n=None):
  source = loader.data_source(SHAPES_TINY, "test", data_dir)
  return [source[i] for i in range(len(source) if n is None else n)]


def _key(images, prompt):
  return prompt, tuple(np.asarray(im).tobytes() for im in images)


class Stub:
  """Records every request; answers from a table (oracle) or a constant."""

  def __init__(self, table=None, constant=""):
    self.table, self.constant, self.calls = table or {}, constant, []

  def generate(self, requests, *, max_new_tokens):
    self.calls.append((list(requests), max_new_tokens))
    return [Result(self.table.get(_key(*r), self.constant), []) for r in requests]


def _oracle(records):
  table = {_key(q.images, q.prompt): q.answer for q in evaluate.questions(records)}
  table.update({_key(r["images"], "\n".join(["<image>"] * len(r["images"]))): r["caption"] for r in records})
  return Stub(table)


def test_questions_are_standalone_user_turns(shapes_data_dir):
  records = _records(shapes_data_dir)
  qs = evaluate.questions(records)
  assert len(qs) == sum(len(r["question_types"]) for r in records) == 3 * len(records)
  two = next(r for r in records if len(r["images"]) == 2)
  q = [q for q in qs if q.record_id == two["id"]]
  assert [x.type for x in q] == two["question_types"]
  assert [x.answer for x in q] == [t["content"] for t in two["turns"] if t["role"] == "assistant"]
  assert q[0].prompt == two["turns"][0]["content"]  # the first turn already has this shape
  assert q[1].prompt == "<image>\n<image>\n" + two["turns"][2]["content"]
  assert all(x.images is not two["images"] and len(x.images) == 2 for x in q)


def test_oracle_scores_one_and_constant_yes_scores_the_yes_fraction(shapes_data_dir):
  records = _records(shapes_data_dir)
  qs = evaluate.questions(records)
  types = sorted({q.type for q in qs})
  assert {"presence", "count", "colour"} <= set(types)
  results, predictions = evaluate.score(_oracle(records), records, batch_size=7, progress=False)
  assert results["accuracy"] == {**{t: 1.0 for t in types}, "overall": 1.0}
  assert results["blind_accuracy"]["overall"] == 0.0  # the oracle knows only the real pixels
  assert results["caption_f1"] == 1.0 and results["n"] == len(qs) == 96
  captioned = [r for r in records if r["images"] and r["caption"]]
  assert len(predictions) == len(qs) + len(captioned)
  for p, q in zip(predictions, qs):
    assert p == {"id": q.record_id, "type": q.type, "question": q.text, "reference": q.answer, "answer": q.answer,
                 "blind_answer": p["blind_answer"]} and p["blind_answer"] != q.answer
  assert [(p["id"], p["type"], p["answer"]) for p in predictions[len(qs):]] == [
      (r["id"], "caption", r["caption"]) for r in captioned]
  samples = evaluate.grid_samples(records, predictions)
  assert len(samples) == evaluate.GRID_SAMPLES
  assert samples[0][1] == f"got {qs[0].answer} | ref {qs[0].answer} | {qs[0].text}"

  results, predictions = evaluate.score(Stub(constant="Yes."), records, batch_size=16, progress=False)
  assert evaluate.grid_samples(records, predictions)[0][1] == f"got Yes. | ref {qs[0].answer} | {qs[0].text}"
  presence = [q.answer for q in qs if q.type == "presence"]
  assert results["accuracy"]["presence"] == presence.count("yes") / len(presence)
  assert 0 < results["accuracy"]["presence"] < 1
  assert results["accuracy"]["overall"] == [q.answer for q in qs].count("yes") / len(qs)
  assert results["accuracy"]["count"] == 0.0 and results["blind_accuracy"] == results["accuracy"]


def test_blind_pass_feeds_grey_images_of_the_same_sizes(shapes_data_dir):
  records = _records(shapes_data_dir, 10)
  stub = Stub()
  results = evaluate.score(stub, records, batch_size=8, progress=False)[0]
  qs = evaluate.questions(records)
  assert results["n"] == len(qs) == 30
  asked = [(r, n) for requests, n in stub.calls for r in requests]
  assert max(len(requests) for requests, _ in stub.calls) == 8
  assert len(asked) == 2 * 30 + 10
  seeing, grey, captions = asked[:30], asked[30:60], asked[60:]
  for q, (real, n), (blind, m) in zip(qs, seeing, grey):
    assert real[1] == blind[1] == q.prompt and n == m == evaluate.ANSWER_TOKENS
    for im, r, b in zip(q.images, real[0], blind[0]):
      np.testing.assert_array_equal(r, im)
      assert b.shape == im.shape and b.dtype == np.uint8 and (b == 128).all()
  for record, ((ims, prompt), n) in zip(records, captions):
    # the caption task's user turn: one <image> per image, as the caption describes them all
    assert prompt == "\n".join(["<image>"] * len(record["images"])) and n == evaluate.CAPTION_TOKENS
    assert len(ims) == len(record["images"])
    for im, expected in zip(ims, record["images"]):
      np.testing.assert_array_equal(im, expected)
  assert {len(ims) for (ims, _), _ in captions} == {1, 2}


def test_evaluate_writes_results_and_grid(shapes_data_dir, tmp_path):
  config = tiny_config(512, shapes_data_dir, SHAPES_TINY)
  (tmp_path / "config.json").write_text(json.dumps(to_dict(config)))
  records = _records(shapes_data_dir, 5)
  results = evaluate.evaluate(tmp_path, limit=5, batch_size=4, generator=_oracle(records), progress=False)
  saved = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert saved == results
  assert set(saved) == {"accuracy", "blind_accuracy", "caption_f1", "n"}
  assert saved["n"] == 15 and saved["accuracy"]["overall"] == 1.0
  grid = Image.open(tmp_path / "eval" / "samples.png")
  assert grid.size == (4 * 160, 2 * (160 + 64))  # 8 samples, 4 columns


def test_evaluate_end_to_end_on_a_tiny_random_model(shapes_data_dir, tmp_path):
  config = tiny_config(512, shapes_data_dir, SHAPES_TINY)
  make_workdir(tmp_path, config, _tokenizer(shapes_data_dir), finished=("align", "instruct"))
  results = evaluate.evaluate(tmp_path, limit=4, batch_size=8, progress=False)
  records = _records(shapes_data_dir, 4)
  qs = evaluate.questions(records)
  assert results["n"] == len(qs) == 12
  types = sorted({q.type for q in qs})
  assert list(results["accuracy"]) == list(results["blind_accuracy"]) == types + ["overall"]
  # The same answers, token for token, straight from the Python API on the last finished stage's params.
  generator = Generator(*workdir_lib.load(tmp_path, "instruct"))

  def ask(requests, tokens):
    return [r.text for r in generator.generate(requests, max_new_tokens=tokens)]
  answers = ask([(q.images, q.prompt) for q in qs], evaluate.ANSWER_TOKENS)
  blind = ask([(evaluate.blind(q.images), q.prompt) for q in qs], evaluate.ANSWER_TOKENS)
  captioned = [r for r in records if r["images"] and r["caption"]]
  captions = ask([(r["images"], "\n".join(["<image>"] * len(r["images"]))) for r in captioned],
                 evaluate.CAPTION_TOKENS)
  lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
  predictions = [json.loads(line) for line in lines]
  assert [p["answer"] for p in predictions] == answers + captions
  assert [p.get("blind_answer") for p in predictions[:len(qs)]] == blind
  assert any(answers) and any(captions)  # the random model says something, so the comparison has content
  types = [q.type for q in qs]
  assert results["accuracy"] == evaluate.accuracy_by_type(
      types, [evaluate.exact_match(a, q.answer) for a, q in zip(answers, qs)])
  assert results["blind_accuracy"] == evaluate.accuracy_by_type(
      types, [evaluate.exact_match(a, q.answer) for a, q in zip(blind, qs)])
  assert results["caption_f1"] == np.mean([evaluate.token_f1(c, r["caption"]) for c, r in zip(captions, captioned)])
  assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results
  grid = Image.open(tmp_path / "eval" / "samples.png")
  assert grid.size == (4 * 160, 2 * (160 + 64))  # 8 of the 12 questions, 4 columns
