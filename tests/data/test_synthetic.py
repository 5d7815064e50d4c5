"""The embedded synthetic data set: determinism, encoding, exemplar pairing, fairness of the ground
truth."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from midms_jax.data import synthetic

CONFIG = synthetic.SyntheticConfig(image_size=32, train_size=50, validation_size=10)
HARD = dataclasses.replace(CONFIG, antialias=False)
CLASS_CHANNELS = slice(0, synthetic.EDGE_CHANNEL)


def _segment_residual(pixels: np.ndarray, colours: np.ndarray) -> float:
  """Largest distance of RGB ``pixels`` in [0, 1] from the segment between the two ``colours``."""
  c0, c1 = colours.astype(np.float64)
  t = np.clip((pixels - c0) @ (c1 - c0) / max(float((c1 - c0) @ (c1 - c0)), 1e-12), 0, 1)
  return float(np.max(np.abs(pixels - (c0 + t[:, None] * (c1 - c0))), initial=0.0))


def _centroid(weights: np.ndarray) -> np.ndarray:
  grid = np.mgrid[: weights.shape[0], : weights.shape[1]]
  return (grid * weights).sum(axis=(1, 2)) / weights.sum()


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_dtypes_ranges(size):
  config = dataclasses.replace(CONFIG, image_size=size)
  item = synthetic.sample(0, config)
  assert sorted(item) == ["image", "label", "label_ref", "ref"]
  for key in ("image", "ref"):
    assert item[key].shape == (size, size, 3) and item[key].dtype == np.float32
    assert -1 <= item[key].min() and item[key].max() <= 1
  for key in ("label", "label_ref"):
    label = item[key]
    assert label.shape == (size, size, synthetic.LABEL_CHANNELS) and label.dtype == np.float32
    assert 0 <= label.min() and label.max() <= 1
    np.testing.assert_allclose(label[..., CLASS_CHANNELS].sum(-1), 1, atol=1e-5)
    assert set(np.unique(label[..., synthetic.EDGE_CHANNEL])) <= {0.0, 1.0}


def test_hard_rendering_gives_an_exact_one_hot():
  label = synthetic.sample(1, HARD)["label"][..., CLASS_CHANNELS]
  assert set(np.unique(label)) == {0.0, 1.0}
  assert np.all(label.sum(-1) == 1)


def test_deterministic_per_index_and_random_access():
  source = synthetic.SyntheticSource(CONFIG)
  later = source[7]
  for index in (3, 0, 7, 49):
    first, again = synthetic.sample(index, CONFIG), source[index]
    for key in first:
      np.testing.assert_array_equal(first[key], again[key])
  np.testing.assert_array_equal(later["image"], source[np.int64(7)]["image"])


@pytest.mark.parametrize("other", [dict(index=4), dict(split="validation"), dict(seed=1)])
def test_indices_splits_and_seeds_differ(other):
  base = synthetic.sample(3, CONFIG)
  config = dataclasses.replace(CONFIG, seed=other.get("seed", CONFIG.seed))
  item = synthetic.sample(other.get("index", 3), config, other.get("split", "train"))
  assert not np.array_equal(base["image"], item["image"])
  assert not np.array_equal(base["label"], item["label"])


@pytest.mark.parametrize("config", [HARD, CONFIG], ids=["hard", "antialiased"])
def test_label_classes_carry_their_object_colours(config):
  """Pixels fully of class k show object k's texture: a mix of exactly its two colours."""
  for index in range(6):
    item, scene = synthetic.sample(index, config), synthetic.scene(index, config)
    for layout, image, label in (
        (scene.layout, item["image"], item["label"]),
        (scene.layout_ref, item["ref"], item["label_ref"]),
    ):
      rgb = (image.astype(np.float64) + 1) / 2
      background = label[..., 0] == 1
      assert background.any()
      assert _segment_residual(rgb[background], scene.background.colours[0]) < 1e-5
      for row, shape in enumerate(layout.classes):
        inside = label[..., shape + 1] == 1
        assert inside.sum() >= 4, (index, synthetic.SHAPES[shape])
        assert _segment_residual(rgb[inside], scene.objects.colours[row]) < 1e-5
      absent = [k for k in range(len(synthetic.SHAPES)) if k not in layout.classes]
      assert np.all(label[..., [k + 1 for k in absent]] == 0)


