"""Training: ``python -m midms_jax.train --config=configs/deepfashion.py --workdir=runs/df``.

``config.stage`` picks what trains: ``"midms"`` (fine-tune MIDMs from the pretrained LDM the config
names), ``"ldm"`` (pre-train the LDM itself, ``midms_jax.ldm``) or ``"ldm+midms"`` (both in sequence:
the MIDMs stage starts from the LDM stage's EMA U-Net, read from its export).

The MIDMs stage's workdir receives ``config.json``, ``first_stage/`` (the frozen autoencoder, once),
``checkpoints/<step>/``, TensorBoard events and ``metrics.jsonl`` (one JSON line per logged step); its
layout is ``midms_jax.workdir``'s, which ``translate --workdir`` and ``export`` read. The LDM stage
writes the same into ``<workdir>/ldm/``, and at its end ``<workdir>/ldm/export/ldm.safetensors`` (and
``ldm.ckpt`` where torch is installed): a CompVis LDM checkpoint with the EMA shadows. Paths in
``config.checkpoints`` may start with ``{workdir}``. Running the same command again resumes each stage
from its newest complete checkpoint (a finished stage is not run again); the config must equal the stage's
``config.json`` but for ``workdir.RESUMABLE_FIELDS`` and ``--allow_config_changes`` (``check_resume``). Exit
statuses: 0 done, 2 bad input (one ``error:`` line, found by a preflight that writes nothing), 3 a non-finite
step (nothing non-finite is saved), 143 SIGTERM after its checkpoint (``docs/robustness.md``).

In labelled sections: set-up (multi-host, mesh, config checks that fail before compiling), initial
variables (pretrained PyTorch files named in the config, or random init), checkpoints (orbax; model,
optimiser, spectral-norm state and the data iterator), the stages, and the loop they share: compiled
steps (MIDMs: warm-up and interleaved, switched by the host loop), a progress bar with an ETA, logging
(clu, ``metrics.jsonl``), images, and checkpoint saving (every N steps, at the end, and on SIGTERM).
"""

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import signal
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import app, flags, logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm import tqdm

from midms_jax import (
    cli,
    held_out,
    latent_cache,
    ldm,
    logs,
    optim,
    platform_tuning,
    sharding,
    train_step,
    workdir as workdir_lib,
)
from midms_jax.data import images as images_lib, pipeline
from midms_jax.errors import CheckpointError, InputError, first_line
from midms_jax.interop import torch_export, torch_import
from midms_jax.losses import vgg
from midms_jax.models import build
from midms_jax.midms.model import MIDMs

STAGES = ("midms", "ldm", "ldm+midms")
LDM_DIR = "ldm"  # the LDM stage's workdir, inside the run's
LDM_EXPORT_DIR = "export"  # in LDM_DIR: ldm.safetensors (+ ldm.ckpt with torch)
WORKDIR_PLACEHOLDER = "{workdir}"  # in config.checkpoints paths: the run's workdir


def _define_flags() -> dict[str, flags.FlagHolder]:
  """Command-line flags, defined only when this module is the program (translate.py has its own
  --config)."""
  return dict(
      config=config_flags.DEFINE_config_file(
          "config", None, "config file, e.g. configs/synthetic.py"
      ),
      workdir=flags.DEFINE_string(
          "workdir", None, "where checkpoints, TensorBoard events and the config go"
      ),
      coordinator_address=flags.DEFINE_string(
          "coordinator_address", None, "host:port of process 0 (multi-host off Cloud TPU)"
      ),
      num_processes=flags.DEFINE_integer(
          "num_processes", None, "number of processes (multi-host off Cloud TPU)"
      ),
      process_id=flags.DEFINE_integer(
          "process_id", None, "this process's index (multi-host off Cloud TPU)"
      ),
      allow_config_changes=flags.DEFINE_list(
          "allow_config_changes",
          [],
          "config fields (dotted, comma-separated) that may differ from the "
          "workdir's config.json when resuming, besides those always allowed "
          "(workdir.RESUMABLE_FIELDS)",
      ),
      library_logs=logs.define_flag(),
  )


# Exit statuses of ``python -m midms_jax.train`` (documented in docs/robustness.md).
EXIT_BAD_INPUT = (
    2  # a config, flag, file or checkpoint problem found before (or instead of) training
)
EXIT_DIVERGED = 3  # a non-finite loss, gradient or parameter: nothing non-finite was saved
EXIT_PREEMPTED = 128 + signal.SIGTERM  # SIGTERM: a checkpoint was saved; the same command resumes


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, ...); the message says why and where to resume from."""


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """``jax.distributed.initialize`` from the flags when they name a coordinator; else JAX's own
  detection where the platform starts several processes: a multi-host Cloud TPU slice (several
  TPU_WORKER_HOSTNAMES) or a SLURM job step of several tasks (``srun``, SLURM_NTASKS > 1). A single
  process (one host, all its devices) needs none."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif (
      "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
      or int(os.environ.get("SLURM_NTASKS") or 1) > 1
  ):
    jax.distributed.initialize()


