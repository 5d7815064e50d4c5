"""The models' small layers: PyTorch's nearest resize (``layers.torch_nearest_resize``: PyTorch's pixels, no gather
for integer ratios) and the device-local batch join of data-parallel steps (``join_batches`` / ``split_batches``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midms_jax.models import layers

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("size_in, size_out", [((8, 8), (8, 8)), ((16, 12), (4, 3)), ((4, 3), (16, 12)),
                                               ((16, 16), (4, 8)), ((10, 7), (4, 9)), ((6, 6), (9, 4))])
def test_matches_torch_nearest_and_its_gradient(size_in, size_out):
  x = np.random.default_rng(0).normal(size=(2, *size_in, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out, mode="nearest")
  np.testing.assert_array_equal(layers.torch_nearest_resize(x, *size_out), want.permute(0, 2, 3, 1).numpy())
  # The gradient: every input pixel collects the output gradients of the pixels that read it.
  weights = np.random.default_rng(1).normal(size=(2, *size_out, 3)).astype(np.float32)
  grad = jax.grad(lambda a: jnp.sum(layers.torch_nearest_resize(a, *size_out) * weights))(x)
  source = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  (torch.nn.functional.interpolate(source, size=size_out, mode="nearest")
   * torch.from_numpy(weights).permute(0, 3, 1, 2)).sum().backward()
  np.testing.assert_allclose(grad, source.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


def test_integer_ratios_need_no_gather_or_scatter():
  """A gather's gradient is a scatter-add: a serial loop on XLA:CPU and atomics on a GPU. The models only
  resize by integer ratios (the same size in SPADE, 256 -> 64 for the conditions)."""
  x = jnp.ones((2, 16, 16, 4))
  for size in ((16, 16), (4, 4), (64, 32)):
    grad = jax.grad(lambda a, size=size: jnp.sum(jnp.sin(layers.torch_nearest_resize(a, *size))))
    text = jax.jit(grad).lower(x).as_text()
    assert "gather" not in text and "scatter" not in text, size


def test_join_batches_lays_examples_side_by_side_and_split_batches_undoes_it():
  a, b, c = (np.arange(12, dtype=np.float32).reshape(3, 2, 2) + 100 * i for i in range(3))
  joined = layers.join_batches([a, b, c])
  assert joined.shape == (9, 2, 2)
  for example in range(3):
    for j, x in enumerate((a, b, c)):
      np.testing.assert_array_equal(joined[3 * example + j], x[example])
  for original, back in zip((a, b, c), layers.split_batches(joined, 3)):
    np.testing.assert_array_equal(back, original)
