"""Exemplar (reference) lists for your own data set: ``python -m midms_jax.data.make_exemplar_lists``.

For every image of ``--images`` (a folder, or a ``.txt`` list of image paths) the other images of
``--candidates`` (default: the same images) are ranked by the cosine similarity of VGG19 features, and
the best ``--top_k`` are written in the official ``*_ref.txt`` format, one line per image::

  key,best,second,...,k-th

comma-separated, no spaces, ``\\n`` line ends, a final newline (as ``celebahq_ref_test.txt``). The
official loaders split each stripped line at ``,``: the test split uses the first candidate; CelebA-HQ
and LSUN-church training the first (easy exemplar) and the **last** (hard exemplar), so ``--top_k`` also
sets how far the hard exemplar is from the image. DeepFashion training takes the **last** candidate as
its easy exemplar (and a random other image as the hard one): for it, ``--top_k=1`` lists the best match. Example (CelebA-HQ training list)::

  python -m midms_jax.data.make_exemplar_lists --vgg_checkpoint=vgg19_conv.pth \\
      --images=CelebA-HQ-img/ --output=celebahq_ref.txt

Names. A folder gives its image files (not its sub-folders) under their file names, which is how the
CelebA-HQ and LSUN-church loaders look keys and exemplars up (in the key's own folder). A folder in
the LSUN church layout, where label maps ``<name>.png`` lie beside the photos ``<name>.jpg``, gives
only its ``.jpg`` photos, as the official LSUN loader takes them (its ``.png`` files are label maps,
and no other file is a photo there); a note on stderr says so. So ``--images=<lsun>/training`` and
``--images=<lsun>/validation`` write the lists ``prepare`` reads. A list gives
its entries as written (one path per line, relative to the list's folder; blank lines and # comments
ignored; ``\\`` read as ``/``, written as ``/``), which is how the DeepFashion loader names images
(``train.txt`` entries relative to the data root, so pass ``DeepFashion/train.txt``). Candidate names
are those of ``--candidates``. Lines follow the order of ``--images`` (folders: natural order, 2 before
10); equal similarities rank by candidate name in that natural order.

Features: each image is resized (bicubic, aspect ratio not kept) to ``--image_size`` squared, in RGB
[-1, 1] as the loss network expects; ReLU activations relu3_2, relu4_2 and relu5_2 are averaged over
space, each L2-normalised, and concatenated (divided by sqrt(3)), so the similarity is the mean of the
three layers' cosines. Global average pooling makes the ranking about content and texture, not where
things are (a flipped or shifted copy stays close); relu4_2 is the layer of the perceptual loss,
relu3_2 adds texture, relu5_2 semantics; relu1_x/relu2_x, mostly colour and edges, are left out, as
the exemplar's colours are what the model transfers, not what should decide the match.

An image is never its own candidate: the same file (same resolved path, e.g. when ``--candidates``
includes ``--images``) is excluded, but a different file with the same content is a valid candidate.
With fewer candidates than ``--top_k`` the lines hold what exists (a note says so); an image with no
candidate at all is an error. An unreadable image is an error naming it, or with ``--skip_bad`` is
left out of the lists (as key and as candidate) and reported. The output is written atomically; an
``--output`` that cannot be written is an error before any feature is computed. Exit status 0, or 2
with one ``error:`` line.
"""

import collections
import dataclasses
import functools
import os
import pathlib
import re
import sys
from concurrent import futures
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from midms_jax import cli, logs, platform_tuning
from midms_jax.data import images as images_lib
from midms_jax.errors import CheckpointError, InputError
from midms_jax.models import vgg as vgg_lib

LAYERS = ("r32", "r42", "r52")
SIZE_MULTIPLE = 16  # relu5_x sits after four 2x2 max pools
OFFICIAL_WIDTHS = tuple(vgg_lib.VGG19().widths)  # the loss network's default: vgg19_conv.pth
SEPARATOR = ","
_UNWRITABLE = re.compile(r"[,\r\n]|^\s|\s$")  # the format splits at ',' and strips each line's ends

