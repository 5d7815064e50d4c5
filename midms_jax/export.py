"""Export a training checkpoint for PyTorch: ``python -m midms_jax.export --workdir=runs/x --out=export/``.

Reads checkpoint ``--step`` (default: the newest) of a training workdir, or ``--checkpoint`` =
``<workdir>/checkpoints/<step>``, and writes into ``--out``:

* ``midms.pth``: ``{'epoch', 'state_dict'}`` in the official MIDMs key layout; with
  ``--official_layout=full`` (default) it also holds the ``diffusion_sampler.*`` entries of a trained
  official model, so the official ``inference.py`` loads it unchanged. ``minimal`` leaves them out
  (``inference.py``'s ``strict=False`` load takes either; ``strict=True`` takes neither, see
  ``STRICT_NOTE``).
* ``ldm.ckpt``: the fine-tuned diffusion model as a Lightning-style CompVis latent-diffusion checkpoint
  (U-Net, EMA shadows = the U-Net, autoencoder, schedule buffers; ``global_step`` = the training step).
* ``midms.safetensors`` / ``ldm.safetensors``: the same tensors as the two files above, without pickle.
* ``export.json``: the run's config, the step, and shape / dtype / sha256 of every tensor of every
  file; ``official_code``: which files the official PyTorch code can load, or why not
  (``official_loadability``); a run it cannot load also gets one ``warning:`` line.

Without torch installed only the ``.safetensors`` files and ``export.json`` are written (with a note).
Everything is first written to a hidden folder beside ``--out`` and moved in at the end, so a failed
export leaves nothing half-written. Only the model variables are restored (not the optimiser state),
and the state dicts share their arrays: the host holds the model about twice (converted kernels).

Exit status 0, or 2 with one ``error:`` line (no such workdir, no checkpoint, a step that does not
exist, damaged checkpoint, unwritable output folder: checked before the checkpoint is read).
``--library_logs`` shows orbax's INFO lines.
"""

import importlib
import importlib.util
import pathlib
import shutil
import sys
import uuid
from typing import Any, Mapping, Sequence

from absl import flags, logging

from midms_jax import cli, logs, platform_tuning, workdir as workdir_lib
from midms_jax.data import pipeline
from midms_jax.errors import CheckpointError, InputError
from midms_jax.interop import torch_export

FILES = ("midms.pth", "ldm.ckpt", "midms.safetensors", "ldm.safetensors", "export.json")

# Its own flag set: the tool's --workdir / --step must not clash with translate's when both are
# imported.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "The training workdir (config.json, first_stage/, checkpoints/).",
    flag_values=FLAGS,
)
_STEP = flags.DEFINE_integer(
    "step", None, "Which checkpoint of --workdir (default: the newest).", flag_values=FLAGS
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "One checkpoint directory, <workdir>/checkpoints/<step>, instead of --workdir/--step.",
    flag_values=FLAGS,
)
_OUT = flags.DEFINE_string(
    "out",
    None,
    "Output folder (created; files of an earlier export there are replaced).",
    flag_values=FLAGS,
)
_LAYOUT = flags.DEFINE_enum(
    "official_layout",
    "full",
    list(torch_export.LAYOUTS),
    "full: midms.pth also holds the diffusion_sampler.* "
    "duplicates a trained official model has (official inference.py loads it as it is); minimal: "
    "without them.",
    flag_values=FLAGS,
)
_LIBRARY_LOGS = logs.define_flag(FLAGS)