def check_config(config) -> None:
  """Problems found before anything is compiled, one line each."""
  n_devices = jax.device_count()
  if config.stage not in STAGES:
    raise InputError(f"config.stage must be one of {STAGES}, got {config.stage!r}")
  batch_sizes = (
      {"train": config.train.batch_size}
      if config.stage == "midms"
      else {"ldm": config.ldm.batch_size}
  )
  if config.stage == "ldm+midms":
    batch_sizes["train"] = config.train.batch_size
  for section, batch_size in batch_sizes.items():
    if batch_size < 1 or batch_size % n_devices:
      raise InputError(
          f"config.{section}.batch_size={batch_size} must be a positive multiple of the "
          f"{n_devices} "
          "devices"
      )
  for section in batch_sizes:
    _check_loop_settings(config[section], section, midms=section == "train")
  if config.train.fsdp < 1 or n_devices % config.train.fsdp:
    raise InputError(f"config.train.fsdp={config.train.fsdp} must divide the {n_devices} devices")
  for inference in (False, True):  # the training loop, and the one translations of the run will use
    try:
      MIDMs.from_config(config, inference=inference)
    except ValueError as e:
      message = str(e)
      raise InputError(message if message.startswith("config.") else f"config.{message}") from None
  for name in ("midms", "ldm", "first_stage"):
    path = config.checkpoints[name]
    if config.stage == "ldm+midms" and name == "ldm":
      continue  # written by the LDM stage of this run
    if path and not pathlib.Path(path).is_file():
      raise CheckpointError(f"{path}: config.checkpoints.{name} names a file that does not exist")
  if config.stage != "midms" and "://" in config.ldm.latent_cache:
    raise InputError(
        f"config.ldm.latent_cache={config.ldm.latent_cache!r} must be a local directory (the "
        "latents "
        "are memory-mapped)"
    )
  if config.stage == "ldm":
    return
  if config.loss.vgg not in vgg.LOSS_NETWORKS:
    raise InputError(f"config.loss.vgg must be one of {vgg.LOSS_NETWORKS}, got {config.loss.vgg!r}")
  if config.loss.vgg == "vgg19" and not pathlib.Path(config.loss.vgg_checkpoint or "").is_file():
    raise CheckpointError(
        f"{config.loss.vgg_checkpoint or '<empty>'}: config.loss.vgg_checkpoint must name "
        "CoCosNet's vgg19_conv.pth (the VGG19 loss network), or set config.loss.vgg='none'"
    )


def _check_loop_settings(settings, section: str, midms: bool) -> None:
  """Step counts and intervals of one stage (``config.train`` or ``config.ldm``)."""
  name = lambda field: f"config.{section}.{field}={settings[field]}"
  if settings.num_steps < 0 or (not midms and settings.num_steps == 0):
    raise InputError(
        f"{name('num_steps')} must be {'>= 0 (0: epochs x steps per epoch)' if midms else '>= 1'}"
    )
  if midms and settings.num_steps == 0 and settings.epochs < 1:
    raise InputError(f"{name('epochs')} must be >= 1 when config.train.num_steps is 0")
  for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if settings[field] < 1:
      raise InputError(f"{name(field)} must be >= 1")
  if settings.image_every < 0:
    raise InputError(f"{name('image_every')} must be >= 0 (0: no images)")
  if midms and settings.warmup_iter < 0:
    raise InputError(f"{name('warmup_iter')} must be >= 0")


_cache_dir_set_here: str | None = (
    None  # the cache directory use_compilation_cache chose (not the user)
)


def use_compilation_cache(config, workdir: epath.Path) -> str | None:
  """Turns on JAX's persistent compilation cache in ``config.compilation_cache`` (``{workdir}``: the
  run's workdir; "": off) and returns its path, so a resumed or repeated run (a pod slice after
  preemption) loads its compiled steps instead of compiling them again. A cache directory already
  set in JAX's config (the ``JAX_COMPILATION_CACHE_DIR`` environment variable) is kept and
  returned."""
  global _cache_dir_set_here
  current = jax.config.jax_compilation_cache_dir
  if current and current != _cache_dir_set_here:
    return current
  path = config.compilation_cache.replace(WORKDIR_PLACEHOLDER, str(workdir)) or None
  if path != current:
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()  # the next compile opens the new directory
  _cache_dir_set_here = path
  return path


MODEL_PARTS = ("unet", "first_stage", "correspondence")


def pretrained_variables(config) -> dict[str, Any]:
  """The parts of the model that the PyTorch files named in ``config.checkpoints`` hold (later files
  win: LDM, then a standalone first stage, then an official MIDMs file). Each file's keys and
  shapes, and its noise-schedule buffers, are checked against the config when it is read, so a
  mis-shaped file stops the run before any model is built."""
  variables: dict[str, Any] = {}
  ckpt = config.checkpoints
  if ckpt.ldm:
    variables.update(torch_import.load_ldm_checkpoint(ckpt.ldm, config, use_ema=ckpt.use_ema))
  if ckpt.first_stage:
    variables["first_stage"] = torch_import.load_first_stage_checkpoint(
        ckpt.first_stage, config.model.first_stage
    )
  if ckpt.midms:
    variables.update(torch_import.load_midms_checkpoint(ckpt.midms, config))
  return variables


