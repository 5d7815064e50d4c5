"""Training: ``python -m midms_jax.train --config=configs/deepfashion.py --workdir=runs/df``.

The workdir receives ``config.json``, ``first_stage/`` (the frozen autoencoder, once),
``checkpoints/<step>/``, TensorBoard events and ``metrics.jsonl`` (one JSON line per logged step); its
layout is ``midms_jax.workdir``'s, which ``translate --workdir`` and ``export`` read. Running the same
command again resumes from the newest complete checkpoint.

The loop, in labelled sections: set-up (multi-host, mesh, config checks that fail before compiling),
initial variables (pretrained PyTorch files named in the config, or random init), checkpoint restore
(orbax; model, optimiser, spectral-norm state and the data iterator), the two compiled steps (warm-up
and interleaved, switched by the host loop), logging (clu), and checkpoint saving (every N steps, at
the end, and on SIGTERM).
"""

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import app, flags, logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from midms_jax import optim, train_step, workdir as workdir_lib
from midms_jax.data import pipeline
from midms_jax.errors import CheckpointError, InputError, first_line
from midms_jax.interop import torch_import
from midms_jax.losses import vgg
from midms_jax.models import build
from midms_jax.models.midms import MIDMs



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
  if config.train.batch_size % n_devices:
    raise InputError(f"config.train.batch_size={config.train.batch_size} is not divisible by the "
                     f"{n_devices} devices")
  if config.train.fsdp < 1 or n_devices % config.train.fsdp:
    raise InputError(f"config.train.fsdp={config.train.fsdp} must divide the {n_devices} devices")
  for name in ("midms", "ldm", "first_stage"):
    path = config.checkpoints[name]
    if path and not pathlib.Path(path).is_file():
      raise CheckpointError(f"{path}: config.checkpoints.{name} names a file that does not exist")
  if config.loss.vgg == "vgg19" and not pathlib.Path(config.loss.vgg_checkpoint or "").is_file():
    raise CheckpointError(f"{config.loss.vgg_checkpoint or '<empty>'}: config.loss.vgg_checkpoint must name "
                          "CoCosNet's vgg19_conv.pth (the VGG19 loss network), or set config.loss.vgg='none'")


def initial_variables(config, rng: jax.Array) -> dict[str, Any]:
  """Pretrained PyTorch weights named in ``config.checkpoints`` on top of a random init."""
  variables = build.init_variables(config.model, rng)
  ckpt = config.checkpoints
  if ckpt.ldm:
    variables.update(torch_import.load_ldm_checkpoint(ckpt.ldm, config.model, use_ema=ckpt.use_ema))
  if ckpt.first_stage:
    variables["first_stage"] = torch_import.load_first_stage_checkpoint(ckpt.first_stage, config.model.first_stage)
  if ckpt.midms:
    variables.update(torch_import.load_midms_checkpoint(ckpt.midms, config.model))
  return variables


def vgg_variables(config) -> dict[str, Any]:
  if config.loss.vgg == "none":
    return {}
  return vgg.load_vgg19(config.loss.vgg_checkpoint, tuple(config.loss.vgg_widths))


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

def checkpoint_manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True)
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

def _to_rgb(x: np.ndarray) -> np.ndarray:
  """A condition map as an RGB picture: its first three channels (fewer: repeated)."""
  x = x[..., :3]
  return np.concatenate([x] * 3, axis=-1)[..., :3] if x.shape[-1] < 3 else x


