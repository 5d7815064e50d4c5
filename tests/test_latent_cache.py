"""``config.ldm.latent_cache``: the training split encoded once, reused while nothing it depends on
changes, a checkpointable shuffled stream of it, and the LDM stage trained from it."""

import json

import numpy as np
import pytest

from midms_jax import latent_cache, train
from midms_jax.data import pipeline
from midms_jax.errors import InputError
from midms_jax.midms.model import MIDMs
from tests.conftest import synthetic_train_config

TRAIN_SIZE = 10


def _config(cache_dir):
  config = synthetic_train_config(stage="ldm")
  config.data.train_size = TRAIN_SIZE
  config.ldm.batch_size = 4
  config.ldm.latent_cache = str(cache_dir)
  return config


def _encoder(config):
  model = MIDMs.from_config(config)
  calls = []

  def encode(images, index):
    calls.append(index)
    return model.encode({"first_stage": {}}, images)

  return model, encode, calls


def test_cache_holds_the_unaugmented_training_latents_and_is_reused_until_the_data_changes(
    tmp_path,
):
  config = _config(tmp_path / "cache")
  model, encode, calls = _encoder(config)
  # a copy: the file is rewritten below
  latents = np.array(latent_cache.load_or_build(config, encode, {}))
  images = np.concatenate(
      [
          batch["image"]
          for batch in pipeline.make_dataset(
              config.data,
              "train",
              seed=config.train.seed,
              batch_size=4,
              shard_index=0,
              shard_count=1,
              train=False,
              num_epochs=1,
          )
      ]
  )
  assert latents.shape == (TRAIN_SIZE, 16, 16, 12) and len(calls) == 3  # batches of 4, 4 and 2
  np.testing.assert_array_equal(
      np.asarray(latents), np.asarray(model.encode({"first_stage": {}}, images))
  )
  meta = json.loads((tmp_path / "cache" / "train_0of1.json").read_text())
  assert meta["shard"] == [0, 1] and meta["data"]["train_size"] == TRAIN_SIZE

  calls.clear()
  np.testing.assert_array_equal(latent_cache.load_or_build(config, encode, {}), latents)
  config.data.worker_count = 2  # how the data is read does not change what is encoded
  latent_cache.load_or_build(config, encode, {})
  assert not calls  # read back, not encoded again
  config.data.worker_count = 0

  config.data.seed = 1  # other scenes: encoded again
  changed = latent_cache.load_or_build(config, encode, {})
  assert len(calls) == 3 and not np.array_equal(np.asarray(changed), np.asarray(latents))
  calls.clear()
  other_weights = {"params": {"w": np.ones((2,), np.float32)}}
  # other first-stage weights: encoded again
  latent_cache.load_or_build(config, encode, other_weights)
  assert len(calls) == 3


def test_cached_stream_reshuffles_every_epoch_and_resumes_exactly():
  config = _config("unused")
  latents = np.arange(TRAIN_SIZE, dtype=np.float32).reshape(TRAIN_SIZE, 1, 1, 1)
  iterator = iter(latent_cache.make_dataset(config, latents))
  rows = np.concatenate([next(iterator)["latent"].ravel() for _ in range(5)])  # 20 rows: two epochs
  assert sorted(rows[:TRAIN_SIZE]) == sorted(rows[TRAIN_SIZE:]) == list(range(TRAIN_SIZE))
  assert not np.array_equal(rows[:TRAIN_SIZE], rows[TRAIN_SIZE:])

  resumed = iter(latent_cache.make_dataset(config, latents))
  iterator = iter(latent_cache.make_dataset(config, latents))
  next(iterator), next(iterator)
  resumed.set_state(pipeline.state_from_bytes(pipeline.state_to_bytes(iterator.get_state())))
  np.testing.assert_array_equal(
      np.concatenate([next(resumed)["latent"].ravel() for _ in range(3)]), rows[8:]
  )
  images_state = (
      pipeline.make_dataset(
          config.data,
          "train",
          seed=config.train.seed,
          batch_size=4,
          shard_index=0,
          shard_count=1,
          train=True,
      )
      .__iter__()
      .get_state()
  )
  # a checkpoint of the image stream does not fit
  with pytest.raises(ValueError, match="another stream"):
    resumed.set_state(images_state)
  images = iter(
      pipeline.make_dataset(
          config.data,
          "train",
          seed=config.train.seed,
          batch_size=4,
          shard_index=0,
          shard_count=1,
          train=True,
      )
  )
  with pytest.raises(ValueError, match="cached_latents"):  # nor the other way round
    images.set_state(resumed.get_state())


def test_ldm_stage_trains_from_the_cache(tmp_path, monkeypatch):
  """Two LDM stages of 4 steps: the first writes the cache (its image log, at steps 2 and 4, decodes
  cached latents), the second, in another workdir, reads it back without encoding and takes the same
  steps.
  """
  config = _config(tmp_path / "cache")
  metrics = train.train_and_evaluate(config, tmp_path / "first")
  assert np.isfinite(metrics["loss_total"])
  assert (tmp_path / "cache" / "train_0of1.npy").is_file()
  assert (tmp_path / "first" / "ldm" / "export" / "ldm.safetensors").is_file()

  def no_encoding(*args, **kwargs):
    raise AssertionError("the cache should have been read back")

  monkeypatch.setattr(latent_cache, "_encode_shard", no_encoding)
  again = train.train_and_evaluate(config, tmp_path / "second")
  assert again["loss_total"] == pytest.approx(metrics["loss_total"], rel=1e-6)


def test_remote_cache_directory_is_refused():
  config = _config("gs://bucket/latents")
  with pytest.raises(InputError, match="must be a local directory"):
    train.check_config(config)
