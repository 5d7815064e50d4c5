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
"""

import pathlib
from typing import Any, Mapping

import numpy as np

from midms_jax.errors import CheckpointError, first_line
from midms_jax.interop import ldm_ema
from midms_jax.interop.torch_names import reject_unexpected, variables_from_state_dict
from midms_jax.models import build

# LDM ``register_schedule`` buffers: recomputed from the config (midms_jax.diffusion.schedule).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
EMA_COUNTERS = {"decay": np.float32, "num_updates": np.int32}  # LitEma buffers beside the shadows
# What an LDM state dict may hold beside the U-Net and first stage (``scale_factor`` only for scale_by_std
# models; the official MIDMs code ignores it, see config midms.apply_scale_factor).
LDM_IGNORABLE = SCHEDULE_BUFFERS + (EMA_PREFIX, "scale_factor")
# Official MIDMs state dict: ``diffusion_sampler.*`` duplicates ``diff_model.*`` (plus DDIM buffers);
# ``copied_*`` exist after ``set_copy()`` and are never used.
MIDMS_IGNORABLE = ("diffusion_sampler.", "copied_diff_model.", "copied_diffusion_sampler.")
FIRST_STAGE_IGNORABLE = ("loss.",)
CORRESPONDENCE_PREFIXES = ("real_enc.", "iter_enc.", "seg_enc.", "layer.", "phi.", "theta.")


def _require_torch(path: pathlib.Path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{path}: reading PyTorch checkpoints needs torch: pip install 'midms-jax[torch]'") from e
  return torch


def read_checkpoint(path: str | pathlib.Path) -> dict[str, Any]:
  """Loads a ``torch.save`` file (weights only, on CPU) and returns its top-level dict; a ``.safetensors`` file
  (this package's torch-free export) is read without torch as ``{'state_dict': numpy arrays}``."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such checkpoint file")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      return {"state_dict": load_file(str(path))}
    except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own error types
      raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {first_line(e)}") from None
  torch = _require_torch(path)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch.load raises many unrelated types on bad files
    reason = first_line(e)
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {reason}") from None
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
  return dict(obj)


def state_dict_of(checkpoint: Mapping[str, Any], path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The ``state_dict`` entry (or the checkpoint itself if it is a bare state dict) as float32 numpy arrays
  (integer buffers keep their type)."""
  state = checkpoint.get("state_dict", checkpoint)
  if not isinstance(state, Mapping) or not state:
    raise CheckpointError(f"{path}: checkpoint has no 'state_dict' (keys: {sorted(checkpoint)[:8]})")
  if all(isinstance(value, np.ndarray) for value in state.values()):  # read from safetensors
    return {key: value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
            for key, value in state.items()}
  torch = _require_torch(pathlib.Path(path))
  arrays = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach()
    arrays[key] = (value.float() if value.is_floating_point() else value).numpy()
  return arrays


def _require_prefix(state: Mapping[str, np.ndarray], prefix: str, path, kind: str) -> None:
  if not any(k.startswith(prefix) for k in state):
    sample = ", ".join(sorted(state)[:5])
    raise CheckpointError(f"{path}: not {kind}: no '{prefix}*' keys (found e.g. {sample})")


def _ema_counters(state: Mapping[str, np.ndarray], prefix: str, source: str) -> dict[str, np.ndarray]:
  missing = [prefix + name for name in EMA_COUNTERS if prefix + name not in state]
  if missing:
    raise CheckpointError(f"{source}: EMA counter(s) missing: {', '.join(missing)}")
  return {name: np.asarray(state[prefix + name], dtype) for name, dtype in EMA_COUNTERS.items()}


def _ldm_variables(state: Mapping[str, np.ndarray], model_cfg, *, prefix: str, use_ema: bool, keep_ema: bool,
                   source: str):
  """U-Net and first-stage variables from an LDM state dict whose keys start with ``prefix``.

  ``keep_ema`` adds ``unet_ema`` (U-Net variables from the ``model_ema.*`` shadows) and
  ``ema_counters`` (``decay`` float32, ``num_updates`` int32), so that an export can write them back.
  """
  abstract = dict(unet=build.abstract_unet(model_cfg["unet"]),
                  first_stage=build.abstract_first_stage(model_cfg["first_stage"]))
  ema_state = None
  if use_ema or keep_ema:
    ema_state = ldm_ema.ema_state_dict(state, ema_prefix=prefix + EMA_PREFIX, model_prefix=prefix + "model.",
                                       source=source)
  unet, used_unet = variables_from_state_dict(ema_state if use_ema else state, abstract["unet"],
                                              prefix=prefix + UNET_PREFIX, source=source)
  first, used_first = variables_from_state_dict(state, abstract["first_stage"], prefix=prefix + FIRST_STAGE_PREFIX,
                                                source=source)
  variables = dict(unet=unet, first_stage=first)
  if keep_ema:
    variables["unet_ema"], _ = variables_from_state_dict(ema_state, abstract["unet"], prefix=prefix + UNET_PREFIX,
                                                         source=source)
    variables["ema_counters"] = _ema_counters(state, prefix + EMA_PREFIX, source)
  return variables, used_unet | used_first


def ldm_from_state_dict(state: Mapping[str, np.ndarray], model_cfg, *, use_ema: bool = False,
                        keep_ema: bool = False, source: str = "state dict") -> dict[str, Any]:
  """``{'unet', 'first_stage'}`` variables from an LDM state dict (keys as in a Lightning ``.ckpt``).

  ``keep_ema=True`` also returns ``unet_ema`` and ``ema_counters`` (see ``_ldm_variables``).
  """
  _require_prefix(state, UNET_PREFIX, source, "an LDM checkpoint")
  variables, used = _ldm_variables(state, model_cfg, prefix="", use_ema=use_ema, keep_ema=keep_ema, source=source)
  reject_unexpected(state, used, LDM_IGNORABLE, source=source)
  return variables


def load_ldm_checkpoint(path, model_cfg, *, use_ema: bool = False, keep_ema: bool = False) -> dict[str, Any]:
  """``{'unet': variables, 'first_stage': variables}`` from an LDM Lightning ``.ckpt``.

  ``use_ema=True`` takes the U-Net from the ``model_ema.*`` shadows (LDM's own sampling scripts do;
  the official MIDMs code does not). ``keep_ema=True`` adds the shadows as ``unet_ema`` (U-Net
  variables) and their ``ema_counters``, for a bit-exact re-export (``torch_export``).
  """
  return ldm_from_state_dict(state_dict_of(read_checkpoint(path), path), model_cfg, use_ema=use_ema,
                             keep_ema=keep_ema, source=str(path))


def first_stage_from_state_dict(state: Mapping[str, np.ndarray], first_stage_cfg,
                                source: str = "state dict") -> dict[str, Any]:
  """First-stage variables from a standalone autoencoder state dict (``encoder.*``, ``decoder.*``, ...)."""
  _require_prefix(state, "encoder.", source, "a first-stage autoencoder checkpoint")
  variables, used = variables_from_state_dict(state, build.abstract_first_stage(first_stage_cfg), source=source)
  reject_unexpected(state, used, FIRST_STAGE_IGNORABLE, source=source)
  return variables


def load_first_stage_checkpoint(path, first_stage_cfg) -> dict[str, Any]:
  """First-stage variables from a standalone VQ/KL ``.ckpt`` (LDM ``models/first_stage_models``)."""
  return first_stage_from_state_dict(state_dict_of(read_checkpoint(path), path), first_stage_cfg, source=str(path))


def midms_from_state_dict(state: Mapping[str, np.ndarray], model_cfg, source: str = "state dict", *,
                          keep_ema: bool = False) -> dict[str, Any]:
  """``{'unet', 'first_stage', 'correspondence'}`` variables from an official MIDMs state dict.

  ``keep_ema=True`` also returns ``unet_ema`` and ``ema_counters`` (see ``_ldm_variables``).
  """
  _require_prefix(state, "diff_model." + UNET_PREFIX, source, "an official MIDMs checkpoint")
  variables, used = _ldm_variables(state, model_cfg, prefix="diff_model.", use_ema=False, keep_ema=keep_ema,
                                   source=source)
  abstract = build.abstract_correspondence(model_cfg["correspondence"], build.latent_size(model_cfg["first_stage"]))
  variables["correspondence"], used_corr = variables_from_state_dict(state, abstract, source=source)
  ignorable = tuple("diff_model." + p for p in LDM_IGNORABLE) + MIDMS_IGNORABLE
  reject_unexpected(state, used | used_corr, ignorable, source=source)
  return variables


def load_midms_checkpoint(path, model_cfg, *, keep_ema: bool = False) -> dict[str, Any]:
  """``{'unet', 'first_stage', 'correspondence'}`` variables from an official MIDMs ``.pth``.

  The U-Net is the fine-tuned raw one in ``diff_model.model.diffusion_model.*`` (MIDMs never updates
  the EMA shadows it carries along). ``keep_ema=True`` adds those shadows as ``unet_ema`` (U-Net
  variables) and their ``ema_counters``, for a bit-exact re-export (``torch_export``).
  """
  return midms_from_state_dict(state_dict_of(read_checkpoint(path), path), model_cfg, source=str(path),
                               keep_ema=keep_ema)
