"""hf_parquet: Hugging Face parquet shards (rows.py maps rows to records, hf_parquet.py builds)."""
from vlm_jax.datasets.hf_parquet.hf_parquet import COUNTS_FILE, HfParquet, HfParquetConfig

__all__ = ["COUNTS_FILE", "HfParquet", "HfParquetConfig"]
