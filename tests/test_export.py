"""``python -m midms_jax.export`` on a checkpoint of a short synthetic training run: the files, the
exact round trip back into JAX, identical translations, and one-line errors for bad input."""

import hashlib
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from midms_jax import export, translate, workdir
from midms_jax.data import images, synthetic
from midms_jax.interop import torch_import
from tests.conftest import synthetic_train_config

torch = pytest.importorskip("torch")
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(synthetic_run, tmp_path_factory):
  run, _ = synthetic_run
  out = tmp_path_factory.mktemp("export") / "out"
  assert export.run(["export", f"--workdir={run}", f"--out={out}"]) == 0
  return run, out


def _same(a, b) -> None:
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(
        x, y
    ), jax.tree_util.keystr(path)


def test_files_and_manifest(exported):
  run, out = exported
  assert sorted(p.name for p in out.iterdir()) == sorted(export.FILES)
  assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
  manifest = json.loads((out / "export.json").read_text())
  assert manifest["step"] == 6 and manifest["config"] == json.loads(
      (run / "config.json").read_text()
  )
  pth = torch.load(out / "midms.pth", map_location="cpu", weights_only=True)
  assert pth["epoch"] == 0  # 6 steps of a 50,000-step epoch
  ckpt = torch.load(out / "ldm.ckpt", map_location="cpu", weights_only=True)
  assert ckpt["global_step"] == 6
  for name, state in (("midms", pth["state_dict"]), ("ldm", ckpt["state_dict"])):
    tensors = load_file(out / f"{name}.safetensors")
    listed = manifest["files"][f"{name}.safetensors"]["tensors"]
    assert (
        set(tensors) == set(state) == set(listed)
        and manifest["files"][f"{name}.{'pth' if name == 'midms' else 'ckpt'}"]["tensors"] == listed
    )
    for key, value in state.items():
      assert np.array_equal(tensors[key], value.numpy()), key
      assert listed[key]["sha256"] == hashlib.sha256(tensors[key].tobytes()).hexdigest(), key
  # the full official layout
  assert any(k.startswith("diffusion_sampler.model.") for k in pth["state_dict"])
  # The synthetic run (pixel-unshuffle first stage, own data set): nothing the official code loads.
  official = manifest["official_code"]
  assert official["data_set"] == "synthetic"
  assert set(official["files"]) == set(export.FILES) - {"export.json"}
  assert not any(entry["loads"] for entry in official["files"].values())
  why_not = official["files"]["midms.pth"]["why_not"]
  assert "first stage 'pixel_shuffle' is not an LDM autoencoder" in why_not[0]
  assert len({(out / name).stat().st_mode for name in export.FILES}) == 1  # one file mode for all


def test_import_of_the_export_is_the_checkpoint(exported):
  run, out = exported
  trained = workdir.load_trained(run)
  _same(
      torch_import.load_midms_checkpoint(out / "midms.pth", trained.config.model), trained.variables
  )
  _same(
      torch_import.load_ldm_checkpoint(out / "ldm.ckpt", trained.config.model),
      {k: trained.variables[k] for k in ("unet", "first_stage")},
  )


def test_translations_from_workdir_and_export_are_identical(exported, tmp_path):
  run, out = exported
  sample = synthetic.sample(0, synthetic.SyntheticConfig(image_size=32), "validation")
  np.save(tmp_path / "c.npy", sample["label"])
  np.save(tmp_path / "e.npy", sample["label_ref"])
  images.save_image(tmp_path / "e.png", sample["ref"], "png")
  pair = [
      f"--condition={tmp_path / 'c.npy'}",
      f"--exemplar={tmp_path / 'e.png'}",
      f"--exemplar_condition={tmp_path / 'e.npy'}",
  ]
  synthetic_config = f"--config={translate.DEFAULT_CONFIG.with_name('synthetic.py')}"
  runs = {
      "workdir": [f"--workdir={run}"],
      "step3": [f"--workdir={run}", "--step=3"],
      "export": [synthetic_config, f"--midms_checkpoint={out / 'midms.pth'}"],
  }
  pixels = {}
  for name, source in runs.items():
    assert translate.run(["translate", *source, *pair, f"--output={tmp_path / name}.png"]) == 0
    with Image.open(tmp_path / f"{name}.png") as image:
      pixels[name] = np.asarray(image)
  assert np.array_equal(pixels["workdir"], pixels["export"])
  # the weights, not the inputs, decide
  assert not np.array_equal(pixels["workdir"], pixels["step3"])


