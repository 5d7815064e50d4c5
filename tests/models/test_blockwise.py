"""Row-blockwise evaluation: the same values and gradients as all rows at once, one block held at a
time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midms_jax.models import blockwise


def _row_softmax_mix(rows: jax.Array, keys: jax.Array) -> jax.Array:
  """A row-wise function with a large intermediate (rows x keys), like attention and soft
  warping."""
  return jax.nn.softmax(jnp.einsum("brc,bkc->brk", rows, keys), axis=-1) @ keys


@pytest.mark.parametrize("chunk", [1, 3, 7, 10])
def test_blocks_give_the_whole_result_and_gradient(chunk):
  rng = np.random.default_rng(0)
  rows, keys = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 10, 4), (2, 6, 4)))
  whole = lambda r, k: jnp.sum(jnp.sin(_row_softmax_mix(r, k)))
  blocked = lambda r, k: jnp.sum(
      jnp.sin(blockwise.map_row_blocks(lambda b: _row_softmax_mix(b, k), r, chunk))
  )
  np.testing.assert_allclose(
      blockwise.map_row_blocks(lambda b: _row_softmax_mix(b, keys), rows, chunk),
      _row_softmax_mix(rows, keys),
      rtol=1e-6,
      atol=1e-6,
  )
  for got, want in zip(jax.grad(blocked, (0, 1))(rows, keys), jax.grad(whole, (0, 1))(rows, keys)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_one_block_of_intermediates_at_a_time():
  """The compiled gradient keeps no rows x keys array: only chunk x keys blocks."""
  rows, keys = jnp.zeros((1, 64, 8)), jnp.zeros((1, 48, 8))
  loss = lambda r: jnp.sum(blockwise.map_row_blocks(lambda b: _row_softmax_mix(b, keys), r, 16))
  text = jax.jit(jax.grad(loss)).lower(rows).compile().as_text()
  assert "f32[1,64,48]" not in text and "f32[1,16,48]" in text
