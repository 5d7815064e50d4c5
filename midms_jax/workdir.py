"""A training workdir as the other tools read it: its config, its checkpoints, its frozen first
stage.

Layout written by ``midms_jax.train``::

  <workdir>/config.json          the full config of the run (``read_config`` rebuilds the ConfigDict)
  <workdir>/first_stage/         the frozen autoencoder, saved once (orbax); it never trains
  <workdir>/checkpoints/<step>/  orbax: ``state`` (step, params, spectral, opt_state) and ``data``

``load_trained`` restores the model variables of one checkpoint (newest by default) on the host,
without the optimiser state, so ``translate`` and ``export`` never hold the optimiser moments. Every
problem (no such workdir, no checkpoint, a step that does not exist, damaged files) is a one-line
``CheckpointError`` naming the path.
"""

import contextlib
import json
import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import logging as absl_logging
from ml_collections import ConfigDict

from midms_jax.errors import CheckpointError, first_line

CONFIG_FILE = "config.json"
FIRST_STAGE_DIR = "first_stage"
NO_VARIABLES_FILE = (
    "no_variables"  # in FIRST_STAGE_DIR for a first stage without variables (pixel_shuffle)
)
CHECKPOINTS_DIR = "checkpoints"
MODEL_STATE_FIELDS = ("step", "params", "spectral")  # what inference needs of a TrainState


class Trained(NamedTuple):
  """One checkpoint of a run: its config, ``{'unet', 'first_stage', 'correspondence'}`` variables,
  step."""

  config: ConfigDict
  variables: dict[str, Any]
  step: int


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config files use (ConfigDict keeps the types it is given)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _training_loop(config: ConfigDict) -> ConfigDict:
  """The interleaved loop's training schedule, which runs before ``midms.inference`` existed
  translated with."""
  return ConfigDict(
      {
          k: config.midms[k]
          for k in ("ddim_steps", "interleave_steps", "loop_start_step", "rewarp_steps")
      }
  )


# Config fields newer than some workdirs, with the value that reproduces what those runs did (or the
# function of the config that gives it).
_FIELDS_ADDED_LATER = (
    (("stage",), "midms"),
    (("evaluate", "results_pairs"), 0),
    (("dtype",), "float32"),
    (("remat",), "none"),
    (("midms", "warp_chunk"), 0),
    (("midms", "first_step_noise"), "official"),
    (("ldm", "max_timestep"), 0),
    (("midms", "rewarp_support"), "encoder"),
    (("loss", "rewarp"), 0.0),
    (("ldm", "latent_cache"), ""),
    (("midms", "unroll_loop"), False),
    (("attention_chunk",), 0),
    (("midms", "inference"), _training_loop),
)


def _with_later_fields(config: ConfigDict) -> ConfigDict:
  """Fills the fields that a config.json written by an older version lacks, so old runs still
  load."""
  for path, default in _FIELDS_ADDED_LATER:
    section = config
    for key in path[:-1]:
      section = section[key]
    if path[-1] not in section:
      section[path[-1]] = default(config) if callable(default) else default
  return config


def as_path(workdir: str | os.PathLike) -> epath.Path:
  """A workdir as a path object: local folders (made absolute: orbax refuses relative checkpoint
  paths) and cloud storage (``gs://bucket/run``) alike."""
  return _absolute(epath.Path(workdir).expanduser())


def _absolute(path: epath.Path) -> epath.Path:
  """Orbax wants absolute paths; a URL (``gs://...``) already is one (pathlib would mangle it)."""
  return path if "://" in str(path) else path.absolute()


