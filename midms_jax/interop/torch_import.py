"""Import of the PyTorch checkpoints users already have, unmodified, with strict key checking.

Supported files (see README "Loading PyTorch checkpoints"):

* LDM Lightning ``.ckpt``: U-Net from ``model.diffusion_model.*``, first stage from
  ``first_stage_model.*``; raw weights by default, EMA weights (``model_ema.*``) on request.
* Standalone first-stage ``.ckpt`` (``encoder.*``, ``decoder.*``, ``quantize.*``, ...; its
  ``loss.*`` LPIPS/discriminator weights are ignored).
* Official MIDMs ``.pth`` (``{'state_dict': ...}`` as ``train.py`` writes it): ``diff_model.*`` plus
  the correspondence networks.

Unlike the official loader (``strict=False``), every expected key must be present with the expected
shape, and every key that is neither consumed nor documented as ignorable is an error. Errors are
``CheckpointError`` with a one-line message that names the file.

Schedule: the LDM and MIDMs loaders take the model config or the whole config. Given the whole
config, the file's ``register_schedule`` buffers (``betas``, ``alphas_cumprod``, ...) must equal
those ``config.diffusion`` gives (``diffusion.schedule``, relative tolerance 1e-6), and with
``config.midms.apply_scale_factor`` the file's ``scale_factor`` must equal
``config.model.first_stage.scale_factor``; a difference is a ``CheckpointError`` naming the buffer,
both values and the config setting that matches the file. ``keep_ema=True`` also returns the file's
``scale_factor`` (``variables["scale_factor"]``, a float32 scalar) for a bit-exact re-export.
"""

import pathlib
from typing import Any, Mapping

import numpy as np

from midms_jax.diffusion.schedule import DiffusionSchedule
from midms_jax.errors import CheckpointError, first_line
from midms_jax.interop import ldm_ema
from midms_jax.interop.torch_names import reject_unexpected, variables_from_state_dict
from midms_jax.models import build

# LDM ``register_schedule`` buffers: recomputed from the config (midms_jax.diffusion.schedule).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
EMA_COUNTERS = {"decay": np.float32, "num_updates": np.int32}  # LitEma buffers beside the shadows
SCALE_FACTOR = "scale_factor"
# What an LDM state dict may hold beside the U-Net and first stage: the schedule buffers (checked
# against config.diffusion when the whole config is given), ``scale_factor`` (only scale_by_std
# models store it; the official MIDMs code ignores it, see config midms.apply_scale_factor) and the
# EMA shadows.
LDM_IGNORABLE = SCHEDULE_BUFFERS + (EMA_PREFIX, SCALE_FACTOR)
SCHEDULE_RTOL = 1e-6
# Schedules a file's betas are fitted with (both are set by linear_start / linear_end alone).
_FITTED_SCHEDULES = ("linear", "sqrt_linear")
# Official MIDMs state dict: ``diffusion_sampler.*`` duplicates ``diff_model.*`` (plus DDIM
# buffers); ``copied_*`` exist after ``set_copy()`` and are never used.
MIDMS_IGNORABLE = ("diffusion_sampler.", "copied_diff_model.", "copied_diffusion_sampler.")
FIRST_STAGE_IGNORABLE = ("loss.",)
CORRESPONDENCE_PREFIXES = ("real_enc.", "iter_enc.", "seg_enc.", "layer.", "phi.", "theta.")


def _require_torch(path: pathlib.Path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"{path}: reading PyTorch checkpoints needs torch: pip install 'midms-jax[torch]'"
    ) from e
  return torch


