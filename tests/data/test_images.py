"""Photo loading / saving: value mapping, refused inputs with one-line messages, atomic writes."""

import numpy as np
import pytest
from PIL import Image

from configs import celebahq, lsun_church
from midms_jax.data import images
from midms_jax.errors import InputError


def _rgb(height=32, width=32, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path, rgb):
  Image.fromarray(rgb).save(path)
  return path


def _expect_error(path, *phrases, factor=1):
  with pytest.raises(InputError) as info:
    images.load_image(path, factor)
  message = str(info.value)
  assert message.startswith(f"{path}: ") and "\n" not in message
  for phrase in phrases:
    assert phrase in message, message
  return message


def test_downsampling_factor():
  assert images.downsampling_factor(celebahq.get_config("tiny").model) == 4 * 2
  assert images.downsampling_factor(celebahq.get_config().model) == 4 * 8
  assert images.downsampling_factor(lsun_church.get_config().model) == 8 * 16


def test_load_image_maps_uint8_to_minus1_1(tmp_path):
  rgb = _rgb(16, 24)
  rgb[0, 0], rgb[0, 1] = 0, 255
  Image.fromarray(rgb).save(tmp_path / "a.png")
  image = images.load_image(tmp_path / "a.png", factor=8)
  assert image.dtype == np.float32 and image.shape == (16, 24, 3)
  np.testing.assert_array_equal(image, (rgb.astype(np.float32) / 255) * 2 - 1)
  assert image[0, 0, 0] == -1 and image[0, 1, 0] == 1


def test_exif_orientation_is_applied(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  Image.fromarray(_rgb(16, 32)).save(tmp_path / "phone.jpg", exif=exif)
  assert images.load_image(tmp_path / "phone.jpg").shape == (32, 16, 3)


@pytest.mark.parametrize(
    "mode, phrase",
    [
        ("L", "grayscale image (mode L)"),
        ("RGBA", "RGB + alpha image (mode RGBA)"),
        ("P", "palette image (mode P)"),
        ("LA", "grayscale + alpha image (mode LA)"),
    ],
)
def test_non_rgb_modes_are_refused(tmp_path, mode, phrase):
  path = tmp_path / f"x_{mode}.png"
  Image.fromarray(_rgb()).convert(mode).save(path)
  _expect_error(path, phrase, "an RGB photo is required")


def test_missing_corrupt_and_directory(tmp_path):
  _expect_error(tmp_path / "nope.png", "no such file")
  _expect_error(tmp_path, "not a file")
  good = tmp_path / "good.png"
  Image.fromarray(_rgb()).save(good)
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(good.read_bytes()[:120])
  _expect_error(truncated, "not a readable image")
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"not an image at all")
  _expect_error(garbage, "not a readable image")


def test_size_must_be_divisible_by_the_factor(tmp_path):
  path = tmp_path / "odd.png"
  Image.fromarray(_rgb(36, 40)).save(path)
  _expect_error(path, "size 40x36 is not divisible by 8", "down-sampling factor", "40x32", factor=8)
  assert images.load_image(path, factor=4).shape == (36, 40, 3)


def test_save_image_png_values_and_clamping(tmp_path):
  image = np.array([[[-1.0, 0.0, 1.0], [-3.0, 2.0, 0.5]]], np.float32)
  images.save_image(tmp_path / "x.png", image, "png")
  pixels = np.asarray(Image.open(tmp_path / "x.png"))
  # (x + 1) / 2 * 255 + 0.5, truncated: 0 -> 128, 0.5 -> 191.75 -> 191
  np.testing.assert_array_equal(pixels, [[[0, 128, 255], [0, 255, 191]]])
  assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left


def test_save_then_load_round_trip(tmp_path):
  image = images.load_image(_save(tmp_path / "a.png", _rgb()))
  images.save_image(tmp_path / "b.png", image)
  np.testing.assert_array_equal(images.load_image(tmp_path / "b.png"), image)


def test_save_image_jpg_and_bad_format(tmp_path):
  image = images.load_image(_save(tmp_path / "a.png", _rgb()))
  images.save_image(tmp_path / "a.jpg", image, "jpg")
  with Image.open(tmp_path / "a.jpg") as saved:
    assert saved.format == "JPEG" and saved.size == (32, 32)
  with pytest.raises(ValueError, match="format"):
    images.save_image(tmp_path / "a.gif", image, "gif")
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    images.save_image(tmp_path / "b.png", image[..., :1], "png")


def test_tile_columns_puts_each_batch_in_a_column_top_to_bottom():
  a = np.arange(2 * 2 * 1 * 1, dtype=np.float32).reshape(2, 2, 1, 1)
  tiled = images.tile_columns([a, a + 10])
  np.testing.assert_array_equal(tiled[..., 0], [[0, 10], [1, 11], [2, 12], [3, 13]])