def initial_variables(
    config,
    rng: jax.Array,
    parts: tuple[str, ...] = MODEL_PARTS,
    pretrained: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """``parts`` of the model: from ``pretrained`` (default: ``pretrained_variables(config)``), the
  others randomly initialised (``build.init_variables``; a part's values do not depend on which
  others are built).
  """
  pretrained = pretrained_variables(config) if pretrained is None else pretrained
  missing = tuple(part for part in parts if part not in pretrained)
  variables = build.init_variables(config.model, rng, missing) if missing else {}
  variables.update({part: pretrained[part] for part in parts if part in pretrained})
  return variables


def vgg_variables(config) -> dict[str, Any]:
  """The loss network's variables (``config.loss.vgg``; empty for "none")."""
  return vgg.load_loss_network(config.loss)


def total_steps(config, steps_per_epoch: int) -> int:
  return config.train.num_steps or config.train.epochs * steps_per_epoch


def _on_every_process(value: bool) -> bool:
  """Process 0's answer everywhere, so that every process takes the same branch around collective
  saves."""
  if jax.process_count() == 1:
    return value
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: epath.Path, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True
  )
  handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(
      workdir / workdir_lib.CHECKPOINTS_DIR, options=options, item_handlers=handlers
  )


# one boolean for a whole state, computed where its leaves are
all_finite = jax.jit(train_step.all_finite)


@jax.jit
def first_non_finite_step(first: jax.Array, finite: jax.Array, step: jax.Array) -> jax.Array:
  """The step at which the run first reported a non-finite value (0 while none has): updated on the
  device every step, read by the host only where it already waits for the device (logging,
  saving)."""
  return jnp.where((first == 0) & ~finite, step, first)


def save_checkpoint(
    manager: ocp.CheckpointManager, state, iterator, *, force: bool = False
) -> bool:
  """Saves ``state`` and the data iterator's position; refuses (``TrainingError``) a state with a
  non-finite value, so that no checkpoint on disk ever holds one."""
  step = int(jax.device_get(state.step))
  if not bool(jax.device_get(all_finite(state))):
    raise TrainingError(
        f"refusing to save step {step} to {manager.directory}: the state holds non-finite values"
    )
  data = json.loads(pipeline.state_to_bytes(iterator.get_state()).decode())
  return manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
      force=force,
  )


# Storage errors that say nothing about a checkpoint's own files (tensorstore reports them in its
# messages): such a checkpoint is not set aside, the run stops and can be started again.
_TRANSIENT_STATUS = (
    "PERMISSION_DENIED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "UNAUTHENTICATED",
    "CANCELLED",
)


def _is_transient(error: BaseException) -> bool:
  if isinstance(error, OSError) and not isinstance(
      error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)
  ):
    return True
  return any(status in str(error) for status in _TRANSIENT_STATUS)


def _shape_mismatch(metadata: Any, abstract_state) -> str | None:
  """How checkpoint ``metadata`` (orbax's tree of ArrayMetadata) differs from the state the config
  builds, in a few words (None when it matches): such a checkpoint is sound, it belongs to another
  config."""
  is_leaf = lambda m: hasattr(m, "shape") and hasattr(m, "name")
  tree = getattr(metadata, "tree", metadata)
  stored = {m.name: m for m in jax.tree_util.tree_leaves(tree, is_leaf=is_leaf) if is_leaf(m)}
  expected = ocp.tree.to_flat_dict(abstract_state, sep=".")
  for name in sorted(
      stored.keys() & expected.keys(), key=lambda n: (not n.startswith("params."), n)
  ):
    if tuple(stored[name].shape) != tuple(expected[name].shape):
      return f"{name} is {tuple(stored[name].shape)} in the checkpoint, {tuple(expected[name].shape)} in the config"
  only_stored, only_expected = sorted(stored.keys() - expected.keys()), sorted(
      expected.keys() - stored.keys()
  )
  if only_stored or only_expected:
    example = lambda names: f", e.g. {min(names, key=len)}" if names else ""
    return (
        f"{len(only_stored)} arrays only in the checkpoint{example(only_stored)}; "
        f"{len(only_expected)} only in "
        f"the config's{example(only_expected)}"
    )
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int, reason: str) -> None:
  directory = epath.Path(manager.directory)
  if jax.process_index() == 0:
    (directory / str(step)).rename(directory / f"damaged-{step}")
  multihost_utils.sync_global_devices(f"moved damaged checkpoint {step}")
  logging.warning(
      "checkpoint %d in %s is unreadable (%s); moved to damaged-%d, trying an older one",
      step,
      directory,
      reason,
      step,
  )
  manager.reload()


