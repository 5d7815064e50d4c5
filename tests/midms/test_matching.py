"""Matching operations vs the official initial-matching fixture (corr_io.npz) and PyTorch's
grid_sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midms_jax.midms import matching
from tests.conftest import assert_close, load_fixture, nchw_to_nhwc


@pytest.fixture(scope="module")
def corr_io() -> dict[str, np.ndarray]:
  return load_fixture("corr_io.npz")


def _nhwc(data: dict[str, np.ndarray], key: str) -> np.ndarray:
  return nchw_to_nhwc(data[key])


def _flow_key(name: str) -> str:
  return f"corr_ref_flow/{name}"


@pytest.mark.parametrize(
    "source, target, atol",
    [
        ("theta_out_trg", "trg_out_norm", 2e-5),
        ("phi_out_src", "src_out_norm", 5e-5),
        ("phi_out_ref", "ref_out_norm", 5e-5),
    ],
)
def test_normalize_features(corr_io, source, target, atol):
  out = jax.jit(matching.normalize_features)(_nhwc(corr_io, source))
  assert_close(out, _nhwc(corr_io, target), atol, target)


@pytest.mark.parametrize(
    "support, target", [("src_out_norm", "corr_src"), ("ref_out_norm", "corr_ref")]
)
def test_correlation(corr_io, support, target):
  corr = jax.jit(matching.correlation)(_nhwc(corr_io, "trg_out_norm"), _nhwc(corr_io, support))
  assert_close(corr, corr_io[target], 5e-5, target)


@pytest.mark.parametrize(
    "values, corr, target, atol",
    [
        ("src_feats", "corr_src", "warped_src_feat", 5e-4),
        ("ref_feats", "corr_ref", "warped_ref_feat", 2e-4),
        ("ref_semantics_down", "corr_ref", "warped_ref_seg", 5e-4),
    ],
)
def test_soft_warp(corr_io, values, corr, target, atol):
  out = jax.jit(matching.soft_warp)(_nhwc(corr_io, values), corr_io[corr])
  assert_close(out, _nhwc(corr_io, target), atol, target)


def test_warp_back_and_cycle_loss(corr_io):
  back = jax.jit(matching.soft_warp)(
      _nhwc(corr_io, "warped_ref_feat"), matching.transpose_correlation(corr_io["corr_ref"])
  )
  assert_close(back, _nhwc(corr_io, "warped_back_ref"), 2e-4, "warped_back_ref")
  loss = jnp.mean(jnp.abs(_nhwc(corr_io, "warped_back_ref") - _nhwc(corr_io, "ref_feats")))
  assert_close(loss, corr_io["loss_fb_initial"], 5e-6, "loss_fb_initial")


def test_get_flow(corr_io):
  outputs = jax.jit(matching.get_flow)(corr_io["corr_ref"])
  for name, out, atol in zip(
      ("map_trg", "map_src", "flow_trg", "flow_src"), outputs, (1e-3, 5e-4, 1e-3, 5e-4)
  ):
    assert_close(out, corr_io[_flow_key(name)], atol, name)


def test_fbcheck(corr_io):
  flows = [corr_io[_flow_key(name)] for name in ("map_trg", "map_src", "flow_trg", "flow_src")]
  fb_ts, fb_st = jax.jit(matching.fbcheck)(*flows)
  assert_close(fb_ts, corr_io[_flow_key("fb_ts")], 2e-3, "fb_ts")
  assert_close(fb_st, corr_io[_flow_key("fb_st")], 5e-3, "fb_st")


def test_confidence_masks(corr_io):
  fb_ts = corr_io[_flow_key("fb_ts")]
  raw = np.asarray(matching.raw_confidence(fb_ts))
  mask = np.asarray(jax.jit(matching.confidence_mask)(fb_ts))
  expected_raw = nchw_to_nhwc(corr_io[_flow_key("fb_mask_raw")])
  expected = nchw_to_nhwc(corr_io[_flow_key("fb_mask")])
  assert 0 < expected.sum() < expected.size  # the fixture exercises both mask values
  np.testing.assert_array_equal(raw, expected_raw)
  np.testing.assert_array_equal(mask, expected)


def test_mask_from_correlation_end_to_end(corr_io):
  """The whole chain from the stored correlation reproduces the discrete mask."""
  mask = jax.jit(
      lambda corr: matching.confidence_mask(matching.fbcheck(*matching.get_flow(corr))[0])
  )(corr_io["corr_ref"])
  np.testing.assert_array_equal(np.asarray(mask), nchw_to_nhwc(corr_io[_flow_key("fb_mask")]))


def test_confidence_mask_block_size_option():
  """block=1 keeps the raw mask; block=4 needs more than half of each 4x4 tile confident."""
  fb = np.full((1, 8, 8), 0.9, np.float32)
  fb[0, :4, :4] = 0.1  # one fully confident 4x4 tile
  fb[0, 4:, 4:5] = 0.1  # a 4-pixel column: 4 of 16 in its tile
  raw = np.asarray(matching.confidence_mask(fb, block=1))[0, ..., 0]
  np.testing.assert_array_equal(raw, (fb[0] < 0.5).astype(np.float32))
  tiles = np.asarray(matching.confidence_mask(fb, block=4))[0, ..., 0]
  expected = np.zeros((8, 8), np.float32)
  expected[:4, :4] = 1
  np.testing.assert_array_equal(tiles, expected)


def test_confidence_mask_needs_three_of_four():
  fb = np.ones((1, 2, 8), np.float32)  # four 2x2 blocks side by side, all unconfident
  for block, confident_pixels in enumerate((4, 3, 2, 1)):
    pixels = np.ones(4, np.float32)
    pixels[:confident_pixels] = 0.0
    fb[0, :, 2 * block : 2 * block + 2] = pixels.reshape(2, 2)
  mask = np.asarray(matching.confidence_mask(fb))[0, ..., 0]
  np.testing.assert_array_equal(mask, np.repeat([[1.0, 1.0, 0.0, 0.0]], 2, 0).repeat(2, 1))


@pytest.mark.parametrize("shape, out_hw", [((2, 5, 7, 3), (6, 4)), ((1, 8, 8, 2), (8, 8))])
def test_grid_sample_matches_torch(shape, out_hw):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  image = rng.standard_normal(shape).astype(np.float32)
  grid = rng.uniform(-1.5, 1.5, (shape[0],) + out_hw + (2,)).astype(np.float32)
  grid[0, 0, :4] = [[-1, -1], [1, 1], [1, -1], [-1.0000001, 1.2]]  # exact corners and just outside
  grid[0, 1, :2] = [[-1.0, 0.0], [0.0, 1.0]]  # on the border lines
  expected = (
      torch.nn.functional.grid_sample(
          torch.from_numpy(image).permute(0, 3, 1, 2),
          torch.from_numpy(grid),
          mode="bilinear",
          padding_mode="zeros",
          align_corners=True,
      )
      .permute(0, 2, 3, 1)
      .numpy()
  )
  out = jax.jit(matching.grid_sample_bilinear)(image, grid)
  assert_close(out, expected, 1e-6, "grid_sample")


def _shift_correlation(size: int, dx: int, dy: int) -> jax.Array:
  """Correlation of a perfectly consistent uniform shift: query (i, j) matches support (i+dy, j+dx).

  Support features are one-hot per pixel; a query pixel whose match falls outside gets a zero
  feature (correlation 0 with everything).
  """
  support = np.eye(size * size, dtype=np.float32).reshape(1, size, size, size * size)
  query = np.zeros_like(support)
  for i in range(size):
    for j in range(size):
      if 0 <= i + dy < size and 0 <= j + dx < size:
        query[0, i, j] = support[0, i + dy, j + dx]
  return matching.correlation(query, support)


@pytest.mark.parametrize("dx, dy", [(1, 0), (0, 1), (1, 1)])
def test_fbcheck_uniform_shift(dx, dy):
  size = 8
  corr = _shift_correlation(size, dx, dy)
  flows = matching.get_flow(corr)
  d = np.array([dx, dy]) * 2.0 / (size - 1)  # shift in normalised units
  np.testing.assert_allclose(
      np.asarray(flows[2])[0, 2:-3, 2:-3], np.broadcast_to(d, (size - 5, size - 5, 2)), atol=1e-5
  )
  official, _ = matching.fbcheck(*flows)
  true_fb, _ = matching.fbcheck(*flows, true_backward=True)
  # Pixels whose match and the match's match are both inside the image.
  inner = (slice(0, size - 2 * dy), slice(0, size - 2 * dx))
  np.testing.assert_allclose(np.asarray(official)[0][inner], 2 * np.linalg.norm(d), atol=1e-5)
  np.testing.assert_allclose(np.asarray(true_fb)[0][inner], 0.0, atol=1e-5)
  # 2|d| >= 0.57 > 0.5
  assert np.all(np.asarray(matching.raw_confidence(official))[0][inner] == 0.0)


def test_unequal_grids():
  """Query 4x4 matched to support 8x8 at (2i, 2j+1): warp and flow use each side's own grid."""
  hq, hs = 4, 8
  support = np.eye(hs * hs, dtype=np.float32).reshape(1, hs, hs, hs * hs)
  query = support[:, ::2, 1::2]
  corr = matching.correlation(query, support)
  assert corr.shape == (1, hq, hq, hs, hs)
  values = np.random.default_rng(0).standard_normal((1, hs, hs, 3)).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(matching.soft_warp(values, corr)), values[:, ::2, 1::2], atol=1e-5
  )
  back = matching.soft_warp(
      np.ones((1, hq, hq, 1), np.float32), matching.transpose_correlation(corr)
  )
  assert back.shape == (1, hs, hs, 1)
  map_trg, map_src, flow_trg, flow_src = matching.get_flow(corr)
  grid_q, grid_s = matching.coordinate_grid(hq, hq), matching.coordinate_grid(hs, hs)
  np.testing.assert_allclose(np.asarray(map_trg)[0], np.asarray(grid_s)[::2, 1::2], atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(flow_trg)[0], np.asarray(grid_s)[::2, 1::2] - np.asarray(grid_q), atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(map_src)[0, ::2, 1::2], np.asarray(grid_q), atol=1e-5)
  assert map_src.shape == flow_src.shape == (1, hs, hs, 2)


