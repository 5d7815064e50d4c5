"""The embedded synthetic data set: procedural shape scenes with ground truth, no download.

A scene is a textured background plus 1..K objects of distinct shape classes, each with its own
appearance (two colours mixed by a stripes / checker / gradient / value-noise texture). A sample is
a pair of layouts of the SAME objects: the ground-truth layout and an exemplar layout where every
object is moved and rescaled. Both are rendered with the same appearances:

* ``image``: the ground truth (the official code's ``src``), ``ref``: the exemplar, both
  ``(H, W, 3)`` float32 in [-1, 1];
* ``label`` / ``label_ref``: their condition maps ``(H, W, LABEL_CHANNELS)`` float32 in [0, 1].

Condition encoding (``LABEL_CHANNELS`` = 7, independent of which classes a config enables):
channel 0 background, channels 1..5 the shapes of ``SHAPES`` in order (soft one-hot: anti-aliased
coverage composited in draw order, so the six channels sum to 1 at every pixel), channel 6 the
boundaries of the visible-class map (each pixel takes the class of the topmost object covering at
least half of it): 1 on both sides of every change between 4-neighbours, as CelebA-HQ's part
boundaries.

Why the task is fair and real: appearances are drawn from their own random stream, independent
of the layout, so the condition map says nothing about colours or textures; every texture lives in
its object's local frame (it moves and scales with the object) and an object keeps its rotation
in both layouts, so the ground truth is the exemplar's object pixels under a similarity warp that
the two condition maps reveal (centre and size). Objects are not flipped or rotated between layouts
for that reason: a flip of a symmetric shape is invisible in the condition map, so the flipped
texture could not be inferred. The background does not move and uses only global parametric
textures (no noise; ``background_textures`` picks them, "flat" being one colour), so parts hidden
behind objects in the exemplar are still determined. ``configs/synthetic.py`` uses flat backgrounds:
a uniformly labelled region gives soft matching no cue to where in it a pixel lies, so a striped
background would be warped to its mean colour by any matcher, and copying the exemplar would win.
Placement keeps objects inside the image and apart where it can (``min_separation``); occlusion
is rare and then the smaller object is drawn on top.

Each sample is a pure function of ``(seed, split, index)`` (numpy ``SeedSequence``), so any index
is generated independently: ``SyntheticSource`` is a random-access source (``__len__`` /
``__getitem__``, the protocol of ``grain.python.RandomAccessDataSource``).

    python -m midms_jax.data.synthetic --out=preview.png --n=8   # rows: label_ref, ref, label, image
"""

