"""The models' small layers: PyTorch's nearest resize (``layers.torch_nearest_resize``: PyTorch's
pixels, no gather for integer ratios), the loss networks' 2x2 max pooling (PyTorch's gradient, no
scatter) and the device-local batch join of data-parallel steps (``join_batches`` /
``split_batches``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midms_jax.models import layers

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    "size_in, size_out",
    [
        ((8, 8), (8, 8)),
        ((16, 12), (4, 3)),
        ((4, 3), (16, 12)),
        ((16, 16), (4, 8)),
        ((10, 7), (4, 9)),
        ((6, 6), (9, 4)),
    ],
)
def test_matches_torch_nearest_and_its_gradient(size_in, size_out):
  x = np.random.default_rng(0).normal(size=(2, *size_in, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out, mode="nearest"
  )
  np.testing.assert_array_equal(
      layers.torch_nearest_resize(x, *size_out), want.permute(0, 2, 3, 1).numpy()
  )
  # The gradient: every input pixel collects the output gradients of the pixels that read it.
  weights = np.random.default_rng(1).normal(size=(2, *size_out, 3)).astype(np.float32)
  grad = jax.grad(lambda a: jnp.sum(layers.torch_nearest_resize(a, *size_out) * weights))(x)
  source = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  (
      torch.nn.functional.interpolate(source, size=size_out, mode="nearest")
      * torch.from_numpy(weights).permute(0, 3, 1, 2)
  ).sum().backward()
  np.testing.assert_allclose(grad, source.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


def test_integer_ratios_need_no_gather_or_scatter():
  """A gather's gradient is a scatter-add: a serial loop on XLA:CPU and atomics on a GPU. The models
  only resize by integer ratios (the same size in SPADE, 256 -> 64 for the conditions)."""
  x = jnp.ones((2, 16, 16, 4))
  for size in ((16, 16), (4, 4), (64, 32)):
    grad = jax.grad(lambda a, size=size: jnp.sum(jnp.sin(layers.torch_nearest_resize(a, *size))))
    text = jax.jit(grad).lower(x).as_text()
    assert "gather" not in text and "scatter" not in text, size


@pytest.mark.parametrize("height, width", [(8, 8), (7, 9)])
def test_max_pool_matches_torch_and_sends_the_gradient_to_the_first_maximum(height, width):
  """Ties are common after a ReLU and in bfloat16: PyTorch routes a window's gradient to its first
  maximum in row-major order, not to all of them, and odd sizes drop the last row / column (floor
  mode)."""
  rng = np.random.default_rng(0)
  x = np.round(np.maximum(rng.normal(size=(2, height, width, 3)), 0) * 2).astype(np.float32) / 2
  x[0, 2:4, 2:4, 0] = 1.5  # a window whose four values tie
  g = rng.normal(size=(2, height // 2, width // 2, 3)).astype(np.float32)
  pooled, vjp = jax.vjp(layers.max_pool_2x2, jnp.asarray(x))
  source = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  want = torch.nn.functional.max_pool2d(source, 2)
  want.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(pooled, want.detach().permute(0, 2, 3, 1).numpy())
  np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], source.grad.permute(0, 2, 3, 1).numpy())
  assert vjp(jnp.asarray(g))[0][0, 2, 2, 0] == g[0, 1, 1, 0] and not np.any(
      vjp(jnp.asarray(g))[0][0, 2:4, 3, 0]
  )


def test_max_pool_gradient_needs_no_scatter():
  """``reduce_window`` max backpropagates through ``select_and_scatter`` (XLA:CPU: a serial scatter
  loop)."""
  grad = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(layers.max_pool_2x2(a)))))
  compiled = grad.lower(jnp.ones((2, 16, 16, 4))).compile().as_text()
  assert " scatter(" not in compiled and "select-and-scatter(" not in compiled


def test_join_batches_lays_examples_side_by_side_and_split_batches_undoes_it():
  a, b, c = (np.arange(12, dtype=np.float32).reshape(3, 2, 2) + 100 * i for i in range(3))
  joined = layers.join_batches([a, b, c])
  assert joined.shape == (9, 2, 2)
  for example in range(3):
    for j, x in enumerate((a, b, c)):
      np.testing.assert_array_equal(joined[3 * example + j], x[example])
  for original, back in zip((a, b, c), layers.split_batches(joined, 3)):
    np.testing.assert_array_equal(back, original)
