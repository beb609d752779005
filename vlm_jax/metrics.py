"""Standard VQA scores of one prediction against its reference answers (pure functions, no model).

- `vqa_accuracy` (VQAv2, also TextVQA, VizWiz, OK-VQA): min(#humans who gave the answer / 3, 1), averaged over
  the 10 leave-one-out subsets of the 10 human answers, after `vqa_normalize` (the official vqaEval.py rules).
- `anls` (DocVQA, InfographicVQA): max over references of 1 - normalized Levenshtein distance, 0 past 0.5.
- `relaxed_accuracy` (ChartQA): numbers within 5% of the reference, other answers exact (case-folded).
- `exact_match`: equal after `normalize_answer` (lower case, no punctuation or articles), any reference.

`choose_metric` picks one per question when the user does not: by the dataset's source name, else VQAv2
accuracy for 10 references, else exact match. Every metric returns a float in [0, 1].
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

METRICS = ("vqav2", "anls", "relaxed", "exact")

# ---------------------------------------------------------------------------------------------------
# The project's plain normalization (shapes_vqa, exact match) and caption token F1

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
  """Lower-case, strip punctuation and articles, fold whitespace."""
  words = _PUNCT.sub(" ", text.lower()).split()
  return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
  """1.0 when the prediction equals a reference (one string or several) after `normalize_answer`."""
  references = [reference] if isinstance(reference, str) else reference
  return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD-style token F1 between normalized strings (1.0 when both are empty)."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------------
# VQAv2 (the rules of the official vqaEval.py; the tables are its data)

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!")
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
# Missing apostrophes put back. The capitalised keys ("Im", "Ive") are the official table's and never match,
# since words are lower-cased first; kept so that scores equal the official ones.
_CONTRACTIONS = dict(pair.split(":") for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd "
    "howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've "
    "it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
    "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
    "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've "
    "somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd "
    "someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's "
    "somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll "
    "thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's "
    "theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've "
    "twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll "
    "whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've "
    "whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll "
    "whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've "
    "wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
    "y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll "
    "youre:you're youve:you've").split())


def _vqa_punctuation(text: str) -> str:
  # A mark next to a space, or any text with a digit-comma-digit ("1,000"), loses its marks; elsewhere a
  # mark splits words ("black/white" -> "black white").
  glued = _DIGIT_COMMA.search(text) is not None
  out = text
  for p in _VQA_PUNCT:
    out = out.replace(p, "" if glued or p + " " in text or " " + p in text else " ")
  return _PERIOD.sub("", out)


def vqa_normalize(text: str) -> str:
  """An answer as the VQA evaluation compares it: punctuation rules, lower case, number words to digits,
  articles dropped, missing apostrophes restored ("Two dogs." -> "2 dogs", "dont" -> "don't")."""
  text = _vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
  """VQAv2 accuracy: mean over each reference i left out of min(#other references equal to the prediction
  / 3, 1), all answers `vqa_normalize`d. With 10 references, 3 or more matching humans score 1."""
  if not references:
    return 0.0
  pred = vqa_normalize(prediction)
  matches = [vqa_normalize(r) == pred for r in references]
  total = sum(matches)
  return sum(min((total - m) / 3, 1.0) for m in matches) / len(matches)


# ---------------------------------------------------------------------------------------------------
# ANLS, relaxed accuracy


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions each cost 1)."""
  if len(a) < len(b):
    a, b = b, a
  row = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    prev, row[0] = row[0], i
    for j, cb in enumerate(b, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
  return row[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
  """Average Normalized Levenshtein Similarity of one question (Biten et al. 2019): the max over references
  of 1 - NL, NL = edit distance / the longer length, case and whitespace folded; 0 where NL >= threshold."""
  pred = " ".join(prediction.lower().split())
  best = 0.0
  for reference in references:
    ref = " ".join(reference.lower().split())
    longest = max(len(pred), len(ref))
    distance = levenshtein(pred, ref) / longest if longest else 0.0
    best = max(best, 1.0 - distance if distance < threshold else 0.0)
  return best


def _number(text: str) -> float | None:
  text = text.strip()
  try:
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_accuracy(prediction: str, references: Sequence[str], tolerance: float = 0.05) -> float:
  """ChartQA's relaxed accuracy, any reference: a numeric reference (not 0; "12%" = 0.12) is met by a number
  within `tolerance` of it, relative (|pred - ref| / |ref| <= 5%); any other by the same text, case-folded."""
  pred = _number(prediction)
  for reference in references:
    ref = _number(reference)
    if pred is not None and ref:
      if abs(pred - ref) / abs(ref) <= tolerance:
        return 1.0
    elif prediction.strip().lower() == reference.strip().lower():
      return 1.0
  return 0.0


# ---------------------------------------------------------------------------------------------------
# Which metric


def metric_score(metric: str, prediction: str, references: Sequence[str]) -> float:
  """The score of `prediction` by `metric` (one of METRICS)."""
  if metric == "vqav2":
    return vqa_accuracy(prediction, references)
  if metric == "anls":
    return anls(prediction, references)
  if metric == "relaxed":
    return relaxed_accuracy(prediction, references)
  if metric == "exact":
    return exact_match(prediction, references)
  raise ValueError(f"Unknown metric {metric!r}; expected one of {METRICS}.")


_SOURCE_METRICS = (("docvqa", "anls"), ("infographicvqa", "anls"), ("infovqa", "anls"), ("chartqa", "relaxed"))
AUTO_HELP = ("anls for sources named like DocVQA / InfographicVQA, relaxed for ChartQA, vqav2 for questions with "
             "10 reference answers (VQAv2, TextVQA, VizWiz, OK-VQA), else exact")


def choose_metric(source: str, num_references: int) -> str:
  """The metric a question is scored with by default (see AUTO_HELP)."""
  name = re.sub(r"[^a-z0-9]", "", source.lower())
  for key, metric in _SOURCE_METRICS:
    if key in name:
      return metric
  return "vqav2" if num_references == 10 else "exact"
