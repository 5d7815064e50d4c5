"""Translate your own images: the structure of a condition, the appearance of an exemplar photo.

Single pair (a condition file, an exemplar file, ``--output`` a .png/.jpg file):

  python -m midms_jax.translate --midms_checkpoint=celebahq.pth \\
      --condition=face.jpg --exemplar=style.jpg --output=out.png

Folder mode (a folder of conditions, a folder or .txt list of exemplars, or an ``--output`` folder; every
condition x every exemplar, written as ``<condition-stem>__<exemplar-stem>.<format>``; resumable):

  python -m midms_jax.translate --midms_checkpoint=celebahq.pth \\
      --condition=conditions/ --exemplar=exemplars.txt --output=results/

Weights from a midms-jax training workdir (its config.json is the model's config,
``--config.<field>`` overrides apply to it; newest checkpoint, or ``--step``):

  python -m midms_jax.translate --workdir=runs/synthetic --condition=c.npy --exemplar=e.png \
      --exemplar_condition=e.npy --output=out.png

Conditions are ``.npy`` (H, W, C) arrays in [0, 1] exactly as the data set builds them, LSUN-church
label-id PNGs, or (CelebA-HQ only) RGB photos whose edge map is computed. Exemplars are RGB photos.
Nothing is resized: a condition and its exemplar must have the same size, a multiple of the model's
down-sampling factor (32 for the official CelebA-HQ and DeepFashion models, 128 for LSUN church). The
model is the config's (``--config``, default configs/celebahq.py) with the weights of an official
MIDMs ``.pth``, or the workdir's.

Memory: before anything is compiled, each image size is checked against the device's free memory
(the host's available memory on CPU) with a lower bound of the translation's working set
(``memory_estimate``: the first stage's self-attention and the soft warps' correlation volume grow
with the square of the latent pixels, the U-Net attention with the square of its tokens); a size
that cannot fit is a bad input (one line with the estimate, the limit and what would fit:
``--batch_size=1``, ``--config.midms.warp_chunk`` / ``--config.attention_chunk``, or the largest
image size).

Exit status: 0 when every pair was written (folder mode: also when some files were bad, as long as at
least one pair was written or everything was already there; each bad file is reported on stderr and
its pairs are skipped); 2 on a bad flag, config, checkpoint, output path that cannot be written, or
input in single-file mode, or when no pair of a folder run could be translated. ``--library_logs``
shows the libraries' INFO lines (orbax, JAX).
"""

import dataclasses
import functools
import os
import pathlib
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from tqdm import tqdm

import configs
from midms_jax import cli, inference, logs, platform_tuning, workdir as workdir_lib
from midms_jax.data import conditions, images
from midms_jax.errors import CheckpointError, InputError
from midms_jax.interop import torch_import

DEFAULT_CONFIG = pathlib.Path(configs.__file__).with_name("celebahq.py")
CONDITION_SUFFIXES = (".npy",) + images.IMAGE_SUFFIXES
OUTPUT_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
# an --output file, not a folder
IMAGE_LIKE_SUFFIXES = images.IMAGE_SUFFIXES + (
    ".gif",
    ".tif",
    ".tiff",
)

