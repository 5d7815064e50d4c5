"""Export to the official PyTorch checkpoint layouts: bitwise round trips of the official files,
import(export(x)) == x, an independent PyTorch forward on exported weights, safetensors and
manifest, and atomic writes.

Round trips of the official fixtures are bitwise for *every* key, including the derived buffers that
the export recomputes from the config (12 LDM schedule buffers, the sampler's 13 S=16/eta=0 DDIM
buffers): no key is exempt.
"""

import errno
import functools
import hashlib
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import celebahq
from midms_jax.errors import CheckpointError
from midms_jax.interop import torch_export, torch_import
from midms_jax.interop.torch_names import torch_shape
from midms_jax.models import build
from tests.conftest import FIXTURES, assert_close, nchw_to_nhwc, nhwc_to_nchw

torch = pytest.importorskip("torch")
F = torch.nn.functional

CONFIG = celebahq.get_config("tiny")
SAMPLER = "diffusion_sampler."


def _torch_state(path) -> dict[str, "torch.Tensor"]:
  return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_bitwise(actual: dict[str, np.ndarray], expected: dict[str, "torch.Tensor"]) -> None:
  """Same keys; every array has the same dtype, shape and bits."""
  assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))[:8]
  differing = [
      key
      for key, ref in expected.items()
      if not (actual[key].dtype == ref.numpy().dtype and np.array_equal(actual[key], ref.numpy()))
  ]
  assert not differing, f"{len(differing)} keys differ, e.g. {differing[:8]}"


def _shared(state: dict[str, "torch.Tensor"], a: str, b: str) -> bool:
  return state[a].untyped_storage().data_ptr() == state[b].untyped_storage().data_ptr()


def test_official_midms_checkpoint_round_trips_bitwise(midms_checkpoint_path, tmp_path):
  original = _torch_state(midms_checkpoint_path)
  variables = torch_import.load_midms_checkpoint(midms_checkpoint_path, CONFIG.model, keep_ema=True)
  state = torch_export.midms_state_dict(variables, CONFIG)
  assert len(state) == 997
  _assert_bitwise(state, original)

  path = torch_export.save_midms_pth(tmp_path / "epoch_1.pth", state, epoch=1)
  saved = torch.load(path, map_location="cpu", weights_only=True)
  assert set(saved) == {"epoch", "state_dict"} and saved["epoch"] == 1
  _assert_bitwise({k: v.numpy() for k, v in saved["state_dict"].items()}, original)
  saved = saved["state_dict"]
  for key in (k for k in original if k.startswith("diff_model.")):
    assert _shared(saved, key, SAMPLER + "model." + key[len("diff_model.") :]), key
  # The fixture's >=2-D EMA shadows equal the raw weights and share their storage: so do the
  # export's.
  assert _shared(
      saved,
      "diff_model.model.diffusion_model.input_blocks.0.0.weight",
      "diff_model.model_ema.diffusion_modelinput_blocks00weight",
  )
  assert path.stat().st_size <= 1.1 * midms_checkpoint_path.stat().st_size


def test_official_ldm_checkpoint_round_trips_bitwise(ldm_checkpoint_path, tmp_path):
  original = _torch_state(ldm_checkpoint_path)
  variables = torch_import.load_ldm_checkpoint(ldm_checkpoint_path, CONFIG.model, keep_ema=True)
  out_bias = [variables[name]["params"]["out.0"]["bias"] for name in ("unet", "unet_ema")]
  assert not np.array_equal(*out_bias)  # the fixture's 1-D EMA shadows differ from the raw weights
  state = torch_export.ldm_state_dict(variables, CONFIG)
  assert len(state) == 423
  _assert_bitwise(state, original)
  path = torch_export.save_ldm_ckpt(tmp_path / "model.ckpt", state, global_step=7, epoch=2)
  saved = torch.load(path, map_location="cpu", weights_only=True)
  assert (saved["global_step"], saved["epoch"]) == (7, 2)
  _assert_bitwise({k: v.numpy() for k, v in saved["state_dict"].items()}, original)