@contextlib.contextmanager
def _reading_checkpoint(path: epath.Path):
  """Orbax's errors while reading checkpoint ``path``: a storage error is a ``CheckpointError``
  (nothing is changed), anything else says that the files themselves cannot be decoded
  (``_Damaged``)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many types for damaged files
    if _is_transient(e):
      raise CheckpointError(
          f"{path}: could not be read ({first_line(e)}); nothing was changed, run again"
      ) from None
    raise _Damaged(first_line(e)) from None


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Checkpoint ``step``: its metadata is compared with ``abstract_state`` before any array is read.
  A mismatch or a storage error is a ``CheckpointError`` (the files stay as they are); files that
  cannot be decoded are ``_Damaged``."""
  path = epath.Path(manager.directory) / str(step)
  with _reading_checkpoint(path):
    metadata = manager.item_metadata(step)["state"]
  if metadata is None:
    raise _Damaged("its metadata is missing")
  mismatch = _shape_mismatch(metadata, abstract_state)
  if mismatch:
    raise CheckpointError(
        f"{path}: holds another model or optimiser than the config builds ({mismatch}); "
        "use the run's own config or a new --workdir"
    )
  with _reading_checkpoint(path):
    return manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )


class _Damaged(Exception):
  """A checkpoint's own files cannot be decoded (truncated, overwritten, missing)."""


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, iterator):
  """Newest complete checkpoint -> (state, step), or (None, 0) when there is none.

  A checkpoint whose files cannot be decoded is renamed to ``damaged-<step>`` with a warning, and
  the next older one is tried. One that belongs to another config, one that storage failed to
  deliver, and one that holds non-finite values stop the run (``CheckpointError``) with every file
  left in place; so does a workdir whose every checkpoint was damaged (it never silently starts
  again from step 0).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      restored = _restore(manager, step, abstract_state)
    except _Damaged as e:
      _set_aside(manager, step, str(e))
      continue
    if not bool(jax.device_get(all_finite(restored.state))):
      raise CheckpointError(
          f"{epath.Path(manager.directory) / str(step)}: holds non-finite values (saved before "
          "checkpoints were checked); delete it to resume from the one before"
      )
    iterator.set_state(pipeline.state_from_bytes(json.dumps(restored.data).encode()))
    return restored.state, step
  directory = epath.Path(manager.directory)
  if _on_every_process(any(p.name.startswith("damaged-") for p in directory.iterdir())):
    raise CheckpointError(
        f"{directory}: every checkpoint is damaged (set aside as damaged-<step>); to start again "
        "from step 0, remove them or use a new --workdir"
    )
  return None, 0


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


def image_grid(batch, outputs, data_name: str, n: int = 4) -> np.ndarray:
  """Rows = the first ``n`` samples of this host's ``batch`` (the first rows of the global batch,
  whose ``outputs`` are given); columns = condition (``held_out.condition_rgb``) | exemplar |
  initial warp | output | ground truth, in [0, 1]."""
  n = min(n, len(batch["image"]))
  to01 = lambda x: np.clip((np.asarray(x[:n]) + 1) / 2, 0, 1)
  columns = [
      held_out.condition_rgb(np.asarray(batch["label"][:n]), data_name),
      to01(batch["ref"]),
      to01(outputs["initial_warp"]),
      to01(outputs["warped_ref"]),
      to01(batch["image"]),
  ]
  return images_lib.tile_columns(columns)[None]


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Preemption:
  requested: bool = False


@contextlib.contextmanager
def _sigterm_requests():
  """A flag that SIGTERM (preemption) sets while training runs; the previous handler is restored
  after. Outside the main thread, where Python cannot install handlers, the flag stays unset."""
  flag = _Preemption()
  if threading.current_thread() is not threading.main_thread():
    logging.warning("training outside the main thread: SIGTERM will not save a checkpoint")
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: setattr(flag, "requested", True))
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


@dataclasses.dataclass
class _Stage:
  """One stage as the shared loop runs it."""

  name: str  # "ldm" or "midms": progress bar and log lines
  workdir: epath.Path
  config: Any
  state: Any  # initial state (replaced by a restored checkpoint)
  frozen: Any  # what the steps read but never update
  num_steps: int
  intervals: Any  # log_every, image_every, checkpoint_every, keep_checkpoints
  run_step: Callable  # (step index, state, frozen, batch) -> (state, metrics)
  draw: Callable  # (state, frozen, host batch, global batch) -> image grid (1, H, W, 3)
  image_name: str
  shardings: Callable = train_step.state_shardings  # (state, mesh) -> the state's NamedShardings
  phase: Callable = lambda step: ""  # a word for the log line of this step


def _with_workdir(config, workdir: epath.Path):
  """A copy of ``config`` with ``{workdir}`` in ``config.checkpoints`` paths replaced by
  ``workdir``."""
  config = config.copy_and_resolve_references()
  for name in ("ldm", "first_stage", "midms"):
    config.checkpoints[name] = config.checkpoints[name].replace(WORKDIR_PLACEHOLDER, str(workdir))
  return config


def _from_ldm_stage(config, workdir: epath.Path):
  """The MIDMs stage's config of an ``ldm+midms`` run: it starts from the LDM stage's export (EMA
  weights)."""
  config = config.copy_and_resolve_references()
  config.checkpoints.ldm = str(ldm_export_dir(workdir) / "ldm.safetensors")
  config.checkpoints.use_ema = True
  return config


def ldm_export_dir(workdir: epath.Path) -> epath.Path:
  """Where the LDM stage of the run in ``workdir`` exports its result."""
  return workdir / LDM_DIR / LDM_EXPORT_DIR


def _data(config, batch_size: int):
  """This host's training iterator and the steps per epoch of ``batch_size`` global examples."""
  process = jax.process_index()
  dataset = pipeline.make_dataset(
      config.data,
      "train",
      seed=config.train.seed,
      batch_size=batch_size // jax.process_count(),
      shard_index=process,
      shard_count=jax.process_count(),
      train=True,
      worker_count=config.data.worker_count,
  )
  return iter(dataset), max(1, len(pipeline.make_source(config.data, "train")) // batch_size)


def _first_stage(workdir: epath.Path, variables: dict[str, Any]) -> Any:
  """The run's frozen first stage: the one saved in ``workdir`` when resuming, else ``variables``'
  (saved)."""
  if _on_every_process((workdir / workdir_lib.FIRST_STAGE_DIR).exists()):
    return workdir_lib.restore_first_stage(workdir)
  workdir_lib.save_first_stage(workdir, variables["first_stage"])
  return variables["first_stage"]


def _run(stage: _Stage, iterator, mesh) -> dict[str, float]:
  """The training loop both stages share: restore, steps, progress, logs, images, checkpoints,
  SIGTERM.

  Every step reports on the device whether its loss, gradient norm and new parameters are finite
  (``metrics["finite"]``); the host reads the first step that was not where it waits anyway
  (logging, saving) and stops there: every checkpoint it writes is verified finite.
  """
  process, workdir, intervals = jax.process_index(), stage.workdir, stage.intervals
  manager = checkpoint_manager(workdir, intervals.keep_checkpoints)
  state = stage.state
  restored, start = restore_checkpoint(
      manager, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state), iterator
  )
  if restored is not None:
    state = restored
    logging.info("%s: resumed from step %d in %s", stage.name, start, manager.directory)
  if process == 0:
    workdir_lib.write_config(workdir, stage.config)
  shardings = stage.shardings(state, mesh)
  state, frozen = jax.device_put(state, shardings), sharding.replicate(stage.frozen, mesh)
  run_step = stage.run_step(shardings)

  writer = metric_writers.create_default_writer(str(workdir), just_logging=process > 0)
  hooks = [periodic_actions.ReportProgress(num_train_steps=stage.num_steps, writer=writer)]
  if process == 0 and stage.config.train.profile:
    hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=str(workdir)))
  last_good = start if restored is not None else None  # the newest checkpoint verified finite
  first_bad = sharding.replicate(np.int32(0), mesh)
  metrics_np: dict[str, float] = {}
  stop = False
  bar = tqdm(
      total=stage.num_steps,
      initial=start,
      desc=stage.name,
      unit="step",
      file=sys.stderr,
      disable=process > 0 or start >= stage.num_steps,
      dynamic_ncols=True,
      mininterval=1.0,
  )

  def stop_if_diverged(bad: int) -> None:
    if bad:
      manager.wait_until_finished()
      newest = (
          f"the newest checkpoint verified finite is step {last_good} in {manager.directory}"
          if last_good is not None
          else f"no checkpoint in {manager.directory} is verified finite"
      )
      raise TrainingError(
          f"{stage.name}: non-finite loss, gradient or parameters at step {bad}; {newest}"
      )

  with _sigterm_requests() as preemption, bar:
    for step in range(start, stage.num_steps):
      host_batch = next(iterator)
      batch = sharding.global_batch(mesh, host_batch)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = run_step(step, state, frozen, batch)
      done = step + 1
      first_bad = first_non_finite_step(first_bad, metrics.pop("finite"), np.int32(done))
      for hook in hooks:
        hook(done)
      bar.update(1)
      if done % intervals.log_every == 0 or done == stage.num_steps:
        scalars, bad = jax.device_get(
            ({k: v for k, v in metrics.items() if np.ndim(v) == 0}, first_bad)
        )
        stop_if_diverged(int(bad))
        metrics_np = {k: float(v) for k, v in scalars.items()}
        writer.write_scalars(done, metrics_np)
        if process == 0:
          with (workdir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(dict(step=done, **metrics_np)) + "\n")
        _warn_on_collapse(metrics_np, stage.config, done)
        bar.set_postfix(loss=f"{metrics_np['loss_total']:.4f}", refresh=False)
        logging.info(
            "%s step %d/%d %s loss %.5f",
            stage.name,
            done,
            stage.num_steps,
            stage.phase(step),
            metrics_np["loss_total"],
        )
      if intervals.image_every and done % intervals.image_every == 0:
        grid = stage.draw(state, frozen, host_batch, batch)
        if process == 0:
          writer.write_images(done, {stage.image_name: grid})
      stop = _on_every_process(preemption.requested)  # every host stops after the same step
      if done % intervals.checkpoint_every == 0 or done == stage.num_steps or stop:
        stop_if_diverged(int(jax.device_get(first_bad)))
        save_checkpoint(manager, state, iterator, force=stop)
        last_good = done
      if stop:
        break
  manager.wait_until_finished()
  writer.flush()
  if stop:
    raise Preempted(
        f"SIGTERM: saved step {done} of the {stage.name} stage in {manager.directory}, stopping "
        f"(exit status {EXIT_PREEMPTED}); the same command resumes",
        metrics_np,
    )
  stage.state = state
  return metrics_np