FLAGS = flags.FLAGS
# No default value here: ml_collections would parse a default and its --config.* overrides when the
# module is imported; without --config, ``_config_and_weights`` loads DEFAULT_CONFIG, then them.
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Model and data-set config file (its data.name decides how conditions are "
    "read), e.g. configs/lsun_church.py (default: configs/celebahq.py); overrides as "
    "--config.midms.temperature=0.01 (with --workdir they change the workdir's config).",
)
_CHECKPOINT = flags.DEFINE_string(
    "midms_checkpoint",
    None,
    "Official MIDMs .pth ({'state_dict': ...} as the official train.py saves it). "
    "Default: config.checkpoints.midms. For weights from a midms-jax training run use --workdir "
    "instead.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "A midms-jax training workdir: its config.json replaces --config, its newest checkpoint "
    "(or --step) and its frozen first stage give the weights.",
)
_STEP = flags.DEFINE_integer(
    "step", None, "With --workdir: the training step whose checkpoint to use (default: the newest)."
)
_CONDITION = flags.DEFINE_string(
    "condition",
    None,
    "Condition file or folder: .npy (H, W, C) arrays in [0, 1] as the data set builds "
    "them, LSUN-church label-id PNGs (ids 0..149, 255 = don't care), or, for CelebA-HQ, RGB "
    "photos (their "
    "Canny edge map is the condition).",
)
_EXEMPLAR = flags.DEFINE_string(
    "exemplar",
    None,
    "Exemplar RGB photo, folder of photos, or .txt list of photo paths (one per line, "
    "relative to the list's folder; blank lines and # comments ignored).",
)
_EXEMPLAR_CONDITION = flags.DEFINE_string(
    "exemplar_condition",
    None,
    "The exemplars' own conditions: a file (one exemplar) or a folder holding "
    "<exemplar-stem>.npy (or .png, ...) per exemplar. Default: computed from the exemplar photo, "
    "which only "
    "CelebA-HQ allows.",
)
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "An image file name (.png or .jpg, the extension decides the format) for a single "
    "condition and exemplar file; otherwise the folder for "
    "<condition-stem>__<exemplar-stem>.<format> (folder "
    "mode, existing outputs are skipped).",
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    8,
    "Pairs per jitted call; the last batch is padded so that one compilation serves all.",
    lower_bound=1,
)
_SEED = flags.DEFINE_integer(
    "seed",
    0,
    "Seed of the diffusion noise. A pair uses PRNGKey(seed) folded with the CRC32 of its name "
    "<condition-stem>__<exemplar-stem>: the same seed gives the same output, in single-file and "
    "folder mode, "
    "whatever the batch composition, folder contents or resuming (up to float rounding across "
    "batch sizes).",
)
_FORMAT = flags.DEFINE_enum(
    "format",
    "png",
    list(images.FORMATS),
    "Output format in folder mode: png (lossless) or jpg (PIL "
    "quality 75, as torchvision's save_image). CoCosNet's evaluation protocol saved JPEGs, and "
    "the format "
    "alone moves FID by about 2.6: use the format of the numbers you compare with.",
)
_DEBUG = flags.DEFINE_boolean(
    "debug",
    False,
    "Also write <output-name>_debug.png next to each output: one row of tiles, left to "
    "right: the decoded initial warp; per re-warp step the decoded new warp, the decoded mixed "
    "latent and "
    "the confidence mask (white = re-warped, nearest up-sampled); the output.",
)
_NO_REFINE = flags.DEFINE_boolean(
    "no_refine",
    False,
    "Skip the final stochastic refinement (official inference runs it: eta=1 DDIM "
    "steps of a 200-step schedule from step 180).",
)
_LIBRARY_LOGS = logs.define_flag(FLAGS)
# --config.<field> overrides taken out of argv by ``run`` when --config is not given: they apply to
# the default config or to the --workdir's config.json (``_config_and_weights``).
_DEFERRED_OVERRIDES: list[str] = []


@dataclasses.dataclass(frozen=True)
class Pair:
  """One translation. ``exemplar_condition`` None: computed from the exemplar photo."""

  condition: pathlib.Path
  exemplar: pathlib.Path
  exemplar_condition: pathlib.Path | None
  output: pathlib.Path

  @property
  def name(self) -> str:
    return pair_name(self.condition, self.exemplar)


def pair_name(condition: pathlib.Path, exemplar: pathlib.Path) -> str:
  return f"{condition.stem}__{exemplar.stem}"


def debug_path(output: pathlib.Path) -> pathlib.Path:
  return output.with_name(f"{output.stem}_debug.png")


# ------------------------------------------------------------------------------------------------
# The jitted model
# ------------------------------------------------------------------------------------------------

