"""Every official MIDMs loss term (``utils_training/optimize.py:train_epoch``), as pure functions.

``midms_losses`` combines them from the outputs of ``MIDMs.train_forward`` and the VGG19 features;
weights come from ``config.loss``. All L1/MSE terms are means over all elements, as PyTorch's.
The logged terms are unweighted, like the official TensorBoard scalars.
"""

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from midms_jax.losses.contextual import contextual_loss
from midms_jax.models.layers import join_batches, split_batches, torch_nearest_resize

_FLOAT_EPS = 2.220446049250313e-16
FEATURE_LAYERS = ("r12", "r22", "r32", "r42", "r52")


def l1(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(a - b))


def _unit(f: jax.Array) -> jax.Array:
  return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + _FLOAT_EPS)


def domain_loss(
    condition_features: jax.Array, gt_features: jax.Array, exemplar_features: jax.Array
) -> jax.Array:
  """L_dom: align ``seg_enc(condition)`` with ``real_enc(GT latent)`` per pixel, plain and
  re-weighted element-wise by the (detached) unit exemplar features."""
  t, s = _unit(condition_features), _unit(gt_features)
  r = jax.lax.stop_gradient(_unit(exemplar_features))
  return l1(t, s) + l1(r * t, r * s)


def feature_loss(
    output: Mapping[str, jax.Array], target: Mapping[str, jax.Array], weights
) -> jax.Array:
  """Weighted multi-layer VGG L1 (src path; official weights 1/32, 1/16, 1/8, 1/4, 1 for
  r12..r52)."""
  return sum(
      w * l1(output[name], jax.lax.stop_gradient(target[name]))
      for name, w in zip(FEATURE_LAYERS, weights)
  )


