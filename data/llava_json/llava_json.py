"""llava_json: a LLaVA-format JSON file plus an image folder (local or gs://) as a TFDS builder.

`vlm-jax data prepare llava_json/NAME --json data.json --image-dir images/` writes one `train` split under
`<data_dir>/llava_json/NAME/`; NAME defaults to the JSON file's stem. Bad records are skipped or repaired
(records.py says which and why); the tallies are printed, stored in the DatasetInfo metadata and written to
`<data_path>/record_counts.json`. A file with no usable record is an error.
"""
from __future__ import annotations

import dataclasses
import json
import re

import tensorflow_datasets as tfds
from etils import epath

from vlm_jax.config import InputError
from vlm_jax.datasets.record_builder import RecordBuilder, record_features
from vlm_jax.datasets.llava_json import records

COUNTS_FILE = "record_counts.json"


@dataclasses.dataclass(eq=False)
class LlavaJsonConfig(tfds.core.BuilderConfig):
  json_path: str = ""
  image_dir: str = ""
  max_pixels: int = records.DEFAULT_MAX_PIXELS  # larger images are downscaled to fit


def config_name(json_path: str) -> str:
  return re.sub(r"[^a-z0-9_]+", "_", epath.Path(json_path).stem.lower()).strip("_") or "default"


class LlavaJson(RecordBuilder):
  """A LLaVA JSON conversation dataset; images keep their file bytes unless repaired (then PNG)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "negative_captions field (always empty here)."}

  @classmethod
  def from_options(cls, data_dir: str, config: str | None = None, *, json_path: str = "", image_dir: str = "",
                   max_pixels: int = records.DEFAULT_MAX_PIXELS) -> "LlavaJson":
    """Reading a prepared dataset needs only its config name; preparing needs json_path (and image_dir)."""
    if not config and not json_path:
      raise InputError("llava_json needs the LLaVA JSON file to prepare (`vlm-jax data prepare llava_json --json "
                       "FILE --image-dir DIR`, json_path=... from Python), or the name of a prepared one "
                       "(llava_json/NAME) to read.")
    name = config or config_name(json_path)
    return cls(data_dir=data_dir, config=LlavaJsonConfig(
        name=name, json_path=str(json_path), image_dir=str(image_dir or epath.Path(json_path).parent),
        max_pixels=int(max_pixels), description=f"LLaVA JSON {json_path}"))

  def summary(self) -> list[str]:
    counts = self.info.metadata.get("record_counts", {})
    return [f"{key}: {json.dumps(value)}" for key, value in counts.items()]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=record_features(None),
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    if not self.builder_config.json_path:
      raise InputError(f"llava_json/{self.builder_config.name} is not prepared under {self.data_dir}; "
                       "prepare it with json_path (--json) and image_dir (--image-dir).")
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    raw = records.read_json(epath.Path(cfg.json_path))
    image_dir = epath.Path(cfg.image_dir)
    counts = records.Counts()
    for index, record in enumerate(raw):
      example = counts.take(records.convert_record, record, index, image_dir, cfg.max_pixels)
      if example is not None:
        yield index, example
    summary = counts.finish(f"llava_json/{cfg.name}", cfg.json_path, len(raw),
                            f"check the JSON format and the image dir {cfg.image_dir}")
    # Runs inside download_and_prepare: data_path is the dir that becomes the dataset, and the metadata
    # is written after the split.
    self.info.metadata["record_counts"] = summary
    (epath.Path(self.data_path) / COUNTS_FILE).write_text(json.dumps(summary, indent=1) + "\n")
