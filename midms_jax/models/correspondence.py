"""MIDMs correspondence networks (NHWC): spectral-norm convs, SPADE, the SAFG encoders, trunk,
heads.

Mirrors ``models/generator.py`` (ShallowAdaptiveFeatureGenerator[ForLabel]),
``models/architecture.py`` (SPADEResnetBlock), ``models/normalization.py`` (SPADE with
PositionalNorm2d) and the ``ResidualBlock`` trunk, ``phi``/``theta`` heads of ``models/midms.py``.
Submodules carry the official names, so ``weight_orig``/``bias``/``prelu.weight`` (collection
``params``) and ``weight_u``/``weight_v`` (collection ``spectral``) map mechanically to checkpoint
keys (``midms_jax.interop.torch_names``).

Spectral norm follows ``torch.nn.utils.spectral_norm``: in training (``update_stats=True``) every
call runs one power iteration and writes u, v (apply with ``mutable=["spectral"]`` and thread the
returned collection into the next call); in evaluation the stored u, v are used as they are. These
networks are trained from scratch, so parameters are initialised like PyTorch's defaults. ``dtype``
is the computation dtype of the convolutions (parameters stay float32, the instance and positional
norms compute in float32); the public methods of ``CorrespondenceNetworks`` return float32.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from midms_jax import platform_tuning
from midms_jax.models.conv import Conv, conv_general_dilated
from midms_jax.models.layers import instance_norm, pad_hw, torch_nearest_resize

SPECTRAL = "spectral"
_HEADS = ("phi", "theta")
_LEAKY_SLOPE = 0.2

# PyTorch's default Conv2d weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> Callable:
  """PyTorch's default Conv2d bias init U(+-1/sqrt(fan_in))."""
  bound = fan_in**-0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _torch_conv(
    features: int, kernel_size: int, in_channels: int, name: str | None = None, dtype=jnp.float32
) -> nn.Conv:
  """Unpadded Conv2d with bias (callers pad explicitly, reflection or zero, as the official
  code)."""
  return Conv(
      features,
      (kernel_size, kernel_size),
      padding="VALID",
      kernel_init=_torch_kernel_init,
      dtype=dtype,
      param_dtype=jnp.float32,
      bias_init=_torch_bias_init(in_channels * kernel_size**2),
      name=name,
  )


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  """``F.normalize(x, dim=0, eps)``: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


def _weight_matrix(kernel_hwio: jax.Array) -> jax.Array:
  """PyTorch's (O, I*kh*kw) view of an OIHW weight, built from the Flax HWIO kernel."""
  return jnp.transpose(kernel_hwio, (3, 2, 0, 1)).reshape(kernel_hwio.shape[-1], -1)


def power_iteration(
    kernel_hwio: jax.Array, u: jax.Array, eps: float = 1e-12
) -> tuple[jax.Array, jax.Array]:
  """One power iteration, v <- normalize(W^T u), u <- normalize(W v); returns the new (u, v)."""
  w_mat = _weight_matrix(kernel_hwio)
  v = _l2_normalize(w_mat.T @ u, eps)
  return _l2_normalize(w_mat @ v, eps), v


