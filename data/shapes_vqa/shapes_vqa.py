"""shapes_vqa: the procedural shapes VQA dataset as a TFDS builder (array_record, no TensorFlow).

Example `i` of a split is a pure function of (seed, split, i), so any size prepares the same first examples.
Configs: `default` (20000/500/500, what the tiny CPU recipe trains on), `small` (2000/200/200), `tiny`
(64/32/32); other sizes get a name that spells them out, e.g. `train100-val10-test10-seed3-vocab512`, so
`shapes_vqa/<that name>` finds them again. Preparing also trains the sentencepiece tokenizer on the train
split's text and stores it in `<data_path>/tokenizer/` (see `tokenizer_dir`).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vlm_jax.config import InputError
from vlm_jax.datasets.record_builder import RecordBuilder, record_features
from vlm_jax.datasets.shapes_vqa import scenes

SPLITS = ("train", "validation", "test")
SIZE_OPTIONS = ("num_train", "num_validation", "num_test", "seed", "vocab_size")
PRESETS = {"default": (20000, 500, 500), "small": (2000, 200, 200), "tiny": (64, 32, 32)}
DEFAULT_SEED, DEFAULT_VOCAB = 0, 512
_CUSTOM_NAME = re.compile(r"train(\d+)-val(\d+)-test(\d+)-seed(\d+)-vocab(\d+)")


@dataclasses.dataclass(eq=False)
class ShapesVqaConfig(tfds.core.BuilderConfig):
  num_train: int = PRESETS["default"][0]
  num_validation: int = PRESETS["default"][1]
  num_test: int = PRESETS["default"][2]
  seed: int = DEFAULT_SEED
  vocab_size: int = DEFAULT_VOCAB  # of the sentencepiece model trained at prepare time

  def size(self, split: str) -> int:
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[split]


def _config(name: str, sizes: tuple[int, int, int], seed: int, vocab_size: int) -> ShapesVqaConfig:
  return ShapesVqaConfig(name=name, num_train=sizes[0], num_validation=sizes[1], num_test=sizes[2], seed=seed,
                         vocab_size=vocab_size, description=f"{sizes} examples (train/validation/test), seed {seed}")


def make_config(config: str | None = None, **options) -> ShapesVqaConfig:
  """The config named `config` (a preset or a spelled-out name) with `options` applied, canonically named."""
  config = config or "default"
  unknown = set(options) - set(SIZE_OPTIONS)
  if unknown:
    raise InputError(f"Unknown shapes_vqa option(s) {sorted(unknown)}; valid: {', '.join(SIZE_OPTIONS)}.")
  if config in PRESETS:
    values = (*PRESETS[config], DEFAULT_SEED, DEFAULT_VOCAB)
  elif match := _CUSTOM_NAME.fullmatch(config):
    values = tuple(int(g) for g in match.groups())
  else:
    raise InputError(f"Unknown shapes_vqa config {config!r}; presets: {', '.join(PRESETS)}, or a name like "
                     f"'train100-val10-test10-seed0-vocab512'.")
  values = dict(zip(SIZE_OPTIONS, values))
  for key, value in options.items():
    whole = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if not (whole or isinstance(value, str) and value.isascii() and value.isdigit()):
      raise InputError(f"shapes_vqa option {key}={value!r}: expected a whole number >= 0, e.g. {key}=1000.")
    values[key] = int(value)
  if values["vocab_size"] <= 0:
    raise InputError(f"shapes_vqa option vocab_size={values['vocab_size']}: the tokenizer needs at least one piece.")
  sizes, seed, vocab = (values["num_train"], values["num_validation"], values["num_test"]), values["seed"], \
      values["vocab_size"]
  for preset, preset_sizes in PRESETS.items():
    if sizes == preset_sizes and seed == DEFAULT_SEED and vocab == DEFAULT_VOCAB:
      return _config(preset, sizes, seed, vocab)
  return _config(f"train{sizes[0]}-val{sizes[1]}-test{sizes[2]}-seed{seed}-vocab{vocab}", sizes, seed, vocab)


def example_spec(seed: int, split: str, index: int) -> scenes.Example:
  """Example `index` of `split`: scenes and text, not yet rendered."""
  return scenes.sample_example(np.random.default_rng((seed, SPLITS.index(split), index)))


def example_record(seed: int, split: str, index: int, spec: scenes.Example | None = None) -> dict:
  """The TFDS example dict of one record (images as PNG bytes)."""
  spec = spec or example_spec(seed, split, index)
  images = [scenes.png_bytes(scenes.render(s, noise_seed=(seed, SPLITS.index(split), index, k)))
            for k, s in enumerate(spec.scenes)]
  return {"id": f"{split}_{index:06d}", "images": images, "caption": spec.caption,
          "turns": [{"role": r, "content": c} for r, c in spec.turns], "question_types": list(spec.question_types),
          "negative_captions": list(spec.negative_captions)}


def corpus(spec: scenes.Example) -> list[str]:
  """The strings of an example the tokenizer is trained on: the caption and the conversation as the model
  reads it (ChatML), so the template's words ('user', 'assistant') get pieces of their own too."""
  from vlm_jax.inputs import chat  # pylint: disable=import-outside-toplevel
  from vlm_jax.inputs.tokenizer import IMAGE_TOKEN  # pylint: disable=import-outside-toplevel
  turns = [{"role": r, "content": c} for r, c in spec.turns]
  return [spec.caption, chat.render_text(turns, [IMAGE_TOKEN] * len(spec.scenes))]


