"""Condition maps ``(H, W, C)`` float32 in [0, 1], as each data set (``config.data.name``) feeds
them.

Rendering, exactly as the official data sets build them (numpy / OpenCV / Pillow / scikit-image,
outside jit):

* CelebA-HQ (``celebahq_condition``, 15 channels): Canny edges outside the facial parts plus all
  part boundaries | 13 per-part boundary distance maps | part boundaries. ``celebahq_part_masks``
  reads the CelebAMask-HQ part PNGs.
* DeepFashion (``deepfashion_condition``, 20 channels): OpenPose skeleton RGB | 17 per-limb distance
  maps, from the ``_candidate.txt`` / ``_subset.txt`` files (``read_candidate``, ``read_subset``).
* LSUN church (``one_hot_labels``, 151 channels): label ids one-hot, 255 ("don't care") -> id 150.

The random crop / flip of the official pipeline is not done here (the data pipeline does it, on all
channels alike). The official rendering uses opencv 4.1.2 and an unpinned scikit-image; Canny edges
depend on the scikit-image version (its implementation changed in 0.20), the rest is version-stable.

For the translate CLI a condition comes from one of three kinds of file (``condition_kind``
decides):

* ``array``: a ``.npy`` ``(H, W, C)`` array in [0, 1], exactly the tensor the data set builds. Any
  data set.
* ``labels``: a single-channel label-id image (PNG of mode L, P or I): LSUN church's segmentation.
* ``photo``: an RGB photo from which the condition is computed; only CelebA-HQ defines how
  (``celebahq_edges``: no part masks). Other data sets need the ``.npy`` (or label PNG) form.
"""

import io
import math
import pathlib
import warnings
from typing import Any, Mapping

import cv2
import numpy as np
import skimage
from PIL import Image
from scipy import ndimage
from skimage import feature

from midms_jax.data import images
from midms_jax.errors import InputError, first_line

LABEL_MODES = ("L", "P", "I", "I;16")
PHOTO_DATA_SETS = ("celebahq",)  # data sets whose condition can be computed from a photo

# CelebA-HQ: the official part order (channel 1 + k is the distance map of part k).
CELEBAHQ_PART_NAMES = (
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "l_ear",
    "r_ear",
    "nose",
    "u_lip",
    "mouth",
    "l_lip",
    "eye_g",
    "hair",
)
CELEBAHQ_PARTS = len(CELEBAHQ_PART_NAMES)
CELEBAHQ_CHANNELS = 2 + CELEBAHQ_PARTS
CANNY_HIGH_THRESHOLD = 0.2  # skimage's default high threshold, on the image scaled to [0, 1]

# DeepFashion: OpenPose COCO-18 colours (drawn as given into a BGR canvas, so R and B swap in the
# RGB result) and the limbs as 1-based keypoint pairs. The official list has two more pairs, (3, 17)
# and (6, 18), that it never draws (it loops over the first 17).
POSE_COLORS = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)
POSE_LIMBS = (
    (2, 3),
    (2, 6),
    (3, 4),
    (4, 5),
    (6, 7),
    (7, 8),
    (2, 9),
    (9, 10),
    (10, 11),
    (2, 12),
    (12, 13),
    (13, 14),
    (2, 1),
    (1, 15),
    (15, 17),
    (1, 16),
    (16, 18),
)
POSE_KEYPOINTS = len(POSE_COLORS)
KEYPOINT_RADIUS = 4
STICK_WIDTH = 4
DEEPFASHION_CHANNELS = 3 + len(POSE_LIMBS)
DEEPFASHION_LOAD_SIZE = 256


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
  """``'array'`` for ``.npy``, ``'labels'`` for a single-channel image, ``'photo'`` for any other
  image."""
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
    raise InputError(f"{path}: not a readable .npy array: {first_line(e)}") from None
  if array.ndim != 3:
    raise InputError(f"{path}: expected an (H, W, C) condition array, found shape {array.shape}")
  if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise InputError(f"{path}: condition array has dtype {array.dtype}, expected numbers")
  if array.shape[-1] != channels:
    transposed = " (channels first? store it as (H, W, C))" if array.shape[0] == channels else ""
    raise InputError(
        f"{path}: condition has {array.shape[-1]} channels, the config expects {channels}"
        f"{transposed}"
    )
  array = array.astype(np.float32)
  if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
    raise InputError(
        f"{path}: condition values must lie in [0, 1], found {array.min():g}..{array.max():g}"
    )
  return array


