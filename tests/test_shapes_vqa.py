"""shapes_vqa: scene text and geometry, determinism, answer balance, and the prepared TFDS dataset."""
import collections
import itertools
import re

import numpy as np
import pytest
from fixtures_data import SHAPES_TINY, shapes_data_dir  # noqa: F401  (fixture)

from vlm_jax import datasets
from vlm_jax.datasets.shapes_vqa import make_config, scenes, tokenizer_dir
from vlm_jax.datasets.shapes_vqa.shapes_vqa import example_record, example_spec
from vlm_jax.inputs import loader
from vlm_jax.inputs.tokenizer import Tokenizer

S = scenes.Shape
GREY = (128, 128, 128)


def test_caption_of_fixed_scenes():
  two = scenes.Scene(64, 48, GREY, 0.0, (S("square", "blue", "small", "bottom"), S("circle", "red", "large", "left")))
  assert scenes.caption((two,)) == "a large red circle on the left and a small blue square at the bottom"
  three = scenes.Scene(48, 48, GREY, 0.0, (S("star", "green", "small", "center"), S("cross", "yellow", "large", "right"),
                                           S("triangle", "purple", "small", "top")))
  assert scenes.caption((three,)) == ("a small purple triangle at the top, a small green star in the center and "
                                      "a large yellow cross on the right")
  assert scenes.caption((two, three)).startswith("in the first image, a large red circle on the left and ")
  assert "; in the second image, a small purple triangle at the top, " in scenes.caption((two, three))


def test_negative_captions_each_make_one_fact_false():
  two = scenes.Scene(64, 48, GREY, 0.0, (S("square", "blue", "small", "bottom"), S("circle", "red", "large", "left")))
  true = scenes.caption((two,))
  for seed in range(20):
    kind, position, colour, size = scenes.negative_captions(np.random.default_rng(seed), two)
    for negative, words in ((kind, scenes.SHAPES), (colour, scenes.COLOURS), (size, scenes.SIZES)):
      changed = [(a, b) for a, b in zip(true.split(), negative.split()) if a != b]
      assert len(changed) == 1 and changed[0][1] in words and len(true.split()) == len(negative.split())
    moved = {p for p in scenes.POSITIONS if scenes.PHRASES[p] in position} - {"left", "bottom"}
    assert len(moved) == 1 and moved <= {"top", "right", "center"} and position != true
  rng = np.random.default_rng(0)
  assert scenes.negative_captions(rng, two)[2] != true


def test_examples_carry_negatives_only_with_one_image():
  specs = [example_spec(0, "train", i) for i in range(40)]
  assert {len(s.negative_captions) for s in specs if len(s.scenes) == 1} == {4}
  assert {len(s.negative_captions) for s in specs if len(s.scenes) == 2} == {0}
  assert all(s.caption not in s.negative_captions for s in specs)