def read_checkpoint(path: str | pathlib.Path) -> dict[str, Any]:
  """Loads a ``torch.save`` file (weights only, on CPU) and returns its top-level dict; a
  ``.safetensors`` file (this package's torch-free export) is read without torch as
  ``{'state_dict': numpy arrays}``."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such checkpoint file")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    try:
      return {"state_dict": load_file(str(path))}
    except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own error types
      raise CheckpointError(
          f"{path}: not a readable safetensors file (truncated or corrupt?): {first_line(e)}"
      ) from None
  torch = _require_torch(path)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch.load raises many unrelated types on bad files
    reason = first_line(e)
    raise CheckpointError(
        f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {reason}"
    ) from None
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
  return dict(obj)


def state_dict_of(checkpoint: Mapping[str, Any], path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The ``state_dict`` entry (or the checkpoint itself if it is a bare state dict) as float32 numpy
  arrays (integer buffers keep their type)."""
  state = checkpoint.get("state_dict", checkpoint)
  if not isinstance(state, Mapping) or not state:
    raise CheckpointError(
        f"{path}: checkpoint has no 'state_dict' (keys: {sorted(checkpoint)[:8]})"
    )
  if all(isinstance(value, np.ndarray) for value in state.values()):  # read from safetensors
    return {
        key: value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
        for key, value in state.items()
    }
  torch = _require_torch(pathlib.Path(path))
  arrays = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(
          f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor"
      )
    value = value.detach()
    arrays[key] = (value.float() if value.is_floating_point() else value).numpy()
  return arrays


def _require_prefix(state: Mapping[str, np.ndarray], prefix: str, path, kind: str) -> None:
  if not any(k.startswith(prefix) for k in state):
    sample = ", ".join(sorted(state)[:5])
    raise CheckpointError(f"{path}: not {kind}: no '{prefix}*' keys (found e.g. {sample})")


def _ema_counters(
    state: Mapping[str, np.ndarray], prefix: str, source: str
) -> dict[str, np.ndarray]:
  missing = [prefix + name for name in EMA_COUNTERS if prefix + name not in state]
  if missing:
    raise CheckpointError(f"{source}: EMA counter(s) missing: {', '.join(missing)}")
  return {name: np.asarray(state[prefix + name], dtype) for name, dtype in EMA_COUNTERS.items()}


def _split_config(config) -> tuple[Any, Any]:
  """``(model config, whole config or None)`` of what a loader was given."""
  if "model" in config and "diffusion" in config:
    return config["model"], config
  return config, None


def _short(value: float) -> str:
  """The shortest decimal that reads back as the same float32 (``0.0155``, not
  ``0.015500000305``)."""
  return np.format_float_positional(np.float32(value), trim="-")


def fit_schedule(betas: np.ndarray) -> dict[str, Any] | None:
  """The ``config.diffusion`` fields (beta_schedule, timesteps, linear_start, linear_end) that
  reproduce a file's float32 ``betas`` within ``SCHEDULE_RTOL``; None when no LDM ``linear`` or
  ``sqrt_linear`` schedule does."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.size < 2:
    return None
  for name in _FITTED_SCHEDULES:
    start, end = float(_short(betas[0])), float(_short(betas[-1]))
    made = DiffusionSchedule.make(name, betas.size, start, end).betas
    if np.allclose(made, betas, rtol=SCHEDULE_RTOL, atol=0.0):
      return dict(beta_schedule=name, timesteps=int(betas.size), linear_start=start, linear_end=end)
  return None


def _schedule_fix(betas: np.ndarray | None, diffusion_cfg) -> str:
  """What to set so that ``config.diffusion`` gives the file's schedule."""
  fitted = None if betas is None else fit_schedule(betas)
  if fitted is None:
    return (
        "the file's betas are no LDM linear / sqrt_linear schedule: is the file for this " "config?"
    )
  changes = [
      f"--config.diffusion.{key}={_short(value) if isinstance(value, float) else value}"
      for key, value in fitted.items()
      if value != diffusion_cfg.get(key)
  ]
  return "set " + " ".join(changes) + " (the file's schedule)"