# Per pair, with --debug: what the debug grid shows (``inference.OUTPUTS``).
DEBUG_OUTPUTS = ("image", "initial_warp", "rewarp_new", "rewarp_mixed", "rewarp_mask")


def debug_grids(decode: Callable, variables, out: dict[str, Any]) -> np.ndarray:
  """(B, H, W * tiles, 3) uint8 rows: initial warp, (new, mixed, mask) per re-warp step, output."""
  b, k = out["rewarp_new"].shape[:2]
  new_mixed = jnp.stack([out["rewarp_new"], out["rewarp_mixed"]], axis=2)
  new_mixed = new_mixed.reshape((b, 2 * k) + out["rewarp_new"].shape[2:])
  # init, new 1, mixed 1, ...
  latents = jnp.concatenate([out["initial_warp"][:, None], new_mixed], axis=1)
  n = latents.shape[1]
  decoded = images.to_uint8(decode(variables, latents.reshape((b * n,) + latents.shape[2:])))
  decoded = decoded.reshape((b, n) + decoded.shape[1:])
  outputs = images.to_uint8(out["image"])
  height, width = outputs.shape[1:3]
  masks = np.asarray(out["rewarp_mask"])
  masks = np.repeat(
      np.repeat(masks, height // masks.shape[2], axis=2), width // masks.shape[3], axis=3
  )
  masks = np.broadcast_to((masks > 0.5).astype(np.uint8) * 255, masks.shape[:4] + (3,))
  tiles = [decoded[:, 0]]
  for i in range(k):
    tiles += [decoded[:, 1 + 2 * i], decoded[:, 2 + 2 * i], masks[:, i]]
  return np.concatenate(tiles + [outputs], axis=2)


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------

FLOAT_BYTES = 4


def format_bytes(count: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
    if count < 1000 or unit == "PB":
      return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
    count /= 1000
  raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes of the largest arrays of one jitted translate call (the whole batch) in its three phases:
  a lower bound of what XLA needs (``total``: the largest phase; on the tiny CelebA-HQ config within
  1% of XLA's temporaries from 128x128 up, where the first stage dominates)."""

  first_stage: int  # its attention at the latent grid (scores, softmax) + an image-size activation
  correlation: int  # the soft warps' correlation volume (midms.warp_chunk = 0) or one block of it
  attention: int  # the largest U-Net attention score array (or block: config.attention_chunk)

  @property
  def total(self) -> int:
    return max(self.first_stage, self.correlation, self.attention)


def memory_estimate(config, height: int, width: int, batch: int = 1) -> MemoryEstimate:
  """``MemoryEstimate`` of translating ``batch`` pairs of ``height x width`` images with
  ``config``'s model: the first stage's attention and the correlation volume are (latent pixels)^2
  floats per pair (the volume ``midms.warp_chunk`` x latent pixels with blocks), the U-Net attention
  heads x tokens^2 (``attention_chunk`` x tokens with blocks)."""
  first, unet = config.model.first_stage, config.model.unet
  factor = 2 ** (len(first.ch_mult) - 1)
  pixels = (height // factor) * (width // factor)
  first_attention, activation = 0, height * width * first.get("ch", 0) * first.ch_mult[0]
  if first.get("type") in ("vq", "kl") and first.get("attn_type", "vanilla") != "none":
    first_attention = pixels * pixels  # mid.attn_1 of encoder and decoder, one head
    for level in range(len(first.ch_mult)):
      if first.get("resolution", 0) // 2 ** level in tuple(first.get("attn_resolutions", ())):
        first_attention = max(first_attention, ((height >> level) * (width >> level)) ** 2)
  chunk = config.midms.get("warp_chunk", 0)
  correlation = (min(chunk, pixels) if chunk > 0 else pixels) * pixels
  attention = 0
  attention_chunk = config.get("attention_chunk", 0)
  for level, mult in enumerate(unet.channel_mult):
    down = 2**level
    if down not in tuple(unet.attention_resolutions):
      continue
    channels = unet.model_channels * mult
    if unet.num_head_channels == -1:
      heads = unet.num_heads
    else:
      heads = max(1, channels // unet.num_head_channels)
    tokens = (height // factor // down) * (width // factor // down)
    queries = min(attention_chunk, tokens) if attention_chunk > 0 else tokens
    attention = max(attention, heads * queries * tokens)
  scale = FLOAT_BYTES * batch
  return MemoryEstimate(
      (2 * first_attention + activation) * scale, correlation * scale, attention * scale
  )


def memory_limit() -> tuple[int, str]:
  """(bytes free for a computation, what they are): the first device's free memory where JAX
  reports it (GPU, TPU), else the host's available memory (CPU)."""
  device = jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # backends without memory statistics
    stats = {}
  if stats.get("bytes_limit"):
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return free, f"free on {device.device_kind}"
  try:
    import psutil  # pylint: disable=import-outside-toplevel  # optional

    return int(psutil.virtual_memory().available), "available host memory"
  except ImportError:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free host memory"


def _chunked(config):
  """``config`` with the options that keep the warps and the U-Net attention linear in pixels."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.midms.warp_chunk = config.midms.get("warp_chunk", 0) or 1024
    config.attention_chunk = config.get("attention_chunk", 0) or 256
  return config


class MemoryCheck:
  """Refuses image sizes whose translation cannot fit (``memory_estimate`` against
  ``memory_limit``) with an ``InputError`` naming the files, before anything is compiled; one
  verdict per image size."""

  def __init__(self, config, batch_size: int, limit: tuple[int, str] | None = None):
    self.config, self.batch_size = config, batch_size
    self.factor = images.downsampling_factor(config.model)
    self._limit = limit
    self._verdicts: dict[tuple[int, int], str | None] = {}

  def problem(self, height: int, width: int) -> str | None:
    """Why ``height x width`` pairs do not fit (the end of a one-line message), or None."""
    if (height, width) not in self._verdicts:
      if self._limit is None:
        self._limit = memory_limit()
      self._verdicts[(height, width)] = self._verdict(height, width, *self._limit)
    return self._verdicts[(height, width)]

  def _fits(self, config, height: int, width: int, batch: int, limit: int) -> bool:
    return memory_estimate(config, height, width, batch).total <= limit

  def _verdict(self, height: int, width: int, limit: int, what: str) -> str | None:
    estimate = memory_estimate(self.config, height, width, self.batch_size)
    if estimate.total <= limit:
      return None
    chunked = _chunked(self.config)
    options = []
    if self.config.midms.get("warp_chunk", 0) == 0:
      options.append(f"--config.midms.warp_chunk={chunked.midms.warp_chunk}")
    if self.config.get("attention_chunk", 0) == 0:
      options.append(f"--config.attention_chunk={chunked.attention_chunk}")
    ways = []
    if options and self._fits(chunked, height, width, self.batch_size, limit):
      ways.append(" ".join(options))
    elif self.batch_size > 1 and self._fits(self.config, height, width, 1, limit):
      ways.append("--batch_size=1")
    ratio = 1.0
    while ratio > 0.01:
      ratio *= 0.9
      h, w = (
          max(self.factor, int(side * ratio) // self.factor * self.factor)
          for side in (height, width)
      )
      if self._fits(self.config, h, w, self.batch_size, limit):
        ways.append(f"images of at most {w}x{h} (resize both)")
        break
    batch = f" for a batch of {self.batch_size}" if self.batch_size > 1 else ""
    way_out = f"try {' or '.join(ways)}" if ways else "this device cannot translate it"
    return (
        f"size {width}x{height} needs at least {format_bytes(estimate.total)}{batch} to "
        f"translate (first-stage attention {format_bytes(estimate.first_stage)}, correlation "
        f"volume {format_bytes(estimate.correlation)}, U-Net attention "
        f"{format_bytes(estimate.attention)}), more than the {format_bytes(limit)} {what}; "
        f"{way_out}"
    )

  def check(self, pair: "Pair", shape: tuple[int, ...]) -> None:
    problem = self.problem(shape[0], shape[1])
    if problem:
      raise InputError(f"{pair.condition} with {pair.exemplar}: {problem}")


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


class Inputs:
  """Loads the arrays of pairs, caching recently used files; every problem is an ``InputError``."""

  def __init__(self, config, factor: int):
    self.rgb = functools.lru_cache(maxsize=1024)(lambda path: images.read_rgb(path, factor))
    self.condition = functools.lru_cache(maxsize=64)(
        lambda path: conditions.load_condition(path, config, factor)
    )
    self.photo_condition = functools.lru_cache(maxsize=64)(
        lambda path: conditions.from_photo(path, config, factor, self.rgb(path))
    )

  def arrays(self, pair: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(condition, exemplar in [-1, 1], exemplar condition), all of the exemplar's size."""
    condition = self.condition(pair.condition)
    exemplar = self.rgb(pair.exemplar)
    if pair.exemplar_condition is None:
      exemplar_condition = self.photo_condition(pair.exemplar)
    else:
      exemplar_condition = self.condition(pair.exemplar_condition)
    size = lambda a: f"{a.shape[1]}x{a.shape[0]}"
    for path, array in ((pair.condition, condition), (pair.exemplar_condition, exemplar_condition)):
      if array.shape[:2] != exemplar.shape[:2]:
        raise InputError(
            f"{path}: size {size(array)} differs from the exemplar {pair.exemplar} "
            f"({size(exemplar)}); condition and exemplar must have the same size"
        )
    return condition, images.to_model_range(exemplar), exemplar_condition


def _listing(folder: pathlib.Path, suffixes: tuple[str, ...], what: str) -> list[pathlib.Path]:
  paths = sorted(
      p
      for p in folder.iterdir()
      if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
  )
  if not paths:
    raise InputError(f"{folder}: no {what} files ({', '.join(suffixes)}) in this folder")
  return paths


def _exemplar_list(path: pathlib.Path) -> list[pathlib.Path]:
  try:
    lines = path.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read the exemplar list: {e}") from None
  entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
  if not entries:
    raise InputError(f"{path}: the exemplar list names no files")
  return [
      pathlib.Path(e).expanduser()
      if pathlib.Path(e).expanduser().is_absolute()
      else path.parent / e
      for e in entries
  ]


def _unique_stems(paths: Iterable[pathlib.Path], what: str) -> None:
  seen: dict[str, pathlib.Path] = {}
  for path in paths:
    if path.stem in seen:
      raise InputError(
          f"{path}: same name as {seen[path.stem]}; {what} file names (without extension) must "
          "be unique, they name the outputs"
      )
    seen[path.stem] = path


def _exemplar_conditions(
    config, exemplars: list[pathlib.Path], source: pathlib.Path | None
) -> list[pathlib.Path | None]:
  """Each exemplar's condition file: from a folder by stem (``.npy`` first), the single file given,
  or None (computed from the photo) where the data set allows it."""
  if source is None:
    if config.data.name not in conditions.PHOTO_DATA_SETS:
      raise InputError(
          f"{exemplars[0]}: {config.data.name} conditions cannot be computed from exemplar photos; "
          f"pass --exemplar_condition ({conditions.hint(config)} per exemplar)"
      )
    return [None] * len(exemplars)
  if not source.is_dir():
    if len(exemplars) != 1:
      raise InputError(
          f"{source}: --exemplar_condition is one file but there are {len(exemplars)} exemplars; "
          "pass a folder with <exemplar-stem>.npy (or .png, ...) per exemplar"
      )
    return [source]
  matched = []
  for exemplar in exemplars:
    candidates = [source / f"{exemplar.stem}{suffix}" for suffix in CONDITION_SUFFIXES]
    matched.append(next((c for c in candidates if c.is_file()), candidates[0]))
  return matched


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def _batches(
    pairs: Iterable[Pair],
    inputs: Inputs,
    batch_size: int,
    on_error: Callable[[Pair, InputError], None],
    memory: MemoryCheck | None = None,
) -> Iterator[list[tuple[Pair, tuple]]]:
  """Loaded pairs in batches of equal array shapes (a new shape starts a new batch); a pair whose
  size does not fit in memory (``memory``) is an error like a bad file."""
  batch, shapes = [], None
  for pair in pairs:
    try:
      arrays = inputs.arrays(pair)
      if memory is not None:
        memory.check(pair, arrays[1].shape)
    except InputError as e:
      on_error(pair, e)
      continue
    pair_shapes = tuple(a.shape for a in arrays)
    if batch and pair_shapes != shapes:
      yield batch
      batch = []
    shapes = pair_shapes
    batch.append((pair, arrays))
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def _run_batch(
    translate_pairs: Callable,
    decode: Callable | None,
    variables,
    batch: list[tuple[Pair, tuple]],
    batch_size: int,
    seed: int,
    fmt: str,
) -> None:
  """Translates and writes one batch (padded to ``batch_size``: one compiled shape); with ``decode``
  also the debug grids."""
  padded = batch + [batch[-1]] * (batch_size - len(batch))
  stacked = [np.stack([arrays[i] for _, arrays in padded]) for i in range(3)]
  keys = jnp.stack([inference.pair_key(seed, inference.name_id(pair.name)) for pair, _ in padded])
  out = translate_pairs(variables, *stacked, keys)
  outputs = np.asarray(out["image"])
  debug = decode is not None
  grids = debug_grids(decode, variables, out) if debug else None
  for i, (pair, _) in enumerate(batch):
    try:
      images.save_image(pair.output, outputs[i], fmt)
      if debug:
        images.write_uint8(debug_path(pair.output), grids[i], "png")
    except OSError as e:  # after the up-front check: a full disk, a folder removed meanwhile, ...
      raise InputError(f"{pair.output}: cannot write the output: {e.strerror or e}") from None


@dataclasses.dataclass(frozen=True)
class Weights:
  """Where the weights come from: a training ``workdir`` (at ``step``, default newest), else an
  official MIDMs ``.pth`` (``midms_checkpoint``, default ``config.checkpoints.midms``)."""

  midms_checkpoint: str | None = None
  workdir: str | None = None
  step: int | None = None

  def load(self, config):
    if self.workdir:
      trained = workdir_lib.load_trained(self.workdir, self.step)
      print(f"weights: {self.workdir} step {trained.step}")
      return jax.device_put(trained.variables)
    path = self.midms_checkpoint or config.checkpoints.get("midms", "")
    if not path:
      raise CheckpointError(
          "no weights: pass --midms_checkpoint (an official MIDMs .pth), --workdir (a "
          "midms-jax training run) or set config.checkpoints.midms"
      )
    # The whole config: the file's schedule buffers are checked against config.diffusion.
    path = pathlib.Path(path).expanduser()
    return jax.device_put(torch_import.load_midms_checkpoint(path, config))


def _run(
    pairs: list[Pair],
    config,
    *,
    weights: Weights,
    batch_size: int,
    seed: int,
    fmt: str,
    debug: bool,
    refine: bool,
    on_error: Callable[[Pair, InputError], None],
    progress: bool,
) -> int:
  """Translates ``pairs``; returns how many were written."""
  inputs = Inputs(config, images.downsampling_factor(config.model))
  batch_size = min(batch_size, len(pairs))
  memory = MemoryCheck(config, batch_size)
  variables = translate_pairs = decode = None
  written = 0
  with tqdm(total=len(pairs), unit="pair", disable=not progress, file=sys.stderr) as bar:

    def failed(pair, error):
      on_error(pair, error)
      bar.update(1)

    for batch in _batches(pairs, inputs, batch_size, failed, memory):
      # after the first inputs load: bad inputs are reported before the slow part
      if variables is None:
        try:
          model, translate_pairs = inference.compiled(
              config, refine, DEBUG_OUTPUTS if debug else ("image",)
          )
        except ValueError as e:  # a config value out of range (MIDMs.from_config says which)
          raise InputError(f"the config: {cli.one_line(e)}") from None
        decode = jax.jit(model.decode) if debug else None
        variables = weights.load(config)
      _run_batch(translate_pairs, decode, variables, batch, batch_size, seed, fmt)
      written += len(batch)
      bar.update(len(batch))
  return written


def translate_single(
    config,
    *,
    condition: pathlib.Path,
    exemplar: pathlib.Path,
    exemplar_condition: pathlib.Path | None,
    output: pathlib.Path,
    weights: Weights = Weights(),
    seed: int = 0,
    debug: bool = False,
    refine: bool = True,
) -> None:
  """One pair to ``output`` (.png/.jpg: the extension decides the format); raises on any bad
  input."""
  fmt = OUTPUT_SUFFIXES.get(output.suffix.lower())
  if fmt is None:
    raise InputError(f"{output}: in single-file mode --output must be a .png or .jpg file")
  cli.check_writable(output, "--output")
  pair = Pair(
      condition, exemplar, _exemplar_conditions(config, [exemplar], exemplar_condition)[0], output
  )
  _make_folder(output.parent, output)

  def reraise(_, error):
    raise error

  _run(
      [pair],
      config,
      weights=weights,
      batch_size=1,
      seed=seed,
      fmt=fmt,
      debug=debug,
      refine=refine,
      on_error=reraise,
      progress=False,
  )


def translate_folder(
    config,
    *,
    condition_files: list[pathlib.Path],
    exemplar_files: list[pathlib.Path],
    exemplar_condition: pathlib.Path | None,
    output: pathlib.Path,
    weights: Weights = Weights(),
    batch_size: int = 8,
    seed: int = 0,
    fmt: str = "png",
    debug: bool = False,
    refine: bool = True,
) -> int:
  """Every condition x every exemplar into the ``output`` folder; returns the exit status (module
  doc)."""
  if output.suffix.lower() in OUTPUT_SUFFIXES or (output.exists() and not output.is_dir()):
    raise InputError(f"{output}: in folder mode --output is a folder, not an image file")
  _unique_stems(condition_files, "condition")
  _unique_stems(exemplar_files, "exemplar")
  matched = _exemplar_conditions(config, exemplar_files, exemplar_condition)
  cli.check_writable(output, "--output", folder=True)
  _make_folder(output, output)
  pairs = [
      Pair(c, e, ec, output / f"{pair_name(c, e)}.{fmt}")
      for c in condition_files
      for e, ec in zip(exemplar_files, matched)
  ]
  todo = [p for p in pairs if not p.output.exists()]
  print(
      f"{len(pairs)} pairs: skipping {len(pairs) - len(todo)} already in {output}, translating "
      f"{len(todo)}"
  )
  reported: set[str] = set()
  failures = []

  def report(pair, error):
    failures.append(pair)
    if str(error) not in reported:
      reported.add(str(error))
      tqdm.write(f"error: {error}", file=sys.stderr)

  written = (
      _run(
          todo,
          config,
          weights=weights,
          batch_size=batch_size,
          seed=seed,
          fmt=fmt,
          debug=debug,
          refine=refine,
          on_error=report,
          progress=True,
      )
      if todo
      else 0
  )
  print(f"wrote {written}, skipped {len(pairs) - len(todo)} existing, failed {len(failures)}")
  return 2 if failures and not written else 0


def _make_folder(folder: pathlib.Path, output: pathlib.Path) -> None:
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise InputError(f"{output}: cannot write --output there: {e.strerror or e}") from None


def _required_path(flag: str, value: str | None) -> pathlib.Path:
  if not value:
    raise InputError(f"--{flag} is required")
  return pathlib.Path(value).expanduser()


def _config_and_weights():
  """The model config and weights source from --config / --midms_checkpoint, or --workdir /
  --step."""
  if not _WORKDIR.value:
    if _STEP.value is not None:
      raise InputError("--step needs --workdir (it picks a checkpoint of a training run)")
    if _CONFIG.present:
      config = cli.config_value(_CONFIG)
    else:
      config = cli.load_config_file(str(DEFAULT_CONFIG))
    config = cli.apply_overrides(config, _DEFERRED_OVERRIDES)
    return config, Weights(midms_checkpoint=_CHECKPOINT.value)
  if _CHECKPOINT.value:
    raise InputError(
        "--workdir and --midms_checkpoint exclude each other: pick one source of weights"
    )
  if FLAGS["config"].present:
    raise InputError(
        "--workdir and --config exclude each other: the workdir's config.json is the model's config"
    )
  config = cli.apply_overrides(workdir_lib.read_config(_WORKDIR.value), _DEFERRED_OVERRIDES)
  return config, Weights(workdir=_WORKDIR.value, step=_STEP.value)


def main(argv: Sequence[str]) -> int:
  logs.configure(library_logs=_LIBRARY_LOGS.value)
  cli.ignore_closed_loop_callbacks()  # a damaged checkpoint: no orbax noise after the error line
  if len(argv) > 1:
    print(
        f"error: unexpected arguments {' '.join(argv[1:])} (all inputs are --flags)",
        file=sys.stderr,
    )
    return 2
  try:
    config, weights = _config_and_weights()
    condition = _required_path("condition", _CONDITION.value)
    exemplar = _required_path("exemplar", _EXEMPLAR.value)
    output = _required_path("output", _OUTPUT.value)
    exemplar_condition = (
        pathlib.Path(_EXEMPLAR_CONDITION.value).expanduser() if _EXEMPLAR_CONDITION.value else None
    )
    common = dict(
        weights=weights, seed=_SEED.value, debug=_DEBUG.value, refine=not _NO_REFINE.value
    )
    is_list = exemplar.suffix.lower() == ".txt"
    if (
        not condition.is_dir()
        and not exemplar.is_dir()
        and not is_list
        and output.suffix.lower() in IMAGE_LIKE_SUFFIXES
    ):
      translate_single(
          config,
          condition=condition,
          exemplar=exemplar,
          exemplar_condition=exemplar_condition,
          output=output,
          **common,
      )
      print(f"wrote {output}")
      return 0
    condition_files = (
        _listing(condition, CONDITION_SUFFIXES, "condition") if condition.is_dir() else [condition]
    )
    if exemplar.is_dir():
      exemplars = _listing(exemplar, images.IMAGE_SUFFIXES, "exemplar image")
    else:
      exemplars = _exemplar_list(exemplar) if is_list else [exemplar]
    return translate_folder(
        config,
        condition_files=condition_files,
        exemplar_files=exemplars,
        exemplar_condition=exemplar_condition,
        output=output,
        batch_size=_BATCH_SIZE.value,
        fmt=_FORMAT.value,
        **common,
    )
  except (InputError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a write that failed after the checks (e.g. a full disk)
    print(f"error: {cli.os_error_line(e)}", file=sys.stderr)
    return 2


def run(argv: Sequence[str]) -> int:
  """In-process entry point (tests, notebooks) and the command's: ``argv`` with the program name
  first; returns the exit status. Without --config, the --config.<field> overrides apply to the
  default config or to the --workdir's config.json."""
  argv, _DEFERRED_OVERRIDES[:] = cli.deferred_overrides(argv)
  return cli.run_in_process(FLAGS, main, argv, doc=__doc__)


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  sys.exit(run(sys.argv))