def test_scale_factor_round_trips_bitwise(ldm_checkpoint_path, midms_checkpoint_path, tmp_path):
  """A scale_by_std file's scale_factor (e.g. 0.2289) comes back bitwise through import -> export
  -> import, for an LDM .ckpt and a MIDMs .pth (it is in diff_model. and the sampler's model)."""
  scale = torch.tensor(0.2289)
  ldm = torch.load(ldm_checkpoint_path, map_location="cpu", weights_only=True)
  ldm["state_dict"]["scale_factor"] = scale
  midms = torch.load(midms_checkpoint_path, map_location="cpu", weights_only=True)
  midms["state_dict"].update(
      {"diff_model.scale_factor": scale, SAMPLER + "model.scale_factor": scale}
  )
  for name, ckpt, load, export in [
      ("ldm.ckpt", ldm, torch_import.load_ldm_checkpoint, torch_export.ldm_state_dict),
      ("midms.pth", midms, torch_import.load_midms_checkpoint, torch_export.midms_state_dict),
  ]:
    torch.save(ckpt, tmp_path / name)
    variables = load(tmp_path / name, CONFIG, keep_ema=True)  # the whole config: schedule checked
    state = export(variables, CONFIG)
    _assert_bitwise(state, ckpt["state_dict"])
    saved = torch_export.save_ldm_ckpt(tmp_path / f"exported_{name}", state)
    again = load(saved, CONFIG, keep_ema=True)["scale_factor"]
    assert again.dtype == np.float32 and again.tobytes() == scale.numpy().tobytes()


def test_export_writes_the_configs_schedule(ldm_checkpoint_path):
  """The schedule buffers written are those of config.diffusion (here the churches' linear_end)."""
  churches = celebahq.get_config("tiny")
  churches.diffusion.linear_end = 0.0155
  variables = torch_import.load_ldm_checkpoint(ldm_checkpoint_path, CONFIG)
  state = torch_export.ldm_state_dict(variables, churches)
  assert state["betas"][-1] == np.float32(0.0155)
  torch_import.ldm_from_state_dict(state, churches)  # its own schedule passes the import's check
  with pytest.raises(CheckpointError, match="set --config.diffusion.linear_end=0.0155"):
    torch_import.ldm_from_state_dict(state, CONFIG)


def test_official_first_stage_checkpoint_round_trips_bitwise(vq_checkpoint_path, tmp_path):
  original = _torch_state(vq_checkpoint_path)
  first_stage = torch_import.load_first_stage_checkpoint(
      vq_checkpoint_path, CONFIG.model.first_stage
  )
  state = torch_export.first_stage_state_dict({"first_stage": first_stage}, CONFIG)
  _assert_bitwise(state, original)
  saved = _torch_state(torch_export.save_ldm_ckpt(tmp_path / "vq.ckpt", state))
  _assert_bitwise({k: v.numpy() for k, v in saved.items()}, original)


def _random_variables(abstract, rng: np.random.Generator) -> dict:
  """Random variables of these shapes: kernels N(0, 1/fan_in), norm scales 1 + 0.1 N, unit spectral
  vectors, other leaves (biases, PReLU) 0.1 N. Zero-initialised convs get weights too."""

  def draw(path, leaf):
    name, noise = path[-1].key, rng.standard_normal(leaf.shape).astype(np.float32)
    if name in ("kernel", "weight_orig", "embedding"):
      return noise / np.float32(math.sqrt(math.prod(leaf.shape[:-1])))
    if name in ("weight_u", "weight_v"):
      return noise / np.linalg.norm(noise)
    return noise * np.float32(0.1) + np.float32(name == "scale")

  return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(draw(p, x)), abstract)


@pytest.fixture(scope="module")
def random_variables() -> dict:
  """Random tiny-config variables (device arrays) with a distinct EMA U-Net and non-default
  counters."""
  rng = np.random.default_rng(3)
  variables = _random_variables(build.abstract_variables(CONFIG.model), rng)
  variables["unet_ema"] = _random_variables(build.abstract_unet(CONFIG.model.unet), rng)
  variables["ema_counters"] = {"decay": np.float32(0.999), "num_updates": np.int32(1234)}
  return variables