def _avg_pool(x: jax.Array, factor: int) -> jax.Array:
  if factor == 1:
    return x
  b, h, w, c = x.shape
  return jnp.mean(x.reshape(b, h // factor, factor, w // factor, factor, c), axis=(2, 4))


def context_terms(
    output: Mapping[str, jax.Array], exemplar: Mapping[str, jax.Array], h: float, threshold: float
) -> jax.Array:
  """CX of [r52, r42, avgpool2(r32), avgpool4(r22)] (unweighted), output vs detached exemplar
  features."""
  pairs = (("r52", 1), ("r42", 1), ("r32", 2), ("r22", 4))
  return jnp.stack(
      [
          contextual_loss(
              _avg_pool(output[name], k),
              _avg_pool(jax.lax.stop_gradient(exemplar[name]), k),
              h,
              threshold,
          )
          for name, k in pairs
      ]
  )


def warped_segmentation_loss(
    warped_exemplar_seg: jax.Array,
    label_ids: jax.Array,
    exemplar_label_ids: jax.Array,
    num_classes: int,
) -> jax.Array:
  """LSUN warm-up term: NLL of the warped exemplar one-hot against the GT labels on the latent grid,
  ignoring class 0 and classes absent from the exemplar's label map (official weighting)."""
  h, w = warped_exemplar_seg.shape[1:3]
  target = torch_nearest_resize(label_ids[..., None], h, w)[..., 0].astype(jnp.int32)
  log_probs = jnp.log(warped_exemplar_seg + 1e-10)
  nll = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
  # (B, classes)
  present = jnp.any(
      jax.nn.one_hot(exemplar_label_ids.astype(jnp.int32), num_classes, dtype=bool), axis=(1, 2)
  )
  weight = jnp.take_along_axis(present, target.reshape(target.shape[0], -1), axis=1).reshape(
      target.shape
  )
  weight = (weight & (target != 0)).astype(jnp.float32)
  return jnp.sum(nll * weight) / (jnp.sum(weight) + 1e-5)


def midms_losses(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    vgg: Callable[[jax.Array], Mapping[str, jax.Array]] | None,
    loss_cfg,
    *,
    warmup: bool,
    with_context: bool | jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and the unweighted terms, named like the official TensorBoard scalars.

  ``vgg(images)`` returns ReLU features r12..r52 (None: no VGG-based terms). ``warmup`` (static):
  the official warm-up phase, where the first-warp cycle loss is counted a second time as
  ``loss_fb_iterative``. ``with_context`` (bool or traced bool): official ``n_iter > warmup_iter``,
  so one compiled main step serves the first post-warm-up iteration (no context loss) too.
  ``outputs["rewarped_ref"]`` (R, B, ...: the decoded re-warps, present only when
  ``loss_cfg.rewarp`` asks for them) adds ``loss_rewarp``.
  """
  terms = dict(
      loss_domain=domain_loss(
          outputs["trg_matching_feats"],
          outputs["src_matching_feats"],
          outputs["ref_matching_feats"],
      ),
      loss_fb=outputs["loss_fb_first_warp"],
      original_loss=outputs["original_loss"],
      loss_fb_iterative=outputs["loss_fb"],
  )
  if vgg is None:  # no loss network (config.loss.vgg = 'none'): the VGG-based terms are left out
    zero = jnp.zeros((), jnp.float32)
    terms.update(
        loss_feat=zero, loss_perc=zero, cx_terms=jnp.zeros((4,), jnp.float32), loss_context=zero
    )
  else:
    # decoded re-warps (R, B, ...), only with loss_cfg.rewarp
    rewarped = outputs.get("rewarped_ref")
    images = [outputs["warped_ref"], outputs["warped_src"], batch["image"], batch["ref"]]
    images += [] if rewarped is None else list(rewarped)
    split = {name: split_batches(f, len(images)) for name, f in vgg(join_batches(images)).items()}
    warped_ref, warped_src, gt, exemplar = (
        {name: parts[i] for name, parts in split.items()} for i in range(4)
    )
    terms["loss_feat"] = feature_loss(warped_src, gt, loss_cfg.feat_layer_weights)
    terms["loss_perc"] = l1(
        warped_ref[loss_cfg.perc_layer], jax.lax.stop_gradient(gt[loss_cfg.perc_layer])
    )
    cx = context_terms(warped_ref, exemplar, loss_cfg.context_h, loss_cfg.context_threshold)
    terms["cx_terms"] = cx
    terms["loss_context"] = jnp.dot(jnp.asarray(loss_cfg.context_weights, jnp.float32), cx)
    if rewarped is not None:  # every re-warp against the same ground truth
      layer = loss_cfg.perc_layer
      terms["loss_rewarp"] = l1(jnp.stack(split[layer][4:]), jax.lax.stop_gradient(gt[layer])[None])
  total = (
      loss_cfg.domain * terms["loss_domain"]
      + loss_cfg.fb * terms["loss_fb"]
      + loss_cfg.perc * terms["loss_perc"]
      + loss_cfg.feat * terms["loss_feat"]
      + loss_cfg.original * terms["original_loss"]
      + loss_cfg.fb_iterative * terms["loss_fb_iterative"]
  )
  total = total + loss_cfg.context * jnp.asarray(with_context, jnp.float32) * terms["loss_context"]
  if "loss_rewarp" in terms:
    total = total + loss_cfg.rewarp * terms["loss_rewarp"]
  if warmup and loss_cfg.segmentation:
    # Class ids back from the one-hot conditions (exact: the LSUN source's maps hold one 1 per
    # pixel).
    ids = lambda one_hot: jnp.argmax(one_hot, axis=-1)
    terms["warped_segmentation_loss"] = warped_segmentation_loss(
        outputs["iter_warped_ref_seg"],
        ids(batch["label"]),
        ids(batch["label_ref"]),
        outputs["iter_warped_ref_seg"].shape[-1],
    )
    total = total + loss_cfg.segmentation * terms["warped_segmentation_loss"]
  terms["loss_total"] = total
  return total, terms
