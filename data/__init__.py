"""TFDS dataset builders, installed as `vlm_jax.datasets` (the folder is `data/`).

A dataset is named `builder` or `builder/config` (e.g. `shapes_vqa`, `shapes_vqa/tiny`,
`llava_json/llava_instruct`), the names `train.stages.*.datasets` use. Every builder writes the record
schema of `features.py`; `vlm_jax.inputs.loader` reads them back as plain dicts.
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from vlm_jax.config import InputError
from vlm_jax.datasets.hf_parquet import HfParquet
from vlm_jax.datasets.llava_json import LlavaJson
from vlm_jax.datasets.shapes_vqa import ShapesVqa

BUILDERS = {"shapes_vqa": ShapesVqa, "llava_json": LlavaJson, "hf_parquet": HfParquet}


def _expand(data_dir: str) -> str:
  return data_dir if "://" in str(data_dir) else os.path.expanduser(str(data_dir))


def get_builder(name: str, data_dir: str, **options) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name` ('builder' or 'builder/config') under `data_dir`, with builder options
  (shapes_vqa: num_train, num_validation, num_test, seed, vocab_size; llava_json: json_path, image_dir, ...;
  hf_parquet: parquet, format, column names, ...)."""
  builder_name, _, config = name.partition("/")
  if builder_name not in BUILDERS:
    raise InputError(f"Unknown dataset {builder_name!r}; known: {', '.join(BUILDERS)}.")
  return BUILDERS[builder_name].from_options(_expand(data_dir), config or None, **options)


def prepare(name: str, data_dir: str, **options) -> str:
  """Prepares dataset `name` into `data_dir` (no-op if already there); returns a short report."""
  builder = get_builder(name, data_dir, **options)
  builder.download_and_prepare()
  splits = ", ".join(f"{s}={info.num_examples}" for s, info in sorted(builder.info.splits.items()))
  lines = [f"{builder.name}/{builder.builder_config.name} {builder.version} at {builder.data_path}: {splits}"]
  lines += [f"  {line}" for line in builder.summary()]
  return "\n".join(lines)
