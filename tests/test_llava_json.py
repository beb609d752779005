"""llava_json: every kind of bad record is skipped or repaired and counted; kept records are exact."""
import json

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from fixtures_data import assert_upright, save_sideways_jpeg

from vlm_jax import datasets
from vlm_jax.datasets.llava_json import COUNTS_FILE
from vlm_jax.inputs import loader

tfds.disable_progress_bar()


def _save(path, image, fmt="PNG"):
  image.save(path, format=fmt)
  return path.name


def _images(d):
  rgb = np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)
  names = {"rgb": _save(d / "rgb.png", PIL.Image.fromarray(rgb))}
  names["jpeg"] = _save(d / "photo.jpg", PIL.Image.fromarray(rgb), "JPEG")
  names["cmyk"] = _save(d / "cmyk.jpg", PIL.Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG")
  names["i16"] = _save(d / "depth.png", PIL.Image.fromarray(np.full((6, 8), 65535, np.uint16)))
  palette = PIL.Image.new("P", (8, 6), 1)
  palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
  names["p"] = _save(d / "palette.png", palette)
  names["rgba"] = _save(d / "rgba.png", PIL.Image.new("RGBA", (8, 6), (255, 0, 0, 0)))
  names["la"] = _save(d / "la.png", PIL.Image.new("LA", (8, 6), (50, 255)))
  names["gray"] = _save(d / "gray.png", PIL.Image.new("L", (8, 6), 77))
  names["big"] = _save(d / "big.png", PIL.Image.new("RGB", (300, 200), (1, 2, 3)))
  names["sideways"] = save_sideways_jpeg(d / "sideways.jpg")
  (d / "empty.png").write_bytes(b"")
  names["empty"] = "empty.png"
  full = (d / "rgb.png").read_bytes()
  (d / "truncated.png").write_bytes(full[:len(full) // 2])
  names["truncated"] = "truncated.png"
  return names


def _conv(*pairs):
  return [{"from": f, "value": v} for f, v in pairs]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  d = tmp_path_factory.mktemp("llava")
  (d / "images").mkdir()
  im = _images(d / "images")
  one = lambda name, rid, **kw: {"id": rid, "image": im[name],  # noqa: E731
                                 "conversations": _conv(("human", "<image>\nWhat is it?"), ("gpt", rid)), **kw}
  records = [
      one("rgb", "ok_png"),
      one("jpeg", "ok_jpeg"),
      {"id": "text_only", "conversations": _conv(("human", "Hi"), ("gpt", "Hello"), ("human", "Bye"), ("gpt", "Ciao"))},
      {"id": "two_images", "image": [im["rgb"], im["gray"]],
       "conversations": _conv(("human", "<image>\n<image>\nSame?"), ("gpt", "no"))},
      {"id": "no_tag", "image": im["rgb"], "conversations": _conv(("human", "Describe."), ("gpt", "pixels"))},
      {"id": "with_system", "conversations": _conv(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hey"))},
      one("cmyk", "cmyk"), one("i16", "i16"), one("p", "palette"), one("rgba", "rgba"), one("la", "la"),
      one("gray", "gray"), one("big", "big"), one("sideways", "sideways"),
      # the bad ones
      one("rgb", "missing", image="nowhere.png"),
      one("empty", "empty"),
      one("truncated", "truncated"),
      {"id": "no_answer", "conversations": _conv(("human", "Anyone?"))},
      {"id": "bot", "conversations": _conv(("human", "Hi"), ("bot", "Hello"))},
      {"id": "latin1", "conversations": _conv(("human", "Caf@@"), ("gpt", "yes"))},
      {"id": "too_many_tags", "image": im["rgb"], "conversations": _conv(("human", "<image><image>?"), ("gpt", "x"))},
      "not a record",
  ]
  raw = json.dumps(records).encode("utf-8").replace(b"@@", b"\xe9")  # a Latin-1 byte: not UTF-8
  (d / "data.json").write_bytes(raw)
  data_dir = str(d / "tfds")
  report = datasets.prepare("llava_json/mix", data_dir, json_path=str(d / "data.json"),
                            image_dir=str(d / "images"), max_pixels=20000)
  return data_dir, report, d / "images"


def test_counts_by_reason(prepared):
  data_dir, report, _ = prepared
  expected = {"kept": 14,
              "skipped": {"image_count_mismatch": 1, "image_empty": 1, "image_missing": 1, "image_unreadable": 1,
                          "invalid_record": 1, "no_assistant_turn": 1, "text_not_utf8": 1, "unknown_role": 1},
              "repaired": {"downscaled": 1, "exif_rotated": 1, "image_tag_added": 1, "mode_CMYK": 1, "mode_I;16": 1, "mode_L": 2,
                           "mode_LA": 1, "mode_P": 1, "mode_RGBA": 1}}
  builder = datasets.get_builder("llava_json/mix", data_dir)
  assert json.loads((builder.data_path / COUNTS_FILE).read_text()) == expected
  assert builder.info.metadata["record_counts"] == expected  # reloaded from disk
  assert builder.info.splits["train"].num_examples == 14
  assert '"image_missing": 1' in report


def test_kept_records(prepared):
  data_dir, _, image_dir = prepared
  source = loader.data_source("llava_json/mix", "train", data_dir)
  r = {rec["id"]: rec for rec in (source[i] for i in range(len(source)))}
  rgb = np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)
  np.testing.assert_array_equal(r["ok_png"]["images"][0], rgb)
  assert r["ok_png"]["turns"] == [{"role": "user", "content": "<image>\nWhat is it?"},
                                  {"role": "assistant", "content": "ok_png"}]
  assert r["ok_png"]["question_types"] == [""] and r["ok_png"]["caption"] == ""
  assert r["ok_jpeg"]["images"][0].shape == (24, 32, 3)
  assert r["text_only"]["images"] == [] and len(r["text_only"]["turns"]) == 4
  assert r["text_only"]["question_types"] == ["", ""]
  assert [im.shape for im in r["two_images"]["images"]] == [(24, 32, 3), (6, 8, 3)]
  assert r["no_tag"]["turns"][0]["content"] == "<image>\nDescribe."
  assert [t["role"] for t in r["with_system"]["turns"]] == ["system", "user", "assistant"]
  first_pixel = {k: tuple(r[k]["images"][0][0, 0]) for k in ("cmyk", "i16", "palette", "rgba", "la", "gray")}
  assert first_pixel == {"cmyk": (255, 0, 0), "i16": (255, 255, 255), "palette": (10, 200, 30),
                         "rgba": (255, 255, 255), "la": (50, 50, 50), "gray": (77, 77, 77)}
  big = r["big"]["images"][0]
  assert big.shape == (115, 173, 3) and big.shape[0] * big.shape[1] <= 20000
  np.testing.assert_array_equal(big[50, 50], (1, 2, 3))
  assert_upright(r["sideways"]["images"][0], image_dir / "sideways.jpg")


def test_no_usable_record_is_an_error(tmp_path):
  (tmp_path / "bad.json").write_text(json.dumps([{"id": 1, "conversations": []}, {"id": 2, "image": "x.png",
                                                 "conversations": _conv(("human", "<image>"), ("gpt", "a"))}]))
  with pytest.raises(ValueError, match=r"no usable record out of 2.*image_missing"):
    datasets.prepare("llava_json", str(tmp_path / "tfds"), json_path=str(tmp_path / "bad.json"))
