"""Every metric of exemplar-based translation on image arrays: the library behind
``python -m midms_jax.evaluate``.

Inputs are uint8 RGB arrays as the images' files decode (``ImageSets``): the translations, the
ground truth of their conditions ("sources"), the exemplars they were given, optionally label ids of
the conditions and exemplars (style regions) and, for LPIPS diversity, groups of translations of one
condition with different exemplars. ``compute`` returns ``{metric: value}`` where a metric that
cannot be computed holds a placeholder string saying why (``weights absent: <path>``,
``not computed: <reason>``):

* ``fid_sources`` / ``fid_exemplars``: FID of the translations against the sources / the exemplars
  (``inception``, ``fid``; the reference statistics may be given, e.g. from a cache);
* ``swd`` (mean over levels) and ``swd_levels``: SWD against the sources, x1e3 (``swd``);
* ``lpips_diversity``: per condition, the mean LPIPS over every pair of its translations; averaged
  over conditions (``lpips``, AlexNet by default);
* ``style_relevance_colour`` / ``style_relevance_texture`` / ``semantic_consistency``
  (``vgg_similarity``).

Every network runs jitted, batched and split over the devices (``batching.map_batches``).
"""

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from midms_jax.errors import CheckpointError
from midms_jax.models import vgg as vgg_lib
from midms_jax.metrics import batching, fid, inception, lpips, swd, vgg_similarity

METRICS = (
    "fid_sources",
    "fid_exemplars",
    "swd",
    "lpips_diversity",
    "style_relevance_colour",
    "style_relevance_texture",
    "semantic_consistency",
)


def absent(path: str | pathlib.Path, setting: str) -> str:
  """The placeholder of a metric whose weight file (``config.evaluate.<setting>``) is missing or not
  set."""
  return (
      f"weights absent: {path}" if path else f"weights absent: config.evaluate.{setting} is not set"
  )


def not_computed(reason: str) -> str:
  return f"not computed: {reason}"


def is_placeholder(value: Any) -> bool:
  return isinstance(value, str)


@dataclasses.dataclass(frozen=True)
class ImageSets:
  """uint8 ``(N, H, W, 3)`` ``generated`` / ``sources`` / ``exemplars`` (row i: one translation, its
  ground truth, its exemplar); ``generated_ids`` / ``exemplar_ids`` ``(N, H, W)`` label ids of the
  condition and the exemplar's condition (None: whole-image style regions); ``diversity``
  ``(C, K, H, W, 3)``: K translations of each of C conditions (None: no LPIPS diversity)."""

  generated: np.ndarray
  sources: np.ndarray
  exemplars: np.ndarray
  generated_ids: np.ndarray | None = None
  exemplar_ids: np.ndarray | None = None
  diversity: np.ndarray | None = None

  def __post_init__(self):
    shape = np.shape(self.generated)
    if len(shape) != 4 or shape[-1] != 3 or not shape[0]:
      raise ValueError(f"ImageSets: generated must be (N > 0, H, W, 3) uint8, got {shape}")
    for name in ("sources", "exemplars"):
      if np.shape(getattr(self, name)) != shape:
        raise ValueError(
            f"ImageSets: {name} {np.shape(getattr(self, name))} differ from generated {shape}"
        )
    if (self.generated_ids is None) != (self.exemplar_ids is None):
      raise ValueError("ImageSets: give both generated_ids and exemplar_ids or neither")
    if self.diversity is not None and (
        np.ndim(self.diversity) != 5 or np.shape(self.diversity)[1] < 2
    ):
      raise ValueError(
          f"ImageSets: diversity must be (C, K >= 2, H, W, 3), got {np.shape(self.diversity)}"
      )