def one_hot_labels(
    image: Image.Image, path: str | pathlib.Path, channels: int, load_size: int | None = None
) -> np.ndarray:
  """A label-id image one-hot to ``channels``: ids 0..channels-2, 255 = don't care -> id channels-1.

  As the official LSUN church data: the PNG resized nearest (Pillow) to ``load_size`` x
  ``load_size`` (``None``: kept), its ids (``ToTensor() * 255`` is exact for 0..255), 255 -> 150,
  one-hot to 151 in ``train_epoch`` (``scatter_``).
  """
  if image.mode not in LABEL_MODES:
    raise InputError(
        f"{path}: label map must be a single-channel image of ids (mode L, P or I), found "
        f"{images.describe_mode(image.mode)}"
    )
  if load_size is not None:
    image = image.resize((load_size, load_size), Image.NEAREST)
  ids = np.asarray(image).astype(np.int64)
  ids[ids == 255] = channels - 1
  bad = np.unique(ids[(ids < 0) | (ids >= channels)])
  if bad.size:
    found = ", ".join(map(str, bad[:5]))
    raise InputError(
        f"{path}: label ids must be 0..{channels - 1} or 255 (read as {channels - 1}, don't care), "
        f"found {found}"
    )
  return np.eye(channels, dtype=np.float32)[ids]


