"""The benchmarks' host-drawn random variables: the shapes of Flax's init, sane scales, a finite
forward pass."""

import jax
import numpy as np

from benchmarks import random_inputs
from configs import celebahq
from midms_jax.models import build
from midms_jax.midms.model import MIDMs


def test_random_variables_have_init_shapes_and_give_a_finite_translation():
  config = celebahq.get_config("tiny")
  abstract = build.abstract_variables(config.model)
  variables = random_inputs.random_like(abstract)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(abstract)
  for leaf, spec in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(abstract)):
    assert leaf.shape == spec.shape and leaf.dtype == spec.dtype
  named = {
      jax.tree_util.keystr(path): leaf
      for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
  }
  kernel = next(
      v for k, v in named.items() if k.endswith("['kernel']") and v.ndim == 4 and v.size > 10_000
  )
  np.testing.assert_allclose(np.std(kernel) * np.sqrt(np.prod(kernel.shape[:-1])), 1.0, rtol=0.05)
  assert all(np.all(v == 1) for k, v in named.items() if k.endswith("['scale']"))
  assert all(np.all(v == 0) for k, v in named.items() if k.endswith("['bias']"))

  batch = random_inputs.random_batch(config, 2)
  model = MIDMs.from_config(config)
  out = jax.jit(
      lambda v, b: model.translate(
          v, b["label"], b["ref"], b["label_ref"], jax.random.PRNGKey(0), refine=False
      )["image"]
  )(variables, batch)
  assert out.shape == batch["image"].shape and np.all(np.isfinite(out)) and 0.01 < np.std(out) < 100
