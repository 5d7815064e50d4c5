"""``config.dtype`` (bfloat16 activations, float32 parameters and matching) and ``config.remat``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import celebahq
from midms_jax.models import build
from midms_jax.midms.model import MIDMs
from tests.conftest import forward_inputs, forward_noise

# Mean |bf16 - fp32| / mean |fp32| per stage on the official small checkpoint (measured ~0.8% to
# 2.5%; bfloat16 keeps 8 significant bits, ~0.4% per rounding).
STAGE_TOLERANCE = 0.05


def _relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.mean(np.abs(actual - expected)) / np.mean(np.abs(expected)))


def _model(config, **overrides) -> MIDMs:
  config = config.copy_and_resolve_references()
  config.update(overrides)
  return MIDMs.from_config(config)


def test_bfloat16_stages_stay_close_to_float32(tiny_midms, forward_io):
  """Each stage on the same inputs: encoder, matching features, first warp, U-Net, decoder.

  (End to end the two differ much more: a latent that moves by 1% can flip VQ codebook indices and
  cycle-consistency mask entries, which are discrete; docs/benchmarks.md reports both.)
  """
  config, fp32, variables = tiny_midms
  bf16 = _model(config, dtype="bfloat16")
  x = forward_inputs(forward_io)
  noise = forward_noise(forward_io, "infer", fp32)
  spectral = variables["correspondence"]["spectral"]

  latent = fp32.encode(variables, x["ref_img"])  # every stage reads the same float32 inputs
  x_t = latent + 0.5 * noise.loop_ref

  def stages(model):
    matched, _ = model.initial_matching(
        variables, spectral, x["input_semantics"], x["ref_semantics"], latent
    )
    return dict(
        latent=model.encode(variables, x["ref_img"]),
        condition_features=matched["trg_matching_feats"],
        warp=matched["warped_ref_feat"],
        eps=model._unet(variables, x_t, 249),  # pylint: disable=protected-access
        image=model.decode(variables, latent),
    )

  expected, actual = jax.jit(lambda: stages(fp32))(), jax.jit(lambda: stages(bf16))()
  for name, value in actual.items():
    assert value.dtype == jnp.float32, name
    error = _relative_error(value, expected[name])
    assert 0 < error < STAGE_TOLERANCE, f"{name}: bf16 relative error {error:.4f}"
  # Parameters stay float32: the same variables serve both dtypes.
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


def _assert_same_values_and_grads(actual, expected, label: str) -> None:
  """Same loss, and each gradient leaf equal up to float32 reordering: errors scale with the leaf's
  largest entry (measured up to 9e-5 of it with the official checkpoint; a recomputation bug gives
  errors of order 1).
  """
  (value, grads), (value0, grads0) = actual, expected
  np.testing.assert_allclose(value, value0, rtol=1e-6, err_msg=label)
  for (path, g), g0 in zip(
      jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads0)
  ):
    atol = 1e-7 + 2e-4 * float(np.max(np.abs(g0)))
    np.testing.assert_allclose(
        g, g0, rtol=1e-4, atol=atol, err_msg=f"{label} {jax.tree_util.keystr(path)}"
    )


def test_full_remat_leaves_the_training_loss_and_gradients_unchanged(tiny_midms):
  """Rematerialisation recomputes, it does not approximate ('full': loop steps, U-Net and decoder
  blocks)."""
  config, _, variables = tiny_midms
  rng = np.random.default_rng(0)
  size = config.data.crop_size
  label = lambda: rng.uniform(
      0, 1, (1, size, size, config.model.correspondence.label_channels)
  ).astype(np.float32)
  image = lambda: rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
  batch = dict(image=image(), ref=image(), label=label(), label_ref=label())

  def loss_and_grads(policy):
    model = _model(config, remat=policy)

    def loss(params):
      merged = {
          **variables,
          "unet": params["unet"],
          "correspondence": {**variables["correspondence"], **params["corr"]},
      }
      out, _ = model.train_forward(
          merged, batch, jax.random.PRNGKey(1), warmup=False, update_stats=False
      )
      return jnp.mean(jnp.abs(out["warped_ref"] - batch["image"])) + out["loss_fb"]

    params = dict(unet=variables["unet"], corr={"params": variables["correspondence"]["params"]})
    return jax.jit(jax.value_and_grad(loss))(params)

  _assert_same_values_and_grads(loss_and_grads("full"), loss_and_grads("none"), "full")


def test_unet_block_remat_leaves_gradients_unchanged():
  cfg = celebahq.get_config("tiny").model.unet
  x = jax.random.normal(jax.random.PRNGKey(0), (2, cfg.image_size, cfg.image_size, cfg.in_channels))
  t = jnp.asarray([10, 500])
  variables = build.build_unet(cfg).init(jax.random.PRNGKey(1), x, t)

  def loss_and_grads(remat_blocks):
    unet = build.build_unet(cfg, remat_blocks=remat_blocks)
    return jax.jit(jax.value_and_grad(lambda v: jnp.sum(jnp.square(unet.apply(v, x, t)))))(
        variables
    )

  _assert_same_values_and_grads(loss_and_grads(True), loss_and_grads(False), "unet_blocks")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dtype", "float16", "config.dtype must be one of ('float32', 'bfloat16')"),
        ("remat", "some", "config.remat must be one of ('none', 'unet_blocks', 'full')"),
    ],
)
def test_bad_dtype_or_remat_is_one_line_error(field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    _model(celebahq.get_config("tiny"), **{field: value})
