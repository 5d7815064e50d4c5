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
from its newest complete checkpoint (a finished stage is not run again).

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

from midms_jax import held_out, latent_cache, ldm, optim, train_step, workdir as workdir_lib, xla_flags
from midms_jax.data import images as images_lib, pipeline
from midms_jax.errors import CheckpointError, InputError, first_line
from midms_jax.interop import torch_export, torch_import
from midms_jax.losses import vgg
from midms_jax.models import build
from midms_jax.models.midms import MIDMs

STAGES = ("midms", "ldm", "ldm+midms")
LDM_DIR = "ldm"                   # the LDM stage's workdir, inside the run's
LDM_EXPORT_DIR = "export"         # in LDM_DIR: ldm.safetensors (+ ldm.ckpt with torch)
WORKDIR_PLACEHOLDER = "{workdir}"  # in config.checkpoints paths: the run's workdir


def _define_flags() -> dict[str, flags.FlagHolder]:
  """Command-line flags, defined only when this module is the program (translate.py has its own --config)."""
  return dict(
      config=config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/synthetic.py"),
      workdir=flags.DEFINE_string("workdir", None, "where checkpoints, TensorBoard events and the config go"),
      coordinator_address=flags.DEFINE_string("coordinator_address", None,
                                              "host:port of process 0 (multi-host off Cloud TPU)"),
      num_processes=flags.DEFINE_integer("num_processes", None, "number of processes (multi-host off Cloud TPU)"),
      process_id=flags.DEFINE_integer("process_id", None, "this process's index (multi-host off Cloud TPU)"))


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, ...); the message says why and where to resume from."""


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------

def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """``jax.distributed.initialize`` from the flags when they name a coordinator; else JAX's own detection where
  the platform starts several processes: a multi-host Cloud TPU slice (several TPU_WORKER_HOSTNAMES) or a SLURM
  job step of several tasks (``srun``, SLURM_NTASKS > 1). A single process (one host, all its devices) needs
  none."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or int(os.environ.get("SLURM_NTASKS") or 1) > 1:
    jax.distributed.initialize()


def check_config(config) -> None:
  """Problems found before anything is compiled, one line each."""
  n_devices = jax.device_count()
  if config.stage not in STAGES:
    raise InputError(f"config.stage must be one of {STAGES}, got {config.stage!r}")
  batch_sizes = {"train": config.train.batch_size} if config.stage == "midms" else {"ldm": config.ldm.batch_size}
  if config.stage == "ldm+midms":
    batch_sizes["train"] = config.train.batch_size
  for section, batch_size in batch_sizes.items():
    if batch_size % n_devices:
      raise InputError(f"config.{section}.batch_size={batch_size} is not divisible by the {n_devices} devices")
  if config.train.fsdp < 1 or n_devices % config.train.fsdp:
    raise InputError(f"config.train.fsdp={config.train.fsdp} must divide the {n_devices} devices")
  for name in ("midms", "ldm", "first_stage"):
    path = config.checkpoints[name]
    if config.stage == "ldm+midms" and name == "ldm":
      continue  # written by the LDM stage of this run
    if path and not pathlib.Path(path).is_file():
      raise CheckpointError(f"{path}: config.checkpoints.{name} names a file that does not exist")
  if config.stage != "midms" and "://" in config.ldm.latent_cache:
    raise InputError(f"config.ldm.latent_cache={config.ldm.latent_cache!r} must be a local directory (the latents "
                     "are memory-mapped)")
  if config.stage == "ldm":
    return
  if config.loss.vgg not in vgg.LOSS_NETWORKS:
    raise InputError(f"config.loss.vgg must be one of {vgg.LOSS_NETWORKS}, got {config.loss.vgg!r}")
  if config.loss.vgg == "vgg19" and not pathlib.Path(config.loss.vgg_checkpoint or "").is_file():
    raise CheckpointError(f"{config.loss.vgg_checkpoint or '<empty>'}: config.loss.vgg_checkpoint must name "
                          "CoCosNet's vgg19_conv.pth (the VGG19 loss network), or set config.loss.vgg='none'")


_cache_dir_set_here: str | None = None  # the cache directory use_compilation_cache chose (not the user)


def use_compilation_cache(config, workdir: epath.Path) -> str | None:
  """Turns on JAX's persistent compilation cache in ``config.compilation_cache`` (``{workdir}``: the run's
  workdir; "": off) and returns its path, so a resumed or repeated run (a pod slice after preemption) loads its
  compiled steps instead of compiling them again. A cache directory already set in JAX's config (the
  ``JAX_COMPILATION_CACHE_DIR`` environment variable) is kept and returned."""
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