def check_schedule(
    state: Mapping[str, np.ndarray], config, *, prefix: str = "", source: str = "state dict"
) -> None:
  """Raises ``CheckpointError`` when a schedule buffer (``prefix + 'betas'``, ...) of ``state``
  differs from what ``config.diffusion`` gives, or ``config.midms.apply_scale_factor`` is on and the
  file's ``scale_factor`` differs from ``config.model.first_stage.scale_factor``. Buffers the file
  lacks are not checked."""
  d = config.diffusion
  expected = DiffusionSchedule.make(
      d.beta_schedule, d.timesteps, d.linear_start, d.linear_end
  ).buffers()
  betas = state.get(prefix + "betas")
  setting = (
      f"beta_schedule {d.beta_schedule}, timesteps {d.timesteps}, "
      f"linear_start {d.linear_start}, linear_end {d.linear_end}"
  )
  for name in SCHEDULE_BUFFERS:
    have = state.get(prefix + name)
    if have is None:
      continue
    want, key = expected[name], prefix + name
    if np.shape(have) != want.shape:
      raise CheckpointError(
          f"{source}: schedule buffer {key} has shape {tuple(np.shape(have))}, config.diffusion "
          f"({setting}) gives {want.shape}: {_schedule_fix(betas, d)}"
      )
    have = np.asarray(have, np.float32)
    bad = ~np.isclose(have, want, rtol=SCHEDULE_RTOL, atol=0.0)
    if bad.any():
      i = int(np.argmax(np.abs(have.astype(np.float64) - want) * bad))
      raise CheckpointError(
          f"{source}: schedule buffer {key} differs from config.diffusion ({setting} gives "
          f"{name}[{i}]={want[i]:.6g}; the file has {have[i]:.6g}): {_schedule_fix(betas, d)}"
      )
  midms_cfg = config.get("midms")
  scale = state.get(prefix + SCALE_FACTOR)
  if scale is not None and midms_cfg is not None and midms_cfg.get("apply_scale_factor", False):
    want = float(config.model.first_stage.get("scale_factor", 1.0))
    if not np.isclose(float(scale), want, rtol=SCHEDULE_RTOL, atol=0.0):
      have = _short(float(scale))
      raise CheckpointError(
          f"{source}: {prefix}{SCALE_FACTOR} is {have} but config.model.first_stage.scale_factor "
          f"is {want} (config.midms.apply_scale_factor is on): set "
          f"--config.model.first_stage.scale_factor={have}"
      )


def _ldm_variables(
    state: Mapping[str, np.ndarray],
    config,
    *,
    prefix: str,
    use_ema: bool,
    keep_ema: bool,
    source: str,
):
  """U-Net and first-stage variables from an LDM state dict whose keys start with ``prefix``.

  ``keep_ema`` adds ``unet_ema`` (U-Net variables from the ``model_ema.*`` shadows),
  ``ema_counters`` (``decay`` float32, ``num_updates`` int32) and the file's ``scale_factor``
  (float32 scalar, if it has one), so that an export can write them back. ``config``: the model
  config, or the whole config (then ``check_schedule`` runs first).
  """
  model_cfg, whole = _split_config(config)
  if whole is not None:
    check_schedule(state, whole, prefix=prefix, source=source)
  abstract = dict(
      unet=build.abstract_unet(model_cfg["unet"]),
      first_stage=build.abstract_first_stage(model_cfg["first_stage"]),
  )
  ema_state = None
  if use_ema or keep_ema:
    ema_state = ldm_ema.ema_state_dict(
        state, ema_prefix=prefix + EMA_PREFIX, model_prefix=prefix + "model.", source=source
    )
  unet, used_unet = variables_from_state_dict(
      ema_state if use_ema else state, abstract["unet"], prefix=prefix + UNET_PREFIX, source=source
  )
  first, used_first = variables_from_state_dict(
      state, abstract["first_stage"], prefix=prefix + FIRST_STAGE_PREFIX, source=source
  )
  variables = dict(unet=unet, first_stage=first)
  if keep_ema:
    variables["unet_ema"], _ = variables_from_state_dict(
        ema_state, abstract["unet"], prefix=prefix + UNET_PREFIX, source=source
    )
    variables["ema_counters"] = _ema_counters(state, prefix + EMA_PREFIX, source)
    if prefix + SCALE_FACTOR in state:
      variables[SCALE_FACTOR] = np.asarray(state[prefix + SCALE_FACTOR], np.float32)
  return variables, used_unet | used_first


def ldm_from_state_dict(
    state: Mapping[str, np.ndarray],
    model_cfg,
    *,
    use_ema: bool = False,
    keep_ema: bool = False,
    source: str = "state dict",
) -> dict[str, Any]:
  """``{'unet', 'first_stage'}`` variables from an LDM state dict (keys as in a Lightning
  ``.ckpt``).

  ``model_cfg``: ``config.model``, or the whole config (then the schedule buffers are checked
  against ``config.diffusion``). ``keep_ema=True`` also returns ``unet_ema``, ``ema_counters`` and
  ``scale_factor`` (see ``_ldm_variables``).
  """
  _require_prefix(state, UNET_PREFIX, source, "an LDM checkpoint")
  variables, used = _ldm_variables(
      state, model_cfg, prefix="", use_ema=use_ema, keep_ema=keep_ema, source=source
  )
  reject_unexpected(state, used, LDM_IGNORABLE, source=source)
  return variables