import argparse
import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("stripes", "checker", "gradient", "noise", "flat")
OBJECT_TEXTURES = TEXTURES[:4]
# global, so recoverable from a partial view
BACKGROUND_TEXTURES = (
    "stripes",
    "checker",
    "gradient",
)
# what SyntheticConfig.background_textures may name
BACKGROUND_CHOICES = BACKGROUND_TEXTURES + ("flat",)
LABEL_CHANNELS = len(SHAPES) + 2  # background + one per shape + boundaries
EDGE_CHANNEL = LABEL_CHANNELS - 1
SPLITS = ("train", "validation")
NOISE_GRID = 4  # value-noise lattice points per side of an object's [-1, 1]^2 frame
_PLACEMENT_TRIES = 32


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What scenes look like. Sizes are fractions of ``image_size``; frequencies are per object
  radius."""

  image_size: int = 32
  min_objects: int = 2
  max_objects: int = 4
  classes: tuple[str, ...] = SHAPES  # shapes that may appear (label channels stay LABEL_CHANNELS)
  seed: int = 0
  radius_range: tuple[float, float] = (0.12, 0.22)  # object radius / image_size
  frequency_range: tuple[float, float] = (0.6, 1.5)  # texture cycles per object radius
  min_separation: float = 0.9  # centres kept >= this * (r_i + r_j) apart when placement allows
  antialias: bool = True  # soft coverage at edges (else hard masks and an exact one-hot label)
  background_textures: tuple[str, ...] = BACKGROUND_TEXTURES  # names from BACKGROUND_CHOICES
  train_size: int = 100_000
  validation_size: int = 1_000

  def __post_init__(self):
    if self.image_size < 8:
      raise ValueError(f"SyntheticConfig: image_size must be >= 8, got {self.image_size}")
    unknown = [c for c in self.classes if c not in SHAPES]
    if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
      raise ValueError(
          f"SyntheticConfig: classes must be distinct names from {SHAPES}, got {self.classes}"
      )
    if not 1 <= self.min_objects <= self.max_objects <= len(self.classes):
      raise ValueError(
          f"SyntheticConfig: need 1 <= min_objects <= max_objects <= len(classes) = "
          f"{len(self.classes)} (objects have distinct classes), got "
          f"{self.min_objects}..{self.max_objects}"
      )
    low, high = self.radius_range
    if not 0 < low <= high <= 0.5:
      raise ValueError(
          f"SyntheticConfig: radius_range must satisfy 0 < low <= high <= 0.5, "
          f"got {self.radius_range}"
      )
    if not 0 < self.frequency_range[0] <= self.frequency_range[1]:
      raise ValueError(
          f"SyntheticConfig: frequency_range must be positive and ordered, "
          f"got {self.frequency_range}"
      )
    if not self.background_textures or not set(self.background_textures) <= set(BACKGROUND_CHOICES):
      raise ValueError(
          f"SyntheticConfig: background_textures must be names from {BACKGROUND_CHOICES}, "
          f"got {self.background_textures}"
      )
    if self.min_separation < 0:
      raise ValueError(f"SyntheticConfig: min_separation must be >= 0, got {self.min_separation}")
    if self.train_size < 0 or self.validation_size < 0:
      raise ValueError("SyntheticConfig: train_size and validation_size must be >= 0")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the objects are. Row i of every array is object i (the same object in both layouts)."""

  classes: np.ndarray  # (N,) int, index into SHAPES
  centres: np.ndarray  # (N, 2) float, (x, y) in pixels
  radii: np.ndarray  # (N,) float, pixels
  angles: np.ndarray  # (N,) float, radians

  def draw_order(self) -> np.ndarray:
    """Larger objects first, so that a small object is never hidden entirely behind a large one."""
    return np.argsort(-self.radii, kind="stable")


@dataclasses.dataclass(frozen=True)
class Appearance:
  """How N surfaces look: colour = c0 + t * (c1 - c0), t in [0, 1] from the texture."""

  textures: np.ndarray  # (N,) int, index into TEXTURES
  colours: np.ndarray  # (N, 2, 3) float32 in [0, 1]
  frequencies: np.ndarray  # (N,) cycles per unit of the local frame (object radius; half the image)
  directions: np.ndarray  # (N,) radians
  phases: np.ndarray  # (N, 2) radians
  noise: np.ndarray  # (N, NOISE_GRID, NOISE_GRID) float32 in [0, 1], used by "noise"


@dataclasses.dataclass(frozen=True)
class Scene:
  """One sample before rendering: two layouts of the same objects and their appearances."""

  layout: Layout  # ground truth
  layout_ref: Layout  # exemplar
  objects: Appearance  # row i: object i
  background: Appearance  # one row; its frame is the whole image


# ---------------------------------------------------------------------------- sampling