# The data sets with an official MIDMs model, and the LDM config its ``diff_model`` is built from.
OFFICIAL_LDM_CONFIGS = {
    "celebahq": "latent-diffusion models/ldm/celeba256/config.yaml",
    "deepfashion": "latent-diffusion models/ldm/celeba256/config.yaml (MIDMs ships none)",
    "lsun_church": "latent-diffusion models/ldm/lsun_churches256/config.yaml",
}
OFFICIAL_FIRST_STAGES = {"vq": "VQModelInterface", "kl": "AutoencoderKL"}
# Model fields that change no key or shape of the state dict (the official load copies tensors).
SHAPELESS_FIELDS = (
    "model.unet.dropout",
    "model.first_stage.dropout",
    "model.first_stage.scale_factor",
)
STRICT_NOTE = {
    "full": "load_state_dict(strict=True) into a freshly built official MIDMs fails (unexpected "
    "keys: the 13 diffusion_sampler.* DDIM buffers exist there only after a sample has "
    "run); inference.py uses strict=False",
    "minimal": "load_state_dict(strict=True) into an official MIDMs fails (missing keys: "
    "diffusion_sampler.model.*, the sampler's reference to diff_model); inference.py "
    "uses strict=False, which loads the same weights through diff_model.*",
}


def field_differences(run: Mapping[str, Any], official: Mapping[str, Any], where: str) -> list[str]:
  """``'<where>.<field>: <run value> (official <value>)'`` for every field that differs."""
  mine, theirs = workdir_lib.flat_fields(run, where + "."), workdir_lib.flat_fields(
      official, where + "."
  )
  missing = "<absent>"
  return [
      f"{key}: {mine.get(key, missing)!r} (official {theirs.get(key, missing)!r})"
      for key in sorted(mine.keys() | theirs.keys())
      if mine.get(key, missing) != theirs.get(key, missing)
  ]


def official_loadability(config, layout: str = "full") -> dict[str, Any]:
  """Which exported files the official PyTorch code can load as this run's model, and why not: the
  run's model config compared with the official config of its data set (``configs/<data set>.py``,
  default variant). Dropout and ``scale_factor`` change no tensor; a different schedule loads (the
  file's buffers replace the yaml's) and is noted.

  Returns ``{'data_set', 'official_config', 'differences', 'files': {name: {'loads', 'by' or
  'why_not', 'notes'}}}``; ``differences`` lists every differing model / diffusion field.
  """
  name = config.data.name
  first_stage_type = config.model.first_stage.get("type", "vq")
  common, differences, notes = [], [], []
  if first_stage_type not in OFFICIAL_FIRST_STAGES:
    common.append(
        f"first stage {first_stage_type!r} is not an LDM autoencoder (official: "
        f"{' or '.join(OFFICIAL_FIRST_STAGES.values())})"
    )
  official_file = None
  if name not in OFFICIAL_LDM_CONFIGS:
    common.append(
        f"data set {name!r} has no official MIDMs model (official: "
        f"{', '.join(OFFICIAL_LDM_CONFIGS)})"
    )
  else:
    official_file = f"configs/{name}.py"
    official = importlib.import_module(f"configs.{name}").get_config()
    for part in ("unet", "first_stage", "correspondence"):
      differences += field_differences(config.model[part], official.model[part], f"model.{part}")
    schedule = field_differences(config.diffusion, official.diffusion, "diffusion")
    differences += schedule
    if schedule:
      notes.append(
          "the file's schedule buffers replace the official yaml's on load: the official "
          "code runs this run's schedule (" + "; ".join(schedule) + ")"
      )
  structural = [
      d
      for d in differences
      if not d.startswith("diffusion.") and d.split(":")[0] not in SHAPELESS_FIELDS
  ]

  def blockers(parts: tuple[str, ...]) -> list[str]:
    shapes = [d for d in structural if d.startswith(tuple(f"model.{part}." for part in parts))]
    if shapes:
      more = f"; ... ({len(shapes) - 6} more)" if len(shapes) > 6 else ""
      listed = "; ".join(shapes[:6]) + more
      return common + [
          f"{len(shapes)} model field(s) differ from the official {official_file}, "
          f"whose model the official code builds (other modules, shapes or attention "
          f"heads): {listed}"
      ]
    return list(common)

  yaml = OFFICIAL_LDM_CONFIGS.get(name, "")
  files = {}
  why = blockers(("unet", "first_stage", "correspondence"))
  files["midms.pth"] = dict(loads=not why, notes=notes + [STRICT_NOTE[layout]])
  files["midms.pth"].update(
      dict(why_not=why)
      if why
      else dict(
          by=f"the official inference.py (MIDMs built from {yaml}, load_state_dict strict=False)"
      )
  )
  why = blockers(("unet", "first_stage"))
  files["ldm.ckpt"] = dict(loads=not why, notes=list(notes))
  files["ldm.ckpt"].update(
      dict(why_not=why)
      if why
      else dict(
          by=f"latent-diffusion's load_model_from_config and MIDMs' get_model with {yaml} "
          "(strict=False)"
      )
  )
  for stem in ("midms", "ldm"):
    files[f"{stem}.safetensors"] = dict(
        loads=False,
        why_not=[
            f"the official code reads torch.save files only (the same tensors as "
            f"{'midms.pth' if stem == 'midms' else 'ldm.ckpt'})"
        ],
    )
  return dict(data_set=name, official_config=official_file, differences=differences, files=files)