def test_edges_surround_objects():
  label = synthetic.sample(2, HARD)["label"]
  ids = np.argmax(label[..., CLASS_CHANNELS], axis=-1)
  changes = np.zeros(ids.shape, bool)
  changes[1:] |= ids[1:] != ids[:-1]
  changes[:, 1:] |= ids[:, 1:] != ids[:, :-1]
  edge = label[..., synthetic.EDGE_CHANNEL] == 1
  assert changes.any() and np.all(edge[changes])
  assert not edge[ids == 0].all() and not edge[ids != 0].all()


def test_exemplar_has_the_same_objects_elsewhere():
  for index in range(10):
    item, scene = synthetic.sample(index, CONFIG), synthetic.scene(index, CONFIG)
    np.testing.assert_array_equal(scene.layout.classes, scene.layout_ref.classes)
    np.testing.assert_array_equal(scene.layout.angles, scene.layout_ref.angles)
    present = lambda label: set(
        np.flatnonzero(label[..., 1 : synthetic.EDGE_CHANNEL].max(axis=(0, 1)) >= 0.5)
    )
    assert (
        present(item["label"]) == present(item["label_ref"]) == set(scene.layout.classes.tolist())
    )
    moves = [
        np.linalg.norm(
            _centroid(item["label"][..., k + 1]) - _centroid(item["label_ref"][..., k + 1])
        )
        for k in scene.layout.classes
    ]
    assert np.mean(moves) > 2, (index, moves)
    assert not np.allclose(scene.layout.radii, scene.layout_ref.radii)


def test_ground_truth_is_not_a_function_of_the_condition():
  """Same layout stream, different appearance streams: identical condition maps, different
  photos."""
  rng = np.random.default_rng
  first = synthetic.render_scene(synthetic.make_scene(rng(0), rng(1), CONFIG), CONFIG)
  second = synthetic.render_scene(synthetic.make_scene(rng(0), rng(2), CONFIG), CONFIG)
  for key in ("label", "label_ref"):
    np.testing.assert_array_equal(first[key], second[key])
  for image, label in (("image", "label"), ("ref", "label_ref")):
    regions = [first[label][..., k] == 1 for k in range(synthetic.EDGE_CHANNEL)]
    regions = [region for region in regions if region.any()]
    assert len(regions) >= 3  # background and at least two objects
    for region in regions:
      assert np.mean(np.abs(first[image][region] - second[image][region])) > 0.05


def test_texture_moves_with_its_object():
  """Shifting a layout by whole pixels shifts every fully covered object pixel unchanged."""
  scene = synthetic.scene(5, HARD)
  image, label = synthetic.draw(scene.layout, scene.objects, scene.background, HARD)
  shift = np.array([3, -2])  # x, y in pixels
  moved = dataclasses.replace(scene.layout, centres=scene.layout.centres + shift)
  image_moved, label_moved = synthetic.draw(moved, scene.objects, scene.background, HARD)
  compared = 0
  for shape in scene.layout.classes:
    ys, xs = np.nonzero(label[..., shape + 1] == 1)
    ys2, xs2 = ys + shift[1], xs + shift[0]
    keep = (ys2 >= 0) & (ys2 < 32) & (xs2 >= 0) & (xs2 < 32)
    ys, xs, ys2, xs2 = ys[keep], xs[keep], ys2[keep], xs2[keep]
    keep = label_moved[ys2, xs2, shape + 1] == 1
    np.testing.assert_allclose(
        image_moved[ys2[keep], xs2[keep]], image[ys[keep], xs[keep]], atol=1e-4
    )
    compared += keep.sum()
  assert compared > 50


