"""Import of the official PyTorch checkpoints: parity through the public loaders, strictness, bad
files."""

import pathlib

import jax
import numpy as np
import pytest

from configs import celebahq, deepfashion
from midms_jax.diffusion.schedule import DiffusionSchedule
from midms_jax.errors import CheckpointError
from midms_jax.interop import torch_import
from midms_jax.models import build
from tests.conftest import FIXTURES, assert_close, load_fixture, nchw_to_nhwc, nhwc_to_nchw

torch = pytest.importorskip("torch")

TINY = celebahq.get_config("tiny").model


def _unet_eps(variables, x_nchw, t):
  eps = build.build_unet(TINY.unet).apply(variables, nchw_to_nhwc(x_nchw), t)
  return nhwc_to_nchw(eps)


def test_ldm_checkpoint_reproduces_unet_and_first_stage(ldm_checkpoint_path):
  io, vq_io = load_fixture("unet_io.npz"), load_fixture("vq_io.npz")
  variables = torch_import.load_ldm_checkpoint(ldm_checkpoint_path, TINY)
  assert_close(_unet_eps(variables["unet"], io["x"], io["t"]), io["eps"], 2e-5, "eps")
  vq = build.build_first_stage(TINY.first_stage)
  decoded = vq.apply(variables["first_stage"], nchw_to_nhwc(vq_io["z"]), method=vq.decode)
  assert_close(nhwc_to_nchw(decoded), vq_io["decoded"], 1e-4, "decoded")


def test_ldm_checkpoint_ema_weights_on_request(ldm_checkpoint_path):
  io = load_fixture("unet_io.npz")
  ema = torch_import.load_ldm_checkpoint(ldm_checkpoint_path, TINY, use_ema=True)
  assert_close(_unet_eps(ema["unet"], io["x"], io["t"]), io["eps_ema"], 2e-5, "eps_ema")
  assert np.max(np.abs(io["eps_ema"] - io["eps"])) > 1e-3  # the fixture tells raw and EMA apart


def test_first_stage_checkpoint_reproduces_encoder(vq_checkpoint_path):
  vq_io = load_fixture("vq_io.npz")
  variables = torch_import.load_first_stage_checkpoint(vq_checkpoint_path, TINY.first_stage)
  vq = build.build_first_stage(TINY.first_stage)
  z = vq.apply(variables, nchw_to_nhwc(vq_io["image"]), method=vq.encode)
  assert_close(nhwc_to_nchw(z), vq_io["z"], 2e-5, "z")


def test_midms_checkpoint_consumes_everything_and_matches_weights(
    midms_checkpoint_path, midms_state_dict
):
  variables = torch_import.load_midms_checkpoint(midms_checkpoint_path, TINY)
  assert set(variables) == {"unet", "first_stage", "correspondence"}
  corr = variables["correspondence"]
  np.testing.assert_array_equal(
      corr["params"]["phi"]["kernel"][0, 0], midms_state_dict["phi.weight"][:, :, 0, 0].T
  )
  np.testing.assert_array_equal(
      corr["spectral"]["real_enc"]["layer1.0"]["weight_u"],
      midms_state_dict["real_enc.layer1.0.weight_u"],
  )
  io = load_fixture("unet_io.npz")
  assert_close(
      _unet_eps(variables["unet"], io["x"], io["t"]), io["eps"], 2e-5, "eps via midms .pth"
  )


def _full_midms_layout() -> dict[str, np.ndarray]:
  """Zero-filled state dict with every key/shape of the official full-size CelebA MIDMs (no memory
  used)."""
  state = {}
  for line in (FIXTURES / "midms_state_dict_keys.tsv").read_text().splitlines():
    if line.startswith("#") or not line.strip():
      continue
    key, shape, dtype = line.split("\t")
    dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    state[key] = np.broadcast_to(np.zeros((), dtype=np.dtype(dtype)), dims)
  return state


def test_full_size_official_key_layout_is_accepted():
  state = _full_midms_layout()
  assert len(state) == 1106  # 955 diff_model + 13 sampler buffers + 138 correspondence keys
  variables = torch_import.midms_from_state_dict(
      state, celebahq.get_config().model, source="layout"
  )
  assert build.count_params(variables["unet"]) == 274_056_163
  assert build.count_params(variables["first_stage"]) == 55_322_782


