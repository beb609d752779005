"""hf_parquet: Hugging Face Hub parquet shards (local or gs://) as a TFDS builder.

`vlm-jax data prepare hf_parquet/NAME --parquet 'DIR/data/*.parquet' --format trl|cauldron|vqa [--set ...]`
writes one split per shard prefix, as the Hub names its files (`data/train-00000-of-00004.parquet` ->
`train`; other names -> `train`, or all into `split=NAME`), under `<data_dir>/hf_parquet/NAME/`. NAME
defaults to the folder of the files (the one above `data/`). rows.py maps each row to a record (formats and
--set column names there) and says which records are skipped; the tallies are printed, stored in the
DatasetInfo metadata and in `<data_path>/record_counts.json`, per split. Shards are read one row group at a
time, `batch_rows` rows per batch, so memory stays bounded whatever the file size.

Records carry two fields beyond the common schema: `source` (cauldron's per-record source, a source column, or
--set source=NAME) and `references` (per assistant turn, every reference answer: all 10 of a VQAv2 question).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from etils import epath

from vlm_jax.config import InputError
from vlm_jax.datasets.llava_json import records
from vlm_jax.datasets.hf_parquet import rows
from vlm_jax.datasets.record_builder import RecordBuilder, record_features
from vlm_jax.inputs import files

COUNTS_FILE = "record_counts.json"
BATCH_ROWS = 64
FILE_HINT = "check the download (is it truncated?) or leave the file out of --parquet"
_SHARD = re.compile(r"(?P<split>[A-Za-z0-9_]+)-\d{5}-of-\d{5}\.parquet")
COLUMN_OPTIONS = tuple(f.name for f in dataclasses.fields(rows.Columns))


@dataclasses.dataclass(eq=False)
class HfParquetConfig(tfds.core.BuilderConfig):
  parquet: str = ""  # a file, or a glob of files
  format: str = ""   # trl | cauldron | vqa ("" = from the columns)
  split: str = ""    # every file into this split ("" = from the file names)
  columns: tuple[tuple[str, str], ...] = ()  # rows.Columns overrides
  max_pixels: int = records.DEFAULT_MAX_PIXELS
  batch_rows: int = BATCH_ROWS


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      **record_features(None),
      "source": tfds.features.Text(),
      # Flat pairs: TFDS cannot store nested sequences without TensorFlow.
      "references": tfds.features.Sequence({"turn": tfds.features.Scalar(np.int32), "text": tfds.features.Text()}),
  })


def expand(pattern: str) -> list[epath.Path]:
  """The files `pattern` names: one path, or a glob whose wildcards start in any path component."""
  parts = str(pattern).split("/")
  wild = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
  if wild is None:
    path = epath.Path(pattern).expanduser()
    return [path] if path.exists() else []
  root = epath.Path("/".join(parts[:wild]) or ".").expanduser()
  return sorted(p for p in root.glob("/".join(parts[wild:])) if not p.is_dir())


def shard_splits(paths: list[epath.Path], split: str = "") -> dict[str, list[epath.Path]]:
  """Files grouped by the split their Hub name says (`<split>-00000-of-00002.parquet`), else `train`."""
  out: dict[str, list[epath.Path]] = collections.defaultdict(list)
  for path in paths:
    match = _SHARD.fullmatch(path.name)
    out[split or (match.group("split") if match else "train")].append(path)
  return dict(out)


def config_name(pattern: str) -> str:
  """The dataset folder's name: the glob's fixed folder, or the one above it when that is `data/`."""
  parts = str(pattern).split("/")
  wild = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts) - 1)
  fixed = [p for p in parts[:wild] if p]
  while fixed and fixed[-1] == "data":
    fixed = fixed[:-1]
  return re.sub(r"[^a-z0-9_]+", "_", (fixed[-1] if fixed else "").lower()).strip("_") or "default"


def schema_names(path: epath.Path) -> list[str]:
  """The file's column names (reads its footer only); a file that is not parquet raises InputError."""
  with path.open("rb") as f, files.reading(path, "parquet file", FILE_HINT):
    return pq.ParquetFile(f).schema_arrow.names


def infer_format(names: list[str]) -> str:
  return "trl" if "messages" in names else "cauldron" if "texts" in names else "vqa"


def resolve_columns(path, names: list[str], fmt: str, columns: rows.Columns) -> tuple[rows.Columns, list[str]]:
  """(columns with this file's answer columns and vqa's `question_id` as the id when present, the columns to
  read). A missing column raises InputError naming the file and the columns it has."""
  if fmt == "vqa":
    have = [c for c in (columns.answer, columns.answers) if c and c in names]
    if not have:
      raise InputError(f"{path}: --format vqa needs an answer column ({columns.answer!r} or {columns.answers!r}); "
                       f"the file has {names}: name yours with --set answer=COLUMN or answers=COLUMN.")
    columns = dataclasses.replace(columns, answer=columns.answer if columns.answer in have else "",
                                  answers=columns.answers if columns.answers in have else "",
                                  id=columns.id or ("question_id" if "question_id" in names else ""))
  wanted = columns.wanted(fmt)
  missing = [c for c in wanted if c not in names]
  if missing:
    guess = infer_format(names)
    also = f" (these columns look like --format {guess})" if guess != fmt else ""
    raise InputError(f"{path}: --format {fmt} reads column(s) {missing}, which the file lacks; it has "
                     f"{names}{also}. Name the columns with --set (e.g. image=COLUMN question=COLUMN).")
  return columns, wanted


