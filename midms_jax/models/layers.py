"""Small building blocks shared by the models, written to match PyTorch's numerics exactly.

Everything is NHWC. Module names in this package mirror the official PyTorch module paths
(for example ``input_blocks.1.0`` / ``in_layers.2``) so that checkpoint keys follow mechanically
from parameter paths (see ``midms_jax.interop.torch_names``).
"""

import jax
import jax.numpy as jnp
import flax.linen as nn


def pad_hw(x: jax.Array, pad: int, mode: str = "constant") -> jax.Array:
  """Pads height and width of an NHWC tensor by ``pad`` on every side (``constant`` or
  ``reflect``)."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)


def join_batches(arrays) -> jax.Array:
  """Same-shaped batches ``(B, ...)`` as one ``(k B, ...)`` batch, example by example: rows ``b k``
  to ``b k + k - 1`` hold example ``b`` of each array. For networks that treat examples
  independently this is ``concatenate`` up to the row order, but under data parallelism (the batch
  axis split over devices) each device's rows of the result are its own rows of the inputs, so
  joining and ``split_batches`` move nothing between devices; a concatenation puts the second
  array's examples on other devices, and XLA then shuffles activations between devices around every
  layer that sees the joined batch."""
  return jnp.stack(arrays, axis=1).reshape((-1,) + arrays[0].shape[1:])


def split_batches(x: jax.Array, k: int) -> list[jax.Array]:
  """The ``k`` batches that ``join_batches`` joined into ``x``."""
  x = x.reshape((-1, k) + x.shape[1:])
  return [x[:, i] for i in range(k)]


def _pool_windows(x: jax.Array) -> jax.Array:
  """``(B, H, W, C)`` -> ``(B, H//2, 2, W//2, 2, C)``; an odd last row or column is dropped
  (PyTorch's floor mode)."""
  b, h, w, c = x.shape
  return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2, stride-2 max pooling of NHWC (``F.max_pool2d(x, 2)``) as a reshape and a max.

  Its gradient goes, as PyTorch's, to the first maximum of each window in row-major order, and is
  built element-wise (compare, select) where XLA's ``reduce_window`` max would backpropagate through
  a ``select_and_scatter``, a serial scatter on GPUs."""
  return jnp.max(_pool_windows(x), axis=(2, 4))


def _max_pool_2x2_fwd(x):
  return max_pool_2x2(x), x


def _max_pool_2x2_bwd(x, g):
  windows = _pool_windows(x)
  is_max = windows == jnp.max(windows, axis=(2, 4), keepdims=True)
  taken = jnp.zeros_like(is_max[:, :, 0, :, 0])
  rows = []
  for dy in range(2):
    row = []
    for dx in range(2):
      first = is_max[:, :, dy, :, dx] & ~taken
      taken = taken | first
      row.append(jnp.where(first, g, jnp.zeros_like(g)))
    rows.append(jnp.stack(row, axis=3))
  grad = jnp.stack(rows, axis=2).reshape(
      windows.shape[0], windows.shape[1] * 2, windows.shape[3] * 2, -1
  )
  return (
      jnp.pad(
          grad, ((0, 0), (0, x.shape[1] - grad.shape[1]), (0, x.shape[2] - grad.shape[2]), (0, 0))
      ),
  )


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def _nearest_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """One axis of ``torch_nearest_resize``: output i reads input floor(i * n / size). Integer ratios
  (the only ones the models use) are a strided slice or a repeat; a gather, whose gradient is a
  scatter-add (serial on XLA:CPU, atomic on GPUs), only for the others."""
  n = x.shape[axis]
  if n == size:
    return x
  if n % size == 0:
    return jax.lax.slice_in_dim(x, 0, n, n // size, axis=axis)
  if size % n == 0:
    return jnp.repeat(x, size // n, axis=axis)
  return jnp.take(x, (jnp.arange(size) * n) // size, axis=axis)


def torch_nearest_resize(x: jax.Array, height: int, width: int) -> jax.Array:
  """PyTorch's legacy ``interpolate(mode='nearest')``: output index i reads input floor(i*in/out).

  ``jax.image.resize`` uses half-pixel centres instead, which picks different pixels when
  down-sampling (e.g. 256 -> 64 reads row 4i here, 4i+1 or 4i+2 there).
  """
  return _nearest_axis(_nearest_axis(jnp.asarray(x), 1, height), 2, width)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour up-sampling by 2 in height and width (PyTorch ``scale_factor=2``)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """``InstanceNorm2d(affine=False)``: per sample and channel over H, W, biased variance."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class GroupNorm32(nn.Module):
  """GroupNorm computed in float32 and cast back, as LDM's ``GroupNorm32`` / ``Normalize``.

  Params ``scale``/``bias`` map to PyTorch ``weight``/``bias``. Statistics use the two-pass
  (biased) variance like PyTorch, not the fast E[x^2]-E[x]^2 form.
  """

  num_groups: int = 32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(
          f"GroupNorm: {channels} channels are not divisible into {self.num_groups} groups"
      )
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(x.shape[:-1] + (self.num_groups, channels // self.num_groups))
    reduce_axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=reduce_axes, keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (normed * scale + bias).astype(x.dtype)
