"""Scoring: normalization, exact match per type, caption token F1, the printed table."""
import json

import numpy as np
from PIL import Image

from vlm_jax import evaluate


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