def initial_variables(config, rng: jax.Array, parts: tuple[str, ...] | None = None) -> dict[str, Any]:
  """Pretrained PyTorch weights named in ``config.checkpoints`` on top of a random init (of ``parts`` only,
  when given: ``build.init_variables``)."""
  variables = build.init_variables(config.model, rng, parts)
  ckpt = config.checkpoints
  if ckpt.ldm:
    variables.update(torch_import.load_ldm_checkpoint(ckpt.ldm, config.model, use_ema=ckpt.use_ema))
  if ckpt.first_stage:
    variables["first_stage"] = torch_import.load_first_stage_checkpoint(ckpt.first_stage, config.model.first_stage)
  if ckpt.midms:
    variables.update(torch_import.load_midms_checkpoint(ckpt.midms, config.model))
  return variables


def vgg_variables(config) -> dict[str, Any]:
  """The loss network's variables (``config.loss.vgg``; empty for "none")."""
  return vgg.load_loss_network(config.loss)


def total_steps(config, steps_per_epoch: int) -> int:
  return config.train.num_steps or config.train.epochs * steps_per_epoch


def _on_every_process(value: bool) -> bool:
  """Process 0's answer everywhere, so that every process takes the same branch around collective saves."""
  if jax.process_count() == 1:
    return value
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def checkpoint_manager(workdir: epath.Path, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(workdir / workdir_lib.CHECKPOINTS_DIR, options=options, item_names=("state", "data"))


def save_checkpoint(manager: ocp.CheckpointManager, state, iterator, *, force: bool = False) -> bool:
  step = int(jax.device_get(state.step))
  data = json.loads(pipeline.state_to_bytes(iterator.get_state()).decode())
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data)), force=force)


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, iterator):
  """Newest complete checkpoint -> (state, step), or (None, 0) when there is none.

  An unreadable checkpoint (damaged files) is renamed to ``damaged-<step>`` with a warning, so that
  training goes on from the newest complete one and can save that step again.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many types for damaged files
      reason = first_line(e)
      directory = epath.Path(manager.directory)
      if jax.process_index() == 0:
        (directory / str(step)).rename(directory / f"damaged-{step}")
      multihost_utils.sync_global_devices(f"moved damaged checkpoint {step}")
      logging.warning("checkpoint %d in %s is unreadable (%s); moved to damaged-%d, trying an older one",
                      step, directory, reason, step)
      manager.reload()
      continue
    iterator.set_state(pipeline.state_from_bytes(json.dumps(restored.data).encode()))
    return restored.state, step
  return None, 0


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------

def image_grid(batch, outputs, data_name: str, n: int = 4) -> np.ndarray:
  """Rows = the first ``n`` samples of this host's ``batch`` (the first rows of the global batch, whose
  ``outputs`` are given); columns = condition (``held_out.condition_rgb``) | exemplar | initial warp | output |
  ground truth, in [0, 1]."""
  n = min(n, len(batch["image"]))
  to01 = lambda x: np.clip((np.asarray(x[:n]) + 1) / 2, 0, 1)
  columns = [held_out.condition_rgb(np.asarray(batch["label"][:n]), data_name), to01(batch["ref"]),
             to01(outputs["initial_warp"]), to01(outputs["warped_ref"]), to01(batch["image"])]
  return images_lib.tile_columns(columns)[None]


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Preemption:
  requested: bool = False


@contextlib.contextmanager
def _sigterm_requests():
  """A flag that SIGTERM (preemption) sets while training runs; the previous handler is restored after.
  Outside the main thread, where Python cannot install handlers, the flag stays unset."""
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
  name: str                      # "ldm" or "midms": progress bar and log lines
  workdir: epath.Path
  config: Any
  state: Any                     # initial state (replaced by a restored checkpoint)
  frozen: Any                    # what the steps read but never update
  num_steps: int
  intervals: Any                 # log_every, image_every, checkpoint_every, keep_checkpoints
  run_step: Callable             # (step index, state, frozen, batch) -> (state, metrics)
  draw: Callable                 # (state, frozen, host batch, global batch) -> image grid (1, H, W, 3)
  image_name: str
  shardings: Callable = train_step.state_shardings  # (state, mesh) -> the state's NamedShardings
  phase: Callable = lambda step: ""  # a word for the log line of this step


def _with_workdir(config, workdir: epath.Path):
  """A copy of ``config`` with ``{workdir}`` in ``config.checkpoints`` paths replaced by ``workdir``."""
  config = config.copy_and_resolve_references()
  for name in ("ldm", "first_stage", "midms"):
    config.checkpoints[name] = config.checkpoints[name].replace(WORKDIR_PLACEHOLDER, str(workdir))
  return config


def _from_ldm_stage(config, workdir: epath.Path):
  """The MIDMs stage's config of an ``ldm+midms`` run: it starts from the LDM stage's export (EMA weights)."""
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
  dataset = pipeline.make_dataset(config.data, "train", seed=config.train.seed,
                                  batch_size=batch_size // jax.process_count(), shard_index=process,
                                  shard_count=jax.process_count(), train=True, worker_count=config.data.worker_count)
  return iter(dataset), max(1, len(pipeline.make_source(config.data, "train")) // batch_size)


def _first_stage(workdir: epath.Path, variables: dict[str, Any]) -> Any:
  """The run's frozen first stage: the one saved in ``workdir`` when resuming, else ``variables``' (saved)."""
  if _on_every_process((workdir / workdir_lib.FIRST_STAGE_DIR).exists()):
    return workdir_lib.restore_first_stage(workdir)
  workdir_lib.save_first_stage(workdir, variables["first_stage"])
  return variables["first_stage"]


def _run(stage: _Stage, iterator, mesh) -> dict[str, float]:
  """The training loop both stages share: restore, steps, progress, logs, images, checkpoints, SIGTERM."""
  process, workdir, intervals = jax.process_index(), stage.workdir, stage.intervals
  manager = checkpoint_manager(workdir, intervals.keep_checkpoints)
  state = stage.state
  restored, start = restore_checkpoint(manager, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state),
                                       iterator)
  if restored is not None:
    state = restored
    logging.info("%s: resumed from step %d in %s", stage.name, start, manager.directory)
  shardings = stage.shardings(state, mesh)
  state, frozen = jax.device_put(state, shardings), train_step.replicate(stage.frozen, mesh)
  run_step = stage.run_step(shardings)

  writer = metric_writers.create_default_writer(str(workdir), just_logging=process > 0)
  hooks = [periodic_actions.ReportProgress(num_train_steps=stage.num_steps, writer=writer)]
  if process == 0 and stage.config.train.profile:
    hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=str(workdir)))
  last_good = manager.latest_step()
  metrics_np: dict[str, float] = {}
  stop = False
  bar = tqdm(total=stage.num_steps, initial=start, desc=stage.name, unit="step", file=sys.stderr,
             disable=process > 0 or start >= stage.num_steps, dynamic_ncols=True, mininterval=1.0)

  with _sigterm_requests() as preemption, bar:
    for step in range(start, stage.num_steps):
      host_batch = next(iterator)
      batch = train_step.global_batch(mesh, host_batch)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = run_step(step, state, frozen, batch)
      for hook in hooks:
        hook(step + 1)
      done = step + 1
      bar.update(1)
      if done % intervals.log_every == 0 or done == stage.num_steps:
        metrics_np = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        if not np.isfinite(metrics_np["loss_total"]):
          manager.wait_until_finished()
          raise TrainingError(f"{stage.name}: loss is {metrics_np['loss_total']} at step {done}; the last good "
                              f"checkpoint is step {last_good} in {manager.directory}")
        writer.write_scalars(done, metrics_np)
        if process == 0:
          with (workdir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(dict(step=done, **metrics_np)) + "\n")
        _warn_on_collapse(metrics_np, stage.config, done)
        bar.set_postfix(loss=f"{metrics_np['loss_total']:.4f}", refresh=False)
        logging.info("%s step %d/%d %s loss %.5f", stage.name, done, stage.num_steps, stage.phase(step),
                     metrics_np["loss_total"])
      if intervals.image_every and done % intervals.image_every == 0:
        grid = stage.draw(state, frozen, host_batch, batch)
        if process == 0:
          writer.write_images(done, {stage.image_name: grid})
      stop = _on_every_process(preemption.requested)  # every host stops after the same step
      if done % intervals.checkpoint_every == 0 or done == stage.num_steps or stop:
        save_checkpoint(manager, state, iterator, force=stop)
        last_good = done
      if stop:
        break
  manager.wait_until_finished()
  writer.flush()
  if stop:
    raise Preempted(f"SIGTERM: saved step {done} of the {stage.name} stage in {manager.directory}, stopping",
                    metrics_np)
  stage.state = state
  return metrics_np


class Preempted(Exception):
  """SIGTERM stopped training after saving a checkpoint (not an error: the same command resumes).
  ``metrics``: the last logged ones."""

  def __init__(self, message: str, metrics: dict[str, float]):
    super().__init__(message)
    self.metrics = metrics


def _start(config, workdir: epath.Path) -> None:
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_config(workdir, config)


def train_midms(config, workdir: epath.Path, mesh) -> dict[str, float]:
  """The MIDMs stage (official fine-tuning: warm-up, then the interleaved loop)."""
  _start(config, workdir)
  iterator, steps_per_epoch = _data(config, config.train.batch_size)
  model = MIDMs.from_config(config)
  variables = initial_variables(config, jax.random.PRNGKey(config.train.seed))
  variables["first_stage"] = _first_stage(workdir, variables)
  frozen = train_step.frozen_variables(variables, vgg_variables(config))
  state = train_step.create_train_state(variables, optim.make_optimizer(config.train, freeze_unet=True))
  del variables

  def run_step(shardings):
    steps = train_step.make_train_steps(model, config, steps_per_epoch, mesh, state_sharding=shardings)
    return lambda step, state, frozen, batch: (
        (steps.warmup if step < config.train.warmup_iter else steps.main)(state, frozen, batch))

  # Every process runs the preview (it is one program over the whole mesh); its outputs are replicated so
  # that process 0 can draw them beside its own part of the batch (the first rows of the global batch).
  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
  def preview(state, frozen, batch):
    variables = train_step.model_variables(state, frozen)
    out, _ = model.train_forward(variables, batch, jax.random.PRNGKey(0), warmup=False, update_stats=False)
    return dict(warped_ref=out["warped_ref"], initial_warp=model.decode(variables, out["warped_ref_feat"]))

  stage = _Stage(name="midms", workdir=workdir, config=config, state=state, frozen=frozen,
                 num_steps=total_steps(config, steps_per_epoch),
                 intervals=config.train, run_step=run_step,
                 draw=lambda state, frozen, host_batch, batch: image_grid(
                     host_batch, jax.device_get(preview(state, frozen, batch)), config.data.name),
                 image_name="condition|exemplar|warp|output|gt",
                 phase=lambda step: "warm-up" if step < config.train.warmup_iter else "interleaved")
  return _run(stage, iterator, mesh)


def train_ldm(config, workdir: epath.Path, mesh) -> dict[str, float]:
  """The LDM stage (``midms_jax.ldm``); exports ``ldm.safetensors`` (+ ``ldm.ckpt``) when it ends."""
  _start(config, workdir)
  model = MIDMs.from_config(config)
  variables = initial_variables(config, jax.random.PRNGKey(config.train.seed), parts=("unet", "first_stage"))
  first_stage = _first_stage(workdir, variables)
  if config.ldm.latent_cache:
    encode = jax.jit(lambda images, index: model.encode(
        {"first_stage": first_stage}, images, jax.random.fold_in(jax.random.PRNGKey(config.train.seed), index)))
    iterator = iter(latent_cache.make_dataset(config, latent_cache.load_or_build(config, encode, first_stage)))
  else:
    iterator, _ = _data(config, config.ldm.batch_size)
  state = ldm.create_state(variables["unet"]["params"], ldm.make_optimizer(config.ldm))
  del variables
  preview = jax.jit(ldm.make_preview(model, config.ldm.preview_t), out_shardings=NamedSharding(mesh, PartitionSpec()))

  def run_step(shardings):
    step_fn = ldm.make_step(model, config, mesh, state_sharding=shardings)
    return lambda step, state, frozen, batch: step_fn(state, frozen, batch)

  stage = _Stage(name="ldm", workdir=workdir, config=config, state=state, frozen=dict(first_stage=first_stage),
                 num_steps=config.ldm.num_steps, intervals=config.ldm,
                 run_step=run_step,
                 draw=lambda state, frozen, host_batch, batch: ldm.image_grid(
                     jax.device_get(preview(state, frozen, batch))),
                 image_name="image|noised|denoised", shardings=ldm.state_shardings)
  metrics = _run(stage, iterator, mesh)
  export_ldm(config, workdir, stage.state, first_stage)
  return metrics


def export_ldm(config, workdir: epath.Path, state: ldm.LDMState, first_stage: Any) -> epath.Path:
  """Writes ``<workdir>/export/ldm.safetensors`` (and ``ldm.ckpt`` where torch is installed): the LDM stage's
  U-Net, its EMA shadows and the first stage in CompVis' key layout (process 0; the others wait)."""
  out = workdir / LDM_EXPORT_DIR
  host = ldm.exported_variables(state, jax.device_get(first_stage), config.ldm.ema_decay)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    state_dict = torch_export.ldm_state_dict(host, config)
    torch_export.save_safetensors(out / "ldm.safetensors", state_dict)
    if importlib.util.find_spec("torch") is not None:
      torch_export.save_ldm_ckpt(out / "ldm.ckpt", state_dict, global_step=int(host["ema_counters"]["num_updates"]))
    logging.info("ldm: exported step %d to %s", int(host["ema_counters"]["num_updates"]), out)
  multihost_utils.sync_global_devices("ldm export written")
  return out


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict[str, float]:
  """Runs ``config.stage`` to its last step; returns the last logged metrics (of the last stage that ran).

  A stage whose checkpoint already holds its last step is not run again: with ``ldm+midms`` a resumed run
  continues where it stopped, in whichever stage. SIGTERM saves a checkpoint and returns what was logged.
  """
  workdir = workdir_lib.as_path(workdir)
  check_config(config)
  logging.info("compilation cache: %s", use_compilation_cache(config, workdir) or "off")
  # The first cross-host collective sets up the CPU collectives' (gloo) context, which waits only 30 s for
  # the other hosts: run one now, while the hosts are in step after jax.distributed.initialize.
  _on_every_process(True)
  config = _with_workdir(config, workdir)
  mesh = train_step.data_mesh(fsdp=config.train.fsdp)
  metrics: dict[str, float] = {}
  try:
    if config.stage in ("ldm", "ldm+midms"):
      ldm_dir = workdir / LDM_DIR
      export = ldm_dir / LDM_EXPORT_DIR / "ldm.safetensors"
      if not (_on_every_process(export.exists()) and
              workdir_lib.checkpoint_steps(ldm_dir)[-1:] == [config.ldm.num_steps]):
        metrics = train_ldm(config, ldm_dir, mesh)
    if config.stage == "ldm+midms":
      metrics = train_midms(_from_ldm_stage(config, workdir), workdir, mesh)
    elif config.stage == "midms":
      metrics = train_midms(config, workdir, mesh)
  except Preempted as e:
    logging.warning("%s", e)
    return e.metrics
  if config.stage != "ldm" and config.evaluate.results_pairs:
    write_held_out_results(workdir)
  return metrics


