"""Pixel-level image quality: PSNR.

Convention: PSNR is computed on the float images as given, with ``data_range`` the width of their
value range: for the model's [-1, 1] images (``data_range=2``) that is exactly the PSNR of the [0,
1]-scaled images with peak 1, i.e. ``skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1)``
or torchmetrics' ``PeakSignalNoiseRatio(data_range=1.0)`` per image. No clamping, no uint8 rounding.
The PSNR of saved PNGs (what evaluation scripts that read image files report) is the same function
on the uint8 pixels: ``psnr(images.to_uint8(x), images.to_uint8(y), data_range=255)``; the two
differ by the rounding noise (negligible below ~40 dB).
"""

import jax
import jax.numpy as jnp


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Per-image PSNR in dB, ``(B,)``, of NHWC batches: ``10 log10(data_range^2 / MSE)``, MSE over H,
  W, C.

  Identical images give ``inf``. Integer inputs (uint8 pixels) are converted to float32 first.
  """
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"psnr: expects two NHWC batches of one shape, got {x.shape} and {y.shape}")
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))
  return 10 * jnp.log10(data_range**2 / mse)