def _save(tmp_path: pathlib.Path, name: str, obj) -> pathlib.Path:
  path = tmp_path / name
  torch.save(obj, path)
  return path


def _assert_one_line_error(excinfo, path, *fragments):
  message = str(excinfo.value)
  assert "\n" not in message, message
  assert str(path) in message, message
  for fragment in fragments:
    assert fragment in message, message


def test_missing_file(tmp_path):
  path = tmp_path / "nope.ckpt"
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(path, TINY)
  _assert_one_line_error(excinfo, path, "no such checkpoint file")


def test_truncated_checkpoint(tmp_path, ldm_checkpoint_path):
  path = tmp_path / "truncated.ckpt"
  data = ldm_checkpoint_path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(path, TINY)
  _assert_one_line_error(excinfo, path, "not a readable PyTorch checkpoint")


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "notes.ckpt"
  path.write_text("model:\n  target: ldm\n")
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_midms_checkpoint(path, TINY)
  _assert_one_line_error(excinfo, path, "not a readable PyTorch checkpoint")


def test_wrong_kind_of_checkpoint(vq_checkpoint_path):
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(vq_checkpoint_path, TINY)
  _assert_one_line_error(
      excinfo, vq_checkpoint_path, "not an LDM checkpoint", "model.diffusion_model."
  )


def test_checkpoint_for_another_config(midms_checkpoint_path):
  """DeepFashion has 20 label channels: the CelebA (15) checkpoint's seg_enc/trunk shapes must be
  refused."""
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_midms_checkpoint(midms_checkpoint_path, deepfashion.get_config("tiny").model)
  _assert_one_line_error(
      excinfo,
      midms_checkpoint_path,
      "23 key(s) do not match the config's shapes",
      "layer.0.conv1.bias has shape (47,), model expects (52,)",
  )


def test_wider_unet_config_is_refused(ldm_checkpoint_path):
  cfg = celebahq.get_config("tiny").model
  cfg.unet.model_channels = 64
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(ldm_checkpoint_path, cfg)
  _assert_one_line_error(
      excinfo,
      ldm_checkpoint_path,
      "model.diffusion_model.input_blocks.0.0.bias has shape (32,), model expects (64,)",
  )


def test_missing_key_is_named(tmp_path, ldm_checkpoint_path):
  ckpt = torch.load(ldm_checkpoint_path, weights_only=True)
  del ckpt["state_dict"]["first_stage_model.decoder.conv_out.bias"]
  path = _save(tmp_path, "missing.ckpt", ckpt)
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(path, TINY)
  _assert_one_line_error(
      excinfo, path, "1 key(s) missing", "first_stage_model.decoder.conv_out.bias"
  )


def test_unexpected_key_is_named(tmp_path, vq_checkpoint_path):
  ckpt = torch.load(vq_checkpoint_path, weights_only=True)
  ckpt["state_dict"]["encoder.extra_block.weight"] = torch.zeros(3)
  ckpt["state_dict"]["loss.discriminator.main.0.weight"] = torch.zeros(3)  # documented ignorable
  path = _save(tmp_path, "extra.ckpt", ckpt)
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_first_stage_checkpoint(path, TINY.first_stage)
  _assert_one_line_error(excinfo, path, "1 unexpected key(s)", "encoder.extra_block.weight")


def test_ema_requested_but_absent(tmp_path, ldm_checkpoint_path):
  ckpt = torch.load(ldm_checkpoint_path, weights_only=True)
  ckpt["state_dict"] = {
      k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model_ema.")
  }
  path = _save(tmp_path, "no_ema.ckpt", ckpt)
  torch_import.load_ldm_checkpoint(path, TINY)  # raw weights still load
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(path, TINY, use_ema=True)
  _assert_one_line_error(excinfo, path, "model_ema")


def test_loaded_variables_run_under_jit(ldm_checkpoint_path):
  variables = torch_import.load_ldm_checkpoint(ldm_checkpoint_path, TINY)
  unet = build.build_unet(TINY.unet)
  x = jax.numpy.zeros((1, 8, 8, 3))
  eps = jax.jit(unet.apply)(variables["unet"], x, jax.numpy.array([10]))
  assert eps.shape == (1, 8, 8, 3) and bool(jax.numpy.all(jax.numpy.isfinite(eps)))


