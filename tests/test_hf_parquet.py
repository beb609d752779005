"""hf_parquet: tiny Hub-layout parquet files (TRL, the_cauldron, a VQA table) written with pyarrow, images as
the HF Image feature stores them ({bytes, path}); records read back exactly, bad records counted by reason,
shards read one row group at a time."""
import dataclasses
import io
import json

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from fixtures_data import SHAPES_TINY, shapes_data_dir  # noqa: F401  (pytest fixture)
from fixtures_workdir import make_workdir, tiny_config

from vlm_jax import cli, datasets, evaluate, metrics
from vlm_jax import workdir as workdir_lib
from vlm_jax.config import InputError
from vlm_jax.datasets.hf_parquet import COUNTS_FILE, hf_parquet, rows
from vlm_jax.generate import Generator
from vlm_jax.inputs import loader, show
from vlm_jax.inputs.tokenizer import Tokenizer

tfds.disable_progress_bar()

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PART = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])
MESSAGES = pa.list_(pa.struct([("content", pa.list_(PART)), ("role", pa.string())]))
TEXTS = pa.list_(pa.struct([("assistant", pa.string()), ("source", pa.string()), ("user", pa.string())]))


def _png(seed, shape=(6, 8, 3)):
  pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  out = io.BytesIO()
  PIL.Image.fromarray(pixels).save(out, format="PNG")
  return pixels, {"bytes": out.getvalue(), "path": f"{seed}.png"}


def _jpeg(seed):
  out = io.BytesIO()
  PIL.Image.fromarray(np.full((8, 8, 3), seed, np.uint8)).save(out, format="JPEG")
  data = out.getvalue()
  return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB")), {"bytes": data, "path": None}


BROKEN = {"bytes": b"\x89PNG\r\n\x1a\n not really", "path": "broken.png"}
PATH_ONLY = {"bytes": None, "path": "elsewhere/photo.jpg"}


def _msg(role, *parts):
  content = [{"index": 0, "text": None, "type": "image"} if p is None else {"index": None, "text": p, "type": "text"}
             for p in parts]
  return {"role": role, "content": content}