def load_ldm_checkpoint(
    path, model_cfg, *, use_ema: bool = False, keep_ema: bool = False
) -> dict[str, Any]:
  """``{'unet': variables, 'first_stage': variables}`` from an LDM Lightning ``.ckpt``.

  ``model_cfg``: ``config.model``, or the whole config, which also checks the file's schedule
  buffers against ``config.diffusion`` (``check_schedule``). ``use_ema=True`` takes the U-Net from
  the ``model_ema.*`` shadows (LDM's own sampling scripts do; the official MIDMs code does not).
  ``keep_ema=True`` adds the shadows as ``unet_ema`` (U-Net variables), their ``ema_counters`` and
  the file's ``scale_factor`` if it has one, for a bit-exact re-export (``torch_export``).
  """
  return ldm_from_state_dict(
      state_dict_of(read_checkpoint(path), path),
      model_cfg,
      use_ema=use_ema,
      keep_ema=keep_ema,
      source=str(path),
  )


def first_stage_from_state_dict(
    state: Mapping[str, np.ndarray], first_stage_cfg, source: str = "state dict"
) -> dict[str, Any]:
  """First-stage variables from a standalone autoencoder state dict (``encoder.*``, ``decoder.*``,
  ...)."""
  _require_prefix(state, "encoder.", source, "a first-stage autoencoder checkpoint")
  variables, used = variables_from_state_dict(
      state, build.abstract_first_stage(first_stage_cfg), source=source
  )
  reject_unexpected(state, used, FIRST_STAGE_IGNORABLE, source=source)
  return variables


def load_first_stage_checkpoint(path, first_stage_cfg) -> dict[str, Any]:
  """First-stage variables from a standalone VQ/KL ``.ckpt`` (LDM ``models/first_stage_models``)."""
  return first_stage_from_state_dict(
      state_dict_of(read_checkpoint(path), path), first_stage_cfg, source=str(path)
  )


def midms_from_state_dict(
    state: Mapping[str, np.ndarray],
    model_cfg,
    source: str = "state dict",
    *,
    keep_ema: bool = False,
) -> dict[str, Any]:
  """``{'unet', 'first_stage', 'correspondence'}`` variables from an official MIDMs state dict.

  ``model_cfg``: ``config.model``, or the whole config (then the ``diff_model.`` schedule buffers
  are checked against ``config.diffusion``). ``keep_ema=True`` also returns ``unet_ema``,
  ``ema_counters`` and ``scale_factor`` (see ``_ldm_variables``).
  """
  _require_prefix(state, "diff_model." + UNET_PREFIX, source, "an official MIDMs checkpoint")
  variables, used = _ldm_variables(
      state, model_cfg, prefix="diff_model.", use_ema=False, keep_ema=keep_ema, source=source
  )
  model_cfg, _ = _split_config(model_cfg)
  abstract = build.abstract_correspondence(
      model_cfg["correspondence"], build.latent_size(model_cfg["first_stage"])
  )
  variables["correspondence"], used_corr = variables_from_state_dict(state, abstract, source=source)
  ignorable = tuple("diff_model." + p for p in LDM_IGNORABLE) + MIDMS_IGNORABLE
  reject_unexpected(state, used | used_corr, ignorable, source=source)
  return variables


def load_midms_checkpoint(path, model_cfg, *, keep_ema: bool = False) -> dict[str, Any]:
  """``{'unet', 'first_stage', 'correspondence'}`` variables from an official MIDMs ``.pth``.

  The U-Net is the fine-tuned raw one in ``diff_model.model.diffusion_model.*`` (MIDMs never updates
  the EMA shadows it carries along). ``model_cfg``: ``config.model``, or the whole config, which
  also checks the schedule buffers against ``config.diffusion``. ``keep_ema=True`` adds those
  shadows as ``unet_ema`` (U-Net variables), their ``ema_counters`` and the file's
  ``scale_factor`` if it has one, for a bit-exact re-export (``torch_export``).
  """
  return midms_from_state_dict(
      state_dict_of(read_checkpoint(path), path), model_cfg, source=str(path), keep_ema=keep_ema
  )
