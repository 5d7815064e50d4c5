"""Grain input pipeline: data-set records -> shuffled, augmented, host-sharded NHWC batches.

Record format. Every data source is random access (``__len__`` / ``__getitem__``, the protocol of
``grain.python.RandomAccessDataSource``) and yields dicts of numpy arrays at the data set's load
size (resizing is the source's job, since it differs per data set and per channel):

* ``image`` ``(H, W, 3)`` float in [-1, 1] and ``label`` ``(H, W, label_nc)`` in [0, 1]: the ground
  truth and its condition;
* ``ref`` / ``label_ref``: the easy exemplar (the official reference list's first candidate);
* optionally ``ref_hard`` / ``label_ref_hard``: the hard exemplar (its second candidate).

``SyntheticSource`` gives only the easy exemplar; the TFDS sources of the benchmark data sets give
both.

Pipeline (``make_dataset``), all on ``grain.MapDataset``, so every step is a pure function of an
element's position in the stream; the result, ``Batches``, is a ``MapDataset`` of batches whose
``iter()`` is a checkpointable ``BatchIterator``::

  source -> shuffle(seed) -> repeat -> random_map(exemplar, crop, flip) -> [shard_index::shard_count] -> batch

* Training: a global shuffle (grain reshuffles every epoch), repeated forever by default (batches
  then run across epoch boundaries). Evaluation: source order, one pass, no shuffle.
* Exemplar choice (official ``Pix2pixDataset``): ``p ~ U[0, 1)``;
  ``p < hard_reference_probability``: hard exemplar (the easy one when the record has none, so a
  source without hard exemplars gives easy ``real_reference_probability`` of the time);
  ``p < real_reference_probability``: easy exemplar; else self-reference, ``ref = image`` and
  ``label_ref = label`` after their crop and flip. (The official code draws a fresh crop / flip for
  the self-reference ``label_ref``, which can misalign it with ``ref``; we keep the pair aligned.)
  Evaluation always takes the easy exemplar.
* Crop to ``crop_size`` (random position in training, centred in evaluation) and, when
  ``data_cfg.flip`` and training, a horizontal flip: one draw for ``image`` and ``label`` together,
  another for the exemplar pair (the official code transforms an exemplar with its own parameters).
* Sharding: host ``h`` of ``n`` takes stream elements ``h, h + n, ...`` and batches ``b`` of them,
  so global batch ``g`` (``B = n b`` rows) is stream elements ``[g B, (g + 1) B)`` split disjointly
  over the hosts, whatever ``n`` is.
* Batches: dicts ``image``, ``ref``, ``label``, ``label_ref`` of float32 NHWC arrays with ``b`` rows
  (what ``MIDMs.train_forward`` takes). Training drops an incomplete last batch; evaluation keeps
  it, so in a multi-host evaluation the hosts' last batches may differ in size (or in number by
  one).

Randomness comes only from ``seed`` and the element's stream index (grain's ``random_map`` seeds a
generator per index), so the stream is reproducible and independent of host and worker counts.

Worker processes (``make_dataset(worker_count=k)``): grain's ``mp_prefetch`` gives each worker a
slice of the batch stream (batches are formed before it, so each worker batches on its own and the
output does not depend on ``k``). Grain's workers read absl flags: the program must have parsed them
(run under ``absl.app.run``, or call ``absl.flags.FLAGS.mark_as_parsed()``).

Checkpointing: ``BatchIterator.get_state()`` is a small JSON-able dict (the index of the next batch
and what the stream depends on); ``state_to_bytes`` / ``state_from_bytes`` store it in an orbax
checkpoint. After ``set_state`` the iterator yields exactly the batch that would have come next,
also with another worker or host count (same global batch size).
"""

import dataclasses
import json
from typing import Any, Iterator, Mapping

import grain
import numpy as np
from absl import flags

from midms_jax.data import synthetic

Record = dict[str, np.ndarray]
BATCH_KEYS = ("image", "ref", "label", "label_ref")
_REQUIRED_KEYS = ("image", "label", "ref", "label_ref")
_HARD_KEYS = ("ref_hard", "label_ref_hard")
_STATE_KEYS = ("data", "split", "seed", "global_batch_size", "train", "next_batch")