class Preempted(Exception):
  """SIGTERM stopped training after saving a checkpoint (not an error: the same command resumes).
  ``metrics``: the last logged ones."""

  def __init__(self, message: str, metrics: dict[str, float]):
    super().__init__(message)
    self.metrics = metrics


def _start(workdir: epath.Path) -> None:
  """Creates the stage's workdir; its ``config.json`` is written once a checkpoint was restored (or
  there was none), so that a refused resume leaves the recorded identity as it was."""
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)


def train_midms(
    config, workdir: epath.Path, mesh, pretrained: dict[str, Any] | None = None
) -> dict[str, float]:
  """The MIDMs stage (official fine-tuning: warm-up, then the interleaved loop). ``pretrained``: the
  variables of the files ``config.checkpoints`` names, when already read
  (``pretrained_variables``)."""
  iterator, steps_per_epoch = _data(config, config.train.batch_size)
  model = MIDMs.from_config(config)
  variables = initial_variables(
      config, jax.random.PRNGKey(config.train.seed), pretrained=pretrained
  )
  _start(workdir)
  variables["first_stage"] = _first_stage(workdir, variables)
  frozen = train_step.frozen_variables(variables, vgg_variables(config))
  state = train_step.create_train_state(
      variables, optim.make_optimizer(config.train, freeze_unet=True)
  )
  del variables

  def run_step(shardings):
    steps = train_step.make_train_steps(
        model, config, steps_per_epoch, mesh, state_sharding=shardings
    )
    return lambda step, state, frozen, batch: (
        (steps.warmup if step < config.train.warmup_iter else steps.main)(state, frozen, batch)
    )

  # Every process runs the preview (it is one program over the whole mesh); its outputs are
  # replicated so that process 0 can draw them beside its own part of the batch (the first rows of
  # the global batch).
  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
  def preview(state, frozen, batch):
    variables = train_step.model_variables(state, frozen)
    out, _ = model.train_forward(
        variables, batch, jax.random.PRNGKey(0), warmup=False, update_stats=False
    )
    return dict(
        warped_ref=out["warped_ref"], initial_warp=model.decode(variables, out["warped_ref_feat"])
    )

  stage = _Stage(
      name="midms",
      workdir=workdir,
      config=config,
      state=state,
      frozen=frozen,
      num_steps=total_steps(config, steps_per_epoch),
      intervals=config.train,
      run_step=run_step,
      draw=lambda state, frozen, host_batch, batch: image_grid(
          host_batch, jax.device_get(preview(state, frozen, batch)), config.data.name
      ),
      image_name="condition|exemplar|warp|output|gt",
      phase=lambda step: "warm-up" if step < config.train.warmup_iter else "interleaved",
  )
  return _run(stage, iterator, mesh)


