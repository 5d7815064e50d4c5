"""Photos in and out: RGB files <-> float32 ``(H, W, 3)`` arrays in [-1, 1].

The value mapping is the official pipeline's (``ToTensor`` then ``x * 2 - 1`` on the way in;
torchvision ``save_image`` of ``(clamp(x, -1, 1) + 1) / 2`` on the way out). Images are not resized:
their sides must be multiples of the model's total down-sampling factor. Every problem with a file
is an ``InputError`` whose one-line message starts with the file's path.
"""

import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps

from midms_jax.errors import InputError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FORMATS = {"png": "PNG", "jpg": "JPEG"}  # output format name -> PIL format

_MODE_NAMES = {
    "1": "black-and-white",
    "L": "grayscale",
    "LA": "grayscale + alpha",
    "P": "palette",
    "PA": "palette + alpha",
    "RGBA": "RGB + alpha",
    "RGBa": "RGB + alpha",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
    "I": "32-bit single-channel",
    "I;16": "16-bit single-channel",
    "F": "float single-channel",
}


def downsampling_factor(model_cfg: Mapping[str, Any]) -> int:
  """Image side / side of the U-Net's coarsest grid: first stage 2^(levels-1) times U-Net
  2^(levels-1).

  Image sides must be multiples of it (e.g. 32 for the official CelebA-HQ model, 8 for its ``tiny``
  variant).
  """
  first_stage = 2 ** (len(model_cfg["first_stage"]["ch_mult"]) - 1)
  unet = 2 ** (len(model_cfg["unet"]["channel_mult"]) - 1)
  return first_stage * unet


def describe_mode(mode: str) -> str:
  """E.g. ``'grayscale image (mode L)'``."""
  return f"{_MODE_NAMES.get(mode, 'non-RGB')} image (mode {mode})"


def open_image(path: str | pathlib.Path) -> Image.Image:
  """Opens and fully decodes an image file, with its EXIF orientation applied (phone photos)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise InputError(f"{path}: no such file")
  if not path.is_file():
    raise InputError(f"{path}: not a file")
  try:
    with Image.open(path) as image:
      image.load()
      return ImageOps.exif_transpose(image)
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types on bad files
    reason = first_line(e)
    raise InputError(f"{path}: not a readable image (corrupt or truncated?): {reason}") from None


def check_size(height: int, width: int, factor: int, path: str | pathlib.Path) -> None:
  """InputError unless both sides are multiples of ``factor``; suggests the nearest smaller valid
  size."""
  if height % factor or width % factor:
    fit = lambda side: max(factor, side // factor * factor)
    raise InputError(
        f"{path}: size {width}x{height} is not divisible by {factor} (the model's total "
        f"down-sampling factor); resize or crop it, e.g. to {fit(width)}x{fit(height)}"
    )


def rgb_pixels(image: Image.Image, path: str | pathlib.Path, factor: int = 1) -> np.ndarray:
  """uint8 ``(H, W, 3)`` of an opened RGB image; other modes (grayscale, RGBA, palette, ...) are
  refused."""
  if image.mode != "RGB":
    raise InputError(f"{path}: {describe_mode(image.mode)}; an RGB photo is required")
  rgb = np.asarray(image, np.uint8)
  check_size(rgb.shape[0], rgb.shape[1], factor, path)
  return rgb


def read_rgb(path: str | pathlib.Path, factor: int = 1) -> np.ndarray:
  """An RGB photo file as uint8 ``(H, W, 3)``; sides must be multiples of ``factor``."""
  return rgb_pixels(open_image(path), path, factor)


def to_model_range(rgb: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (``ToTensor`` then ``* 2 - 1``, in float32 as PyTorch does)."""
  return (rgb.astype(np.float32) / np.float32(255.0)) * np.float32(2.0) - np.float32(1.0)


def load_image(path: str | pathlib.Path, factor: int = 1) -> np.ndarray:
  """An RGB photo as float32 ``(H, W, 3)`` in [-1, 1]; sides must be multiples of ``factor``."""
  return to_model_range(read_rgb(path, factor))


def to_uint8(image) -> np.ndarray:
  """[-1, 1] float -> uint8: clamp, ``(x + 1) / 2``, then torchvision's ``x * 255 + 0.5``
  truncation."""
  x = (np.clip(np.asarray(image, np.float32), -1.0, 1.0) + np.float32(1.0)) / np.float32(2.0)
  return np.floor(x * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def write_uint8(path: str | pathlib.Path, pixels: np.ndarray, format: str = "png") -> None:
  """Writes uint8 ``(H, W, 3)`` pixels atomically (temporary file, then rename): an interrupted run
  never leaves a truncated file that a resumed run would take as done. JPEG at PIL's default quality
  (75), as torchvision's ``save_image`` writes it."""
  if format not in FORMATS:
    raise ValueError(f"image format must be one of {sorted(FORMATS)}, got {format!r}")
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  Image.fromarray(pixels, "RGB").save(tmp, format=FORMATS[format])
  os.replace(tmp, path)


def save_image(path: str | pathlib.Path, image, format: str = "png") -> None:
  """Saves a float ``(H, W, 3)`` image in [-1, 1] (clamped) as 8-bit ``png`` or ``jpg``."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"save_image expects an (H, W, 3) image, got shape {image.shape}")
  write_uint8(path, to_uint8(image), format)


def tile_columns(columns) -> np.ndarray:
  """One picture from equally shaped image batches: column k stacks batch k's images top to bottom
  (``[(rows, H, W, C), ...]`` -> ``(rows H, k W, C)``)."""
  return np.concatenate([np.concatenate(list(np.asarray(c)), axis=0) for c in columns], axis=1)


def natural_key(name: str) -> tuple:
  """Sort key with digit runs compared as numbers (``2.jpg`` before ``10.jpg``), as the official
  natural sort, then the name itself (a total order: ``a01`` and ``a1`` do not tie)."""
  parts = re.split(r"(\d+)", name)
  return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name