def _write(path, table, row_group_size=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("hub")
  px = {i: _png(i) for i in range(4)}
  jpeg = _jpeg(90)
  trl = [  # (messages, images)
      ([_msg("user", None, "What is it?"), _msg("assistant", "A cat.")], [px[0][1]]),
      ([_msg("system", "Be brief."), _msg("user", None, None, "Same?"), _msg("assistant", "no"),
        _msg("user", "Sure?"), _msg("assistant", "yes")], [px[1][1], jpeg[1]]),
      ([_msg("user", "Hi"), _msg("assistant", "Hello")], []),
      ([_msg("user", None, "Broken?"), _msg("assistant", "x")], [BROKEN]),
      ([_msg("user", None, "Two?"), _msg("assistant", "x")], [px[2][1], px[3][1]]),
      ([_msg("user", None, "Empty answer"), _msg("assistant", "")], [px[2][1]]),
      ([_msg("user", "Hi"), _msg("bot", "Hello")], []),
      ([_msg("user", "Anyone?")], []),
      ([_msg("user", None, "Where?"), _msg("assistant", "x")], [PATH_ONLY]),
      ([_msg("user", None, "Last?"), _msg("assistant", "ok")], [px[3][1]]),
  ]
  table = pa.table({"messages": pa.array([m for m, _ in trl], MESSAGES),
                    "images": pa.array([i for _, i in trl], pa.list_(IMAGE))})
  # Two shards of train in the Hub's names, and a test shard.
  _write(root / "llava-mix" / "data" / "train-00000-of-00002.parquet", table.slice(0, 5))
  _write(root / "llava-mix" / "data" / "train-00001-of-00002.parquet", table.slice(5))
  _write(root / "llava-mix" / "data" / "test-00000-of-00001.parquet", table.slice(2, 1))

  cauldron = [  # (images, texts)
      ([px[0][1]], [{"user": "Colour?", "assistant": "Red.", "source": "vqav2"},
                    {"user": "Shape?", "assistant": "Round.", "source": "vqav2"}]),
      ([], [{"user": "2+2?", "assistant": "4", "source": None}]),
      ([px[1][1]], [{"user": "What?", "assistant": "  ", "source": "ai2d"}]),
      ([BROKEN], [{"user": "What?", "assistant": "x", "source": "ai2d"}]),
      ([px[1][1]], [{"user": "<image><image>Both?", "assistant": "x", "source": "ai2d"}]),
  ]
  _write(root / "the_cauldron" / "vqav2" / "train-00000-of-00001.parquet",
         pa.table({"images": pa.array([i for i, _ in cauldron], pa.list_(IMAGE)),
                   "texts": pa.array([t for _, t in cauldron], TEXTS)}))

  # A second subset, as the_cauldron's download lays them out side by side (same file name).
  _write(root / "the_cauldron" / "ai2d" / "train-00000-of-00001.parquet",
         pa.table({"images": pa.array([[px[2][1]]], pa.list_(IMAGE)),
                   "texts": pa.array([[{"user": "Which?", "assistant": "B", "source": "ai2d"}]], TEXTS)}))

  answers = ["2"] * 3 + ["3"] * 7
  vqa = {"img": pa.array([px[0][1], px[1][1], None, BROKEN], IMAGE),
         "q": ["How many?", "What colour?", "Text only?", "Broken?"],
         "answers": [answers, ["red"] * 10, ["no"], ["x"]],
         "question_id": pa.array([101, 102, 103, 104], pa.int64()),
         "kind": ["number", "other", "yes/no", "other"]}
  _write(root / "vqa" / "data" / "validation-00000-of-00001.parquet", pa.table(vqa))
  return root, px, jpeg


@pytest.fixture(scope="module")
def prepared(files, tmp_path_factory):
  root, _, _ = files
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  reports = {
      "trl": datasets.prepare("hf_parquet", data_dir, parquet=f"{root}/llava-mix/data/*.parquet", format="trl"),
      "cauldron": datasets.prepare("hf_parquet/cauldron", data_dir, format="cauldron",
                                   parquet=f"{root}/the_cauldron/vqav2/train-*.parquet", source="fallback"),
  }
  # The command line, as a user types it (`answer=` turns the answer column off: answers only).
  assert cli.main(["data", "prepare", "hf_parquet/vqa", "--data-dir", data_dir, "--parquet",
                   f"{root}/vqa/data/*.parquet", "--format", "vqa", "--set", "image=img", "question=q", "answer=",
                   "question_type=kind", "source=vqav2"]) == 0
  return data_dir, reports


def _records(data_dir, name, split="train"):
  """The split's records by id (TFDS stores them shuffled)."""
  source = loader.data_source(name, split, data_dir)
  return sorted((source[i] for i in range(len(source))), key=lambda r: r["id"])


def _turns(*pairs):
  return [{"role": r, "content": c} for r, c in pairs]


def test_trl_records_read_back_exactly(prepared, files):
  data_dir, reports = prepared
  _, px, jpeg = files
  assert "hf_parquet/llava_mix 1.0.0" in reports["trl"] and "test=1, train=4" in reports["trl"]
  records = _records(data_dir, "hf_parquet/llava_mix")
  assert [r["id"] for r in records] == ["data/train-00000-of-00002:0", "data/train-00000-of-00002:1",
                                        "data/train-00000-of-00002:2", "data/train-00001-of-00002:4"]
  one, two, text, last = records
  assert one["turns"] == _turns(("user", "<image>\nWhat is it?"), ("assistant", "A cat."))
  np.testing.assert_array_equal(one["images"][0], px[0][0])
  assert two["turns"] == _turns(("system", "Be brief."), ("user", "<image>\n<image>\nSame?"), ("assistant", "no"),
                                ("user", "Sure?"), ("assistant", "yes"))
  np.testing.assert_array_equal(two["images"][0], px[1][0])
  np.testing.assert_array_equal(two["images"][1], jpeg[0])  # the JPEG's own bytes, decoded
  assert two["question_types"] == ["", ""] and two["source"] == "" and two["references"] == []
  assert text["images"] == [] and text["turns"] == _turns(("user", "Hi"), ("assistant", "Hello"))
  np.testing.assert_array_equal(last["images"][0], px[3][0])
  assert [r["id"] for r in _records(data_dir, "hf_parquet/llava_mix", "test")] == ["data/test-00000-of-00001:0"]


def test_bad_records_are_counted_by_reason(prepared):
  data_dir, _ = prepared
  builder = datasets.get_builder("hf_parquet/llava_mix", data_dir)
  expected = {
      "test": {"kept": 1, "skipped": {}, "repaired": {}},
      "train": {"kept": 4, "skipped": {"empty_turn": 1, "image_count_mismatch": 1, "image_missing": 1,
                                       "image_unreadable": 1, "no_assistant_turn": 1, "unknown_role": 1},
                "repaired": {}},
  }
  assert builder.info.metadata["record_counts"] == expected
  assert json.loads((builder.data_path / COUNTS_FILE).read_text()) == expected
  cauldron = datasets.get_builder("hf_parquet/cauldron", data_dir).info.metadata["record_counts"]
  assert cauldron == {"train": {"kept": 2, "skipped": {"empty_turn": 1, "image_count_mismatch": 1,
                                                       "image_unreadable": 1}, "repaired": {}}}
  vqa = datasets.get_builder("hf_parquet/vqa", data_dir).info.metadata["record_counts"]
  assert vqa == {"validation": {"kept": 3, "skipped": {"image_unreadable": 1}, "repaired": {}}}


def test_cauldron_and_vqa_records(prepared, files):
  data_dir, _ = prepared
  _, px, _ = files
  first, text_only = _records(data_dir, "hf_parquet/cauldron")
  assert first["turns"] == _turns(("user", "<image>\nColour?"), ("assistant", "Red."), ("user", "Shape?"),
                                  ("assistant", "Round."))
  np.testing.assert_array_equal(first["images"][0], px[0][0])
  assert first["source"] == "vqav2" and first["references"] == [] and first["question_types"] == ["", ""]
  assert text_only["images"] == [] and text_only["source"] == "fallback"  # the texts name none
  assert text_only["turns"] == _turns(("user", "2+2?"), ("assistant", "4"))

  many, red, text = _records(data_dir, "hf_parquet/vqa", "validation")
  assert [r["id"] for r in (many, red, text)] == ["101", "102", "103"]  # the question_id column
  assert many["turns"] == _turns(("user", "<image>\nHow many?"), ("assistant", "3"))  # the most common answer
  assert many["references"] == [["2"] * 3 + ["3"] * 7] and many["source"] == "vqav2"
  assert many["question_types"] == ["number"]
  np.testing.assert_array_equal(red["images"][0], px[1][0])
  assert text["images"] == [] and text["turns"] == _turns(("user", "Text only?"), ("assistant", "no"))


def test_vqa_answers_as_structs_and_trl_joins():
  row = {"question": "Colour?", "answers": [{"answer": "red", "answer_id": 1}, {"answer": "blue", "answer_id": 2},
                                            {"answer": "blue", "answer_id": 3}], "answer": None}
  turns, references = rows.vqa_turns(row, rows.Columns(), 0)
  assert turns == _turns(("user", "Colour?"), ("assistant", "blue")) and references == ["red", "blue", "blue"]
  docvqa = {"question": "Date?", "answers": ["1 May", "May 1"], "questionId": 7, "question_types": ["form", "date"],
            "image": None}
  example, _ = rows.convert_row("vqa", docvqa, "k", rows.Columns(answer="", id="questionId",
                                                                  question_type="question_types"), 100)
  assert (example["id"], example["question_types"], example["images"]) == ("7", ["form/date"], [])
  assert example["references"] == [{"turn": 0, "text": "1 May"}, {"turn": 0, "text": "May 1"}]
  content = [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": "\nand"},
             {"type": "text", "text": " this"}, {"type": "image"}]
  assert rows.trl_turns([{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]) == _turns(
      ("user", "Look:\n<image>\nand this\n<image>"), ("assistant", "ok"))


def test_shards_are_read_one_row_group_at_a_time(tmp_path, monkeypatch):
  # 20 rows of 100 kB incompressible bytes in row groups of 2 (200 kB): the reader asks for each row group
  # alone, and Arrow never holds more than a few row groups' worth (read + decoded) of the 2 MB file.
  rng = np.random.default_rng(0)
  blobs = [rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes() for _ in range(20)]
  table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in blobs], IMAGE),
                    "question": [f"q{i}" for i in range(20)], "answer": [str(i) for i in range(20)]})
  path = tmp_path / "train-00000-of-00001.parquet"
  _write(path, table, row_group_size=2)
  del table
  assert pq.ParquetFile(path).num_row_groups == 10

  asked, sizes = [], []
  iter_batches = pq.ParquetFile.iter_batches

  def spy(self, *args, **kwargs):
    asked.append(kwargs.get("row_groups"))
    for batch in iter_batches(self, *args, **kwargs):
      sizes.append(batch.num_rows)
      yield batch
  monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
  base = pa.total_allocated_bytes()
  peak, got = 0, []
  for row in hf_parquet.parquet_rows(hf_parquet.epath.Path(path), ["image", "question", "answer"], 1):
    peak = max(peak, pa.total_allocated_bytes() - base)
    got.append(row)
  assert asked == [[g] for g in range(10)] and sizes == [1] * 20
  assert [r["image"]["bytes"] for r in got] == blobs and [r["question"] for r in got] == [f"q{i}" for i in range(20)]
  assert peak < 600_000, peak  # seen: 500 kB (a 200 kB row group read, decoded, one row out), not 2 MB