FLAGS = flags.FlagValues()
_IMAGES = flags.DEFINE_string(
    "images",
    None,
    "The images to list exemplars for: a folder (its image files) or a .txt list of image "
    "paths (one per line, relative to the list's folder).",
    flag_values=FLAGS,
)
_CANDIDATES = flags.DEFINE_string(
    "candidates",
    None,
    "Where exemplars come from (folder or .txt list), e.g. the training split for a test "
    "list. Default: --images.",
    flag_values=FLAGS,
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "The list file to write (replaced if it exists).", flag_values=FLAGS
)
_VGG_CHECKPOINT = flags.DEFINE_string(
    "vgg_checkpoint", None, "CoCosNet's vgg19_conv.pth.", flag_values=FLAGS
)
_VGG_WIDTHS = flags.DEFINE_list(
    "vgg_widths",
    [str(w) for w in OFFICIAL_WIDTHS],
    "Channels of the five VGG19 blocks (of the checkpoint).",
    flag_values=FLAGS,
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size",
    256,
    f"Side the images are resized to for the features (a multiple of {SIZE_MULTIPLE}).",
    flag_values=FLAGS,
)
_TOP_K = flags.DEFINE_integer(
    "top_k", 20, "Candidates per image (the official test list has 20).", flag_values=FLAGS
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per feature batch.", flag_values=FLAGS)
_READ_THREADS = flags.DEFINE_integer(
    "read_threads", 8, "Threads decoding and resizing images.", flag_values=FLAGS
)
_SKIP_BAD = flags.DEFINE_boolean(
    "skip_bad",
    False,
    "Leave unreadable images out of the lists (reported on stderr) instead of stopping.",
    flag_values=FLAGS,
)
_LIBRARY_LOGS = logs.define_flag(FLAGS)


@dataclasses.dataclass(frozen=True)
class Entry:
  """An image: ``name`` as written in the list file, ``path`` where it is read from."""

  name: str
  path: pathlib.Path


LSUN_PHOTO, LSUN_LABEL_MAP = ".jpg", ".png"  # the official LSUN loader's split of a folder's files


def label_map_layout(paths: Sequence[pathlib.Path]) -> bool:
  """Whether a folder's image files are in the LSUN church layout: some ``<name>.png`` (a label map)
  beside a ``<name>.jpg`` photo."""
  photos = {p.with_suffix("") for p in paths if p.suffix == LSUN_PHOTO}
  return any(p.suffix == LSUN_LABEL_MAP and p.with_suffix("") in photos for p in paths)


def _folder_entries(folder: pathlib.Path, notes: list[str] | None) -> list[Entry]:
  paths = [
      p
      for p in folder.iterdir()
      if p.is_file()
      and not p.name.startswith(".")
      and p.suffix.lower() in images_lib.IMAGE_SUFFIXES
  ]
  if not paths:
    raise InputError(
        f"{folder}: no image files ({', '.join(images_lib.IMAGE_SUFFIXES)}) in this folder"
    )
  if label_map_layout(paths):  # its .png files are label maps: never exemplars
    photos = [p for p in paths if p.suffix == LSUN_PHOTO]
    if notes is not None:
      notes.append(
          f"{folder} holds label maps beside its photos (<name>.png beside <name>.jpg, "
          f"the LSUN church layout): listing its {len(photos)} .jpg photos, not its "
          f"{len(paths) - len(photos)} other image files"
      )
    paths = photos
  return sorted((Entry(p.name, p) for p in paths), key=lambda e: images_lib.natural_key(e.name))


def _list_entries(path: pathlib.Path) -> list[Entry]:
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read the image list: {e}") from None
  names = [
      line.strip().replace("\\", "/")
      for line in lines
      if line.strip() and not line.strip().startswith("#")
  ]
  if not names:
    raise InputError(f"{path}: the image list names no files")
  # absolute stays absolute
  return [Entry(name, path.parent / pathlib.Path(name).expanduser()) for name in names]


def list_images(source: str | pathlib.Path, notes: list[str] | None = None) -> list[Entry]:
  """The entries of a folder (natural order; in the LSUN church layout its photos only, and a line
  for ``notes`` says so) or a ``.txt`` list (its order); names must fit the format and be unique,
  and no file may appear twice."""
  source = pathlib.Path(source).expanduser()
  if source.is_dir():
    entries = _folder_entries(source, notes)
  elif source.suffix.lower() == ".txt":
    entries = _list_entries(source)
  elif source.exists():
    raise InputError(f"{source}: neither a folder nor a .txt list of images")
  else:
    raise InputError(f"{source}: no such folder or file")
  names: dict[str, Entry] = {}
  files: dict[pathlib.Path, Entry] = {}
  for entry in entries:
    if _UNWRITABLE.search(entry.name):
      raise InputError(
          f"{entry.path}: the name {entry.name!r} cannot be written in a reference list (no "
          "commas, "
          "line breaks, or spaces at either end); rename the file"
      )
    resolved = entry.path.resolve()
    clash = names.get(entry.name) or files.get(resolved)
    if clash:
      raise InputError(f"{entry.path}: listed twice in {source} (also as {clash.name!r})")
    names[entry.name], files[resolved] = entry, entry
  return entries


def load_pixels(path: str | pathlib.Path, image_size: int) -> np.ndarray:
  """uint8 ``(image_size, image_size, 3)``: the image in RGB (other modes converted, as the official
  loaders do), resized bicubically; an unreadable file is an ``InputError`` naming it."""
  image = images_lib.open_image(path).convert("RGB")
  return np.asarray(image.resize((image_size, image_size), Image.Resampling.BICUBIC), np.uint8)


def check_image_size(image_size: int) -> None:
  if image_size < SIZE_MULTIPLE or image_size % SIZE_MULTIPLE:
    raise InputError(
        f"--image_size={image_size}: must be a positive multiple of {SIZE_MULTIPLE} (VGG19's "
        "relu5_2 "
        "sits after four 2x2 max pools)"
    )


@functools.partial(jax.jit, static_argnames=("widths", "layers"))
def pooled_features(
    variables: Mapping, pixels: jax.Array, widths: tuple[int, ...], layers: tuple[str, ...] = LAYERS
) -> jax.Array:
  """``uint8 (B, S, S, 3) -> float32 (B, D)``: per layer the spatial mean of the ReLU features,
  L2-normalised; concatenated and scaled to unit norm (cosine = mean of the layers' cosines)."""
  x = pixels.astype(jnp.float32) / 255.0 * 2.0 - 1.0  # the [-1, 1] RGB the loss network takes
  maps = vgg_lib.VGG19(widths).apply(variables, x, layers)
  pooled = [maps[name].mean(axis=(1, 2)) for name in layers]
  unit = [p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12) for p in pooled]
  return jnp.concatenate(unit, axis=-1) / np.float32(np.sqrt(len(layers)))


