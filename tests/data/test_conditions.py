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
  expected = feature.canny(
      gray.astype(np.float64) / 255, sigma=1.0, low_threshold=0.1, high_threshold=0.2
  )
  assert expected.any() and not expected.all()
  np.testing.assert_array_equal(condition[..., 0], expected.astype(np.float32))
  # no part masks: distance maps saturate at 255/255
  np.testing.assert_array_equal(condition[..., 1:14], 1.0)
  np.testing.assert_array_equal(condition[..., 14], 0.0)  # no part boundaries
  np.testing.assert_array_equal(conditions.celebahq_edges(rgb), condition)


def test_npy_condition(tmp_path):
  array = np.random.default_rng(0).uniform(size=(16, 24, 15))
  np.save(tmp_path / "c.npy", array)
  condition = conditions.load_condition(tmp_path / "c.npy", CELEBA, factor=8)
  assert condition.dtype == np.float32
  np.testing.assert_array_equal(condition, array.astype(np.float32))
  np.save(tmp_path / "f.npy", np.zeros((32, 32, 20), np.uint8))
  assert conditions.load_condition(tmp_path / "f.npy", FASHION).shape == (32, 32, 20)


@pytest.mark.parametrize(
    "array, phrases",
    [
        (np.zeros((32, 32, 14)), ("condition has 14 channels, the config expects 15",)),
        (np.zeros((15, 32, 32)), ("32 channels", "channels first")),
        (np.zeros((32, 32)), ("expected an (H, W, C) condition array, found shape (32, 32)",)),
        (np.full((32, 32, 15), 255.0), ("values must lie in [0, 1], found 255..255",)),
        (np.full((32, 32, 15), np.nan), ("values must lie in [0, 1]",)),
        (np.zeros((36, 32, 15)), ("size 32x36 is not divisible by 8",)),
    ],
)
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
  _expect_error(
      tmp_path / "seg.png",
      LSUN,
      "label ids must be 0..150 or 255 (read as 150, don't care), found 200",
  )
  _expect_error(
      photo,
      LSUN,
      "lsun_church conditions cannot be computed from a photo",
      "label-id PNG",
      "(H, W, 151) .npy",
  )


def test_other_data_sets_refuse_photos_and_label_maps(tmp_path, photo):
  _expect_error(
      photo, FASHION, "deepfashion conditions cannot be computed from a photo", "(H, W, 20) .npy"
  )
  Image.open(photo).convert("L").save(tmp_path / "gray.png")
  _expect_error(
      tmp_path / "gray.png",
      CELEBA,
      "grayscale image (mode L) is read as a label-id map",
      "only lsun_church",
      "RGB photo",
  )
  Image.open(photo).convert("RGBA").save(tmp_path / "rgba.png")
  _expect_error(
      tmp_path / "rgba.png", CELEBA, "RGB + alpha image (mode RGBA); an RGB photo is required"
  )


def test_condition_kind(tmp_path, photo):
  np.save(tmp_path / "c.npy", np.zeros((8, 8, 15)))
  Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P").save(tmp_path / "p.png")
  Image.open(photo).convert("RGB").save(tmp_path / "face.jpg")
  assert [conditions.condition_kind(tmp_path / n) for n in ("c.npy", "p.png", "face.jpg")] == [
      "array",
      "labels",
      "photo",
  ]


# ---------------------------------------------------------------------------------------------------
# CelebA-HQ rendering (official get_label_tensor), hand-built cases
# ---------------------------------------------------------------------------------------------------


def test_boundaries_mark_both_sides_of_a_square():
  mask = np.zeros((8, 8), np.uint8)
  mask[2:6, 2:6] = 255
  expected = np.zeros((8, 8), np.uint8)
  expected[2:6, 2:6] = 1
  expected[3:5, 3:5] = 0  # the square's interior is not on a boundary
  expected[1, 2:6] = expected[6, 2:6] = 1  # outside neighbours above / below
  expected[2:6, 1] = expected[2:6, 6] = (
      1  # and left / right (corners' diagonals are not neighbours)
  )
  np.testing.assert_array_equal(conditions.boundaries(mask), expected)
  np.testing.assert_array_equal(conditions.boundaries(np.full((4, 4), 255)), 0)


