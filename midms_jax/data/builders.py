"""TFDS builders of the benchmark data sets, read from the official CoCosNet / MIDMs folder layouts.

``python -m midms_jax.data.prepare`` runs them; ``midms_jax.data.sources`` reads what they write. A
builder reads the user's folder (TFDS ``manual_dir``) and the official exemplar lists and writes
array_record files (random access) with the splits ``train`` and ``validation``, and ``exemplars``
when an exemplar list names an image that neither split lists (its records only serve as exemplars).

Record order is the official loader's index order: record ``i`` of a split is item ``i`` of the
official data set (``evaluate`` names its outputs by this index). The official ``Pix2pixDataset``
natural-sorts its paths (digit runs compared as numbers; a stable sort) unless the benchmark is
``celebahq`` or ``deepfashion``; its CelebA-HQ benchmark is ``celebahqedge``, so only DeepFashion
keeps its list order:

* CelebA-HQ: the ids of ``train.txt`` / ``val.txt`` in natural order (equal ones such as ``12`` and
  ``012`` in list order).
* DeepFashion: ``train.txt`` / ``val.txt`` order.
* LSUN church: the ``.jpg`` photos under ``training/`` / ``validation/`` (recursively) in natural
  order of their paths, ties in text order (the official ``sorted`` comes first). The training
  photos are those ``training/files.list`` names when it exists (the official file-list cache, read
  for training only): one path per line as the official loader opens it (absolute, or relative to
  the current folder), each in ``training/``, in natural order of the lines' text. Its other lines
  (the ``.png`` label maps) are not needed: a photo's label map is the same-name ``.png`` beside
  it, as the official pairing check demands.

With ``skip_bad``, the records after a skipped one come earlier than in the official data set.

What a record holds: the original files' bytes (no re-encoding) and the condition inputs in compact
form; conditions are rendered when read, at the config's load size (``sources.py``). Exemplars are
references to other records (split and index, plus the key for people reading the data), never
copies.

Common features: ``key`` (text: the image's name as the lists write it, with ``/`` separators;
CelebA-HQ ``12.jpg``, DeepFashion ``img/WOMEN/Dresses/id_00000244/02_1_front.jpg``, LSUN church
``training/<name>.jpg``, relative to ``manual_dir``), ``image`` (the photo's original bytes), and
per exemplar, ``ref`` (easy) and ``ref_hard`` (hard): ``<ref>_key`` (text), ``<ref>_split`` (class
label of ``SPLITS``), ``<ref>_index`` (int64; records of the ``exemplars`` split have none: key
``''``, index -1). Per data set:

* ``celebahq``: ``mask_parts`` (sequence of class labels of ``conditions.CELEBAHQ_PART_NAMES``: the
  parts whose CelebAMask-HQ PNG exists) and ``masks`` (the matching PNG files' bytes).
* ``deepfashion``: ``pose_candidate`` (float64 ``(N, 2)``: the OpenPose candidates' x, y) and
  ``pose_subset`` (int32 ``(18,)``: each keypoint's candidate row, -1 = missing).
* ``lsun_church``: ``label`` (the label-id PNG's bytes). Ids 0..150 or 255, as the official loader
  reads them: 255 becomes 150, the "don't care" channel of the 151-channel one-hot; 151..254 are
  refused (they have no channel).

Exemplars follow the official lists (the builder's ``ref_list`` / ``ref_test_list``; by default
``<manual_dir>/<name>_ref.txt`` and ``<name>_ref_test.txt``): a line is ``key,candidate,...``. Easy
/ hard exemplar: training list of CelebA-HQ and LSUN church: the first / last candidate;
DeepFashion: the last candidate / a random other training image (drawn once at build time from
``seed``, as the official code draws it once per run); test lists: the first / second candidate (the
first if there is one only).

Bad data (a missing or unreadable image, mask or label map, a pose file in the wrong format, an
image without a line in its exemplar list, a line naming a missing image, ...) stops the build with
an ``InputError`` naming the file, or, with ``skip_bad``, skips the record (and the records that use
it as an exemplar) and lists it with the reason in ``builder.skipped`` and in the data set's
``metadata.json``. Every file is decoded once before anything is written, so no broken record is
ever written.
"""

