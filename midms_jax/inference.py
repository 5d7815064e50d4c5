"""Translating pairs: the one function every tool translates with (translate, evaluate, the held-out
scoring, the translate benchmark).

Each pair is translated on its own (a batch of one inside ``jax.vmap``) with its own PRNG key, so
its result does not depend on the batch it came in or on the batch size. The key of a pair is
``pair_key(seed, *ids)``: ``PRNGKey(seed)`` folded with the pair's integer identifiers in order
(``translate``: the CRC-32 of the pair's name; ``evaluate``: the stream and the record indices; the
held-out scoring: the pair's index).

The model runs the inference loop (``MIDMs.from_config(config, inference=True)``:
``config.midms.inference``). ``compiled`` keeps one jitted function per model config, ``refine`` and
set of outputs, so repeated runs in one process (tests, notebooks) compile once.
"""

import json
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from midms_jax.midms.model import MIDMs

# Per pair: the translation, the initial warp's latent and its decoded image (the single-shot warp),
# and the latents of every re-warp step (``rewarp_new``: the re-warp, ``rewarp_mixed``: after the
# confidence mix, ``rewarp_mask``: the mask), for translate's debug grids.
OUTPUTS = (
    "image",
    "initial_warp",
    "initial_warp_image",
    "rewarp_new",
    "rewarp_mixed",
    "rewarp_mask",
)
# Config sections that do not change a translation (the model is built from the others).
NOT_MODEL_SECTIONS = (
    "data",
    "evaluate",
    "train",
    "checkpoints",
    "loss",
    "ldm",
    "stage",
    "compilation_cache",
)


def pair_key(seed: int, *ids: int) -> jax.Array:
  """The key of a pair: ``PRNGKey(seed)`` folded with each of ``ids`` in order."""
  key = jax.random.PRNGKey(seed)
  for i in ids:
    key = jax.random.fold_in(key, i)
  return key


def name_id(name: str) -> int:
  """A pair's name as an identifier for ``pair_key`` (its CRC-32)."""
  return zlib.crc32(name.encode())


def pair_keys(seed: int, start: int, count: int) -> jax.Array:
  """``pair_key(seed, i)`` of the pairs ``start .. start + count - 1``, stacked."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
      jnp.arange(start, start + count)
  )


def translate_pairs(
    model: MIDMs,
    variables: Mapping[str, Any],
    conditions: jax.Array,
    exemplars: jax.Array,
    exemplar_conditions: jax.Array,
    keys: jax.Array,
    *,
    refine: bool,
    outputs: Sequence[str] = ("image",),
) -> dict[str, jax.Array]:
  """``outputs`` (names of ``OUTPUTS``) of every pair, stacked; pair ``i`` uses ``keys[i]``. Images
  are unclamped ([-1, 1] nominal)."""
  unknown = sorted(set(outputs) - set(OUTPUTS))
  if unknown:
    raise ValueError(f"unknown outputs {unknown}; known: {OUTPUTS}")
  rewarps = jnp.asarray(model.settings.rewarp_steps, jnp.int32)

  def one(condition, exemplar, exemplar_condition, key):
    out = model.translate(
        variables, condition[None], exemplar[None], exemplar_condition[None], key, refine=refine
    )
    steps = out["steps"].rewarp
    every = dict(
        image=lambda: out["image"][0],
        initial_warp=lambda: out["initial_warp"][0],
        initial_warp_image=lambda: model.decode(variables, out["initial_warp"])[0],
        rewarp_new=lambda: steps.pred_ref_x0_new[rewarps, 0],
        rewarp_mixed=lambda: steps.pred_ref_x0_mixed[rewarps, 0],
        rewarp_mask=lambda: steps.fb_mask[rewarps, 0],
    )
    return {name: every[name]() for name in outputs}

  return jax.vmap(one)(conditions, exemplars, exemplar_conditions, keys)


def model_config_key(config: ConfigDict) -> str:
  """What decides a translation: the config without ``NOT_MODEL_SECTIONS``, as text."""
  kept = {k: v for k, v in config.to_dict().items() if k not in NOT_MODEL_SECTIONS}
  return json.dumps(kept, sort_keys=True, default=str)


_COMPILED: dict[tuple[str, bool, tuple[str, ...]], tuple[MIDMs, Callable]] = {}


def compiled(
    config: ConfigDict, refine: bool, outputs: Sequence[str] = ("image",)
) -> tuple[MIDMs, Callable]:
  """(the inference model, ``translate_pairs`` jitted over ``(variables, conditions, exemplars,
  exemplar_conditions, keys)``), one per model config, ``refine`` and ``outputs``."""
  cache_key = (model_config_key(config), bool(refine), tuple(outputs))
  if cache_key not in _COMPILED:
    model = MIDMs.from_config(config, inference=True)
    fn = lambda variables, *pairs: translate_pairs(
        model, variables, *pairs, refine=refine, outputs=outputs
    )
    _COMPILED[cache_key] = model, jax.jit(fn)
  return _COMPILED[cache_key]
