"""Fake benchmark data sets in the official folder layouts (``builders.py``), for tests and
benchmarks.

``write_celebahq``, ``write_deepfashion`` and ``write_lsun_church`` write a folder that the TFDS
builders read like the real one: photos, their condition inputs (CelebAMask-HQ part masks, OpenPose
files, label-id maps), the split lists and the exemplar lists. What they write is a pure function of
their arguments (``seed``), and sizes are arguments: the tests write tiny images,
``benchmarks/input_pipeline.py`` the real sizes (CelebA-HQ 1024 px photos with 512 px masks,
DeepFashion 256 x 176, LSUN church 256 px high).

Content, drawn so that conditions are meaningful: CelebA-HQ a face (ellipses) whose parts are also
the part masks; DeepFashion a person along a jittered standing skeleton, which is the pose file;
LSUN church vertical stripes of label ids, the photo's grey a function of the id
(``LSUN_STRIPE_IDS``, ``LSUN_GRAYS``). Options write the cases that the official loaders read in
their own way: CelebA-HQ split lists in no order (``shuffle_lists``), LSUN label maps with another
id in a corner (``label_patches``, e.g.
150) and a ``training/files.list`` (``files_list``).
``texture`` blends a real photo into the drawing (scikit-image's bundled samples, a random crop per
image): 0 keeps flat colours (tests assert them), 0.5 gives JPEG sizes and decode costs like real
photos.

Each writer returns a ``FakeDataSet``: the folder, the record keys per split as the builder names
them, and each key's condition input as written (what a test compares with).
"""

import dataclasses
import functools
import io
import pathlib
from typing import Any, Collection, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw
from skimage import data as skimage_data

from midms_jax.data import builders, conditions

# record name as the list writes it -> candidate names, in order
ExemplarList = Mapping[str, Sequence[str]]
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1)

# bundled with scikit-image (no download)
PHOTO_SAMPLES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
)
CELEBAHQ_MASKS_PER_FOLDER = 2000  # CelebAMask-HQ: masks of ids [2000 k, 2000 (k + 1)) in folder k
LSUN_STRIPE_IDS = (0, 3, 255, 149, 7)  # label ids of the stripes, left to right (255: don't care)
LSUN_GRAYS = (20, 70, 120, 170, 220)  # the photo's grey where each of those ids is

# Face parts: ellipses in the face box's [0, 1] frame, in drawing order (later ones on top).
FACE_PARTS: dict[str, Box] = {
    "hair": (-0.15, -0.12, 1.15, 0.4),
    "l_ear": (-0.08, 0.4, 0.06, 0.62),
    "r_ear": (0.94, 0.4, 1.08, 0.62),
    "skin": (0.0, 0.0, 1.0, 1.0),
    "l_brow": (0.18, 0.3, 0.42, 0.35),
    "r_brow": (0.58, 0.3, 0.82, 0.35),
    "l_eye": (0.24, 0.38, 0.4, 0.45),
    "r_eye": (0.6, 0.38, 0.76, 0.45),
    "eye_g": (0.14, 0.33, 0.86, 0.5),
    "nose": (0.42, 0.42, 0.58, 0.64),
    "u_lip": (0.32, 0.72, 0.68, 0.78),
    "l_lip": (0.34, 0.78, 0.66, 0.85),
    "mouth": (0.38, 0.76, 0.62, 0.8),
}
# how often a face has them
OPTIONAL_PARTS = {
    "l_ear": 0.7,
    "r_ear": 0.7,
    "eye_g": 0.1,
    "mouth": 0.4,
}
# the face in the photo's [0, 1] frame, before jitter
FACE_BOX: Box = (
    0.1875,
    0.125,
    0.8125,
    0.9375,
)