def feature_fn(
    variables: Mapping, widths: Sequence[int], layers: Sequence[str] = LAYERS
) -> Callable[[np.ndarray], jax.Array]:
  """``pooled_features`` with the network fixed: ``uint8 (B, S, S, 3) -> (B, D)``."""
  return functools.partial(pooled_features, variables, widths=tuple(widths), layers=tuple(layers))


def _loaded(
    paths: Sequence[pathlib.Path], image_size: int, threads: int, ahead: int
) -> Iterator[np.ndarray | InputError]:
  """Pixels (or the file's ``InputError``) of ``paths`` in order, decoded by ``threads`` threads at
  most ``ahead`` images in advance (bounded memory)."""

  def load(path):
    try:
      return load_pixels(path, image_size)
    except InputError as e:
      return e

  with futures.ThreadPoolExecutor(max(1, threads)) as pool:
    pending = collections.deque()
    for path in paths:
      pending.append(pool.submit(load, path))
      if len(pending) > ahead:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def extract_features(
    paths: Sequence[pathlib.Path],
    features: Callable[[np.ndarray], jax.Array],
    *,
    image_size: int,
    batch_size: int,
    skip_bad: bool = False,
    read_threads: int = 8,
    progress: bool = False,
) -> tuple[np.ndarray, dict[int, InputError]]:
  """``(N, D)`` float32 features of ``paths`` and the unreadable ones ``{index: error}`` (their rows
  are zero). Without ``skip_bad`` the first unreadable file raises its ``InputError``. Batches are
  padded to ``batch_size``, so ``features`` compiles once."""
  rows, bad, batch = [], {}, []

  def flush():
    padded = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
    padded[: len(batch)] = batch
    rows.append(np.asarray(features(padded))[: len(batch)])
    batch.clear()

  with tqdm(total=len(paths), unit="image", disable=not progress, file=sys.stderr) as bar:
    for index, pixels in enumerate(_loaded(paths, image_size, read_threads, ahead=2 * batch_size)):
      if isinstance(pixels, InputError):
        if not skip_bad:
          raise pixels
        bad[index] = pixels
        pixels = np.zeros((image_size, image_size, 3), np.uint8)
      batch.append(pixels)
      if len(batch) == batch_size:
        flush()
      bar.update()
    if batch:
      flush()
  return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32), bad


