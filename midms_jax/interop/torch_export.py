"""Export of Flax variables as the official PyTorch checkpoints, in the official key layout.

Builders return ``{key: numpy array}`` state dicts in PyTorch layout and names (the mechanical
inverse of the import, ``torch_names.torch_key`` / ``to_torch_layout``), checked against the config:

* ``midms_state_dict``: ``MIDMs.state_dict()`` as the official ``train.py`` saves it:
  ``diff_model.*`` (12 schedule buffers, ``model.diffusion_model.*``, ``model_ema.*``,
  ``first_stage_model.*``), the correspondence networks (``real_enc.*`` with
  ``weight_orig``/``weight_u``/``weight_v``, ...) and, with ``layout="full"``,
  ``diffusion_sampler.model.*`` (the *same* arrays as ``diff_model.*``, which ``torch.save`` stores
  once) plus the sampler's 13 DDIM buffers (S = ``config.midms.ddim_steps``, eta =
  ``config.midms.loop_eta``), as after a training forward. ``layout="minimal"`` leaves out every
  ``diffusion_sampler.*`` key; the official ``inference.py`` (``strict=False``) loads either.
* ``ldm_state_dict``: ``LatentDiffusion.state_dict()`` of a Lightning ``.ckpt`` (same keys without
  ``diff_model.``; ``scale_factor`` as ``scale_by_std`` models store it: the variables' optional
  ``scale_factor`` entry, which the importers return with ``keep_ema=True`` when the file has one,
  else the config's first-stage ``scale_factor`` when it is not 1).
* ``first_stage_state_dict``: a standalone first-stage checkpoint (``encoder.*``, ``decoder.*``,
  ...).

EMA: LDM's ``LitEma`` stores ``model_ema.decay`` (float32), ``model_ema.num_updates`` (int32) and
one shadow per U-Net parameter, named relative to ``LatentDiffusion.model`` with the dots removed
(``model_ema.diffusion_modelinput_blocks00weight``). The shadows are the variables' optional
``unet_ema`` entry and the counters their optional ``ema_counters`` entry (what the importers return
with ``keep_ema=True``). Without ``unet_ema`` the raw U-Net is written as the shadows (the official
MIDMs never updates them); without ``ema_counters``, decay 0.9999 and num_updates 0.

Schedule buffers are recomputed from ``config.diffusion`` (``diffusion.schedule``); for the official
fixtures every one of them, the sampler's float32 ``sqrt``/``log`` buffers included, is
bit-identical to the file (tests/interop/test_torch_export.py). dtypes: ``num_updates`` int32,
everything else float32.

Writers write to a temporary file in the target directory and rename it at the end, so a target is
never half-written; failures to write raise ``CheckpointError`` naming the path. Leaves are moved to
the host one at a time and ``torch.from_numpy`` wraps them without copying, so the host never holds
more than one copy of the model; torch is imported only by the ``.pth``/``.ckpt`` writers.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import stat
import uuid
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from midms_jax.diffusion.schedule import DDIMSchedule, DiffusionSchedule
from midms_jax.errors import CheckpointError
from midms_jax.interop.torch_import import EMA_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX
from midms_jax.interop.torch_names import expected_torch_keys, to_torch_layout, torch_key, torch_shape
from midms_jax.models import build

LAYOUTS = ("full", "minimal")
DEFAULT_EMA_DECAY = 0.9999
DEFAULT_EMA_NUM_UPDATES = 0
MIDMS_LDM_PREFIX = "diff_model."
SAMPLER_PREFIX = "diffusion_sampler."
_VARIABLE_ENTRIES = (
    "unet",
    "first_stage",
    "correspondence",
    "unet_ema",
    "ema_counters",
    "scale_factor",
)

StateDict = dict[str, np.ndarray]


def _contiguous(array: np.ndarray) -> np.ndarray:
  """C-contiguous without copying when it already is (``np.ascontiguousarray`` would make 0-d arrays
  1-d)."""
  return array if array.flags.c_contiguous else array.copy(order="C")


def _host_leaf(name: str, leaf: Any) -> np.ndarray:
  """One variable as a contiguous host array in PyTorch layout (floats as float32).

  Accelerator arrays go through a CPU device first: ``np.asarray`` on them would cache a host copy
  inside the array for as long as the caller keeps the variables.
  """
  if isinstance(leaf, jax.Array) and any(d.platform != "cpu" for d in leaf.devices()):
    # no CPU backend (JAX_PLATFORMS without cpu): copy directly
    with contextlib.suppress(RuntimeError):
      leaf = jax.device_put(leaf, jax.devices("cpu")[0])
  array = to_torch_layout(name, np.asarray(leaf))
  if jnp.issubdtype(array.dtype, jnp.floating):
    array = array.astype(np.float32, copy=False)
  return _contiguous(array)


def _part_state_dict(
    variables: Mapping[str, Any], abstract: Mapping[str, Any], what: str
) -> StateDict:
  """State dict (no prefix) of one model part, after checking its keys and shapes against the
  config."""
  flat = traverse_util.flatten_dict(dict(variables))
  have = {torch_key(path[1:]): torch_shape(path[-1], np.shape(leaf)) for path, leaf in flat.items()}
  want = expected_torch_keys(abstract)
  if have != want:
    problems = sorted(f"{key} missing" for key in want.keys() - have.keys())
    problems += sorted(f"{key} unexpected" for key in have.keys() - want.keys())
    problems += sorted(
        f"{key} has shape {have[key]}, config expects {want[key]}"
        for key in want.keys() & have.keys()
        if have[key] != want[key]
    )
    raise ValueError(
        f"export: '{what}' variables do not match the config ({len(problems)} problem(s)): "
        + "; ".join(problems[:4])
        + (f"; ... ({len(problems) - 4} more)" if len(problems) > 4 else "")
    )
  return {torch_key(path[1:]): _host_leaf(path[-1], leaf) for path, leaf in flat.items()}


def _require(variables: Mapping[str, Any], names: tuple[str, ...]) -> None:
  unknown = sorted(set(variables) - set(_VARIABLE_ENTRIES))
  if unknown:
    raise ValueError(
        f"export: unknown variables entries {unknown}; expected some of {list(_VARIABLE_ENTRIES)}"
    )
  missing = [name for name in names if name not in variables]
  if missing:
    raise ValueError(f"export: variables lack {missing} (have {sorted(variables)})")


def diffusion_schedule(config) -> DiffusionSchedule:
  """The LDM schedule of ``config.diffusion`` (its buffers are those of the state dicts)."""
  cfg = config.diffusion
  return DiffusionSchedule.make(cfg.beta_schedule, cfg.timesteps, cfg.linear_start, cfg.linear_end)


def sampler_buffers(schedule: DiffusionSchedule, num_steps: int, eta: float) -> StateDict:
  """The 13 buffers of the official ``DDIMSampler`` after ``make_schedule(num_steps, eta)``.

  The sampler copies betas / alphas_cumprod(_prev) and recomputes the other q-buffers in float32
  numpy from the float32 ``alphas_cumprod`` (unlike the LDM's float64 ones, so some differ in the
  last bit).
  """
  ac, one = schedule.alphas_cumprod, np.float32(1.0)
  ddim = DDIMSchedule.make(schedule, num_steps, eta)
  return dict(
      betas=schedule.betas,
      alphas_cumprod=ac,
      alphas_cumprod_prev=schedule.alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(one - ac),
      log_one_minus_alphas_cumprod=np.log(one - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(one / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(one / ac - one),
      ddim_sigmas=ddim.ddim_sigmas,
      ddim_alphas=ddim.ddim_alphas,
      ddim_alphas_prev=ddim.ddim_alphas_prev,
      ddim_sqrt_one_minus_alphas=ddim.ddim_sqrt_one_minus_alphas,
      ddim_sigmas_for_original_num_steps=ddim.ddim_sigmas_for_original_num_steps,
  )


def ema_key(unet_key: str) -> str:
  """LitEma's buffer for U-Net key ``unet_key``.

  ``input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``.
  """
  return EMA_PREFIX + (UNET_PREFIX[len("model.") :] + unet_key).replace(".", "")


def _ldm_entries(variables: Mapping[str, Any], config, prefix: str) -> StateDict:
  """``LatentDiffusion.state_dict()`` in the official order, keys prefixed with ``prefix``."""
  model_cfg = config.model
  abstract_unet = build.abstract_unet(model_cfg.unet)
  unet = _part_state_dict(variables["unet"], abstract_unet, "unet")
  ema = (
      _part_state_dict(variables["unet_ema"], abstract_unet, "unet_ema")
      if "unet_ema" in variables
      else unet
  )
  counters = dict(variables.get("ema_counters", {}))
  state = {prefix + name: buffer for name, buffer in diffusion_schedule(config).buffers().items()}
  scale_factor = variables.get("scale_factor", model_cfg.first_stage.get("scale_factor", 1.0))
  if "scale_factor" in variables or scale_factor != 1.0:
    state[prefix + "scale_factor"] = np.asarray(scale_factor, np.float32)
  state.update({prefix + UNET_PREFIX + key: value for key, value in unet.items()})
  state[prefix + EMA_PREFIX + "decay"] = np.asarray(
      counters.get("decay", DEFAULT_EMA_DECAY), np.float32
  )
  state[prefix + EMA_PREFIX + "num_updates"] = np.asarray(
      counters.get("num_updates", DEFAULT_EMA_NUM_UPDATES), np.int32
  )
  state.update({prefix + ema_key(key): ema[key] for key in unet})
  first_stage = _part_state_dict(
      variables["first_stage"], build.abstract_first_stage(model_cfg.first_stage), "first_stage"
  )
  state.update({prefix + FIRST_STAGE_PREFIX + key: value for key, value in first_stage.items()})
  return state


def midms_state_dict(variables: Mapping[str, Any], config, *, layout: str = "full") -> StateDict:
  """The official ``MIDMs.state_dict()`` from ``{'unet', 'first_stage', 'correspondence'}``
  variables.

  ``layout="full"`` adds ``diffusion_sampler.*`` as a trained official model has it; ``"minimal"``
  leaves those duplicates out. Optional ``unet_ema`` / ``ema_counters`` entries: see the module doc.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"export: layout must be one of {LAYOUTS}, got {layout!r}")
  _require(variables, ("unet", "first_stage", "correspondence"))
  ldm = _ldm_entries(variables, config, MIDMS_LDM_PREFIX)
  state = dict(ldm)
  if layout == "full":
    buffers = sampler_buffers(
        diffusion_schedule(config), config.midms.ddim_steps, config.midms.loop_eta
    )
    state.update({SAMPLER_PREFIX + name: buffer for name, buffer in buffers.items()})
    state.update(
        {
            SAMPLER_PREFIX + "model." + key[len(MIDMS_LDM_PREFIX) :]: value
            for key, value in ldm.items()
        }
    )
  size = build.latent_size(config.model.first_stage)
  state.update(
      _part_state_dict(
          variables["correspondence"],
          build.abstract_correspondence(config.model.correspondence, size),
          "correspondence",
      )
  )
  return state


