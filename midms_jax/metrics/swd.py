"""Sliced Wasserstein distance (SWD) of Karras et al. 2018 (progressive GAN's ``sliced_wasserstein``
metric).

Per set of images (uint8 RGB, square, side a multiple of ``2^(levels - 1)``, pixel values as 0..255
floats):

1. a Laplacian pyramid per image: the 5-tap binomial filter ``[1, 4, 6, 4, 1] / 16`` along both axes
   with mirrored borders (``d c b | a b c d``), down-sampling by 2 and up-sampling by zero insertion
   with 4x the filter; levels from the image side down to ``min_resolution`` (256 -> 256, 128, 64,
   32, 16), the last one the low-pass image itself;
2. per level and image, ``nhoods_per_image`` neighbourhoods of ``nhood_size`` x ``nhood_size``
   pixels at random centres, each a descriptor of ``nhood_size^2 x 3`` values (row, column, channel
   order);
3. per level and set, each colour channel of the descriptors standardised over all descriptors and
   positions (mean, population standard deviation);
4. per level, the sliced Wasserstein distance between the two sets' descriptors: ``dir_repeats``
   times ``dirs_per_repeat`` random unit directions; both sets projected, sorted, mean absolute
   difference; the mean over repeats, times 1e3. The SWD is the mean over levels.

Random draws come from a JAX key: centres per (level, image index) from one sub-key, directions per
level from another. Both sets use the same centres for the same image index (common random numbers:
a set against itself gives exactly 0, and no draw depends on the batching); the reference code draws
them with numpy's global generator, independently per set, which only adds sampling noise of the
same kind. Both sets must hold the same number of images.
"""

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from midms_jax.metrics import batching

TAPS = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
CHANNELS = 3
SCALE = 1e3


@dataclasses.dataclass(frozen=True)
class Settings:
  """Karras et al.'s parameters (``config.evaluate.swd``)."""

  nhood_size: int = 7
  nhoods_per_image: int = 128
  dir_repeats: int = 4
  dirs_per_repeat: int = 128
  min_resolution: int = 16

  @classmethod
  def from_config(cls, swd_cfg: Mapping[str, Any]) -> "Settings":
    return cls(**{field.name: int(swd_cfg[field.name]) for field in dataclasses.fields(cls)})


def level_sides(side: int, min_resolution: int) -> tuple[int, ...]:
  """Image sides of the pyramid levels: ``side`` halved while >= ``min_resolution``."""
  sides = []
  while side >= min_resolution:
    sides.append(side)
    side //= 2
  return tuple(sides)


def _check_images(shape: Sequence[int], settings: Settings) -> tuple[int, ...]:
  """The level sides of images of ``shape``; ValueError unless square RGB that halves exactly per
  level."""
  if len(shape) != 4 or shape[1] != shape[2] or shape[3] != CHANNELS:
    raise ValueError(f"SWD: needs square RGB NHWC images, got shape {tuple(shape)}")
  sides = level_sides(shape[1], settings.min_resolution)
  if not sides or shape[1] % 2 ** (len(sides) - 1) or sides[-1] < settings.nhood_size:
    raise ValueError(
        f"SWD: image side {shape[1]} must be >= min_resolution={settings.min_resolution} and "
        f"halve exactly down to it, with nhood_size={settings.nhood_size} fitting the last level"
    )
  return sides


def _blur(x: jax.Array, gain: float = 1.0) -> jax.Array:
  """The separable 5-tap binomial filter (times ``gain`` per axis) with mirrored borders, NHWC."""
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (2, 2)
    padded = jnp.pad(x, pad, mode="reflect")
    size = x.shape[axis]
    x = sum(
        gain * tap * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
        for k, tap in enumerate(TAPS)
    )
  return x


def pyramid_down(x: jax.Array) -> jax.Array:
  return _blur(x)[:, ::2, ::2]