# ------------------------------------------------------------------------------------------------
# Schedule buffers and scale_factor, checked against the whole config
# ------------------------------------------------------------------------------------------------


def test_schedule_buffers_that_match_the_config_load(ldm_checkpoint_path, midms_checkpoint_path):
  config = celebahq.get_config("tiny")
  torch_import.load_ldm_checkpoint(ldm_checkpoint_path, config)
  variables = torch_import.load_midms_checkpoint(midms_checkpoint_path, config)
  assert sorted(variables) == ["correspondence", "first_stage", "unet"]


def test_schedule_of_another_config_is_named(ldm_checkpoint_path, midms_checkpoint_path):
  config = celebahq.get_config("tiny")
  config.diffusion.linear_end = 0.0155  # e.g. the LSUN-churches schedule
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(ldm_checkpoint_path, config)
  _assert_one_line_error(
      excinfo,
      ldm_checkpoint_path,
      "schedule buffer betas differs",
      "linear_end 0.0155 gives betas[999]=0.0155; the file has 0.0195",
      "set --config.diffusion.linear_end=0.0195",
  )
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_midms_checkpoint(midms_checkpoint_path, config)
  _assert_one_line_error(excinfo, midms_checkpoint_path, "diff_model.betas differs")
  torch_import.load_midms_checkpoint(midms_checkpoint_path, config.model)  # model config: unchecked
  config.diffusion.update(dict(linear_end=0.0195, timesteps=500))
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(ldm_checkpoint_path, config)
  _assert_one_line_error(
      excinfo,
      ldm_checkpoint_path,
      "has shape (1000,)",
      "gives (500,)",
      "set --config.diffusion.timesteps=1000",
  )


def test_a_derived_buffer_is_checked_too(tmp_path, ldm_checkpoint_path):
  ckpt = torch.load(ldm_checkpoint_path, weights_only=True)
  ckpt["state_dict"]["posterior_mean_coef2"][10] *= 1.001
  path = _save(tmp_path, "edited.ckpt", ckpt)
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(path, celebahq.get_config("tiny"))
  _assert_one_line_error(excinfo, path, "posterior_mean_coef2 differs", "posterior_mean_coef2[10]")


def test_betas_of_no_ldm_schedule_are_reported(tmp_path, ldm_checkpoint_path):
  ckpt = torch.load(ldm_checkpoint_path, weights_only=True)
  cosine = DiffusionSchedule.make("cosine", 1000).betas
  ckpt["state_dict"]["betas"] = torch.from_numpy(cosine.copy())
  path = _save(tmp_path, "cosine.ckpt", ckpt)
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(path, celebahq.get_config("tiny"))
  _assert_one_line_error(excinfo, path, "betas differs", "no LDM linear / sqrt_linear schedule")


def test_fit_schedule_recovers_the_config_values():
  churches = DiffusionSchedule.make("linear", 1000, 0.0015, 0.0155).betas
  assert torch_import.fit_schedule(churches) == dict(
      beta_schedule="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0155
  )
  ramp = DiffusionSchedule.make("sqrt_linear", 200, 1e-4, 0.02).betas
  assert torch_import.fit_schedule(ramp)["beta_schedule"] == "sqrt_linear"
  assert torch_import.fit_schedule(DiffusionSchedule.make("cosine", 1000).betas) is None


def test_scale_factor_is_kept_and_checked_when_applied(tmp_path, ldm_checkpoint_path):
  ckpt = torch.load(ldm_checkpoint_path, weights_only=True)
  ckpt["state_dict"]["scale_factor"] = torch.tensor(0.2289)
  path = _save(tmp_path, "scaled.ckpt", ckpt)
  config = celebahq.get_config("tiny")
  assert "scale_factor" not in torch_import.load_ldm_checkpoint(path, config)
  kept = torch_import.load_ldm_checkpoint(path, config, keep_ema=True)["scale_factor"]
  assert kept.dtype == np.float32 and kept.shape == () and kept == np.float32(0.2289)
  config.midms.apply_scale_factor = True
  with pytest.raises(CheckpointError) as excinfo:
    torch_import.load_ldm_checkpoint(path, config)
  _assert_one_line_error(
      excinfo, path, "scale_factor is 0.2289", "set --config.model.first_stage.scale_factor=0.2289"
  )
  config.model.first_stage.scale_factor = 0.2289
  torch_import.load_ldm_checkpoint(path, config)
