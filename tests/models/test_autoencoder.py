"""First-stage autoencoders vs the official PyTorch outputs (vq_io.npz, small config) and full-size
shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midms_jax.interop.torch_names import expected_torch_keys, variables_from_state_dict
from midms_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian, VQModel
from tests.conftest import assert_close, load_fixture, nchw_to_nhwc, nhwc_to_nchw

PREFIX = "diff_model.first_stage_model."
# first_stage_config of ldm_small_config.yaml.
SMALL = dict(
    embed_dim=3,
    n_embed=64,
    ch=32,
    out_ch=3,
    ch_mult=(1, 1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    dropout=0.0,
    in_channels=3,
    resolution=32,
    z_channels=3,
    double_z=False,
)
# Absolute tolerances from the fixture README; None = exact.
TOLERANCES = {
    "encoder_out": 2e-5,
    "z": 2e-5,
    "z_q": 5e-6,
    "indices": None,
    "indices_bhw": None,
    "emb_loss": 2e-6,
    "post_quant": 5e-6,
    "decoded": 1e-4,
    "decoded_no_quant": 1e-4,
    "z2/z_q": 2e-5,
    "z2/indices": None,
    "z2/decoded": 5e-5,
}


def _param_count(abstract_variables) -> int:
  return sum(
      int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract_variables["params"])
  )


def _abstract(model, shape):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))


@pytest.fixture(scope="module")
def vq_io():
  return load_fixture("vq_io.npz")


@pytest.fixture(scope="module")
def small_vq(midms_state_dict):
  model = VQModel(**SMALL)
  variables, _ = variables_from_state_dict(
      midms_state_dict, _abstract(model, (1, 32, 32, 3)), prefix=PREFIX, source="midms_small.pth"
  )
  return model, variables


@pytest.fixture(scope="module")
def outputs(small_vq, vq_io):
  """Every vq_io.npz quantity computed by the port, each stage fed the official input of that
  stage."""
  model, variables = small_vq

  def run(method, *args, **kwargs):
    return model.apply(variables, *args, method=method, **kwargs)

  image, z, z_q, z2 = (nchw_to_nhwc(vq_io[k]) for k in ("image", "z", "z_q", "z2/z"))
  quant, loss, idx = run(VQModel.quantize, z)
  quant2, _, idx2 = run(VQModel.quantize, z2)
  return {
      "encoder_out": nhwc_to_nchw(run(lambda m, x: m.encoder(x), image)),
      "z": nhwc_to_nchw(run(VQModel.encode, image)),
      "z_q": nhwc_to_nchw(quant),
      "indices": np.asarray(idx).reshape(-1),
      "indices_bhw": np.asarray(idx),
      "emb_loss": np.asarray(loss),
      "post_quant": nhwc_to_nchw(run(lambda m, x: m.post_quant_conv(x), z_q)),
      "decoded": nhwc_to_nchw(run(VQModel.decode, z)),
      "decoded_no_quant": nhwc_to_nchw(run(VQModel.decode, z, force_not_quantize=True)),
      "z2/z_q": nhwc_to_nchw(quant2),
      "z2/indices": np.asarray(idx2).reshape(-1),
      "z2/decoded": nhwc_to_nchw(run(VQModel.decode, z2)),
  }


@pytest.mark.parametrize("key", sorted(TOLERANCES))
def test_matches_official(outputs, vq_io, key):
  atol = TOLERANCES[key]
  if atol is None:
    assert outputs[key].dtype == np.int32, key
    np.testing.assert_array_equal(outputs[key], vq_io[key], err_msg=key)
  else:
    assert_close(outputs[key], vq_io[key], atol, key)


def test_end_to_end_and_decode_code(small_vq, vq_io):
  model, variables = small_vq
  image = nchw_to_nhwc(vq_io["image"])
  assert_close(
      nhwc_to_nchw(model.apply(variables, image)),
      vq_io["decoded"],
      TOLERANCES["decoded"],
      "__call__",
  )
  codes = vq_io["z2/indices"].reshape(2, 8, 8)
  decoded = model.apply(variables, jnp.asarray(codes), method=VQModel.decode_code)
  assert_close(nhwc_to_nchw(decoded), vq_io["z2/decoded"], TOLERANCES["z2/decoded"], "decode_code")


def test_straight_through_gradient(small_vq, vq_io):
  model, variables = small_vq
  z = jnp.asarray(nchw_to_nhwc(vq_io["z"]))
  grad = jax.grad(lambda x: jnp.sum(model.apply(variables, x, method=VQModel.quantize)[0]))(z)
  np.testing.assert_array_equal(np.asarray(grad), np.ones(z.shape, np.float32))


def test_small_keys_match_checkpoint(midms_state_dict):
  expected = expected_torch_keys(_abstract(VQModel(**SMALL), (1, 32, 32, 3)), prefix=PREFIX)
  actual = {k: tuple(v.shape) for k, v in midms_state_dict.items() if k.startswith(PREFIX)}
  assert expected == actual


def test_full_size_vq_f4_parameter_count():
  assert _param_count(_abstract(VQModel(), (1, 256, 256, 3))) == 55_322_782


def test_full_size_kl_f8_shapes():
  model = AutoencoderKL()
  abstract = _abstract(model, (1, 256, 256, 3))
  assert _param_count(abstract) == 83_653_863
  keys = expected_torch_keys(abstract)
  assert keys["encoder.conv_out.weight"] == (8, 512, 3, 3)
  assert keys["quant_conv.weight"] == (8, 8, 1, 1)
  assert keys["post_quant_conv.weight"] == (4, 4, 1, 1)
  posterior = jax.eval_shape(
      lambda v, x: model.apply(v, x, method=AutoencoderKL.encode),
      abstract,
      jnp.zeros((1, 256, 256, 3)),
  )
  assert posterior.mean.shape == (1, 32, 32, 4)


def test_tiny_kl_encode_sample_decode():
  model = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  posterior = model.apply(variables, x, method=AutoencoderKL.encode)
  assert isinstance(posterior, DiagonalGaussian)
  assert posterior.mean.shape == posterior.logvar.shape == (2, 8, 8, 4)
  np.testing.assert_allclose(posterior.std, np.exp(0.5 * np.asarray(posterior.logvar)), rtol=1e-6)
  sample = posterior.sample(jax.random.key(2))
  assert sample.shape == (2, 8, 8, 4) and not np.allclose(sample, posterior.mode())
  image = model.apply(variables, sample, method=AutoencoderKL.decode)
  assert image.shape == (2, 16, 16, 3) and np.all(np.isfinite(image))
  # logvar is clamped to [-30, 20] before std is taken.
  clamped = DiagonalGaussian.from_moments(jnp.full((1, 1, 1, 2), 100.0))
  assert float(clamped.logvar[0, 0, 0, 0]) == 20.0


def test_attn_type_none_is_identity(small_vq, vq_io):
  model, variables = small_vq
  plain = VQModel(**SMALL, attn_type="none")
  abstract = _abstract(plain, (1, 32, 32, 3))
  keys = set(expected_torch_keys(abstract))
  assert keys == {k for k in expected_torch_keys(variables) if ".mid.attn_1." not in k}
  # A vanilla block whose proj_out is zero is the identity, so both models must agree.
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  attn = params["encoder"]["mid.attn_1"]
  attn["proj_out"] = jax.tree_util.tree_map(np.zeros_like, attn["proj_out"])
  without_attn = {
      name: (
          {k: v for k, v in sub.items() if k != "mid.attn_1"}
          if name in ("encoder", "decoder")
          else sub
      )
      for name, sub in params.items()
  }
  image = nchw_to_nhwc(vq_io["image"])
  np.testing.assert_array_equal(
      plain.apply({"params": without_attn}, image, method=VQModel.encode),
      model.apply({"params": params}, image, method=VQModel.encode),
  )


def test_bad_config_and_shapes_raise():
  with pytest.raises(ValueError, match="attn_type"):
    _abstract(VQModel(**{**SMALL, "attn_type": "linear"}), (1, 32, 32, 3))
  with pytest.raises(ValueError, match="channels"):
    _abstract(VQModel(**SMALL), (1, 32, 32, 4))
  with pytest.raises(ValueError, match="double_z"):
    _abstract(VQModel(**{**SMALL, "double_z": True}), (1, 32, 32, 3))
