"""A damaged input file (truncated JSON, tokenizer, config.json, image, parquet) ends each command in the CLI's
one-line bad-input error, exit 2, naming the file and where in it reading stopped."""
import io

import numpy as np
import PIL.Image
import pytest

from vlm_jax import cli
from vlm_jax.inputs.tokenizer import train_sentencepiece
from tests.fixtures_tokenizer import bpe_tokenizer


@pytest.fixture(autouse=True)
def _no_traceback(monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)


def _fails(capsys, argv: list[str], command: str) -> str:
  """Runs the CLI; asserts exit 2 and the one-line error; returns that line."""
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  first, hint = err.rstrip("\n").split("\n")[-2:]
  first = first.split("\r")[-1]  # after TFDS's progress bars, which end in a carriage return
  assert first.startswith(f"vlm-jax {command}: InputError: ")
  assert hint == f"({cli.TRACEBACK_ENV}=1 shows where it was raised)"
  return first


# '[' newline, then a record cut off after the colon: json reports line 2, column 31 (the end).
TRUNCATED_LLAVA = '[\n {"id": "a", "conversations": '


def test_truncated_llava_json(tmp_path, capsys):
  path = tmp_path / "llava.json"
  path.write_text(TRUNCATED_LLAVA)
  line = _fails(capsys, ["data", "prepare", "llava_json", "--json", str(path), "--data-dir", str(tmp_path / "d")],
                "data prepare")
  assert f"{path}: this LLaVA JSON file is not valid JSON at line 2, column 31: Expecting value (the text ends " \
         "there: is the file truncated?); repair or export the file again" in line


def test_llava_json_that_is_not_a_list(tmp_path, capsys):
  path = tmp_path / "llava.json"
  path.write_text('{"id": "a"}')
  line = _fails(capsys, ["data", "prepare", "llava_json", "--json", str(path), "--data-dir", str(tmp_path / "d")],
                "data prepare")
  assert f"{path}: expected a JSON list of records" in line and "got a dict" in line


def test_truncated_hf_tokenizer_json(tmp_path, capsys):
  text = bpe_tokenizer(["a cat sat on a mat"] * 4, vocab_size=280).to_str()
  path = tmp_path / "tokenizer.json"
  path.write_text(text[:100])  # one line: serde reports the column of the last character
  line = _fails(capsys, ["data", "show", "--config", "shapes_tiny", "--set", f"data.tokenizer.path={path}",
                         "data.tokenizer.kind=hf"], "data show")
  assert f"{path}: cannot read this HF tokenizer.json (Exception: EOF while parsing" in line
  assert "at line 1 column 100)" in line and "copy or save the tokenizer again" in line


def test_truncated_sentencepiece_model(tmp_path, capsys):
  proto = train_sentencepiece([f"shape {i} is red and blue, {i * 7} is green" for i in range(300)], vocab_size=400)
  assert proto.kind == "sentencepiece"
  good = tmp_path / "good" / "tokenizer.model"
  proto.save(good.parent)
  data = good.read_bytes()
  path = tmp_path / "cut" / "tokenizer.model"
  path.parent.mkdir()
  path.write_bytes(data[:len(data) // 2])
  line = _fails(capsys, ["data", "show", "--config", "shapes_tiny", "--set", f"data.tokenizer.path={path}"],
                "data show")
  assert f"{path}: cannot read this sentencepiece model of {len(data) // 2} bytes (RuntimeError: " in line


def test_truncated_hf_config_json(tmp_path, capsys):
  (tmp_path / "config.json").write_text('{\n  "model_type": "llava",\n  "text_config": {\n')
  line = _fails(capsys, ["import-hf", "--hf-dir", str(tmp_path), "--workdir", str(tmp_path / "w")], "import-hf")
  assert f"{tmp_path / 'config.json'}: this HF config.json is not valid JSON at line 4, column 1: Expecting " \
         "property name enclosed in double quotes (the text ends there: is the file truncated?)" in line


def test_workdir_config_json_with_bad_bytes(tmp_path, capsys):
  (tmp_path / "config.json").write_bytes(b'{"model": {"name": "caf\xe9"}}')  # latin-1, not UTF-8
  line = _fails(capsys, ["generate", "--workdir", str(tmp_path), "--prompt", "hi"], "generate")
  assert f"{tmp_path / 'config.json'}: this workdir config is not UTF-8 text at byte 23 of 27 (invalid " \
         "continuation byte)" in line


def test_truncated_workdir_config_json(tmp_path, capsys):
  (tmp_path / "config.json").write_text('{"model": {"vision": {"kind": "sig')
  line = _fails(capsys, ["generate", "--workdir", str(tmp_path), "--prompt", "hi"], "generate")
  assert f"{tmp_path / 'config.json'}: this workdir config is not valid JSON at line 1, column 31: Unterminated " \
         "string starting at" in line


@pytest.mark.parametrize("fmt, why", [("PNG", "image file is truncated"), ("JPEG", "Truncated File Read")])
def test_truncated_image(tmp_path, capsys, fmt, why):
  out = io.BytesIO()
  PIL.Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(out, fmt)
  data = out.getvalue()[:out.tell() // 2]
  path = tmp_path / f"cut.{fmt.lower()}"
  path.write_bytes(data)
  # The image is read before the workdir: no workdir is needed to see the error.
  line = _fails(capsys, ["generate", "--workdir", str(tmp_path / "none"), "--image", str(path), "--prompt", "hi"],
                "generate")
  assert f"{path}: cannot read this image of {len(data)} bytes (OSError: {why}" in line
  assert "give a complete image file" in line


def test_truncated_parquet(tmp_path, capsys):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  path = tmp_path / "data" / "train-00000-of-00001.parquet"
  path.parent.mkdir()
  pq.write_table(pa.table({"question": ["what colour?"] * 20, "answer": ["red"] * 20}), path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])  # the footer (schema, row groups) is at the end: gone
  line = _fails(capsys, ["data", "prepare", "hf_parquet", "--data-dir", str(tmp_path / "d"), "--parquet", str(path),
                         "--format", "vqa"], "data prepare")
  assert f"{path}: cannot read this parquet file (ArrowInvalid: Parquet magic bytes not found in footer." in line


def test_truncated_safetensors(tmp_path, capsys):
  from tests.fixtures_convert import build_llava  # pylint: disable=import-outside-toplevel  (imports torch)
  hf_dir = tmp_path / "llava"
  build_llava("clip", 64).save_pretrained(hf_dir)
  weights = hf_dir / "model.safetensors"
  size = weights.stat().st_size
  weights.write_bytes(weights.read_bytes()[:size // 2])
  line = _fails(capsys, ["import-hf", "--hf-dir", str(hf_dir), "--workdir", str(tmp_path / "w")], "import-hf")
  assert line.endswith(f"{weights}: cannot read this safetensors file (SafetensorError: Error while deserializing "
                       "header: incomplete metadata, file not fully covered); download or save the model again: the "
                       "file is damaged or truncated."), line