@pytest.fixture(scope="module")
def exported_pth(random_variables, tmp_path_factory) -> pathlib.Path:
  state = torch_export.midms_state_dict(random_variables, CONFIG)
  return torch_export.save_midms_pth(
      tmp_path_factory.mktemp("export") / "random.pth", state, epoch=3
  )


def _assert_same_variables(actual, expected) -> None:
  flat_a, flat_e = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (actual, expected))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_e]
  for (path, a), (_, e) in zip(flat_a, flat_e):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype and np.array_equal(a, e), jax.tree_util.keystr(path)


def test_import_of_export_is_identity(random_variables, exported_pth):
  state = torch_export.midms_state_dict(random_variables, CONFIG)
  assert state["diff_model.model_ema.num_updates"].dtype == np.int32
  assert all(v.dtype == np.float32 for k, v in state.items() if not k.endswith("num_updates"))
  _assert_same_variables(
      torch_import.load_midms_checkpoint(exported_pth, CONFIG.model, keep_ema=True),
      random_variables,
  )

  minimal = torch_export.midms_state_dict(random_variables, CONFIG, layout="minimal")
  assert set(minimal) == {k for k in state if not k.startswith(SAMPLER)}
  # The LDM layout is diff_model.* without the prefix; its import is covered by the official round
  # trip.
  ldm = torch_export.ldm_state_dict(random_variables, CONFIG)
  assert set(ldm) == {k[len("diff_model.") :] for k in state if k.startswith("diff_model.")}
  assert all(np.array_equal(v, state["diff_model." + k]) for k, v in ldm.items())
  inside = torch_export.ldm_state_dict_of_midms(state)
  assert list(inside) == list(ldm) and all(np.array_equal(inside[k], ldm[k]) for k in ldm)


def test_without_ema_the_raw_unet_is_written_as_the_shadows(random_variables, tmp_path):
  variables = {k: random_variables[k] for k in ("unet", "first_stage", "correspondence")}
  path = torch_export.save_midms_pth(
      tmp_path / "no_ema.pth", torch_export.midms_state_dict(variables, CONFIG)
  )
  saved = _torch_state(path)
  assert saved["diff_model.model_ema.decay"].dtype == torch.float32
  assert float(saved["diff_model.model_ema.decay"]) == np.float32(0.9999)
  assert saved["diff_model.model_ema.num_updates"].dtype == torch.int32
  assert int(saved["diff_model.model_ema.num_updates"]) == 0
  for key in (k for k in saved if k.startswith("diff_model.model.diffusion_model.")):
    shadow = "diff_model." + torch_export.ema_key(key[len("diff_model.model.diffusion_model.") :])
    assert _shared(saved, key, shadow), shadow
  back = torch_import.load_midms_checkpoint(path, CONFIG.model, keep_ema=True)
  _assert_same_variables(back["unet_ema"], variables["unet"])


def _full_size_layout() -> dict[str, tuple[tuple[int, ...], str]]:
  """{key: (shape, dtype)} of the official full-size CelebA MIDMs state dict (keys TSV)."""
  layout = {}
  for line in (FIXTURES / "midms_state_dict_keys.tsv").read_text().splitlines():
    if line.startswith("#") or not line.strip():
      continue
    key, shape, dtype = line.split("\t")
    layout[key] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype)
  return layout


def test_full_size_export_has_the_official_layout(monkeypatch):
  """Official CelebA widths, without allocating the weights: leaves become zero-strided
  placeholders."""
  config = celebahq.get_config()
  monkeypatch.setattr(
      torch_export,
      "_host_leaf",
      lambda name, leaf: np.broadcast_to(np.float32(0), torch_shape(name, leaf.shape)),
  )
  state = torch_export.midms_state_dict(build.abstract_variables(config.model), config)
  # lists diffusion_sampler.model.* only by reference: add the duplicates
  expected = _full_size_layout()
  expected.update(
      {
          SAMPLER + "model." + k[len("diff_model.") :]: v
          for k, v in expected.items()
          if k.startswith("diff_model.")
      }
  )
  assert {k: (v.shape, v.dtype.name) for k, v in state.items()} == expected


