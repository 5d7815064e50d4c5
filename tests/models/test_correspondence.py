"""Correspondence networks vs the official PyTorch outputs (corr_io.npz,
sn_effective_weights.npz)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from midms_jax.interop.torch_names import expected_torch_keys, variables_from_state_dict
from midms_jax.midms.matching import normalize_features
from midms_jax.models.correspondence import CorrespondenceNetworks, SpectralNormConv, spectral_normalized_kernel
from tests.conftest import assert_close, load_fixture, nchw_to_nhwc, nhwc_to_nchw

# Fixture README "small configuration": N_CH 32, ndf 8, SPADE hidden 16, label_nc 15, VQ latent 3
# ch.
SMALL = dict(width=32, base_width=8, spade_hidden=16, label_channels=15, latent_channels=3)
PREFIXES = ("real_enc.", "iter_enc.", "seg_enc.", "layer.", "phi.", "theta.")
# (key, atol) from the fixture README.
ENCODER_TOL = {"trg_matching_feats": 5e-5, "src_matching_feats": 1e-4, "ref_matching_feats": 1e-4}
LAYER_IN_TOL = {"trg": 5e-5, "src": 1e-4, "ref": 1e-4}
LAYER_OUT_TOL = {"trg": 1e-4, "src": 5e-4, "ref": 5e-4}
HEAD_TOL = {"theta_out_trg": 1e-4, "phi_out_src": 2e-4, "phi_out_ref": 2e-4}
NORM_TOL = {"trg_out_norm": 2e-5, "src_out_norm": 5e-5, "ref_out_norm": 5e-5}
SN_TOL, SN_TRAIN_OUT_TOL = 1e-5, 5e-5


def _abstract(model, size=8):
  latent = jax.ShapeDtypeStruct((1, size, size, model.latent_channels), jnp.float32)
  semantics = jax.ShapeDtypeStruct((1, size, size, model.label_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), latent, semantics)


@pytest.fixture(scope="module")
def small_model():
  return CorrespondenceNetworks(**SMALL)


@pytest.fixture(scope="module")
def variables(small_model, midms_state_dict):
  filled, _ = variables_from_state_dict(
      midms_state_dict, _abstract(small_model), source="midms_small.pth"
  )
  return jax.tree_util.tree_map(jnp.asarray, filled)


@pytest.fixture(scope="module")
def corr():
  return {
      k: (nchw_to_nhwc(v) if v.ndim == 4 else v) for k, v in load_fixture("corr_io.npz").items()
  }


def _apply(model, variables, method, *args, **kwargs):
  return model.apply(variables, *args, method=method, **kwargs)


def test_state_dict_keys_and_shapes(small_model, midms_state_dict):
  official = {k: tuple(v.shape) for k, v in midms_state_dict.items() if k.startswith(PREFIXES)}
  assert expected_torch_keys(_abstract(small_model)) == official


def test_encoders(small_model, variables, corr):
  run = functools.partial(_apply, small_model, variables, update_stats=False)
  trg = run("encode_condition", corr["input_semantics_down"])
  src = run("encode_latent", corr["src_feats"])
  ref = run("encode_latent", corr["ref_feats"])
  for key, out in (
      ("trg_matching_feats", trg),
      ("src_matching_feats", src),
      ("ref_matching_feats", ref),
  ):
    assert_close(out, corr[key], ENCODER_TOL[key], key)
  # The trunk inputs are the concatenation [matching features, (down-sampled) semantics].
  semantics = {
      "trg": corr["input_semantics_down"],
      "src": corr["input_semantics_down"],
      "ref": corr["ref_semantics_down"],
  }
  for name, feats in (("trg", trg), ("src", src), ("ref", ref)):
    layer_in = jnp.concatenate([feats, semantics[name]], axis=-1)
    assert_close(layer_in, corr[f"layer_in_{name}"], LAYER_IN_TOL[name], f"layer_in_{name}")


def test_trunk_heads_and_normalisation(small_model, variables, corr):
  for name in ("trg", "src", "ref"):
    out = _apply(small_model, variables, "trunk", corr[f"layer_in_{name}"])
    assert_close(out, corr[f"layer_out_{name}"], LAYER_OUT_TOL[name], f"layer_out_{name}")
  for key, head, layer_out in (
      ("theta_out_trg", "theta", "layer_out_trg"),
      ("phi_out_src", "phi", "layer_out_src"),
      ("phi_out_ref", "phi", "layer_out_ref"),
  ):
    out = _apply(small_model, variables, "project", corr[layer_out], head)
    assert_close(out, corr[key], HEAD_TOL[key], key)
  for key, head_out in (
      ("trg_out_norm", "theta_out_trg"),
      ("src_out_norm", "phi_out_src"),
      ("ref_out_norm", "phi_out_ref"),
  ):
    assert_close(normalize_features(corr[head_out]), corr[key], NORM_TOL[key], key)


def test_match_features_composes_trunk_and_head(small_model, variables, corr):
  out = _apply(
      small_model,
      variables,
      "match_features",
      corr["layer_in_trg"][..., : SMALL["width"]],
      corr["input_semantics_down"],
      "theta",
  )
  assert_close(out, corr["theta_out_trg"], HEAD_TOL["theta_out_trg"], "match_features theta")


def test_spectral_norm_eval_weights(variables):
  sn = load_fixture("sn_effective_weights.npz")
  names = [
      k[len("eval/") : -len(".weight")]
      for k in sn
      if k.startswith("eval/") and k.endswith(".weight")
  ]
  assert len(names) == 18
  params = traverse_util.flatten_dict(variables["params"], sep=".")
  spectral = traverse_util.flatten_dict(variables["spectral"], sep=".")
  for name in names:
    kernel, sigma = spectral_normalized_kernel(
        params[f"{name}.weight_orig"], spectral[f"{name}.weight_u"], spectral[f"{name}.weight_v"]
    )
    assert_close(
        np.transpose(kernel, (3, 2, 0, 1)), sn[f"eval/{name}.weight"], SN_TOL, f"{name}.weight"
    )
    assert_close(sigma, sn[f"eval/{name}.sigma"], SN_TOL, f"{name}.sigma")


def _single_conv(sn, case):
  """The train_single/{a,b} conv: a = real_enc.layer1.0 (zero pad 1, no bias), b = conv_0 (pad 0,
  bias)."""
  p = lambda k: sn[f"train_single/{case}/{k}"]
  weight = p("weight_orig")
  has_bias = p("bias").size > 0
  conv = SpectralNormConv(
      weight.shape[0], weight.shape[2], padding=1 if case == "a" else 0, use_bias=has_bias
  )
  params = {"weight_orig": jnp.asarray(np.transpose(weight, (2, 3, 1, 0)))}
  if has_bias:
    params["bias"] = jnp.asarray(p("bias"))
  spectral = {"weight_u": jnp.asarray(p("u0")), "weight_v": jnp.asarray(p("v0"))}
  return conv, params, spectral, jnp.asarray(nchw_to_nhwc(p("x")))


def _initial_u(sn, case):
  """The u before call 1 of train_single/{case}, recovered from the final u2.

  The fixture's u0, v0, u1, v1 are bit-identical to u2, v2: the generator stored references to
  PyTorch's in-place-updated ``weight_u``/``weight_v`` buffers, not copies. A train-mode call maps
  u -> normalize(M M^T u) (M = W_orig as (O, -1)), so the genuine u0 is normalize((M M^T)^-2 u2);
  with it PyTorch reproduces y1, weight_eff1, y2, u2, v2, weight_eff2. (v0 is not used in train
  mode: the power iteration overwrites it first.)
  """
  weight = sn[f"train_single/{case}/weight_orig"].astype(np.float64)
  m = weight.reshape(weight.shape[0], -1)
  u = sn[f"train_single/{case}/u2"].astype(np.float64)
  for _ in range(2):
    u = np.linalg.solve(m @ m.T, u)
    u /= np.linalg.norm(u)
  return jnp.asarray(u, jnp.float32)


@pytest.mark.parametrize("case", ["a", "b"])
def test_spectral_norm_train_mode_two_calls(case):
  sn = load_fixture("sn_effective_weights.npz")
  conv, params, spectral, x = _single_conv(sn, case)
  spectral = {**spectral, "weight_u": _initial_u(sn, case)}
  for call in (1, 2):
    y, updated = conv.apply(
        {"params": params, "spectral": spectral}, x, update_stats=True, mutable=["spectral"]
    )
    spectral = updated["spectral"]
    kernel, _ = spectral_normalized_kernel(
        params["weight_orig"], spectral["weight_u"], spectral["weight_v"]
    )
    want = lambda k: sn[f"train_single/{case}/{k}{call}"]
    assert_close(nhwc_to_nchw(y), want("y"), SN_TRAIN_OUT_TOL, f"{case}/y{call}")
    assert_close(
        np.transpose(kernel, (3, 2, 0, 1)), want("weight_eff"), SN_TOL, f"{case}/weight_eff{call}"
    )
  assert_close(spectral["weight_u"], sn[f"train_single/{case}/u2"], SN_TOL, f"{case}/u2")
  assert_close(spectral["weight_v"], sn[f"train_single/{case}/v2"], SN_TOL, f"{case}/v2")


def test_train_mode_threads_spectral_state_through_calls(small_model, variables, corr):
  """Each train-mode call advances u, v by one power iteration (real_enc runs twice per MIDMs
  forward)."""
  state = variables
  for _ in range(2):
    _, updated = small_model.apply(
        state, corr["src_feats"], method="encode_latent", update_stats=True, mutable=["spectral"]
    )
    state = {**state, **updated}
  before = traverse_util.flatten_dict(variables["spectral"], sep=".")
  after = traverse_util.flatten_dict(state["spectral"], sep=".")
  weights = traverse_util.flatten_dict(variables["params"], sep=".")
  for key in before:
    if not key.startswith("real_enc."):
      assert np.array_equal(after[key], before[key]), key
      continue
    if key.endswith(".weight_v"):
      continue
    module = key[: -len(".weight_u")]
    m = np.transpose(np.asarray(weights[f"{module}.weight_orig"], np.float64), (3, 2, 0, 1))
    m = m.reshape(m.shape[0], -1)
    u = np.asarray(before[key], np.float64)
    for _ in range(2):
      v = m.T @ u / np.linalg.norm(m.T @ u)
      u = m @ v / np.linalg.norm(m @ v)
    assert_close(after[key], u, SN_TOL, key)
    assert_close(after[f"{module}.weight_v"], v, SN_TOL, f"{module}.weight_v")


def test_spectral_norm_eval_needs_no_mutable_and_train_does():
  sn = load_fixture("sn_effective_weights.npz")
  conv, params, spectral, x = _single_conv(sn, "a")
  conv.apply({"params": params, "spectral": spectral}, x, update_stats=False)
  with pytest.raises(ValueError, match="mutable"):
    conv.apply({"params": params, "spectral": spectral}, x, update_stats=True)


def test_spectral_norm_gradient():
  sn = load_fixture("sn_effective_weights.npz")
  conv, params, spectral, x = _single_conv(sn, "b")

  def loss(params, spectral):
    y, _ = conv.apply(
        {"params": params, "spectral": spectral}, x, update_stats=True, mutable=["spectral"]
    )
    return jnp.sum(jnp.square(y))

  grad_params, grad_spectral = jax.grad(loss, argnums=(0, 1))(params, spectral)
  g = np.asarray(grad_params["weight_orig"])
  assert np.all(np.isfinite(g)) and np.any(g != 0)
  for leaf in jax.tree_util.tree_leaves(grad_spectral):
    assert not np.any(np.asarray(leaf))
  # Same gradient as PyTorch's spectral_norm in train mode (grad flows through W_orig and sigma).
  torch = pytest.importorskip("torch")
  p = lambda k: torch.from_numpy(sn[f"train_single/b/{k}"].copy())
  tconv = torch.nn.utils.spectral_norm(torch.nn.Conv2d(64, 32, 3))
  with torch.no_grad():
    tconv.weight_orig.copy_(p("weight_orig"))
    tconv.bias.copy_(p("bias"))
    tconv.weight_u.copy_(p("u0"))
    tconv.weight_v.copy_(p("v0"))
  tconv(p("x")).square().sum().backward()
  torch_grad = tconv.weight_orig.grad.numpy()
  assert_close(
      np.transpose(g, (3, 2, 0, 1)),
      torch_grad,
      1e-4 * max(1.0, float(np.abs(torch_grad).max())),
      "grad weight_orig",
  )


def _params_under(tree, prefix):
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree[prefix]))


def test_full_size_parameter_counts():
  # official widths; spatial size does not change parameters
  abstract = _abstract(CorrespondenceNetworks())
  params = abstract["params"]
  counts = {
      name: _params_under(params, name)
      for name in ("real_enc", "iter_enc", "seg_enc", "layer", "phi", "theta")
  }
  # Reference §1.8: trainable parameters only (spectral-norm u, v are buffers, not counted).
  assert counts == {
      "real_enc": 6_192_320,
      "iter_enc": 7_066_688,
      "seg_enc": 6_240_704,
      "layer": 5_289_924,
      "phi": 69_632,
      "theta": 69_632,
  }
  assert set(abstract) == {"params", "spectral"}


def test_train_mode_power_iterations_match_official_training_forward(small_model, variables, corr):
  """``losses_io.npz:train_sn``: one official training forward in train mode runs seg_enc once,
  real_enc twice and iter_enc four times; every u, v afterwards must match (1e-5)."""
  expected = {
      k.split("/")[-1]: v for k, v in load_fixture("losses_io.npz").items() if "/sn_after/" in k
  }
  assert len(expected) == 36
  spectral = variables["spectral"]
  calls = (
      [("encode_condition", (corr["input_semantics_down"],))]
      + [("encode_latent", (corr["src_feats"],))] * 2
      + [("encode_iterate", (corr["src_feats"], corr["trg_matching_feats"]))] * 4
  )
  for method, args in calls:
    _, updated = small_model.apply(
        {**variables, "spectral": spectral},
        *args,
        update_stats=True,
        method=getattr(CorrespondenceNetworks, method),
        mutable=["spectral"],
    )
    spectral = updated["spectral"]
  flat = traverse_util.flatten_dict(spectral, sep=".")
  assert set(flat) == set(expected)
  worst = max(assert_close(flat[key], value, 1e-5, key) for key, value in expected.items())
  assert worst <= 1.0
