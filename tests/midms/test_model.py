"""The MIDMs forward pass vs the official ``MIDMs.forward`` (midms_forward_io.npz), with its noise
injected."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import celebahq, lsun_church
from midms_jax.midms import matching
from midms_jax.midms.model import MIDMs, StepCoefficients
from tests.conftest import assert_close, forward_inputs, forward_noise, load_fixture, nchw_to_nhwc

pytest.importorskip("torch")

LOOP_TOL = dict(x0_in=5e-4, x_noisy=5e-4, pred_x0=5e-4, dir_xt=5e-5, sqrt_a_prev=1e-6, x_prev=5e-4)
REWARP_TOL = dict(
    iter_enc_ref=1e-4,
    iter_enc_src=2e-4,
    corr_inter=5e-5,
    src_corr_inter=5e-5,
    pred_ref_x0_new=5e-4,
    iter_warped_ref_seg=1e-3,
    src_pred_ref_x0_new=5e-4,
    fb_ts=5e-3,
    pred_ref_x0_mixed=2e-4,
)
EXACT_MASKS = ("fb_mask_raw", "fb_mask")


def _nhwc(x: np.ndarray) -> np.ndarray:
  return nchw_to_nhwc(x) if x.ndim == 4 else x


@pytest.fixture(scope="module")
def io(forward_io):
  return forward_io


@pytest.fixture(scope="module")
def setup(tiny_midms):
  _, model, variables = tiny_midms
  return model, variables


def _check_loop(io, mode, steps, paths):
  worst = 0.0
  for i in range(4):
    for p in paths:
      for name, tol in LOOP_TOL.items():
        key = f"{mode}/loop{i}/{p}/{name}"
        worst = max(
            worst, assert_close(getattr(getattr(steps, p), name)[i], _nhwc(io[key]), tol, key)
        )
      assert_close(
          getattr(steps, p).eps[i],
          _nhwc(io[f"{mode}/loop{i}/{p}/eps"]),
          1e-4 if mode == "train" else 5e-5,
          f"{mode}/loop{i}/{p}/eps",
      )
  return worst


def _check_rewarps(io, mode, steps, names):
  for k in (1, 2):
    for name in names:
      key = f"{mode}/rewarp{k}/{name}"
      expected = io[key]
      if name == "corr_inter" or name == "src_corr_inter":
        actual = getattr(steps.rewarp, name)[k]
      elif name in EXACT_MASKS:
        actual, expected = getattr(steps.rewarp, name)[k], nchw_to_nhwc(expected)
        np.testing.assert_array_equal(actual, expected, err_msg=key)
        continue
      else:
        actual, expected = getattr(steps.rewarp, name)[k], _nhwc(expected)
      assert_close(actual, expected, REWARP_TOL[name], key)
  for k in (0, 3):  # no re-warp at the first and last step
    assert not np.any(np.asarray(steps.rewarp.fb_mask[k]))


def _unrolled(model: MIDMs) -> MIDMs:
  """The same model with ``midms.unroll_loop``: one traced copy per loop step, no ``lax.cond``."""
  return dataclasses.replace(model, settings=dataclasses.replace(model.settings, unroll_loop=True))


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_training_forward_matches_official(io, setup, unroll):
  model, variables = setup
  model = _unrolled(model) if unroll else model
  x = forward_inputs(io)
  batch = dict(
      image=x["src_img"], ref=x["ref_img"], label=x["input_semantics"], label_ref=x["ref_semantics"]
  )
  forward = jax.jit(
      lambda v, b, n, idx: model.train_forward(
          v, b, jax.random.PRNGKey(0), warmup=False, update_stats=False, noise=n, original_index=idx
      )
  )
  out, _ = forward(
      variables, batch, forward_noise(io, "train", model), jnp.asarray(io["train/rand_idx"])
  )
  steps = out["steps"]
  np.testing.assert_array_equal(
      np.asarray(model.loop.t), [io[f"train/loop{i}/ref/t"] for i in range(4)]
  )
  for name in ("a_t", "a_prev", "sigma"):
    np.testing.assert_allclose(
        np.asarray(getattr(model.loop, name)),
        [io[f"train/loop{i}/ref/{name}"] for i in range(4)],
        atol=1e-6,
    )
  _check_loop(io, "train", steps, ("ref", "src"))
  _check_rewarps(io, "train", steps, list(REWARP_TOL) + list(EXACT_MASKS))
  idx = int(io["train/rand_idx"])
  for name, tol in (("x_noisy", 5e-4), ("eps", 1e-4), ("pred_x0", 5e-4)):
    assert_close(
        out["original_sample"][name], _nhwc(io[f"train/loop{idx}/orig/{name}"]), tol, f"orig/{name}"
    )
  for name, tol in (
      ("warped_src", 5e-5),
      ("warped_ref", 5e-5),
      ("original_loss", 1e-6),
      ("loss_fb", 2e-5),
      ("iter_warped_ref_seg", 1e-3),
  ):
    assert_close(out[name], _nhwc(io[f"train/out/{name}"]), tol, f"train/out/{name}")
  vq = model.first_stage
  for n, latent in enumerate((out["pred_ref_x0"], out["pred_src_x0"])):
    _, _, indices = vq.apply(variables["first_stage"], latent, method=vq.quantize)
    np.testing.assert_array_equal(np.asarray(indices).reshape(-1), io[f"train/decode{n}/indices"])


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_inference_matches_official(io, setup, unroll):
  model, variables = setup
  model = _unrolled(model) if unroll else model
  x = forward_inputs(io)
  translate = jax.jit(
      lambda v, c, e, ec, n: model.translate(v, c, e, ec, jax.random.PRNGKey(0), noise=n)
  )
  out = translate(
      variables,
      x["input_semantics"],
      x["ref_img"],
      x["ref_semantics"],
      forward_noise(io, "infer", model),
  )
  steps = out["steps"]
  _check_loop(io, "infer", steps, ("ref",))
  _check_rewarps(
      io,
      "infer",
      steps,
      [
          "iter_enc_ref",
          "corr_inter",
          "pred_ref_x0_new",
          "iter_warped_ref_seg",
          "fb_ts",
          "pred_ref_x0_mixed",
          *EXACT_MASKS,
      ],
  )
  refine = out["refine"]
  for j in range(20):
    for name, tol in (("x", 2e-4), ("eps", 5e-5), ("pred_x0", 2e-4), ("x_prev", 2e-4)):
      key = f"infer/refine/step{j:02d}/{name}"
      assert_close(refine[name][j], _nhwc(io[key]), tol, key)
  np.testing.assert_array_equal(
      np.asarray(model.refine.t), [io[f"infer/refine/step{j:02d}/t"] for j in range(20)]
  )
  assert_close(out["loop_latent"], _nhwc(io["infer/refine/x0_in"]), 2e-4, "refine/x0_in")
  assert_close(out["latent"], _nhwc(io["infer/refine/out_x0"]), 2e-4, "refine/out_x0")
  assert_close(out["image"], _nhwc(io["infer/out/warped_ref"]), 5e-5, "out/warped_ref")
  np.testing.assert_array_equal(out["fb_mask"], nchw_to_nhwc(io["infer/out/fb_mask"]))
  # The debug stack: decoded [initial warp, 1 new, 1 mixed, 2 new, 2 mixed] latents, then the two
  # masks.
  stack = _nhwc(io["infer/out/debug_stack"])
  latents = [
      out["initial_warp"],
      steps.rewarp.pred_ref_x0_new[1],
      steps.rewarp.pred_ref_x0_mixed[1],
      steps.rewarp.pred_ref_x0_new[2],
      steps.rewarp.pred_ref_x0_mixed[2],
  ]
  for n, latent in enumerate(latents):
    decoded = model.decode(variables, latent)
    assert_close(decoded, stack[2 * n : 2 * n + 2], 1e-4, f"debug_stack decode {n}")
    _, _, indices = model.first_stage.apply(
        variables["first_stage"], latent, method=model.first_stage.quantize
    )
    np.testing.assert_array_equal(
        np.asarray(indices).reshape(-1), io[f"infer/decode{n + 2}/indices"]
    )
  for n, k in enumerate((1, 2)):
    mask = np.repeat(np.repeat(np.asarray(steps.rewarp.fb_mask[k]), 4, axis=1), 4, axis=2)
    np.testing.assert_array_equal(
        np.broadcast_to(mask, mask.shape[:3] + (3,)), stack[10 + 2 * n : 12 + 2 * n]
    )


def _lowered_text(config, variables) -> str:
  model = MIDMs.from_config(config)
  x = jnp.zeros((1, 32, 32, 15))
  image = jnp.zeros((1, 32, 32, 3))
  fn = lambda v: model.translate(v, x, image, x, jax.random.PRNGKey(0))["image"]
  return jax.jit(fn).lower(variables).as_text()


def test_interleaved_loop_is_a_real_scan(setup):
  """The compiled program does not grow with the number of loop steps: 4 and 16 steps lower to the
  same number of convolutions (one U-Net in the loop body, one in the refinement body)."""
  _, variables = setup
  four = celebahq.get_config("tiny")
  sixteen = celebahq.get_config("tiny")
  sixteen.midms.interleave_steps, sixteen.midms.loop_start_step = 16, 1
  text4, text16 = _lowered_text(four, variables), _lowered_text(sixteen, variables)
  convs4, convs16 = text4.count("stablehlo.convolution"), text16.count("stablehlo.convolution")
  assert convs4 == convs16 and convs4 > 0
  assert text4.count("stablehlo.while") == text16.count("stablehlo.while") >= 2


def test_unrolled_loop_has_no_loop_or_conditional(setup):
  """``midms.unroll_loop``: the training forward lowers without the loop's while loop or its
  conditional (the re-warps are placed at their steps statically), one U-Net copy per loop step."""
  model, variables = setup
  config = celebahq.get_config("tiny")
  config.midms.unroll_loop = True
  unrolled = MIDMs.from_config(config)
  assert unrolled.settings.unroll_loop and not model.settings.unroll_loop
  x = jnp.zeros((1, 32, 32, 15))
  image = jnp.zeros((1, 32, 32, 3))
  batch = dict(image=image, ref=image, label=x, label_ref=x)
  text = (
      lambda m: jax.jit(
          lambda v: m.train_forward(v, batch, jax.random.PRNGKey(0), warmup=False)[0]["warped_ref"]
      )
      .lower(variables)
      .as_text()
  )
  rolled_text, unrolled_text = text(model), text(unrolled)
  # (the random draws' threefry rounds are while loops of their own, in both)
  assert rolled_text.count("stablehlo.while") == unrolled_text.count("stablehlo.while") + 1
  assert "stablehlo.case" in rolled_text and "stablehlo.case" not in unrolled_text
  # pylint: disable-next=protected-access
  unet_text = (
      jax.jit(lambda v: model._unet(v, jnp.zeros((2, 8, 8, 3)), 0)).lower(variables).as_text()
  )
  convs = lambda t: t.count("stablehlo.convolution")
  # 4 U-Net copies in place of 1
  assert convs(unrolled_text) - convs(rolled_text) >= 3 * convs(unet_text) > 0


def test_bad_loop_configs_are_refused():
  config = celebahq.get_config("tiny")
  config.midms.loop_start_step = 14
  with pytest.raises(ValueError, match="loop_start_step=14 with interleave_steps=4"):
    MIDMs.from_config(config)
  config = celebahq.get_config("tiny")
  config.midms.rewarp_steps = (1, 4)
  with pytest.raises(ValueError, match=r"rewarp_steps \[4\] outside the 4 loop steps"):
    MIDMs.from_config(config)
  config = celebahq.get_config("tiny")
  config.midms.warp_chunk = -1
  with pytest.raises(ValueError, match="midms.warp_chunk must be >= 0"):
    MIDMs.from_config(config)
  config = celebahq.get_config("tiny")
  config.midms.first_step_noise = "paper"
  with pytest.raises(ValueError, match="midms.first_step_noise must be one of"):
    MIDMs.from_config(config)
  config = celebahq.get_config("tiny")
  config.midms.rewarp_support = "phi"
  with pytest.raises(ValueError, match="midms.rewarp_support must be one of"):
    MIDMs.from_config(config)
  config = celebahq.get_config("tiny")
  config.attention_chunk = -256
  with pytest.raises(ValueError, match="config.attention_chunk must be >= 0"):
    MIDMs.from_config(config)


def test_bad_inference_loops_are_refused_and_leave_training_alone():
  config = celebahq.get_config("tiny")
  config.midms.inference.rewarp_steps = (1, 4)
  with pytest.raises(
      ValueError, match=r"midms.inference.rewarp_steps \[4\] outside the 4 loop steps"
  ):
    MIDMs.from_config(config, inference=True)
  assert MIDMs.from_config(config).settings.rewarp_steps == (1, 2)
  config.midms.inference.update(dict(rewarp_steps=(1, 2), loop_start_step=14))
  with pytest.raises(
      ValueError, match="midms.inference.loop_start_step=14 with interleave_steps=4"
  ):
    MIDMs.from_config(config, inference=True)


def test_inference_runs_the_official_loop_whatever_training_used():
  """The official code trains with 4n DDIM steps and n loop steps from hijack step 3n, and
  translates with 16 / 4 from 12 (re-warps at loop indices 1 and 2) whatever n is. At n = 5 the
  training loop is hijack steps 15..19 of the 20-step schedule (timesteps 951 ... 1, every 50th):
  U-Net at t = 201, 151, 101, 51, 1."""
  config = celebahq.get_config("tiny")
  config.midms.update(dict(ddim_steps=20, interleave_steps=5, loop_start_step=15))
  training, inference = MIDMs.from_config(config), MIDMs.from_config(config, inference=True)
  np.testing.assert_array_equal(training.loop.t, [201, 151, 101, 51, 1])
  np.testing.assert_array_equal(training.loop.rewarp, [False, True, True, False, False])
  official = MIDMs.from_config(celebahq.get_config("tiny"))
  np.testing.assert_array_equal(inference.loop.t, [249, 187, 125, 63])
  for got, want in zip(inference.loop, official.loop):
    np.testing.assert_array_equal(got, want)
  assert inference.settings == official.settings


def test_rewarp_support_matching_correlates_with_the_initial_matching_features(io, setup):
  """ "matching": the re-warp's query is correlated with the normalised phi-head features the
  initial matching used (the official "encoder" support, real_enc's raw features, is checked against
  the fixture above).
  """
  model, variables = setup
  x = forward_inputs(io)
  config = celebahq.get_config("tiny")
  config.midms.rewarp_support = "matching"
  matching_model = MIDMs.from_config(config)

  def run(v, n):
    out = matching_model.translate(
        v,
        x["input_semantics"],
        x["ref_img"],
        x["ref_semantics"],
        jax.random.PRNGKey(0),
        refine=False,
        noise=n,
    )
    matched, _ = matching_model.initial_matching(
        v,
        v["correspondence"]["spectral"],
        x["input_semantics"],
        x["ref_semantics"],
        matching_model.encode(v, x["ref_img"]),
    )
    return out["steps"], matched

  steps, matched = jax.jit(run)(variables, forward_noise(io, "infer", model))
  for support, matches in (
      (matched["ref_support_feats"], True),
      (matched["ref_matching_feats"], False),
  ):
    want = matching.correlation(
        matching.normalize_features(steps.rewarp.iter_enc_ref[1]),
        matching.normalize_features(support),
    )
    assert (
        np.allclose(np.asarray(steps.rewarp.corr_inter[1]), np.asarray(want), atol=1e-5) == matches
    )


def test_matched_first_step_noises_to_the_unet_timestep(io, setup):
  """Official: the loop's chain starts at time_range[k-1] = 311 with the U-Net told 249 (refinement:
  101 vs 96); "matched" noises to the told level; the rest of the schedule is the same."""
  model, variables = setup
  official = MIDMs.from_config(celebahq.get_config("tiny"))
  config = celebahq.get_config("tiny")
  config.midms.first_step_noise = "matched"
  matched = MIDMs.from_config(config)
  sqrt_ac = np.sqrt(np.asarray(official.schedule.alphas_cumprod))
  for coefficients, levels in ((official.loop, (311, 249)), (official.refine, (101, 96))):
    assert int(coefficients.t[0]) == levels[1]
    np.testing.assert_allclose(float(coefficients.noise_sqrt_ac[0]), sqrt_ac[levels[0]], rtol=1e-6)
  for name in ("loop", "refine"):
    got, base = getattr(matched, name), getattr(official, name)
    np.testing.assert_allclose(np.asarray(got.noise_sqrt_ac), sqrt_ac[np.asarray(got.t)], rtol=1e-6)
    for field in ("t", "a_t", "a_prev", "sigma", "rewarp"):
      np.testing.assert_array_equal(
          np.asarray(getattr(got, field)), np.asarray(getattr(base, field))
      )
  # In the forward pass: the first U-Net input is the initial warp noised to t=249 with the same
  # draw.
  x = forward_inputs(io)
  noise = forward_noise(io, "infer", model)
  out = jax.jit(
      lambda v, n: matched.translate(
          v,
          x["input_semantics"],
          x["ref_img"],
          x["ref_semantics"],
          jax.random.PRNGKey(0),
          refine=False,
          noise=n,
      )
  )(variables, noise)
  ac = float(np.asarray(official.schedule.alphas_cumprod)[249])
  want = np.sqrt(ac) * np.asarray(out["initial_warp"]) + np.sqrt(1 - ac) * np.asarray(
      noise.loop_ref
  )
  np.testing.assert_allclose(np.asarray(out["steps"].ref.x_noisy[0]), want, atol=1e-5)


def test_noise_free_loop_start(io, setup):
  """ "none": the loop starts at sqrt(ā_249) * initial warp with no draw (so the loop's noise does
  not matter), the schedule is "matched"'s, and the original-loss sample still noises the GT latent
  with its own draw.
  """
  model, variables = setup
  config = celebahq.get_config("tiny")
  config.midms.first_step_noise = "none"
  free = MIDMs.from_config(config)
  config.midms.first_step_noise = "matched"
  matched = MIDMs.from_config(config)
  for field in StepCoefficients._fields:
    np.testing.assert_array_equal(
        np.asarray(getattr(free.loop, field)), np.asarray(getattr(matched.loop, field))
    )
  x = forward_inputs(io)
  noise = forward_noise(io, "infer", model)
  run = jax.jit(
      lambda v, n: free.translate(
          v,
          x["input_semantics"],
          x["ref_img"],
          x["ref_semantics"],
          jax.random.PRNGKey(0),
          refine=False,
          noise=n,
      )
  )
  out = run(variables, noise)
  ac = float(np.asarray(free.schedule.alphas_cumprod)[249])
  np.testing.assert_allclose(
      np.asarray(out["steps"].ref.x_noisy[0]),
      np.sqrt(ac) * np.asarray(out["initial_warp"]),
      atol=1e-6,
  )
  other = run(variables, noise._replace(loop_ref=noise.loop_ref + 1.0))
  np.testing.assert_array_equal(np.asarray(out["image"]), np.asarray(other["image"]))
  gt = free.encode(variables, x["src_img"])
  _, sample = free.original_loss_sample(variables, gt, noise.original, jnp.asarray(0))
  np.testing.assert_allclose(
      np.asarray(sample["x_noisy"]),
      np.sqrt(ac) * np.asarray(gt) + np.sqrt(1 - ac) * np.asarray(noise.original),
      atol=1e-5,
  )


def test_options_change_the_result_only_where_they_should(io, setup):
  """confidence_masking=False replaces x0 by the new warp; true-backward fb check marks consistent
  matches."""
  model, variables = setup
  x = forward_inputs(io)
  noise = forward_noise(io, "infer", model)
  run = lambda m: m.translate(
      variables,
      x["input_semantics"],
      x["ref_img"],
      x["ref_semantics"],
      jax.random.PRNGKey(0),
      refine=False,
      noise=noise,
  )
  config = celebahq.get_config("tiny")
  config.midms.confidence_masking = False
  unmasked = run(MIDMs.from_config(config))["steps"]
  np.testing.assert_allclose(
      unmasked.rewarp.pred_ref_x0_mixed[1], unmasked.rewarp.pred_ref_x0_new[1], atol=1e-6
  )
  config = celebahq.get_config("tiny")
  config.midms.fbcheck_true_backward = True
  official, backward = run(model), run(MIDMs.from_config(config))
  assert not np.array_equal(official["steps"].rewarp.fb_ts, backward["steps"].rewarp.fb_ts)
  np.testing.assert_array_equal(official["initial_warp"], backward["initial_warp"])


def test_train_mode_spectral_norm_forward_matches_official(io, setup):
  """``losses_io.npz:train_sn``: the training forward with PyTorch train-mode spectral norm (one
  power iteration per call, in the official call order) gives the official outputs and final u,
  v."""
  model, variables = setup
  expected = load_fixture("losses_io.npz")
  x = forward_inputs(io)
  batch = dict(
      image=x["src_img"], ref=x["ref_img"], label=x["input_semantics"], label_ref=x["ref_semantics"]
  )
  out, spectral = jax.jit(
      lambda v, n: model.train_forward(
          v,
          batch,
          jax.random.PRNGKey(0),
          warmup=False,
          update_stats=True,
          noise=n,
          original_index=jnp.asarray(io["train/rand_idx"]),
      )
  )(variables, forward_noise(io, "train", model))
  for name in ("warped_ref", "warped_src"):
    assert_close(out[name], nchw_to_nhwc(expected[f"train_sn/{name}"]), 5e-5, f"train_sn/{name}")
  flat = traverse_util.flatten_dict(spectral, sep=".")
  after = {k.split("/")[-1]: v for k, v in expected.items() if "/sn_after/" in k}
  assert set(flat) == set(after)
  for key, value in after.items():
    assert_close(flat[key], value, 1e-5, key)


def _chunked_model(chunk: int = 24) -> MIDMs:
  """The tiny model with blockwise warps: 24 of the 64 latent pixels per block, the last block
  partial."""
  config = celebahq.get_config("tiny")
  config.midms.warp_chunk = chunk
  return MIDMs.from_config(config)


def _assert_same(actual, expected, name: str, atol: float = 2e-5) -> None:
  """Within ``atol``, relative where values exceed 1. The 0.005 temperature amplifies float32
  rounding 200x: blocks round differently from the whole volume (~1e-5 on a warp, the dense one is
  as far from float64), and the loop carries it on; fb distances sample flows at the maps,
  amplifying it again.
  """
  scale = max(1.0, float(np.max(np.abs(np.asarray(expected)))))
  assert_close(actual, expected, atol * scale, name)


def test_chunked_warps_give_the_dense_matching_and_gradient(io, setup):
  """warp_chunk > 0, the matching of a training step: initial matching (both paths, first-warp cycle
  loss), then the first re-warp of each path (exemplar path with seg and mask) from the official x0
  give the dense volume's results, and so does the gradient of their losses w.r.t. the last layers
  before the correlations (the theta / phi heads, the encoders' last convolutions). (The U-Net,
  whose backward takes minutes to compile on CPU, does not touch the warps; the translation test
  below runs the interleaved loop.)"""
  model, variables = setup
  x = forward_inputs(io)
  encode = jax.jit(model.encode)
  gt, exemplar = encode(variables, x["src_img"]), encode(variables, x["ref_img"])
  ref_x0, src_x0 = (_nhwc(io[f"train/loop0/{p}/pred_x0"]) for p in ("ref", "src"))
  flat = traverse_util.flatten_dict(variables["correspondence"]["params"], sep="/")
  last = lambda name: name.split("/")[0] in ("theta", "phi") or "/G_middle_1/conv_1/" in name
  trained = {k: v for k, v in flat.items() if last(k)}
  assert len(trained) == 10  # theta, phi; seg_enc, real_enc, iter_enc: weight and bias each

  def run(m: MIDMs):
    def loss(params):
      every = traverse_util.unflatten_dict({**flat, **params}, sep="/")
      v = {**variables, "correspondence": {**variables["correspondence"], "params": every}}
      spectral = v["correspondence"]["spectral"]
      out, _ = m.initial_matching(
          v, spectral, x["input_semantics"], x["ref_semantics"], exemplar, gt
      )
      # pylint: disable-next=protected-access
      ref, _ = m._rewarp_path(
          v,
          spectral,
          ref_x0,
          out["trg_matching_feats"],
          out["ref_matching_feats"],
          exemplar,
          out["exemplar_condition"],
          update_stats=False,
      )
      # pylint: disable-next=protected-access
      src, _ = m._rewarp_path(
          v,
          spectral,
          src_x0,
          out["trg_matching_feats"],
          out["src_matching_feats"],
          gt,
          update_stats=False,
      )
      out.update(
          {f"rewarp_ref/{k}": ref[k] for k in ("new", "cycle", "seg")},
          **ref["mask"],
          **{f"rewarp_src/{k}": src[k] for k in ("new", "cycle")},
      )
      total = (
          out["loss_fb_first_warp"]
          + ref["cycle"]
          + src["cycle"]
          + sum(jnp.mean(out[k]) for k in ("warped_ref_feat", "warped_ref_seg", "warped_src_feat"))
          + jnp.mean(ref["new"])
          + jnp.mean(src["new"])
          + jnp.mean(ref["seg"])
      )
      return total, out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(trained)

  (_, dense), dense_grads = run(model)
  (_, chunked), chunked_grads = run(_chunked_model())
  assert set(dense) - set(chunked) == {"corr_ref", "corr_src"}
  # both values
  np.testing.assert_array_equal(chunked["fb_mask"], nchw_to_nhwc(io["train/rewarp1/fb_mask"]))
  for name, value in chunked.items():
    if name in ("fb_mask", "fb_mask_raw"):
      np.testing.assert_array_equal(value, dense[name], err_msg=name)
    else:
      _assert_same(value, dense[name], name, 1e-4 if name == "fb_ts" else 2e-5)
  for name, grad in chunked_grads.items():  # through the softmax Jacobians: 1/T again
    _assert_same(grad, dense_grads[name], f"d/d{name}", 5e-5)


def test_chunked_warps_give_the_dense_translation(io, setup):
  """warp_chunk > 0, inference: same masks (exactly), fb distances and latents as the dense volume
  through the interleaved loop; no volumes captured."""
  model, variables = setup
  x = forward_inputs(io)
  noise = forward_noise(io, "infer", model)
  run = lambda m: jax.jit(
      lambda v: m.translate(
          v,
          x["input_semantics"],
          x["ref_img"],
          x["ref_semantics"],
          jax.random.PRNGKey(0),
          refine=False,
          noise=noise,
      )
  )(variables)
  dense, chunked = run(model), run(_chunked_model())
  assert "corr_ref" not in chunked["matched"] and "corr_ref" in dense["matched"]
  assert chunked["steps"].rewarp.corr_inter is None and dense["steps"].rewarp.corr_inter is not None
  for name in ("image", "latent", "initial_warp"):
    _assert_same(chunked[name], dense[name], name)
  for name in ("pred_ref_x0_new", "pred_ref_x0_mixed", "iter_warped_ref_seg", "fb_ts"):
    _assert_same(
        getattr(chunked["steps"].rewarp, name),
        getattr(dense["steps"].rewarp, name),
        f"steps/{name}",
        1e-4 if name == "fb_ts" else 2e-5,
    )
  for name in ("fb_mask", "fb_mask_raw"):
    np.testing.assert_array_equal(
        getattr(chunked["steps"].rewarp, name), getattr(dense["steps"].rewarp, name), err_msg=name
    )


def test_joined_encoding_samples_each_batch_with_its_own_key():
  """``encode_batches`` (the training forward's one encoder call for the GT photos and the
  exemplars) gives what separate ``encode`` calls give; a KL first stage samples each batch with its
  own key."""
  model = MIDMs.from_config(lsun_church.get_config("tiny"))
  rng = np.random.default_rng(0)
  gt, exemplar = (jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32) for _ in range(2))
  abstract = jax.eval_shape(model.first_stage.init, jax.random.PRNGKey(0), gt)
  variables = {
      "first_stage": jax.tree_util.tree_map(
          lambda leaf: jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype), abstract
      )
  }
  keys = list(jax.random.split(jax.random.PRNGKey(1)))

  @jax.jit
  def encodings(v):
    alone = [model.encode(v, x, key) for x, key in zip((gt, exemplar), keys)]
    return (
        model.encode_batches(v, [gt, exemplar], keys),
        alone,
        model.encode_batches(v, [gt, exemplar], keys[::-1]),
    )

  joined, alone, swapped = encodings(variables)
  for got, want in zip(joined, alone):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(swapped[0], joined[0], atol=1e-3)
  with pytest.raises(ValueError, match="needs an rng"):
    model.encode_batches(variables, [gt, exemplar], [keys[0], None])
