"""Export a training checkpoint for PyTorch: ``python -m midms_jax.export --workdir=runs/x --out=export/``.

Reads checkpoint ``--step`` (default: the newest) of a training workdir, or ``--checkpoint`` =
``<workdir>/checkpoints/<step>``, and writes into ``--out``:

* ``midms.pth``: ``{'epoch', 'state_dict'}`` in the official MIDMs key layout; with
  ``--official_layout=full`` (default) it also holds the ``diffusion_sampler.*`` entries of a trained
  official model, so the official ``inference.py`` loads it unchanged. ``minimal`` leaves them out.
* ``ldm.ckpt``: the fine-tuned diffusion model as a Lightning-style CompVis latent-diffusion checkpoint
  (U-Net, EMA shadows = the U-Net, autoencoder, schedule buffers; ``global_step`` = the training step).
* ``midms.safetensors`` / ``ldm.safetensors``: the same tensors as the two files above, without pickle.
* ``export.json``: the run's config, the step, and shape / dtype / sha256 of every tensor of every file.

Without torch installed only the ``.safetensors`` files and ``export.json`` are written (with a note).
Everything is first written to a hidden folder beside ``--out`` and moved in at the end, so a failed
export leaves nothing half-written. Only the model variables are restored (not the optimiser state),
and the state dicts share their arrays: the host holds the model about twice (converted kernels).

Exit status 0, or 2 with one ``error:`` line (no such workdir, no checkpoint, a step that does not
exist, damaged checkpoint, unwritable output folder: checked before the checkpoint is read).
``--library_logs`` shows orbax's INFO lines.
"""

import importlib.util
import pathlib
import shutil
import sys
import uuid
from typing import Sequence

from absl import flags

from midms_jax import cli, logs, workdir as workdir_lib
from midms_jax.data import pipeline
from midms_jax.errors import CheckpointError, InputError
from midms_jax.interop import torch_export

FILES = ("midms.pth", "ldm.ckpt", "midms.safetensors", "ldm.safetensors", "export.json")

# Its own flag set: the tool's --workdir / --step must not clash with translate's when both are imported.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir (config.json, first_stage/, checkpoints/).",
                               flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Which checkpoint of --workdir (default: the newest).", flag_values=FLAGS)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "One checkpoint directory, <workdir>/checkpoints/<step>, instead of --workdir/--step.",
    flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output folder (created; files of an earlier export there are replaced).",
                           flag_values=FLAGS)
_LAYOUT = flags.DEFINE_enum(
    "official_layout", "full", list(torch_export.LAYOUTS), "full: midms.pth also holds the diffusion_sampler.* "
    "duplicates a trained official model has (official inference.py loads it as it is); minimal: without them.",
    flag_values=FLAGS)
_LIBRARY_LOGS = logs.define_flag(FLAGS)


def _torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def completed_epochs(config, step: int) -> int:
  """The ``epoch`` the official ``.pth`` records: whole epochs done at ``step`` (0 where the training data
  set cannot be opened here, e.g. a data set that lives on the training machine)."""
  try:
    steps_per_epoch = max(1, len(pipeline.make_source(config.data, "train")) // config.train.batch_size)
  except (InputError, NotImplementedError, OSError, ValueError):
    return 0
  return step // steps_per_epoch


def _staging_folder(out: pathlib.Path) -> pathlib.Path:
  """A hidden folder beside ``out`` (same file system, so the final moves are renames)."""
  try:
    out.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
  except OSError as e:
    raise CheckpointError(f"{out}: cannot write the export there: {e.strerror or e}") from None
  return staging


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None,
           layout: str = "full", with_torch: bool | None = None) -> list[pathlib.Path]:
  """Writes the files of the module doc for checkpoint ``step`` of ``workdir``; returns their paths."""
  out = pathlib.Path(out).expanduser()
  reason = cli.unwritable(out, folder=True)  # before the slow restore
  if reason:
    raise CheckpointError(f"{out}: cannot write the export there: {reason}")
  trained = workdir_lib.load_trained(workdir, step)
  with_torch = _torch_available() if with_torch is None else with_torch
  midms = torch_export.midms_state_dict(trained.variables, trained.config, layout=layout)
  ldm = torch_export.ldm_state_dict_of_midms(midms)
  epoch = completed_epochs(trained.config, trained.step)
  staging = _staging_folder(out)
  try:
    written = {}
    if with_torch:
      written["midms.pth"] = torch_export.save_midms_pth(staging / "midms.pth", midms, epoch=epoch)
      written["ldm.ckpt"] = torch_export.save_ldm_ckpt(staging / "ldm.ckpt", ldm, global_step=trained.step)
    metadata = {"step": str(trained.step)}
    written["midms.safetensors"] = torch_export.save_safetensors(staging / "midms.safetensors", midms, metadata)
    written["ldm.safetensors"] = torch_export.save_safetensors(staging / "ldm.safetensors", ldm, metadata)
    contents = {name: midms if name.startswith("midms") else ldm for name in written}
    written["export.json"] = torch_export.write_manifest(staging / "export.json", trained.config, trained.step,
                                                         contents)
    final = []
    for name, path in written.items():
      final.append(out / name)
      path.replace(out / name)
  except OSError as e:
    raise CheckpointError(f"{out}: writing the export failed: {e.strerror or e}") from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return final


def main(argv: Sequence[str]) -> int:
  logs.configure(library_logs=_LIBRARY_LOGS.value)
  cli.ignore_closed_loop_callbacks()  # a damaged checkpoint: no orbax noise after the error line
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])} (all inputs are --flags)", file=sys.stderr)
    return 2
  try:
    if not _OUT.value:
      raise InputError("--out is required (the folder for the exported files)")
    if _CHECKPOINT.value:
      if _WORKDIR.value or _STEP.value is not None:
        raise InputError("--checkpoint names workdir and step itself: leave out --workdir and --step")
      workdir, step = workdir_lib.split_checkpoint_path(_CHECKPOINT.value)
    elif _WORKDIR.value:
      workdir, step = pathlib.Path(_WORKDIR.value), _STEP.value
    else:
      raise InputError("pass --workdir (and optionally --step) or --checkpoint")
    with_torch = _torch_available()
    paths = export(workdir, _OUT.value, step=step, layout=_LAYOUT.value, with_torch=with_torch)
  except (InputError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # e.g. an unreadable workdir
    print(f"error: {cli.os_error_line(e)}", file=sys.stderr)
    return 2
  for path in paths:
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
  if not with_torch:
    print("note: torch is not installed, so midms.pth and ldm.ckpt were not written "
          "(pip install 'midms-jax[torch]'); the .safetensors files hold the same tensors")
  return 0


def run(argv: Sequence[str]) -> int:
  """In-process entry point (tests, notebooks): ``argv`` with the program name first; returns the exit status."""
  return cli.run_in_process(FLAGS, main, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(run(sys.argv))
