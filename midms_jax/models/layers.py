"""Small building blocks shared by the models, written to match PyTorch's numerics exactly.

Everything is NHWC. Module names in this package mirror the official PyTorch module paths
(for example ``input_blocks.1.0`` / ``in_layers.2``) so that checkpoint keys follow mechanically
from parameter paths (see ``midms_jax.interop.torch_names``).
"""

import jax
import jax.numpy as jnp
import flax.linen as nn


def pad_hw(x: jax.Array, pad: int, mode: str = "constant") -> jax.Array:
  """Pads height and width of an NHWC tensor by ``pad`` on every side (``constant`` or ``reflect``)."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)


def join_batches(arrays) -> jax.Array:
  """Same-shaped batches ``(B, ...)`` as one ``(k B, ...)`` batch, example by example: rows ``b k`` to
  ``b k + k - 1`` hold example ``b`` of each array. For networks that treat examples independently this is
  ``concatenate`` up to the row order, but under data parallelism (the batch axis split over devices) each
  device's rows of the result are its own rows of the inputs, so joining and ``split_batches`` move nothing
  between devices; a concatenation puts the second array's examples on other devices, and XLA then shuffles
  activations between devices around every layer that sees the joined batch."""
  return jnp.stack(arrays, axis=1).reshape((-1,) + arrays[0].shape[1:])


def split_batches(x: jax.Array, k: int) -> list[jax.Array]:
  """The ``k`` batches that ``join_batches`` joined into ``x``."""
  x = x.reshape((-1, k) + x.shape[1:])
  return [x[:, i] for i in range(k)]


def _nearest_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """One axis of ``torch_nearest_resize``: output i reads input floor(i * n / size). Integer ratios (the
  only ones the models use) are a strided slice or a repeat; a gather, whose gradient is a scatter-add
  (serial on XLA:CPU, atomic on GPUs), only for the others."""
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
      raise ValueError(f"GroupNorm: {channels} channels are not divisible into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(x.shape[:-1] + (self.num_groups, channels // self.num_groups))
    reduce_axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=reduce_axes, keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (normed * scale + bias).astype(x.dtype)