def test_without_torch_only_safetensors(exported, tmp_path, monkeypatch, capsys):
  run, _ = exported
  monkeypatch.setitem(sys.modules, "torch", None)
  assert (
      export.run(
          [
              "export",
              f"--checkpoint={run / 'checkpoints' / '3'}",
              "--official_layout=minimal",
              f"--out={tmp_path}",
          ]
      )
      == 0
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "export.json",
      "ldm.safetensors",
      "midms.safetensors",
  ]
  assert "torch is not installed" in capsys.readouterr().out
  assert json.loads((tmp_path / "export.json").read_text())["step"] == 3
  assert not any(
      k.startswith("diffusion_sampler.") for k in load_file(tmp_path / "midms.safetensors")
  )


def test_bad_input_exits_2_with_one_line_and_writes_nothing(exported, tmp_path, capsys):
  run, _ = exported
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  (tmp_path / "untrained").mkdir()
  (tmp_path / "untrained" / "config.json").write_text((run / "config.json").read_text())
  cases = {
      "no checkpoints": [f"--workdir={tmp_path / 'untrained'}", f"--out={tmp_path / 'o1'}"],
      "no checkpoint for step 5 (available: 3, 6)": [
          f"--workdir={run}",
          "--step=5",
          f"--out={tmp_path / 'o2'}",
      ],
      "cannot write the export there": [f"--workdir={run}", f"--out={blocker / 'out'}"],
      "--out is required": [f"--workdir={run}"],
      "pass --workdir": [f"--out={tmp_path / 'o3'}"],
      "leave out --workdir": [
          f"--workdir={run}",
          f"--checkpoint={run / 'checkpoints' / '3'}",
          f"--out={tmp_path}",
      ],
  }
  for message, args in cases.items():
    assert export.run(["export", *args]) == 2, message
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "untrained"]
  assert synthetic_train_config().train.num_steps == 6  # the run these tests read


def _damaged_copy(run, root):
  """A copy of the run's config, first stage and step-6 checkpoint, every array data file
  overwritten (the metadata stays readable: the restore fails in its array reads, whichever file
  holds the model's arrays)."""
  import shutil  # pylint: disable=import-outside-toplevel

  copy = root / "damaged"
  copy.mkdir()
  shutil.copy(run / "config.json", copy / "config.json")
  shutil.copytree(run / "first_stage", copy / "first_stage")
  shutil.copytree(run / "checkpoints" / "6", copy / "checkpoints" / "6")
  state = copy / "checkpoints" / "6" / "state"
  data = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data, sorted(str(p.relative_to(state)) for p in state.rglob("*"))
  for path in data:
    path.write_bytes(b"\0garbage" * 100)
  return copy


def test_damaged_checkpoint_is_one_line_in_a_subprocess(exported, tmp_path):
  """export and translate as a user runs them: the error line only, none of the "Event loop is
  closed" tracebacks of orbax's reads that finish after the failed restore (about half the runs
  had them)."""
  run, _ = exported
  damaged = _damaged_copy(run, tmp_path)
  sample = synthetic.sample(0, synthetic.SyntheticConfig(image_size=32), "validation")
  np.save(tmp_path / "c.npy", sample["label"])
  images.save_image(tmp_path / "e.png", sample["ref"], "png")
  commands = {
      "export": ["-m", "midms_jax.export", f"--workdir={damaged}", f"--out={tmp_path / 'out'}"],
      "translate": [
          "-m",
          "midms_jax.translate",
          f"--workdir={damaged}",
          f"--condition={tmp_path / 'c.npy'}",
          f"--exemplar={tmp_path / 'e.png'}",
          f"--exemplar_condition={tmp_path / 'c.npy'}",
          f"--output={tmp_path / 'out.png'}",
      ],
  }
  for name, args in commands.items():
    for _ in range(2):
      done = subprocess.run(
          [sys.executable, *args],
          cwd=REPO,
          capture_output=True,
          text=True,
          timeout=300,
          check=False,
      )
      assert done.returncode == 2, (name, done.stderr)
      state = damaged / "checkpoints" / "6" / "state"
      assert done.stderr.startswith(f"error: {state}: unreadable checkpoint: "), done.stderr
      assert done.stderr.count("\n") == 1, (name, done.stderr)
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.png").exists()