def test_bad_files_give_one_line_errors(tmp_path, capsys, files):
  root, _, _ = files
  bad = tmp_path / "data" / "train-00000-of-00001.parquet"
  bad.parent.mkdir()
  bad.write_text("id,question\n1,what\n")
  rc = cli.main(["data", "prepare", "hf_parquet", "--data-dir", str(tmp_path / "d"), "--parquet", str(bad),
                 "--format", "trl"])
  err = capsys.readouterr().err
  assert rc == 2 and f"{bad}: cannot read this parquet file (ArrowInvalid" in err
  assert len(err.strip().splitlines()) == 2  # the error, then how to see the traceback
  with pytest.raises(InputError, match=r"reads column\(s\) \['messages'\].*look like --format cauldron"):
    datasets.prepare("hf_parquet/x", str(tmp_path / "d"), format="trl",
                     parquet=f"{root}/the_cauldron/vqav2/train-*.parquet")
  with pytest.raises(FileNotFoundError, match="No file matches"):
    datasets.prepare("hf_parquet/y", str(tmp_path / "d"), parquet=f"{tmp_path}/nothing/*.parquet", format="vqa")
  with pytest.raises(InputError, match="Unknown hf_parquet option"):
    datasets.get_builder("hf_parquet", str(tmp_path / "d"), parquet="x.parquet", questoin="q")
  with pytest.raises(InputError, match="batch_rows='many': expected a whole number"):
    datasets.get_builder("hf_parquet", str(tmp_path / "d"), parquet="x.parquet", batch_rows="many")


