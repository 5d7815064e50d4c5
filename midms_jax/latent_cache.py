"""First-stage latents of the training split, encoded once, for the LDM stage
(``config.ldm.latent_cache``).

The first stage is frozen during LDM pre-training, so encoding every training image again at every
step is wasted work on large data sets. With ``config.ldm.latent_cache`` set to a local directory,
each host encodes its shard of the training split once (the un-augmented images: the centred crop,
no flip, as evaluation reads them) into ``<dir>/train_<host>of<hosts>.npy`` and trains from a
shuffled stream of those latents; ``<dir>/train_<host>of<hosts>.json`` records what the latents
depend on (data config, first-stage config and a digest of its weights). A later run with the same
fingerprint reuses the file; any change re-encodes. The LDM step then skips the encoder
(``batch['latent']``).
"""

import hashlib
import json
import pathlib
from typing import Any, Callable, Mapping

import grain.python as grain
import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from midms_jax.data import pipeline
from midms_jax.ldm import LATENT_KEY

_NOT_IN_LATENTS = ("worker_count",)  # config.data fields that do not change what is encoded


def _files(
    directory: pathlib.Path, process: int, processes: int
) -> tuple[pathlib.Path, pathlib.Path]:
  stem = f"train_{process}of{processes}"
  return directory / f"{stem}.npy", directory / f"{stem}.json"


def weights_digest(variables: Any) -> str:
  """SHA-1 over the first stage's parameter paths, shapes and bytes (what its latents depend on)."""
  digest = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(variables)):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def fingerprint(config, first_stage_variables: Any, process: int, processes: int) -> dict[str, Any]:
  """What a cache file's latents depend on; a file whose stored fingerprint differs is
  re-encoded."""
  data = {k: v for k, v in json.loads(config.data.to_json()).items() if k not in _NOT_IN_LATENTS}
  return dict(
      data=data,
      first_stage=json.loads(config.model.first_stage.to_json()),
      apply_scale_factor=bool(config.midms.apply_scale_factor),
      kl_latent=config.midms.kl_latent,
      weights=weights_digest(first_stage_variables),
      shard=[process, processes],
  )


class LatentSource:
  """Random access to the rows of a cached latent array (a grain data source)."""

  def __init__(self, latents: np.ndarray):
    self._latents = latents

  def __len__(self) -> int:
    return len(self._latents)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {LATENT_KEY: np.asarray(self._latents[index])}


def _encode_shard(
    config,
    encode: Callable[[np.ndarray, int], np.ndarray],
    path: pathlib.Path,
    process: int,
    processes: int,
) -> np.ndarray:
  """Encodes this host's shard of the training split into the ``.npy`` file at ``path``; returns it
  mapped."""
  batch_size = config.ldm.batch_size // processes
  dataset = pipeline.make_dataset(
      config.data,
      "train",
      seed=config.train.seed,
      batch_size=batch_size,
      shard_index=process,
      shard_count=processes,
      train=False,
      num_epochs=1,
      worker_count=config.data.worker_count,
  )
  rows = len(range(process, len(pipeline.make_source(config.data, "train")), processes))
  latents, start = None, 0
  with tqdm(
      total=rows, desc="encoding latents", unit="image", disable=process > 0, dynamic_ncols=True
  ) as bar:
    for index, batch in enumerate(dataset):
      latent = np.asarray(encode(batch["image"], index), np.float32)
      if latents is None:
        latents = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.float32, shape=(rows,) + latent.shape[1:]
        )
      latents[start : start + len(latent)] = latent
      start += len(latent)
      bar.update(len(latent))
  if start != rows:
    raise RuntimeError(f"{path}: encoded {start} training images, expected {rows}")
  latents.flush()
  return latents


def load_or_build(
    config, encode: Callable[[np.ndarray, int], np.ndarray], first_stage_variables: Any
) -> np.ndarray:
  """This host's cached latents ``(N, h, w, c)`` (memory-mapped): read back when the directory holds
  them for the same fingerprint, else encoded now (``encode(images, batch_index) -> latents``; the
  index seeds a KL first stage's posterior sample)."""
  directory = pathlib.Path(config.ldm.latent_cache)
  process, processes = jax.process_index(), jax.process_count()
  array_path, meta_path = _files(directory, process, processes)
  wanted = fingerprint(config, first_stage_variables, process, processes)
  if meta_path.exists() and array_path.exists():
    try:
      stored = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
      stored = None
    if stored == wanted:
      logging.info("ldm: reading cached latents from %s", array_path)
      return np.load(array_path, mmap_mode="r")
    changed = sorted(
        k for k in wanted if not isinstance(stored, dict) or stored.get(k) != wanted[k]
    )
    logging.info(
        "ldm: %s was written for another %s; encoding again",
        meta_path,
        ", ".join(changed) or "file",
    )
  directory.mkdir(parents=True, exist_ok=True)
  # the fingerprint is written last: a partial file is never reused
  meta_path.unlink(missing_ok=True)
  latents = _encode_shard(config, encode, array_path, process, processes)
  meta_path.write_text(json.dumps(wanted, sort_keys=True), encoding="utf-8")
  return latents


def make_dataset(config, latents: np.ndarray) -> pipeline.Batches:
  """This host's training batches ``{'latent': (batch / hosts, h, w, c)}``: the cached rows
  reshuffled every epoch, checkpointable like the image pipeline's (``pipeline.BatchIterator``)."""
  processes = jax.process_count()
  ds = grain.MapDataset.source(LatentSource(latents))
  ds = ds.shuffle(seed=pipeline.derived_seed(config.train.seed, 0)).repeat(None)
  ds = ds.batch(config.ldm.batch_size // processes, drop_remainder=True)
  stream: Mapping[str, Any] = dict(
      data=config.data.name,
      split="train",
      seed=config.train.seed,
      global_batch_size=config.ldm.batch_size,
      train=True,
      cached_latents=len(latents),
  )
  return pipeline.Batches(ds, stream, keys=(LATENT_KEY,))
