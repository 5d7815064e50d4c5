"""Translation quality against ground truth, for data sets that have it (the embedded synthetic one).

For each held-out pair (condition, exemplar, ground truth) three images are scored against the ground
truth with PSNR (dB, on [-1, 1] images, ``image_quality.psnr``) and LPIPS (v0.1, VGG; ``lpips.LPIPS``):

* ``midms``: the model's translation (``MIDMs.translate``, refinement included by default);
* ``exemplar``: the exemplar copied as it is (what a collapsed model outputs);
* ``initial_warp``: the single-shot warp of the same model (initial matching only, decoded, no diffusion).

A model that learnt exemplar-based translation beats both baselines. Pair ``i`` of the stream uses the key
``fold_in(PRNGKey(seed), i)``, so the numbers are reproducible and independent of the batch size.
"""

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from midms_jax.metrics.image_quality import psnr
from midms_jax.metrics.lpips import LPIPS
from midms_jax.models.midms import MIDMs

METHODS = ("midms", "exemplar", "initial_warp")
METRICS = ("psnr", "lpips")


def pair_scores(model: MIDMs, variables: Mapping[str, Any], lpips_variables: Mapping[str, Any],
                batch: Mapping[str, jax.Array], keys: jax.Array, *, refine: bool = True) -> dict[str, jax.Array]:
  """``{'<method>/<metric>': (B,)}`` for one batch; ``keys`` ``(B, 2)``: one PRNG key per pair."""
  def translate_one(condition, exemplar, exemplar_condition, key):
    out = model.translate(variables, condition[None], exemplar[None], exemplar_condition[None], key, refine=refine)
    return out["image"][0], model.decode(variables, out["initial_warp"])[0]

  output, warp = jax.vmap(translate_one)(batch["label"], batch["ref"], batch["label_ref"], keys)
  images = dict(midms=jnp.clip(output, -1, 1), exemplar=batch["ref"], initial_warp=jnp.clip(warp, -1, 1))
  truth = batch["image"]
  scores = {}
  for method, image in images.items():
    scores[f"{method}/psnr"] = psnr(image, truth)
    scores[f"{method}/lpips"] = LPIPS().apply(lpips_variables, image, truth)
  return scores


def evaluate(model: MIDMs, variables: Mapping[str, Any], lpips_variables: Mapping[str, Any],
             batches: Iterable[Mapping[str, np.ndarray]], *, seed: int = 0, refine: bool = True) -> dict[str, Any]:
  """Mean PSNR and LPIPS per method over every pair of ``batches``:
  ``{'midms': {'psnr', 'lpips'}, 'exemplar': {...}, 'initial_warp': {...}, 'pairs': n}``."""
  score = jax.jit(functools.partial(pair_scores, model, refine=refine))
  sums = {f"{m}/{k}": 0.0 for m in METHODS for k in METRICS}
  count = 0
  for batch in batches:
    size = len(batch["image"])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(count, count + size))
    for name, values in jax.device_get(score(variables, lpips_variables, dict(batch), keys)).items():
      sums[name] += float(np.sum(np.asarray(values, np.float64)))
    count += size
  if not count:
    raise ValueError("evaluate: no pairs to score (empty batches)")
  result: dict[str, Any] = {m: {k: sums[f"{m}/{k}"] / count for k in METRICS} for m in METHODS}
  result["pairs"] = count
  return result