def write_config(workdir: epath.Path, config: ConfigDict) -> None:
  (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


# Fields a resumed run may change (dotted paths; a trailing "." covers a whole section): how long it
# trains, how often it logs, draws and saves, where its data and caches are, how the data is
# decoded, and the end-of-run / ``evaluate`` settings. None of them changes what a training step
# computes or what a checkpoint holds.
RESUMABLE_FIELDS = (
    "train.num_steps",
    "train.log_every",
    "train.image_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.profile",
    "train.collapse_ratio",
    "ldm.num_steps",
    "ldm.log_every",
    "ldm.image_every",
    "ldm.checkpoint_every",
    "ldm.keep_checkpoints",
    "ldm.preview_t",
    "ldm.latent_cache",
    "data.data_dir",
    "data.worker_count",
    "compilation_cache",
    "evaluate.",
    "midms.inference.",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def flat_fields(section: Any, prefix: str = "") -> dict[str, Any]:
  """``{'<prefix><dotted field>': value}`` of a config (section), lists as tuples."""
  return _flat(_tuples(section.to_dict() if hasattr(section, "to_dict") else dict(section)), prefix)


def _normalised(config: ConfigDict) -> dict[str, Any]:
  """``config`` as ``read_config`` gives it back from ``config.json`` (JSON values, tuples, later
  fields)."""
  return flat_fields(
      _with_later_fields(ConfigDict(_tuples(json.loads(config.to_json_best_effort()))))
  )


def _moved_with_workdir(old: Any, new: Any, run_workdir: str | None) -> bool:
  """A path inside the run's workdir, recorded when the workdir was elsewhere (a copied or moved
  run): the same path relative to it (``{workdir}/ldm/export/ldm.safetensors`` resolved at two
  places)."""
  if not (
      run_workdir
      and isinstance(old, str)
      and isinstance(new, str)
      and new.startswith(run_workdir + "/")
  ):
    return False
  return old.endswith(new[len(run_workdir) :])


def config_differences(
    recorded: ConfigDict, config: ConfigDict, run_workdir: str | os.PathLike | None = None
) -> dict[str, tuple[Any, Any]]:
  """``{dotted field: (recorded value, new value)}`` for every field that differs (or exists in one
  only); with ``run_workdir``, paths inside it that only moved with it are not differences."""
  old, new = _normalised(recorded), _normalised(config)
  missing, root = "<absent>", str(run_workdir) if run_workdir else None
  return {
      k: (old.get(k, missing), new.get(k, missing))
      for k in sorted(old.keys() | new.keys())
      if old.get(k, missing) != new.get(k, missing)
      and not _moved_with_workdir(old.get(k), new.get(k), root)
  }


def resumable(field: str, allowed: tuple[str, ...] = RESUMABLE_FIELDS) -> bool:
  """Whether ``field`` may differ from the run's ``config.json`` when it resumes."""
  return any(field == a or (a.endswith(".") and field.startswith(a)) for a in allowed)


def non_finite_leaves(tree: Any) -> list[str]:
  """The paths of the floating-point leaves of ``tree`` that hold a NaN or an infinity."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
      bad.append(jax.tree_util.keystr(path, simple=True, separator="."))
  return bad


def read_config(workdir: str | os.PathLike) -> ConfigDict:
  """The run's config from ``<workdir>/config.json``, equal to the ConfigDict it was written
  from."""
  workdir = as_path(workdir)
  if not workdir.is_dir():
    raise CheckpointError(f"{workdir}: no such training workdir")
  path = workdir / CONFIG_FILE
  try:
    return _with_later_fields(ConfigDict(_tuples(json.loads(path.read_text(encoding="utf-8")))))
  except FileNotFoundError:
    raise CheckpointError(
        f"{path}: missing; {workdir} is not a midms-jax training workdir"
    ) from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable config ({e})") from None


def save_first_stage(workdir: epath.Path, first_stage: Any) -> None:
  """Saves the frozen first stage once (every process calls this; orbax writes from the primary
  host)."""
  path = workdir / FIRST_STAGE_DIR
  if path.exists():
    return
  if not jax.tree_util.tree_leaves(first_stage):  # orbax refuses empty trees
    if jax.process_index() == 0:
      path.mkdir(parents=True)
      (path / NO_VARIABLES_FILE).write_text("this run's first stage has no variables\n")
    return
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, jax.device_get(first_stage))
  checkpointer.wait_until_finished()


def _host_restore_args(metadata: Any) -> tuple[Any, Any]:
  """(abstract tree, restore args) that restore every leaf of ``metadata`` as a host numpy array."""
  is_leaf = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata, is_leaf=is_leaf
  )
  restore_args = jax.tree_util.tree_map(
      lambda m: ocp.RestoreArgs(restore_type=np.ndarray), metadata, is_leaf=is_leaf
  )
  return abstract, restore_args


@contextlib.contextmanager
def _orbax_warnings_hidden():
  """Reading one item of a managed checkpoint makes orbax warn that the step's metadata is
  elsewhere."""
  logger = absl_logging.get_absl_logger()
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _tree_metadata(checkpointer: ocp.PyTreeCheckpointer, path: epath.Path) -> Any:
  metadata = checkpointer.metadata(path)
  if metadata is None or getattr(metadata, "item_metadata", None) is None:
    raise ValueError("its metadata is missing or unreadable (damaged files?)")
  return metadata.item_metadata.tree


def restore_first_stage(workdir: epath.Path) -> dict[str, Any]:
  path = workdir / FIRST_STAGE_DIR
  if not path.is_dir():
    raise CheckpointError(
        f"{path}: missing; the run's frozen first stage is saved there when training starts"
    )
  if (path / NO_VARIABLES_FILE).exists():
    return {}
  try:
    with _orbax_warnings_hidden(), ocp.PyTreeCheckpointer() as checkpointer:
      abstract, restore_args = _host_restore_args(_tree_metadata(checkpointer, path))
      return checkpointer.restore(
          path, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)
      )
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many types for damaged files
    raise CheckpointError(f"{path}: unreadable first-stage checkpoint: {first_line(e)}") from None


def checkpoint_steps(workdir: epath.Path) -> list[int]:
  """The steps of the finalized checkpoints (orbax's own test), oldest first; set-aside ``damaged-<step>``
  folders are not steps."""
  directory = workdir / CHECKPOINTS_DIR
  if not directory.is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def resolve_step(workdir: epath.Path, step: int | None) -> int:
  """``step`` if a complete checkpoint exists for it, else the newest one; a clear error
  otherwise."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise CheckpointError(
        f"{workdir / CHECKPOINTS_DIR}: no checkpoints (training saves every "
        "config.train.checkpoint_every steps and at the end)"
    )
  if step is None:
    return steps[-1]
  if step not in steps:
    shown = ", ".join(map(str, steps[-10:]))
    raise CheckpointError(
        f"{workdir / CHECKPOINTS_DIR}: no checkpoint for step {step} (available: {shown})"
    )
  return step


def restore_model_state(workdir: epath.Path, step: int) -> dict[str, Any]:
  """``{'step', 'params', 'spectral'}`` of checkpoint ``step`` as host arrays; the optimiser state
  stays on disk."""
  path = (workdir / CHECKPOINTS_DIR / str(step) / "state").absolute()
  try:
    with _orbax_warnings_hidden(), ocp.PyTreeCheckpointer() as checkpointer:
      tree = _tree_metadata(checkpointer, path)
      abstract, restore_args = _host_restore_args({k: tree[k] for k in MODEL_STATE_FIELDS})
      return checkpointer.restore(
          path,
          args=ocp.args.PyTreeRestore(
              item=abstract, restore_args=restore_args, partial_restore=True
          ),
      )
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many types for damaged files
    raise CheckpointError(f"{path}: unreadable checkpoint: {first_line(e)}") from None


def load_trained(workdir: str | os.PathLike, step: int | None = None) -> Trained:
  """Config and model variables of checkpoint ``step`` (default: the newest) of a training
  workdir."""
  workdir = as_path(workdir)
  config = read_config(workdir)
  step = resolve_step(workdir, step)
  state = restore_model_state(workdir, step)
  bad = non_finite_leaves(state)
  if bad:
    raise CheckpointError(
        f"{workdir / CHECKPOINTS_DIR / str(step)}: holds non-finite parameters ({len(bad)} "
        f"tensors, e.g. {bad[0]}); pick an older checkpoint with --step"
    )
  variables = dict(
      unet={"params": state["params"]["unet"]},
      first_stage=restore_first_stage(workdir),
      correspondence={"params": state["params"]["correspondence"], "spectral": state["spectral"]},
  )
  return Trained(config, variables, step)


def split_checkpoint_path(path: str | os.PathLike) -> tuple[epath.Path, int]:
  """``<workdir>/checkpoints/<step>`` -> (workdir, step)."""
  path = as_path(path)
  if not (path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR):
    raise CheckpointError(
        f"{path}: not a training checkpoint directory (expected <workdir>/{CHECKPOINTS_DIR}/<step>)"
    )
  if not path.is_dir():
    raise CheckpointError(f"{path}: no such checkpoint directory")
  return path.parent.parent, int(path.name)