def test_names_and_splits():
  assert hf_parquet.config_name("/hub/llava-instruct-mix-vsft/data/train-*.parquet") == "llava_instruct_mix_vsft"
  assert hf_parquet.config_name("gs://b/the_cauldron/ai2d/train-00000-of-00001.parquet") == "ai2d"
  paths = [hf_parquet.epath.Path(p) for p in ("d/train-00000-of-00002.parquet", "d/test-00000-of-00001.parquet",
                                              "d/extra.parquet", "d/train-00001-of-00002.parquet")]
  assert {k: [p.name for p in v] for k, v in hf_parquet.shard_splits(paths).items()} == {
      "train": ["train-00000-of-00002.parquet", "extra.parquet", "train-00001-of-00002.parquet"],
      "test": ["test-00000-of-00001.parquet"]}
  assert list(hf_parquet.shard_splits(paths, "validation")) == ["validation"]


# ---------------------------------------------------------------------------------------------------
# `data show` and `eval` on prepared parquet data (the shapes_vqa tokenizer, a tiny random model)


def _tiny_config(data_dir, dataset, tokenizer_dir):
  config = tiny_config(512, data_dir, dataset)
  data = dataclasses.replace(config.data, tokenizer=dataclasses.replace(config.data.tokenizer,
                                                                           path=str(tokenizer_dir)))
  return dataclasses.replace(config, data=data)


