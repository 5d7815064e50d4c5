"""Loss terms vs the official ``train_epoch`` (losses_io.npz): warm-up, post-warm-up, train-mode
spectral norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midms_jax.errors import CheckpointError
from midms_jax.losses import contextual, midms_losses as midms_losses_lib
from midms_jax.losses.midms_losses import midms_losses
from midms_jax.models import vgg
from tests.conftest import FIXTURES, assert_close, forward_inputs, forward_noise, load_fixture, nchw_to_nhwc

pytest.importorskip("torch")

TOL = {
    "post_warmup": dict(
        loss_total=1e-4,
        loss_domain=1e-6,
        loss_perc=5e-5,
        loss_context=5e-5,
        loss_fb=5e-6,
        loss_feat=1e-4,
        original_loss=1e-6,
        loss_fb_iterative=2e-5,
        cx_terms=2e-5,
    ),
    "warmup": dict(
        loss_total=1e-4,
        loss_domain=1e-6,
        loss_perc=5e-5,
        loss_context=5e-5,
        loss_fb=1e-6,
        loss_feat=1e-4,
        original_loss=1e-6,
        loss_fb_iterative=1e-6,
        cx_terms=2e-5,
    ),
    "train_sn": dict(
        loss_total=5e-5,
        loss_domain=1e-5,
        loss_perc=5e-5,
        loss_context=5e-5,
        loss_fb=2e-6,
        loss_feat=5e-5,
        original_loss=1e-5,
        loss_fb_iterative=2e-6,
        cx_terms=1e-5,
    ),
}


@pytest.fixture(scope="module")
def setup(tiny_midms):
  config, model, variables = tiny_midms
  return (
      config,
      model,
      variables,
      vgg.load_vgg19(FIXTURES / "vgg19_small.pth", config.loss.vgg_widths),
  )


@pytest.fixture(scope="module")
def io(forward_io):
  return forward_io


@pytest.fixture(scope="module")
def expected():
  return load_fixture("losses_io.npz")


def _run(setup, io, *, warmup: bool, update_stats: bool):
  config, model, variables, vgg_vars = setup
  x = forward_inputs(io)
  batch = dict(
      image=x["src_img"], ref=x["ref_img"], label=x["input_semantics"], label_ref=x["ref_semantics"]
  )
  net = vgg.VGG19(config.loss.vgg_widths)

  def loss_fn(v, b, n):
    outputs, _ = model.train_forward(
        v,
        b,
        jax.random.PRNGKey(0),
        warmup=warmup,
        update_stats=update_stats,
        noise=n,
        original_index=jnp.asarray(io["train/rand_idx"]),
    )
    features = lambda images: net.apply(vgg_vars, images)
    return midms_losses(outputs, b, features, config.loss, warmup=warmup, with_context=not warmup)

  return jax.jit(loss_fn)(variables, batch, forward_noise(io, "train", model))


@pytest.mark.parametrize(
    "variant,warmup,update_stats",
    [("post_warmup", False, False), ("warmup", True, False), ("train_sn", False, True)],
)
def test_loss_terms_match_official(setup, io, expected, variant, warmup, update_stats):
  total, terms = _run(setup, io, warmup=warmup, update_stats=update_stats)
  for name, tol in TOL[variant].items():
    assert_close(terms[name], expected[f"{variant}/{name}"], tol, f"{variant}/{name}")
  assert_close(total, expected[f"{variant}/loss_total"], TOL[variant]["loss_total"], "total")


def test_vgg_features_match_official(setup, io, expected):
  config, _, _, vgg_vars = setup
  x = forward_inputs(io)
  net = vgg.VGG19(config.loss.vgg_widths)
  tol_ref = dict(r12=2e-3, r22=5e-3, r32=5e-3, r42=5e-3, r52=2e-3)
  for source, image in (("src", x["src_img"]), ("ref", x["ref_img"])):
    features = net.apply(vgg_vars, image)
    for name, tol in tol_ref.items():
      assert_close(
          features[name],
          nchw_to_nhwc(expected[f"vgg/{source}/{name}"]),
          tol,
          f"vgg/{source}/{name}",
      )


@pytest.mark.parametrize("case", ["cx_isolated", "cx_empty"])
def test_contextual_loss_matches_official(expected, case):
  terms = contextual.contextual_terms(
      nchw_to_nhwc(expected[f"{case}/X"]), nchw_to_nhwc(expected[f"{case}/Y"])
  )
  assert_close(terms.affinity, expected[f"{case}/A"], 1e-5, f"{case}/A")
  assert_close(terms.wta, expected[f"{case}/wta"], 1e-5, f"{case}/wta")
  np.testing.assert_array_equal(terms.kept, expected[f"{case}/kept"])
  assert_close(terms.loss, np.reshape(expected[f"{case}/loss"], ()), 1e-5, f"{case}/loss")


def test_vgg_checkpoint_errors(tmp_path):
  with pytest.raises(CheckpointError, match=r"vgg19_conv.pth: VGG19 weight file not found"):
    vgg.load_vgg19(tmp_path / "vgg19_conv.pth")
  with pytest.raises(CheckpointError, match=r"do not match the config's shapes"):
    vgg.load_vgg19(FIXTURES / "vgg19_small.pth")  # official widths vs the small file


def _segmentation_case():
  """Latent grid 2x2, 3 classes; GT ids (16x16, nearest x1/8 -> [[0, 1], [2, 1]]), exemplar has
  classes 0, 1."""
  gt = np.zeros((1, 16, 16), np.int32)
  gt[:, :8, 8:], gt[:, 8:, :8], gt[:, 8:, 8:] = 1, 2, 1
  exemplar = np.zeros((1, 16, 16), np.int32)
  exemplar[:, :, 8:] = 1
  probs = np.asarray(
      [[[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], [[0.2, 0.3, 0.5], [0.3, 0.4, 0.3]]]], np.float32
  )
  # Only class-1 pixels count: class 0 is ignored, class 2 is absent from the exemplar.
  expected = -(np.log(0.6 + 1e-10) + np.log(0.4 + 1e-10)) / (2 + 1e-5)
  return gt, exemplar, probs, expected


def test_warped_segmentation_loss_by_hand():
  gt, exemplar, probs, expected = _segmentation_case()
  loss = midms_losses_lib.warped_segmentation_loss(
      jnp.asarray(probs), jnp.asarray(gt), jnp.asarray(exemplar), 3
  )
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_segmentation_term_in_warmup_from_one_hot_conditions(tiny_midms):
  """The LSUN term reads the class ids back from the batch's one-hot conditions, in warm-up only."""
  config, _, _ = tiny_midms
  gt, exemplar, probs, expected = _segmentation_case()
  one_hot = lambda ids: jax.nn.one_hot(ids, 3)
  feats = jnp.ones((1, 2, 2, 4))
  outputs = dict(
      trg_matching_feats=feats,
      src_matching_feats=feats,
      ref_matching_feats=feats,
      loss_fb_first_warp=jnp.zeros(()),
      original_loss=jnp.zeros(()),
      loss_fb=jnp.zeros(()),
      iter_warped_ref_seg=jnp.asarray(probs),
  )
  batch = dict(label=one_hot(gt), label_ref=one_hot(exemplar))
  loss_cfg = config.loss.copy_and_resolve_references()
  loss_cfg.segmentation = 100.0
  total, terms = midms_losses(outputs, batch, None, loss_cfg, warmup=True, with_context=False)
  np.testing.assert_allclose(float(terms["warped_segmentation_loss"]), expected, rtol=1e-6)
  np.testing.assert_allclose(float(total), 100.0 * expected, rtol=1e-5)
  _, terms = midms_losses(outputs, batch, None, loss_cfg, warmup=False, with_context=True)
  assert "warped_segmentation_loss" not in terms


