"""Prepare a benchmark data set for training: the official folder -> TFDS array_record files.

  python -m midms_jax.data.prepare --dataset=celebahq --manual_dir=/data/CelebAMask-HQ --data_dir=/data/tfds

``--manual_dir`` is the data set's folder in the official CoCosNet / MIDMs layout (see
``midms_jax/data/builders.py``); the exemplar lists are read from it (``<dataset>_ref.txt``,
``<dataset>_ref_test.txt``) unless ``--ref_list`` / ``--ref_test_list`` name them. The data set is written
to ``<data_dir>/<dataset>/<version>/`` (default ``data_dir``: TFDS's, ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``); point ``config.data.data_dir`` there. Every file is checked (decoded) first,
with a progress bar, then the records are written; at the end a summary: records per split and the
skipped files with their reasons. When stderr is not a terminal (a log file, a pipe) the progress
bars, TFDS's included, give way to a plain line per stage (checking, then writing each split).

Records are written in the official loader's order (``builders.py``: CelebA-HQ and LSUN church
natural-sorted, DeepFashion in list order; LSUN church training from ``training/files.list`` when
it exists), so a record's index in its split, by which ``evaluate`` names its outputs, is its index
in the official data set. LSUN label maps hold ids 0..150 or 255 (read as 150), as officially.

Bad data stops the run with exit status 2 and one ``error:`` line naming the file, and so do an
empty or missing ``--manual_dir`` and a ``--data_dir`` that cannot be written; a failed build
leaves no empty folders behind. ``--skip_bad`` skips bad records instead (and those that use them
as exemplars) and lists them, with a note that the records after them have lower indices than in
the official data set. A data set already prepared in ``data_dir`` is kept (its summary is
printed) unless ``--overwrite`` is given. ``--library_logs`` shows TFDS's INFO lines.
"""

import contextlib
import pathlib
import sys
import tempfile
from typing import Iterator, Sequence

import tensorflow_datasets as tfds
from absl import flags

from midms_jax import cli, logs
from midms_jax.data import builders
from midms_jax.errors import InputError

SKIPPED_SHOWN = 20  # skipped records listed in the summary (all of them are in metadata.json)
LAYOUTS = {  # what --manual_dir holds (builders.py has the details)
    "celebahq": f"train.txt, val.txt, {builders.CELEBAHQ_IMAGES}/ and {builders.CELEBAHQ_MASKS}/",
    "deepfashion": "train.txt, val.txt, img/ and pose/",
    "lsun_church": "training/ and validation/ with <name>.jpg photos and <name>.png label maps",
}

FLAGS = flags.FlagValues()
_DATASET = flags.DEFINE_enum(
    "dataset", None, list(builders.BUILDERS), "The data set to prepare.", flag_values=FLAGS
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "The data set's folder, in the official layout.", flag_values=FLAGS
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    "",
    "Where to write it ('' = TFDS's default folder); " "config.data.data_dir.",
    flag_values=FLAGS,
)
_REF_LIST = flags.DEFINE_string(
    "ref_list",
    "",
    "Training exemplar list (default: <manual_dir>/<dataset>_ref.txt).",
    flag_values=FLAGS,
)
_REF_TEST_LIST = flags.DEFINE_string(
    "ref_test_list",
    "",
    "Test exemplar list (default: " "<manual_dir>/<dataset>_ref_test.txt).",
    flag_values=FLAGS,
)
_SKIP_BAD = flags.DEFINE_bool(
    "skip_bad",
    False,
    "Skip bad records (and those using them as exemplars) instead "
    "of stopping; the summary lists them.",
    flag_values=FLAGS,
)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of DeepFashion's random hard exemplars.", flag_values=FLAGS
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Rebuild a data set already prepared in --data_dir.", flag_values=FLAGS
)
_LIBRARY_LOGS = logs.define_flag(FLAGS)


