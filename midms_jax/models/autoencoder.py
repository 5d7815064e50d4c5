"""LDM first-stage autoencoders (VQ-f4 ``VQModelInterface`` and KL ``AutoencoderKL``), NHWC.

Mirrors ``ldm/modules/diffusionmodules/model.py`` (Encoder, Decoder, ResnetBlock, AttnBlock) and
taming's ``VectorQuantizer2`` (legacy loss). Submodules carry the official PyTorch names
(``encoder.down.0.block.0.norm1`` ...), so parameters map mechanically to checkpoint keys
(see ``midms_jax.interop.torch_names``). MIDMs keeps these models frozen, hence inference only:
``dropout`` is a config field but only 0.0 (every official config) is supported.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from midms_jax.models.conv import Conv
from midms_jax.models.layers import GroupNorm32, upsample_nearest_2x

_ATTN_TYPES = ("vanilla", "none")


def _normalize(name: str) -> GroupNorm32:
  """LDM ``Normalize``: GroupNorm with 32 groups and eps 1e-6 (not the U-Net's 1e-5)."""
  return GroupNorm32(num_groups=32, epsilon=1e-6, name=name)


def _conv(
    features: int, kernel: int, name: str, dtype, stride: int = 1, padding: str | None = None
) -> nn.Conv:
  """Conv2d with PyTorch-style symmetric zero padding ``kernel // 2`` unless ``padding`` is
  given."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name
  )


def _check_config(ch: int, ch_mult: Sequence[int], dropout: float, attn_type: str) -> None:
  if not ch_mult:
    raise ValueError("autoencoder: ch_mult must name at least one level")
  for mult in (1, *ch_mult):
    if (ch * mult) % 32:
      raise ValueError(
          f"autoencoder: width ch*mult = {ch * mult} is not divisible into 32 GroupNorm groups"
      )
  if dropout != 0.0:
    raise ValueError(
        f"autoencoder: dropout={dropout} is not supported (frozen first stage, inference only)"
    )
  if attn_type not in _ATTN_TYPES:
    raise ValueError(f"autoencoder: attn_type {attn_type!r} is not one of {_ATTN_TYPES}")


class ResnetBlock(nn.Module):
  """ResnetBlock without time embedding: ``x_sc + conv2(swish(norm2(conv1(swish(norm1(x))))))``."""

  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(nn.swish(_normalize("norm1")(x)))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(nn.swish(_normalize("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "nin_shortcut", self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention over all H*W positions, 1x1-conv q/k/v/proj_out,
  residual."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = _normalize("norm")(x)
    q, k, v = (
        _conv(channels, 1, name, self.dtype)(h).reshape(batch, height * width, channels)
        for name in ("q", "k", "v")
    )
    logits = jnp.einsum("bic,bjc->bij", q, k) * (channels**-0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    h = jnp.einsum("bij,bjc->bic", weights, v).reshape(batch, height, width, channels)
    return x + _conv(channels, 1, "proj_out", self.dtype)(h)


def _attention(attn_type: str, name: str, dtype) -> nn.Module | None:
  """``make_attn``: an AttnBlock, or None for ``attn_type="none"`` (identity, no parameters)."""
  return AttnBlock(dtype=dtype, name=name) if attn_type == "vanilla" else None


def _apply(block: nn.Module | None, x: jax.Array) -> jax.Array:
  return x if block is None else block(x)


class Encoder(nn.Module):
  """LDM Encoder: conv_in, ``down`` levels (ResnetBlocks, optional attention, asymmetric-pad
  stride-2 conv), mid (Res, Attn, Res), GroupNorm, swish, conv_out (2*z_channels if double_z)."""

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  in_channels: int = 3
  resolution: int = 256
  z_channels: int = 3
  double_z: bool = False
  attn_type: str = "vanilla"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_config(self.ch, self.ch_mult, self.dropout, self.attn_type)
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(
          f"Encoder: expected NHWC input with {self.in_channels} channels, got shape {x.shape}"
      )
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f"Encoder: spatial size {x.shape[1:3]} is not divisible by the down-sampling factor "
          f"{factor}"
      )
    h = _conv(self.ch, 3, "conv_in", self.dtype)(x.astype(self.dtype))
    res = self.resolution
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.dtype, name=f"down.{level}.block.{i}")(h)
        if res in self.attn_resolutions:
          h = _apply(_attention(self.attn_type, f"down.{level}.attn.{i}", self.dtype), h)
      if level != len(self.ch_mult) - 1:
        # Zero pad right/bottom only, then a 3x3 stride-2 conv without padding.
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
        h = _conv(
            h.shape[-1], 3, f"down.{level}.downsample.conv", self.dtype, stride=2, padding="VALID"
        )(h)
        res //= 2
    width = h.shape[-1]
    h = ResnetBlock(width, self.dtype, name="mid.block_1")(h)
    h = _apply(_attention(self.attn_type, "mid.attn_1", self.dtype), h)
    h = ResnetBlock(width, self.dtype, name="mid.block_2")(h)
    h = nn.swish(_normalize("norm_out")(h))
    out_channels = 2 * self.z_channels if self.double_z else self.z_channels
    return _conv(out_channels, 3, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
  """LDM Decoder: conv_in, mid (Res, Attn, Res), ``up`` levels run from the last index down
  (num_res_blocks + 1 ResnetBlocks, optional attention, nearest x2 + conv), GroupNorm, swish,
  conv_out. Output is not clamped (no tanh). ``remat_blocks`` recomputes the ResNet blocks in the
  backward pass (the decoder runs at image resolution, where activations are largest)."""

  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  resolution: int = 256
  z_channels: int = 3
  attn_type: str = "vanilla"
  dtype: jnp.dtype = jnp.float32
  remat_blocks: bool = False

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    _check_config(self.ch, self.ch_mult, self.dropout, self.attn_type)
    if z.ndim != 4 or z.shape[-1] != self.z_channels:
      raise ValueError(
          f"Decoder: expected NHWC latent with {self.z_channels} channels, got shape {z.shape}"
      )
    resnet = nn.remat(ResnetBlock) if self.remat_blocks else ResnetBlock
    width = self.ch * self.ch_mult[-1]
    h = _conv(width, 3, "conv_in", self.dtype)(z.astype(self.dtype))
    h = resnet(width, self.dtype, name="mid.block_1")(h)
    h = _apply(_attention(self.attn_type, "mid.attn_1", self.dtype), h)
    h = resnet(width, self.dtype, name="mid.block_2")(h)
    res = self.resolution // 2 ** (len(self.ch_mult) - 1)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = resnet(self.ch * self.ch_mult[level], self.dtype, name=f"up.{level}.block.{i}")(h)
        if res in self.attn_resolutions:
          h = _apply(_attention(self.attn_type, f"up.{level}.attn.{i}", self.dtype), h)
      if level != 0:
        h = _conv(h.shape[-1], 3, f"up.{level}.upsample.conv", self.dtype)(upsample_nearest_2x(h))
        res *= 2
    h = nn.swish(_normalize("norm_out")(h))
    return _conv(self.out_ch, 3, "conv_out", self.dtype)(h)


def _codebook_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """taming's codebook init: uniform in [-1/n_embed, 1/n_embed]."""
  bound = 1.0 / shape[0]
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class VectorQuantizer(nn.Module):
  """taming ``VectorQuantizer2`` (legacy loss, no index remap) on NHWC latents, computed in fp32.

  The codebook is ``nn.Embed`` named ``embedding`` so that its key is ``<name>.embedding.weight``.
  """

  n_embed: int = 8192
  embed_dim: int = 3
  beta: float = 0.25

  def setup(self) -> None:
    self.embedding = nn.Embed(
        self.n_embed,
        self.embed_dim,
        dtype=jnp.float32,
        embedding_init=_codebook_init,
        name="embedding",
    )

  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (straight-through z_q, legacy commitment loss, indices (B,H,W) int32)."""
    if z.shape[-1] != self.embed_dim:
      raise ValueError(
          f"VectorQuantizer: latent has {z.shape[-1]} channels, codebook dim is {self.embed_dim}"
      )
    z = z.astype(jnp.float32)
    codebook = self.embedding.embedding
    flat = z.reshape(-1, self.embed_dim)
    # |z|^2 + |e|^2 - 2 z.e, the official expression (argmin ties/rounding as in PyTorch).
    dist = (
        jnp.sum(flat**2, axis=1, keepdims=True)
        + jnp.sum(codebook**2, axis=1)
        - 2.0 * flat @ codebook.T
    )
    indices = jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(z.shape[:-1])
    quantized = self.embed_code(indices)
    loss = jnp.mean((jax.lax.stop_gradient(quantized) - z) ** 2) + self.beta * jnp.mean(
        (quantized - jax.lax.stop_gradient(z)) ** 2
    )
    z_q = z + jax.lax.stop_gradient(quantized - z)
    return z_q, loss, indices

  def embed_code(self, indices: jax.Array) -> jax.Array:
    """Codebook rows for integer ``indices`` of any shape -> indices.shape + (embed_dim,)."""
    return self.embedding(indices)


class VQModel(nn.Module):
  """``VQModelInterface`` (VQ-f4 defaults): encode -> pre-quantization latent; decode quantizes.

  Methods are meant for ``model.apply(variables, x, method=VQModel.encode)`` etc.; ``__call__`` runs
  ``decode(encode(x))`` so that ``init`` creates every parameter.
  """

  embed_dim: int = 3
  n_embed: int = 8192
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  in_channels: int = 3
  resolution: int = 256
  z_channels: int = 3
  double_z: bool = False
  attn_type: str = "vanilla"
  dtype: jnp.dtype = jnp.float32
  remat_blocks: bool = False  # the decoder's (see Decoder)

  def setup(self) -> None:
    if self.double_z:
      raise ValueError("VQModel: double_z must be False (quant_conv reads z_channels)")
    self.encoder = Encoder(
        self.ch,
        self.ch_mult,
        self.num_res_blocks,
        self.attn_resolutions,
        self.dropout,
        self.in_channels,
        self.resolution,
        self.z_channels,
        False,
        self.attn_type,
        self.dtype,
    )
    self.decoder = Decoder(
        self.ch,
        self.out_ch,
        self.ch_mult,
        self.num_res_blocks,
        self.attn_resolutions,
        self.dropout,
        self.resolution,
        self.z_channels,
        self.attn_type,
        self.dtype,
        self.remat_blocks,
    )
    self.quantize_ = VectorQuantizer(self.n_embed, self.embed_dim, name="quantize")
    self.quant_conv = _conv(self.embed_dim, 1, "quant_conv", self.dtype)
    self.post_quant_conv = _conv(self.z_channels, 1, "post_quant_conv", self.dtype)

  def encode(self, x: jax.Array) -> jax.Array:
    """``quant_conv(encoder(x))``: the latent before quantization, no scale factor."""
    return self.quant_conv(self.encoder(x))

  def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(straight-through z_q, legacy VQ loss, indices (B,H,W) int32)."""
    return self.quantize_(z)

  def decode(self, z: jax.Array, force_not_quantize: bool = False) -> jax.Array:
    """Quantize (straight-through, unless ``force_not_quantize``) -> post_quant_conv -> decoder."""
    if not force_not_quantize:
      z = self.quantize_(z)[0]
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

  def decode_code(self, indices: jax.Array) -> jax.Array:
    """Decodes code indices (B,H,W): codebook rows are already quantized, so no re-quantization."""
    return self.decode(self.quantize_.embed_code(indices), force_not_quantize=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x))