def _rngs(
    config: SyntheticConfig, split: str, index: int
) -> tuple[np.random.Generator, np.random.Generator]:
  """Independent (layout, appearance) generators of one sample."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} (known: {SPLITS})")
  key = [config.seed, SPLITS.index(split), int(index)]
  return np.random.default_rng(key + [0]), np.random.default_rng(key + [1])


def _place(rng: np.random.Generator, radii: np.ndarray, size: int, separation: float) -> np.ndarray:
  """Centres (L, N, 2) inside the image for radii (L, N): L layouts at once, objects in turn, each
  at the first of a batch of random candidates that keeps ``separation`` from those placed before
  (the least crowded candidate if none does)."""
  layouts, count = radii.shape
  spans = (size - 2 * radii)[..., None, None]
  candidates = radii[..., None, None] + rng.random((layouts, count, _PLACEMENT_TRIES, 2)) * spans
  centres = candidates[:, :, 0].copy()
  lanes = np.arange(layouts)
  for i in range(1, count):
    offsets = candidates[:, i, :, None] - centres[:, None, :i]  # (L, tries, i, 2)
    reach = (radii[:, i, None] + radii[:, :i])[:, None]
    score = np.min(np.hypot(offsets[..., 0], offsets[..., 1]) / reach, axis=-1)
    ok = score >= separation
    pick = np.where(ok.any(axis=1), ok.argmax(axis=1), score.argmax(axis=1))
    centres[:, i] = candidates[lanes, i, pick]
  return centres


def sample_layouts(rng: np.random.Generator, config: SyntheticConfig) -> tuple[Layout, Layout]:
  """Ground-truth and exemplar layouts: same classes and rotations, new centres and radii."""
  count = rng.integers(config.min_objects, config.max_objects + 1)
  allowed = np.array([SHAPES.index(c) for c in config.classes])
  classes = rng.permutation(allowed)[:count]
  angles = rng.uniform(0, 2 * np.pi, count)
  radii = rng.uniform(*config.radius_range, (2, count)) * config.image_size
  centres = _place(rng, radii, config.image_size, config.min_separation)
  return Layout(classes, centres[0], radii[0], angles), Layout(
      classes, centres[1], radii[1], angles
  )


def sample_appearance(
    rng: np.random.Generator,
    count: int,
    config: SyntheticConfig,
    textures: Sequence[str] = OBJECT_TEXTURES,
) -> Appearance:
  """``count`` random surfaces with texture kinds drawn from ``textures``."""
  kinds = np.array([TEXTURES.index(t) for t in textures])
  low, high = config.frequency_range
  u = rng.random((count, 10 + NOISE_GRID * NOISE_GRID))  # one draw, sliced: cheaper than many calls
  return Appearance(
      textures=kinds[rng.integers(0, len(kinds), count)],
      colours=u[:, :6].reshape(count, 2, 3).astype(np.float32),
      frequencies=low + (high - low) * u[:, 6],
      directions=2 * np.pi * u[:, 7],
      phases=2 * np.pi * u[:, 8:10],
      noise=u[:, 10:].reshape(count, NOISE_GRID, NOISE_GRID).astype(np.float32),
  )


def make_scene(
    layout_rng: np.random.Generator, appearance_rng: np.random.Generator, config: SyntheticConfig
) -> Scene:
  """A scene from separate layout and appearance streams (same layout rng => same condition
  maps)."""
  layout, layout_ref = sample_layouts(layout_rng, config)
  objects = sample_appearance(appearance_rng, len(layout.classes), config)
  background = sample_appearance(appearance_rng, 1, config, config.background_textures)
  return Scene(layout, layout_ref, objects, background)


def scene(index: int, config: SyntheticConfig, split: str = "train") -> Scene:
  """The scene of sample ``index`` of ``split`` (a pure function of seed, split and index)."""
  return make_scene(*_rngs(config, split, index), config)


# ---------------------------------------------------------------------------- rendering
# Each object is rendered inside its bounding box only, with scalar parameters: at these image
# sizes numpy's per-call overhead, not arithmetic, dominates, so few calls on small arrays win.


def _box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
  qu, qv = np.abs(u) - half_u, np.abs(v) - half_v
  return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Equilateral triangle with circumradius 1, centroid at the origin, apex towards -v."""
  k, r = np.sqrt(3.0), np.sqrt(3.0) / 2
  px, py = np.abs(u) - r, r / k - v
  fold = px + k * py > 0
  px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
  px = px - np.minimum(np.maximum(px, -2 * r), 0)
  return -np.hypot(px, py) * np.sign(py)


# Signed distance (local units, radius 1 frame) of each shape; all fit in the unit disc.
_SDF: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": lambda u, v: np.hypot(u, v) - 1,
    "square": lambda u, v: _box(u, v, 0.7, 0.7),
    "triangle": _triangle,
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.7) - 0.3,
    "cross": lambda u, v: np.minimum(_box(u, v, 0.94, 0.32), _box(u, v, 0.32, 0.94)),
}


def _unit(x: np.ndarray) -> np.ndarray:
  return np.minimum(np.maximum(x, 0), 1)