def _shapes_tokenizer_dir(shapes_dir):
  return datasets.get_builder(SHAPES_TINY, shapes_dir).data_path / "tokenizer"


def test_data_show_on_parquet_records(prepared, shapes_data_dir):
  data_dir, _ = prepared
  config = _tiny_config(data_dir, "hf_parquet/llava_mix", _shapes_tokenizer_dir(shapes_data_dir))
  text = show.show_config_batch(config, split="train", rows=4)
  assert text.startswith("stage instruct (task conversation) on train of hf_parquet/llava_mix")
  # The loader shuffles: every kept train record appears once among the 4 rows, with its <image> runs.
  assert text.count("What is it?") == text.count("Same?") == text.count("[[Hello") == text.count("Last?") == 1
  assert "<image>*4\\n<image>*4\\nSame?" in text  # two 16 px tiles of 4 tokens


def test_eval_scores_per_source_match_the_predictions(tmp_path, shapes_data_dir):
  # A tiny random model answers 4 questions; their references are then built around its answers, so that
  # every metric scores something known: VQAv2 (2 of 10 humans agree -> 0.6), ANLS (one extra character),
  # ChartQA relaxed (its answer, exact), exact match (a miss).
  tokenizer_dir = _shapes_tokenizer_dir(shapes_data_dir)
  config = _tiny_config(str(tmp_path / "tfds"), "hf_parquet/scored", tokenizer_dir)
  make_workdir(tmp_path / "w", config, Tokenizer.load(tokenizer_dir), finished=("align", "instruct"), seed=3)
  generator = Generator(*workdir_lib.load(tmp_path / "w", "instruct"))
  pixels = [_png(10 + i, (16, 16, 3)) for i in range(4)]
  questions = ["What colour is it?", "What does it say?", "How many bars?", "Is it round?"]
  requests = [([p], f"<image>\n{q}") for (p, _), q in zip(pixels, questions)]
  said = [r.text for r in generator.generate(requests, max_new_tokens=evaluate.ANSWER_TOKENS)]
  assert all(s.strip() for s in said) and metrics.vqa_normalize(said[0]) not in ("", "zzz"), said
  answers = [[said[0]] * 2 + ["zzz"] * 8, [said[1] + "#"], [said[2]], ["zzz"]]
  table = pa.table({"image": pa.array([s for _, s in pixels], IMAGE), "question": questions, "answers": answers,
                    "src": ["vqav2", "DocVQA", "chartqa", ""]})
  _write(tmp_path / "scored" / "data" / "test-00000-of-00001.parquet", table)
  datasets.prepare("hf_parquet/scored", str(tmp_path / "tfds"), parquet=f"{tmp_path}/scored/data/*.parquet",
                   format="vqa", source_column="src")

  # The command, on the workdir's own model (a fresh load of the same params).
  assert cli.main(["eval", "--workdir", str(tmp_path / "w"), "--data-dir", str(tmp_path / "tfds"), "--dataset",
                   "hf_parquet/scored", "--max-new-tokens", str(evaluate.ANSWER_TOKENS)]) == 0
  results = json.loads(evaluate.results_path(tmp_path / "w").read_text())
  lines = (tmp_path / "w" / "eval" / "predictions.jsonl").read_text().splitlines()
  predictions = sorted((json.loads(line) for line in lines), key=lambda p: p["question_id"])  # file order
  assert [p["answer"] for p in predictions] == said  # the same batch of questions (reordered), the same answers
  assert [p["metric"] for p in predictions] == ["vqav2", "anls", "relaxed", "exact"]
  assert [p["references"] for p in predictions] == answers
  assert [p["question_id"] for p in predictions] == [f"data/test-00000-of-00001:{i}" for i in range(4)]
  expected = [0.6, 1 - 1 / (len(said[1].strip()) + 1), 1.0, 0.0]
  assert [p["score"] for p in predictions] == pytest.approx(expected)
  for p in predictions:
    assert p["score"] == metrics.metric_score(p["metric"], p["answer"], p["references"])
    assert p["blind_score"] == metrics.metric_score(p["metric"], p["blind_answer"], p["references"])
  by_source = {p["source"] or "unnamed": p["score"] for p in predictions}
  assert results["by_source"] == {**dict(sorted(by_source.items())), "overall": np.mean(expected)}
  assert results["blind_by_source"]["overall"] == np.mean([p["blind_score"] for p in predictions])
  assert results["metrics"] == {"DocVQA": "anls", "chartqa": "relaxed", "unnamed": "exact", "vqav2": "vqav2"}
  assert results["accuracy"] == {"untyped": np.mean(expected), "overall": np.mean(expected)}
  table_text = evaluate.format_table(results)
  assert "vqav2        vqav2            0.600" in table_text, table_text

  # metric="exact" for every question: any one matching reference scores 1 (the extra "#" is punctuation).
  exact = evaluate.evaluate(tmp_path / "w", generator=generator, progress=False, metric="exact")
  assert exact["metrics"] == {"DocVQA": "exact", "chartqa": "exact", "unnamed": "exact", "vqav2": "exact"}
  assert exact["by_source"] == {"DocVQA": 1.0, "chartqa": 1.0, "unnamed": 0.0, "vqav2": 1.0, "overall": 0.75}