@dataclasses.dataclass(frozen=True)
class Networks:
  """Loaded weights (None where the file is absent; ``missing`` then holds the placeholder)."""

  inception: Mapping[str, Any] | None
  vgg: Mapping[str, Any] | None
  lpips: Mapping[str, Any]
  vgg_widths: tuple[int, ...] = (64, 128, 256, 512, 512)
  lpips_net: str = "alex"
  missing: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @classmethod
  def load(cls, eval_cfg: Mapping[str, Any]) -> "Networks":
    """From ``config.evaluate``: ``inception_checkpoint``, ``vgg_checkpoint`` (+ ``vgg_widths``),
    ``lpips_net``. A file that is not configured or does not exist is a placeholder; a damaged one
    is a ``CheckpointError``.
    """
    missing = {}

    def optional(kind: str, setting: str, load: Callable[[pathlib.Path], Any]):
      path = pathlib.Path(eval_cfg[setting]).expanduser() if eval_cfg[setting] else None
      if path is None or not path.is_file():
        missing[kind] = absent(eval_cfg[setting], setting)
        return None
      return load(path)

    widths = tuple(eval_cfg["vgg_widths"])
    return cls(
        inception=optional("inception", "inception_checkpoint", inception.load_inception),
        vgg=optional("vgg", "vgg_checkpoint", lambda p: vgg_lib.load_vgg19(p, widths)),
        lpips=lpips.load_lpips(net=eval_cfg["lpips_net"]),
        vgg_widths=widths,
        lpips_net=eval_cfg["lpips_net"],
        missing=missing,
    )


@dataclasses.dataclass(frozen=True)
class Settings:
  """``batch_size``: images per feature call; ``sliced_wasserstein``: SWD parameters; ``seed``: SWD
  draws; style regions: ``num_regions`` label ids (with ``ImageSets.*_ids``) and ``min_fraction`` of
  each image.
  """

  batch_size: int = 32
  sliced_wasserstein: swd.Settings = swd.Settings()
  seed: int = 0
  num_regions: int = 1
  min_fraction: float = 0.01


def to_model_range(pixels: jax.Array) -> jax.Array:
  """uint8 -> float32 [-1, 1] (``images.to_model_range`` inside a jitted function)."""
  return pixels.astype(jnp.float32) / 255.0 * 2.0 - 1.0


@functools.lru_cache(maxsize=None)
def _inception_fn() -> Callable:
  return jax.jit(
      lambda variables, pixels: inception.pool_features(variables, to_model_range(pixels))
  )


@functools.lru_cache(maxsize=None)
def _lpips_fn(net: str) -> Callable:
  return jax.jit(
      lambda variables, x, y: lpips.LPIPS(net).apply(
          variables, to_model_range(x), to_model_range(y)
      )
  )


@functools.lru_cache(maxsize=None)
def _vgg_fn(widths: tuple[int, ...], num_regions: int, min_fraction: float) -> Callable:
  def fn(variables, generated, sources, exemplars, *ids):
    return vgg_similarity.scores(
        variables,
        to_model_range(generated),
        to_model_range(sources),
        to_model_range(exemplars),
        *ids,
        widths=widths,
        num_regions=num_regions,
        min_fraction=min_fraction,
    )

  return jax.jit(fn)


def inception_features(
    variables: Mapping[str, Any],
    pixels: np.ndarray,
    *,
    batch_size: int = 32,
    mesh: Mesh | None = None,
) -> np.ndarray:
  """``(N, 2048)`` FID pool features of uint8 images."""
  return batching.map_batches(
      _inception_fn(),
      [pixels],
      batch_size=batch_size,
      constants=[batching.replicate(variables, mesh)],
      mesh=mesh,
  )


def fid_statistics(
    variables: Mapping[str, Any],
    pixels: np.ndarray,
    *,
    batch_size: int = 32,
    mesh: Mesh | None = None,
) -> fid.Statistics:
  return fid.statistics(inception_features(variables, pixels, batch_size=batch_size, mesh=mesh))


def pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
  """The ``count (count - 1) / 2`` unordered index pairs ``(i < j)``."""
  first, second = np.triu_indices(count, k=1)
  return first, second


def lpips_diversity(
    variables: Mapping[str, Any],
    groups: np.ndarray,
    *,
    net: str = "alex",
    batch_size: int = 32,
    mesh: Mesh | None = None,
) -> float:
  """Mean over conditions of the mean LPIPS between every pair of one condition's translations
  (``groups`` uint8 ``(C, K, H, W, 3)``)."""
  first, second = pairs(groups.shape[1])
  x = groups[:, first].reshape((-1,) + groups.shape[2:])
  y = groups[:, second].reshape((-1,) + groups.shape[2:])
  distances = batching.map_batches(
      _lpips_fn(net),
      [x, y],
      batch_size=batch_size,
      constants=[batching.replicate(variables, mesh)],
      mesh=mesh,
  )
  return float(np.mean(np.asarray(distances, np.float64).reshape(len(groups), -1)))


