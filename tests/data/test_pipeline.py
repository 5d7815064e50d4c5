"""The grain input pipeline: determinism, sharding, exemplar choice, crop/flip, evaluation,
checkpointing."""

import numpy as np
import pytest
from absl import flags

from configs import synthetic as synthetic_config
from midms_jax.data import pipeline


def _synthetic_cfg(train_size: int = 48):
  data_cfg = synthetic_config.get_config().data
  data_cfg.update(dict(train_size=train_size, validation_size=8))
  return data_cfg


def _fake_cfg(
    load_size: int = 4, crop_size: int = 4, label_nc: int = 3, flip: bool = False, **overrides
):
  cfg = dict(
      name="fake",
      label_nc=label_nc,
      load_size=load_size,
      crop_size=crop_size,
      flip=flip,
      real_reference_probability=0.7,
      hard_reference_probability=0.2,
  )
  return {**cfg, **overrides}


class CodedSource:
  """Constant records: ``image`` = -i / len (decodes the index), easy exemplar 0.25, hard exemplar
  0.75."""

  def __init__(self, size: int, side: int = 4, hard: bool = False):
    self.size, self.side, self.hard = size, side, hard

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    full = lambda value, channels=3: np.full((self.side, self.side, channels), value, np.float32)
    record = dict(
        image=full(-index / self.size), label=full(0.5), ref=full(0.25), label_ref=full(0.5)
    )
    if self.hard:
      record.update(ref_hard=full(0.75), label_ref_hard=full(0.5))
    return record


class RampSource:
  """Asymmetric records whose label is ``(image + 1) / 2``: a flip or crop that separates them
  shows.

  Channel 0 rises left to right (falls in the exemplar), channel 1 top to bottom, channel 2 is
  noise.
  """

  def __init__(self, size: int, side: int):
    self.size, self.side = size, side

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    ramp = np.linspace(-0.9, 0.9, self.side, dtype=np.float32)

    def pair(direction):
      image = np.stack(
          [
              np.broadcast_to(direction * ramp, (self.side, self.side)),
              np.broadcast_to(ramp[:, None], (self.side, self.side)),
              rng.uniform(-1, 1, (self.side, self.side)),
          ],
          axis=-1,
      ).astype(np.float32)
      return image, (image + 1) / 2

    (image, label), (ref, label_ref) = pair(1), pair(-1)
    return dict(image=image, label=label, ref=ref, label_ref=label_ref)


def _indices(batch, size: int) -> np.ndarray:
  return np.round(-batch["image"][:, 0, 0, 0] * size).astype(int)


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_synthetic_batches():
  data_cfg = _synthetic_cfg()
  batches = pipeline.make_dataset(
      data_cfg, "train", seed=0, batch_size=4, shard_index=0, shard_count=1, train=True
  )
  batch = batches[0]
  assert sorted(batch) == sorted(pipeline.BATCH_KEYS)
  for key, channels, (low, high) in [
      ("image", 3, (-1, 1)),
      ("ref", 3, (-1, 1)),
      ("label", data_cfg.label_nc, (0, 1)),
      ("label_ref", data_cfg.label_nc, (0, 1)),
  ]:
    value = batch[key]
    assert value.shape == (4, 32, 32, channels) and value.dtype == np.float32, key
    assert low <= value.min() and value.max() <= high, key


def test_determinism_and_epochs():
  data_cfg = _synthetic_cfg()
  run = lambda seed: _take(
      iter(
          pipeline.make_dataset(
              data_cfg, "train", seed=seed, batch_size=4, shard_index=0, shard_count=1, train=True
          )
      ),
      3,
  )
  _assert_same(run(1), run(1))
  size, fake_cfg = 12, _fake_cfg()
  orders = {}
  for seed in (1, 2):
    batches = pipeline.make_dataset(
        fake_cfg,
        "train",
        seed=seed,
        batch_size=4,
        shard_index=0,
        shard_count=1,
        train=True,
        source=CodedSource(size),
    )
    orders[seed] = np.concatenate([_indices(batches[g], size) for g in range(6)])  # two epochs
  for order in orders.values():
    # each epoch a permutation
    assert sorted(order[:size]) == sorted(order[size:]) == list(range(size))
    assert not np.array_equal(order[:size], order[size:])  # reshuffled per epoch
  assert not np.array_equal(orders[1], orders[2])


def test_host_sharding():
  size, cfg, source = 40, _fake_cfg(), CodedSource(40, hard=True)
  make = lambda index, count: pipeline.make_dataset(
      cfg,
      "train",
      seed=3,
      batch_size=8 // count,
      shard_index=index,
      shard_count=count,
      train=True,
      source=source,
  )
  whole, hosts = make(0, 1), [make(0, 2), make(1, 2)]
  for g in range(10):  # two epochs
    parts = [host[g] for host in hosts]
    assert all(len(part["image"]) == 4 for part in parts)
    host_indices = [set(_indices(part, size)) for part in parts]
    assert not host_indices[0] & host_indices[1]
    merged = {k: np.concatenate([part[k] for part in parts]) for k in pipeline.BATCH_KEYS}
    order, whole_order = np.argsort(_indices(merged, size)), np.argsort(_indices(whole[g], size))
    for key in pipeline.BATCH_KEYS:  # same elements with the same exemplar choice
      np.testing.assert_array_equal(merged[key][order], whole[g][key][whole_order], err_msg=key)
  # A state saved with one host restores on two (same global batch): each continues with its part.
  iterator = iter(whole)
  _take(iterator, 3)
  state = pipeline.state_from_bytes(pipeline.state_to_bytes(iterator.get_state()))
  for host in hosts:
    restored = iter(host)
    restored.set_state(state)
    _assert_same(_take(restored, 1), [host[3]])


