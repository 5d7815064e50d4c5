"""Held-out translation quality of a trained run: ``results.json`` and ``samples.png`` in its
workdir.

For data sets with ground truth (the embedded synthetic one), written by
``python -m midms_jax.train`` when a run ends if ``config.evaluate.results_pairs`` > 0. The first
``results_pairs`` records of ``config.evaluate.split`` (each with its exemplar) are scored against
their ground truth with PSNR and LPIPS (``metrics.translation_quality``): the model's translation,
the exemplar copied as it is and the single-shot warp of the same model (initial matching only, no
diffusion), and the model with each inference-time ablation of ``ABLATIONS`` (the same weights, one
``config.midms`` switch changed), all with the inference loop (``config.midms.inference``). Pair
``i`` draws its noise from ``fold_in(PRNGKey(config.evaluate.seed), i)``: the file depends only on
the weights and the config.

``samples.png``: one row per pair (the first ``SAMPLE_ROWS`` scored ones), columns condition |
exemplar | initial warp | output | ground truth.
"""

import json
import sys
from typing import Any, Mapping

import numpy as np
from etils import epath
from tqdm import tqdm

from midms_jax.data import images as images_lib, pipeline, synthetic
from midms_jax.metrics import lpips, translation_quality
from midms_jax.midms.model import MIDMs

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.png"
SAMPLE_ROWS = 8
# Inference-time ablations: config.midms overrides (merged into its sub-sections).
ABLATIONS = {
    "no_confidence_masking": dict(confidence_masking=False),
    "no_rewarp": dict(inference=dict(rewarp_steps=())),
}


def held_out_batches(config, pairs: int) -> list[dict[str, np.ndarray]]:
  """The first ``pairs`` records of ``config.evaluate.split`` in batches of
  ``config.evaluate.batch_size``."""
  source = pipeline.make_source(config.data, config.evaluate.split)
  if pairs > len(source):
    raise ValueError(
        f"config.evaluate.results_pairs={pairs}, but the {config.evaluate.split} split has "
        f"{len(source)} records"
    )
  dataset = pipeline.make_dataset(
      config.data,
      config.evaluate.split,
      seed=0,
      batch_size=config.evaluate.batch_size,
      shard_index=0,
      shard_count=1,
      train=False,
      num_epochs=1,
      source=source,
  )
  batches, count = [], 0
  for batch in dataset:
    take = min(len(batch["image"]), pairs - count)
    batches.append({k: np.asarray(v)[:take] for k, v in batch.items()})
    count += take
    if count == pairs:
      break
  return batches


def variant(config, **midms_overrides) -> MIDMs:
  """The inference model of ``config`` with ``config.midms`` fields replaced (inference-time
  switches)."""
  config = config.copy_and_resolve_references()
  config.midms.update(midms_overrides)
  return MIDMs.from_config(config, inference=True)


def _rounded(scores: Mapping[str, Any]) -> dict[str, Any]:
  return {
      k: (round(v, 6) if isinstance(v, float) else _rounded(v) if isinstance(v, Mapping) else v)
      for k, v in scores.items()
  }


def results(config, variables: Mapping[str, Any], step: int) -> tuple[dict[str, Any], np.ndarray]:
  """(``{'pairs', 'step', 'methods': {method: {psnr, lpips}}, 'ablations': {name: {psnr,
  lpips}}}``, the sample grid ``(rows H, 5 W, 3)`` in [-1, 1]: condition | exemplar | initial warp |
  output | ground truth).
  """
  pairs = config.evaluate.results_pairs
  batches = held_out_batches(config, pairs)
  lpips_variables = lpips.load_lpips(net="vgg")
  with tqdm(
      total=len(batches) * (1 + len(ABLATIONS)),
      desc="held-out",
      unit="batch",
      file=sys.stderr,
      mininterval=1.0,
  ) as bar:
    score = lambda model, keep=0: translation_quality.evaluate(
        model,
        variables,
        lpips_variables,
        batches,
        seed=config.evaluate.seed,
        refine=config.evaluate.refine,
        keep_images=keep,
        on_batch=lambda: bar.update(1),
    )
    full = score(variant(config), keep=SAMPLE_ROWS)
    ablations = {
        name: score(variant(config, **overrides))["midms"] for name, overrides in ABLATIONS.items()
    }
  scores = _rounded(
      dict(
          split=config.evaluate.split,
          pairs=full["pairs"],
          step=int(step),
          lpips="v0.1 vgg",
          methods={m: full[m] for m in translation_quality.METHODS},
          ablations=ablations,
      )
  )
  return scores, sample_grid(batches, full["images"], config.data.name)


def condition_rgb(label: np.ndarray, data_name: str) -> np.ndarray:
  """A condition map as an RGB picture in [0, 1]: the synthetic set's class colours, else its first
  three channels (fewer: repeated)."""
  if data_name == "synthetic":
    return synthetic.colourise(label)
  x = label[..., :3]
  return np.concatenate([x] * 3, axis=-1)[..., :3] if x.shape[-1] < 3 else x


def sample_grid(batches, images: Mapping[str, np.ndarray], data_name: str) -> np.ndarray:
  """Rows = the scored pairs of ``images``; columns condition (``condition_rgb``) | exemplar |
  initial warp | output | ground truth."""
  rows = len(images["midms"])
  inputs = {k: np.concatenate([b[k] for b in batches])[:rows] for k in ("image", "ref", "label")}
  condition = condition_rgb(inputs["label"], data_name) * 2 - 1
  columns = [condition, inputs["ref"], images["initial_warp"], images["midms"], inputs["image"]]
  return np.clip(images_lib.tile_columns(columns), -1, 1)


def write(workdir: epath.Path, config, variables: Mapping[str, Any], step: int) -> dict[str, Any]:
  """Writes ``results.json`` and ``samples.png`` into ``workdir``; returns the results."""
  scores, grid = results(config, variables, step)
  (workdir / RESULTS_FILE).write_text(json.dumps(scores, indent=1, sort_keys=True) + "\n")
  images_lib.save_image(str(workdir / SAMPLES_FILE), grid, "png")
  return scores
