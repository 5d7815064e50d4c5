"""CoCosNet's style relevance and semantic consistency: cosine similarities of VGG19 features.

The network is the loss network (``midms_jax.models.vgg.VGG19``, CoCosNet's ``vgg19_conv.pth``,
Caffe preprocessing of [-1, 1] images); ``rXY`` is relu X_Y.

* Semantic consistency (output vs the ground truth of its condition): per high-level layer relu3_2,
  relu4_2, relu5_2 the cosine similarity of the two whole feature maps (flattened), averaged over
  the three layers.
* Style relevance (output vs its exemplar): colour from relu1_2, texture from relu2_2. Per region,
  the channel-wise mean feature of the output and of the exemplar and their cosine similarity; the
  image's score is the mean over the regions that cover at least ``min_fraction`` of both images
  (CoCosNet compares semantically corresponding regions). Regions are label ids ``(B, H, W)`` of the
  output's condition and the exemplar's (nearest-subsampled to the layer's grid); without ids the
  whole image is one region, as it is when no region is shared.

ReLU features are non-negative, so every score lies in [0, 1]; an image against itself scores 1.
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from midms_jax.models.vgg import VGG19

SEMANTIC_LAYERS = ("r32", "r42", "r52")
STYLE_LAYERS = {"colour": "r12", "texture": "r22"}
EPS = 1e-8


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity along the last axis."""
  dot = jnp.sum(a * b, axis=-1)
  return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), EPS)


def semantic_consistency(
    output: Mapping[str, jax.Array], truth: Mapping[str, jax.Array]
) -> jax.Array:
  """``(B,)``: mean over ``SEMANTIC_LAYERS`` of the cosine similarity of the flattened feature
  maps."""
  flat = lambda x: x.reshape(x.shape[0], -1)
  return jnp.mean(
      jnp.stack([cosine(flat(output[k]), flat(truth[k])) for k in SEMANTIC_LAYERS]), axis=0
  )


def region_means(
    features: jax.Array, ids: jax.Array, num_regions: int
) -> tuple[jax.Array, jax.Array]:
  """Mean feature ``(B, K, C)`` and pixel fraction ``(B, K)`` of each region; ``ids`` ``(B, H, W)``
  in ``[0, num_regions)`` at a multiple of the features' grid (nearest-subsampled: each cell's first
  pixel).
  """
  _, h, w, _ = features.shape
  step = ids.shape[1] // h
  weights = jax.nn.one_hot(ids[:, ::step, ::step][:, :h, :w], num_regions, dtype=features.dtype)
  counts = jnp.sum(weights, axis=(1, 2))
  sums = jnp.einsum("bhwk,bhwc->bkc", weights, features, precision=jax.lax.Precision.HIGHEST)
  return sums / jnp.maximum(counts, 1)[..., None], counts / (h * w)


def region_similarity(
    output: jax.Array,
    exemplar: jax.Array,
    output_ids: jax.Array | None,
    exemplar_ids: jax.Array | None,
    num_regions: int,
    min_fraction: float,
) -> jax.Array:
  """``(B,)`` style score of one layer: mean cosine similarity of the region means over shared
  regions."""
  whole = cosine(jnp.mean(output, axis=(1, 2)), jnp.mean(exemplar, axis=(1, 2)))
  if output_ids is None:
    return whole
  mean_o, share_o = region_means(output, output_ids, num_regions)
  mean_e, share_e = region_means(exemplar, exemplar_ids, num_regions)
  shared = ((share_o >= min_fraction) & (share_e >= min_fraction)).astype(output.dtype)
  count = jnp.sum(shared, axis=1)
  by_region = jnp.sum(cosine(mean_o, mean_e) * shared, axis=1) / jnp.maximum(count, 1)
  return jnp.where(count > 0, by_region, whole)


def style_relevance(
    output: Mapping[str, jax.Array],
    exemplar: Mapping[str, jax.Array],
    output_ids: jax.Array | None = None,
    exemplar_ids: jax.Array | None = None,
    *,
    num_regions: int = 1,
    min_fraction: float = 0.01
) -> dict[str, jax.Array]:
  """``{'colour': (B,), 'texture': (B,)}`` from relu1_2 / relu2_2 features (module doc)."""
  return {
      name: region_similarity(
          output[layer], exemplar[layer], output_ids, exemplar_ids, num_regions, min_fraction
      )
      for name, layer in STYLE_LAYERS.items()
  }


def scores(
    vgg_variables,
    output: jax.Array,
    truth: jax.Array,
    exemplar: jax.Array,
    output_ids: jax.Array | None = None,
    exemplar_ids: jax.Array | None = None,
    *,
    widths: Sequence[int] = (64, 128, 256, 512, 512),
    num_regions: int = 1,
    min_fraction: float = 0.01
) -> dict[str, jax.Array]:
  """``(B,)`` each: ``semantic_consistency``, ``style_colour``, ``style_texture`` of [-1, 1] NHWC
  batches."""
  vgg = VGG19(tuple(widths))
  features_out = vgg.apply(vgg_variables, output, tuple(STYLE_LAYERS.values()) + SEMANTIC_LAYERS)
  features_truth = vgg.apply(vgg_variables, truth, SEMANTIC_LAYERS)
  features_exemplar = vgg.apply(vgg_variables, exemplar, tuple(STYLE_LAYERS.values()))
  style = style_relevance(
      features_out,
      features_exemplar,
      output_ids,
      exemplar_ids,
      num_regions=num_regions,
      min_fraction=min_fraction,
  )
  return dict(
      semantic_consistency=semantic_consistency(features_out, features_truth),
      style_colour=style["colour"],
      style_texture=style["texture"],
  )
