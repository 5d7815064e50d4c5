"""Condition maps ``(H, W, C)`` float32 in [0, 1], as each data set (``config.data.name``) feeds them.

A condition comes from one of three kinds of file (``condition_kind`` decides by the file):

* ``array``: a ``.npy`` ``(H, W, C)`` array in [0, 1], exactly the tensor the data set builds (CelebA-HQ:
  Canny edges + 13 part distance maps + part boundaries, 15 channels; DeepFashion: pose RGB + 17 limb
  distance maps, 20; LSUN church: one-hot, 151). Any data set.
* ``labels``: a single-channel label-id image (PNG of mode L, P or I): LSUN church's segmentation,
  ids 0..149 with 255 = "don't care" (mapped to id 150), one-hot to 151 channels.
* ``photo``: an RGB photo from which the condition is computed; only CelebA-HQ defines how
  (``celebahq_edges``). Other data sets need the ``.npy`` (or label PNG) form.
"""

import pathlib
from typing import Any

import numpy as np
from PIL import Image
from skimage import feature

from midms_jax.data import images
from midms_jax.errors import InputError

LABEL_MODES = ("L", "P", "I", "I;16")
PHOTO_DATA_SETS = ("celebahq",)  # data sets whose condition can be computed from a photo
CELEBAHQ_PARTS = 13  # skin, brows, eyes, ears, nose, lips, mouth, glasses, hair: one distance map each


def hint(config) -> str:
  """What to pass as a condition for this config's data set."""
  name, channels = config.data.name, config.model.correspondence.label_channels
  npy = f"a (H, W, {channels}) .npy condition"
  return {
      "celebahq": f"an RGB photo (its edge map is computed) or {npy}",
      "deepfashion": f"{npy} (pose RGB + 17 limb distance maps, as the data set builds it)",
      "lsun_church": f"a label-id PNG (ids 0..{channels - 2}, 255 = don't care) or {npy} (one-hot)",
  }.get(name, npy)


def _kind_of(path: pathlib.Path, image: Image.Image | None) -> str:
  if path.suffix.lower() == ".npy":
    return "array"
  return "labels" if image.mode in LABEL_MODES else "photo"


def condition_kind(path: str | pathlib.Path) -> str:
  """``'array'`` for ``.npy``, ``'labels'`` for a single-channel image, ``'photo'`` for any other image."""
  path = pathlib.Path(path)
  return _kind_of(path, None if path.suffix.lower() == ".npy" else images.open_image(path))


def load_array(path: str | pathlib.Path, channels: int) -> np.ndarray:
  """A ``.npy`` ``(H, W, channels)`` condition in [0, 1] as float32."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"{path}: no such file")
  try:
    array = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except  # numpy raises several types on bad files
    raise InputError(f"{path}: not a readable .npy array: {str(e).strip().splitlines()[0]}") from None
  if array.ndim != 3:
    raise InputError(f"{path}: expected an (H, W, C) condition array, found shape {array.shape}")
  if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise InputError(f"{path}: condition array has dtype {array.dtype}, expected numbers")
  if array.shape[-1] != channels:
    transposed = " (channels first? store it as (H, W, C))" if array.shape[0] == channels else ""
    raise InputError(f"{path}: condition has {array.shape[-1]} channels, the config expects {channels}"
                     f"{transposed}")
  array = array.astype(np.float32)
  if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
    raise InputError(f"{path}: condition values must lie in [0, 1], found {array.min():g}..{array.max():g}")
  return array


def one_hot_labels(image: Image.Image, path: str | pathlib.Path, channels: int) -> np.ndarray:
  """A label-id image one-hot to ``channels``: ids 0..channels-2, 255 = don't care -> id channels-1."""
  if image.mode not in LABEL_MODES:
    raise InputError(f"{path}: label map must be a single-channel image of ids (mode L, P or I), found "
                     f"{images.describe_mode(image.mode)}")
  ids = np.asarray(image).astype(np.int64)
  ids[ids == 255] = channels - 1
  bad = np.unique(ids[(ids < 0) | (ids >= channels)])
  if bad.size:
    raise InputError(f"{path}: label ids must be 0..{channels - 2} or 255 (don't care), found "
                     f"{', '.join(map(str, bad[:5]))}")
  return np.eye(channels, dtype=np.float32)[ids]


def celebahq_edges(rgb: np.ndarray) -> np.ndarray:
  """The CelebA-HQ edge condition ``(H, W, 15)`` of a uint8 RGB photo without part masks.

  Channel 0: Canny edges of the PIL grayscale (``convert('L')``) image, skimage defaults (sigma 1,
  thresholds 10% / 20% of the uint8 range, i.e. 0.1 / 0.2 on [0, 1]); channels 1..13: 1.0, the
  official value of a part's distance map when the part's mask is absent (the clipped distance
  transform is 255 everywhere, 255 / 255 = 1); channel 14: 0 (no part boundaries).

  This is exactly what the official label code yields for a face with no part annotations: there
  ``inner_label`` stays 1 everywhere, so all Canny edges are kept and no part boundary is added. With
  the CelebAMask-HQ part masks the official condition differs (edges inside parts are replaced by
  part boundaries); pass such conditions as ``.npy``.
  """
  gray = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
  condition = np.zeros(rgb.shape[:2] + (2 + CELEBAHQ_PARTS,), np.float32)
  condition[..., 0] = feature.canny(gray)
  condition[..., 1:1 + CELEBAHQ_PARTS] = 1.0
  return condition


def from_photo(path: str | pathlib.Path, config, factor: int = 1, rgb: np.ndarray | None = None) -> np.ndarray:
  """The condition computed from an RGB photo (CelebA-HQ only; ``rgb``: its pixels if already read)."""
  name = config.data.name
  if name not in PHOTO_DATA_SETS:
    raise InputError(f"{path}: {name} conditions cannot be computed from a photo; pass {hint(config)}")
  channels = config.model.correspondence.label_channels
  if channels != 2 + CELEBAHQ_PARTS:
    raise InputError(f"{path}: CelebA-HQ edge conditions have {2 + CELEBAHQ_PARTS} channels, the config "
                     f"expects {channels}")
  return celebahq_edges(images.read_rgb(path, factor) if rgb is None else rgb)


def load_condition(path: str | pathlib.Path, config: Any, factor: int = 1) -> np.ndarray:
  """The ``(H, W, label_channels)`` condition of a file, by its kind (see the module docstring)."""
  path = pathlib.Path(path)
  channels = config.model.correspondence.label_channels
  image = None if path.suffix.lower() == ".npy" else images.open_image(path)
  kind = _kind_of(path, image)
  if kind == "photo":  # other data sets refuse before the pixels are checked: their hint is more useful
    return from_photo(path, config, factor,
                      images.rgb_pixels(image, path, factor) if config.data.name in PHOTO_DATA_SETS else None)
  if kind == "array":
    condition = load_array(path, channels)
  elif config.data.name == "lsun_church":
    condition = one_hot_labels(image, path, channels)
  else:
    raise InputError(f"{path}: a {images.describe_mode(image.mode)} is read as a label-id map, which "
                     f"only lsun_church uses; {config.data.name} needs {hint(config)}")
  images.check_size(condition.shape[0], condition.shape[1], factor, path)
  return condition