def train_ldm(
    config, workdir: epath.Path, mesh, pretrained: dict[str, Any] | None = None
) -> dict[str, float]:
  """The LDM stage (``midms_jax.ldm``); exports ``ldm.safetensors`` (+ ``ldm.ckpt``) when it
  ends."""
  model = MIDMs.from_config(config)
  variables = initial_variables(
      config,
      jax.random.PRNGKey(config.train.seed),
      parts=("unet", "first_stage"),
      pretrained=pretrained,
  )
  _start(workdir)
  first_stage = _first_stage(workdir, variables)
  if config.ldm.latent_cache:
    encode = jax.jit(
        lambda images, index: model.encode(
            {"first_stage": first_stage},
            images,
            jax.random.fold_in(jax.random.PRNGKey(config.train.seed), index),
        )
    )
    iterator = iter(
        latent_cache.make_dataset(config, latent_cache.load_or_build(config, encode, first_stage))
    )
  else:
    iterator, _ = _data(config, config.ldm.batch_size)
  state = ldm.create_state(variables["unet"]["params"], ldm.make_optimizer(config.ldm))
  del variables
  preview = jax.jit(
      ldm.make_preview(model, config.ldm.preview_t),
      out_shardings=NamedSharding(mesh, PartitionSpec()),
  )

  def run_step(shardings):
    step_fn = ldm.make_step(model, config, mesh, state_sharding=shardings)
    return lambda step, state, frozen, batch: step_fn(state, frozen, batch)

  stage = _Stage(
      name="ldm",
      workdir=workdir,
      config=config,
      state=state,
      frozen=dict(first_stage=first_stage),
      num_steps=config.ldm.num_steps,
      intervals=config.ldm,
      run_step=run_step,
      draw=lambda state, frozen, host_batch, batch: ldm.image_grid(
          jax.device_get(preview(state, frozen, batch))
      ),
      image_name="image|noised|denoised",
      shardings=ldm.state_shardings,
  )
  metrics = _run(stage, iterator, mesh)
  export_ldm(config, workdir, stage.state, first_stage)
  return metrics