# A standing person facing the camera, COCO-18 keypoint order: (x, y) in the photo's [0, 1] frame.
POSE_TEMPLATE = np.array(
    [
        (0.5, 0.15),
        (0.5, 0.25),
        (0.35, 0.26),
        (0.3, 0.42),
        (0.28, 0.56),
        (0.65, 0.26),
        (0.7, 0.42),
        (0.72, 0.56),
        (0.42, 0.55),
        (0.41, 0.72),
        (0.4, 0.9),
        (0.58, 0.55),
        (0.59, 0.72),
        (0.6, 0.9),
        (0.47, 0.13),
        (0.53, 0.13),
        (0.44, 0.14),
        (0.56, 0.14),
    ]
)
DEEPFASHION_FOLDERS = ("WOMEN/Dresses", "MEN/Denim", "WOMEN/Tees_Tanks", "MEN/Shirts_Polos")
DEEPFASHION_VIEWS = ("1_front", "2_side", "3_back", "4_full")


@dataclasses.dataclass(frozen=True)
class FakeDataSet:
  """A written fake data set: its folder (``manual_dir``), record keys per split as the builder
  names them, in the order written (the split lists', LSUN church's ``names`` or ``files.list``;
  the builders write them in the official loader's order, ``builders.py``), ``exemplars``: the
  images only the exemplar lists name; the photo size ``(height, width)``; and per key the
  condition input as written: CelebA-HQ the parts that have a mask (names), DeepFashion
  ``(candidate, subset)`` as in its pose files, LSUN church the label ids ``(H, W)``."""

  root: pathlib.Path
  train: tuple[str, ...]
  validation: tuple[str, ...]
  exemplars: tuple[str, ...]
  image_shape: tuple[int, int]
  condition_inputs: Mapping[str, Any]


def jpeg_bytes(pixels: np.ndarray, quality: int = 95) -> bytes:
  """A uint8 image encoded as JPEG."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
  """A uint8 image (e.g. a mask or label-id map) encoded as PNG."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


def _write(path: pathlib.Path, data: bytes | str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, str):
    path.write_text(data, newline="")
  else:
    path.write_bytes(data)


def _rng(seed: int, number: int, stream: int) -> np.random.Generator:
  """Image ``number``'s generator of ``stream`` (0: drawing, 1: texture): images are independent."""
  return np.random.default_rng([seed, number, stream])


@functools.cache
def _sample_photo(name: str) -> np.ndarray:
  return getattr(skimage_data, name)()


