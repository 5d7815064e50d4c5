"""``batching.map_batches``: padding to one compiled shape, outputs trimmed and concatenated, and
(in a subprocess with 4 CPU devices) batches split over every device, SWD the same as on one
device."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from midms_jax.metrics import batching

MULTI_DEVICE = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
import jax.numpy as jnp, numpy as np
from midms_jax import sharding
from midms_jax.metrics import batching, swd

pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
shards = []
def probe(x):
  shards.append(len(x.addressable_shards))
  return x.astype(jnp.float32).sum(axis=(1, 2, 3))
one, four = sharding.data_mesh(jax.devices()[:1]), sharding.data_mesh()
sums = batching.map_batches(probe, [pixels], batch_size=3)  # 3 rows -> 4 (a multiple of the devices), 2 batches
settings = swd.Settings(nhoods_per_image=16, dir_repeats=2, dirs_per_repeat=8)
key = jax.random.PRNGKey(0)
other = pixels[::-1].copy()
sums_ok = bool(np.array_equal(sums, pixels.astype(np.float32).sum((1, 2, 3))))
print(json.dumps(dict(
    devices=jax.device_count(), shards=shards, sums_ok=sums_ok,
    swd=[swd.swd(pixels, other, key, settings, batch_size=4, mesh=m)["levels"] for m in (one, four)])))
"""


def test_batches_are_padded_to_one_shape_and_trimmed():
  shapes = []

  def fn(scale, x, y):
    shapes.append(x.shape)
    return {"sum": x.sum(axis=1) * scale, "y": y}

  x, y = np.arange(10 * 3).reshape(10, 3), np.arange(10)
  out = batching.map_batches(fn, [x, y], batch_size=4, constants=[2])
  assert shapes == [(4, 3)] * 3  # 4 + 4 + 2 padded to 4
  np.testing.assert_array_equal(out["sum"], x.sum(axis=1) * 2)
  np.testing.assert_array_equal(out["y"], y)
  assert batching.map_batches(jax.jit(lambda v: v * 2), [np.ones((3, 2))], batch_size=32).shape == (
      3,
      2,
  )
  assert batching.rows_per_batch(32, 6, 4) == 8 and batching.rows_per_batch(3, 100, 4) == 4


def test_arrays_of_different_lengths_are_refused():
  with pytest.raises(ValueError, match="one non-zero length"):
    batching.map_batches(lambda a, b: a, [np.zeros(3), np.zeros(4)], batch_size=2)
  with pytest.raises(ValueError, match="one non-zero length"):
    batching.map_batches(lambda a: a, [np.zeros((0, 2))], batch_size=2)


def test_four_devices_split_every_batch_and_agree_with_one():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
      [sys.executable, "-c", MULTI_DEVICE],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4 and result["shards"] == [4, 4] and result["sums_ok"]
  np.testing.assert_allclose(result["swd"][1], result["swd"][0], rtol=1e-5)