def _group_norm(x, state, prefix):
  return F.group_norm(x.float(), 32, state[prefix + ".weight"], state[prefix + ".bias"], eps=1e-5)


def _conv(x, state, prefix, **kwargs):
  return F.conv2d(x, state[prefix + ".weight"], state[prefix + ".bias"], **kwargs)


def _res_block(x, emb, state, prefix):
  """LDM ResBlock (no scale-shift norm): in_layers, + emb_layers(emb), out_layers, skip."""
  h = _conv(
      F.silu(_group_norm(x, state, prefix + ".in_layers.0")),
      state,
      prefix + ".in_layers.2",
      padding=1,
  )
  emb_out = F.linear(
      F.silu(emb), state[prefix + ".emb_layers.1.weight"], state[prefix + ".emb_layers.1.bias"]
  )
  h = h + emb_out[..., None, None]
  h = _conv(
      F.silu(_group_norm(h, state, prefix + ".out_layers.0")),
      state,
      prefix + ".out_layers.3",
      padding=1,
  )
  skip = prefix + ".skip_connection"
  return (_conv(x, state, skip) if skip + ".weight" in state else x) + h


def _attention_block(x, state, prefix, head_channels):
  """LDM AttentionBlock with the legacy head-major qkv layout: Conv1d qkv, softmax, Conv1d
  proj_out."""
  b, c, height, width = x.shape
  tokens = x.reshape(b, c, height * width)
  normed = _group_norm(tokens, state, prefix + ".norm")
  qkv = F.conv1d(normed, state[prefix + ".qkv.weight"], state[prefix + ".qkv.bias"])
  heads = c // head_channels
  q, k, v = qkv.reshape(b * heads, 3 * head_channels, height * width).split(head_channels, dim=1)
  scale = 1 / math.sqrt(math.sqrt(head_channels))
  weights = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
  attended = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, height * width)
  out = F.conv1d(attended, state[prefix + ".proj_out.weight"], state[prefix + ".proj_out.bias"])
  return (tokens + out).reshape(b, c, height, width)


def test_exported_weights_run_in_plain_pytorch_like_the_jax_unet(exported_pth, random_variables):
  """Plain torch.nn.functional code from the documented layout (no JAX, no torch_names) on the
  exported .pth."""
  full = _torch_state(exported_pth)
  prefix = "diff_model.model.diffusion_model."
  state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
  t = np.array([249, 63])

  freqs = torch.exp(-math.log(10000) * torch.arange(16, dtype=torch.float32) / 16)
  args = torch.from_numpy(t).float()[:, None] * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  emb = F.linear(
      F.silu(F.linear(emb, state["time_embed.0.weight"], state["time_embed.0.bias"])),
      state["time_embed.2.weight"],
      state["time_embed.2.bias"],
  )
  with torch.no_grad():
    outputs = {"input_blocks.0": _conv(torch.from_numpy(x), state, "input_blocks.0.0", padding=1)}
    outputs["input_blocks.1"] = _res_block(
        outputs["input_blocks.0"], emb, state, "input_blocks.1.0"
    )
    outputs["input_blocks.2"] = _conv(
        outputs["input_blocks.1"], state, "input_blocks.2.0.op", stride=2, padding=1
    )
    outputs["input_blocks.3.0"] = _res_block(
        outputs["input_blocks.2"], emb, state, "input_blocks.3.0"
    )
    outputs["input_blocks.3"] = _attention_block(
        outputs["input_blocks.3.0"], state, "input_blocks.3.1", 16
    )

  unet = build.build_unet(CONFIG.model.unet)
  apply = jax.jit(
      functools.partial(unet.apply, capture_intermediates=True, mutable=["intermediates"])
  )
  _, captured = apply(random_variables["unet"], nchw_to_nhwc(x), t)
  inter = captured["intermediates"]
  jax_outputs = {
      "input_blocks.0": inter["input_blocks.0"]["__call__"][0],
      "input_blocks.1": inter["input_blocks.1"]["__call__"][0],
      "input_blocks.2": inter["input_blocks.2"]["__call__"][0],
      "input_blocks.3.0": inter["input_blocks.3"]["0"]["__call__"][0],
      "input_blocks.3": inter["input_blocks.3"]["__call__"][0],
  }
  assert_close(inter["time_embed.2"]["__call__"][0], emb.numpy(), 1e-4, "time_embed")
  # attention acts
  assert float(torch.max(torch.abs(outputs["input_blocks.3"] - outputs["input_blocks.3.0"]))) > 1e-2
  for name, value in outputs.items():
    assert_close(nhwc_to_nchw(jax_outputs[name]), value.numpy(), 1e-4, name)


