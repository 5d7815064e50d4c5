"""Record order: record ``i`` of a prepared split is item ``i`` of the official data set, the index
by which ``evaluate`` names its files. Each data set is written with lists or files in no sorted
order, prepared, and read back through ``evaluate.batches``; the official order is computed here,
independently, from the official loaders' rules:

* ``data/pix2pix_dataset.py``: ``natural_sort`` (digit runs as numbers; a stable ``list.sort``) of
  the label and image paths unless ``opt.benchmark`` is ``"celebahq"`` or ``"deepfashion"``; the
  benchmarks the official scripts pass are ``celebahqedge``, ``deepfashion`` and ``lsun_church``.
* ``data/celebahqedge_dataset.py``, ``deepfashion_dataset.py``: paths from ``train.txt`` /
  ``val.txt``.
* ``data/lsun_church_dataset.py``: ``sorted(make_dataset(<root>/training|validation, recursive=True,
  read_cache=<training>))``, split into ``.jpg`` photos and ``.png`` label maps;
  ``data/image_folder.py`` reads ``files.list`` instead of walking the folder when ``read_cache`` is
  on and the file exists.
"""

import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from configs import celebahq, deepfashion, lsun_church
from midms_jax import evaluate
from midms_jax.data import builders, fake_layouts, images, prepare
from midms_jax.errors import InputError

SIDE = 32  # the tiny configs' eval_load_size and crop_size: no crop
# the official IMG_EXTENSIONS
IMAGE_SUFFIXES = (
    ".jpg",
    ".JPG",
    ".jpeg",
    ".JPEG",
    ".png",
    ".PNG",
    ".ppm",
    ".PPM",
    ".bmp",
    ".BMP",
    ".tiff",
    ".webp",
)

# DeepFashion lists in no sorted order (the official loader keeps it).
FASHION_TRAIN = (
    "img/WOMEN/Dresses/id_00000010/02_1_front.jpg",
    "img/MEN/Denim/id_00000002/01_1_front.jpg",
    "img/WOMEN/Dresses/id_00000002/10_2_side.jpg",
    "img/WOMEN/Dresses/id_00000002/9_2_side.jpg",
)
FASHION_VAL = (
    "img/MEN/Shirts_Polos/id_00000007/03_4_full.jpg",
    "img/MEN/Denim/id_00000003/03_4_full.jpg",
    "img/MEN/Denim/id_00000003/03_1_front.jpg",
)
# LSUN names whose natural order is neither their text order nor the order written; v1, v01 tie.
LSUN_TRAIN = ("c10.jpg", "c9.jpg", "c100.jpg", "unlisted.jpg")
LSUN_VAL = ("v10.jpg", "v2.jpg", "v1.jpg", "v01.jpg")
LSUN_FILES_LIST = ("c100.jpg", "c100.png", "c9.jpg", "c9.png", "c10.png", "c10.jpg")
LSUN_LISTED = ["training/c9.jpg", "training/c10.jpg", "training/c100.jpg"]


def official_natural_sort(paths: list[str]) -> list[str]:
  """``pix2pix_dataset.natural_sort``: a stable sort of the texts split at digit runs (as ints)."""
  key = lambda text: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
  return sorted(paths, key=key)


def _list_lines(path: pathlib.Path) -> list[str]:
  with open(path, encoding="utf-8") as f:  # the official fd.readlines()
    return f.readlines()


def official_celebahq(root: pathlib.Path, list_file: str) -> list[str]:
  """The official CelebA-HQ image paths in index order (``celebahqedge``: natural-sorted)."""
  lines = _list_lines(root / list_file)
  return official_natural_sort(
      [os.path.join(str(root), "CelebA-HQ-img", line.strip() + ".jpg") for line in lines]
  )


def official_deepfashion(root: pathlib.Path, list_file: str) -> list[str]:
  """The official DeepFashion image paths in index order (benchmark ``deepfashion``: list order)."""
  lines = _list_lines(root / list_file)
  return [os.path.join(str(root), line.strip().replace("\\", "/")) for line in lines]


def official_lsun(root: pathlib.Path, folder: str, read_cache: bool) -> list[str]:
  """The official LSUN church photo paths in index order (``read_cache``: training)."""
  directory = str(root) + "/" + folder
  listing = os.path.join(directory, "files.list")
  if read_cache and os.path.isfile(listing):
    with open(listing, encoding="utf-8") as f:
      paths = f.read().splitlines()
  else:
    paths = [
        os.path.join(dirpath, name)
        for dirpath, _, names in sorted(os.walk(directory))
        for name in names
        if name.endswith(IMAGE_SUFFIXES)
    ]
  return official_natural_sort([p for p in sorted(paths) if p.endswith(".jpg")])


def _relative(paths: list[str], root: pathlib.Path) -> list[str]:
  return [os.path.relpath(p, root) for p in paths]


def _prepare(name: str, manual_dir: pathlib.Path, data_dir: pathlib.Path) -> None:
  builder, built = prepare.prepare(name, manual_dir, data_dir, progress=False)
  assert built and builder.skipped == []


def _evaluated_images(config_module, data_dir: pathlib.Path, split: str) -> np.ndarray:
  """The ground-truth photos of ``split`` in ``evaluate``'s order: row i is what it names
  ``<i:06d>``."""
  config = config_module.get_config("tiny")
  config.data.update(dict(data_dir=str(data_dir), load_size=SIDE))
  config.evaluate.update(dict(split=split, read_threads=1))
  rows = []
  for start, batch in evaluate.batches(config, count=10**6, batch_size=3):
    assert start == len(rows)
    rows.extend(batch["image"])
  return np.stack(rows)