def _to_unit(pixels: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [0, 1], as ``ToTensor`` divides."""
  return pixels.astype(np.float32) / np.float32(255.0)


def boundaries(mask: np.ndarray) -> np.ndarray:
  """uint8 {0, 1} map of the pixels whose right, left, lower or upper neighbour has another value.

  Both pixels of every differing pair are marked, so a region's outline is 2 pixels wide (official
  ``get_edges``).
  """
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"boundaries expects a 2-D mask, got shape {mask.shape}")
  edge = np.zeros(mask.shape, np.uint8)
  across = mask[:, 1:] != mask[:, :-1]
  down = mask[1:, :] != mask[:-1, :]
  edge[:, 1:] |= across
  edge[:, :-1] |= across
  edge[1:, :] |= down
  edge[:-1, :] |= down
  return edge


def distance_uint8(source: np.ndarray) -> np.ndarray:
  """Official distance map of a uint8 image: ``cv2.distanceTransform(source, DIST_L1, 3) / 3``,
  clipped to [0, 255] and truncated to uint8.

  The L1 transform (exact with the 3x3 mask) measures the city-block distance to the nearest 0
  pixel; with no 0 pixel it is FLT_MAX everywhere, so the map is 255 everywhere.
  """
  distance = cv2.distanceTransform(np.asarray(source, np.uint8), cv2.DIST_L1, 3)
  return np.clip(distance / 3, 0, 255).astype(np.uint8)


def _photo_image(photo: Any) -> Image.Image:
  """A PIL image of a photo given as PIL image, uint8 array, or float array in [0, 1] ((H, W, 3) or
  (H, W))."""
  if isinstance(photo, Image.Image):
    return photo
  pixels = np.asarray(photo)
  if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3):
    raise ValueError(f"photo must be (H, W, 3) RGB or (H, W) grayscale, got shape {pixels.shape}")
  if np.issubdtype(pixels.dtype, np.floating):
    if not np.all(np.isfinite(pixels)) or pixels.min() < 0 or pixels.max() > 1:
      raise ValueError("a float photo must lie in [0, 1]")
    pixels = np.rint(pixels * 255.0)
  elif pixels.dtype != np.uint8 and (pixels.min() < 0 or pixels.max() > 255):
    raise ValueError(f"an integer photo must lie in 0..255, found {pixels.min()}..{pixels.max()}")
  return Image.fromarray(pixels.astype(np.uint8))


def _mask_values(mask: Any, size: tuple[int, int], part: str) -> np.ndarray:
  """A part mask as the official L-mode values (0 / 255), resized nearest to ``size`` = (width,
  height).

  Accepts a PIL image (converted to L, values kept), a bool array, an array in [0, 1] (scaled
  by 255) or an integer array in 0..255 (kept).
  """
  if isinstance(mask, Image.Image):
    image = mask.convert("L")
  else:
    values = np.asarray(mask)
    if values.ndim != 2:
      raise ValueError(f"part mask {part!r} must be 2-D (H, W), got shape {values.shape}")
    if values.dtype == bool or (values.size and values.min() >= 0 and values.max() <= 1):
      values = np.rint(values * 255.0)
    elif values.size and (values.min() < 0 or values.max() > 255):
      raise ValueError(f"part mask {part!r} must be binary, in [0, 1] or in 0..255")
    image = Image.fromarray(values.astype(np.uint8), "L")
  return np.asarray(image.resize(size, Image.NEAREST))


def _canny_looks_broken(gray: np.ndarray, edges: np.ndarray) -> bool:
  """True when Canny found nothing although the smoothed image's gradient reaches twice Canny's high
  threshold away from the border (a working Canny keeps such a maximum): the silent failure of some
  scikit-image versions (e.g. 0.15 on uint8 images)."""
  if edges.any() or min(gray.shape) < 8:
    return False
  smoothed = ndimage.gaussian_filter(gray.astype(np.float64) / 255.0, 1.0)
  magnitude = np.hypot(ndimage.sobel(smoothed, axis=0), ndimage.sobel(smoothed, axis=1))
  return magnitude[3:-3, 3:-3].max() >= 2 * CANNY_HIGH_THRESHOLD


def celebahq_condition(
    photo: Any,
    part_masks: Mapping[str, Any] | None = None,
    load_size: int | None = None,
    name: str | pathlib.Path = "photo",
) -> np.ndarray:
  """The official CelebA-HQ condition ``(S, S, 15)`` float32 in [0, 1] of a photo and its part
  masks.

  ``photo``: PIL image or RGB array (uint8, or float in [0, 1]), resized bilinear (Pillow) to
  ``load_size`` x ``load_size`` (``None``: kept at its size). ``part_masks``: part name
  (``CELEBAHQ_PART_NAMES``) -> mask (see ``_mask_values``), resized nearest to the same size;
  missing parts are allowed. ``name`` names the photo in the empty-edge warning.

  Channel 0: part boundaries united with the Canny edges (skimage defaults on the uint8 grayscale
  image, i.e. sigma 1 and thresholds 0.1 / 0.2 of the [0, 1] range) outside every part but hair
  (later parts win: inside hair the edges are kept even over skin). Channels 1..13: each part's
  boundary distance map (``distance_uint8`` of ``255 - boundary * 255``, /255); a missing part gives
  1.0. Channel 14: the union of part boundaries.
  """
  part_masks = dict(part_masks or {})
  unknown = sorted(set(part_masks) - set(CELEBAHQ_PART_NAMES))
  if unknown:
    raise ValueError(
        f"unknown CelebA-HQ part(s) {unknown}; parts are {', '.join(CELEBAHQ_PART_NAMES)}"
    )
  image = _photo_image(photo)
  if load_size is not None:
    image = image.resize((load_size, load_size), Image.BILINEAR)
  size = image.size
  shape = (size[1], size[0])
  inner = np.ones(shape, np.uint8)  # 1 where Canny edges are kept
  edges = np.zeros(shape, np.uint8)
  condition = np.empty(shape + (CELEBAHQ_CHANNELS,), np.float32)
  for k, part in enumerate(CELEBAHQ_PART_NAMES):
    boundary = np.zeros(shape, np.uint8)
    if part_masks.get(part) is not None:
      values = _mask_values(part_masks[part], size, part)
      inner[values == 255] = 1 if part == "hair" else 0
      boundary = boundaries(values)
      edges |= boundary
    condition[..., 1 + k] = _to_unit(distance_uint8(255 - boundary * 255))
  gray = np.asarray(image.convert("L"))
  canny = feature.canny(gray)
  if _canny_looks_broken(gray, canny):
    warnings.warn(
        f"{name}: Canny found no edges in a photo with clear structure; scikit-image "
        f"{skimage.__version__} may be mishandling {gray.dtype} images (its edge maps would be "
        "empty)",
        RuntimeWarning,
        stacklevel=2,
    )
  condition[..., 0] = edges | (canny * inner)
  condition[..., CELEBAHQ_CHANNELS - 1] = edges
  return condition


def celebahq_part_masks(anno_dir: str | pathlib.Path, image_id: int) -> dict[str, Image.Image]:
  """The existing CelebAMask-HQ part masks of an image:
  ``{anno_dir}/{id // 2000}/{id:05d}_{part}.png`` (``anno_dir`` is the ``CelebAMask-HQ-mask-anno``
  folder), as L-mode images."""
  folder = pathlib.Path(anno_dir) / str(image_id // 2000)
  masks = {}
  for part in CELEBAHQ_PART_NAMES:
    path = folder / f"{image_id:05d}_{part}.png"
    if path.is_file():
      masks[part] = images.open_image(path).convert("L")
  return masks


def celebahq_edges(rgb: np.ndarray, name: str | pathlib.Path = "photo") -> np.ndarray:
  """The CelebA-HQ condition ``(H, W, 15)`` of a uint8 RGB photo at its own size, without part
  masks.

  This is ``celebahq_condition`` with no masks, what the official code yields for a face without
  part annotations: all Canny edges (channel 0), distance maps at 1.0 (channels 1..13), no
  boundaries (14). With the CelebAMask-HQ masks the condition differs (edges inside parts are
  replaced by part boundaries); pass such conditions as ``.npy``.
  """
  return celebahq_condition(rgb, name=name)


def _read_numbers(path: str | pathlib.Path) -> np.ndarray:
  """The numbers of a text file as ``np.loadtxt`` reads it (one row a line, ``#`` comments), with
  commas accepted as separators too."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"{path}: no such file")
  try:
    with warnings.catch_warnings():
      # loadtxt warns on empty files: an empty pose is valid
      warnings.simplefilter("ignore", UserWarning)
      return np.loadtxt(io.StringIO(path.read_text().replace(",", " ")), dtype=np.float64, ndmin=2)
  except ValueError as e:
    raise InputError(f"{path}: not a table of numbers: {first_line(e)}") from None


def read_candidate(path: str | pathlib.Path) -> np.ndarray:
  """OpenPose keypoint candidates ``(N, C >= 2)``: rows ``x y score id`` (x = column, y = row,
  pixels)."""
  candidate = _read_numbers(path)
  if not candidate.size:
    return np.zeros((0, 4))
  if candidate.shape[1] < 2:
    raise InputError(
        f"{path}: candidate rows need at least x and y, found {candidate.shape[1]} column(s)"
    )
  return candidate


def read_subset(path: str | pathlib.Path) -> np.ndarray:
  """OpenPose subset of one person: the first 18 numbers of its (single) row, candidate row indices
  with -1 = missing (OpenPose appends total score and keypoint count, ignored)."""
  subset = _read_numbers(path)
  if subset.shape[0] != 1 or subset.shape[1] < POSE_KEYPOINTS:
    raise InputError(
        f"{path}: expected one row of at least {POSE_KEYPOINTS} keypoint indices, found shape "
        f"{subset.shape}"
    )
  return subset[0, :POSE_KEYPOINTS]


def deepfashion_pose_paths(image_path: str | pathlib.Path) -> tuple[str, str]:
  """(candidate, subset) files of a DeepFashion image: ``.../img/X.jpg`` ->
  ``.../pose/X_candidate.txt``."""
  stem = str(image_path).replace("\\", "/").replace("/img/", "/pose/").replace(".jpg", "_{}.txt")
  return stem.format("candidate"), stem.format("subset")


def _pose_indices(subset: np.ndarray, candidate: np.ndarray) -> np.ndarray:
  """The 18 keypoints' candidate rows (``int`` truncation as the official code), -1 = missing;
  checked."""
  subset = np.asarray(subset, np.float64).reshape(-1)
  if subset.size < POSE_KEYPOINTS:
    raise ValueError(f"subset needs {POSE_KEYPOINTS} keypoint indices, got {subset.size}")
  indices = subset[:POSE_KEYPOINTS].astype(int)
  bad = indices[(indices != -1) & ((indices < 0) | (indices >= len(candidate)))]
  if bad.size:
    raise ValueError(
        f"subset refers to candidate row {bad[0]}, but there are {len(candidate)} candidates "
        f"(-1 marks a missing keypoint)"
    )
  return indices


def render_pose(
    candidate: np.ndarray, subset: np.ndarray, image_shape: tuple[int, int]
) -> tuple[np.ndarray, list[np.ndarray]]:
  """The official OpenPose drawing at the original image size ``(height, width)``.

  Returns the BGR canvas (uint8 ``(H, W, 3)``): a filled circle per present keypoint, then each
  limb's filled ellipse blended in at 0.6 (``addWeighted``); and the 17 limb masks (uint8, 255
  inside the ellipse, all 0 for a limb with a missing endpoint). Coordinates: candidate column 0 is
  x (image column), column 1 is y (row); OpenCV points are (x, y).
  """
  candidate = np.asarray(candidate, np.float64)
  if candidate.size == 0:
    candidate = np.zeros((0, 2))
  if candidate.ndim != 2 or candidate.shape[1] < 2:
    raise ValueError(f"candidate must be (N, >= 2) rows of x, y, ..., got shape {candidate.shape}")
  indices = _pose_indices(subset, candidate)
  canvas = np.zeros(tuple(image_shape) + (3,), np.uint8)
  for i, color in enumerate(POSE_COLORS):
    if indices[i] != -1:
      x, y = candidate[indices[i], 0:2]
      cv2.circle(canvas, (int(x), int(y)), KEYPOINT_RADIUS, color, thickness=-1)
  masks = []
  for (a, b), color in zip(POSE_LIMBS, POSE_COLORS):
    ends = indices[[a - 1, b - 1]]
    if -1 in ends:
      masks.append(np.zeros(image_shape, np.uint8))
      continue
    xs, ys = candidate[ends, 0], candidate[ends, 1]
    length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
    angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
    polygon = cv2.ellipse2Poly(
        (int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
    )
    limb = canvas.copy()
    cv2.fillConvexPoly(limb, polygon, color)
    canvas = cv2.addWeighted(canvas, 0.4, limb, 0.6, 0)
    mask = np.zeros(image_shape, np.uint8)
    cv2.fillConvexPoly(mask, polygon, 255)
    masks.append(cv2.addWeighted(mask, 0.4, mask, 0.6, 0))  # a no-op kept from the official code
  return canvas, masks


def deepfashion_condition(
    candidate: np.ndarray,
    subset: np.ndarray,
    image_shape: tuple[int, int],
    load_size: int | None = DEEPFASHION_LOAD_SIZE,
) -> np.ndarray:
  """The official DeepFashion condition ``(S, S, 20)`` float32 in [0, 1] of an OpenPose skeleton.

  ``candidate`` / ``subset``: as ``read_candidate`` / ``read_subset`` give them; ``image_shape``:
  the original photo's ``(height, width)`` (the skeleton is drawn at that size, in its pixel
  coordinates). Channels 0..2: the drawn pose as RGB (the colours' R and B swapped), resized nearest
  (Pillow) to ``load_size`` x ``load_size``; channels 3..19: per limb ``distance_uint8(255 - mask)``
  at the original size, then resized bilinear (Pillow, as uint8; the aspect ratio is not kept).
  ``load_size=None`` keeps the original size.
  """
  if len(image_shape) != 2 or min(image_shape) < 1:
    raise ValueError(f"image_shape must be (height, width), got {image_shape}")
  canvas, masks = render_pose(candidate, subset, tuple(int(s) for s in image_shape))
  size = (image_shape[1], image_shape[0]) if load_size is None else (load_size, load_size)
  pose = Image.fromarray(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)).resize(size, Image.NEAREST)
  condition = np.empty((size[1], size[0], DEEPFASHION_CHANNELS), np.float32)
  condition[..., :3] = _to_unit(np.asarray(pose))
  for k, mask in enumerate(masks):
    distance = Image.fromarray(distance_uint8(255 - mask)).resize(size, Image.BILINEAR)
    condition[..., 3 + k] = _to_unit(np.asarray(distance))
  return condition


def from_photo(
    path: str | pathlib.Path, config, factor: int = 1, rgb: np.ndarray | None = None
) -> np.ndarray:
  """The condition computed from an RGB photo (CelebA-HQ only; ``rgb``: its pixels if already
  read)."""
  name = config.data.name
  if name not in PHOTO_DATA_SETS:
    raise InputError(
        f"{path}: {name} conditions cannot be computed from a photo; pass {hint(config)}"
    )
  channels = config.model.correspondence.label_channels
  if channels != CELEBAHQ_CHANNELS:
    raise InputError(
        f"{path}: CelebA-HQ edge conditions have {CELEBAHQ_CHANNELS} channels, the config "
        f"expects {channels}"
    )
  return celebahq_edges(images.read_rgb(path, factor) if rgb is None else rgb, name=path)


def load_condition(path: str | pathlib.Path, config: Any, factor: int = 1) -> np.ndarray:
  """The ``(H, W, label_channels)`` condition of a file, by its kind (see the module docstring)."""
  path = pathlib.Path(path)
  channels = config.model.correspondence.label_channels
  image = None if path.suffix.lower() == ".npy" else images.open_image(path)
  kind = _kind_of(path, image)
  # other data sets refuse before the pixels are checked: their hint is more useful
  if kind == "photo":
    return from_photo(
        path,
        config,
        factor,
        images.rgb_pixels(image, path, factor) if config.data.name in PHOTO_DATA_SETS else None,
    )
  if kind == "array":
    condition = load_array(path, channels)
  elif config.data.name == "lsun_church":
    condition = one_hot_labels(image, path, channels)
  else:
    raise InputError(
        f"{path}: a {images.describe_mode(image.mode)} is read as a label-id map, which "
        f"only lsun_church uses; {config.data.name} needs {hint(config)}"
    )
  images.check_size(condition.shape[0], condition.shape[1], factor, path)
  return condition