def test_safetensors_and_manifest_without_torch(random_variables, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # any import of torch on this path would now fail
  state = torch_export.midms_state_dict(random_variables, CONFIG, layout="minimal")
  path = torch_export.save_safetensors(tmp_path / "model.safetensors", state)
  manifest_path = torch_export.write_manifest(
      tmp_path / "export.json", CONFIG, 1234, {"model.safetensors": state}
  )
  with pytest.raises(ImportError, match="needs torch"):
    torch_export.save_midms_pth(tmp_path / "model.pth", state)

  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  loaded = load_file(path)
  assert set(loaded) == set(state)
  assert all(
      loaded[k].dtype == state[k].dtype and np.array_equal(loaded[k], state[k]) for k in state
  )
  manifest = json.loads(manifest_path.read_text())
  assert manifest["step"] == 1234 and manifest["config"] == json.loads(CONFIG.to_json_best_effort())
  assert set(manifest["files"]["model.safetensors"]["tensors"]) == set(state)
  for key, entry in manifest["files"]["model.safetensors"]["tensors"].items():
    assert entry == {
        "shape": list(loaded[key].shape),
        "dtype": loaded[key].dtype.name,
        "sha256": hashlib.sha256(loaded[key].tobytes()).hexdigest(),
    }, key
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "model.safetensors"]


WRITERS = {
    "pth": lambda path, state: torch_export.save_midms_pth(path, state),
    "ckpt": lambda path, state: torch_export.save_ldm_ckpt(path, state),
    "safetensors": torch_export.save_safetensors,
    "manifest": lambda path, state: torch_export.write_manifest(
        path, CONFIG, 0, {"model.pth": state}
    ),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_unwritable_directory_is_a_checkpoint_error(writer, tmp_path):
  blocker = tmp_path / "not_a_directory"
  blocker.write_text("a file where the export directory should be")
  target = blocker / "export" / "out.bin"
  with pytest.raises(CheckpointError) as excinfo:
    WRITERS[writer](target, {"w": np.ones((2, 3), np.float32)})
  assert str(target) in str(excinfo.value) and "\n" not in str(excinfo.value)
  assert [p.name for p in tmp_path.iterdir()] == ["not_a_directory"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  target = tmp_path / "epoch_3.pth"
  target.write_bytes(b"previous export")

  def disk_full(obj, f):
    pathlib.Path(f).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(torch, "save", disk_full)
  with pytest.raises(CheckpointError, match="No space left on device") as excinfo:
    torch_export.save_midms_pth(target, {"w": np.ones(3, np.float32)})
  assert str(target) in str(excinfo.value)
  assert target.read_bytes() == b"previous export"
  assert [p.name for p in tmp_path.iterdir()] == ["epoch_3.pth"]


def test_variables_that_do_not_fit_the_config_are_refused(random_variables):
  wider = celebahq.get_config("tiny")
  wider.model.unet.model_channels = 64
  with pytest.raises(
      ValueError, match="'unet' variables do not match the config.*input_blocks.0.0.bias"
  ):
    torch_export.ldm_state_dict(random_variables, wider)
  with pytest.raises(ValueError, match="layout"):
    torch_export.midms_state_dict(random_variables, CONFIG, layout="compact")
  with pytest.raises(ValueError, match="lack \\['correspondence'\\]"):
    torch_export.midms_state_dict(
        {"unet": random_variables["unet"], "first_stage": random_variables["first_stage"]}, CONFIG
    )
