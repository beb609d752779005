"""Images: resize/normalize, Idefics3 grid sizes, tile order and prompt strings (HF parity is in
test_hf_processors.py). Tiles stay uint8; the device's normalize_pixels equals the host's normalize."""
import jax
import numpy as np
import pytest
from fixtures_numerics import assert_f32_close
from PIL import Image

from vlm_jax.config import Config, DataConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlm_jax.inputs import images
from vlm_jax.model.vision import normalize_pixels


def config(splitting: bool, max_image_size: int = 64, mean=(0.5,) * 3, std=(0.5,) * 3) -> Config:
  """Tiles of 32 px, 4 x 4 patches of 8, pixel shuffle 2: 4 tokens per tile."""
  return Config(model=ModelConfig(vision=VisionConfig(image_size=32, patch_size=8, image_mean=mean, image_std=std),
                                  projector=ProjectorConfig(kind="pixel_shuffle", scale_factor=2)),
                data=DataConfig(image_splitting=splitting, max_image_size=max_image_size, resample="lanczos"))


def random_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_grey_image():
  g = images.grey_image(5)
  assert g.shape == (5, 5, 3) and g.dtype == np.uint8 and np.all(g == 128)


def test_normalize_values():
  x = np.array([[[0, 255, 51]]], np.uint8)
  np.testing.assert_allclose(images.normalize(x, (0.5,) * 3, (0.5,) * 3), [[[-1.0, 1.0, -0.6]]], rtol=1e-7)
  clip = images.normalize(x, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
  np.testing.assert_allclose(clip, [[[-0.48145466 / 0.26862954, (1 - 0.4578275) / 0.26130258,
                                      (0.2 - 0.40821073) / 0.27577711]]], rtol=1e-6)
  assert images.normalize(x, (0.5,) * 3, (0.5,) * 3).dtype == np.float32


def test_device_normalize_equals_the_host_normalize():
  """Every uint8 value through the ViT's on-device normalization equals the host's to float32 rounding (XLA turns
  x / c into x * (1 / c): an ulp at most); floats pass unchanged (already normalized)."""
  x = np.arange(256, dtype=np.uint8).reshape(-1, 1).repeat(3, axis=1)
  mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
  device = np.asarray(jax.jit(lambda p: normalize_pixels(p, mean, std))(x))
  assert device.dtype == np.float32
  assert_f32_close(device, images.normalize(x, mean, std), rtol=1e-6)
  floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
  np.testing.assert_array_equal(np.asarray(normalize_pixels(floats, mean, std)), floats)


def test_single_tile():
  cfg = config(splitting=False)
  img = random_image(20, 50)
  out = images.process_image(img, cfg)
  assert out.tiles.shape == (1, 32, 32, 3) and (out.rows, out.cols) == (0, 0) and out.tiles.dtype == np.uint8
  resized = Image.fromarray(img).resize((32, 32), Image.Resampling.LANCZOS)
  np.testing.assert_array_equal(out.tiles[0], np.asarray(resized))
  # a pixel-shuffle model's unsplit image is Idefics3's global-image string
  assert out.prompt == "<fake_token_around_image><global-img>" + "<image>" * 4 + "<fake_token_around_image>"
  # an MLP (LLaVA) model: one <image> per patch (4 x 4 patches of 8 px)
  llava = Config(model=ModelConfig(vision=cfg.model.vision), data=cfg.data)
  assert images.process_image(img, llava).prompt == "<image>" * 16


@pytest.mark.parametrize("shape, grid", [
    ((45, 70), (2, 2)),   # 70 -> 64, 45 -> int(41.1) = 41 -> 42 (even); both grow to 64
    ((33, 100), (1, 2)),  # 100 -> 64, 33 -> 21 -> 22 -> 32
    ((200, 31), (2, 1)),  # portrait: 200 -> 64, 31 -> 9 -> 10 -> 32
    ((10, 10), (2, 2)),   # small images are upscaled to the longest edge too (HF does)
])
def test_tile_grid(shape, grid):
  cfg = config(splitting=True)
  assert images.tile_grid(*shape, cfg) == grid
  out = images.process_image(random_image(*shape), cfg)
  assert (out.rows, out.cols) == grid
  assert out.tiles.shape == (grid[0] * grid[1] + 1, 32, 32, 3)
  assert images.tile_count(*grid) == len(out.tiles)


def test_tiles_are_row_major_crops_then_global():
  cfg = config(splitting=True)
  img = random_image(64, 64)  # already 64 x 64: both resizes are identities, crops are exact
  out = images.process_image(img, cfg)
  np.testing.assert_array_equal(out.tiles[0], img[:32, :32])
  np.testing.assert_array_equal(out.tiles[1], img[:32, 32:])
  np.testing.assert_array_equal(out.tiles[2], img[32:, :32])
  np.testing.assert_array_equal(out.tiles[3], img[32:, 32:])
  globl = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.LANCZOS))
  np.testing.assert_array_equal(out.tiles[4], globl)


def test_split_prompt_string():
  assert images.image_prompt(2, 1, 2, idefics3=True) == (
      "<fake_token_around_image><row_1_col_1><image><image>\n"
      "<fake_token_around_image><row_2_col_1><image><image>\n"
      "\n<fake_token_around_image><global-img><image><image><fake_token_around_image>")
  assert images.image_prompt(0, 0, 3, idefics3=True) == (
      "<fake_token_around_image><global-img><image><image><image><fake_token_around_image>")
  assert images.image_prompt(0, 0, 3, idefics3=False) == "<image><image><image>"


def test_no_split_when_image_fits_one_tile():
  cfg = config(splitting=True, max_image_size=32)
  out = images.process_image(random_image(40, 20), cfg)
  assert out.tiles.shape == (1, 32, 32, 3) and (out.rows, out.cols) == (0, 0)
  assert out.prompt.startswith("<fake_token_around_image><global-img>")


def test_grey_2d_input_and_bad_dtype():
  cfg = config(splitting=False)
  out = images.process_image(np.full((8, 8), 255, np.uint8), cfg)
  np.testing.assert_array_equal(out.tiles, np.full((1, 32, 32, 3), 255, np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    images.process_image(np.zeros((8, 8, 3), np.float32), cfg)
