"""Translation quality against ground truth, for data sets that have it (the embedded synthetic
one).

For each held-out pair (condition, exemplar, ground truth) three images are scored against the
ground truth with PSNR (dB, on [-1, 1] images, ``image_quality.psnr``) and LPIPS (v0.1, VGG;
``lpips.LPIPS``):

* ``midms``: the model's translation (``MIDMs.translate``, refinement included by default);
* ``exemplar``: the exemplar copied as it is (what a collapsed model outputs);
* ``initial_warp``: the single-shot warp of the same model (initial matching only, decoded, no
  diffusion).

A model that learnt exemplar-based translation beats both baselines. Pair ``i`` of the stream uses
the key ``inference.pair_key(seed, i)``, so the numbers are reproducible and independent of the
batch size.
"""

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from midms_jax import inference
from midms_jax.metrics.image_quality import psnr
from midms_jax.metrics.lpips import LPIPS
from midms_jax.midms.model import MIDMs

METHODS = ("midms", "exemplar", "initial_warp")
METRICS = ("psnr", "lpips")


def pair_scores(
    model: MIDMs,
    variables: Mapping[str, Any],
    lpips_variables: Mapping[str, Any],
    batch: Mapping[str, jax.Array],
    keys: jax.Array,
    *,
    refine: bool = True,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """(``{'<method>/<metric>': (B,)}``, the scored images ``{method: (B, H, W, 3)}``) for one batch;
  ``keys`` ``(B, 2)``: one PRNG key per pair."""
  out = inference.translate_pairs(
      model,
      variables,
      batch["label"],
      batch["ref"],
      batch["label_ref"],
      keys,
      refine=refine,
      outputs=("image", "initial_warp_image"),
  )
  images = dict(
      midms=jnp.clip(out["image"], -1, 1),
      exemplar=batch["ref"],
      initial_warp=jnp.clip(out["initial_warp_image"], -1, 1),
  )
  truth = batch["image"]
  scores = {}
  for method, image in images.items():
    scores[f"{method}/psnr"] = psnr(image, truth)
    scores[f"{method}/lpips"] = LPIPS().apply(lpips_variables, image, truth)
  return scores, images


def evaluate(
    model: MIDMs,
    variables: Mapping[str, Any],
    lpips_variables: Mapping[str, Any],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    seed: int = 0,
    refine: bool = True,
    keep_images: int = 0,
    on_batch: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
  """Mean PSNR and LPIPS per method over every pair of ``batches``: ``{'midms': {'psnr', 'lpips'},
  'exemplar': {...}, 'initial_warp': {...}, 'pairs':
  n}``; with ``keep_images`` also ``'images'``: ``{method: (k, H, W, 3)}`` of the first ``k =
  keep_images`` pairs (at most all). ``on_batch`` is called after each batch (a progress bar's
  update)."""
  score = jax.jit(functools.partial(pair_scores, model, refine=refine))
  sums = {f"{m}/{k}": 0.0 for m in METHODS for k in METRICS}
  kept: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
  count = 0
  for batch in batches:
    size = len(batch["image"])
    keys = inference.pair_keys(seed, count, size)
    scores, images = score(variables, lpips_variables, dict(batch), keys)
    for name, values in jax.device_get(scores).items():
      sums[name] += float(np.sum(np.asarray(values, np.float64)))
    if count < keep_images:
      for method, image in jax.device_get(images).items():
        kept[method].append(np.asarray(image)[: keep_images - count])
    count += size
    on_batch()
  if not count:
    raise ValueError("evaluate: no pairs to score (empty batches)")
  result: dict[str, Any] = {m: {k: sums[f"{m}/{k}"] / count for k in METRICS} for m in METHODS}
  result["pairs"] = count
  if keep_images:
    result["images"] = {m: np.concatenate(parts) for m, parts in kept.items()}
  return result