def _photo(path: str) -> np.ndarray:
  """An official photo path as ``evaluate`` reads it at the tiny size (bicubic, no crop)."""
  pixels = Image.open(path).convert("RGB").resize((SIDE, SIDE), Image.BICUBIC)
  return images.to_model_range(np.asarray(pixels))


def _assert_evaluate_index_is_official(
    config_module, data_dir: pathlib.Path, split: str, official: list[str]
) -> None:
  evaluated = _evaluated_images(config_module, data_dir, split)
  assert len(evaluated) == len(official)
  for index, path in enumerate(official):
    np.testing.assert_array_equal(
        evaluated[index], _photo(path), err_msg=f"{evaluate.image_stem(index)}: {path}"
    )


def test_celebahq_records_in_the_official_natural_order(tmp_path):
  fake = fake_layouts.write_celebahq(
      tmp_path / "celeba", n_train=11, n_val=3, image_size=SIDE, shuffle_lists=True
  )
  train_ids = sorted(int(key[: -len(".jpg")]) for key in fake.train)
  assert sorted(train_ids, key=str) != train_ids  # ids 0..10: text order is not natural order
  _prepare("celebahq", fake.root, tmp_path / "tfds")
  for split, list_file in builders.LIST_FILES.items():
    listed = [int(key[: -len(".jpg")]) for key in getattr(fake, split)]
    official = official_celebahq(fake.root, list_file)
    assert listed != sorted(listed)  # the lists are not in order: the test means something
    assert [os.path.basename(p) for p in official] == [f"{i}.jpg" for i in sorted(listed)]
    _assert_evaluate_index_is_official(celebahq, tmp_path / "tfds", split, official)


def test_deepfashion_records_in_list_order(tmp_path):
  fake = fake_layouts.write_deepfashion(
      tmp_path / "fashion", image_shape=(SIDE, 24), keys=(FASHION_TRAIN, FASHION_VAL)
  )
  _prepare("deepfashion", fake.root, tmp_path / "tfds")
  for split, list_file in builders.LIST_FILES.items():
    official = official_deepfashion(fake.root, list_file)
    assert _relative(official, fake.root) == list(getattr(fake, split))  # not sorted
    _assert_evaluate_index_is_official(deepfashion, tmp_path / "tfds", split, official)


def test_lsun_records_in_natural_order_training_from_files_list(tmp_path):
  fake = fake_layouts.write_lsun_church(
      tmp_path / "lsun", names=(LSUN_TRAIN, LSUN_VAL), files_list=LSUN_FILES_LIST
  )
  (fake.root / "validation" / "files.list").write_text(f"{fake.root}/validation/v2.jpg\n")  # unread
  _prepare("lsun_church", fake.root, tmp_path / "tfds")
  official = {
      "train": official_lsun(fake.root, "training", read_cache=True),
      "validation": official_lsun(fake.root, "validation", read_cache=False),
  }
  assert _relative(official["train"], fake.root) == LSUN_LISTED  # files.list: no unlisted.jpg
  assert _relative(official["validation"], fake.root) == [
      "validation/v01.jpg",
      "validation/v1.jpg",
      "validation/v2.jpg",
      "validation/v10.jpg",
  ]
  for split, paths in official.items():
    _assert_evaluate_index_is_official(lsun_church, tmp_path / "tfds", split, paths)


def test_lsun_files_list_relative_lines_and_lines_outside_training(tmp_path, monkeypatch):
  """Relative lines are read from the current folder, as the official loader opens them; a line
  naming a file outside ``training/`` stops the build (one line naming files.list), or is skipped
  and listed."""
  monkeypatch.chdir(tmp_path)
  fake = fake_layouts.write_lsun_church(
      "lsun", names=(LSUN_TRAIN, LSUN_VAL), files_list=LSUN_FILES_LIST
  )
  listing = fake.root / "training" / "files.list"
  assert listing.read_text().startswith("lsun/training/c100.jpg\n")
  _prepare("lsun_church", fake.root, tmp_path / "tfds")
  stored = builders.builder("lsun_church", tmp_path / "tfds").as_data_source("train")
  assert [record["key"].decode() for record in stored] == LSUN_LISTED
  listing.write_text(listing.read_text() + "lsun/validation/v2.jpg\n")
  with pytest.raises(InputError) as info:
    prepare.prepare("lsun_church", fake.root, tmp_path / "a", progress=False)
  training = (tmp_path / "lsun" / "training").resolve()
  assert str(info.value) == (
      f"{listing}:7: lsun/validation/v2.jpg: not a file in {training} (files.list names the "
      "training files as the official loader opens them: absolute paths, or relative to the "
      "current folder)"
  )
  builder, _ = prepare.prepare(
      "lsun_church", fake.root, tmp_path / "b", skip_bad=True, progress=False
  )
  assert [(s.split, s.key) for s in builder.skipped] == [("train", "lsun/validation/v2.jpg")]
  assert builder.info.splits["train"].num_examples == 3
  summary = prepare.summary(builder, True)
  assert f"  train: {listing}:7: lsun/validation/v2.jpg: not a file in {training}" in summary
  assert "note: records after a skipped one have lower indices than in the official data" in summary
