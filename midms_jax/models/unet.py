"""The latent-diffusion U-Net (LDM ``openaimodel.UNetModel``) in Flax, NHWC.

Defaults are the CelebA-HQ LDM (``models/ldm/celeba256``) that MIDMs fine-tunes; every option the
LDM model-zoo configs use is an attribute (scale-shift norm, ResBlock up/down-sampling, new
attention order, head count or head width, no-conv resampling), so e.g. the LSUN-churches U-Net is
``UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=192,
attention_resolutions=(1, 2, 4, 8), channel_mult=(1, 2, 2, 4, 4), num_heads=8, num_head_channels=-1,
use_scale_shift_norm=True, resblock_updown=True)``.

Submodule names are the PyTorch module paths (``input_blocks.4.1.qkv``,
``middle_block.0.emb_layers.1``,
...), so ``midms_jax.interop.torch_names`` maps the variables to the official state-dict keys. The
attention ``qkv`` / ``proj_out`` are PyTorch ``Conv1d`` layers: here 1-wide convolutions over the
flattened positions, whose ``(1, C, 3C)`` kernels map to the ``(3C, C, 1)`` Conv1d weights.
"""

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from midms_jax.models import blockwise
from midms_jax.models.conv import Conv
from midms_jax.models.layers import GroupNorm32, upsample_nearest_2x

# PyTorch's default Conv/Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
_PAD1 = ((1, 1), (1, 1))


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: int = 10000) -> jax.Array:
  """Sinusoidal embedding ``[cos(t f), sin(t f)]`` (cos first),
  ``f_i = max_period^(-i / (dim // 2))``.

  The frequencies are computed once in NumPy: the exponent in float32 as PyTorch does, ``exp`` in
  float64 rounded to float32. That reproduces PyTorch's float32 frequencies bit for bit at the
  official widths (XLA's float32 ``exp`` is off by 1 ulp for some, which at t = 999 moves the
  embedding by ~1e-4). Odd ``dim`` gets a trailing zero column, as in LDM.
  """
  timesteps = jnp.asarray(timesteps)
  if timesteps.ndim != 1:
    raise ValueError(
        f"timestep_embedding: timesteps must have shape (batch,), got {timesteps.shape}"
    )
  half = dim // 2
  exponent = (
      np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  )
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


def _conv(
    features: int,
    kernel: int,
    *,
    dtype,
    stride: int = 1,
    zero_init: bool = False,
    name: str | None = None,
) -> nn.Conv:
  """Conv2d with PyTorch padding ``kernel // 2`` on every side (symmetric, also when strided)."""
  pad = kernel // 2
  return Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.zeros if zero_init else _torch_default_init,
      name=name,
  )