def test_splits_larger_than_the_memory_buffer_spill_to_disk(files, prepared, tmp_path, monkeypatch):
  # TFDS keeps up to 1 GB of examples in memory, then spills them into 1000 bucket files (written with
  # tf.io.gfile, absent here: shuffle_buckets replaces it). With no buffer at all every example spills.
  from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 0)
  root, _, _ = files
  datasets.prepare("hf_parquet/cauldron", str(tmp_path), format="cauldron", source="fallback",
                   parquet=f"{root}/the_cauldron/vqav2/train-*.parquet")
  spilled, kept = _records(str(tmp_path), "hf_parquet/cauldron"), _records(prepared[0], "hf_parquet/cauldron")
  assert [r["id"] for r in spilled] == [r["id"] for r in kept] and len(kept) == 2
  for a, b in zip(spilled, kept):
    assert {k: v for k, v in a.items() if k != "images"} == {k: v for k, v in b.items() if k != "images"}
    for x, y in zip(a["images"], b["images"], strict=True):
      np.testing.assert_array_equal(x, y)
  assert not list(tmp_path.rglob("bucket_*.tmp"))  # the buckets are removed


def test_subsets_of_one_glob_keep_their_sources(files, tmp_path):
  root, px, _ = files
  report = datasets.prepare("hf_parquet", str(tmp_path), format="cauldron",
                            parquet=f"{root}/the_cauldron/*/train-*.parquet")
  assert "hf_parquet/the_cauldron 1.0.0" in report and "train=3" in report
  records = _records(str(tmp_path), "hf_parquet/the_cauldron")
  assert [(r["id"], r["source"]) for r in records] == [
      ("ai2d/train-00000-of-00001:0", "ai2d"), ("vqav2/train-00000-of-00001:0", "vqav2"),
      ("vqav2/train-00000-of-00001:1", "")]
  np.testing.assert_array_equal(records[0]["images"][0], px[2][0])