def test_coordinate_grid_convention():
  grid = np.asarray(matching.coordinate_grid(3, 5))
  np.testing.assert_allclose(grid[0, :, 0], np.linspace(-1, 1, 5))
  np.testing.assert_allclose(grid[:, 0, 1], np.linspace(-1, 1, 3))


def test_bad_shapes_raise():
  corr = jnp.zeros((1, 4, 4, 4, 4))
  with pytest.raises(ValueError, match="support grid"):
    matching.soft_warp(jnp.zeros((1, 5, 4, 3)), corr)
  with pytest.raises(ValueError, match="5-D"):
    matching.get_flow(jnp.zeros((1, 16, 16)))
  with pytest.raises(ValueError, match="channels"):
    matching.correlation(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 5)))
  with pytest.raises(ValueError, match="block 2 must be >= 1 and divide the 5x4 latent"):
    matching.confidence_mask(jnp.zeros((1, 5, 4)))


def _features(
    seed: int,
    query_hw: tuple[int, int],
    support_hw: tuple[int, int],
    channels: int = 8,
    value_channels: int = 5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random (query, support, values) where each query pixel resembles a support pixel (peaked
  softmax)."""
  rng = np.random.default_rng(seed)
  support = rng.standard_normal((2,) + support_hw + (channels,)).astype(np.float32)
  picks = rng.integers(0, support_hw[0] * support_hw[1], (2,) + query_hw)
  query = support.reshape(2, -1, channels)[np.arange(2)[:, None, None], picks]
  query = query + 0.7 * rng.standard_normal(query.shape).astype(np.float32)
  values = rng.standard_normal((2,) + support_hw + (value_channels,)).astype(np.float32)
  return query, support, values


def _dense_warp(query, support, values, temperature: float, back: bool = False) -> jax.Array:
  corr = matching.correlation(query, support)
  return matching.soft_warp(
      values, matching.transpose_correlation(corr) if back else corr, temperature
  )


def _tolerance(expected) -> float:
  """1e-5, relative where values exceed 1: the 0.005 temperature amplifies the float32 rounding of
  the dot products 200x, and blocks of another size round differently (the dense warp itself is
  ~1e-5 from float64).
  """
  return 1e-5 * max(1.0, float(np.max(np.abs(np.asarray(expected)))))


@pytest.mark.parametrize("chunk", [1, 10, 63, 4096])
def test_warp_by_features_matches_the_dense_warp(chunk):
  """Blocks of 1, 10 (last one partial), all 63 query pixels and more than the grid: same warps both
  ways."""
  query, support, values = _features(0, (7, 9), (6, 8))
  out = jax.jit(matching.warp_by_features, static_argnums=(3, 4))(
      query, support, values, 0.005, chunk
  )
  assert_close(out, _dense_warp(query, support, values, 0.005), _tolerance(values), "warp")
  back_values = np.random.default_rng(1).standard_normal((2, 7, 9, 3)).astype(np.float32)
  back = matching.warp_by_features(support, query, back_values, 0.005, chunk)
  assert_close(
      back,
      _dense_warp(query, support, back_values, 0.005, back=True),
      _tolerance(back_values),
      "transposed warp",
  )


def test_warp_by_features_reproduces_the_official_warps(corr_io):
  """From the fixture's normalised features, without the volume: the official warped latent and its
  cycle."""
  trg, ref = _nhwc(corr_io, "trg_out_norm"), _nhwc(corr_io, "ref_out_norm")
  warped = matching.warp_by_features(trg, ref, _nhwc(corr_io, "ref_feats"), chunk=24)
  assert_close(warped, _nhwc(corr_io, "warped_ref_feat"), 2e-4, "warped_ref_feat")
  assert_close(
      warped, matching.soft_warp(_nhwc(corr_io, "ref_feats"), corr_io["corr_ref"]), 1e-5, "vs dense"
  )
  back = matching.warp_by_features(ref, trg, _nhwc(corr_io, "warped_ref_feat"), chunk=24)
  assert_close(back, _nhwc(corr_io, "warped_back_ref"), 2e-4, "warped_back_ref")


def test_flow_by_features_matches_get_flow_and_the_official_mask(corr_io):
  trg, ref = _nhwc(corr_io, "trg_out_norm"), _nhwc(corr_io, "ref_out_norm")
  dense = matching.get_flow(matching.correlation(trg, ref))
  chunked = jax.jit(matching.flow_by_features, static_argnums=(2, 3))(trg, ref, 0.005, 24)
  for name, a, b in zip(("map_trg", "map_src", "flow_trg", "flow_src"), chunked, dense):
    assert_close(a, b, 1e-5, name)
  for a, b, name in zip(matching.fbcheck(*chunked), matching.fbcheck(*dense), ("fb_ts", "fb_st")):
    assert_close(a, b, 1e-5, name)
  mask = matching.confidence_mask(matching.fbcheck(*chunked)[0])
  np.testing.assert_array_equal(np.asarray(mask), nchw_to_nhwc(corr_io[_flow_key("fb_mask")]))


def test_flow_by_features_on_unequal_grids():
  query, support, _ = _features(1, (5, 4), (6, 7))
  dense = jax.jit(lambda q, s: matching.get_flow(matching.correlation(q, s)))(query, support)
  chunked = jax.jit(matching.flow_by_features, static_argnums=(2, 3))(query, support, 0.005, 6)
  for name, a, b in zip(("map_trg", "map_src", "flow_trg", "flow_src"), chunked, dense):
    assert a.shape == b.shape
    assert_close(a, b, 1e-5, name)


def test_warp_by_features_gradients_match_the_dense_warp():
  """Gradients w.r.t. both feature maps and the values, through a warp and the warp back (cycle)."""
  query, support, values = _features(2, (6, 5), (5, 6))
  weights = np.random.default_rng(3).standard_normal((2, 6, 5, 5)).astype(np.float32)

  def loss(warp, q, s, v):
    warped = warp(q, s, v, 0.005)
    cycled = warp(q, s, warped, 0.005, back=True)
    return jnp.sum(warped * weights) + jnp.mean(jnp.abs(cycled - v))

  def chunked(q, s, v, t, back=False):
    return (
        matching.warp_by_features(s, q, v, t, 7)
        if back
        else matching.warp_by_features(q, s, v, t, 7)
    )

  grads = lambda warp: jax.jit(jax.grad(lambda *a: loss(warp, *a), argnums=(0, 1, 2)))(
      query, support, values
  )
  expected, actual = grads(_dense_warp), grads(chunked)
  for name, a, b in zip(("query", "support", "values"), actual, expected):
    assert float(np.max(np.abs(np.asarray(b)))) > 1e-3, f"{name}: gradient vanishes, test too weak"
    assert_close(a, b, _tolerance(b), f"d/d{name}")


def test_warp_by_features_bad_inputs_raise():
  query, support, values = _features(0, (4, 4), (4, 4))
  with pytest.raises(ValueError, match="chunk must be a positive number of query pixels, got 0"):
    matching.warp_by_features(query, support, values, chunk=0)
  with pytest.raises(ValueError, match="do not match the support grid"):
    matching.warp_by_features(query, support, values[:, :3])
  with pytest.raises(ValueError, match="differ in batch or channels"):
    matching.warp_by_features(query, support[..., :4], values)