class DiagonalGaussian(NamedTuple):
  """LDM ``DiagonalGaussianDistribution`` over NHWC latents (a pytree, returned from ``apply``)."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits channels into (mean, logvar) and clamps logvar to [-30, 20] like the official code."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean


class AutoencoderKL(nn.Module):
  """LDM ``AutoencoderKL`` (kl-f8 defaults): encode -> DiagonalGaussian, decode(z) -> image."""

  embed_dim: int = 4
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  in_channels: int = 3
  resolution: int = 256
  z_channels: int = 4
  double_z: bool = True
  attn_type: str = "vanilla"
  dtype: jnp.dtype = jnp.float32
  remat_blocks: bool = False  # the decoder's (see Decoder)

  def setup(self) -> None:
    if not self.double_z:
      raise ValueError("AutoencoderKL: double_z must be True (the encoder outputs mean and logvar)")
    self.encoder = Encoder(
        self.ch,
        self.ch_mult,
        self.num_res_blocks,
        self.attn_resolutions,
        self.dropout,
        self.in_channels,
        self.resolution,
        self.z_channels,
        True,
        self.attn_type,
        self.dtype,
    )
    self.decoder = Decoder(
        self.ch,
        self.out_ch,
        self.ch_mult,
        self.num_res_blocks,
        self.attn_resolutions,
        self.dropout,
        self.resolution,
        self.z_channels,
        self.attn_type,
        self.dtype,
        self.remat_blocks,
    )
    self.quant_conv = _conv(2 * self.embed_dim, 1, "quant_conv", self.dtype)
    self.post_quant_conv = _conv(self.z_channels, 1, "post_quant_conv", self.dtype)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

  def decode(self, z: jax.Array) -> jax.Array:
    if z.shape[-1] != self.embed_dim:
      raise ValueError(
          f"AutoencoderKL: latent has {z.shape[-1]} channels, expected embed_dim={self.embed_dim}"
      )
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

  def __call__(
      self, x: jax.Array, rng: jax.Array | None = None
  ) -> tuple[jax.Array, DiagonalGaussian]:
    """Official ``forward``: decodes a posterior sample (with ``rng``) or its mode; returns (image,
    posterior)."""
    posterior = self.encode(x)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z), posterior