def ldm_state_dict(variables: Mapping[str, Any], config) -> StateDict:
  """``LatentDiffusion.state_dict()`` of an LDM Lightning ``.ckpt`` from ``{'unet', 'first_stage'}``
  variables."""
  _require(variables, ("unet", "first_stage"))
  return _ldm_entries(variables, config, "")


def ldm_state_dict_of_midms(midms: Mapping[str, np.ndarray]) -> StateDict:
  """The LDM state dict inside a ``midms_state_dict`` (its ``diff_model.*`` entries, the same
  arrays): equal to ``ldm_state_dict`` of the same variables, without a second host copy."""
  return {
      key[len(MIDMS_LDM_PREFIX) :]: value
      for key, value in midms.items()
      if key.startswith(MIDMS_LDM_PREFIX)
  }


def first_stage_state_dict(variables: Mapping[str, Any], config) -> StateDict:
  """A standalone first-stage state dict (``encoder.*``, ``decoder.*``, ...) from
  ``variables['first_stage']``."""
  _require(variables, ("first_stage",))
  return _part_state_dict(
      variables["first_stage"], build.abstract_first_stage(config.model.first_stage), "first_stage"
  )


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> pathlib.Path:
  """Runs ``write(temporary path)`` in ``path``'s directory, then renames the result to ``path``.

  Every file gets the mode of a plain new file (0666 less the umask, e.g. 0644), whatever ``write``
  did (safetensors writes 0600)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "xb"):
      pass
    mode = stat.S_IMODE(tmp.stat().st_mode)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot write the export there: {e.strerror or e}") from None
  try:
    write(str(tmp))
    os.chmod(tmp, mode)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise CheckpointError(f"{path}: writing the export failed: {e.strerror or e}") from None
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def _require_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("writing .pth/.ckpt files needs torch: pip install 'midms-jax[torch]'") from e
  return torch


def _torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """torch tensors over the arrays' memory; arrays over the same memory become one tensor (stored
  once)."""
  torch = _require_torch()
  tensors, result = {}, {}
  # read-only arrays (schedules, JAX host views) are never written to
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    for key, value in state_dict.items():
      array = np.asarray(value)
      identity = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)
      if identity not in tensors:
        tensors[identity] = torch.from_numpy(array)
      result[key] = tensors[identity]
  return result


def save_midms_pth(
    path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *, epoch: int = 0
) -> pathlib.Path:
  """``torch.save({'epoch', 'state_dict'})`` as the official ``inference.py`` reads it
  (``["state_dict"]``)."""
  torch = _require_torch()
  obj = {"epoch": int(epoch), "state_dict": _torch_state_dict(state_dict)}
  return _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_ldm_ckpt(
    path: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    *,
    global_step: int = 0,
    epoch: int = 0,
) -> pathlib.Path:
  """A Lightning-style ``{'state_dict', 'global_step', 'epoch'}`` (LDM or first-stage ``.ckpt``)."""
  torch = _require_torch()
  obj = {
      "state_dict": _torch_state_dict(state_dict),
      "global_step": int(global_step),
      "epoch": int(epoch),
  }
  return _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(
    path: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> pathlib.Path:
  """The state dict as a ``.safetensors`` file (no torch needed); shared arrays are written per
  key."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  arrays = {key: _contiguous(np.asarray(value)) for key, value in state_dict.items()}
  return _atomic_write(
      path, lambda tmp: save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
  )


