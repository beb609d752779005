"""Each metric against worked examples computed by hand from its official definition."""
import pytest

from vlm_jax import metrics


def test_vqa_normalize_follows_the_official_rules():
  assert metrics.vqa_normalize("Two") == "2"  # number words -> digits (after lower case)
  assert metrics.vqa_normalize("the dog.") == "dog"  # the period goes, then the article
  assert metrics.vqa_normalize("dont") == "don't"  # missing apostrophe restored
  assert metrics.vqa_normalize("A Red  Car\n") == "red car"
  assert metrics.vqa_normalize("black/white") == "black white"  # a mark inside a word splits it
  assert metrics.vqa_normalize("yes, sir") == "yes sir"  # a mark next to a space is removed
  assert metrics.vqa_normalize("1,000") == "1000"  # digit-comma-digit: marks removed, not split
  assert metrics.vqa_normalize("3.5") == "3.5"  # a period before a digit stays
  assert metrics.vqa_normalize("yes!") == "yes"
  assert metrics.vqa_normalize("Im") == "im"  # the official table's capitalised keys never match


@pytest.mark.parametrize("matching, expected", [
    # 10 humans, m of them gave the (normalized) prediction. Leaving out one of the m matching answers leaves
    # m - 1 matches, leaving out one of the 10 - m others leaves m; each subset scores min(matches / 3, 1).
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),  # = 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = 18/30 = 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),  # = 0.9
    (4, 1.0),  # every subset keeps at least 3 matches
])
def test_vqa_accuracy_leave_one_out(matching, expected):
  references = ["2"] * matching + ["3"] * (10 - matching)
  assert metrics.vqa_accuracy("Two.", references) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_worked_values():
  assert metrics.vqa_accuracy("two", ["2", "2", "3", "3", "3", "3", "3", "3", "4", "4"]) == pytest.approx(0.6)
  # "the dog." and "Dog" normalize to the reference "dog": 3 of 10 humans -> 0.9
  assert metrics.vqa_accuracy("the dog.", ["Dog", "dog", "dog"] + ["cat"] * 7) == pytest.approx(0.9)
  assert metrics.vqa_accuracy("dont", ["don't"] * 10) == 1.0
  assert metrics.vqa_accuracy("yes", []) == 0.0


def test_levenshtein():
  assert metrics.levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
  assert metrics.levenshtein("", "abc") == 3 and metrics.levenshtein("abc", "abc") == 0


def test_anls():
  # "hello wrld" vs "hello world": 1 edit, longer string 11 characters -> NL = 1/11, score 10/11
  assert metrics.anls("hello wrld", ["hello world"]) == pytest.approx(10 / 11)
  assert metrics.anls("Hello  World ", ["hello world"]) == 1.0  # case and whitespace folded
  assert metrics.anls("abxye", ["abcde"]) == pytest.approx(0.6)  # 2 edits / 5 = 0.4 < 0.5 -> 1 - 0.4
  assert metrics.anls("abxy", ["abcd"]) == 0.0  # 2 edits / 4 = 0.5, not below the threshold -> 0
  assert metrics.anls("cat", ["dog"]) == 0.0
  # max over references: 0 for "dog", 10/11 for "hello world"
  assert metrics.anls("hello wrld", ["dog", "hello world"]) == pytest.approx(10 / 11)
  assert metrics.anls("", [""]) == 1.0


def test_relaxed_accuracy_five_percent_boundary():
  # |210 - 200| / 200 = 0.05 <= 0.05: correct; |210.5 - 200| / 200 = 0.0525: wrong
  assert metrics.relaxed_accuracy("210", ["200"]) == 1.0
  assert metrics.relaxed_accuracy("190", ["200"]) == 1.0
  assert metrics.relaxed_accuracy("210.5", ["200"]) == 0.0
  assert metrics.relaxed_accuracy("189.5", ["200"]) == 0.0
  assert metrics.relaxed_accuracy("12%", ["0.12"]) == 1.0  # a percentage is a fraction
  assert metrics.relaxed_accuracy("Yes", ["yes"]) == 1.0  # not numeric: exact, case-folded
  assert metrics.relaxed_accuracy("yes.", ["yes"]) == 0.0
  assert metrics.relaxed_accuracy("0.01", ["0"]) == 0.0  # a zero reference is compared as text
  assert metrics.relaxed_accuracy("0", ["0"]) == 1.0
  assert metrics.relaxed_accuracy("red", ["200"]) == 0.0
  assert metrics.relaxed_accuracy("203", ["red", "200"]) == 1.0  # any reference


def test_exact_match_and_token_f1():
  assert metrics.exact_match("The Red circle!", "red circle") == 1.0
  assert metrics.exact_match("blue", ["red", "Blue."]) == 1.0
  assert metrics.exact_match("yes no", ["yes"]) == 0.0
  # pred {red, circle, on, right} vs ref {red, circle, on, left}: 3 common, p = r = 3/4
  assert metrics.token_f1("red circle on the right", "red circle on the left") == pytest.approx(0.75)


def test_choose_metric_and_metric_score():
  assert metrics.choose_metric("DocVQA", 1) == "anls"
  assert metrics.choose_metric("infographic_vqa", 3) == "anls"
  assert metrics.choose_metric("chartqa_human", 1) == "relaxed"
  assert metrics.choose_metric("", 10) == "vqav2"
  assert metrics.choose_metric("vqav2", 1) == "exact"  # one reference: nothing to leave out
  assert metrics.metric_score("anls", "hello wrld", ["hello world"]) == pytest.approx(10 / 11)
  assert metrics.metric_score("vqav2", "two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
  with pytest.raises(ValueError, match="Unknown metric"):
    metrics.metric_score("bleu", "a", ["a"])