def test_draw_matches_sample():
  item, scene = synthetic.sample(8, CONFIG), synthetic.scene(8, CONFIG)
  ref, label_ref = synthetic.draw(scene.layout_ref, scene.objects, scene.background, CONFIG)
  np.testing.assert_array_equal(ref, item["ref"])
  np.testing.assert_array_equal(label_ref, item["label_ref"])


def test_source_splits_lengths_and_batches():
  train, validation = synthetic.SyntheticSource(CONFIG), synthetic.SyntheticSource(
      CONFIG, "validation"
  )
  assert (len(train), len(validation)) == (50, 10)
  with pytest.raises(IndexError):
    validation[10]  # pylint: disable=pointless-statement
  with pytest.raises(IndexError):
    train[-1]  # pylint: disable=pointless-statement
  np.testing.assert_array_equal(
      validation[2]["image"], synthetic.sample(2, CONFIG, "validation")["image"]
  )
  batch = train.batch([4, 1, 4])
  assert batch["image"].shape == (3, 32, 32, 3)
  assert batch["label_ref"].shape == (3, 32, 32, synthetic.LABEL_CHANNELS)
  np.testing.assert_array_equal(batch["ref"][1], train[1]["ref"])
  np.testing.assert_array_equal(batch["label"][0], batch["label"][2])


@pytest.mark.parametrize(
    "changes, phrase",
    [
        (dict(max_objects=6), "max_objects"),
        (dict(min_objects=0), "min_objects"),
        (dict(classes=("disc", "hexagon")), "classes"),
        (dict(classes=("disc", "disc")), "classes"),
        (dict(classes=("disc",), max_objects=2), "len(classes)"),
        (dict(radius_range=(0.3, 0.2)), "radius_range"),
        (dict(image_size=4), "image_size"),
        (dict(frequency_range=(0, 1)), "frequency_range"),
        (dict(background_textures=("noise",)), "background_textures"),
        (dict(background_textures=()), "background_textures"),
    ],
)
def test_bad_config_is_refused(changes, phrase):
  with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
    dataclasses.replace(CONFIG, **changes)


def test_flat_background_is_one_colour_and_objects_keep_their_textures():
  config = dataclasses.replace(CONFIG, background_textures=("flat",))
  for index in range(4):
    item, textured = synthetic.sample(index, config), synthetic.sample(index, CONFIG)
    for image, label in ((item["image"], item["label"]), (item["ref"], item["label_ref"])):
      background = image[label[..., 0] == 1]
      np.testing.assert_allclose(
          background, np.broadcast_to(background[0], background.shape), atol=1e-6
      )
    # Same layouts and object appearances as the default config: only the backdrop changed.
    np.testing.assert_array_equal(item["label"], textured["label"])
    objects = item["label"][..., 0] == 0
    np.testing.assert_allclose(item["image"][objects], textured["image"][objects], atol=1e-5)


def test_bad_split_is_refused():
  with pytest.raises(ValueError, match="split"):
    synthetic.SyntheticSource(CONFIG, "test")
  with pytest.raises(ValueError, match="split"):
    synthetic.sample(0, CONFIG, "test")


def test_class_subset_keeps_the_channel_layout():
  config = dataclasses.replace(CONFIG, classes=("ring", "cross"), min_objects=1, max_objects=2)
  for index in range(5):
    label = synthetic.sample(index, config)["label"]
    assert label.shape[-1] == synthetic.LABEL_CHANNELS
    used = np.flatnonzero(label[..., 1 : synthetic.EDGE_CHANNEL].max(axis=(0, 1)) > 0)
    assert set(used) <= {synthetic.SHAPES.index("ring"), synthetic.SHAPES.index("cross")}


def test_preview_png(tmp_path):
  out = tmp_path / "preview.png"
  synthetic.main([f"--out={out}", "--n=3", "--scale=2"])
  with Image.open(out) as image:
    assert image.mode == "RGB" and image.size == (3 * (2 * 32 + 4), 4 * (2 * 32 + 4))