def image_grid(batch, outputs, n: int = 4) -> np.ndarray:
  """Rows = the first ``n`` samples of this host's ``batch`` (the first rows of the global batch, whose
  ``outputs`` are given); columns = condition | exemplar | initial warp | output | ground truth, in [0, 1]."""
  n = min(n, len(batch["image"]))
  to01 = lambda x: np.clip((np.asarray(x[:n]) + 1) / 2, 0, 1)
  columns = [_to_rgb(np.asarray(batch["label"][:n])), to01(batch["ref"]), to01(outputs["initial_warp"]),
             to01(outputs["warped_ref"]), to01(batch["image"])]
  return np.concatenate([np.concatenate(list(c), axis=0) for c in columns], axis=1)[None]


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


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict[str, float]:
  """Runs training to ``config.train.num_steps`` (or the epochs); returns the last logged metrics."""
  workdir = workdir_lib.as_path(workdir)
  check_config(config)
  # The first cross-host collective sets up the CPU collectives' (gloo) context, which waits only 30 s for
  # the other hosts: run one now, while the hosts are in step after jax.distributed.initialize.
  _on_every_process(True)
  process = jax.process_index()
  if process == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_config(workdir, config)
  mesh = train_step.data_mesh(fsdp=config.train.fsdp)
  host_batch_size = config.train.batch_size // jax.process_count()

  # Data.
  dataset = pipeline.make_dataset(config.data, "train", seed=config.train.seed, batch_size=host_batch_size,
                                  shard_index=process, shard_count=jax.process_count(), train=True,
                                  worker_count=config.data.worker_count)
  iterator = iter(dataset)
  steps_per_epoch = max(1, len(pipeline.make_source(config.data, "train")) // config.train.batch_size)
  num_steps = total_steps(config, steps_per_epoch)

  # Model, variables, optimiser state.
  model = MIDMs.from_config(config)
  variables = initial_variables(config, jax.random.PRNGKey(config.train.seed))
  if _on_every_process((workdir / workdir_lib.FIRST_STAGE_DIR).exists()):  # resuming: the run's own weights
    variables["first_stage"] = workdir_lib.restore_first_stage(workdir)
  else:
    workdir_lib.save_first_stage(workdir, variables["first_stage"])
  frozen = train_step.frozen_variables(variables, vgg_variables(config))
  tx = optim.make_optimizer(config.train, freeze_unet=True)
  state = train_step.create_train_state(variables, tx)
  del variables
  manager = checkpoint_manager(workdir, config)
  restored, start = restore_checkpoint(manager, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state),
                                       iterator)
  if restored is not None:
    state = restored
    logging.info("resumed from step %d in %s", start, manager.directory)
  shardings = train_step.state_shardings(state, mesh)
  state, frozen = jax.device_put(state, shardings), train_step.replicate(frozen, mesh)
  steps = train_step.make_train_steps(model, config, steps_per_epoch, mesh, state_sharding=shardings)

  # Every process runs the preview (it is one program over the whole mesh); its outputs are replicated so
  # that process 0 can draw them beside its own part of the batch (the first rows of the global batch).
  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
  def preview(state, frozen, batch):
    variables = train_step.model_variables(state, frozen)
    out, _ = model.train_forward(variables, batch, jax.random.PRNGKey(0), warmup=False, update_stats=False)
    return dict(warped_ref=out["warped_ref"], initial_warp=model.decode(variables, out["warped_ref_feat"]))

  writer = metric_writers.create_default_writer(str(workdir), just_logging=process > 0)
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  hooks = [report]
  if process == 0 and config.train.profile:
    hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=str(workdir)))
  last_good = manager.latest_step()
  metrics_np: dict[str, float] = {}

  with _sigterm_requests() as preemption:
    for step in range(start, num_steps):
      host_batch = next(iterator)
      batch = train_step.global_batch(mesh, host_batch)
      warmup = step < config.train.warmup_iter
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = (steps.warmup if warmup else steps.main)(state, frozen, batch)
      for hook in hooks:
        hook(step + 1)
      done = step + 1
      if done % config.train.log_every == 0 or done == num_steps:
        metrics_np = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        if not np.isfinite(metrics_np["loss_total"]):
          manager.wait_until_finished()
          raise TrainingError(f"loss is {metrics_np['loss_total']} at step {done}; the last good checkpoint is "
                              f"step {last_good} in {manager.directory}")
        writer.write_scalars(done, metrics_np)
        if process == 0:
          with (workdir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(dict(step=done, **metrics_np)) + "\n")
        _warn_on_collapse(metrics_np, config, done)
        logging.info("step %d/%d %s loss %.5f", done, num_steps, "warm-up" if warmup else "interleaved",
                     metrics_np["loss_total"])
      if config.train.image_every and done % config.train.image_every == 0:
        grid = image_grid(host_batch, jax.device_get(preview(state, frozen, batch)))
        if process == 0:
          writer.write_images(done, {"condition|exemplar|warp|output|gt": grid})
      stop = _on_every_process(preemption.requested)  # every host stops after the same step
      if done % config.train.checkpoint_every == 0 or done == num_steps or stop:
        save_checkpoint(manager, state, iterator, force=stop)
        last_good = done
      if stop:
        logging.warning("SIGTERM: saved step %d, stopping", done)
        break
  manager.wait_until_finished()
  writer.flush()
  return metrics_np


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
  try:
    train_and_evaluate(cli["config"].value, cli["workdir"].value)
  except (InputError, CheckpointError, TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI))