def parquet_rows(path: epath.Path, wanted: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[dict]:
  """The rows of one parquet file as dicts of the `wanted` columns: one row group at a time, in batches of
  `batch_rows` rows, so at most one row group is held. A file that is not parquet raises InputError."""
  with path.open("rb") as f:
    with files.reading(path, "parquet file", FILE_HINT):
      parquet = pq.ParquetFile(f)
    for group in range(parquet.num_row_groups):
      batches = parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=wanted, use_threads=False)
      while True:
        with files.reading(path, "parquet file", FILE_HINT):
          batch = next(batches, None)
        if batch is None:
          break
        yield from batch.to_pylist()


def _whole(key: str, value) -> int:
  if not (isinstance(value, int) and not isinstance(value, bool) or str(value).isdigit()) or int(value) < 1:
    raise InputError(f"hf_parquet option {key}={value!r}: expected a whole number >= 1.")
  return int(value)


class HfParquet(RecordBuilder):
  """Hub parquet datasets (TRL messages + images, the_cauldron, plain VQA tables); image bytes kept when JPEG
  or PNG, else re-encoded as PNG."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @classmethod
  def from_options(cls, data_dir: str, config: str | None = None, *, parquet: str = "", format: str = "",
                   split: str = "", max_pixels: int = records.DEFAULT_MAX_PIXELS, batch_rows: int = BATCH_ROWS,
                   **columns) -> "HfParquet":  # pylint: disable=redefined-builtin
    """Reading a prepared dataset needs only its config name; preparing needs `parquet` (and `format`)."""
    if not config and not parquet:
      raise InputError("hf_parquet needs the parquet files to prepare (`vlm-jax data prepare hf_parquet --parquet "
                       "'DIR/data/*.parquet' --format trl|cauldron|vqa`), or the name of a prepared one "
                       "(hf_parquet/NAME) to read.")
    unknown = sorted(set(columns) - set(COLUMN_OPTIONS))
    if unknown:
      raise InputError(f"Unknown hf_parquet option(s) {unknown}; valid: parquet, format, split, max_pixels, "
                       f"batch_rows, {', '.join(COLUMN_OPTIONS)}.")
    if format and format not in rows.FORMATS:
      raise InputError(f"hf_parquet format {format!r}: expected one of {', '.join(rows.FORMATS)}.")
    if split and not re.fullmatch(r"[A-Za-z0-9_]+", str(split)):
      raise InputError(f"hf_parquet option split={split!r}: use letters, digits and _ (e.g. split=validation).")
    return cls(data_dir=data_dir, config=HfParquetConfig(
        name=config or config_name(parquet), parquet=str(parquet), format=format, split=str(split),
        columns=tuple(sorted((k, str(v)) for k, v in columns.items())), description=f"Hugging Face parquet {parquet}",
        max_pixels=_whole("max_pixels", max_pixels), batch_rows=_whole("batch_rows", batch_rows)))

  def summary(self) -> list[str]:
    counts = self.info.metadata.get("record_counts", {})
    return [f"{split}: {json.dumps(value)}" for split, value in counts.items()]

  def _info(self) -> tfds.core.DatasetInfo:
    # Shuffled by TFDS (records keyed by file and row): order-keeping int keys would all land in one of the
    # Shuffler's disk buckets, which it then sorts in memory.
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features(),
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not cfg.parquet:
      raise InputError(f"hf_parquet/{cfg.name} is not prepared under {self.data_dir}; prepare it with "
                       "--parquet 'DIR/data/*.parquet' --format trl|cauldron|vqa.")
    paths = expand(cfg.parquet)
    if not paths:
      raise FileNotFoundError(f"No file matches --parquet {cfg.parquet!r}; give the Hub download's files, e.g. "
                              "'DIR/data/train-*.parquet' (quoted, so the shell leaves the * alone).")
    fmt = cfg.format
    if not fmt:
      fmt = infer_format(schema_names(paths[0]))
      print(f"hf_parquet/{cfg.name}: --format {fmt} (from the columns of {paths[0].name})")
    return {split: self._generate_examples(split, fmt, shards)
            for split, shards in shard_splits(paths, cfg.split).items()}

  def _generate_examples(self, split: str, fmt: str, paths: list[epath.Path]):
    cfg = self.builder_config
    counts, total = records.Counts(), 0
    for path in paths:
      columns, wanted = resolve_columns(path, schema_names(path), fmt, rows.Columns(**dict(cfg.columns)))
      for index, row in enumerate(parquet_rows(path, wanted, cfg.batch_rows)):
        total += 1
        key = f"{path.parent.name}/{path.stem}:{index}"
        example = counts.take(rows.convert_row, fmt, row, key, columns, cfg.max_pixels)
        if example is not None:
          yield key, example
    summary = counts.finish(f"hf_parquet/{cfg.name} {split}", f"{cfg.parquet} ({split})", total,
                            f"check --format {fmt} and the column names (--set)")
    # Runs inside download_and_prepare: data_path is the dir that becomes the dataset; the metadata is
    # written after the splits.
    self.info.metadata.setdefault("record_counts", {})[split] = summary
    (epath.Path(self.data_path) / COUNTS_FILE).write_text(
        json.dumps(dict(self.info.metadata["record_counts"]), indent=1) + "\n")