@contextlib.contextmanager
def _tfds_progress_bars(enabled: bool) -> Iterator[None]:
  """TFDS's (nested) progress bars on or off meanwhile: on, they would write their cursor movements
  into a log file or pipe."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=import-outside-toplevel

  was = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(enabled)
  try:
    yield
  finally:
    tfds.display_progress_bar(was)


def prepare(
    name: str,
    manual_dir: str | pathlib.Path,
    data_dir: str | pathlib.Path | None = None,
    *,
    ref_list: str | pathlib.Path | None = None,
    ref_test_list: str | pathlib.Path | None = None,
    skip_bad: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> tuple[builders.BenchmarkBuilder, bool]:
  """Builds data set ``name`` from ``manual_dir`` into ``data_dir``; returns the builder and whether
  it built (False: it was already prepared and ``overwrite`` is off). InputError for bad input (one
  line). ``progress``: progress bars (default: when stderr is a terminal), else a plain line per
  stage."""
  manual_dir = pathlib.Path(manual_dir).expanduser()
  if not manual_dir.is_dir():
    what = "not a folder" if manual_dir.exists() else "no such folder"
    raise InputError(
        f"{manual_dir}: {what} (--manual_dir: the {name} folder in the official " "layout)"
    )
  if not any(manual_dir.iterdir()):  # TFDS would fail an assertion
    raise InputError(
        f"{manual_dir}: empty folder (--manual_dir: the {name} folder in the official "
        f"layout, holding {LAYOUTS[name]})"
    )
  if data_dir:
    cli.check_writable(data_dir, "--data_dir", folder=True)
  builder = builders.builder(
      name, data_dir, ref_list=ref_list, ref_test_list=ref_test_list, skip_bad=skip_bad, seed=seed
  )
  if builder.info.splits and not overwrite:
    return builder, False
  progress = sys.stderr.isatty() if progress is None else progress
  builder.progress = progress
  modes = tfds.download.GenerateMode
  config = tfds.download.DownloadConfig(
      manual_dir=str(manual_dir),
      download_mode=modes.REUSE_CACHE_IF_EXISTS if overwrite else modes.REUSE_DATASET_IF_EXISTS,
  )
  version_dir = pathlib.Path(builder.data_dir)  # <data_dir>/<name>/<version>
  created = [
      p for p in (version_dir, version_dir.parent, version_dir.parent.parent) if not p.exists()
  ]
  with (
      tempfile.TemporaryDirectory(prefix="midms-prepare-") as downloads,  # TFDS wants one
      _tfds_progress_bars(progress),
  ):
    try:
      builder.download_and_prepare(download_dir=downloads, download_config=config)
    except BaseException:
      _remove_empty_folders(created)  # a failed build leaves nothing behind
      raise
  return builder, True


def _remove_empty_folders(folders: Sequence[pathlib.Path]) -> None:
  """Removes ``folders`` (deepest first) where they are empty."""
  for path in folders:
    try:
      path.rmdir()  # only an empty folder
    except FileNotFoundError:
      continue
    except OSError:
      return


def summary(builder: builders.BenchmarkBuilder, built: bool) -> str:
  """Records per split and the skipped records with their reasons (from the data set's metadata)."""
  info = builder.info
  head = "prepared" if built else "already prepared (pass --overwrite to rebuild it):"
  lines = [f"{head} {builder.name} {info.version} in {builder.data_dir}"]
  for split in builders.SPLITS:
    if split in info.splits:
      note = " (only used as exemplars)" if split == builders.SPLITS[2] else ""
      lines.append(f"  {split:<10} {info.splits[split].num_examples:>8} records{note}")
  skipped = list(info.metadata.get("skipped", []))
  if skipped:
    lines.append(f"skipped {len(skipped)} record(s):")
    lines += [f"  {s['split']}: {s['reason']}" for s in skipped[:SKIPPED_SHOWN]]
    if len(skipped) > SKIPPED_SHOWN:
      lines.append(
          f"  ... and {len(skipped) - SKIPPED_SHOWN} more (all in {builder.data_dir}/metadata.json)"
      )
    lines.append(
        "note: records after a skipped one have lower indices than in the official data "
        "set (evaluate names its files by index)"
    )
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  logs.configure(library_logs=_LIBRARY_LOGS.value)
  if len(argv) > 1:
    print(
        f"error: unexpected arguments {' '.join(argv[1:])} (all inputs are --flags)",
        file=sys.stderr,
    )
    return 2
  try:
    if not _DATASET.value or not _MANUAL_DIR.value:
      raise InputError("--dataset and --manual_dir are required")
    builder, built = prepare(
        _DATASET.value,
        _MANUAL_DIR.value,
        _DATA_DIR.value or None,
        ref_list=_REF_LIST.value or None,
        ref_test_list=_REF_TEST_LIST.value or None,
        skip_bad=_SKIP_BAD.value,
        seed=_SEED.value,
        overwrite=_OVERWRITE.value,
    )
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(
        f"error: {e.filename or _DATA_DIR.value}: writing the data set failed: {e.strerror or e}",
        file=sys.stderr,
    )
    return 2
  print(summary(builder, built))
  return 0


def run(argv: Sequence[str]) -> int:
  """In-process entry point (tests, notebooks): ``argv`` with the program name first; returns the
  exit status."""
  return cli.run_in_process(FLAGS, main, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(run(sys.argv))
