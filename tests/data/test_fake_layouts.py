"""Fake data sets in the official layouts: the same bytes from the same seed, and the defaults (what
the input pipeline benchmark writes, with a real photo blended in) build with the real builders."""

import pathlib

import pytest
import tensorflow_datasets as tfds

from midms_jax.data import builders, fake_layouts, images

TINY = {  # writer, a tiny size, the photos' (height, width)
    "celebahq": (fake_layouts.write_celebahq, dict(image_size=32), (32, 32)),
    "deepfashion": (fake_layouts.write_deepfashion, dict(image_shape=(32, 24)), (32, 24)),
    "lsun_church": (fake_layouts.write_lsun_church, dict(image_shape=(24, 30)), (24, 30)),
}


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {
      p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
  }


@pytest.mark.parametrize("name", list(TINY))
def test_same_seed_same_bytes(tmp_path, name):
  write, size, _ = TINY[name]
  first, again, other = (
      _files(write(tmp_path / d, seed=seed, texture=0.5, **size).root)
      for d, seed in (("a", 0), ("b", 0), ("c", 1))
  )
  assert first == again
  photos = [key for key in first if key.endswith(".jpg")]
  assert photos == [key for key in other if key.endswith(".jpg")]  # same keys, other pixels
  assert all(other[key] != first[key] for key in photos)


@pytest.mark.parametrize("name", list(TINY))
def test_defaults_build(tmp_path, name):
  write, size, shape = TINY[name]
  fake = write(tmp_path / "manual", 5, 3, texture=0.5, **size)
  builder = builders.builder(name, tmp_path / "tfds")
  builder.download_and_prepare(
      download_dir=tmp_path / "downloads",
      download_config=tfds.download.DownloadConfig(manual_dir=str(fake.root)),
  )
  assert builder.skipped == []
  natural = lambda keys: sorted(keys, key=images.natural_key)  # the official order (builders.py)
  order = list if name == "deepfashion" else natural
  for split, keys in (
      ("train", fake.train),
      ("validation", fake.validation),
      ("exemplars", fake.exemplars),
  ):
    stored = list(builder.as_data_source(split)) if keys else []
    assert [r["key"].decode() for r in stored] == order(keys)
    assert (split in builder.info.splits) == bool(keys)
  assert len(fake.train) == 5 and len(fake.validation) == 3 and fake.image_shape == shape
  assert set(fake.condition_inputs) == {*fake.train, *fake.validation, *fake.exemplars}
