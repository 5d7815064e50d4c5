"""Held-out translation quality on the synthetic data set: the scores are PSNR / LPIPS against the
ground truth, reproducible from the seed, and the exemplar baseline is the exemplar itself."""

import itertools

import jax
import numpy as np
import pytest

from midms_jax import held_out, workdir
from midms_jax.data import pipeline
from midms_jax.metrics import image_quality, lpips, translation_quality
from midms_jax.midms.model import MIDMs


@pytest.fixture(scope="module")
def trained(synthetic_run):
  run, _ = synthetic_run
  trained = workdir.load_trained(run)
  return MIDMs.from_config(trained.config), jax.device_put(trained.variables), trained.config


def _batches(config, batch_size: int, count: int):
  dataset = pipeline.make_dataset(
      config.data,
      "validation",
      seed=0,
      batch_size=batch_size,
      shard_index=0,
      shard_count=1,
      train=False,
  )
  return list(itertools.islice(iter(dataset), count))


def test_scores_per_method_and_reproducible(trained):
  model, variables, config = trained
  lpips_variables = lpips.load_lpips()
  batches = _batches(config, batch_size=2, count=2)
  result = translation_quality.evaluate(model, variables, lpips_variables, batches, refine=False)
  assert result["pairs"] == 4 and set(result) == {"pairs", *translation_quality.METHODS}
  truth = np.concatenate([b["image"] for b in batches])
  exemplar = np.concatenate([b["ref"] for b in batches])
  expected_psnr = float(np.mean(image_quality.psnr(exemplar, truth)))
  expected_lpips = float(np.mean(lpips.LPIPS().apply(lpips_variables, exemplar, truth)))
  np.testing.assert_allclose(result["exemplar"]["psnr"], expected_psnr, rtol=1e-5)
  np.testing.assert_allclose(result["exemplar"]["lpips"], expected_lpips, rtol=1e-4)
  for method in translation_quality.METHODS:
    assert 0 < result[method]["psnr"] < 60 and 0 <= result[method]["lpips"] < 2, (
        method,
        result[method],
    )
  again = translation_quality.evaluate(model, variables, lpips_variables, batches, refine=False)
  assert again == result  # pair i always draws key fold_in(seed, i)
  # The synthetic loop starts without a draw (first_step_noise "none"); with one, the seed reaches
  # it.
  noisy = held_out.variant(config, first_step_noise="matched")
  scores = lambda seed: translation_quality.evaluate(
      noisy, variables, lpips_variables, batches, refine=False, seed=seed
  )
  seed0, seed1 = scores(0), scores(1)
  assert seed1["midms"]["psnr"] != seed0["midms"]["psnr"]
  assert seed1["exemplar"] == seed0["exemplar"] == result["exemplar"]
  assert (
      translation_quality.evaluate(model, variables, lpips_variables, batches, refine=False, seed=1)
      == result
  )


def test_held_out_scoring_runs_the_inference_loop(trained):
  _, _, config = trained
  config = config.copy_and_resolve_references()
  config.midms.update(
      dict(ddim_steps=20, interleave_steps=5, loop_start_step=15, rewarp_steps=(1, 2, 3))
  )
  loop = held_out.variant(config).loop
  np.testing.assert_array_equal(loop.t, MIDMs.from_config(config, inference=True).loop.t)
  assert len(loop.t) == config.midms.inference.interleave_steps != 5
  no_rewarp = held_out.variant(config, **held_out.ABLATIONS["no_rewarp"])
  assert no_rewarp.settings.rewarp_steps == () and not np.asarray(no_rewarp.loop.rewarp).any()
  np.testing.assert_array_equal(no_rewarp.loop.t, loop.t)


def test_no_pairs_is_an_error(trained):
  model, variables, _ = trained
  with pytest.raises(ValueError, match="no pairs"):
    translation_quality.evaluate(model, variables, {}, [])