def spectral_normalized_kernel(
    weight_orig_hwio: jax.Array, u: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Effective kernel W_orig / sigma (HWIO) and sigma = u . (W_mat v); gradients flow through
  W_orig."""
  sigma = jnp.dot(u, _weight_matrix(weight_orig_hwio) @ v)
  return weight_orig_hwio / sigma, sigma


def _random_unit_vector(key: jax.Array, size: int, eps: float) -> jax.Array:
  """PyTorch's u/v initialisation: a normal draw, L2-normalised."""
  return _l2_normalize(jax.random.normal(key, (size,), jnp.float32), eps)


class SpectralNormConv(nn.Module):
  """``spectral_norm(Conv2d)`` (dim 0, one power iteration per training call), zero padding."""

  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, update_stats: bool) -> jax.Array:
    in_channels = x.shape[-1]
    k = self.kernel_size
    weight_orig = self.param(
        "weight_orig", _torch_kernel_init, (k, k, in_channels, self.features), jnp.float32
    )
    u = self.variable(
        SPECTRAL,
        "weight_u",
        lambda: _random_unit_vector(self.make_rng("params"), self.features, self.eps),
    )
    v = self.variable(
        SPECTRAL,
        "weight_v",
        lambda: _random_unit_vector(self.make_rng("params"), in_channels * k * k, self.eps),
    )
    if update_stats:
      if not self.is_mutable_collection(SPECTRAL):
        raise ValueError(f"{self.name}: update_stats=True needs apply(..., mutable=['{SPECTRAL}'])")
      u.value, v.value = power_iteration(jax.lax.stop_gradient(weight_orig), u.value, self.eps)
    kernel, _ = spectral_normalized_kernel(
        weight_orig, jax.lax.stop_gradient(u.value), jax.lax.stop_gradient(v.value)
    )
    y = conv_general_dilated(
        x.astype(self.dtype),
        kernel.astype(self.dtype),
        (self.stride, self.stride),
        ((self.padding, self.padding),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.use_bias:
      y = y + self.param(
          "bias", _torch_bias_init(in_channels * k * k), (self.features,), jnp.float32
      ).astype(y.dtype)
    return y


def positional_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """``PositionalNorm2d``: per pixel over channels, (x - mean) / sqrt(unbiased var + eps)."""
  channels = x.shape[-1]
  if channels < 2:
    raise ValueError(
        f"positional norm needs at least 2 channels for the unbiased variance, got {channels}"
    )
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (channels - 1)
  return (centred / jnp.sqrt(var + eps)).astype(x.dtype)


class SPADE(nn.Module):
  """SPADE with positional norm: norm(x) * (1 + gamma(seg)) + beta(seg), 3x3 convs on reflection
  pads."""

  hidden: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, segmap: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    segmap = torch_nearest_resize(segmap, x.shape[1], x.shape[2])
    # materialised, not fused into every conv that reads it
    if platform_tuning.tuned("spade_map_barrier"):
      segmap = jax.lax.optimization_barrier(segmap)
    shared = _torch_conv(self.hidden, 3, segmap.shape[-1], name="mlp_shared.1", dtype=self.dtype)
    actv = pad_hw(nn.relu(shared(pad_hw(segmap, 1, "reflect"))), 1, "reflect")
    gamma = _torch_conv(channels, 3, self.hidden, name="mlp_gamma", dtype=self.dtype)(actv)
    beta = _torch_conv(channels, 3, self.hidden, name="mlp_beta", dtype=self.dtype)(actv)
    return positional_norm(x) * (1 + gamma) + beta


class SPADEResnetBlock(nn.Module):
  """SPADE residual block (fin -> features), spectral-norm convs, learned shortcut iff fin !=
  features."""

  features: int
  spade_hidden: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, seg: jax.Array, *, update_stats: bool) -> jax.Array:
    fin = x.shape[-1]
    fmiddle = min(fin, self.features)
    spade = lambda name: SPADE(self.spade_hidden, self.dtype, name=name)
    sn_conv = lambda features, kernel, name, **kw: SpectralNormConv(
        features, kernel, dtype=self.dtype, name=name, **kw
    )
    if fin != self.features:
      shortcut = sn_conv(self.features, 1, "conv_s", use_bias=False)(
          spade("norm_s")(x, seg), update_stats=update_stats
      )
    else:
      shortcut = x
    dx = nn.leaky_relu(spade("norm_0")(x, seg), _LEAKY_SLOPE)
    dx = sn_conv(fmiddle, 3, "conv_0")(pad_hw(dx, 1, "reflect"), update_stats=update_stats)
    dx = nn.leaky_relu(spade("norm_1")(dx, seg), _LEAKY_SLOPE)
    dx = sn_conv(self.features, 3, "conv_1")(pad_hw(dx, 1, "reflect"), update_stats=update_stats)
    return shortcut + dx


class ShallowAdaptiveFeatureGenerator(nn.Module):
  """SAFG encoder: 3 x (SN conv 3x3 -> InstanceNorm), LeakyReLU between, then a SPADE resnet block.

  ``seg`` (SPADE conditioning) defaults to the input itself; this also covers
  ``ShallowAdaptiveFeatureGeneratorForLabel`` (in_channels = seg_channels = label channels).
  """

  width: int = 256
  base_width: int = 64
  spade_hidden: int = 128
  in_channels: int = 3
  seg_channels: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, seg: jax.Array | None = None, *, update_stats: bool
  ) -> jax.Array:
    seg = x if seg is None else seg
    if x.shape[-1] != self.in_channels:
      raise ValueError(
          f"{self.name}: input has {x.shape[-1]} channels, expected in_channels={self.in_channels}"
      )
    if seg.shape[-1] != self.seg_channels:
      raise ValueError(
          f"{self.name}: seg has {seg.shape[-1]} channels, expected "
          f"seg_channels={self.seg_channels}"
      )
    for i, mult in enumerate((1, 4, 8)):
      if i:
        x = nn.leaky_relu(x, _LEAKY_SLOPE)
      conv = SpectralNormConv(
          self.base_width * mult,
          3,
          padding=1,
          use_bias=False,
          dtype=self.dtype,
          name=f"layer{i + 1}.0",
      )
      x = instance_norm(conv(x, update_stats=update_stats))
    return SPADEResnetBlock(self.width, self.spade_hidden, self.dtype, name="G_middle_1")(
        x, seg, update_stats=update_stats
    )


class PReLU(nn.Module):
  """``nn.PReLU()``: one learned slope (param ``weight``, shape (1,), init 0.25) for all
  channels."""

  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param("weight", nn.initializers.constant(self.init_slope), (1,), jnp.float32)
    return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


