"""Modules from config sections, and their variable shapes without allocating anything.

``config.model.unet`` / ``.first_stage`` / ``.correspondence`` hold exactly the module attributes
(plus ``type`` and ``scale_factor`` for the first stage, which are not module fields).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from midms_jax.models.autoencoder import AutoencoderKL, VQModel
from midms_jax.models.correspondence import CorrespondenceNetworks
from midms_jax.models.unet import UNetModel

_FIRST_STAGE_ONLY = ("type", "scale_factor")
_KL_UNUSED = ("n_embed",)


def _fields(cfg: Mapping[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(cfg).items() if k not in drop}


def build_unet(cfg: Mapping[str, Any]) -> UNetModel:
  return UNetModel(**_fields(cfg))


def build_first_stage(cfg: Mapping[str, Any]) -> VQModel | AutoencoderKL:
  kind = cfg["type"]
  if kind == "vq":
    return VQModel(**_fields(cfg, _FIRST_STAGE_ONLY))
  if kind == "kl":
    return AutoencoderKL(**_fields(cfg, _FIRST_STAGE_ONLY + _KL_UNUSED))
  raise ValueError(f"model.first_stage.type must be 'vq' or 'kl', got {kind!r}")


def build_correspondence(cfg: Mapping[str, Any]) -> CorrespondenceNetworks:
  return CorrespondenceNetworks(**_fields(cfg))


def latent_size(first_stage_cfg: Mapping[str, Any]) -> int:
  """Spatial size of the first stage's latent: resolution / 2^(levels - 1)."""
  return first_stage_cfg["resolution"] // 2 ** (len(first_stage_cfg["ch_mult"]) - 1)


def _abstract(module, *inputs) -> dict[str, Any]:
  """Variables of ``module.init(rng, *inputs)`` as ShapeDtypeStructs (nothing is allocated)."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)


def abstract_unet(cfg: Mapping[str, Any]) -> dict[str, Any]:
  x = jax.ShapeDtypeStruct((1, cfg["image_size"], cfg["image_size"], cfg["in_channels"]), jnp.float32)
  return _abstract(build_unet(cfg), x, jax.ShapeDtypeStruct((1,), jnp.int32))


def abstract_first_stage(cfg: Mapping[str, Any]) -> dict[str, Any]:
  image = jax.ShapeDtypeStruct((1, cfg["resolution"], cfg["resolution"], cfg["in_channels"]), jnp.float32)
  return _abstract(build_first_stage(cfg), image)


def abstract_correspondence(cfg: Mapping[str, Any], size: int) -> dict[str, Any]:
  latent = jax.ShapeDtypeStruct((1, size, size, cfg["latent_channels"]), jnp.float32)
  semantics = jax.ShapeDtypeStruct((1, size, size, cfg["label_channels"]), jnp.float32)
  return _abstract(build_correspondence(cfg), latent, semantics)


def abstract_variables(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """{'unet' | 'first_stage' | 'correspondence': variables as ShapeDtypeStructs}."""
  return dict(unet=abstract_unet(model_cfg["unet"]),
              first_stage=abstract_first_stage(model_cfg["first_stage"]),
              correspondence=abstract_correspondence(model_cfg["correspondence"],
                                                     latent_size(model_cfg["first_stage"])))


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of trainable scalars (the ``params`` collection)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables.get("params", {})))