def tensor_sha256(array: np.ndarray) -> str:
  """sha256 of the array's C-order little-endian bytes (the bytes a ``.safetensors`` file holds)."""
  array = np.asarray(array)
  return hashlib.sha256(
      _contiguous(array.astype(array.dtype.newbyteorder("<"), copy=False)).data
  ).hexdigest()


def write_manifest(
    path: str | os.PathLike,
    config,
    step: int,
    files: Mapping[str, Mapping[str, np.ndarray]],
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """``export.json``: the config, the training step, and per written file the shape, dtype and
  ``tensor_sha256`` of each of its tensors (``files``: file name -> its state dict); ``extra``:
  further top-level entries (JSON-serialisable)."""
  # by array identity: files and diffusion_sampler.model.* share arrays
  digests: dict[int, str] = {}
  listed = {}
  for name, state_dict in files.items():
    tensors = {}
    for key, value in state_dict.items():
      array = np.asarray(value)
      if id(value) not in digests:
        digests[id(value)] = tensor_sha256(array)
      tensors[key] = {
          "shape": list(array.shape),
          "dtype": array.dtype.name,
          "sha256": digests[id(value)],
      }
    listed[name] = {"tensors": tensors}
  manifest = {
      "config": json.loads(config.to_json_best_effort()),
      "step": int(step),
      "files": listed,
      **(extra or {}),
  }
  text = json.dumps(manifest, indent=1) + "\n"
  return _atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
