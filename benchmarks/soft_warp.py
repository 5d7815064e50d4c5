"""Memory of the soft warps: XLA's temp bytes of the dense volume vs the blockwise warps (midms.warp_chunk).

    python benchmarks/soft_warp.py --sizes=32,64,128 --width=256 --chunk=1024
    python benchmarks/soft_warp.py --sizes=64,128 --iters=10       # also time the compiled step (GPU)

Compiles (``jit(...).lower(...).compile().memory_analysis()``; nothing runs unless ``--iters``) the
forward and backward pass of one MIDMs re-warp on random features: the warp of the latent and the support grid onto the
query, the warp back of the result and the query grid (cycle loss and the reverse soft-argmax map),
the fb check and the confidence mask; gradients of the cycle loss plus the mean warped latent with
respect to both feature maps and the latent. ``dense``: through the correlation volume
(``warp_chunk = 0``); ``chunked``: ``matching.warp_by_features`` in blocks of ``--chunk`` query pixels.
Prints one JSON line per latent size and mode; temp bytes grow with pixels^2 dense, linearly chunked.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from midms_jax import platform_tuning
from midms_jax.midms import matching

_SIZES = flags.DEFINE_list("sizes", ["32", "64", "128"], "latent side lengths (pixels = side^2)")
_WIDTH = flags.DEFINE_integer("width", 256, "matching feature channels")
_CHANNELS = flags.DEFINE_integer("channels", 3, "latent channels warped")
_BATCH = flags.DEFINE_integer("batch_size", 1, "samples")
_CHUNK = flags.DEFINE_integer("chunk", 1024, "query pixels per block of the chunked warps")
_ITERS = flags.DEFINE_integer(
    "iters", 0, "timed calls of the compiled step after a first one (0: compile only)"
)


def _warp(query, support, values, chunk: int, back: bool = False) -> jax.Array:
  """One soft warp as ``MIDMs._warp`` does it in either mode."""
  if back:
    query, support = support, query
  if chunk:
    return matching.warp_by_features(query, support, values, chunk=chunk)
  return matching.soft_warp(values, matching.correlation(query, support))


def rewarp_loss(query, support, latent, chunk: int):
  """The cycle loss plus the mean warped latent, with the fb distances and the mask as aux
  outputs."""
  b, h, w, c = latent.shape
  grid = matching.batched_grid(b, h, w)
  forward = _warp(query, support, jnp.concatenate([latent, grid], axis=-1), chunk)
  new, map_trg = forward[..., :c], forward[..., c:]
  backward = _warp(query, support, jnp.concatenate([new, grid], axis=-1), chunk, back=True)
  cycled, map_src = backward[..., :c], backward[..., c:]
  fb_ts, _ = matching.fbcheck(*matching.flow_from_maps(map_trg, map_src))
  mask = jax.lax.stop_gradient(matching.confidence_mask(fb_ts))
  return jnp.mean(jnp.abs(cycled - latent)) + jnp.mean(new), (fb_ts, mask)


def measure(size: int, chunk: int) -> dict:
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  shape = (_BATCH.value, size, size)
  query = jax.random.normal(keys[0], shape + (_WIDTH.value,))
  support = jax.random.normal(keys[1], shape + (_WIDTH.value,))
  latent = jax.random.normal(keys[2], shape + (_CHANNELS.value,))
  step = jax.jit(
      jax.value_and_grad(
          lambda q, s, v: rewarp_loss(q, s, v, chunk), argnums=(0, 1, 2), has_aux=True
      )
  )
  start = time.perf_counter()
  compiled = step.lower(query, support, latent).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  times = []
  for _ in range(_ITERS.value + 1 if _ITERS.value else 0):
    start = time.perf_counter()
    jax.block_until_ready(compiled(query, support, latent))
    times.append(time.perf_counter() - start)
  pixels = size * size
  return dict(
      backend=jax.default_backend(),
      mode="chunked" if chunk else "dense",
      latent=f"{size}x{size}",
      pixels=pixels,
      chunk=min(chunk, pixels) if chunk else None,
      width=_WIDTH.value,
      batch_size=_BATCH.value,
      compile_s=round(compile_s, 2),
      volume_bytes=_BATCH.value * pixels * pixels * 4,
      xla_temp_bytes=None if memory is None else memory.temp_size_in_bytes,
      median_step_s=round(statistics.median(times[1:]), 5) if times else None,
  )


def main(argv):
  del argv
  for size in map(int, _SIZES.value):
    for chunk in (0, _CHUNK.value):
      print(json.dumps(measure(size, chunk)), flush=True)


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  app.run(main)