def real_photo(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """A random crop (at least half of each side) of a scikit-image sample photo, resized bicubic to
  ``shape`` = (height, width) and maybe mirrored: uint8 ``(H, W, 3)``."""
  photo = _sample_photo(PHOTO_SAMPLES[rng.integers(len(PHOTO_SAMPLES))])
  height, width = photo.shape[:2]
  crop_h, crop_w = rng.integers(height // 2, height + 1), rng.integers(width // 2, width + 1)
  top, left = rng.integers(height - crop_h + 1), rng.integers(width - crop_w + 1)
  crop = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize(
      shape[::-1], Image.BICUBIC
  )
  pixels = np.asarray(crop)
  return pixels[:, ::-1] if rng.random() < 0.5 else pixels


def _textured(drawn: np.ndarray, texture: float, rng: np.random.Generator) -> np.ndarray:
  """``drawn`` with a share ``texture`` of a real photo blended in (0: ``drawn`` itself)."""
  if not texture:
    return drawn
  if not 0 < texture <= 1:
    raise ValueError(f"texture must be in [0, 1], got {texture}")
  blend = (1 - texture) * drawn + texture * real_photo(rng, drawn.shape[:2])
  return np.rint(blend).astype(np.uint8)


def _gradient(shape: tuple[int, int]) -> Image.Image:
  """A grey-level ramp from left to right (RGB): a background with structure but no edges."""
  ramp = np.linspace(30, 200, shape[1], dtype=np.uint8)
  return Image.fromarray(np.tile(ramp[None, :, None], (shape[0], 1, 3)))


def _colour(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
  return tuple(int(v) for v in rng.integers(low, high, 3))


def _default_lists(
    names: Sequence[str], others: Sequence[str], candidates: int = 3
) -> dict[str, list[str]]:
  """Exemplar list lines: each name's next ``candidates`` names (cyclically); with ``others``, the
  last candidate is one of them instead (an exemplar from elsewhere, as the official lists have)."""
  lines = {}
  for i, name in enumerate(names):
    line = [names[(i + j) % len(names)] for j in range(1, candidates + 1)]
    if others:
      line[-1] = others[i % len(others)]
    lines[name] = line
  return lines


def _list_text(lines: ExemplarList, separator: str = "/") -> str:
  """An exemplar list file: ``name,candidate,...`` per line (DeepFashion: Windows separators)."""
  return "".join(
      ",".join(n.replace("/", separator) for n in (name, *cands)) + "\n"
      for name, cands in lines.items()
  )


def _shuffled(values: Sequence[int], rng: np.random.Generator) -> list[int]:
  """``values`` (ascending) in a random order that is not ascending (when there are two or more)."""
  order = [int(v) for v in rng.permutation(values)]
  return order[1:] + order[:1] if order == sorted(order) else order


# ---------------------------------------------------------------------------------------------------------
# CelebA-HQ.


def _face_parts(rng: np.random.Generator) -> tuple[str, ...]:
  """The parts a face has (in ``FACE_PARTS`` order): all but the optional ones it happens to
  lack."""
  draws = {part: rng.random() for part in OPTIONAL_PARTS}
  return tuple(p for p in FACE_PARTS if p not in OPTIONAL_PARTS or draws[p] < OPTIONAL_PARTS[p])


def _part_box(face: Box, part: str, side: int) -> Box:
  """Part ``part``'s ellipse box in pixels of a ``side``-pixel image, for ``face`` in the [0, 1]
  frame."""
  x0, y0, x1, y1 = face
  u0, v0, u1, v1 = FACE_PARTS[part]
  width, height = x1 - x0, y1 - y0
  return (
      side * (x0 + u0 * width),
      side * (y0 + v0 * height),
      side * (x0 + u1 * width),
      side * (y0 + v1 * height),
  )


def _face_photo(rng: np.random.Generator, face: Box, parts: Sequence[str], side: int) -> np.ndarray:
  """The face on a ramp background: skin, dark hair, brows and eyes, red lips, glasses as an
  outline."""
  image = _gradient((side, side))
  draw = ImageDraw.Draw(image)
  skin, hair = _colour(rng, 120, 255), _colour(rng, 10, 90)
  fills = dict(
      hair=hair,
      l_ear=skin,
      r_ear=skin,
      skin=skin,
      l_brow=hair,
      r_brow=hair,
      l_eye=(10, 10, 10),
      r_eye=(10, 10, 10),
      nose=tuple(int(c * 0.85) for c in skin),
      u_lip=(170, 60, 60),
      l_lip=(190, 70, 70),
      mouth=(40, 10, 10),
  )
  for part in parts:
    box = _part_box(face, part, side)
    if part == "eye_g":
      draw.ellipse(box, outline=(20, 20, 20), width=max(1, side // 128))
    else:
      draw.ellipse(box, fill=fills[part])
  return np.asarray(image)


def _face_mask(face: Box, part: str, side: int) -> np.ndarray:
  """A CelebAMask-HQ mask: L-mode 0 / 255, ``side`` x ``side``."""
  mask = Image.new("L", (side, side))
  ImageDraw.Draw(mask).ellipse(_part_box(face, part, side), fill=255)
  return np.asarray(mask)


def write_celebahq(
    root: str | pathlib.Path,
    n_train: int = 4,
    n_val: int = 2,
    *,
    image_size: int = 64,
    mask_size: int | None = None,
    n_extra: int = 1,
    seed: int = 0,
    texture: float = 0.0,
    quality: int = 95,
    refs: ExemplarList | None = None,
    test_refs: ExemplarList | None = None,
    unmasked: Collection[int] = (),
    shuffle_lists: bool = False,
) -> FakeDataSet:
  """CelebA-HQ in CoCosNet's layout: ``train.txt`` ids ``0..n_train-1``, ``val.txt`` ids from the
  next multiple of 2000, ``n_extra`` images only the exemplar lists name (ids after the training
  ones); photos ``image_size`` px JPEG, part masks ``mask_size`` px (default half, as
  CelebAMask-HQ's 512 for 1024).

  ``refs`` / ``test_refs``: the exemplar lists' lines (default: the next records of the split; the
  last training candidate an extra image, the last test candidate a training image). ``unmasked``:
  ids written without part masks (real faces all have them; a test of that case). ``shuffle_lists``:
  ``train.txt`` and ``val.txt`` in a random order drawn from ``seed``, never ascending (default:
  ascending ids)."""
  root = pathlib.Path(root)
  mask_size = mask_size or image_size // 2
  extra_ids = list(range(n_train, n_train + n_extra))
  first_val = CELEBAHQ_MASKS_PER_FOLDER * (1 + (n_train + n_extra) // CELEBAHQ_MASKS_PER_FOLDER)
  ids = dict(train=list(range(n_train)), validation=list(range(first_val, first_val + n_val)))
  parts_of = {}
  for image_id in ids["train"] + ids["validation"] + extra_ids:
    rng = _rng(seed, image_id, 0)
    shift, scale = rng.uniform(-0.03, 0.03, 2), rng.uniform(0.95, 1.05)
    face = tuple(0.5 + (c - 0.5) * scale + shift[k % 2] for k, c in enumerate(FACE_BOX))
    parts = _face_parts(rng)
    photo = _textured(_face_photo(rng, face, parts, image_size), texture, _rng(seed, image_id, 1))
    key = f"{image_id}.jpg"
    _write(root / builders.CELEBAHQ_IMAGES / key, jpeg_bytes(photo, quality))
    parts_of[key] = () if image_id in unmasked else parts
    for part in parts_of[key]:
      _write(
          builders.celebahq_mask_path(root, key, part), png_bytes(_face_mask(face, part, mask_size))
      )
  if shuffle_lists:
    ids = {
        split: _shuffled(listed, np.random.default_rng([seed, 2, k]))
        for k, (split, listed) in enumerate(ids.items())
    }
  keys = {split: [f"{i}.jpg" for i in split_ids] for split, split_ids in ids.items()}
  for split, list_file in builders.LIST_FILES.items():
    _write(root / list_file, "".join(f"{i}\n" for i in ids[split]))
  extra = [f"{i}.jpg" for i in extra_ids]
  _write(root / "celebahq_ref.txt", _list_text(refs or _default_lists(keys["train"], extra)))
  _write(
      root / "celebahq_ref_test.txt",
      _list_text(test_refs or _default_lists(keys["validation"], keys["train"])),
  )
  return FakeDataSet(
      root,
      tuple(keys["train"]),
      tuple(keys["validation"]),
      tuple(extra),
      (image_size, image_size),
      parts_of,
  )


# ---------------------------------------------------------------------------------------------------------
# DeepFashion.


def _pose(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """OpenPose files' numbers of a jittered standing person inside a ``shape`` photo: 18 candidates
  (x, y integer pixels, score, id) and the subset (18 candidate rows, two keypoints missing: -1,
  then the total score and keypoint count OpenPose appends)."""
  height, width = shape
  relative = (
      POSE_TEMPLATE * rng.uniform(0.9, 1.05)
      + rng.uniform(-0.04, 0.04, 2)
      + rng.normal(0, 0.015, (18, 2))
  )
  x = np.clip(np.rint(relative[:, 0] * (width - 1)), 4, max(4, width - 5))
  y = np.clip(np.rint(relative[:, 1] * (height - 1)), 4, max(4, height - 5))
  candidate = np.column_stack([x, y, rng.uniform(0.5, 1, 18).round(3), np.arange(18)])
  subset = np.arange(18, dtype=np.float64)
  subset[rng.choice(18, 2, replace=False)] = -1
  return candidate, np.concatenate([subset, [25.3, 16]])


def _person_photo(
    rng: np.random.Generator, candidate: np.ndarray, subset: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
  """A person on a ramp background: limbs as thick lines in a clothing colour, the head a skin
  disc."""
  image = _gradient(shape)
  draw = ImageDraw.Draw(image)
  clothes, skin = _colour(rng, 0, 255), _colour(rng, 120, 255)
  width = max(1, shape[1] // 10)
  points = {k: tuple(candidate[int(i), :2]) for k, i in enumerate(subset[:18]) if i >= 0}
  for a, b in conditions.POSE_LIMBS:
    if a - 1 in points and b - 1 in points:
      draw.line((points[a - 1], points[b - 1]), fill=clothes, width=width)
  if 0 in points:
    x, y = points[0]
    draw.ellipse((x - width, y - width, x + width, y + width), fill=skin)
  return np.asarray(image)


def _deepfashion_key(i: int) -> str:
  folder, view = (
      DEEPFASHION_FOLDERS[i % len(DEEPFASHION_FOLDERS)],
      DEEPFASHION_VIEWS[i % len(DEEPFASHION_VIEWS)],
  )
  return f"img/{folder}/id_{i // len(DEEPFASHION_VIEWS) + 1:08d}/{i % 10 + 1:02d}_{view}.jpg"


def write_deepfashion(
    root: str | pathlib.Path,
    n_train: int = 3,
    n_val: int = 2,
    *,
    image_shape: tuple[int, int] = (64, 44),
    seed: int = 0,
    texture: float = 0.0,
    quality: int = 95,
    keys: tuple[Sequence[str], Sequence[str]] | None = None,
    refs: ExemplarList | None = None,
    test_refs: ExemplarList | None = None,
) -> FakeDataSet:
  """DeepFashion in CoCosNet's layout: photos ``img/.../<name>.jpg`` of ``image_shape`` (height,
  width), OpenPose ``pose/.../<name>_candidate.txt`` / ``_subset.txt``, ``train.txt`` / ``val.txt``
  with Windows separators and line ends (as the official lists). ``keys``: (train, validation) keys
  ``img/...jpg`` (default: ``n_train`` / ``n_val`` generated ones); ``refs`` / ``test_refs``:
  exemplar list lines by key (default: the next records of the split; the last test candidate a
  training image)."""
  root = pathlib.Path(root)
  train, val = keys or (
      [_deepfashion_key(i) for i in range(n_train)],
      [_deepfashion_key(i) for i in range(n_train, n_train + n_val)],
  )
  poses = {}
  for k, key in enumerate([*train, *val]):
    rng = _rng(seed, k, 0)
    candidate, subset = poses[key] = _pose(rng, image_shape)
    photo = _textured(_person_photo(rng, candidate, subset, image_shape), texture, _rng(seed, k, 1))
    _write(root / key, jpeg_bytes(photo, quality))
    candidate_path, subset_path = builders.deepfashion_pose_files(root, key)
    _write(candidate_path, "".join(" ".join(f"{v:g}" for v in row) + "\n" for row in candidate))
    _write(subset_path, " ".join(f"{v:g}" for v in subset) + "\n")
  windows = lambda split_keys: "".join(key.replace("/", "\\") + "\r\n" for key in split_keys)
  _write(root / builders.LIST_FILES["train"], windows(train))
  _write(root / builders.LIST_FILES["validation"], windows(val))
  _write(root / "deepfashion_ref.txt", _list_text(refs or _default_lists(train, ()), "\\"))
  _write(
      root / "deepfashion_ref_test.txt", _list_text(test_refs or _default_lists(val, train), "\\")
  )
  return FakeDataSet(root, tuple(train), tuple(val), (), tuple(image_shape), poses)


# ---------------------------------------------------------------------------------------------------------
# LSUN church.


def lsun_stripes(k: int, shape: tuple[int, int]) -> np.ndarray:
  """Label ids ``(H, W)`` of photo ``k``: column stripes of ``LSUN_STRIPE_IDS`` rotated right by
  ``k``, each ``W // 5`` pixels wide (repeating when that does not fill the width)."""
  height, width = shape
  stripe = max(1, width // len(LSUN_STRIPE_IDS))
  row = np.resize(np.repeat(np.roll(np.array(LSUN_STRIPE_IDS, np.uint8), k), stripe), width)
  return np.repeat(row[None, :], height, 0)


def lsun_gray(ids: np.ndarray) -> np.ndarray:
  """The photo's grey (uint8) at each label id of ``LSUN_STRIPE_IDS``; id 150 has the grey of 255
  (the official loader reads both as the don't-care class 150); other ids are black."""
  table = np.zeros(256, np.uint8)
  table[list(LSUN_STRIPE_IDS)] = LSUN_GRAYS
  table[builders.LSUN_CLASSES] = table[builders.LSUN_DONT_CARE_FILE_ID]
  return table[ids]


def lsun_labels(k: int, shape: tuple[int, int], patch: int | None = None) -> np.ndarray:
  """Label ids ``(H, W)`` of photo ``k``: ``lsun_stripes``, with a square of id ``patch`` in the
  top-left corner (half the shorter side) when it is given."""
  ids = lsun_stripes(k, shape)
  if patch is not None:
    side = max(1, min(shape) // 2)
    ids[:side, :side] = patch
  return ids


def write_lsun_church(
    root: str | pathlib.Path,
    n_train: int = 3,
    n_val: int = 2,
    *,
    image_shape: tuple[int, int] = (40, 40),
    seed: int = 0,
    texture: float = 0.0,
    quality: int = 95,
    names: tuple[Sequence[str], Sequence[str]] | None = None,
    refs: ExemplarList | None = None,
    test_refs: ExemplarList | None = None,
    label_patches: Mapping[str, int] | None = None,
    files_list: Sequence[str] | None = None,
) -> FakeDataSet:
  """LSUN church in MIDMs' layout: ``training/`` and ``validation/`` each with ``<name>.jpg`` photos
  of ``image_shape`` (height, width) and ``<name>.png`` label-id maps. ``names``: (train,
  validation) photo names (default ``img1.jpg``, ... and ``val1.jpg``, ...), written in that order;
  photo ``k`` of train + validation has ``lsun_stripes(k)``. ``refs`` / ``test_refs``: exemplar list
  lines by name (default: the next photos of the folder; the official exemplars sit beside their
  record's photo).

  ``label_patches``: key (``<folder>/<name>``) -> a label id written in a square at the top-left
  of its map (``lsun_labels``), e.g. 150. ``files_list``: names in ``training/`` (photos, label
  maps) that ``training/files.list`` lists, in that order, as the official cache writes them:
  ``<root>/training/<name>`` (absolute when ``root`` is); the training records are then its
  photos."""
  root = pathlib.Path(root)
  train, val = names or (
      [f"img{i}.jpg" for i in range(1, n_train + 1)],
      [f"val{i}.jpg" for i in range(1, n_val + 1)],
  )
  patches = label_patches or {}
  labels = {}
  photos = [(builders.LSUN_FOLDERS["train"], name) for name in train]
  photos += [(builders.LSUN_FOLDERS["validation"], name) for name in val]
  for k, (folder, name) in enumerate(photos):
    key = f"{folder}/{name}"
    ids = labels[key] = lsun_labels(k, image_shape, patches.get(key))
    photo = _textured(np.repeat(lsun_gray(ids)[..., None], 3, -1), texture, _rng(seed, k, 1))
    _write(root / key, jpeg_bytes(photo, quality))
    _write(root / builders.lsun_label_key(key), png_bytes(ids))
  if files_list is not None:
    folder = f"{root}/{builders.LSUN_FOLDERS['train']}"  # the official dataroot + "/training"
    _write(
        root / builders.LSUN_FOLDERS["train"] / builders.FILES_LIST,
        "".join(f"{folder}/{name}\n" for name in files_list),
    )
    train = [name for name in files_list if name.endswith(".jpg")]
  _write(root / "lsun_church_ref.txt", _list_text(refs or _default_lists(train, ())))
  _write(root / "lsun_church_ref_test.txt", _list_text(test_refs or _default_lists(val, ())))
  keys = lambda folder, split_names: tuple(f"{folder}/{name}" for name in split_names)
  return FakeDataSet(
      root,
      keys(builders.LSUN_FOLDERS["train"], train),
      keys(builders.LSUN_FOLDERS["validation"], val),
      (),
      tuple(image_shape),
      labels,
  )