def make_source(data_cfg: Mapping[str, Any], split: str):
  """The random-access source of ``split`` for ``data_cfg.name`` (records in the format above): the
  embedded synthetic data set, or a benchmark data set prepared by
  ``python -m midms_jax.data.prepare`` in ``data_cfg.data_dir`` (``sources.make_source``)."""
  name = data_cfg["name"]
  if name == "synthetic":
    if data_cfg["image_size"] != data_cfg["load_size"]:
      raise ValueError(
          f"config.data: synthetic scenes are rendered at image_size={data_cfg['image_size']}, "
          f"which must equal load_size={data_cfg['load_size']}"
      )
    config = synthetic.SyntheticConfig(
        image_size=data_cfg["image_size"],
        min_objects=data_cfg["min_objects"],
        max_objects=data_cfg["max_objects"],
        seed=data_cfg["seed"],
        train_size=data_cfg["train_size"],
        validation_size=data_cfg["validation_size"],
        background_textures=tuple(
            data_cfg.get("background_textures", synthetic.BACKGROUND_TEXTURES)
        ),
    )
    return synthetic.SyntheticSource(config, split)
  from midms_jax.data import sources  # pylint: disable=import-outside-toplevel  # TFDS only for the benchmarks

  if name in sources.NAMES:
    return sources.make_source(data_cfg, split)
  raise NotImplementedError(
      f"config.data.name={name!r}: no such data set (known: synthetic, and the TFDS data "
      f"sets {', '.join(sources.NAMES)})"
  )


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Per-record exemplar choice, crop and flip: a grain random map, called as
  ``augmentation(record, rng)``."""

  crop_size: int
  label_nc: int
  real_reference_probability: float = 1.0  # evaluation defaults: always the easy exemplar,
  hard_reference_probability: float = 0.0
  random_crop: bool = False  # a centred crop,
  flip: bool = False  # no flip

  def __post_init__(self):
    if not 0 <= self.hard_reference_probability <= self.real_reference_probability <= 1:
      raise ValueError(
          "config.data: need 0 <= hard_reference_probability <= real_reference_probability <= 1, "
          f"got {self.hard_reference_probability} and {self.real_reference_probability}"
      )
    if self.crop_size < 1 or self.label_nc < 1:
      raise ValueError(
          f"config.data: crop_size and label_nc must be positive, got {self.crop_size}, "
          f"{self.label_nc}"
      )

  @classmethod
  def from_config(cls, data_cfg: Mapping[str, Any], train: bool) -> "Augmentation":
    """Training: the config's probabilities, random crop, flip if ``data_cfg.flip``; else
    evaluation."""
    if not train:
      return cls(data_cfg["crop_size"], data_cfg["label_nc"])
    return cls(
        data_cfg["crop_size"],
        data_cfg["label_nc"],
        data_cfg["real_reference_probability"],
        data_cfg["hard_reference_probability"],
        random_crop=True,
        flip=bool(data_cfg["flip"]),
    )

  def __call__(self, record: Mapping[str, np.ndarray], rng: np.random.Generator) -> Record:
    self._check(record)
    p = rng.random()
    image, label = self._transform(record["image"], record["label"], rng)
    if p >= self.real_reference_probability:  # self-reference
      return dict(image=image, ref=image, label=label, label_ref=label)
    hard = p < self.hard_reference_probability and "ref_hard" in record  # else the easy one
    ref_key, label_key = _HARD_KEYS if hard else ("ref", "label_ref")
    ref, label_ref = self._transform(record[ref_key], record[label_key], rng)
    return dict(image=image, ref=ref, label=label, label_ref=label_ref)

  def _transform(
      self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
  ) -> tuple[np.ndarray, np.ndarray]:
    """One crop and flip for an image and its label (always three draws: top, left, flip)."""
    height, width = image.shape[:2]
    top, left = rng.integers(0, height - self.crop_size + 1), rng.integers(
        0, width - self.crop_size + 1
    )
    flip = rng.random() < 0.5 and self.flip
    if not self.random_crop:
      top, left = (height - self.crop_size) // 2, (width - self.crop_size) // 2
    window = (slice(top, top + self.crop_size), slice(left, left + self.crop_size))
    image, label = image[window], label[window]
    if flip:
      image, label = image[:, ::-1], label[:, ::-1]
    return np.asarray(image, np.float32), np.asarray(label, np.float32)

  def _check(self, record: Mapping[str, np.ndarray]) -> None:
    missing = [k for k in _REQUIRED_KEYS if k not in record]
    if missing or ("ref_hard" in record) != ("label_ref_hard" in record):
      raise ValueError(
          f"data record: needs keys {_REQUIRED_KEYS} (optionally both of {_HARD_KEYS}), "
          f"got {sorted(record)}"
      )
    pairs = [("image", "label"), ("ref", "label_ref")] + (
        [_HARD_KEYS] if "ref_hard" in record else []
    )
    for image_key, label_key in pairs:
      image, label = record[image_key], record[label_key]
      if (
          image.ndim != 3
          or image.shape[2] != 3
          or label.shape != image.shape[:2] + (self.label_nc,)
          or min(image.shape[:2]) < self.crop_size
      ):
        raise ValueError(
            f"data record: {image_key} {image.shape} / {label_key} {label.shape} must be (H, W, "
            "3) / "
            f"(H, W, label_nc={self.label_nc}) with H, W >= crop_size={self.crop_size}"
        )


def derived_seed(seed: int, purpose: int) -> int:
  """An independent 32-bit seed per purpose (grain's shuffle uses seed + epoch: avoid
  neighbours)."""
  return int(np.random.SeedSequence([seed, purpose]).generate_state(1)[0])


def make_dataset(
    data_cfg: Mapping[str, Any],
    split: str,
    *,
    seed: int,
    batch_size: int,
    shard_index: int,
    shard_count: int,
    train: bool,
    num_epochs: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
    read_threads: int = 1,
    source=None,
) -> "Batches":
  """This host's batches of ``split``: ``Batches``, a ``grain.MapDataset`` (element g: batch g)
  whose ``iter()`` is a checkpointable ``BatchIterator``.

  ``batch_size``: rows per batch on this host (the global batch over ``shard_count`` =
  ``jax.process_count()`` hosts); host ``shard_index`` (``jax.process_index()``) gets its own
  disjoint part of every global batch. ``num_epochs``: passes over the data (None: forever in
  training, once in evaluation). Iteration: ``worker_count`` processes build batches (0: this
  process, ``read_threads`` threads), each keeping up to ``prefetch`` batches ready. ``source``
  replaces ``make_source(data_cfg, split)``.
  """
  if seed < 0:
    raise ValueError(f"make_dataset: seed must be >= 0, got {seed}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(
        f"make_dataset: need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}"
    )
  if batch_size < 1:
    raise ValueError(f"make_dataset: batch_size must be >= 1, got {batch_size}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"make_dataset: num_epochs must be >= 1 or None, got {num_epochs}")
  source = make_source(data_cfg, split) if source is None else source
  if len(source) == 0:
    raise ValueError(f"make_dataset: the {split} split of {data_cfg['name']!r} is empty")
  ds = grain.MapDataset.source(source)
  if train:
    ds = ds.shuffle(seed=derived_seed(seed, 0)).repeat(num_epochs)
  elif num_epochs not in (None, 1):
    ds = ds.repeat(num_epochs)
  ds = ds.random_map(Augmentation.from_config(data_cfg, train), seed=derived_seed(seed, 1))
  ds = ds[shard_index::shard_count].batch(batch_size, drop_remainder=train)
  stream = dict(
      data=data_cfg["name"],
      split=split,
      seed=seed,
      global_batch_size=batch_size * shard_count,
      train=train,
  )
  return Batches(
      ds, stream, worker_count=worker_count, prefetch=prefetch, read_threads=read_threads
  )


class Batches(grain.MapDataset):
  """A batch ``MapDataset`` (random access, grain transformations) iterated by a
  ``BatchIterator``."""

  def __init__(
      self,
      parent: grain.MapDataset,
      stream: Mapping[str, Any],
      *,
      worker_count: int = 0,
      prefetch: int = 2,
      read_threads: int = 1,
      keys: tuple[str, ...] = BATCH_KEYS,
  ):
    super().__init__(parent)
    if worker_count < 0 or prefetch < 1 or read_threads < 1:
      raise ValueError(
          f"make_dataset: need worker_count >= 0, prefetch >= 1, read_threads >= 1, got "
          f"{worker_count}, {prefetch}, {read_threads}"
      )
    self._stream, self._options = dict(stream), dict(
        worker_count=worker_count, prefetch=prefetch, read_threads=read_threads, keys=keys
    )

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[index]

  def __iter__(self) -> "BatchIterator":
    return BatchIterator(self._parent, self._stream, **self._options)

  def __str__(self) -> str:
    return f"Batches({self._stream})"


class BatchIterator(Iterator[Record]):
  """Iterates a batch ``MapDataset``; its position is checkpointable (``get_state`` /
  ``set_state``).

  The state is the index of the next batch plus what the stream depends on (data, split, seed,
  global batch size, train). Restoring rebuilds the grain iterator from that index, so a state also
  restores under another worker count, or host count with the same global batch size.
  """

  def __init__(
      self,
      batches: grain.MapDataset,
      stream: Mapping[str, Any],
      *,
      worker_count: int,
      prefetch: int,
      read_threads: int,
      keys: tuple[str, ...] = BATCH_KEYS,
  ):
    if worker_count and not flags.FLAGS.is_parsed():
      raise RuntimeError(
          "worker_count > 0: grain's worker processes read absl flags, which are not parsed; run "
          "the program under absl.app.run or call absl.flags.FLAGS.mark_as_parsed() first"
      )
    self._batches, self._stream = batches, dict(stream)
    self._worker_count, self._prefetch, self._read_threads = worker_count, prefetch, read_threads
    self._next_batch, self._iterator, self._keys = 0, None, tuple(keys)

  def _start(self) -> Iterator[Record]:
    ds = self._batches[self._next_batch :].to_iter_dataset(
        grain.ReadOptions(num_threads=self._read_threads, prefetch_buffer_size=self._prefetch)
    )
    if self._worker_count:
      ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(
              num_workers=self._worker_count, per_worker_buffer_size=self._prefetch
          )
      )
    return iter(ds)

  def __next__(self) -> Record:
    if self._iterator is None:
      self._iterator = self._start()
    batch = next(self._iterator)
    self._next_batch += 1
    # plain arrays (workers send shared memory)
    return {key: np.asarray(batch[key]) for key in self._keys}

  def get_state(self) -> dict[str, Any]:
    return dict(self._stream, next_batch=self._next_batch)

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues at ``state['next_batch']``; ValueError if the state is of another stream."""
    # a key only the saved stream has differs too
    keys = set(self._stream) | (set(state) - {"next_batch"})
    mismatched = {
        k: (state.get(k), self._stream.get(k))
        for k in sorted(keys)
        if state.get(k) != self._stream.get(k)
    }
    if mismatched:
      raise ValueError(
          "data iterator state is of another stream (saved, current): "
          + ", ".join(f"{k}={a!r}, {b!r}" for k, (a, b) in mismatched.items())
      )
    next_batch = state.get("next_batch")
    if not isinstance(next_batch, int) or next_batch < 0:
      raise ValueError(f"data iterator state: next_batch must be an int >= 0, got {next_batch!r}")
    self.close()
    self._next_batch = next_batch

  def close(self) -> None:
    """Stops prefetching (and worker processes); iteration restarts lazily at the current
    position."""
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None

  def __enter__(self) -> "BatchIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
  """JSON bytes of an iterator state (for an orbax checkpoint)."""
  return json.dumps(dict(state), sort_keys=True).encode("utf-8")


def state_from_bytes(data: bytes) -> dict[str, Any]:
  """The iterator state stored by ``state_to_bytes``."""
  state = json.loads(bytes(data).decode("utf-8"))
  missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
  if missing:
    raise ValueError(f"not a data iterator state: missing {missing}")
  return state