import concurrent.futures
import dataclasses
import functools
import io
import pathlib
import posixpath
import re
import sys
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from PIL import Image

from midms_jax.data import conditions, images
from midms_jax.errors import InputError, first_line

SPLITS = ("train", "validation", "exemplars")
RECORD_SPLITS = SPLITS[:2]  # the splits with lists; ``exemplars`` holds what only exemplars need
EXEMPLARS = ("ref", "ref_hard")  # easy and hard exemplar, named as in the pipeline's records
LSUN_CLASSES = 150  # official label_nc: ids 0..149; 150 (or 255): don't care
LSUN_DONT_CARE_FILE_ID = 255  # the official loader maps it to LSUN_CLASSES
FILES_LIST = "files.list"  # LSUN church: the official file-list cache (training only)
CELEBAHQ_IMAGES, CELEBAHQ_MASKS = "CelebA-HQ-img", "CelebAMask-HQ-mask-anno"
LSUN_FOLDERS = {"train": "training", "validation": "validation"}
LIST_FILES = {"train": "train.txt", "validation": "val.txt"}

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record left out by ``skip_bad``: its split, key, and the problem (naming the file)."""

  split: str
  key: str
  reason: str


@dataclasses.dataclass(frozen=True)
class _Exemplar:
  """Where an exemplar key came from: list file, line number, the name written there."""

  key: str
  where: str  # "<list>:<line>: exemplar <name> of <record key>"


@dataclasses.dataclass(frozen=True)
class _Planned:
  """A record to write: its key and its exemplars as (split, index, key)."""

  key: str
  refs: tuple[tuple[str, int, str], tuple[str, int, str]]


class _Problems:
  """Raises each problem at once (default) or, with ``skip_bad``, keeps it as a ``Skipped``."""

  def __init__(self, skip_bad: bool):
    self.skip_bad, self.skipped = skip_bad, []

  def __call__(self, split: str, key: str, message: str) -> None:
    if not self.skip_bad:
      raise InputError(message)
    self.skipped.append(Skipped(split, key, message))


def decode_image(data: bytes, name: str | pathlib.Path) -> Image.Image:
  """The fully decoded image of stored file bytes (Pillow, as the official ``Image.open``: no EXIF
  rotation)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return image
  except Image.UnidentifiedImageError:
    raise InputError(
        f"{name}: not a readable image (corrupt or truncated?): unknown image format"
    ) from None
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types on bad files
    reason = first_line(e)
    raise InputError(f"{name}: not a readable image (corrupt or truncated?): {reason}") from None


def read_bytes(path: pathlib.Path) -> bytes:
  """A file's bytes; a missing or unreadable file is an ``InputError`` naming it."""
  if not path.is_file():
    raise InputError(f"{path}: no such file")
  try:
    return path.read_bytes()
  except OSError as e:
    raise InputError(f"{path}: cannot read it: {e.strerror or e}") from None


def _read_lines(path: pathlib.Path, strip: bool = True) -> list[tuple[int, str]]:
  """The non-empty lines of a text file, with their 1-based numbers: stripped, or as written."""
  try:
    text = read_bytes(path).decode("utf-8")
  except UnicodeDecodeError:
    raise InputError(f"{path}: not a UTF-8 text file") from None
  lines = ((n, line.strip() if strip else line) for n, line in enumerate(text.splitlines(), 1))
  return [(n, line) for n, line in lines if line.strip()]


def natural_parts(name: str) -> tuple:
  """The official ``natural_keys`` of ``name``: its text, digit runs as numbers; no tie-break (the
  official ``list.sort`` is stable: names that differ only in leading zeros keep their order)."""
  return images.natural_key(name)[0]


def _random_other(keys: Sequence[str], i: int, rng: np.random.Generator) -> str:
  """A uniformly drawn key of ``keys`` at another position than ``i`` (``keys[i]`` when it is
  alone)."""
  if len(keys) == 1:
    return keys[i]
  j = int(rng.integers(len(keys) - 1))
  return keys[j + (j >= i)]


_EXEMPLAR_FEATURES = {
    f"{ref}_{field}": feature
    for ref in EXEMPLARS
    for field, feature in (
        ("key", tfds.features.Text()),
        ("split", tfds.features.ClassLabel(names=SPLITS)),
        ("index", tfds.features.Scalar(dtype=np.int64)),
    )
}


class BenchmarkBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the three builders share: planning (lists, exemplars, checks), writing, the skip
  report."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Original files, condition inputs and exemplar references; array_record."
  }
  HOMEPAGE = "https://github.com/cvlab-kaist/MIDMs"
  DESCRIPTION = ""

  def __init__(
      self,
      *,
      ref_list: str | pathlib.Path | None = None,
      ref_test_list: str | pathlib.Path | None = None,
      skip_bad: bool = False,
      seed: int = 0,
      **kwargs,
  ):
    """``ref_list`` / ``ref_test_list``: the training / test exemplar lists (default: in
    ``manual_dir``); ``skip_bad``: skip bad records instead of stopping; ``seed``: DeepFashion's
    random hard exemplars. Other arguments go to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``,
    ...)."""
    super().__init__(file_format="array_record", **kwargs)
    self._ref_lists = {"train": ref_list, "validation": ref_test_list}
    self._skip_bad, self._seed = skip_bad, seed
    self.progress = True  # False: a plain line per stage on stderr instead of progress bars
    self.skipped: list[Skipped] = []

  # Per data set.
  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    raise NotImplementedError

  def _split_keys(self, root: pathlib.Path, split: str, problems: _Problems) -> list[str]:
    """The split's record keys in the official loader's order (bad lines go to ``problems``)."""
    raise NotImplementedError

  def _split_source(self, root: pathlib.Path, split: str) -> str:
    """What names the split's images (for messages)."""
    return LIST_FILES[split]

  def _key_problem(self, key: str) -> str | None:
    """Why ``key`` cannot name an image of this data set (None: it can)."""
    return None

  def _list_key(self, key: str) -> str:
    """The key an exemplar list writes for record ``key``."""
    return key

  def _exemplar_key(self, key: str, name: str) -> str:
    """The key of exemplar ``name`` (as a list writes it) of record ``key``."""
    return name.replace("\\", "/")

  def _exemplar_names(self, split: str, candidates: Sequence[str]) -> tuple[str, str | None]:
    """(easy, hard) exemplar names of a list line's candidates; hard None: drawn at random
    (DeepFashion)."""
    if split == "train":
      return candidates[0], candidates[-1]
    return candidates[0], candidates[min(1, len(candidates) - 1)]

  def _image_path(self, root: pathlib.Path, key: str) -> pathlib.Path:
    """The photo of record ``key``."""
    return root / key

  def _read(self, root: pathlib.Path, key: str) -> Example:
    """The stored features of record ``key`` (file bytes, parsed small files) but its exemplars."""
    raise NotImplementedError

  def _check(self, root: pathlib.Path, key: str, example: Example) -> None:
    """Decodes what ``_read`` gave (InputError naming the file if it does not decode or fit)."""
    decode_image(example["image"], self._image_path(root, key))

  # Shared.
  def _info(self) -> tfds.core.DatasetInfo:
    features = dict(
        key=tfds.features.Text(),
        image=tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        **_EXEMPLAR_FEATURES,
        **self._features(),
    )
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _ref_list_path(self, root: pathlib.Path, split: str) -> pathlib.Path:
    """The exemplar list of ``split``: the one passed, else ``<root>/<name>_ref[_test].txt``."""
    path = self._ref_lists[split]
    suffix = "" if split == "train" else "_test"
    return pathlib.Path(path).expanduser() if path else root / f"{self.name}_ref{suffix}.txt"

  def _exemplar_lines(
      self, root: pathlib.Path, split: str
  ) -> tuple[pathlib.Path, dict[str, tuple[int, list[str]]]]:
    """The split's exemplar list: list key -> (line number, candidate names). Later lines win
    (official)."""
    path = self._ref_list_path(root, split)
    if not path.is_file():
      flag = "--ref_list" if split == "train" else "--ref_test_list"
      raise InputError(
          f"{path}: no such file (the {split} exemplar list; pass its path with {flag})"
      )
    lines = {}
    for number, line in _read_lines(path):
      items = [item.strip() for item in line.split(",")]
      lines[items[0].replace("\\", "/")] = (number, [item for item in items[1:] if item])
    return path, lines

  def _check_key(self, root: pathlib.Path, key: str) -> str | None:
    try:
      self._check(root, key, self._read(root, key))
    except InputError as e:
      return str(e)
    return None

  def _check_files(
      self, root: pathlib.Path, keys: Sequence[str], context: Mapping[str, str], problems: _Problems
  ) -> dict[str, str | None]:
    """Decodes every key's files (threads; in order, so without ``skip_bad`` the first problem stops
    it): key -> problem or None. ``context`` prefixes the problem of a key that is only an
    exemplar."""
    results = {}
    if not self.progress:
      print(f"checking {self.name} files: {len(keys)} images", file=sys.stderr, flush=True)
    pool = concurrent.futures.ThreadPoolExecutor()
    try:
      checks = pool.map(functools.partial(self._check_key, root), keys)
      for key, problem in tqdm.tqdm(
          zip(keys, checks),
          total=len(keys),
          desc=f"checking {self.name} files",
          unit="image",
          disable=not self.progress,
      ):
        if problem and not problems.skip_bad:
          raise InputError(f"{context[key]}: {problem}" if key in context else problem)
        results[key] = problem
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    return results

  def _wanted_exemplars(
      self, root: pathlib.Path, split: str, keys: Sequence[str], problems: _Problems
  ) -> dict[str, tuple[_Exemplar, _Exemplar | None]]:
    """Record key -> (easy, hard) exemplar from the split's list (hard None: drawn at random
    later)."""
    list_path, lines = self._exemplar_lines(root, split)
    wanted = {}
    for key in keys:
      list_key = self._list_key(key)
      number, candidates = lines.get(list_key, (0, []))
      if not candidates:
        what = "no exemplar on the line" if number else "no line"
        problems(
            split,
            key,
            f"{list_path}: {what} for {list_key} (the exemplars of {self._image_path(root, key)})",
        )
        continue
      pair = tuple(
          None
          if name is None
          else _Exemplar(
              self._exemplar_key(key, name), f"{list_path}:{number}: exemplar {name} of {list_key}"
          )
          for name in self._exemplar_names(split, candidates)
      )
      problem = next(
          (
              f"{e.where}: {why}"
              for e in pair
              if e is not None and (why := self._key_problem(e.key))
          ),
          None,
      )
      if problem:
        problems(split, key, problem)
      else:
        wanted[key] = pair
    return wanted

  def _plan(self, root: pathlib.Path) -> tuple[dict[str, list[_Planned]], list[Skipped]]:
    """The records of every split, with exemplars resolved to (split, index); and what was
    skipped."""
    problems = _Problems(self._skip_bad)
    keys = {split: self._split_keys(root, split, problems) for split in RECORD_SPLITS}
    wanted = {
        split: self._wanted_exemplars(root, split, keys[split], problems) for split in RECORD_SPLITS
    }
    record_keys = list(dict.fromkeys(key for split in RECORD_SPLITS for key in keys[split]))
    known, context = set(record_keys), {}  # context: exemplar-only key -> where it was first named
    for split in RECORD_SPLITS:
      for pair in wanted[split].values():
        for exemplar in pair:
          if exemplar is not None and exemplar.key not in known:
            context.setdefault(exemplar.key, exemplar.where)
    bad = self._check_files(root, record_keys + list(context), context, problems)
    records = {}
    for split in RECORD_SPLITS:
      records[split] = []
      for key in (k for k in keys[split] if k in wanted[split]):
        failed = next((e for e in wanted[split][key] if e is not None and bad[e.key]), None)
        if bad[key]:
          problems(split, key, bad[key])
        elif failed is not None:
          problems(split, key, f"{failed.where}: {bad[failed.key]}")
        else:
          records[split].append(key)
      if not records[split]:
        source = self._split_source(root, split)
        raise InputError(
            f"{root}: no usable {split} record (see {source}, the {split} exemplar "
            "list and the problems above)"
        )
    return self._resolve(records, wanted), problems.skipped

  def _resolve(
      self, records: Mapping[str, list[str]], wanted: Mapping[str, Mapping[str, tuple]]
  ) -> dict[str, list[_Planned]]:
    """Exemplar keys -> (split, index): the record's own split first, then the other; else an
    ``exemplars`` record. DeepFashion's random hard exemplars are drawn here, among the written
    records of the split.
    """
    index = {split: {} for split in RECORD_SPLITS}
    for split in RECORD_SPLITS:
      for i, key in enumerate(records[split]):
        index[split].setdefault(key, i)
    extra: dict[str, int] = {}
    rng = np.random.default_rng(self._seed)

    def locate(key: str, split: str) -> tuple[str, int, str]:
      for where in sorted(RECORD_SPLITS, key=lambda s: s != split):
        if key in index[where]:
          return where, index[where][key], key
      return SPLITS[2], extra.setdefault(key, len(extra)), key

    planned = {}
    for split in RECORD_SPLITS:
      planned[split] = []
      for i, key in enumerate(records[split]):
        easy, hard = wanted[split][key]
        hard_key = _random_other(records[split], i, rng) if hard is None else hard.key
        planned[split].append(_Planned(key, (locate(easy.key, split), locate(hard_key, split))))
    planned[SPLITS[2]] = [_Planned(key, ((SPLITS[2], -1, ""),) * 2) for key in extra]
    return planned

  def _log_download_bytes(
      self,
  ) -> None:  # TFDS hook; it would announce a download "of unknown size"
    print(f"preparing {self.name} {self.version} in {self.data_dir}")

  def _log_download_done(self) -> None:  # TFDS hook; the prepare command prints its own summary
    pass

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    root = pathlib.Path(dl_manager.manual_dir)
    planned, self.skipped = self._plan(root)
    self.info.metadata.update(
        skipped=[dataclasses.asdict(s) for s in self.skipped],
        ref_lists={split: str(self._ref_list_path(root, split)) for split in RECORD_SPLITS},
        seed=self._seed,
    )
    return {
        split: self._generate_examples(root, records, split)
        for split, records in planned.items()
        if records
    }

  def _generate_examples(
      self, root: pathlib.Path, records: Sequence[_Planned], split: str = ""
  ) -> Iterator[tuple[int, Example]]:
    if not self.progress:
      print(f"writing {self.name} {split}: {len(records)} records", file=sys.stderr, flush=True)
    for i, record in enumerate(records):
      example = self._read(root, record.key)
      example["key"] = record.key
      for ref, (split, index, key) in zip(EXEMPLARS, record.refs):
        example.update({f"{ref}_key": key, f"{ref}_split": split, f"{ref}_index": index})
      yield i, example


