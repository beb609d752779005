"""`vlm-jax generate` and `vlm-jax eval` on a workdir built in the test: same output as the Python API."""
import json

import numpy as np
import pytest
from fixtures_data import SHAPES_TINY, shapes_data_dir  # noqa: F401  (pytest fixture)
from fixtures_workdir import make_workdir, tiny_config
from PIL import Image

from vlm_jax import cli, datasets, evaluate, workdir
from vlm_jax.generate import Generator
from vlm_jax.inputs.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def trained(shapes_data_dir, tmp_path_factory):
  """A workdir with both stages finished (random params) and two image files."""
  root = tmp_path_factory.mktemp("cli")
  tok = Tokenizer.load(datasets.get_builder(SHAPES_TINY, shapes_data_dir).data_path / "tokenizer")
  make_workdir(root / "w", tiny_config(512, shapes_data_dir, SHAPES_TINY), tok, finished=("align", "instruct"))
  rng = np.random.RandomState(0)
  images = [rng.randint(0, 256, (20, 30, 3)).astype(np.uint8), rng.randint(0, 256, (48, 64, 3)).astype(np.uint8)]
  paths = []
  for i, im in enumerate(images):
    paths.append(str(root / f"{i}.png"))
    Image.fromarray(im).save(paths[-1])
  return str(root / "w"), paths, images


def _run(capsys, argv):
  assert cli.main(argv) == 0
  return capsys.readouterr().out


def test_generate_json_equals_the_python_api(trained, capsys):
  w, paths, images = trained
  generator = Generator(*workdir.load(w))
  prompt = "<image>\nWhat colour is the circle?"
  want = generator.generate([(images[:1], prompt)], max_new_tokens=6)[0]
  out = json.loads(_run(capsys, ["generate", "--workdir", w, "--image", paths[0], "--prompt", prompt,
                                 "--max-new-tokens", "6", "--json"]))
  assert out == {"text": want.text, "token_ids": want.token_ids} and len(want.token_ids) > 0
  assert _run(capsys, ["generate", "--workdir", w, "--image", paths[0], "--prompt", prompt,
                       "--max-new-tokens", "6"]) == want.text + "\n"

  # Two images, sampling flags, a named stage, and --raw all reach the API.
  align = Generator(*workdir.load(w, "align"))
  sampled = align.generate([(images, "Is there a red star?")], max_new_tokens=5, temperature=1.5, top_k=20,
                           top_p=0.9, seed=3)[0]
  out = json.loads(_run(capsys, ["generate", "--workdir", w, "--stage", "align", "--image", paths[0], "--image",
                                 paths[1], "--prompt", "Is there a red star?", "--max-new-tokens", "5",
                                 "--temperature", "1.5", "--top-k", "20", "--top-p", "0.9", "--seed", "3",
                                 "--json"]))
  assert out["token_ids"] == sampled.token_ids
  assert sampled.token_ids != align.generate([(images, "Is there a red star?")], max_new_tokens=5)[0].token_ids
  raw = generator.generate([(images[:1], "<image> a")], max_new_tokens=4, raw=True)[0]
  out = json.loads(_run(capsys, ["generate", "--workdir", w, "--image", paths[0], "--prompt", "<image> a",
                                 "--raw", "--max-new-tokens", "4", "--json"]))
  assert out["token_ids"] == raw.token_ids


def test_eval_prints_the_table_and_the_results_path(trained, capsys):
  w, _, _ = trained
  out = _run(capsys, ["eval", "--workdir", w, "--limit", "3", "--batch-size", "4"])
  results = json.loads(evaluate.results_path(w).read_text())
  assert out == (evaluate.format_table(results) + f"\nresults: {evaluate.results_path(w)}\n"
                 f"answers: {evaluate.predictions_path(w)}\n")
  # The API on the same 3 records gives the same scores and the same answers.
  cfg, params, tok = workdir.load(w)
  want, predictions = evaluate.score(Generator(cfg, params, tok), evaluate.eval_records(cfg, limit=3),
                                     batch_size=4, progress=False)
  assert results == want and results["n"] == 9
  lines = evaluate.predictions_path(w).read_text().splitlines()
  assert [json.loads(line) for line in lines] == predictions


def test_bad_input_is_one_line_saying_what_and_where(trained, tmp_path, capsys, monkeypatch):
  w, paths, _ = trained
  missing = str(tmp_path / "nope.png")
  not_image = tmp_path / "notes.png"
  not_image.write_text("not an image")

  def fails(argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith(f"({cli.TRACEBACK_ENV}=1 shows where it was raised)\n")
    return err.splitlines()[0]
  # The image is read before the workdir: a bad path fails at once, even with a missing workdir.
  assert fails(["generate", "--workdir", str(tmp_path / "none"), "--image", missing, "--prompt", "Hi"]) == (
      f"vlm-jax generate: FileNotFoundError: [Errno 2] No such file or directory: '{missing}'")
  assert fails(["generate", "--workdir", w, "--image", str(not_image), "--prompt", "Hi"]) == (
      f"vlm-jax generate: InputError: {not_image} is not an image PIL can read (PNG, JPEG, ...).")
  assert fails(["generate", "--workdir", w, "--prompt", "<image> What colour?"]) == (
      "vlm-jax generate: InputError: The prompt holds 1 <image> mark(s) for 0 image(s): give one image per mark, "
      "in order, or no marks (the images then go first).")
  assert fails(["generate", "--workdir", w, "--image", paths[0], "--prompt", "a", "--raw"]) == (
      "vlm-jax generate: InputError: The prompt holds 0 <image> mark(s) for 1 image(s): a raw prompt needs one "
      "mark per image, in order.")
  assert fails(["eval", "--workdir", str(tmp_path / "none")]).startswith(
      f"vlm-jax eval: FileNotFoundError: {tmp_path / 'none'}")
  monkeypatch.chdir(tmp_path)
  assert fails(["eval", "--workdir", w, "--data-dir", "elsewhere"]) == (
      f"vlm-jax eval: FileNotFoundError: Dataset '{SHAPES_TINY}' is not prepared under elsewhere "
      f"({tmp_path}/elsewhere: a relative data_dir is read from the current directory): run `vlm-jax data "
      f"prepare {SHAPES_TINY} --data-dir elsewhere` first, or point to where it is (eval: --data-dir; train: --set "
      f"data.data_dir=...).")
  monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
  with pytest.raises(FileNotFoundError):
    cli.main(["generate", "--workdir", w, "--image", missing, "--prompt", "Hi"])
