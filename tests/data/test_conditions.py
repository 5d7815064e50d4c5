"""Condition maps per data set: .npy arrays, LSUN label-id PNGs, CelebA-HQ edges from a photo."""

import numpy as np
import pytest
from PIL import Image
from skimage import data, feature

from configs import celebahq, deepfashion, lsun_church
from midms_jax.data import conditions, images
from midms_jax.errors import InputError

CELEBA = celebahq.get_config("tiny")
LSUN = lsun_church.get_config("tiny")
FASHION = deepfashion.get_config("tiny")


@pytest.fixture(name="photo")
def _photo(tmp_path):
  path = tmp_path / "face.png"
  Image.fromarray(data.astronaut()).resize((64, 64), Image.BICUBIC).save(path)
  return path


def _expect_error(path, config, *phrases, factor=1):
  with pytest.raises(InputError) as info:
    conditions.load_condition(path, config, factor)
  message = str(info.value)
  assert message.startswith(f"{path}: ") and "\n" not in message
  for phrase in phrases:
    assert phrase in message, message


def test_celebahq_edges_from_a_photo(photo):
  rgb = images.read_rgb(photo)
  condition = conditions.load_condition(photo, CELEBA, factor=8)
  assert condition.shape == (64, 64, 15) and condition.dtype == np.float32
  gray = np.asarray(Image.fromarray(rgb).convert("L"))
  expected = feature.canny(gray.astype(np.float64) / 255, sigma=1.0, low_threshold=0.1, high_threshold=0.2)
  assert expected.any() and not expected.all()
  np.testing.assert_array_equal(condition[..., 0], expected.astype(np.float32))
  np.testing.assert_array_equal(condition[..., 1:14], 1.0)  # no part masks: distance maps saturate at 255/255
  np.testing.assert_array_equal(condition[..., 14], 0.0)    # no part boundaries
  np.testing.assert_array_equal(conditions.celebahq_edges(rgb), condition)


def test_npy_condition(tmp_path):
  array = np.random.default_rng(0).uniform(size=(16, 24, 15))
  np.save(tmp_path / "c.npy", array)
  condition = conditions.load_condition(tmp_path / "c.npy", CELEBA, factor=8)
  assert condition.dtype == np.float32
  np.testing.assert_array_equal(condition, array.astype(np.float32))
  np.save(tmp_path / "f.npy", np.zeros((32, 32, 20), np.uint8))
  assert conditions.load_condition(tmp_path / "f.npy", FASHION).shape == (32, 32, 20)


@pytest.mark.parametrize("array, phrases", [
    (np.zeros((32, 32, 14)), ("condition has 14 channels, the config expects 15",)),
    (np.zeros((15, 32, 32)), ("32 channels", "channels first")),
    (np.zeros((32, 32)), ("expected an (H, W, C) condition array, found shape (32, 32)",)),
    (np.full((32, 32, 15), 255.0), ("values must lie in [0, 1], found 255..255",)),
    (np.full((32, 32, 15), np.nan), ("values must lie in [0, 1]",)),
    (np.zeros((36, 32, 15)), ("size 32x36 is not divisible by 8",)),
])
def test_bad_npy_conditions(tmp_path, array, phrases):
  np.save(tmp_path / "bad.npy", array)
  _expect_error(tmp_path / "bad.npy", CELEBA, *phrases, factor=8)


def test_unreadable_npy(tmp_path):
  _expect_error(tmp_path / "missing.npy", CELEBA, "no such file")
  np.save(tmp_path / "cut.npy", np.zeros((32, 32, 15)))
  (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:200])
  _expect_error(tmp_path / "cut.npy", CELEBA, "not a readable .npy array")
  np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  _expect_error(tmp_path / "obj.npy", CELEBA, "not a readable .npy array")


def test_lsun_label_png_one_hot(tmp_path):
  ids = np.random.default_rng(0).integers(0, 150, (32, 32)).astype(np.uint8)
  ids[0, :4] = 255
  Image.fromarray(ids, "L").save(tmp_path / "seg.png")
  channels = LSUN.model.correspondence.label_channels
  assert channels == 151 and conditions.condition_kind(tmp_path / "seg.png") == "labels"
  condition = conditions.load_condition(tmp_path / "seg.png", LSUN, factor=8)
  assert condition.shape == (32, 32, 151) and condition.dtype == np.float32
  np.testing.assert_array_equal(condition.sum(-1), 1.0)
  np.testing.assert_array_equal(condition.argmax(-1), np.where(ids == 255, 150, ids))


def test_lsun_refuses_bad_ids_and_photos(tmp_path, photo):
  Image.fromarray(np.full((32, 32), 200, np.uint8), "L").save(tmp_path / "seg.png")
  _expect_error(tmp_path / "seg.png", LSUN, "label ids must be 0..149 or 255 (don't care), found 200")
  _expect_error(photo, LSUN, "lsun_church conditions cannot be computed from a photo", "label-id PNG",
                "(H, W, 151) .npy")


def test_other_data_sets_refuse_photos_and_label_maps(tmp_path, photo):
  _expect_error(photo, FASHION, "deepfashion conditions cannot be computed from a photo", "(H, W, 20) .npy")
  Image.open(photo).convert("L").save(tmp_path / "gray.png")
  _expect_error(tmp_path / "gray.png", CELEBA, "grayscale image (mode L) is read as a label-id map",
                "only lsun_church", "RGB photo")
  Image.open(photo).convert("RGBA").save(tmp_path / "rgba.png")
  _expect_error(tmp_path / "rgba.png", CELEBA, "RGB + alpha image (mode RGBA); an RGB photo is required")


def test_condition_kind(tmp_path, photo):
  np.save(tmp_path / "c.npy", np.zeros((8, 8, 15)))
  Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P").save(tmp_path / "p.png")
  Image.open(photo).convert("RGB").save(tmp_path / "face.jpg")
  assert [conditions.condition_kind(tmp_path / n) for n in ("c.npy", "p.png", "face.jpg")] == \
         ["array", "labels", "photo"]
