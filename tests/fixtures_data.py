"""A tiny prepared shapes_vqa (64/32/32 records, the `tiny` preset) shared by the data tests, and a sideways
(EXIF-rotated) JPEG for the image readers.

Import the fixture into a test module (`from fixtures_data import shapes_data_dir`); preparing is a no-op
when the run's copy already exists, so modules share one copy.
"""
import numpy as np
import PIL.Image
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


def save_sideways_jpeg(path):
  """A 16 x 32 (h x w) JPEG stored as 32 x 16 with EXIF orientation 6 (rotate 90 degrees clockwise to view): its
  stored left half is white, so upright its top half is white."""
  stored = np.zeros((32, 16, 3), np.uint8)
  stored[:, :8] = 255
  exif = PIL.Image.Exif()
  exif[0x0112] = 6
  PIL.Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif)
  return path.name


def assert_upright(image, path):
  """`image` is the sideways JPEG at `path` turned upright, pixel for pixel as transformers loads it."""
  from transformers.image_utils import load_image  # pylint: disable=import-outside-toplevel
  assert image.shape == (16, 32, 3)
  assert image[:6].min() > 240 and image[10:].max() < 15  # white on top, black below
  np.testing.assert_array_equal(image, np.asarray(load_image(str(path))))