def export_ldm(config, workdir: epath.Path, state: ldm.LDMState, first_stage: Any) -> epath.Path:
  """Writes ``<workdir>/export/ldm.safetensors`` (and ``ldm.ckpt`` where torch is installed): the
  LDM stage's U-Net, its EMA shadows and the first stage in CompVis' key layout (process 0; the
  others wait)."""
  out = workdir / LDM_EXPORT_DIR
  host = ldm.exported_variables(state, jax.device_get(first_stage), config.ldm.ema_decay)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    state_dict = torch_export.ldm_state_dict(host, config)
    torch_export.save_safetensors(out / "ldm.safetensors", state_dict)
    if importlib.util.find_spec("torch") is not None:
      torch_export.save_ldm_ckpt(
          out / "ldm.ckpt", state_dict, global_step=int(host["ema_counters"]["num_updates"])
      )
    logging.info("ldm: exported step %d to %s", int(host["ema_counters"]["num_updates"]), out)
  multihost_utils.sync_global_devices("ldm export written")
  return out


@dataclasses.dataclass(frozen=True)
class _Planned:
  """A stage of the run as ``train_and_evaluate`` will start it."""

  name: str  # "ldm" or "midms"
  workdir: epath.Path  # where it writes (its config.json is the stage's identity)
  config: Any  # the config it runs and records


def plan_stages(config, workdir: epath.Path) -> list[_Planned]:
  """The stages ``config.stage`` runs, in order, each with its workdir and the config it records
  there."""
  config = _with_workdir(config, workdir)
  stages = []
  if config.stage in ("ldm", "ldm+midms"):
    stages.append(_Planned("ldm", workdir / LDM_DIR, config))
  if config.stage == "ldm+midms":
    stages.append(_Planned("midms", workdir, _from_ldm_stage(config, workdir)))
  elif config.stage == "midms":
    stages.append(_Planned("midms", workdir, config))
  return stages


def check_resume(
    stages: list[_Planned], run_workdir: epath.Path, allowed: tuple[str, ...] = ()
) -> None:
  """A workdir's ``config.json`` is its run's identity: resuming with a config that differs from it
  in any field outside ``workdir.RESUMABLE_FIELDS`` and ``allowed`` stops (``InputError``) before
  anything is read or written. Allowed differences are logged; paths that moved with a copied or
  moved ``run_workdir`` are none."""
  for stage in stages:
    if not _on_every_process((stage.workdir / workdir_lib.CONFIG_FILE).exists()):
      continue
    recorded = workdir_lib.read_config(stage.workdir)
    changes = workdir_lib.config_differences(recorded, stage.config, run_workdir)
    refused = sorted(
        f for f in changes if not workdir_lib.resumable(f, workdir_lib.RESUMABLE_FIELDS + allowed)
    )
    if refused:
      shown = ", ".join(f"{f} ({changes[f][0]!r} -> {changes[f][1]!r})" for f in refused[:4])
      more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
      raise InputError(
          f"{stage.workdir / workdir_lib.CONFIG_FILE}: this run was started with another config: "
          f"{shown}{more}; use a new --workdir, or resume with "
          f"--allow_config_changes={','.join(refused)} to train on with the new values"
      )
    for field, (old, new) in changes.items():
      logging.info("%s: resuming with %s = %r (was %r)", stage.name, field, new, old)