class ShapesVqa(RecordBuilder):
  """Procedural shapes VQA: 1-4 shapes per image, 1-2 images per example, 3 typed questions each."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "negative_captions (hard negatives for contrastive pretraining)."}
  BUILDER_CONFIGS = [make_config(name) for name in PRESETS]
  DEFAULT_CONFIG_NAME = "default"

  @classmethod
  def from_options(cls, data_dir: str, config: str | None = None, **options) -> "ShapesVqa":
    cfg = make_config(config, **options)
    # TFDS wants presets by name: an equal but new config object under a preset name is an error.
    return cls(data_dir=data_dir, config=cfg.name if cfg.name in PRESETS else cfg)

  def summary(self) -> list[str]:
    """Lines for the prepare report."""
    return [f"tokenizer: {tokenizer_dir(self)}"]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=record_features("png"),
        metadata=tfds.core.MetadataDict(question_types=list(scenes.QUESTION_TYPES),
                                        position_rule=scenes.__doc__.split("\n\n")[1]))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    specs = {split: [example_spec(cfg.seed, split, i) for i in range(cfg.size(split))] for split in SPLITS}
    self._train_tokenizer(specs["train"])
    return {split: self._generate_examples(split, specs[split]) for split in SPLITS}

  def _generate_examples(self, split: str, specs: list[scenes.Example]):
    for i, spec in enumerate(specs):
      yield i, example_record(self.builder_config.seed, split, i, spec)

  def _train_tokenizer(self, specs: list[scenes.Example]) -> None:
    # Inside download_and_prepare, data_path is the temporary dir that becomes the dataset dir.
    from vlm_jax.inputs import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    texts = [t for spec in specs for t in corpus(spec)]
    if not texts:
      raise InputError("shapes_vqa: num_train must be > 0 to train the tokenizer.")
    # BPE: one piece per word of this small vocabulary (unigram split "large" and "user" into several).
    tokenizer_lib.train_sentencepiece(texts, self.builder_config.vocab_size, model_type="bpe").save(tokenizer_dir(self))


def tokenizer_dir(builder: tfds.core.DatasetBuilder) -> epath.Path:
  """Where preparing stored the tokenizer: `<data_dir>/shapes_vqa/<config>/<version>/tokenizer/`."""
  return epath.Path(builder.data_path) / "tokenizer"