def write_held_out_results(workdir: epath.Path) -> None:
  """``results.json`` and ``samples.png`` of the run's newest checkpoint (``midms_jax.held_out``)."""
  if jax.process_count() > 1:
    logging.warning("held-out results are computed by single-process runs only: skipped (run "
                    "python -m midms_jax.evaluate on one host)")
    return
  trained = workdir_lib.load_trained(workdir)
  logging.info("scoring %d held-out pairs of step %d", trained.config.evaluate.results_pairs, trained.step)
  scores = held_out.write(workdir, trained.config, trained.variables, trained.step)
  logging.info("held-out results: %s", json.dumps(scores))


def _warn_on_collapse(metrics: dict[str, float], config, step: int) -> None:
  """Identity-mapping collapse: the output copies the exemplar instead of following the condition."""
  to_exemplar, to_gt = metrics.get("monitor/output_to_exemplar_l1"), metrics.get("monitor/output_to_gt_l1")
  if to_exemplar is not None and to_gt and to_exemplar < config.train.collapse_ratio * to_gt:
    logging.warning("step %d: the output is much closer to the exemplar (L1 %.4f) than to the ground truth "
                    "(L1 %.4f): possible collapse into identity mapping", step, to_exemplar, to_gt)


def main(argv, cli: dict[str, flags.FlagHolder]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if cli["config"].value is None or not cli["workdir"].value:
    raise app.UsageError("--config and --workdir are required")
  initialize_distributed(cli["coordinator_address"].value, cli["num_processes"].value, cli["process_id"].value)
  for warning in xla_flags.slow_flag_warnings(os.environ.get("XLA_FLAGS", ""), jax.default_backend()):
    logging.warning(warning)
  try:
    train_and_evaluate(cli["config"].value, cli["workdir"].value)
  except (InputError, CheckpointError, TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI))