@pytest.mark.parametrize("size", scenes.IMAGE_SIZES)
def test_position_rule_each_shape_stays_in_its_cell(size):
  width, height = size
  for position, shape_size, jitter in itertools.product(scenes.POSITIONS, scenes.SIZES, [(-1, -1), (1, 1), (1, -1)]):
    cx, cy, r = scenes.shape_box(S("circle", "red", shape_size, position, jitter), width, height)
    col, row = scenes.CELLS[position]
    eps = 1e-9  # a shape at full jitter touches its cell's edge
    assert col * width / 3 - eps <= cx - r and cx + r <= (col + 1) * width / 3 + eps
    assert row * height / 3 - eps <= cy - r and cy + r <= (row + 1) * height / 3 + eps
  # Rendered: shape colour at the cell centre, background in an unused corner cell.
  image = scenes.render(scenes.Scene(width, height, GREY, 0.0, (S("square", "blue", "large", "right"),)))
  assert image.shape == (height, width, 3)
  np.testing.assert_array_equal(image[height // 2, 5 * width // 6], scenes.COLOURS["blue"])
  np.testing.assert_array_equal(image[height // 6, width // 6], GREY)


def test_small_shapes_are_distinguishable_at_48px():
  images = {k: scenes.render(scenes.Scene(48, 48, (200, 200, 200), 0.0, (S(k, "red", "small", "center"),))).astype(int)
            for k in scenes.SHAPES}
  for a, b in itertools.combinations(scenes.SHAPES, 2):
    differing = (np.abs(images[a] - images[b]).max(-1) > 40).sum()
    assert differing >= 15, (a, b, differing)
  # Anti-aliased: edge pixels take values between the shape and the background colour.
  assert len(np.unique(images["circle"][..., 1])) > 4


def test_determinism_by_seed_split_and_index():
  a, b = example_record(0, "train", 7), example_record(0, "train", 7)
  assert a == b and len(a["images"]) >= 1
  assert a["images"][0][:8] == b"\x89PNG\r\n\x1a\n"
  assert example_record(1, "train", 7)["images"] != a["images"]
  assert example_record(0, "validation", 7)["images"] != a["images"]
  assert a["id"] == "train_000007"


def _answer_is_true(scene_list, qtype, question, answer):
  """An independent reading of the question against the scenes."""
  m = re.match(r"In the (first|second) image, (.*)", question)
  scene = scene_list[scenes.ORDINALS.index(m.group(1))] if m else scene_list[0]
  q = (m.group(2)[0].upper() + m.group(2)[1:]) if m else question
  pairs = {(s.colour, s.kind): s for s in scene.shapes}
  if qtype == "count":
    return answer == scenes.NUMBERS[len(scene.shapes)]
  if qtype == "presence":
    colour, kind = re.match(r"Is there a (\w+) (\w+)\?", q).groups()
    return answer == ("yes" if (colour, kind) in pairs else "no")
  if qtype == "position":
    colour, kind = re.match(r"Where is the (\w+) (\w+)\?", q).groups()
    return pairs[(colour, kind)].position == answer
  if qtype == "colour":
    kind = re.match(r"What colour is the (\w+)", q).group(1)
    return answer in {s.colour for s in scene.shapes if s.kind == kind}
  if qtype == "shape":
    colour = re.match(r"What shape is the (\w+) shape", q).group(1)
    return answer in {s.kind for s in scene.shapes if s.colour == colour}
  counts = [len(s.shapes) for s in scene_list]
  if q == "Which image has more shapes?":
    return answer == ("same" if counts[0] == counts[1] else scenes.ORDINALS[int(counts[1] > counts[0])])
  colour, kind = re.match(r"Which image has a (\w+) (\w+)\?", q).groups()
  having = [i for i, s in enumerate(scene_list) if any((x.colour, x.kind) == (colour, kind) for x in s.shapes)]
  return having == [scenes.ORDINALS.index(answer)]


def test_question_types_answers_and_blind_baseline():
  n = 3000
  specs = [example_spec(0, "train", i) for i in range(n)]
  two_image = sum(len(s.scenes) == 2 for s in specs)
  type_counts = collections.Counter(t for s in specs for t in s.question_types)
  answers = collections.defaultdict(collections.Counter)
  for spec in specs:
    assert len(spec.question_types) == scenes.QUESTIONS_PER_EXAMPLE == len(set(spec.question_types))
    assert spec.turns[0][1].startswith("<image>\n" * len(spec.scenes))
    for qtype, (_, question), (_, answer) in zip(spec.question_types, spec.turns[0::2], spec.turns[1::2]):
      assert _answer_is_true(spec.scenes, qtype, question.replace("<image>\n", ""), answer), (question, answer)
      answers[qtype][answer] += 1
  assert abs(two_image / n - scenes.TWO_IMAGE_FRACTION) < 0.03
  assert type_counts["comparison"] == two_image
  expected = (3 * (n - two_image) + 2 * two_image) / 5  # 3 of 5 types per one-image example, 2 per two-image one
  for qtype in scenes.SINGLE_IMAGE_TYPES:
    assert abs(type_counts[qtype] / expected - 1) < 0.08, (qtype, type_counts[qtype], expected)
  assert set(answers["colour"]) == set(scenes.COLOURS) and set(answers["shape"]) == set(scenes.SHAPES)
  assert set(answers["count"]) == set(scenes.NUMBERS[1:]) and set(answers["position"]) == set(scenes.POSITIONS)
  assert set(answers["presence"]) == {"yes", "no"} and set(answers["comparison"]) == {"first", "second", "same"}
  blind = {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in answers.items()}
  # The majority answer of each type: what a model that ignores the images scores at best per type.
  for qtype, limit in [("colour", 0.21), ("shape", 0.24), ("count", 0.29), ("position", 0.24), ("comparison", 0.46)]:
    assert blind[qtype] < limit, (qtype, blind[qtype])
  assert 0.47 < blind["presence"] < 0.53
  for value in scenes.NUMBERS[1:]:  # counts spread evenly
    assert 0.21 < answers["count"][value] / sum(answers["count"].values()) < 0.29


def test_config_names_are_canonical():
  assert make_config(None, num_train=64, num_validation=32, num_test=32).name == "tiny"
  custom = make_config("tiny", seed=3)
  assert custom.name == "train64-val32-test32-seed3-vocab512"
  assert make_config(custom.name).seed == 3 and make_config(custom.name).num_test == 32
  with pytest.raises(ValueError, match="num_tran"):
    make_config(None, num_tran=5)
  with pytest.raises(ValueError, match="presets"):
    make_config("huge")
  assert make_config(None, num_train="64", num_validation=32, num_test=32).name == "tiny"  # text from Python
  for bad in ("ten", -1, 2.5, True, "\u00b2"):
    with pytest.raises(ValueError, match=rf"shapes_vqa option num_train={bad!r}: expected a whole number >= 0"):
      make_config(None, num_train=bad)


def test_prepared_dataset_and_tokenizer(shapes_data_dir):  # noqa: F811
  builder = datasets.get_builder(SHAPES_TINY, shapes_data_dir)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 64, "validation": 32, "test": 32}
  source = loader.data_source(SHAPES_TINY, "validation", shapes_data_dir)
  records = {r["id"]: r for r in (source[i] for i in range(len(source)))}
  assert sorted(records) == [f"validation_{i:06d}" for i in range(32)]
  spec = example_spec(0, "validation", 5)
  record = records["validation_000005"]
  assert record["caption"] == spec.caption
  assert [(t["role"], t["content"]) for t in record["turns"]] == list(spec.turns)
  assert record["question_types"] == list(spec.question_types)
  assert record["negative_captions"] == list(spec.negative_captions)
  for image, scene, k in zip(record["images"], spec.scenes, itertools.count()):  # PNG is lossless
    np.testing.assert_array_equal(image, scenes.render(scene, noise_seed=(0, 1, 5, k)))
  tok = Tokenizer.load(tokenizer_dir(builder))
  assert tok.image_id == 4 and tok.im_start_id == 5 and tok.im_end_id == 6
  assert tok.vocab_size <= 512
  text = record["turns"][0]["content"]
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode("<image>\n")[0] == 4


def test_custom_sizes_prepare_and_read_back(tmp_path):
  report = datasets.prepare("shapes_vqa", str(tmp_path), num_train=6, num_validation=2, num_test=2, seed=4)
  assert "shapes_vqa/train6-val2-test2-seed4-vocab512" in report and "train=6" in report
  builder = datasets.get_builder("shapes_vqa/train6-val2-test2-seed4-vocab512", str(tmp_path))
  assert builder.is_prepared() and builder.builder_config.seed == 4
  source = loader.data_source("shapes_vqa/train6-val2-test2-seed4-vocab512", "test", str(tmp_path))
  assert sorted(source[i]["id"] for i in range(2)) == ["test_000000", "test_000001"]