def check_data(config) -> None:
  """The training split exists (and, when the run ends by scoring held-out pairs, enough of
  those)."""
  try:
    pipeline.make_source(config.data, "train")
    pairs = config.evaluate.results_pairs if config.stage != "ldm" else 0
    if pairs > 0:
      available = len(pipeline.make_source(config.data, config.evaluate.split))
      if pairs > available:
        raise InputError(
            f"config.evaluate.results_pairs={pairs}, but the {config.evaluate.split} split has "
            f"{available} records"
        )
  except (ValueError, NotImplementedError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(first_line(e)) from None


def check_workdir(workdir: epath.Path) -> None:
  """A local workdir can be created and written (before anything is computed)."""
  if "://" in str(workdir):
    return
  existing = pathlib.Path(workdir)
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise InputError(f"{workdir}: --workdir lies under {existing}, which is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise InputError(f"{workdir}: --workdir is not writable ({existing} does not allow it)")


def train_and_evaluate(
    config, workdir: str | os.PathLike, allow_config_changes: tuple[str, ...] = ()
) -> dict[str, float]:
  """Runs ``config.stage`` to its last step; returns the last logged metrics (of the last stage that
  ran).

  First a preflight, which reads but writes nothing: config values, the workdir, the resume contract
  (``check_resume``; ``allow_config_changes``), the data, and the pretrained files the first stage
  starts from (their keys and shapes). A stage whose checkpoint already holds its last step is not
  run again: with ``ldm+midms`` a resumed run continues where it stopped, in whichever stage.
  SIGTERM saves a checkpoint and raises ``Preempted``; a non-finite step raises ``TrainingError``.
  """
  workdir = workdir_lib.as_path(workdir)
  check_config(config)
  check_workdir(workdir)
  stages = plan_stages(config, workdir)
  check_resume(stages, workdir, tuple(allow_config_changes))
  check_data(config)
  pending = [s for s in stages if not (s.name == "ldm" and _ldm_stage_done(s))]
  pretrained = pretrained_variables(pending[0].config) if pending else None
  logging.info("compilation cache: %s", use_compilation_cache(config, workdir) or "off")
  # The first cross-host collective sets up the CPU collectives' (gloo) context, which waits only 30
  # s for the other hosts: run one now, while the hosts are in step after
  # jax.distributed.initialize.
  _on_every_process(True)
  mesh = sharding.data_mesh(fsdp=config.train.fsdp)
  metrics: dict[str, float] = {}
  for stage in pending:
    train = train_ldm if stage.name == "ldm" else train_midms
    metrics = train(
        stage.config, stage.workdir, mesh, pretrained=pretrained if stage is pending[0] else None
    )
  if config.stage != "ldm" and config.evaluate.results_pairs:
    write_held_out_results(workdir)
  return metrics


def _ldm_stage_done(stage: _Planned) -> bool:
  """The LDM stage reached its last step and exported (a resumed ``ldm+midms`` run goes on with
  MIDMs)."""
  export = stage.workdir / LDM_EXPORT_DIR / "ldm.safetensors"
  return _on_every_process(export.exists()) and workdir_lib.checkpoint_steps(stage.workdir)[
      -1:
  ] == [stage.config.ldm.num_steps]


def write_held_out_results(workdir: epath.Path) -> None:
  """``results.json`` and ``samples.png`` of the run's newest checkpoint
  (``midms_jax.held_out``)."""
  if jax.process_count() > 1:
    logging.warning(
        "held-out results are computed by single-process runs only: skipped (run "
        "python -m midms_jax.evaluate on one host)"
    )
    return
  trained = workdir_lib.load_trained(workdir)
  logging.info(
      "scoring %d held-out pairs of step %d", trained.config.evaluate.results_pairs, trained.step
  )
  scores = held_out.write(workdir, trained.config, trained.variables, trained.step)
  logging.info("held-out results: %s", json.dumps(scores))


def _warn_on_collapse(metrics: dict[str, float], config, step: int) -> None:
  """Identity-mapping collapse: the output copies the exemplar instead of following the
  condition."""
  to_exemplar, to_gt = metrics.get("monitor/output_to_exemplar_l1"), metrics.get(
      "monitor/output_to_gt_l1"
  )
  if to_exemplar is not None and to_gt and to_exemplar < config.train.collapse_ratio * to_gt:
    logging.warning(
        "step %d: the output is much closer to the exemplar (L1 %.4f) than to the ground truth "
        "(L1 %.4f): possible collapse into identity mapping",
        step,
        to_exemplar,
        to_gt,
    )


def main(argv, flag_holders: dict[str, flags.FlagHolder]) -> None:
  logs.configure(library_logs=flag_holders["library_logs"].value)
  cli.ignore_closed_loop_callbacks()  # orbax's noise after a damaged checkpoint's failed read
  try:
    if len(argv) > 1:
      raise InputError(f"unexpected arguments {' '.join(argv[1:])} (all inputs are --flags)")
    if not flag_holders["workdir"].value:
      raise InputError("--workdir is required (where checkpoints, logs and config.json go)")
    config = cli.config_value(flag_holders["config"], required=True)
    initialize_distributed(
        flag_holders["coordinator_address"].value,
        flag_holders["num_processes"].value,
        flag_holders["process_id"].value,
    )
    for warning in platform_tuning.slow_flag_warnings(
        os.environ.get("XLA_FLAGS", ""), jax.default_backend()
    ):
      logging.warning(warning)
    train_and_evaluate(
        config, flag_holders["workdir"].value, tuple(flag_holders["allow_config_changes"].value)
    )
  except (InputError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  except TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)
  except Preempted as e:
    logging.warning("%s", e)
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  _FLAGS = _define_flags()
  app.run(
      lambda argv: main(argv, _FLAGS), flags_parser=lambda argv: cli.parse_flags(flags.FLAGS, argv)
  )