def test_translate_overrides_apply_to_the_workdirs_config(exported, tmp_path, capsys):
  """--config.<field> with --workdir changes the run's config.json (here to a value the model
  refuses)."""
  run, _ = exported
  sample = synthetic.sample(0, synthetic.SyntheticConfig(image_size=32), "validation")
  np.save(tmp_path / "c.npy", sample["label"])
  images.save_image(tmp_path / "e.png", sample["ref"], "png")
  pair = [
      f"--condition={tmp_path / 'c.npy'}",
      f"--exemplar={tmp_path / 'e.png'}",
      f"--exemplar_condition={tmp_path / 'c.npy'}",
      f"--output={tmp_path / 'out.png'}",
  ]
  cases = (
      ("--config.attention_chunk=-1", "error: the config: config.attention_chunk must be >= 0"),
      (
          "--config.midms.nonexistent=1",
          "error: --config.midms.nonexistent: config has no field 'nonexistent' in midms",
      ),
  )
  for override, message in cases:
    assert translate.run(["translate", f"--workdir={run}", *pair, override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
  assert not (tmp_path / "out.png").exists()


# ------------------------------------------------------------------------------------------------
# What the official code can load (unit level: configs only, no training run)
# ------------------------------------------------------------------------------------------------


def test_official_configs_export_files_the_official_code_loads():
  from configs import celebahq, deepfashion, lsun_church  # pylint: disable=import-outside-toplevel

  for module in (celebahq, deepfashion, lsun_church):
    result = export.official_loadability(module.get_config("paper"))
    assert result["differences"] == [] and result["official_config"].startswith("configs/")
    for name in ("midms.pth", "ldm.ckpt"):
      assert result["files"][name]["loads"], (module.__name__, name, result["files"][name])
    assert "strict=False" in result["files"]["midms.pth"]["by"]
    assert not result["files"]["midms.safetensors"]["loads"]


def test_other_widths_are_listed_field_by_field():
  from configs import celebahq  # pylint: disable=import-outside-toplevel

  result = export.official_loadability(celebahq.get_config("tiny"))
  assert "model.unet.model_channels: 32 (official 224)" in result["differences"]
  assert "model.correspondence.width: 32 (official 256)" in result["differences"]
  midms_pth, ldm_ckpt = result["files"]["midms.pth"], result["files"]["ldm.ckpt"]
  assert not midms_pth["loads"] and not ldm_ckpt["loads"]
  assert "differ from the official configs/celebahq.py" in midms_pth["why_not"][0]
  assert "model.correspondence." not in ldm_ckpt["why_not"][0]  # the LDM file has no matching nets


def test_shapeless_and_schedule_differences_still_load_with_a_note():
  from configs import lsun_church  # pylint: disable=import-outside-toplevel

  config = lsun_church.get_config()
  config.model.unet.dropout = 0.1
  config.diffusion.linear_end = 0.0195
  result = export.official_loadability(config, layout="minimal")
  assert result["differences"] == [
      "model.unet.dropout: 0.1 (official 0.0)",
      "diffusion.linear_end: 0.0195 (official 0.0155)",
  ]
  entry = result["files"]["midms.pth"]
  assert entry["loads"] and "runs this run's schedule" in entry["notes"][0]
  assert "strict=True" in entry["notes"][1] and "diffusion_sampler.model.*" in entry["notes"][1]


def test_synthetic_run_is_refused_with_reasons_and_one_warning(caplog):
  from configs import synthetic as synthetic_config  # pylint: disable=import-outside-toplevel

  result = export.official_loadability(synthetic_config.get_config())
  assert result["official_config"] is None
  assert result["files"]["ldm.ckpt"]["why_not"] == [
      "first stage 'pixel_shuffle' is not an LDM autoencoder (official: VQModelInterface or "
      "AutoencoderKL)",
      "data set 'synthetic' has no official MIDMs model (official: celebahq, deepfashion, "
      "lsun_church)",
  ]
  written = ["midms.pth", "ldm.ckpt", "midms.safetensors"]
  with caplog.at_level("WARNING"):
    export._warn_unloadable(pathlib.Path("out"), result, written)  # pylint: disable=protected-access
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert warnings[0].startswith(
      "out: the official PyTorch code cannot load midms.pth or ldm.ckpt: "
      "first stage 'pixel_shuffle'"
  )
