"""The on-disk record schema every builder writes (DESIGN.md, "Dataset records") and their common base.

Strings are stored as TFDS Text (read back as bytes); `turns` as a sequence of {role, content}; images as
encoded bytes (PNG, or the source file's own JPEG/PNG bytes), decoded to uint8 [h, w, 3] on read.
"""
from __future__ import annotations

import tensorflow_datasets as tfds

from vlm_jax.datasets import shuffle_buckets


def record_features(encoding_format: str | None = "png") -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "id": text(),
      "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format)),
      "caption": text(),
      "turns": tfds.features.Sequence({"role": text(), "content": text()}),
      "question_types": tfds.features.Sequence(text()),
      # Captions that are false for the (single) image, for contrastive hard negatives; empty if none.
      "negative_captions": tfds.features.Sequence(text()),
  })


class RecordBuilder(tfds.core.GeneratorBasedBuilder):
  """A GeneratorBasedBuilder writing array_record files of `record_features`, with no downloads."""

  # Nothing is downloaded, so there are no URL checksums to look up. Looking them up resolves the
  # builder's code path, which needs the `importlib_resources` backport when the builder lives in a package.
  url_infos = None

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    shuffle_buckets.install()  # splits over 1 GB spill to disk, which TFDS cannot do without TensorFlow
    super().__init__(file_format=file_format, **kwargs)

  def summary(self) -> list[str]:
    """Extra lines for the prepare report."""
    return []
