"""A tiny prepared shapes_vqa (64/32/32 records, the `tiny` preset) shared by the data tests.

Import the fixture into a test module (`from fixtures_data import shapes_data_dir`); preparing is a no-op
when the session's copy already exists, so modules share one copy.
"""
import pytest
import tensorflow_datasets as tfds

from vlm_jax import datasets

SHAPES_TINY = "shapes_vqa/tiny"


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
  tfds.disable_progress_bar()
  root = str(tmp_path_factory.getbasetemp() / "shapes_data")
  datasets.prepare(SHAPES_TINY, root)
  return root