@pytest.mark.parametrize("hard, expected", [(False, (0.0, 0.7, 0.3)), (True, (0.2, 0.5, 0.3))])
def test_exemplar_probabilities(hard, expected):
  size = 200
  batches = pipeline.make_dataset(
      _fake_cfg(),
      "train",
      seed=4,
      batch_size=100,
      shard_index=0,
      shard_count=1,
      train=True,
      source=CodedSource(size, hard=hard),
  )
  refs = np.concatenate([batches[g]["ref"][:, 0, 0, 0] for g in range(40)])
  images = np.concatenate([batches[g]["image"][:, 0, 0, 0] for g in range(40)])
  fractions = (np.mean(refs == 0.75), np.mean(refs == 0.25), np.mean(refs == images))
  np.testing.assert_allclose(fractions, expected, atol=0.03)
  assert sum(fractions) == pytest.approx(1.0)


@pytest.mark.parametrize("train", [True, False])
def test_crop_and_flip_move_image_and_label_together(train):
  cfg = _fake_cfg(
      load_size=12,
      crop_size=8,
      flip=True,
      real_reference_probability=1.0,
      hard_reference_probability=0.0,
  )
  source = RampSource(16, side=12)
  batches = pipeline.make_dataset(
      cfg,
      "validation",
      seed=5,
      batch_size=16,
      shard_index=0,
      shard_count=1,
      train=train,
      num_epochs=4,
      source=source,
  )
  flips = {"image": [], "ref": []}
  for g in range(len(batches)):
    batch = batches[g]
    for key, label_key, direction in [("image", "label", 1), ("ref", "label_ref", -1)]:
      assert batch[key].shape == (16, 8, 8, 3)
      np.testing.assert_array_equal(batch[label_key], (batch[key] + 1) / 2, err_msg=label_key)
      flips[key].append(np.diff(batch[key][:, 0, :, 0], axis=-1).mean(-1) * direction < 0)
  flips = {key: np.concatenate(value) for key, value in flips.items()}
  if train:
    for key in flips:
      assert 0.35 < flips[key].mean() < 0.65, key
    assert 0.35 < np.mean(flips["image"] != flips["ref"]) < 0.65  # independent draws
  else:  # no flip, centred crop, source order
    assert not flips["image"].any() and not flips["ref"].any()
    np.testing.assert_array_equal(batches[0]["image"][3], source[3]["image"][2:10, 2:10])


def test_evaluation_order_exemplar_and_end():
  size, cfg = 10, _fake_cfg(flip=True)
  batches = list(
      pipeline.make_dataset(
          cfg,
          "validation",
          seed=0,
          batch_size=4,
          shard_index=0,
          shard_count=1,
          train=False,
          source=CodedSource(size, hard=True),
      )
  )
  assert [list(_indices(b, size)) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert all(np.all(b["ref"] == 0.25) for b in batches)  # always the easy exemplar


def test_iterator_state_round_trip():
  data_cfg = _synthetic_cfg()
  make = lambda seed=7: iter(
      pipeline.make_dataset(
          data_cfg, "train", seed=seed, batch_size=2, shard_index=0, shard_count=1, train=True
      )
  )
  iterator = make()
  _take(iterator, 3)
  saved = pipeline.state_to_bytes(iterator.get_state())
  expected = _take(iterator, 2)
  restored = make()
  restored.set_state(pipeline.state_from_bytes(saved))
  _assert_same(_take(restored, 2), expected)
  with pytest.raises(ValueError, match="seed"):
    make(seed=8).set_state(pipeline.state_from_bytes(saved))


def test_bad_inputs():
  with pytest.raises(NotImplementedError, match="TFDS"):
    pipeline.make_source(_fake_cfg(), "train")
  with pytest.raises(ValueError, match="shard_index < shard_count"):
    pipeline.make_dataset(
        _fake_cfg(),
        "train",
        seed=0,
        batch_size=3,
        shard_index=2,
        shard_count=2,
        train=True,
        source=CodedSource(8),
    )
  batches = pipeline.make_dataset(
      _fake_cfg(label_nc=5),
      "train",
      seed=0,
      batch_size=2,
      shard_index=0,
      shard_count=1,
      train=True,
      source=CodedSource(8),
  )
  with pytest.raises(ValueError, match="label_nc=5"):
    batches[0]  # pylint: disable=pointless-statement


@pytest.mark.multiprocess
def test_worker_processes_give_the_same_stream():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  data_cfg = _synthetic_cfg()
  make = lambda workers: iter(
      pipeline.make_dataset(
          data_cfg,
          "train",
          seed=9,
          batch_size=2,
          shard_index=0,
          shard_count=1,
          train=True,
          worker_count=workers,
      )
  )
  expected = _take(make(0), 4)
  with make(2) as iterator:
    first = _take(iterator, 2)
    state = iterator.get_state()
  _assert_same(first, expected[:2])
  restored = make(0)
  restored.set_state(state)
  _assert_same(_take(restored, 2), expected[2:])