def pyramid_up(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return _blur(jnp.zeros((b, 2 * h, 2 * w, c), x.dtype).at[:, ::2, ::2].set(x), gain=2.0)


def laplacian_pyramid(images: jax.Array, levels: int) -> list[jax.Array]:
  """``levels`` band-pass images, finest first; the last is the low-pass residual."""
  gaussian = [images]
  for _ in range(1, levels):
    gaussian.append(pyramid_down(gaussian[-1]))
  return [g - pyramid_up(gaussian[i + 1]) for i, g in enumerate(gaussian[:-1])] + [gaussian[-1]]


def centres(
    key: jax.Array, indices: jax.Array, level: int, side: int, settings: Settings
) -> jax.Array:
  """``(B, nhoods_per_image, 2)`` (row, column) centres of the neighbourhoods of images ``indices``
  at ``level`` (of side ``side``): uniform in ``[half, side - half)``, drawn from
  ``fold_in(key, level, index)``.
  """
  half = settings.nhood_size // 2
  draw = lambda i: jax.random.randint(
      jax.random.fold_in(jax.random.fold_in(key, level), i),
      (settings.nhoods_per_image, 2),
      half,
      side - half,
  )
  return jax.vmap(draw)(jnp.asarray(indices))


def neighbourhoods(images: jax.Array, centres_: jax.Array, nhood_size: int) -> jax.Array:
  """``(B, P, nhood_size^2 C)`` descriptors: the neighbourhoods of ``images`` around ``centres_``
  ``(B, P, 2)``."""
  offsets = jnp.arange(nhood_size) - nhood_size // 2
  rows = centres_[..., 0:1] + offsets
  cols = centres_[..., 1:2] + offsets
  batch = jnp.arange(images.shape[0])[:, None, None, None]
  patches = images[batch, rows[:, :, :, None], cols[:, :, None, :]]
  return patches.reshape(patches.shape[:2] + (-1,))


@functools.partial(jax.jit, static_argnames="settings")
def descriptors(
    images: jax.Array, indices: jax.Array, key: jax.Array, settings: Settings
) -> list[jax.Array]:
  """Raw descriptors ``(B, P, D)`` per level of uint8 (or 0..255 float) images with dataset indices
  ``indices``."""
  sides = _check_images(images.shape, settings)
  centre_key = jax.random.split(key)[0]
  pyramid = laplacian_pyramid(images.astype(jnp.float32), len(sides))
  return [
      neighbourhoods(level, centres(centre_key, indices, i, side, settings), settings.nhood_size)
      for i, (level, side) in enumerate(zip(pyramid, sides))
  ]


def standardize(descriptors_: np.ndarray) -> np.ndarray:
  """``(N, D)`` descriptors with each colour channel brought to mean 0 and (population) std 1 over
  all of them."""
  d = np.asarray(descriptors_, np.float32).reshape(len(descriptors_), -1, CHANNELS)
  mean = np.mean(d, axis=(0, 1), dtype=np.float64)
  std = np.sqrt(np.mean(np.square(d - mean.astype(np.float32)), axis=(0, 1), dtype=np.float64))
  std = np.where(std > 0, std, 1.0)  # a constant channel (flat images) stays 0
  return ((d - mean.astype(np.float32)) / std.astype(np.float32)).reshape(len(d), -1)


def directions(key: jax.Array, level: int, dim: int, settings: Settings) -> jax.Array:
  """``(dir_repeats, dim, dirs_per_repeat)`` random unit directions (columns) of ``level``."""
  dirs = jax.random.normal(
      jax.random.fold_in(jax.random.split(key)[1], level),
      (settings.dir_repeats, dim, settings.dirs_per_repeat),
      jnp.float32,
  )
  return dirs / jnp.sqrt(jnp.sum(dirs**2, axis=1, keepdims=True))


@jax.jit
def sliced_wasserstein(a: jax.Array, b: jax.Array, dirs: jax.Array) -> jax.Array:
  """Mean over repeats of the mean |sorted projection of ``a`` - sorted projection of ``b``|
  (unscaled)."""

  def one_repeat(d):
    project = lambda x: jnp.sort(jnp.matmul(x, d, precision=jax.lax.Precision.HIGHEST), axis=0)
    return jnp.mean(jnp.abs(project(a) - project(b)))

  return jnp.mean(jax.lax.map(one_repeat, dirs))


def level_descriptors(
    images: np.ndarray,
    key: jax.Array,
    settings: Settings,
    *,
    batch_size: int = 32,
    mesh: Mesh | None = None,
) -> list[np.ndarray]:
  """Standardised ``(N nhoods_per_image, D)`` descriptors per level of a whole set (image i: index
  i)."""
  _check_images(np.shape(images), settings)
  indices = np.arange(len(images), dtype=np.int32)
  fn = functools.partial(descriptors, settings=settings)
  raw = batching.map_batches(
      lambda x, i: fn(x, i, key), [images, indices], batch_size=batch_size, mesh=mesh
  )
  return [standardize(level.reshape(-1, level.shape[-1])) for level in raw]


def swd(
    images_a: np.ndarray,
    images_b: np.ndarray,
    key: jax.Array,
    settings: Settings = Settings(),
    *,
    batch_size: int = 32,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
  """``{'swd': mean over levels, 'levels': [per level, finest first]}``, x1e3, of two equal-sized
  uint8 sets."""
  if np.shape(images_a) != np.shape(images_b):
    raise ValueError(f"SWD: the sets differ in shape: {np.shape(images_a)} vs {np.shape(images_b)}")
  a = level_descriptors(images_a, key, settings, batch_size=batch_size, mesh=mesh)
  b = level_descriptors(images_b, key, settings, batch_size=batch_size, mesh=mesh)
  levels = [
      SCALE * float(sliced_wasserstein(x, y, directions(key, i, x.shape[1], settings)))
      for i, (x, y) in enumerate(zip(a, b))
  ]
  return dict(swd=float(np.mean(levels)), levels=levels)
