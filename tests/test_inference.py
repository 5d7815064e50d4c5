"""The one translation function of every tool: the inference loop, one key per pair, one compile per
config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import celebahq
from midms_jax import inference
from midms_jax.midms.model import MIDMs


def test_pair_keys_fold_the_ids_in_order():
  seed_key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(inference.pair_key(3), seed_key)
  np.testing.assert_array_equal(
      inference.pair_key(3, 5, 9), jax.random.fold_in(jax.random.fold_in(seed_key, 5), 9)
  )
  np.testing.assert_array_equal(
      inference.pair_keys(3, 4, 2), jnp.stack([inference.pair_key(3, 4), inference.pair_key(3, 5)])
  )
  assert inference.name_id("c0__e0") != inference.name_id("c0__e1")


def test_compiled_runs_the_inference_loop_and_is_cached_per_model_config():
  """Trained at n = 5, translated with config.midms.inference; sections that do not change a
  translation (data, evaluate, ...) share the compiled function, another refine or set of outputs
  does not."""
  config = celebahq.get_config("tiny")
  config.midms.update(dict(ddim_steps=20, interleave_steps=5, loop_start_step=15))
  model, fn = inference.compiled(config, refine=False)
  np.testing.assert_array_equal(model.loop.t, MIDMs.from_config(config, inference=True).loop.t)
  assert len(model.loop.t) == 4
  other = config.copy_and_resolve_references()
  other.data.load_size, other.evaluate.seed = 64, 7
  assert inference.compiled(other, refine=False)[1] is fn
  assert inference.compiled(config, refine=True)[1] is not fn
  assert inference.compiled(config, refine=False, outputs=("image", "initial_warp"))[1] is not fn
  with pytest.raises(ValueError, match=r"unknown outputs \['warp'\]"):
    inference.translate_pairs(
        model,
        {},
        *[jnp.zeros((1, 8, 8, 3))] * 3,
        jnp.zeros((1, 2), jnp.uint32),
        refine=False,
        outputs=("warp",)
    )