def test_distance_map_is_l1_over_3_clipped_and_truncated():
  boundary = np.zeros((1, 800), np.uint8)
  boundary[0, 0] = 1
  distance = conditions.distance_uint8(255 - boundary * 255)
  assert distance.dtype == np.uint8
  # L1 distance d -> floor(d / 3): 0 0 0 1 1 1 2 ..., saturating at 255 from d = 765 on
  np.testing.assert_array_equal(distance[0], np.minimum(np.arange(800) // 3, 255))
  # no boundary
  np.testing.assert_array_equal(conditions.distance_uint8(np.full((3, 3), 255, np.uint8)), 255)


def _step_photo(size=40):
  """Dark left half, bright right half: Canny edges along the middle columns."""
  rgb = np.zeros((size, size, 3), np.uint8)
  rgb[:, size // 2 :] = 200
  return rgb


def test_celebahq_parts_edges_and_distance_maps():
  skin = np.zeros((40, 40), bool)
  skin[5:35] = True  # rows 5..34, full width: boundary rows 4, 5 and 34, 35
  hair = np.zeros((40, 40), bool)
  hair[5:15] = True  # inside skin, but hair keeps the Canny edges
  rgb = _step_photo()
  condition = conditions.celebahq_condition(rgb, {"skin": skin, "hair": hair})
  assert condition.shape == (40, 40, 15) and condition.dtype == np.float32
  assert condition.min() >= 0 and condition.max() <= 1

  union = np.zeros((40, 40), np.float32)
  union[[4, 5, 14, 15, 34, 35]] = 1  # skin's and hair's 2-px lines
  np.testing.assert_array_equal(condition[..., 14], union)
  canny = feature.canny(np.asarray(Image.fromarray(rgb).convert("L")))
  columns = np.flatnonzero(canny[25])
  assert columns.size and canny[10, columns].all() and canny[38, columns].all()
  np.testing.assert_array_equal(condition[25, columns, 0], 0)  # inside skin: Canny dropped
  np.testing.assert_array_equal(condition[10, columns, 0], 1)  # inside hair: kept
  np.testing.assert_array_equal(condition[38, columns, 0], 1)  # outside every part: kept
  np.testing.assert_array_equal(
      condition[..., 0],
      np.maximum(
          union,
          canny * ((np.arange(40) < 5) | (np.arange(40) >= 35) | hair[:, :1].ravel())[:, None],
      ),
  )

  # channel 1 = skin; rows' L1 distance to rows 4, 5, 34, 35, / 3
  skin_map = condition[:, 7, 1] * 255
  rows = np.arange(40)
  distance = np.min(np.abs(rows[:, None] - np.array([4, 5, 34, 35])[None]), axis=1)
  np.testing.assert_allclose(skin_map, distance // 3, atol=1e-4)
  hair_map = condition[:, 7, 13] * 255  # channel 13 = hair (the last part)
  np.testing.assert_allclose(
      hair_map, np.min(np.abs(rows[:, None] - np.array([4, 5, 14, 15])), 1) // 3, atol=1e-4
  )
  np.testing.assert_array_equal(condition[..., 2:13], 1.0)  # missing parts: 255 / 255 everywhere


def test_celebahq_mask_forms_folder_layout_and_load_size(tmp_path):
  skin = np.zeros((64, 64), np.uint8)
  skin[10:50, 12:40] = 255
  folder = tmp_path / "CelebAMask-HQ-mask-anno" / "1"  # id 2001 // 2000
  folder.mkdir(parents=True)
  Image.fromarray(skin).save(folder / "02001_skin.png")
  Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "02001_eye_g.png")
  masks = conditions.celebahq_part_masks(tmp_path / "CelebAMask-HQ-mask-anno", 2001)
  assert sorted(masks) == ["eye_g", "skin"]
  rgb = np.asarray(Image.fromarray(data.astronaut()).resize((64, 64), Image.BICUBIC))
  from_files = conditions.celebahq_condition(Image.fromarray(rgb), masks, load_size=32)
  assert from_files.shape == (32, 32, 15)
  for same_masks in (
      {"skin": skin > 0},
      {"skin": skin // 255},
      {"skin": skin.astype(np.float64) / 255},
  ):
    np.testing.assert_array_equal(
        conditions.celebahq_condition(rgb, {**same_masks, "eye_g": None}, 32),
        conditions.celebahq_condition(rgb, {**same_masks}, 32),
    )
  np.testing.assert_array_equal(
      conditions.celebahq_condition(rgb, {"skin": skin > 0}, 32)[..., :12], from_files[..., :12]
  )
  # an empty eye_g mask has no boundary either
  np.testing.assert_array_equal(from_files[..., 12], 1.0)
  np.testing.assert_array_equal(
      conditions.celebahq_condition(rgb / 255.0, None, 32),
      conditions.celebahq_condition(rgb, None, 32),
  )
  with pytest.raises(ValueError, match="unknown CelebA-HQ part"):
    conditions.celebahq_condition(rgb, {"nose_tip": skin})


def test_empty_canny_on_a_structured_photo_warns(monkeypatch):
  import warnings  # pylint: disable=import-outside-toplevel

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    conditions.celebahq_condition(_step_photo(), name="fine.jpg")
    # no structure: silent
    conditions.celebahq_condition(np.full((40, 40, 3), 90, np.uint8), name="flat.jpg")
  monkeypatch.setattr(conditions.feature, "canny", lambda image: np.zeros(image.shape, bool))
  with pytest.warns(RuntimeWarning, match=r"^face_0042\.jpg: Canny found no edges"):
    condition = conditions.celebahq_condition(_step_photo(), name="face_0042.jpg")
  np.testing.assert_array_equal(condition[..., 0], 0)


# ---------------------------------------------------------------------------------------------------
# DeepFashion pose rendering (official get_label_tensor)
# ---------------------------------------------------------------------------------------------------


def _skeleton(points: dict[int, tuple[float, float]]):
  """candidate rows (x, y, score, id) and an 18-index subset for 1-based keypoint ids -> (x, y)."""
  candidate = np.array([(x, y, 0.9, i) for i, (x, y) in enumerate(points.values())], np.float64)
  subset = np.full(20, -1.0)
  subset[18:] = (5.0, len(points))
  for row, keypoint in enumerate(points):
    subset[keypoint - 1] = row
  return candidate, subset


def test_deepfashion_circles_limbs_and_distance_maps():
  # 1 = nose, 2 = neck: limb (2, 1) is limb 12; 5 = right wrist alone (its limbs miss keypoint 4)
  candidate, subset = _skeleton({1: (10.0, 30.0), 2: (40.0, 30.0), 5: (50.0, 8.0)})
  condition = conditions.deepfashion_condition(candidate, subset, (40, 64), load_size=None)
  assert condition.shape == (40, 64, 20) and condition.dtype == np.float32
  assert condition.min() >= 0 and condition.max() <= 1
  rgb = np.rint(condition[..., :3] * 255).astype(int)
  # wrist: colour (170, 255, 0) drawn into BGR, so RGB (0, 255, 170); x = column, y = row; radius 4
  for dx, dy in ((0, 0), (3, 0), (0, -3), (-2, 2)):
    np.testing.assert_array_equal(rgb[8 + dy, 50 + dx], (0, 255, 170))
  np.testing.assert_array_equal(rgb[8, 56], 0)
  np.testing.assert_array_equal(rgb[16, 50], 0)
  # limb 12, colour (0, 0, 255) -> RGB (255, 0, 0), blended at 0.6 over black between the circles
  np.testing.assert_array_equal(rgb[30, 16:35], np.tile((153, 0, 0), (19, 1)))
  np.testing.assert_array_equal(rgb[30 - 4, 25], (153, 0, 0))  # half-width stickwidth 4
  np.testing.assert_array_equal(rgb[30 - 6, 25], 0)
  limb = condition[..., 3 + 12] * 255
  np.testing.assert_allclose(limb[30, 10:41], 0)  # the ellipse covers the whole segment
  # row 0 is 26 px above the ellipse's top (row 26)
  np.testing.assert_allclose(limb[0, 25], 26 // 3, atol=1e-4)
  for k in set(range(17)) - {12}:
    np.testing.assert_array_equal(condition[..., 3 + k], 1.0)  # missing endpoints: all-ones maps


def test_deepfashion_diagonal_limb_and_load_size():
  candidate, subset = _skeleton({1: (12.0, 12.0), 2: (36.0, 36.0)})
  _, masks = conditions.render_pose(candidate, subset, (48, 48))
  # half-axis int(33.94 / 2) = 16 < 16.97: the endpoints themselves fall just outside
  steps = np.arange(13, 36)
  assert (masks[12][steps, steps] == 255).all()  # the rotated ellipse covers the diagonal
  assert masks[12][12, 12] == 0
  assert masks[12][12, 36] == 0 and masks[12][36, 12] == 0
  full = conditions.deepfashion_condition(candidate, subset, (48, 48), load_size=None)
  small = conditions.deepfashion_condition(candidate, subset, (48, 48), load_size=24)
  assert small.shape == (24, 24, 20)
  pose = Image.fromarray(np.rint(full[..., :3] * 255).astype(np.uint8)).resize(
      (24, 24), Image.NEAREST
  )
  np.testing.assert_array_equal(small[..., :3], np.asarray(pose, np.float32) / 255)
  assert small[..., 3 + 12].min() == 0 and small[..., 3 + 12].max() < 1


def test_openpose_readers(tmp_path):
  candidate, subset = _skeleton({1: (10.5, 30.25), 2: (40.0, 30.0)})
  np.savetxt(tmp_path / "x_candidate.txt", candidate)
  np.savetxt(tmp_path / "x_subset.txt", subset[None])
  (tmp_path / "y_candidate.txt").write_text("10.5, 30.25, 0.9, 0\n40, 30, 0.9, 1\n")
  np.testing.assert_array_equal(conditions.read_candidate(tmp_path / "x_candidate.txt"), candidate)
  np.testing.assert_array_equal(conditions.read_candidate(tmp_path / "y_candidate.txt"), candidate)
  np.testing.assert_array_equal(conditions.read_subset(tmp_path / "x_subset.txt"), subset[:18])
  (tmp_path / "empty.txt").write_text("")
  assert conditions.read_candidate(tmp_path / "empty.txt").shape == (0, 4)
  (tmp_path / "two.txt").write_text("0 " * 20 + "\n" + "0 " * 20 + "\n")
  with pytest.raises(InputError, match="expected one row of at least 18"):
    conditions.read_subset(tmp_path / "two.txt")
  with pytest.raises(InputError, match="no such file"):
    conditions.read_candidate(tmp_path / "missing.txt")
  with pytest.raises(ValueError, match="candidate row 2, but there are 2"):
    conditions.deepfashion_condition(candidate, np.r_[subset[:17], 2.0], (32, 32))
  assert conditions.deepfashion_pose_paths("D/DeepFashion/img/WOMEN/id_1/02_1_front.jpg") == (
      "D/DeepFashion/pose/WOMEN/id_1/02_1_front_candidate.txt",
      "D/DeepFashion/pose/WOMEN/id_1/02_1_front_subset.txt",
  )


def test_lsun_one_hot_resized_nearest(tmp_path):
  ids = np.array([[0, 1], [149, 255]], np.uint8)
  one_hot = conditions.one_hot_labels(
      Image.fromarray(ids, "L"), tmp_path / "seg.png", 151, load_size=4
  )
  assert one_hot.shape == (4, 4, 151)
  np.testing.assert_array_equal(
      one_hot.argmax(-1), np.kron([[0, 1], [149, 150]], np.ones((2, 2), int))
  )
  np.testing.assert_array_equal(one_hot.sum(-1), 1.0)
