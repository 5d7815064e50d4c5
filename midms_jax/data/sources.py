"""Random-access sources over the prepared benchmark data sets: stored records -> the pipeline's
records.

``make_source(data_cfg, split)`` opens split ``split`` of data set ``data_cfg.name`` in
``data_cfg.data_dir`` (as ``python -m midms_jax.data.prepare`` wrote it: ``builders.py``) and
returns a ``BenchmarkSource`` whose element ``i`` is the record of ``midms_jax.data.pipeline``
(module doc) at ``load_size`` x ``load_size``: ``data_cfg.load_size`` for ``train``,
``data_cfg.eval_load_size`` for the other splits (the official test options load CelebA-HQ and LSUN
church at 256, not 286). Each photo and its condition are rendered as the official data sets do it:

* ``image`` / ``ref`` / ``ref_hard``: the photo (Pillow, converted to RGB) resized bicubic,
  ``ToTensor`` then ``* 2 - 1``: float32 in [-1, 1].
* ``label`` / ``label_ref`` / ``label_ref_hard``, float32 in [0, 1]: CelebA-HQ
  ``conditions.celebahq_condition`` of the photo and its part masks (15 channels); DeepFashion
  ``conditions.deepfashion_condition`` of the pose, drawn at the photo's size (20); LSUN church
  ``conditions.one_hot_labels`` of the label map, ids 0..150 and 255 -> 150, the don't-care channel
  (151).

``ref`` is the easy exemplar (with its own condition), ``ref_hard`` the hard one; both are other
records of the data set (any split), rendered the same way. The crop, flip and exemplar choice are
the pipeline's.
"""

import pathlib
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from midms_jax.data import builders, conditions, images
from midms_jax.errors import InputError

Record = dict[str, np.ndarray]
Pair = tuple[np.ndarray, np.ndarray]  # photo (H, W, 3) in [-1, 1], condition (H, W, C) in [0, 1]

CHANNELS = {
    "celebahq": conditions.CELEBAHQ_CHANNELS,
    "deepfashion": conditions.DEEPFASHION_CHANNELS,
    "lsun_church": builders.LSUN_CLASSES + 1,
}
NAMES = tuple(CHANNELS)


def _photo(stored: Mapping[str, Any], load_size: int) -> tuple[Image.Image, np.ndarray]:
  """The stored photo as an RGB PIL image, and resized bicubic to ``load_size`` in [-1, 1]."""
  photo = builders.decode_image(stored["image"], _key(stored)).convert("RGB")
  return photo, images.to_model_range(
      np.asarray(photo.resize((load_size, load_size), Image.BICUBIC))
  )


def _key(stored: Mapping[str, Any]) -> str:
  key = stored["key"]
  return key.decode("utf-8") if isinstance(key, bytes) else str(key)


def celebahq_pair(stored: Mapping[str, Any], load_size: int) -> Pair:
  """Photo and 15-channel condition of a stored CelebA-HQ record."""
  photo, image = _photo(stored, load_size)
  parts = [conditions.CELEBAHQ_PART_NAMES[k] for k in stored["mask_parts"]]
  masks = {
      part: builders.decode_image(data, f"{_key(stored)} {part} mask").convert("L")
      for part, data in zip(parts, stored["masks"])
  }
  return image, conditions.celebahq_condition(photo, masks, load_size, name=_key(stored))


def deepfashion_pair(stored: Mapping[str, Any], load_size: int) -> Pair:
  """Photo and 20-channel condition of a stored DeepFashion record (the pose is drawn at the photo's
  size)."""
  photo, image = _photo(stored, load_size)
  return image, conditions.deepfashion_condition(
      stored["pose_candidate"], stored["pose_subset"], (photo.height, photo.width), load_size
  )


def lsun_church_pair(stored: Mapping[str, Any], load_size: int) -> Pair:
  """Photo and 151-channel one-hot condition of a stored LSUN church record."""
  _, image = _photo(stored, load_size)
  name = builders.lsun_label_key(_key(stored))
  label = builders.decode_image(stored["label"], name)
  return image, conditions.one_hot_labels(label, name, CHANNELS["lsun_church"], load_size)


RENDER: dict[str, Callable[[Mapping[str, Any], int], Pair]] = {
    "celebahq": celebahq_pair,
    "deepfashion": deepfashion_pair,
    "lsun_church": lsun_church_pair,
}
# encoded files: kept as bytes, decoded here with Pillow (as the official code)
_UNDECODED = (
    "image",
    "label",
)


def _prepare_command(name: str, data_dir: str | None) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  return (
      f"python -m midms_jax.data.prepare --dataset={name} --manual_dir=<the {name} folder>{where}"
  )


class BenchmarkSource:
  """Split ``split`` of a prepared benchmark data set as pipeline records (``__len__`` /
  ``__getitem__``)."""

  def __init__(
      self, name: str, split: str, load_size: int, data_dir: str | pathlib.Path | None = None
  ):
    if name not in RENDER:
      raise ValueError(f"unknown benchmark data set {name!r} (known: {', '.join(NAMES)})")
    if load_size < 1:
      raise ValueError(f"load_size must be positive, got {load_size}")
    builder = builders.builder(name, data_dir)
    prepared = builder.info.splits
    if split not in prepared:
      found = f"it has only {', '.join(prepared)}" if prepared else "nothing is prepared there"
      raise InputError(
          f"{builder.data_dir}: no {split!r} split of {name} ({found}); build it with "
          f"{_prepare_command(name, None if data_dir is None else str(data_dir))}"
      )
    decoders = {
        key: tfds.decode.SkipDecoding() for key in _UNDECODED if key in builder.info.features
    }
    self._splits = {s: builder.as_data_source(s, decoders=decoders) for s in prepared}
    self.name, self.split, self.load_size = name, split, load_size
    self._render = RENDER[name]

  def __len__(self) -> int:
    return len(self._splits[self.split])

  def __getitem__(self, index: int) -> Record:
    stored = self._splits[self.split][index]
    pairs = {}  # (split, index) -> rendered pair: the hard exemplar is often the easy one

    def pair(split: str, i: int) -> Pair:
      if (split, i) not in pairs:
        pairs[(split, i)] = self._render(self._splits[split][i], self.load_size)
      return pairs[(split, i)]

    image, label = self._render(stored, self.load_size)
    record = dict(image=image, label=label)
    for ref in builders.EXEMPLARS:
      record[ref], record[f"label_{ref}"] = pair(
          builders.SPLITS[stored[f"{ref}_split"]], int(stored[f"{ref}_index"])
      )
    return record

  def __repr__(self) -> str:
    return f"BenchmarkSource({self.name}, {self.split}, {len(self)} records, load_size={self.load_size})"


def make_source(data_cfg: Mapping[str, Any], split: str) -> BenchmarkSource:
  """The source of ``split`` for ``data_cfg`` (``name``, ``label_nc``, ``load_size``,
  ``eval_load_size``, ``data_dir``: '' = the TFDS default folder)."""
  name = data_cfg["name"]
  if data_cfg["label_nc"] != CHANNELS[name]:
    raise ValueError(
        f"config.data.label_nc={data_cfg['label_nc']}, but {name} conditions have {CHANNELS[name]} "
        "channels"
    )
  load_size = (
      data_cfg["load_size"]
      if split == "train"
      else data_cfg.get("eval_load_size") or data_cfg["load_size"]
  )
  return BenchmarkSource(name, split, load_size, data_cfg.get("data_dir") or None)
