"""Reading a training workdir: config round trip, model variables of a checkpoint, one-line
errors."""

import shutil

import jax
import numpy as np
import pytest

from configs import celebahq, deepfashion, lsun_church, synthetic
from midms_jax import train, workdir
from midms_jax.errors import CheckpointError
from tests.conftest import synthetic_train_config


@pytest.mark.parametrize(
    "config",
    [
        celebahq.get_config(),
        celebahq.get_config("cpu_small"),
        deepfashion.get_config(),
        lsun_church.get_config(),
        synthetic.get_config(),
    ],
    ids=lambda c: c.data.name,
)
def test_config_json_round_trips(config, tmp_path):
  workdir.write_config(tmp_path, config)
  back = workdir.read_config(tmp_path)
  assert back == config and back.to_json() == config.to_json()


def _leaves_equal(a, b) -> bool:
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
  return [p for p, _ in flat_a] == [p for p, _ in flat_b] and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
      for (_, x), (_, y) in zip(flat_a, flat_b)
  )


def test_load_trained_gives_the_checkpoint_without_optimiser_state(synthetic_run):
  run, _ = synthetic_run
  newest, older = workdir.load_trained(run), workdir.load_trained(run, step=3)
  expected = synthetic_train_config()  # the MIDMs stage started from the LDM stage's export
  expected.checkpoints.update(
      dict(ldm=str(run / "ldm" / "export" / "ldm.safetensors"), use_ema=True)
  )
  assert (newest.step, older.step) == (6, 3) and newest.config == expected
  assert sorted(newest.variables) == ["correspondence", "first_stage", "unet"]
  assert sorted(newest.variables["correspondence"]) == ["params", "spectral"]
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(newest.variables))
  initial = jax.device_get(
      train.initial_variables(newest.config, jax.random.PRNGKey(newest.config.train.seed))
  )
  # frozen: saved once, as it was
  assert _leaves_equal(newest.variables["first_stage"], initial["first_stage"])
  for part in ("unet", "correspondence"):  # same structure as the model's, but trained
    assert jax.tree_util.tree_structure(newest.variables[part]) == jax.tree_util.tree_structure(
        initial[part]
    )
    assert not _leaves_equal(newest.variables[part], older.variables[part])
  assert workdir.split_checkpoint_path(run / "checkpoints" / "3") == (run, 3)


def test_errors_name_the_path_in_one_line(synthetic_run, tmp_path):
  run, _ = synthetic_run
  cases = {
      "no such training workdir": lambda: workdir.load_trained(tmp_path / "nowhere"),
      "config.json: missing": lambda: workdir.load_trained(tmp_path),
      r"no checkpoint for step 4 \(available: 3, 6\)": lambda: workdir.load_trained(run, step=4),
      "not a training checkpoint directory": lambda: workdir.split_checkpoint_path(
          run / "first_stage"
      ),
      "no such checkpoint directory": lambda: workdir.split_checkpoint_path(
          run / "checkpoints" / "9"
      ),
  }
  for message, call in cases.items():
    with pytest.raises(CheckpointError, match=message) as excinfo:
      call()
    assert "\n" not in str(excinfo.value)

  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(run / "config.json", empty)
  with pytest.raises(CheckpointError, match="checkpoints: no checkpoints"):
    workdir.load_trained(empty)
  (empty / "checkpoints").mkdir()
  shutil.copytree(run / "checkpoints" / "6", empty / "checkpoints" / "6")
  with pytest.raises(CheckpointError, match="first_stage: missing"):
    workdir.load_trained(empty)
  for f in (empty / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"damaged")
  with pytest.raises(
      CheckpointError, match="checkpoints/6/state: unreadable checkpoint"
  ) as excinfo:
    workdir.load_trained(empty)
  assert "\n" not in str(excinfo.value)


def test_cloud_storage_workdirs_stay_urls(tmp_path, monkeypatch):
  """A pod's workdir is a bucket: ``gs://b/run`` must not become the local folder ``gs:/b/run``."""
  cloud = workdir.as_path("gs://bucket/runs/x")
  assert str(cloud / workdir.CHECKPOINTS_DIR) == "gs://bucket/runs/x/checkpoints"
  assert str(workdir._absolute(cloud / workdir.FIRST_STAGE_DIR)) == "gs://bucket/runs/x/first_stage"  # pylint: disable=protected-access
  monkeypatch.chdir(tmp_path)
  assert workdir.as_path("runs/x") == tmp_path / "runs" / "x"


def test_configs_of_older_runs_get_the_fields_added_since(tmp_path):
  """A config.json written before stage / dtype / remat / midms.warp_chunk / midms.inference existed
  loads with the values those runs used (they translated with their training loop)."""
  old = celebahq.get_config("tiny")
  old.midms.update(dict(ddim_steps=20, interleave_steps=5, loop_start_step=15, rewarp_steps=(1, 3)))
  del old["stage"], old["dtype"], old["remat"], old.midms["warp_chunk"], old.midms["inference"]
  workdir.write_config(tmp_path, old)
  back = workdir.read_config(tmp_path)
  assert (back.stage, back.dtype, back.remat, back.midms.warp_chunk) == (
      "midms",
      "float32",
      "none",
      0,
  )
  assert back.midms.inference.to_dict() == dict(
      ddim_steps=20, interleave_steps=5, loop_start_step=15, rewarp_steps=(1, 3)
  )


def test_a_checkpoint_with_non_finite_parameters_is_refused(tmp_path, capsys):
  """A checkpoint written before the NaN guard: ``load_trained`` (translate, export, evaluate)
  refuses it in one line; the export tool exits with 2 and writes nothing."""
  from midms_jax import export  # pylint: disable=import-outside-toplevel

  run = tmp_path / "run"
  run.mkdir()
  workdir.write_config(run, synthetic_train_config())
  workdir.save_first_stage(workdir.as_path(run), {})
  state = train.train_step.TrainState(
      step=np.int32(2),
      params={
          "unet": {"w": np.array([1.0, np.nan], np.float32)},
          "correspondence": {"v": np.ones(2, np.float32)},
      },
      spectral={"u": np.ones(2, np.float32)},
      opt_state={"mu": np.zeros(2, np.float32)},
  )
  manager = train.checkpoint_manager(workdir.as_path(run), keep=2)
  manager.save(
      2,
      args=train.ocp.args.Composite(
          state=train.ocp.args.StandardSave(state), data=train.ocp.args.JsonSave({})
      ),
  )
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(
      CheckpointError,
      match=r"checkpoints/2: holds non-finite parameters \(1 tensors, e.g. "
      r"params.unet.w\); pick an older checkpoint",
  ):
    workdir.load_trained(run)
  assert export.run(["export", f"--workdir={run}", f"--out={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "non-finite parameters" in err[0]
  assert not (tmp_path / "out").exists()