class CelebAHQ(BenchmarkBuilder):
  """CelebA-HQ faces with CelebAMask-HQ part masks (CoCosNet's CelebAHQEdge layout)."""

  name = "celebahq"
  DESCRIPTION = "CelebA-HQ photos and CelebAMask-HQ part masks for MIDMs edge-to-face translation."
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  manual_dir/
    train.txt, val.txt                      one image id per line (e.g. 12)
    {CELEBAHQ_IMAGES}/<id>.jpg
    {CELEBAHQ_MASKS}/<id // 2000>/<id, 5 digits>_<part>.png
    celebahq_ref.txt, celebahq_ref_test.txt  exemplar lists (or pass their paths)
  """

  def _features(self):
    return dict(
        mask_parts=tfds.features.Sequence(
            tfds.features.ClassLabel(names=conditions.CELEBAHQ_PART_NAMES)
        ),
        masks=tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    )

  def _split_keys(self, root, split, problems):
    path = root / LIST_FILES[split]
    keys = []
    for number, line in _read_lines(path):
      if line.isdigit():
        keys.append(f"{line}.jpg")
      else:
        problems(split, line, f"{path}:{number}: {line!r} is not an image id")
    return sorted(keys, key=natural_parts)  # the official natural sort (benchmark "celebahqedge")

  def _key_problem(self, key):
    return None if re.fullmatch(r"\d+\.jpg", key) else "not a CelebA-HQ image name (<id>.jpg)"

  def _image_path(self, root, key):
    return root / CELEBAHQ_IMAGES / key

  def _read(self, root, key):
    paths = [celebahq_mask_path(root, key, part) for part in conditions.CELEBAHQ_PART_NAMES]
    parts = [k for k, path in enumerate(paths) if path.is_file()]
    return dict(
        image=read_bytes(self._image_path(root, key)),
        mask_parts=parts,
        masks=[read_bytes(paths[k]) for k in parts],
    )

  def _check(self, root, key, example):
    super()._check(root, key, example)
    for k, data in zip(example["mask_parts"], example["masks"]):
      decode_image(data, celebahq_mask_path(root, key, conditions.CELEBAHQ_PART_NAMES[k]))


def celebahq_mask_path(root: pathlib.Path, key: str, part: str) -> pathlib.Path:
  """CelebAMask-HQ's PNG of ``part`` of image ``<id>.jpg``:
  ``<masks>/<id // 2000>/<id, 5 digits>_<part>.png``."""
  image_id = key[: -len(".jpg")]
  return root / CELEBAHQ_MASKS / str(int(image_id) // 2000) / f"{image_id.zfill(5)}_{part}.png"


def deepfashion_pose_files(root: pathlib.Path, key: str) -> tuple[pathlib.Path, pathlib.Path]:
  """(candidate, subset) files of DeepFashion image ``img/X.jpg``: ``pose/X_candidate.txt``,
  ``_subset.txt``."""
  stem = "pose/" + key[len("img/") : -len(".jpg")]
  return root / f"{stem}_candidate.txt", root / f"{stem}_subset.txt"


class DeepFashion(BenchmarkBuilder):
  """DeepFashion In-shop clothes with OpenPose keypoints (CoCosNet's layout)."""

  name = "deepfashion"
  DESCRIPTION = (
      "DeepFashion In-shop photos and OpenPose keypoints for MIDMs pose-to-person translation."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  manual_dir/
    train.txt, val.txt    one image per line, e.g. img\\WOMEN\\Dresses\\id_00000244\\02_1_front.jpg
    img/.../<name>.jpg
    pose/.../<name>_candidate.txt, <name>_subset.txt   OpenPose keypoints
    deepfashion_ref.txt, deepfashion_ref_test.txt      exemplar lists (or pass their paths)
  """

  def _features(self):
    return dict(
        pose_candidate=tfds.features.Tensor(shape=(None, 2), dtype=np.float64),
        pose_subset=tfds.features.Tensor(shape=(conditions.POSE_KEYPOINTS,), dtype=np.int32),
    )

  def _split_keys(self, root, split, problems):
    path = root / LIST_FILES[split]
    keys = []
    for number, line in _read_lines(path):
      key = line.replace("\\", "/")
      problem = self._key_problem(key)
      if problem:
        problems(split, key, f"{path}:{number}: {line}: {problem}")
      else:
        keys.append(key)
    return keys

  def _key_problem(self, key):
    return (
        None
        if key.startswith("img/") and key.endswith(".jpg")
        else "not an image under img/ (img/.../<name>.jpg)"
    )

  def _exemplar_names(self, split, candidates):
    return (
        (candidates[-1], None) if split == "train" else super()._exemplar_names(split, candidates)
    )

  def _read(self, root, key):
    candidate_path, subset_path = deepfashion_pose_files(root, key)
    candidate = conditions.read_candidate(candidate_path)
    subset = conditions.read_subset(subset_path).astype(int)  # truncation, as the official int()
    bad = subset[(subset != -1) & ((subset < 0) | (subset >= len(candidate)))]
    if bad.size:
      raise InputError(
          f"{subset_path}: refers to candidate row {bad[0]}, but {candidate_path.name} has "
          f"{len(candidate)} row(s) (-1 marks a missing keypoint)"
      )
    return dict(
        image=read_bytes(self._image_path(root, key)),
        pose_candidate=candidate[:, :2].astype(np.float64),
        pose_subset=subset.astype(np.int32),
    )


class LsunChurch(BenchmarkBuilder):
  """LSUN church outdoor photos with ADE20K-style label-id maps (MIDMs' layout)."""

  name = "lsun_church"
  DESCRIPTION = "LSUN church photos and 150-class segmentation maps for MIDMs segmentation-to-photo translation."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  manual_dir/
    training/**/<name>.jpg, <name>.png      photo and label-id map (ids 0..150; 255 read as 150)
    training/files.list                     optional: the training files, one path per line
    validation/**/<name>.jpg, <name>.png
    lsun_church_ref.txt, lsun_church_ref_test.txt   exemplar lists (or pass their paths)
  """

  def _features(self):
    return dict(label=tfds.features.Image(shape=(None, None, 1), encoding_format="png"))

  def _split_keys(self, root, split, problems):
    folder = root / LSUN_FOLDERS[split]
    if not folder.is_dir():
      raise InputError(f"{folder}: no such folder (the {split} photos and label maps)")
    if self._files_list(root, split):
      return self._listed_photos(root, problems)
    photos = [p.relative_to(root).as_posix() for p in folder.rglob("*.jpg") if p.is_file()]
    return sorted(photos, key=images.natural_key)  # official: sorted(), then a stable natural sort

  def _files_list(self, root: pathlib.Path, split: str) -> pathlib.Path | None:
    """``training/files.list`` when the split is ``train`` and the file exists (the official loader
    reads its file-list cache for training only), else None."""
    path = root / LSUN_FOLDERS["train"] / FILES_LIST
    return path if split == "train" and path.is_file() else None

  def _split_source(self, root, split):
    listing = self._files_list(root, split)
    return listing.relative_to(root).as_posix() if listing else f"{LSUN_FOLDERS[split]}/"

  def _listed_photos(self, root: pathlib.Path, problems: _Problems) -> list[str]:
    """The training photos ``training/files.list`` names (module doc), in the official order."""
    listing = root / LSUN_FOLDERS["train"] / FILES_LIST
    folder = (root / LSUN_FOLDERS["train"]).resolve()
    photos = [(n, line) for n, line in _read_lines(listing, strip=False) if line.endswith(".jpg")]
    keys = []
    for number, line in sorted(photos, key=lambda item: images.natural_key(item[1])):
      path = pathlib.Path(line)
      path = path if path.is_absolute() else pathlib.Path.cwd() / path
      path = path.parent.resolve() / path.name  # linked folders resolved, as in ``folder``
      if path.is_relative_to(folder):
        keys.append(posixpath.join(LSUN_FOLDERS["train"], path.relative_to(folder).as_posix()))
      else:
        problems(
            "train",
            line,
            f"{listing}:{number}: {line}: not a file in {folder} (files.list "
            "names the training files as the official loader opens them: absolute paths, or "
            "relative to the current folder)",
        )
    return keys

  def _key_problem(self, key):
    return None if key.endswith(".jpg") else "not a photo name (<name>.jpg)"

  def _list_key(self, key):
    return posixpath.basename(key)

  def _exemplar_key(self, key, name):
    return posixpath.join(posixpath.dirname(key), name)  # beside the record's photo (official)

  def _read(self, root, key):
    return dict(
        image=read_bytes(self._image_path(root, key)), label=read_bytes(root / lsun_label_key(key))
    )

  def _check(self, root, key, example):
    super()._check(root, key, example)
    path = root / lsun_label_key(key)
    label = decode_image(example["label"], path)
    if label.mode not in conditions.LABEL_MODES:
      raise InputError(
          f"{path}: label map must be a single-channel image of ids (mode L, P or I), found mode "
          f"{label.mode}"
      )
    ids = np.unique(np.asarray(label))
    bad = ids[(ids < 0) | ((ids > LSUN_CLASSES) & (ids != LSUN_DONT_CARE_FILE_ID))]
    if bad.size:  # the official one-hot has LSUN_CLASSES + 1 channels: a larger id has none
      found = ", ".join(map(str, bad[:5]))
      raise InputError(
          f"{path}: label ids must be 0..{LSUN_CLASSES} or {LSUN_DONT_CARE_FILE_ID} "
          f"(read as {LSUN_CLASSES}, don't care), found {found}"
      )


def lsun_label_key(key: str) -> str:
  """The label map beside an LSUN photo: same name, ``.png``."""
  return key[: -len(".jpg")] + ".png"


BUILDERS: dict[str, type[BenchmarkBuilder]] = {
    b.name: b for b in (CelebAHQ, DeepFashion, LsunChurch)
}


def builder(name: str, data_dir: str | pathlib.Path | None = None, **kwargs) -> BenchmarkBuilder:
  """The builder of data set ``name`` (``BUILDERS``) over ``data_dir`` (None: the TFDS default)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown data set {name!r} (known: {', '.join(BUILDERS)})")
  return BUILDERS[name](
      data_dir=None if data_dir is None else str(pathlib.Path(data_dir).expanduser()), **kwargs
  )