def rank(
    queries: np.ndarray,
    candidates: np.ndarray,
    top_k: int,
    exclude: np.ndarray | None = None,
    chunk_elements: int = 2**23,
) -> list[np.ndarray]:
  """Per query row, the indices of the ``top_k`` most cosine-similar candidate rows, best first.

  Rows must be unit vectors. ``exclude[i]``: a candidate index query ``i`` may not get (itself), or
  -1. Similarities are float64 dot products rounded to float32, so identical candidates tie (their
  summation-order differences are far below float32 rounding); ties go to the lower index (sort the
  candidates by name for name order). Queries are taken in chunks of at most ``chunk_elements``
  similarities: the full query x candidate matrix never exists. A query with fewer than ``top_k``
  allowed candidates gets all of them.
  """
  n, m = len(queries), len(candidates)
  exclude = np.full(n, -1) if exclude is None else np.asarray(exclude)
  candidates64 = candidates.astype(np.float64).T
  rows = max(1, chunk_elements // max(m, 1))
  ranked = []
  for start in range(0, n, rows):
    scores = (queries[start : start + rows].astype(np.float64) @ candidates64).astype(np.float32)
    own = exclude[start : start + rows]
    scores[np.flatnonzero(own >= 0), own[own >= 0]] = -np.inf
    ranked.extend(_top_k_row(row, top_k) for row in scores)
  return ranked


def _top_k_row(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the ``k`` largest finite scores, best first, ties to the lower index."""
  allowed = np.isfinite(scores).sum()
  k = min(k, int(allowed))
  if k == 0:
    return np.zeros(0, np.int64)
  threshold = np.partition(scores, scores.size - k)[scores.size - k]  # the k-th largest
  # every tie at the threshold, then the lowest indices
  chosen = np.flatnonzero(scores >= threshold)
  order = np.lexsort((chosen, -scores[chosen]))
  return chosen[order[:k]]


def format_lines(
    keys: Sequence[str], candidate_names: Sequence[str], ranked: Iterable[np.ndarray]
) -> list[str]:
  """``key,cand,cand,...`` per key (official ``*_ref.txt`` lines, without line ends)."""
  return [
      SEPARATOR.join([key] + [candidate_names[j] for j in row]) for key, row in zip(keys, ranked)
  ]


def write_list(path: str | pathlib.Path, lines: Sequence[str]) -> pathlib.Path:
  """Writes ``lines`` with ``\\n`` ends (UTF-8) atomically: a temporary file beside ``path``, then a
  rename."""
  path = pathlib.Path(path).expanduser()
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8", newline="\n")
    os.replace(tmp, path)
  except OSError as e:
    if tmp.parent.is_dir():
      tmp.unlink(missing_ok=True)
    raise InputError(f"{path}: cannot write the list: {e.strerror or e}") from None
  return path


def read_list(path: str | pathlib.Path) -> dict[str, list[str]]:
  """``{key: [candidates, best first]}`` of a ``*_ref.txt`` file, parsed as the official loaders do
  (strip each line, split at ``,``; blank lines ignored)."""
  path = pathlib.Path(path).expanduser()
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read the reference list: {e}") from None
  out = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    key, *candidates = line.strip().split(SEPARATOR)
    if not candidates or not all(candidates):
      raise InputError(f"{path}: line {number} is not 'key,candidate[,candidate...]'")
    out[key] = candidates
  return out


@dataclasses.dataclass(frozen=True)
class Result:
  """What ``make_exemplar_lists`` wrote: lines, candidates per line (fewest), skipped files with
  reasons."""

  path: pathlib.Path
  lines: int
  min_candidates: int
  skipped: tuple[InputError, ...]


def make_exemplar_lists(
    image_entries: Sequence[Entry],
    output: str | pathlib.Path,
    *,
    variables: Mapping,
    widths: Sequence[int] = OFFICIAL_WIDTHS,
    candidate_entries: Sequence[Entry] | None = None,
    top_k: int = 20,
    image_size: int = 256,
    batch_size: int = 32,
    skip_bad: bool = False,
    read_threads: int = 8,
    progress: bool = False,
    chunk_elements: int = 2**23,
) -> Result:
  """Ranks ``candidate_entries`` (default: ``image_entries``) for every image entry and writes the
  list.

  Every file is read once, also when it is both an image and a candidate. Candidates are ranked in
  natural name order for the tie-breaking; unreadable files (``skip_bad``) are dropped from both
  sides.
  """
  if top_k < 1 or batch_size < 1:
    raise InputError(f"--top_k and --batch_size must be positive, got {top_k} and {batch_size}")
  check_image_size(image_size)
  candidate_entries = image_entries if candidate_entries is None else candidate_entries
  candidate_entries = sorted(candidate_entries, key=lambda e: images_lib.natural_key(e.name))
  files: dict[pathlib.Path, int] = {}  # resolved path -> feature row
  paths = []  # as the user named them (error messages)
  for entry in list(image_entries) + candidate_entries:
    if entry.path.resolve() not in files:
      files[entry.path.resolve()] = len(paths)
      paths.append(entry.path)
  features, bad = extract_features(
      paths,
      feature_fn(variables, widths),
      image_size=image_size,
      batch_size=batch_size,
      skip_bad=skip_bad,
      read_threads=read_threads,
      progress=progress,
  )
  keep = lambda entries: [e for e in entries if files[e.path.resolve()] not in bad]
  image_entries, candidate_entries = keep(image_entries), keep(candidate_entries)
  if not image_entries or not candidate_entries:
    raise InputError("no readable images left to list (every file was skipped)")
  image_rows = np.array([files[e.path.resolve()] for e in image_entries])
  candidate_rows = np.array([files[e.path.resolve()] for e in candidate_entries])
  position = {row: j for j, row in enumerate(candidate_rows)}
  exclude = np.array([position.get(row, -1) for row in image_rows])
  ranked = rank(features[image_rows], features[candidate_rows], top_k, exclude, chunk_elements)
  lonely = [e for e, row in zip(image_entries, ranked) if not len(row)]
  if lonely:
    raise InputError(
        f"{lonely[0].path}: no other image to list as its exemplar (need at least 2 images)"
    )
  lines = format_lines([e.name for e in image_entries], [e.name for e in candidate_entries], ranked)
  path = write_list(output, lines)
  return Result(path, len(lines), min(len(row) for row in ranked), tuple(bad.values()))


def _widths(values: Sequence[str]) -> tuple[int, ...]:
  try:
    widths = tuple(int(v) for v in values)
  except ValueError:
    widths = ()
  if len(widths) != len(vgg_lib.VGG19_BLOCKS) or min(widths) < 1:
    raise InputError(
        f"--vgg_widths={','.join(values)}: need {len(vgg_lib.VGG19_BLOCKS)} positive integers, "
        f"e.g. {','.join(map(str, OFFICIAL_WIDTHS))}"
    )
  return widths


def _required(flag: flags.FlagHolder, what: str) -> str:
  if not flag.value:
    raise InputError(f"--{flag.name} is required ({what})")
  return flag.value


def main(argv: Sequence[str]) -> int:
  logs.configure(library_logs=_LIBRARY_LOGS.value)
  if len(argv) > 1:
    print(
        f"error: unexpected arguments {' '.join(argv[1:])} (all inputs are --flags)",
        file=sys.stderr,
    )
    return 2
  try:
    notes = []
    image_entries = list_images(_required(_IMAGES, "a folder or .txt list of images"), notes)
    candidate_entries = list_images(_CANDIDATES.value, notes) if _CANDIDATES.value else None
    for note in notes:  # before the features: a run on a large folder is long
      print(f"note: {note}", file=sys.stderr)
    output = _required(_OUTPUT, "the list file to write")
    cli.check_writable(output, "--output")  # before the features are computed
    widths = _widths(_VGG_WIDTHS.value)
    check_image_size(_IMAGE_SIZE.value)
    variables = vgg_lib.load_vgg19(_required(_VGG_CHECKPOINT, "CoCosNet's vgg19_conv.pth"), widths)
    result = make_exemplar_lists(
        image_entries,
        output,
        variables=variables,
        widths=widths,
        candidate_entries=candidate_entries,
        top_k=_TOP_K.value,
        image_size=_IMAGE_SIZE.value,
        batch_size=_BATCH_SIZE.value,
        skip_bad=_SKIP_BAD.value,
        read_threads=_READ_THREADS.value,
        progress=True,
    )
  except (InputError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # e.g. a folder that cannot be listed
    print(f"error: {cli.os_error_line(e)}", file=sys.stderr)
    return 2
  for error in result.skipped:
    print(f"skipped {error}", file=sys.stderr)
  if result.min_candidates < _TOP_K.value:
    print(
        f"note: only {result.min_candidates} candidate(s) for some images, fewer than "
        f"--top_k={_TOP_K.value}; "
        "their lines are shorter",
        file=sys.stderr,
    )
  print(f"wrote {result.path} ({result.lines} lines)")
  return 0


def run(argv: Sequence[str]) -> int:
  """In-process entry point (tests, notebooks): ``argv`` with the program name first; returns the
  exit status."""
  return cli.run_in_process(FLAGS, main, argv, doc=__doc__)


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  sys.exit(run(sys.argv))
