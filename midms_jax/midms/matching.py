"""Parameter-free matching operations of MIDMs: correlation, soft warping, flow and the confidence
mask.

NHWC throughout. A correlation volume is stored as ``(B, Hq, Wq, Hs, Ws)`` like the official code:
entry ``[b, i, j, k, l]`` is the cosine similarity of query pixel (i, j) and support pixel (k, l).
Points of a flow/map are ``(..., 2)`` with ``[..., 0] = x`` and ``[..., 1] = y`` in the
align-corners normalised grid ``linspace(-1, 1)``.

The 0.005 softmax temperature amplifies any rounding 200x (it can flip the discrete confidence
mask), so matrix products here always run at full float32 precision (``Precision.HIGHEST``),
whatever the global default (TF32/bf16 on accelerators).

Every use of a volume in MIDMs is a softmax-weighted mean over one of its axes, so besides the dense
functions (which hold the whole ``Hq*Wq x Hs*Ws`` volume) ``warp_by_features`` and
``flow_by_features`` compute the same results from the two feature maps blockwise over query pixels,
in memory linear in the number of pixels (the memory-efficient-attention scheme, with MIDMs' clamp
at 0 and temperature).
"""

import jax
import jax.numpy as jnp

from midms_jax.models import blockwise

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_rank(name: str, x: jax.Array, ndim: int) -> None:
  if x.ndim != ndim:
    raise ValueError(f"{name}: expected a {ndim}-D array, got shape {x.shape}")


def _check_corr(corr: jax.Array) -> None:
  _check_rank("correlation volume (B, Hq, Wq, Hs, Ws)", corr, 5)


def normalize_features(features: jax.Array) -> jax.Array:
  """Per pixel: subtract the channel mean, divide by the channel L2 norm (no epsilon, as
  MIDMs.forward)."""
  centred = features - jnp.mean(features, axis=-1, keepdims=True)
  return centred / jnp.linalg.norm(centred, axis=-1, keepdims=True)


def _unit_vectors(features: jax.Array, eps: float) -> jax.Array:
  """Float32 feature vectors divided by (their L2 norm + ``eps``): the operands of
  ``correlation``."""
  f = features.astype(jnp.float32)
  return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + eps)


def _check_pair(name: str, query: jax.Array, support: jax.Array) -> None:
  _check_rank(f"{name} query (B, H, W, C)", query, 4)
  _check_rank(f"{name} support (B, H, W, C)", support, 4)
  if query.shape[0] != support.shape[0] or query.shape[-1] != support.shape[-1]:
    raise ValueError(
        f"{name}: query {query.shape} and support {support.shape} differ in batch or channels"
    )


