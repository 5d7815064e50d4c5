"""A parameter-free first stage: pixel-unshuffle (space-to-depth) in, pixel-shuffle out.

For a data set with no pretrained autoencoder (the embedded synthetic one): the "latent" of an image
is the image itself with each ``factor x factor`` block of pixels folded into channels, so encoding
and decoding are exact inverses, nothing trains and nothing is downloaded, and the diffusion model
and the matching still work on a grid ``factor`` times coarser than the image, as with LDM's
autoencoders. Configured like the other first stages (``type="pixel_shuffle"``): ``ch_mult`` has one
entry per level (factor ``2 ** (len(ch_mult) - 1)``, the rule every other part of the package uses)
and ``embed_dim`` must be ``in_channels * factor ** 2``. Channel order within a block: PyTorch's
``pixel_unshuffle`` (channel-major, then block row, then block column).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def pixel_unshuffle(images: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/f, W/f, C f^2), channel index ``c * f^2 + i * f + j`` for block pixel (i,
  j)."""
  b, h, w, c = images.shape
  if h % factor or w % factor:
    raise ValueError(
        f"pixel_unshuffle: image size {h}x{w} is not a multiple of the factor {factor}"
    )
  blocks = images.reshape(b, h // factor, factor, w // factor, factor, c)
  return jnp.transpose(blocks, (0, 1, 3, 5, 2, 4)).reshape(
      b, h // factor, w // factor, c * factor * factor
  )


def pixel_shuffle(latents: jax.Array, factor: int) -> jax.Array:
  """The inverse of ``pixel_unshuffle``."""
  b, h, w, channels = latents.shape
  c = channels // (factor * factor)
  blocks = latents.reshape(b, h, w, c, factor, factor)
  return jnp.transpose(blocks, (0, 1, 4, 2, 5, 3)).reshape(b, h * factor, w * factor, c)


class PixelShuffleFirstStage(nn.Module):
  """``encode``: pixel-unshuffle; ``decode``: pixel-shuffle. No variables."""

  embed_dim: int = 12
  ch_mult: Sequence[int] = (1, 1)
  in_channels: int = 3
  resolution: int = 32
  dtype: jnp.dtype = jnp.float32

  @property
  def factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def _check(self) -> None:
    if self.embed_dim != self.in_channels * self.factor**2:
      raise ValueError(
          f"pixel_shuffle first stage: embed_dim must be in_channels * factor^2 = "
          f"{self.in_channels * self.factor ** 2} (factor {self.factor}), got {self.embed_dim}"
      )

  def encode(self, images: jax.Array) -> jax.Array:
    self._check()
    if images.shape[-1] != self.in_channels:
      raise ValueError(
          f"pixel_shuffle first stage: images have {images.shape[-1]} channels, expected "
          f"in_channels={self.in_channels}"
      )
    return pixel_unshuffle(images, self.factor).astype(self.dtype)

  def decode(self, latents: jax.Array) -> jax.Array:
    self._check()
    return pixel_shuffle(latents, self.factor).astype(self.dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images))