class ResidualBlock(nn.Module):
  """Trunk block: reflect-pad conv -> IN -> PReLU -> reflect-pad conv -> IN -> +x -> PReLU (one
  PReLU)."""

  channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.channels:
      raise ValueError(f"ResidualBlock: input has {x.shape[-1]} channels, expected {self.channels}")
    prelu = PReLU(name="prelu")
    h = _torch_conv(self.channels, 3, self.channels, name="conv1", dtype=self.dtype)(
        pad_hw(x, 1, "reflect")
    )
    h = prelu(instance_norm(h))
    h = _torch_conv(self.channels, 3, self.channels, name="conv2", dtype=self.dtype)(
        pad_hw(h, 1, "reflect")
    )
    return prelu(instance_norm(h) + x)


class ResidualTrunk(nn.Module):
  """The shared ``layer`` trunk: ``blocks`` ResidualBlocks in sequence, named "0", "1", ..."""

  channels: int
  blocks: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.blocks):
      x = ResidualBlock(self.channels, self.dtype, name=str(i))(x)
    return x


class CorrespondenceNetworks(nn.Module):
  """All trainable correspondence modules of MIDMs: ``real_enc``, ``iter_enc``, ``seg_enc``,
  ``layer``, ``phi``, ``theta``.

  ``label_channels`` is ``nc`` (the caller adds 1 for label_nc 150); ``latent_channels`` is 3 for
  VQ-f4 and 4 for KL-f8. Use the methods through ``apply(..., method=...)``.
  """

  width: int = 256
  base_width: int = 64
  spade_hidden: int = 128
  label_channels: int = 15
  latent_channels: int = 3
  trunk_blocks: int = 4
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    encoder = dict(
        width=self.width,
        base_width=self.base_width,
        spade_hidden=self.spade_hidden,
        dtype=self.dtype,
    )
    self.real_enc = ShallowAdaptiveFeatureGenerator(
        in_channels=self.latent_channels, seg_channels=self.latent_channels, **encoder
    )
    self.iter_enc = ShallowAdaptiveFeatureGenerator(
        in_channels=self.latent_channels, seg_channels=self.width, **encoder
    )
    self.seg_enc = ShallowAdaptiveFeatureGenerator(
        in_channels=self.label_channels, seg_channels=self.label_channels, **encoder
    )
    trunk_channels = self.width + self.label_channels
    self.layer = ResidualTrunk(trunk_channels, self.trunk_blocks, self.dtype)
    self.phi = _torch_conv(self.width, 1, trunk_channels, dtype=self.dtype)
    self.theta = _torch_conv(self.width, 1, trunk_channels, dtype=self.dtype)

  def _in(self, x: jax.Array) -> jax.Array:
    return x.astype(self.dtype)

  def encode_condition(self, semantics: jax.Array, *, update_stats: bool) -> jax.Array:
    """``seg_enc(semantics)`` on the latent-size condition map -> (B, h, w, width)."""
    return self.seg_enc(self._in(semantics), update_stats=update_stats).astype(jnp.float32)

  def encode_latent(self, latent: jax.Array, *, update_stats: bool) -> jax.Array:
    """``real_enc(latent)`` (SPADE conditioned on the latent itself) -> (B, h, w, width)."""
    return self.real_enc(self._in(latent), update_stats=update_stats).astype(jnp.float32)

  def encode_iterate(
      self, x0: jax.Array, condition_features: jax.Array, *, update_stats: bool
  ) -> jax.Array:
    """``iter_enc(x0, seg=condition_features)`` for the re-warping steps -> (B, h, w, width)."""
    return self.iter_enc(
        self._in(x0), self._in(condition_features), update_stats=update_stats
    ).astype(jnp.float32)

  def trunk(self, x: jax.Array) -> jax.Array:
    """The shared ``layer`` trunk on ``cat[features, semantics]`` (width + label_channels
    channels)."""
    return self.layer(x)

  def project(self, x: jax.Array, head: str) -> jax.Array:
    """The 1x1 ``phi`` (exemplar / GT side) or ``theta`` (condition side) head."""
    if head not in _HEADS:
      raise ValueError(f"head must be one of {_HEADS}, got {head!r}")
    return self.phi(x) if head == "phi" else self.theta(x)

  def match_features(self, features: jax.Array, semantics: jax.Array, head: str) -> jax.Array:
    """``head(layer(cat[features, semantics]))``: matching features before normalisation."""
    if features.shape[:3] != semantics.shape[:3]:
      raise ValueError(
          f"features {features.shape} and semantics {semantics.shape} differ in batch/spatial size"
      )
    joined = self._in(jnp.concatenate([features, semantics], axis=-1))
    return self.project(self.trunk(joined), head).astype(jnp.float32)

  def __call__(
      self, latent: jax.Array, semantics: jax.Array, *, update_stats: bool = False
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs every submodule once (for ``init``): (theta features of the condition, phi features of
    the latent, iter_enc features of the latent conditioned on the condition features)."""
    condition = self.encode_condition(semantics, update_stats=update_stats)
    latent_features = self.encode_latent(latent, update_stats=update_stats)
    iterate = self.encode_iterate(latent, condition, update_stats=update_stats)
    return (
        self.match_features(condition, semantics, "theta"),
        self.match_features(latent_features, semantics, "phi"),
        iterate,
    )