def test_rewarp_term_scores_each_unmasked_rewarp_against_the_ground_truth(setup, io):
  """``loss.rewarp``: the perceptual term of every re-warp (official re-warp steps 1 and 2, before
  masking), averaged, added to the official total with its weight; the official terms do not
  change."""
  config, model, variables, vgg_vars = setup
  x = forward_inputs(io)
  batch = dict(
      image=x["src_img"], ref=x["ref_img"], label=x["input_semantics"], label_ref=x["ref_semantics"]
  )
  net = vgg.VGG19(config.loss.vgg_widths)
  features = lambda images: net.apply(vgg_vars, images)
  loss_cfg = config.loss.copy_and_resolve_references()
  loss_cfg.rewarp = 2.0

  def loss_fn(v, b, n):
    # the re-warps decoded with both paths' outputs
    outputs, _ = model.train_forward(
        v,
        b,
        jax.random.PRNGKey(0),
        warmup=False,
        update_stats=False,
        noise=n,
        original_index=jnp.asarray(io["train/rand_idx"]),
        decode_rewarps=True,
    )
    rewarped = outputs.pop("rewarped_ref")
    official = midms_losses(outputs, b, features, config.loss, warmup=False, with_context=True)
    return (
        outputs,
        official,
        midms_losses(
            dict(outputs, rewarped_ref=rewarped),
            b,
            features,
            loss_cfg,
            warmup=False,
            with_context=True,
        ),
    )

  outputs, (total0, terms0), (total, terms) = jax.jit(loss_fn)(
      variables, batch, forward_noise(io, "train", model)
  )
  news = np.asarray(outputs["steps"].rewarp.pred_ref_x0_new)
  np.testing.assert_array_equal(np.asarray(outputs["rewarped_ref_x0"]), news[[1, 2]])
  layer = config.loss.perc_layer
  gt = features(jnp.asarray(batch["image"]))[layer]
  by_hand = np.mean(
      [
          float(
              jnp.mean(jnp.abs(features(model.decode(variables, jnp.asarray(news[i])))[layer] - gt))
          )
          for i in (1, 2)
      ]
  )
  np.testing.assert_allclose(float(terms["loss_rewarp"]), by_hand, rtol=1e-4)
  np.testing.assert_allclose(float(total), float(total0) + 2.0 * by_hand, rtol=1e-5)
  assert "loss_rewarp" not in terms0
  for name, value in terms0.items():
    if name != "loss_total":
      np.testing.assert_allclose(
          np.asarray(terms[name]), np.asarray(value), rtol=1e-5, err_msg=name
      )
