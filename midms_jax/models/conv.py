"""``Conv``: the convolution of every model here, ``flax.linen.Conv`` with a backward pass tuned for
XLA:CPU.

XLA:CPU runs a convolution through Eigen only in the canonical layout (batch first and features last
in the input and output, kernel ``spatial..., in, out``). Its canonicalisation pass rewrites the
other layouts into that one, but only in the entry computation: the gradients JAX emits for a
convolution inside a ``lax.scan`` / ``lax.cond`` body (``f01b_i01o->01bf`` for the kernel,
``01oi`` kernels for the input) stay as they are and run through a naive loop, 10 to 30x slower.
MIDMs differentiates through every network inside its interleaved loop.

Where ``platform_tuning.tuned("canonical_conv_backward")`` (on CPU), ``conv_general_dilated``
computes the same convolution with a backward pass that builds both gradients as canonical
convolutions with explicit transposes, and none for an argument outside differentiation (a frozen
network's kernel, a detached input). Elsewhere, and for the cases it does not rewrite (grouped,
dilated, other layouts), it is ``lax.conv_general_dilated`` itself. The form is chosen when tracing.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from midms_jax import platform_tuning


def _channels_last_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  spatial = tuple(range(1, ndim - 1))
  kernel_spatial = tuple(range(ndim - 2))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, ndim - 1) + spatial,
      rhs_spec=(ndim - 1, ndim - 2) + kernel_spatial,
      out_spec=(0, ndim - 1) + spatial,
  )


def _explicit_padding(padding, lhs_shape, rhs_shape, strides) -> tuple[tuple[int, int], ...] | None:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(lhs_shape[1:-1], rhs_shape[:-2], strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(
    lhs: jax.Array, rhs: jax.Array, strides: tuple[int, ...], padding: tuple[tuple[int, int], ...]
):
  return lax.conv_general_dilated(
      lhs, rhs, strides, padding, dimension_numbers=_channels_last_numbers(lhs.ndim)
  )


def _conv_fwd(lhs, rhs, strides, padding):
  """Keeps only what the needed gradients read: the input for the kernel gradient, the kernel for
  the input gradient. An argument outside differentiation (a frozen network's kernel, a detached
  input) has no gradient to compute, so a frozen network's convolutions neither save their inputs
  nor build kernel gradients (``symbolic_zeros``)."""
  out = _conv(lhs.value, rhs.value, strides, padding)
  return out, _Residuals(
      lhs.value if rhs.perturbed else None,
      rhs.value if lhs.perturbed else None,
      lhs.value.shape,
      rhs.value.shape,
  )


@jax.tree_util.register_pytree_node_class
class _Residuals:
  """The input (None: no kernel gradient wanted) and kernel (None: no input gradient wanted), with
  both shapes."""

  def __init__(self, lhs, rhs, lhs_shape, rhs_shape):
    self.lhs, self.rhs, self.lhs_shape, self.rhs_shape = lhs, rhs, lhs_shape, rhs_shape

  def tree_flatten(self):
    return (self.lhs, self.rhs), (self.lhs_shape, self.rhs_shape)

  @classmethod
  def tree_unflatten(cls, shapes, children):
    return cls(*children, *shapes)


def _canonical_backward(strides, padding, residuals: _Residuals, grad):
  """The wanted gradients as channels-last convolutions (batch first, features last, kernel
  ``..., in, out``).

  Input: the output gradient dilated by the stride, padded by ``kernel - 1 - pad`` (plus what the
  forward's floor division dropped), convolved with the flipped kernel with in/out swapped. Kernel:
  a convolution that treats input channels as the batch and the batch as features, with the output
  gradient as the kernel dilated by the stride, over the padded input.
  """
  lhs, rhs = residuals.lhs, residuals.rhs
  n = len(strides)
  kernel = residuals.rhs_shape[:n]
  dims = _channels_last_numbers(n + 2)
  grad_lhs = grad_rhs = None
  if rhs is not None:
    input_pads = []
    for axis, (size, k, s, (lo, hi)) in enumerate(
        zip(residuals.lhs_shape[1:-1], kernel, strides, padding)
    ):
      remainder = size + lo + hi - k - (grad.shape[1 + axis] - 1) * s
      input_pads.append((k - 1 - lo, k - 1 - hi + remainder))
    flipped = jnp.swapaxes(jnp.flip(rhs, axis=tuple(range(n))), -1, -2)
    grad_lhs = lax.conv_general_dilated(
        grad,
        flipped.astype(grad.dtype),
        (1,) * n,
        input_pads,
        lhs_dilation=strides,
        dimension_numbers=dims,
    ).astype(rhs.dtype)
  if lhs is not None:
    padded = jnp.pad(lhs, ((0, 0),) + tuple(padding) + ((0, 0),))
    as_batch = jnp.moveaxis(padded, (0, n + 1), (n + 1, 0))  # (in, spatial..., batch)
    as_kernel = jnp.moveaxis(grad, 0, n)  # (spatial..., batch, out)
    # (in, window..., out)
    grad_rhs = lax.conv_general_dilated(
        as_batch,
        as_kernel.astype(as_batch.dtype),
        (1,) * n,
        [(0, 0)] * n,
        rhs_dilation=strides,
        dimension_numbers=dims,
    )
    grad_rhs = grad_rhs[(slice(None),) + tuple(slice(0, k) for k in kernel)]
    grad_rhs = jnp.moveaxis(grad_rhs, 0, n).astype(lhs.dtype)
  return grad_lhs, grad_rhs


def _conv_bwd(strides, padding, residuals: _Residuals, grad):
  if isinstance(grad, jax.custom_derivatives.SymbolicZero):  # the output is not differentiated
    return None, None
  return _canonical_backward(strides, padding, residuals, grad)


_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
  """Drop-in for ``lax.conv_general_dilated`` (see the module docstring)."""
  plain = functools.partial(
      lax.conv_general_dilated,
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
  )
  n = lhs.ndim - 2
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  unit = lambda d: d is None or all(v == 1 for v in d)
  if (
      not platform_tuning.tuned("canonical_conv_backward")
      or numbers != _channels_last_numbers(lhs.ndim)
      or feature_group_count != 1
      or batch_group_count != 1
      or not unit(lhs_dilation)
      or not unit(rhs_dilation)
      or precision is not None
      or preferred_element_type is not None
      or lhs.dtype != rhs.dtype
  ):
    return plain()
  strides = tuple(int(s) for s in window_strides) if window_strides else (1,) * n
  return _conv(lhs, rhs, strides, _explicit_padding(padding, lhs.shape, rhs.shape, strides))


# flax.linen.Conv with ``conv_general_dilated``: every convolution of the models.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