def _avg_pool_2x(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
  """Halves H and W: 3x3 conv with stride 2 and padding 1 (``op``), or 2x2 average pooling."""

  use_conv: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.use_conv:
      return _conv(x.shape[-1], 3, stride=2, dtype=self.dtype, name="op")(x)
    return _avg_pool_2x(x)


class Upsample(nn.Module):
  """Doubles H and W (nearest), then an optional 3x3 conv (``conv``)."""

  use_conv: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = upsample_nearest_2x(x)
    if self.use_conv:
      x = _conv(x.shape[-1], 3, dtype=self.dtype, name="conv")(x)
    return x


class ResBlock(nn.Module):
  """Residual block conditioned on the timestep embedding, optionally re-sampling (``updown``).

  ``h = in_layers(x)`` (GroupNorm, SiLU, conv 3x3); the embedding goes through ``emb_layers``
  (SiLU, Linear) and is added to ``h``, or with ``use_scale_shift_norm`` split into (scale, shift)
  applied as ``out_norm(h) * (1 + scale) + shift``; then ``out_layers`` (GroupNorm, SiLU, dropout,
  zero-initialised conv 3x3) and the skip (identity, or 1x1 conv when the width changes). With
  ``updown`` 'up'/'down', ``h`` is re-sampled between the in-layers' SiLU and conv, and ``x`` before
  the skip (nearest x2 / 2x2 average pooling, no conv).
  """

  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  updown: str | None = None
  dtype: jnp.dtype = jnp.float32

  def _resample(self, x: jax.Array) -> jax.Array:
    if self.updown == "up":
      return upsample_nearest_2x(x)
    if self.updown == "down":
      return _avg_pool_2x(x)
    return x

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, *, train: bool = False) -> jax.Array:
    if self.updown not in (None, "up", "down"):
      raise ValueError(f"ResBlock: updown must be None, 'up' or 'down', got {self.updown!r}")
    h = nn.silu(GroupNorm32(name="in_layers.0")(x))
    h = self._resample(h)
    x = self._resample(x)
    h = _conv(self.out_channels, 3, dtype=self.dtype, name="in_layers.2")(h)

    emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    emb_out = nn.Dense(
        emb_width,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=_torch_default_init,
        name="emb_layers.1",
    )(nn.silu(emb))
    emb_out = emb_out[:, None, None, :].astype(h.dtype)
    out_norm = GroupNorm32(name="out_layers.0")
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = out_norm(h) * (1 + scale) + shift
    else:
      h = out_norm(h + emb_out)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = _conv(self.out_channels, 3, zero_init=True, dtype=self.dtype, name="out_layers.3")(h)

    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, dtype=self.dtype, name="skip_connection")(x)
    return x + h


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = 0) -> jax.Array:
  """``softmax(q . k) v`` per head for ``(batch, tokens, heads, channels)`` arrays (scaling already
  applied), softmax in float32.

  ``chunk`` > 0 (and fewer than the queries): blocks of ``chunk`` queries
  (``blockwise.map_row_blocks``), so forward and backward hold a ``chunk x keys`` score block per
  head instead of ``queries x keys``: the same numbers, memory linear in the tokens.
  """

  def attend(queries: jax.Array) -> jax.Array:
    scores = jnp.einsum("bthc,bshc->bhts", queries, k)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(scores.dtype)
    return jnp.einsum("bhts,bshc->bthc", weights, v)

  if chunk <= 0 or chunk >= q.shape[1]:
    return attend(q)
  return blockwise.map_row_blocks(attend, q, chunk)


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all H*W positions, with a residual connection.

  ``qkv`` (1x1) yields 3C channels. Legacy order (``QKVAttentionLegacy``): channel
  ``head*3*ch + s*ch + c`` (s = 0 q, 1 k, 2 v); new order (``QKVAttention``): ``s*C + head*ch + c``.
  Scores ``(q ch^-1/4) . (k ch^-1/4)``, softmax in float32 over keys, heads concatenated
  (``head*ch + c``), then ``proj_out`` (zero-initialised). ``chunk``: queries per block
  (``multi_head_attention``; 0: all at once).
  """

  num_heads: int
  use_new_attention_order: bool = False
  dtype: jnp.dtype = jnp.float32
  chunk: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    if self.num_heads < 1 or channels % self.num_heads:
      raise ValueError(
          f"AttentionBlock: {channels} channels cannot be split into {self.num_heads} heads"
      )
    head_ch = channels // self.num_heads
    conv1d = functools.partial(Conv, kernel_size=(1,), dtype=self.dtype, param_dtype=jnp.float32)
    tokens = x.reshape(batch, height * width, channels)
    qkv = conv1d(3 * channels, kernel_init=_torch_default_init, name="qkv")(
        GroupNorm32(name="norm")(tokens)
    )
    if self.use_new_attention_order:
      qkv = qkv.reshape(batch, height * width, 3, self.num_heads, head_ch)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      qkv = qkv.reshape(batch, height * width, self.num_heads, 3, head_ch)
      q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    scale = jnp.asarray(1 / math.sqrt(math.sqrt(head_ch)), q.dtype)
    attended = multi_head_attention(q * scale, k * scale, v, self.chunk).reshape(
        batch, height * width, channels
    )
    out = conv1d(channels, kernel_init=nn.initializers.zeros, name="proj_out")(attended)
    return x + out.reshape(x.shape)


class TimestepEmbedSequential(nn.Module):
  """Runs its layers in order, giving ResBlocks the embedding; children are named ``0``, ``1``, ...

  ``layers`` holds module constructors (e.g. ``functools.partial(ResBlock, ...)``), so that each
  child is created inside this block and its path mirrors PyTorch's ``input_blocks.N.M``.
  """

  layers: Sequence[Callable[..., nn.Module]]

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    for index, make_layer in enumerate(self.layers):
      layer = make_layer(name=str(index))
      x = layer(x, emb, train=train) if isinstance(layer, ResBlock) else layer(x)
    return x


class UNetModel(nn.Module):
  """LDM ``UNetModel`` (unconditional): eps = model(x_t, t).

  Attention runs at the levels whose down-sampling factor is in ``attention_resolutions``, with
  ``C // num_head_channels`` heads, or ``num_heads`` heads when ``num_head_channels == -1`` (the
  official precedence). ``dtype`` is the computation dtype; parameters stay float32 and GroupNorm
  and the attention softmax run in float32. The output is float32. ``remat_blocks`` recomputes each
  input/middle/output block in the backward pass instead of storing its activations;
  ``attention_chunk`` > 0 computes attention in blocks of that many queries
  (``multi_head_attention``).
  """

  image_size: int = 64
  in_channels: int = 3
  model_channels: int = 224
  out_channels: int = 3
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (8, 4, 2)
  dropout: float = 0.0
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  conv_resample: bool = True
  num_heads: int = -1
  num_head_channels: int = 32
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  dtype: jnp.dtype = jnp.float32
  remat_blocks: bool = False
  attention_chunk: int = 0

  def _heads(self, channels: int) -> int:
    if self.num_head_channels == -1:
      return self.num_heads
    if channels % self.num_head_channels:
      raise ValueError(
          f"UNetModel: {channels} channels are not a multiple of num_head_channels="
          f"{self.num_head_channels}"
      )
    return channels // self.num_head_channels

  def _res(self, out_channels: int, updown: str | None = None):
    return functools.partial(
        ResBlock,
        out_channels=out_channels,
        dropout=self.dropout,
        use_scale_shift_norm=self.use_scale_shift_norm,
        updown=updown,
        dtype=self.dtype,
    )

  def _attn(self, channels: int):
    return functools.partial(
        AttentionBlock,
        num_heads=self._heads(channels),
        use_new_attention_order=self.use_new_attention_order,
        dtype=self.dtype,
        chunk=self.attention_chunk,
    )

  def _down(self, channels: int):
    if self.resblock_updown:
      return self._res(channels, "down")
    return functools.partial(Downsample, use_conv=self.conv_resample, dtype=self.dtype)

  def _up(self, channels: int):
    if self.resblock_updown:
      return self._res(channels, "up")
    return functools.partial(Upsample, use_conv=self.conv_resample, dtype=self.dtype)

  def _check(self, x: jax.Array, timesteps: jax.Array) -> None:
    if self.num_heads == -1 and self.num_head_channels == -1:
      raise ValueError("UNetModel: set num_heads or num_head_channels (both are -1)")
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(
          f"UNetModel: x must be (batch, height, width, {self.in_channels}), got {x.shape}"
      )
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f"UNetModel: height and width must be multiples of {factor}, got {x.shape[1:3]}"
      )
    if timesteps.shape != (x.shape[0],):
      raise ValueError(
          f"UNetModel: timesteps must have shape ({x.shape[0]},), got {timesteps.shape}"
      )

  @nn.compact
  def __call__(self, x: jax.Array, timesteps: jax.Array, *, train: bool = False) -> jax.Array:
    timesteps = jnp.asarray(timesteps)
    self._check(x, timesteps)
    dense = functools.partial(
        nn.Dense,
        4 * self.model_channels,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=_torch_default_init,
    )
    emb = timestep_embedding(timesteps, self.model_channels).astype(self.dtype)
    emb = dense(name="time_embed.2")(nn.silu(dense(name="time_embed.0")(emb)))

    # static_argnums counts self as 0: (x, emb, train) are 1, 2, 3.
    sequential = (
        nn.remat(TimestepEmbedSequential, static_argnums=(3,))
        if self.remat_blocks
        else TimestepEmbedSequential
    )

    def block(name: str, layers, h: jax.Array) -> jax.Array:
      return sequential(tuple(layers), name=name)(h, emb, train)

    stem = functools.partial(_conv, self.model_channels, 3, dtype=self.dtype)
    h = block("input_blocks.0", [stem], x.astype(self.dtype))
    skips, index, factor = [h], 1, 1
    for level, mult in enumerate(self.channel_mult):
      channels = mult * self.model_channels
      for _ in range(self.num_res_blocks):
        layers = [self._res(channels)]
        if factor in self.attention_resolutions:
          layers.append(self._attn(channels))
        h = block(f"input_blocks.{index}", layers, h)
        skips.append(h)
        index += 1
      if level != len(self.channel_mult) - 1:
        h = block(f"input_blocks.{index}", [self._down(channels)], h)
        skips.append(h)
        index += 1
        factor *= 2

    channels = h.shape[-1]
    h = block("middle_block", [self._res(channels), self._attn(channels), self._res(channels)], h)

    index = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      channels = mult * self.model_channels
      for i in range(self.num_res_blocks + 1):
        layers = [self._res(channels)]
        if factor in self.attention_resolutions:
          layers.append(self._attn(channels))
        if level and i == self.num_res_blocks:
          layers.append(self._up(channels))
        h = block(f"output_blocks.{index}", layers, jnp.concatenate([h, skips.pop()], axis=-1))
        index += 1
      if level:
        factor //= 2

    h = nn.silu(GroupNorm32(name="out.0")(h))
    h = _conv(self.out_channels, 3, zero_init=True, dtype=self.dtype, name="out.2")(h)
    return h.astype(jnp.float32)
