"""Row-blockwise evaluation: the memory-efficient-attention scheme shared by the soft warps and the
U-Net's attention."""

from typing import Callable

import jax
import jax.numpy as jnp


def map_row_blocks(fn: Callable[[jax.Array], jax.Array], rows: jax.Array, chunk: int) -> jax.Array:
  """``fn(rows)`` for an ``fn`` that treats each row of axis 1 on its own, computed ``chunk`` rows
  at a time.

  The blocks run one after the other (``lax.map``; a last partial block is padded with zero rows
  whose results are dropped), each recomputed in the backward pass (``jax.checkpoint``): forward and
  backward hold the intermediates of one block instead of all rows, the same numbers.
  """
  batch, n_rows = rows.shape[:2]
  n_blocks = -(-n_rows // chunk)
  padded = jnp.pad(rows, ((0, 0), (0, n_blocks * chunk - n_rows)) + ((0, 0),) * (rows.ndim - 2))
  blocks = jnp.moveaxis(padded.reshape((batch, n_blocks, chunk) + rows.shape[2:]), 1, 0)
  out = jax.lax.map(jax.checkpoint(fn), blocks)
  return jnp.moveaxis(out, 0, 1).reshape((batch, n_blocks * chunk) + out.shape[3:])[:, :n_rows]