def vgg_scores(
    variables: Mapping[str, Any],
    sets: ImageSets,
    *,
    widths: Sequence[int],
    num_regions: int = 1,
    min_fraction: float = 0.01,
    batch_size: int = 32,
    mesh: Mesh | None = None,
) -> dict[str, float]:
  """Means over the set of ``semantic_consistency``, ``style_relevance_colour``,
  ``style_relevance_texture``."""
  arrays = [sets.generated, sets.sources, sets.exemplars]
  if sets.generated_ids is not None:
    arrays += [sets.generated_ids.astype(np.int32), sets.exemplar_ids.astype(np.int32)]
  fn = _vgg_fn(
      tuple(widths), num_regions if sets.generated_ids is not None else 1, float(min_fraction)
  )
  out = batching.map_batches(
      fn, arrays, batch_size=batch_size, constants=[batching.replicate(variables, mesh)], mesh=mesh
  )
  mean = lambda k: float(np.mean(np.asarray(out[k], np.float64)))
  return dict(
      semantic_consistency=mean("semantic_consistency"),
      style_relevance_colour=mean("style_colour"),
      style_relevance_texture=mean("style_texture"),
  )


def compute(
    sets: ImageSets,
    networks: Networks,
    settings: Settings = Settings(),
    *,
    source_stats: fid.Statistics | None = None,
    exemplar_stats: fid.Statistics | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
  """Every metric of ``METRICS`` (plus ``swd_levels``): a number, or a placeholder string saying why
  not."""
  common = dict(batch_size=settings.batch_size, mesh=mesh)
  results: dict[str, Any] = {}
  if networks.inception is None:
    results["fid_sources"] = results["fid_exemplars"] = networks.missing["inception"]
  elif len(sets.generated) < 2:
    results["fid_sources"] = results["fid_exemplars"] = not_computed("FID needs at least 2 images")
  else:
    generated = fid_statistics(networks.inception, sets.generated, **common)
    if source_stats is None:
      source_stats = fid_statistics(networks.inception, sets.sources, **common)
    if exemplar_stats is None:
      exemplar_stats = fid_statistics(networks.inception, sets.exemplars, **common)
    results["fid_sources"] = fid.frechet_distance(generated, source_stats)
    results["fid_exemplars"] = fid.frechet_distance(generated, exemplar_stats)
  distance = swd.swd(
      sets.generated,
      sets.sources,
      jax.random.PRNGKey(settings.seed),
      settings.sliced_wasserstein,
      **common,
  )
  results["swd"], results["swd_levels"] = distance["swd"], distance["levels"]
  if sets.diversity is None:
    results["lpips_diversity"] = not_computed("no groups of translations of one condition")
  else:
    results["lpips_diversity"] = lpips_diversity(
        networks.lpips, sets.diversity, net=networks.lpips_net, **common
    )
  if networks.vgg is None:
    for name in ("style_relevance_colour", "style_relevance_texture", "semantic_consistency"):
      results[name] = networks.missing["vgg"]
  else:
    results.update(
        vgg_scores(
            networks.vgg,
            sets,
            widths=networks.vgg_widths,
            num_regions=settings.num_regions,
            min_fraction=settings.min_fraction,
            **common,
        )
    )
  return results


def load_reference_statistics(
    networks: Networks,
    pixels: np.ndarray,
    cache: pathlib.Path | None,
    description: Mapping[str, Any],
    *,
    batch_size: int = 32,
    mesh: Mesh | None = None,
) -> fid.Statistics | None:
  """FID statistics of a reference set, read from ``cache`` when it holds them for ``description``,
  else computed (and written there). None without Inception weights."""
  if networks.inception is None:
    return None
  stats = fid.load_statistics(cache, description) if cache is not None else None
  if stats is None:
    stats = fid_statistics(networks.inception, pixels, batch_size=batch_size, mesh=mesh)
    if cache is not None:
      try:
        fid.save_statistics(cache, stats, description)
      except OSError as e:
        raise CheckpointError(
            f"{cache}: cannot write the FID statistics cache: {e.strerror or e}"
        ) from None
  return stats