def _warn_unloadable(out: pathlib.Path, loadability: Mapping[str, Any], written) -> None:
  """One ``warning:`` line when the official code cannot load an exported torch file."""
  refused = {
      name: entry
      for name, entry in loadability["files"].items()
      if name in written and not name.endswith(".safetensors") and not entry["loads"]
  }
  if refused:
    reasons = list(dict.fromkeys(r for entry in refused.values() for r in entry["why_not"]))
    logging.warning(
        "%s: the official PyTorch code cannot load %s: %s (export.json "
        "'official_code' lists why)",
        out,
        " or ".join(refused),
        "; ".join(reasons),
    )


def _torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def completed_epochs(config, step: int) -> int:
  """The ``epoch`` the official ``.pth`` records: whole epochs done at ``step`` (0 where the
  training data set cannot be opened here, e.g. a data set that lives on the training machine)."""
  try:
    steps_per_epoch = max(
        1, len(pipeline.make_source(config.data, "train")) // config.train.batch_size
    )
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


def export(
    workdir: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    step: int | None = None,
    layout: str = "full",
    with_torch: bool | None = None,
) -> list[pathlib.Path]:
  """Writes the files of the module doc for checkpoint ``step`` of ``workdir``; returns their
  paths."""
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
      written["ldm.ckpt"] = torch_export.save_ldm_ckpt(
          staging / "ldm.ckpt", ldm, global_step=trained.step
      )
    metadata = {"step": str(trained.step)}
    written["midms.safetensors"] = torch_export.save_safetensors(
        staging / "midms.safetensors", midms, metadata
    )
    written["ldm.safetensors"] = torch_export.save_safetensors(
        staging / "ldm.safetensors", ldm, metadata
    )
    contents = {name: midms if name.startswith("midms") else ldm for name in written}
    loadability = official_loadability(trained.config, layout)
    loadability["files"] = {k: v for k, v in loadability["files"].items() if k in written}
    written["export.json"] = torch_export.write_manifest(
        staging / "export.json",
        trained.config,
        trained.step,
        contents,
        extra={"official_code": loadability},
    )
    final = []
    for name, path in written.items():
      final.append(out / name)
      path.replace(out / name)
  except OSError as e:
    raise CheckpointError(f"{out}: writing the export failed: {e.strerror or e}") from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  _warn_unloadable(out, loadability, written)
  return final


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
    if not _OUT.value:
      raise InputError("--out is required (the folder for the exported files)")
    if _CHECKPOINT.value:
      if _WORKDIR.value or _STEP.value is not None:
        raise InputError(
            "--checkpoint names workdir and step itself: leave out --workdir and --step"
        )
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
    print(
        "note: torch is not installed, so midms.pth and ldm.ckpt were not written "
        "(pip install 'midms-jax[torch]'); the .safetensors files hold the same tensors"
    )
  return 0


def run(argv: Sequence[str]) -> int:
  """In-process entry point (tests, notebooks): ``argv`` with the program name first; returns the
  exit status."""
  return cli.run_in_process(FLAGS, main, argv, doc=__doc__)


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  sys.exit(run(sys.argv))
