"""Modules from config sections, and their variable shapes without allocating anything.

``config.model.unet`` / ``.first_stage`` / ``.correspondence`` hold exactly the module attributes
(plus ``type`` and ``scale_factor`` for the first stage, which are not module fields).
"""

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from midms_jax.models.autoencoder import AutoencoderKL, VQModel
from midms_jax.models.correspondence import CorrespondenceNetworks
from midms_jax.models.pixel_shuffle import PixelShuffleFirstStage
from midms_jax.models.unet import UNetModel

_FIRST_STAGE_ONLY = ("type", "scale_factor")
COMPUTE_DTYPES = ("float32", "bfloat16")
_KL_UNUSED = ("n_embed",)


def _fields(cfg: Mapping[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
  return {
      k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(cfg).items() if k not in drop
  }


def compute_dtype(name: str) -> jnp.dtype:
  """``config.dtype`` ('float32' or 'bfloat16') as a dtype; anything else is a one-line error."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
  return jnp.dtype(name)


def build_unet(
    cfg: Mapping[str, Any], dtype=jnp.float32, remat_blocks: bool = False, attention_chunk: int = 0
) -> UNetModel:
  """``remat_blocks``: recompute each input/middle/output block in the backward pass
  (``config.remat``); ``attention_chunk``: queries per attention block (``config.attention_chunk``;
  0: all at once)."""
  return UNetModel(
      **_fields(cfg), dtype=dtype, remat_blocks=remat_blocks, attention_chunk=attention_chunk
  )


def build_first_stage(
    cfg: Mapping[str, Any], dtype=jnp.float32, remat_blocks: bool = False
) -> VQModel | AutoencoderKL | PixelShuffleFirstStage:
  """``remat_blocks``: recompute the decoder's ResNet blocks in the backward pass (VQ, KL)."""
  kind = cfg["type"]
  if kind == "pixel_shuffle":
    return PixelShuffleFirstStage(**_fields(cfg, _FIRST_STAGE_ONLY), dtype=dtype)
  if kind == "vq":
    return VQModel(**_fields(cfg, _FIRST_STAGE_ONLY), dtype=dtype, remat_blocks=remat_blocks)
  if kind == "kl":
    return AutoencoderKL(
        **_fields(cfg, _FIRST_STAGE_ONLY + _KL_UNUSED), dtype=dtype, remat_blocks=remat_blocks
    )
  raise ValueError(f"model.first_stage.type must be 'vq', 'kl' or 'pixel_shuffle', got {kind!r}")


def build_correspondence(cfg: Mapping[str, Any], dtype=jnp.float32) -> CorrespondenceNetworks:
  return CorrespondenceNetworks(**_fields(cfg), dtype=dtype)


def latent_size(first_stage_cfg: Mapping[str, Any]) -> int:
  """Spatial size of the first stage's latent: resolution / 2^(levels - 1)."""
  return first_stage_cfg["resolution"] // 2 ** (len(first_stage_cfg["ch_mult"]) - 1)


def unet_inputs(cfg: Mapping[str, Any]) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Batch-1 (x, timesteps) with which ``init`` creates every U-Net variable."""
  size = cfg["image_size"]
  return (
      jax.ShapeDtypeStruct((1, size, size, cfg["in_channels"]), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.int32),
  )


def first_stage_inputs(cfg: Mapping[str, Any]) -> tuple[jax.ShapeDtypeStruct, ...]:
  """A batch-1 image at the first stage's resolution."""
  return (
      jax.ShapeDtypeStruct(
          (1, cfg["resolution"], cfg["resolution"], cfg["in_channels"]), jnp.float32
      ),
  )


def correspondence_inputs(cfg: Mapping[str, Any], size: int) -> tuple[jax.ShapeDtypeStruct, ...]:
  """A batch-1 (latent, condition) pair on the ``size`` x ``size`` latent grid."""
  return (
      jax.ShapeDtypeStruct((1, size, size, cfg["latent_channels"]), jnp.float32),
      jax.ShapeDtypeStruct((1, size, size, cfg["label_channels"]), jnp.float32),
  )


def _modules_and_inputs(model_cfg: Mapping[str, Any]) -> dict[str, tuple[Any, tuple]]:
  size = latent_size(model_cfg["first_stage"])
  return dict(
      unet=(build_unet(model_cfg["unet"]), unet_inputs(model_cfg["unet"])),
      first_stage=(
          build_first_stage(model_cfg["first_stage"]),
          first_stage_inputs(model_cfg["first_stage"]),
      ),
      correspondence=(
          build_correspondence(model_cfg["correspondence"]),
          correspondence_inputs(model_cfg["correspondence"], size),
      ),
  )


def _abstract(module, inputs) -> dict[str, Any]:
  """Variables of ``module.init(rng, *inputs)`` as ShapeDtypeStructs (nothing is allocated)."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)


def abstract_unet(cfg: Mapping[str, Any]) -> dict[str, Any]:
  return _abstract(build_unet(cfg), unet_inputs(cfg))


def abstract_first_stage(cfg: Mapping[str, Any]) -> dict[str, Any]:
  return _abstract(build_first_stage(cfg), first_stage_inputs(cfg))


def abstract_correspondence(cfg: Mapping[str, Any], size: int) -> dict[str, Any]:
  return _abstract(build_correspondence(cfg), correspondence_inputs(cfg, size))


def abstract_variables(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """{'unet' | 'first_stage' | 'correspondence': variables as ShapeDtypeStructs}."""
  return {
      name: _abstract(module, inputs)
      for name, (module, inputs) in _modules_and_inputs(model_cfg).items()
  }


def init_variables(
    model_cfg: Mapping[str, Any], rng: jax.Array, parts: Sequence[str] | None = None
) -> dict[str, Any]:
  """Randomly initialised ``{'unet', 'first_stage', 'correspondence'}`` variables (PyTorch-style
  inits), or only those named in ``parts``; each part's values do not depend on which others are
  built."""
  modules = _modules_and_inputs(model_cfg)
  keys = dict(zip(modules, jax.random.split(rng, len(modules))))
  return {
      name: jax.jit(module.init)(keys[name], *(jnp.zeros(x.shape, x.dtype) for x in inputs))
      for name, (module, inputs) in modules.items()
      if parts is None or name in parts
  }


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of trainable scalars (the ``params`` collection)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables.get("params", {})))