def _texture(app: Appearance, i: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Mixing weight t in [0, 1] of surface i at its local coordinates (u, v)."""
  kind = TEXTURES[app.textures[i]]
  cos, sin = math.cos(app.directions[i]), math.sin(app.directions[i])
  frequency, (phase0, phase1) = float(app.frequencies[i]), app.phases[i].tolist()
  if kind == "stripes":
    return 0.5 + 0.5 * np.sin((2 * np.pi * frequency) * (u * cos + v * sin) + phase0)
  if kind == "checker":
    product = np.sin((np.pi * frequency) * (u * cos + v * sin) + phase0) * np.sin(
        (np.pi * frequency) * (v * cos - u * sin) + phase1
    )
    return _unit(0.5 + 2 * product)
  if kind == "gradient":
    return _unit(0.5 + 0.5 * (u * cos + v * sin))
  if kind == "flat":
    return np.zeros(np.broadcast_shapes(u.shape, v.shape), np.float32)
  # noise: bilinear interpolation of a lattice spanning the object's [-1, 1]^2 frame
  last = NOISE_GRID - 1
  gu = np.minimum(np.maximum((u + 1) * (last / 2), 0), last)
  gv = np.minimum(np.maximum((v + 1) * (last / 2), 0), last)
  iu, iv = np.minimum(gu.astype(np.intp), last - 1), np.minimum(gv.astype(np.intp), last - 1)
  fu, fv, lattice = gu - iu, gv - iv, app.noise[i]
  top = lattice[iv, iu] + fu * (lattice[iv, iu + 1] - lattice[iv, iu])
  bottom = lattice[iv + 1, iu] + fu * (lattice[iv + 1, iu + 1] - lattice[iv + 1, iu])
  return top + fv * (bottom - top)


def _colour(app: Appearance, i: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """(h, w, 3) colour in [0, 1] of surface i at its local coordinates."""
  c0, c1 = app.colours[i]
  return c0 + _texture(app, i, u, v)[..., None] * (c1 - c0)


def _boundaries(ids: np.ndarray) -> np.ndarray:
  """1 on both sides of every change of ``ids`` between 4-neighbours."""
  edge = np.zeros(ids.shape, bool)
  rows, cols = ids[1:] != ids[:-1], ids[:, 1:] != ids[:, :-1]
  edge[1:] |= rows
  edge[:-1] |= rows
  edge[:, 1:] |= cols
  edge[:, :-1] |= cols
  return edge


def _backdrop(background: Appearance, size: int) -> np.ndarray:
  """The background's (H, W, 3) colours in [0, 1]; its frame is the image, spanning [-1, 1]^2."""
  grid = (np.arange(size, dtype=np.float32) + 0.5) * (2 / size) - 1
  return _colour(background, 0, grid[None, :], grid[:, None])


def draw(
    layout: Layout, objects: Appearance, background: Appearance, config: SyntheticConfig
) -> tuple[np.ndarray, np.ndarray]:
  """Renders a layout: ``(image (H, W, 3) in [-1, 1], label (H, W, LABEL_CHANNELS) in [0, 1])``.

  Objects are composited over the background in ``layout.draw_order()`` with their coverage as
  alpha; the label's class channels are composited with the same alphas, so they sum to 1.
  """
  return _draw(layout, objects, _backdrop(background, config.image_size), config)


def _draw(
    layout: Layout, objects: Appearance, backdrop: np.ndarray, config: SyntheticConfig
) -> tuple[np.ndarray, np.ndarray]:
  size = config.image_size
  centres = np.arange(size, dtype=np.float32) + 0.5
  image = backdrop.copy()
  label = np.zeros((size, size, LABEL_CHANNELS), np.float32)
  label[..., 0] = 1
  visible = np.zeros((size, size), np.int8)  # class channel of the topmost object covering >= 1/2
  for i in layout.draw_order():
    (x, y), radius, angle = (
        layout.centres[i].tolist(),
        float(layout.radii[i]),
        float(layout.angles[i]),
    )
    x0, x1 = max(int(x - radius - 1), 0), min(int(x + radius + 2), size)
    y0, y1 = max(int(y - radius - 1), 0), min(int(y + radius + 2), size)
    dx, dy = centres[x0:x1] - x, centres[y0:y1, None] - y
    cos, sin = math.cos(angle) / radius, math.sin(angle) / radius
    u, v = dx * cos + dy * sin, dy * cos - dx * sin
    distance = _SDF[SHAPES[layout.classes[i]]](u, v) * radius  # pixels
    alpha = _unit(0.5 - distance) if config.antialias else (distance <= 0).astype(np.float32)
    pixels, classes = image[y0:y1, x0:x1], label[y0:y1, x0:x1, :EDGE_CHANNEL]
    pixels += alpha[..., None] * (_colour(objects, i, u, v) - pixels)
    classes *= 1 - alpha[..., None]
    classes[..., layout.classes[i] + 1] += alpha
    visible[y0:y1, x0:x1][alpha >= 0.5] = layout.classes[i] + 1
  label[..., EDGE_CHANNEL] = _boundaries(visible)
  return image * 2 - 1, label


def render_scene(item: Scene, config: SyntheticConfig) -> dict[str, np.ndarray]:
  """The sample dict of a scene: ``image``, ``ref``, ``label``, ``label_ref``."""
  backdrop = _backdrop(item.background, config.image_size)  # the background does not move
  image, label = _draw(item.layout, item.objects, backdrop, config)
  ref, label_ref = _draw(item.layout_ref, item.objects, backdrop, config)
  return dict(image=image, ref=ref, label=label, label_ref=label_ref)


def sample(index: int, config: SyntheticConfig, split: str = "train") -> dict[str, np.ndarray]:
  """Sample ``index`` of ``split``: ground truth ``image``, ``label``; exemplar ``ref``,
  ``label_ref``."""
  return render_scene(scene(index, config, split), config)


class SyntheticSource:
  """Random-access source of one split (``grain.python.RandomAccessDataSource`` protocol)."""

  def __init__(self, config: SyntheticConfig, split: str = "train"):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r} (known: {SPLITS})")
    self.config, self.split = config, split

  def __len__(self) -> int:
    return self.config.train_size if self.split == "train" else self.config.validation_size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(
          f"index {index} out of range for the {len(self)} samples of the {self.split} split"
      )
    return sample(index, self.config, self.split)

  def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The samples at ``indices`` stacked along a new leading axis (NHWC)."""
    items = [self[i] for i in indices]
    return {key: np.stack([item[key] for item in items]) for key in items[0]}

  def __repr__(self) -> str:
    return f"SyntheticSource(split={self.split!r}, len={len(self)}, {self.config})"


# ---------------------------------------------------------------------------- preview

_PALETTE = np.array(
    [
        [0.15, 0.15, 0.15],
        [0.9, 0.2, 0.2],
        [0.2, 0.75, 0.2],
        [0.25, 0.4, 0.95],
        [0.95, 0.8, 0.1],
        [0.8, 0.3, 0.9],
    ]
)


def colourise(label: np.ndarray) -> np.ndarray:
  """A condition map as RGB in [0, 1]: a fixed colour per class channel, boundaries white."""
  rgb = label[..., : len(SHAPES) + 1] @ _PALETTE
  edge = label[..., EDGE_CHANNEL, None]
  return rgb * (1 - edge) + edge


def preview(
    config: SyntheticConfig, count: int, split: str = "train", scale: int = 4
) -> np.ndarray:
  """uint8 grid, one column per sample, rows label_ref / ref / label / image, each tile magnified
  ``scale`` times (nearest) inside a 2-px white frame."""
  columns = []
  for index in range(count):
    item = sample(index, config, split)
    tiles = [
        colourise(item["label_ref"]),
        (item["ref"] + 1) / 2,
        colourise(item["label"]),
        (item["image"] + 1) / 2,
    ]
    tiles = [
        np.pad(
            np.kron(tile, np.ones((scale, scale, 1))), ((2, 2), (2, 2), (0, 0)), constant_values=1
        )
        for tile in tiles
    ]
    columns.append(np.concatenate(tiles, axis=0))
  return np.round(np.concatenate(columns, axis=1) * 255).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel  # only the preview needs it

  parser = argparse.ArgumentParser(
      description="Write a preview grid of synthetic samples "
      "(rows: label_ref, ref, label, image)."
  )
  parser.add_argument("--out", default="preview.png")
  parser.add_argument("--n", type=int, default=8, help="samples (columns)")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--split", default="train", choices=SPLITS)
  parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour magnification")
  args = parser.parse_args(argv)
  config = SyntheticConfig(image_size=args.image_size, seed=args.seed)
  Image.fromarray(preview(config, args.n, args.split, args.scale)).save(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