def correlation(query: jax.Array, support: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Cosine-similarity volume ``(B, Hq, Wq, Hs, Ws)`` clamped at 0 (``Correlation.correlation``).

  Each feature vector is divided by (its L2 norm + ``eps``). Computed in float32.
  """
  _check_pair("correlation", query, support)
  q, s = _unit_vectors(query, eps), _unit_vectors(support, eps)
  return jnp.maximum(jnp.einsum("bijc,bklc->bijkl", q, s, precision=_HIGHEST), 0.0)


def transpose_correlation(corr: jax.Array) -> jax.Array:
  """Swaps the query and support roles (PyTorch ``corr.permute(0, 3, 4, 1, 2)``)."""
  _check_corr(corr)
  return jnp.transpose(corr, (0, 3, 4, 1, 2))


def soft_warp(values: jax.Array, corr: jax.Array, temperature: float = 0.005) -> jax.Array:
  """Warps ``values`` ``(B, Hs, Ws, C)`` onto the query grid: ``(B, Hq, Wq, C)``.

  Each query pixel takes the softmax(corr / temperature)-weighted mean over support pixels (the
  official ``soft_warp`` with ``factor=1``, which only handles Hq == Hs; this works for any sizes).
  The weights are float32; the result has the dtype of ``values``.
  """
  _check_rank("soft_warp values (B, Hs, Ws, C)", values, 4)
  _check_corr(corr)
  b, hq, wq, hs, ws = corr.shape
  if values.shape[:3] != (b, hs, ws):
    raise ValueError(
        f"soft_warp: values {values.shape} do not match the support grid of corr {corr.shape}"
    )
  logits = corr.astype(jnp.float32).reshape(b, hq, wq, hs * ws) / temperature
  weights = jax.nn.softmax(logits, axis=-1)
  flat = values.astype(jnp.float32).reshape(b, hs * ws, values.shape[-1])
  return jnp.einsum("bijn,bnc->bijc", weights, flat, precision=_HIGHEST).astype(values.dtype)


def coordinate_grid(height: int, width: int) -> jax.Array:
  """``(H, W, 2)`` align-corners grid: ``[..., 0] = linspace(-1, 1, W)``,
  ``[..., 1] = linspace(-1, 1, H)``."""
  ys, xs = jnp.meshgrid(
      jnp.linspace(-1.0, 1.0, height), jnp.linspace(-1.0, 1.0, width), indexing="ij"
  )
  return jnp.stack([xs, ys], axis=-1)


def batched_grid(batch: int, height: int, width: int) -> jax.Array:
  """``coordinate_grid`` broadcast to ``(B, H, W, 2)``: warped like any values, it gives the
  soft-argmax map."""
  return jnp.broadcast_to(coordinate_grid(height, width), (batch, height, width, 2))


def get_flow(
    corr: jax.Array, temperature: float = 0.005
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Soft-argmax matches of a correlation volume (official ``util.get_flow``).

  Returns ``(map_trg, map_src, flow_trg, flow_src)``:

  * ``map_trg`` ``(B, Hq, Wq, 2)``: for each query pixel, the expected support location under the
    softmax over support positions; ``flow_trg = map_trg - query grid``.
  * ``map_src`` ``(B, Hs, Ws, 2)``: for each support pixel, the expected query location under the
    softmax over query positions; ``flow_src = map_src - support grid``.

  (The official code builds both grids from the query size, so it is only right when Hq, Wq == Hs,
  Ws.)
  """
  _check_corr(corr)
  b, hq, wq, hs, ws = corr.shape
  logits = corr.astype(jnp.float32) / temperature
  weights_q = jax.nn.softmax(logits.reshape(b, hq, wq, hs * ws), axis=-1)
  weights_s = jax.nn.softmax(logits.reshape(b, hq * wq, hs, ws), axis=1)
  map_trg = jnp.einsum(
      "bijn,nc->bijc", weights_q, coordinate_grid(hs, ws).reshape(hs * ws, 2), precision=_HIGHEST
  )
  map_src = jnp.einsum(
      "bnkl,nc->bklc", weights_s, coordinate_grid(hq, wq).reshape(hq * wq, 2), precision=_HIGHEST
  )
  return flow_from_maps(map_trg, map_src)


def flow_from_maps(
    map_trg: jax.Array, map_src: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``get_flow``'s ``(map_trg, map_src, flow_trg, flow_src)`` from the two maps: each flow is its
  map minus the coordinates of its own grid (query grid for ``map_trg``, support grid for
  ``map_src``).
  """
  _check_rank("flow_from_maps map_trg (B, Hq, Wq, 2)", map_trg, 4)
  _check_rank("flow_from_maps map_src (B, Hs, Ws, 2)", map_src, 4)
  return (
      map_trg,
      map_src,
      map_trg - coordinate_grid(*map_trg.shape[1:3]),
      map_src - coordinate_grid(*map_src.shape[1:3]),
  )


def warp_by_features(
    query: jax.Array,
    support: jax.Array,
    values: jax.Array,
    temperature: float = 0.005,
    chunk: int = 1024,
    eps: float = 1e-5,
) -> jax.Array:
  """``soft_warp(values, correlation(query, support, eps), temperature)`` without the volume.

  ``query`` ``(B, Hq, Wq, C)`` and ``support`` ``(B, Hs, Ws, C)`` features, ``values``
  ``(B, Hs, Ws, V)``; returns ``(B, Hq, Wq, V)`` in the dtype of ``values``. Blocks of ``chunk``
  query pixels (a last partial block is padded with zero vectors, whose rows are dropped) are
  processed one after the other (``lax.map``): clamp-at-0 cosine similarity with every support
  pixel, softmax over support pixels, weighted mean of the values. Each block is recomputed in the
  backward pass (``jax.checkpoint``), so forward and backward hold a few ``B x chunk x Hs*Ws``
  arrays of one block instead of ``B x Hq*Wq x Hs*Ws`` volumes: memory linear in the pixels for a
  fixed ``chunk``. Warping several value maps through one correspondence costs one pass when they
  are concatenated along channels. The transposed warp (support <- query, the official
  ``corr.permute(0, 3, 4, 1, 2)``) is this function with ``query`` and ``support`` swapped.
  """
  _check_pair("warp_by_features", query, support)
  _check_rank("warp_by_features values (B, Hs, Ws, V)", values, 4)
  if values.shape[:3] != support.shape[:3]:
    raise ValueError(
        f"warp_by_features: values {values.shape} do not match the support grid {support.shape}"
    )
  if chunk < 1:
    raise ValueError(
        f"warp_by_features: chunk must be a positive number of query pixels, got {chunk}"
    )
  b, hq, wq, c = query.shape
  n_query, n_support = hq * wq, support.shape[1] * support.shape[2]
  q = _unit_vectors(query, eps).reshape(b, n_query, c)
  s = _unit_vectors(support, eps).reshape(b, n_support, c)
  v = values.astype(jnp.float32).reshape(b, n_support, values.shape[-1])

  def block(q_block: jax.Array) -> jax.Array:
    corr = jnp.maximum(jnp.einsum("bqc,bnc->bqn", q_block, s, precision=_HIGHEST), 0.0)
    weights = jax.nn.softmax(corr / temperature, axis=-1)
    return jnp.einsum("bqn,bnv->bqv", weights, v, precision=_HIGHEST)

  warped = blockwise.map_row_blocks(block, q, min(chunk, n_query))
  return warped.reshape(b, hq, wq, -1).astype(values.dtype)


def flow_by_features(
    query: jax.Array,
    support: jax.Array,
    temperature: float = 0.005,
    chunk: int = 1024,
    eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``get_flow(correlation(query, support, eps), temperature)`` without the volume: the maps are
  the coordinate grids soft-warped by ``warp_by_features`` (support grid onto the query, query grid
  back).
  """
  _check_pair("flow_by_features", query, support)
  b, hq, wq, _ = query.shape
  _, hs, ws, _ = support.shape
  map_trg = warp_by_features(query, support, batched_grid(b, hs, ws), temperature, chunk, eps)
  map_src = warp_by_features(support, query, batched_grid(b, hq, wq), temperature, chunk, eps)
  return flow_from_maps(map_trg, map_src)


def grid_sample_bilinear(image: jax.Array, grid: jax.Array) -> jax.Array:
  """``F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=True)`` for NHWC.

  ``image`` ``(B, H, W, C)``, ``grid`` ``(B, Ho, Wo, 2)`` with ``[..., 0] = x``, ``[..., 1] = y`` in
  [-1, 1] (-1/1 = centres of the first/last pixel). Neighbours outside the image contribute 0.
  Returns ``(B, Ho, Wo, C)``. Weights and their summation order follow PyTorch's CPU kernel.
  """
  _check_rank("grid_sample image (B, H, W, C)", image, 4)
  _check_rank("grid_sample grid (B, Ho, Wo, 2)", grid, 4)
  if grid.shape[0] != image.shape[0] or grid.shape[-1] != 2:
    raise ValueError(
        f"grid_sample: grid {grid.shape} does not fit image {image.shape} (need (B, Ho, Wo, 2))"
    )
  b, h, w, c = image.shape
  x = (grid[..., 0] + 1) * ((w - 1) / 2)
  y = (grid[..., 1] + 1) * ((h - 1) / 2)
  x_w = jnp.floor(x)
  y_n = jnp.floor(y)
  dist_w, dist_n = x - x_w, y - y_n
  dist_e, dist_s = 1 - dist_w, 1 - dist_n
  flat = image.reshape(b, h * w, c)

  def corner(xi: jax.Array, yi: jax.Array) -> jax.Array:
    inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
    idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
    picked = jnp.take_along_axis(flat, idx.reshape(b, -1, 1), axis=1).reshape(idx.shape + (c,))
    return jnp.where(inside[..., None], picked, 0)

  return (
      corner(x_w, y_n) * (dist_s * dist_e)[..., None]
      + corner(x_w + 1, y_n) * (dist_s * dist_w)[..., None]
      + corner(x_w, y_n + 1) * (dist_n * dist_e)[..., None]
      + corner(x_w + 1, y_n + 1) * (dist_n * dist_w)[..., None]
  )


def fbcheck(
    map_trg: jax.Array,
    map_src: jax.Array,
    flow_trg: jax.Array,
    flow_src: jax.Array,
    true_backward: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Forward-backward distances ``(fb_ts (B, Hq, Wq), fb_st (B, Hs, Ws))`` of ``get_flow`` outputs.

  Default (official ``util.fbcheck``): ``fb_ts = |flow_trg + flow_trg(map_trg)|``, i.e. the
  *forward* flow sampled at the matched location, and ``fb_st = |flow_src + flow_src(map_src)|``.
  For a perfectly consistent uniform shift d this is ~2|d|, not 0, so large consistent displacements
  are rejected; MIDMs outputs depend on this. ``true_backward=True`` gives the paper's check
  instead, sampling the opposite flow: ``fb_ts = |flow_trg + flow_src(map_trg)|``,
  ``fb_st = |flow_src + flow_trg(map_src)|`` (~0 for a consistent shift). ``true_backward`` is a
  Python bool (static under ``jax.jit``).
  """
  for name, array in (
      ("map_trg", map_trg),
      ("map_src", map_src),
      ("flow_trg", flow_trg),
      ("flow_src", flow_src),
  ):
    _check_rank(f"fbcheck {name} (B, H, W, 2)", array, 4)
  sampled_ts = flow_src if true_backward else flow_trg
  sampled_st = flow_trg if true_backward else flow_src
  ts = grid_sample_bilinear(sampled_ts, map_trg) + flow_trg
  st = grid_sample_bilinear(sampled_st, map_src) + flow_src
  return jnp.sqrt(jnp.sum(ts * ts, axis=-1)), jnp.sqrt(jnp.sum(st * st, axis=-1))


def raw_confidence(fb_ts: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Per-pixel confidence ``(B, H, W, 1)`` float: 1 where the fb distance is below ``threshold``."""
  _check_rank("fb distances (B, H, W)", fb_ts, 3)
  return (fb_ts < threshold).astype(jnp.float32)[..., None]


def confidence_mask(fb_ts: jax.Array, threshold: float = 0.5, block: int = 2) -> jax.Array:
  """MIDMs' re-warp confidence mask ``(B, H, W, 1)`` float 0/1 from fb distances ``(B, H, W)``.

  ``raw_confidence``, then on each non-overlapping ``block`` x ``block`` tile: average, ``> 0.5``,
  broadcast back to the tile. The official ``block = 2`` makes a 2x2 tile confident iff at least 3
  of its 4 pixels are; ``block = 1`` keeps the raw per-pixel mask.
  """
  raw = raw_confidence(fb_ts, threshold)
  if block == 1:
    return raw
  b, h, w, _ = raw.shape
  if block < 1 or h % block or w % block:
    raise ValueError(f"confidence_mask: block {block} must be >= 1 and divide the {h}x{w} latent")
  pooled = jnp.mean(raw.reshape(b, h // block, block, w // block, block, 1), axis=(2, 4))
  tiled = jnp.repeat(jnp.repeat(pooled, block, axis=1), block, axis=2)
  return (tiled > 0.5).astype(jnp.float32)
