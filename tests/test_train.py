"""The training job on the synthetic config: end to end, exact resume after SIGKILL, bad configs."""

import json
import os
import re
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

from configs import celebahq
from midms_jax import train, train_step
from midms_jax.errors import CheckpointError, InputError
from tests.conftest import SHORT_EVALUATE, SHORT_LDM, BackgroundJob, synthetic_train_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The CLI flags of tests.conftest.synthetic_train_config(): the CLI runs compile the same programs
# as the in-process session run (persistent cache) and reproduce its losses.
SHORT = [
    f"--config.train.{k}={v}"
    for k, v in synthetic_train_config().train.items()
    if k
    in ("batch_size", "num_steps", "warmup_iter", "log_every", "checkpoint_every", "image_every")
]
SHORT += [f"--config.ldm.{k}={v}" for k, v in SHORT_LDM.items()]
SHORT += [f"--config.evaluate.{k}={v}" for k, v in SHORT_EVALUATE.items()]


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  """Last logged total loss per step (a resumed run logs the steps after its checkpoint again)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    out[record["step"]] = record["loss_total"]
  return out


def _cli_args(workdir: pathlib.Path, *extra: str) -> list[str]:
  return [
      sys.executable,
      "-m",
      "midms_jax.train",
      f"--config={ROOT}/configs/synthetic.py",
      f"--workdir={workdir}",
      *SHORT,
      *extra,
  ]


def _cli_env(environ) -> dict[str, str]:
  """The CLI's environment: ``environ`` (with the session's compilation cache, see conftest) on CPU
  at the matmul precision conftest sets."""
  return dict(environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")


def test_synthetic_run_pretrains_the_ldm_then_starts_midms_from_its_export(synthetic_run):
  workdir, _ = synthetic_run
  ldm_dir = workdir / "ldm"
  assert sorted(_losses(ldm_dir)) == [2, 4]
  assert sorted(int(p.name) for p in (ldm_dir / "checkpoints").iterdir() if p.name.isdigit()) == [
      2,
      4,
  ]
  assert (ldm_dir / "first_stage" / "no_variables").is_file()  # pixel-unshuffle: nothing to save
  export = ldm_dir / "export" / "ldm.safetensors"
  config = json.loads((workdir / "config.json").read_text())
  assert config["checkpoints"]["ldm"] == str(export) and config["checkpoints"]["use_ema"]
  # The MIDMs stage's U-Net started from the export's EMA weights: its first checkpoint moved away
  # from them only by three warm-up steps, in which the U-Net is frozen.
  from midms_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from midms_jax.interop import torch_import  # pylint: disable=import-outside-toplevel

  exported = torch_import.load_ldm_checkpoint(
      export, workdir_lib.read_config(workdir).model, use_ema=True
  )
  warmed = workdir_lib.load_trained(workdir, step=3).variables
  for a, b in zip(
      jax.tree_util.tree_leaves(exported["unet"]), jax.tree_util.tree_leaves(warmed["unet"])
  ):
    assert jnp.array_equal(a, b)


def test_synthetic_run_ends_with_held_out_results_and_samples(synthetic_run):
  workdir, _ = synthetic_run
  results = json.loads((workdir / "results.json").read_text())
  assert results["pairs"] == SHORT_EVALUATE["results_pairs"] and results["step"] == 6
  assert sorted(results["methods"]) == ["exemplar", "initial_warp", "midms"]
  assert sorted(results["ablations"]) == ["no_confidence_masking", "no_rewarp"]
  for scores in [*results["methods"].values(), *results["ablations"].values()]:
    assert (
        sorted(scores) == ["lpips", "psnr"]
        and 0 <= scores["lpips"] < 2
        and 0 < scores["psnr"] < 100
    )
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(workdir / "samples.png") as samples:
    # condition | exemplar | warp | output | gt, the 4 pairs
    assert samples.size == (
        5 * 32,
        4 * 32,
    )
    grid = np.asarray(samples.convert("RGB"), np.float32) / 255
  # The condition column shows the class colours of the held-out conditions (synthetic.colourise).
  from midms_jax import held_out, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from midms_jax.data import synthetic  # pylint: disable=import-outside-toplevel

  batches = held_out.held_out_batches(workdir_lib.read_config(workdir), 4)
  labels = np.concatenate([b["label"] for b in batches])[:4]
  np.testing.assert_allclose(
      grid[:, :32], np.concatenate(synthetic.colourise(labels)), atol=1 / 255 + 1e-6
  )


def test_synthetic_run_goes_through_warmup_and_writes_everything(synthetic_run):
  workdir, metrics = synthetic_run
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 7))
  assert all(map(lambda v: v == v, losses.values()))  # finite (NaN stops training)
  assert metrics["loss_total"] == losses[6]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 6]
  assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 6
  assert (workdir / "first_stage").is_dir()
  events = list(workdir.glob("events.out.tfevents.*"))
  assert events, "no TensorBoard event file"
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel

  acc = event_accumulator.EventAccumulator(
      str(events[0]), size_guidance={"images": 0, "tensors": 0}
  )
  acc.Reload()
  tags = acc.Tags()
  assert "loss_total" in tags["tensors"] + tags["scalars"]
  assert any("condition" in t for t in tags["tensors"] + tags["images"])


def _kill_resume_and_damage(
    job: BackgroundJob,
) -> tuple[pathlib.Path, str, pathlib.Path, subprocess.CompletedProcess]:
  """The CLI runs of the resume test (a background job, so independent of the session run): kill -9
  a run after its step-3 checkpoint and rerun the same command; then damage checkpoint 6 of a copy
  of the finished run and run it again. Returns the killed run's workdir and rerun stderr, the
  damaged copy and its run. The killed run names its workdir relative to the current directory, as
  the README's command does."""
  killed = job.dir / "killed"
  env = _cli_env(job.environ)
  with job.popen(
      _cli_args(pathlib.Path("killed")),
      cwd=job.dir,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  ) as proc:
    deadline = time.time() + 600
    while time.time() < deadline and 3 not in train.workdir_lib.checkpoint_steps(killed):
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
  assert not (killed / "checkpoints" / "6").exists(), "the run finished before it could be killed"
  out = job.run(_cli_args(pathlib.Path("killed")), timeout=900, cwd=job.dir, env=env)
  assert out.returncode == 0, out.stderr[-3000:]

  damaged = job.dir / "damaged"
  shutil.copytree(killed, damaged)
  for f in (damaged / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"not a checkpoint")
  (damaged / "metrics.jsonl").unlink()
  return killed, out.stderr, damaged, job.run(_cli_args(damaged), timeout=900, cwd=ROOT, env=env)


@pytest.mark.background(launcher=_kill_resume_and_damage)
def test_exact_resume_after_sigkill_and_damaged_checkpoints(synthetic_run, background):
  """Kill -9 the CLI after the step-3 checkpoint, rerun the same command: steps 4..6 equal the
  uninterrupted session run bitwise. Then damage the newest checkpoint of a copy of that finished
  run: the next run resumes from the older one, with a warning, and again reproduces steps 4..6."""
  reference, _ = synthetic_run
  expected = _losses(reference)
  killed, resumed_stderr, damaged, out = background()
  assert "resumed from step" in resumed_stderr
  # Logs a person reads: INFO lines only from this project's files (orbax, TFDS, grain, JAX are
  # hidden).
  info = [
      line for line in resumed_stderr.replace("\r", "\n").splitlines() if re.match(r"I\d{4} ", line)
  ]
  assert info and all(re.search(r" (train|held_out|ldm)\.py:\d+\] ", line) for line in info), info
  resumed = _losses(killed)
  assert sorted(resumed) == sorted(expected)
  for step in range(4, 7):
    assert resumed[step] == expected[step], (step, resumed[step], expected[step])
  # The same training, resumed or not, ends with the same held-out results, to the last digit.
  assert (killed / "results.json").read_text() == (reference / "results.json").read_text()

  assert out.returncode == 0, out.stderr[-3000:]
  assert (
      "checkpoint 6" in out.stderr
      and "unreadable" in out.stderr
      and "resumed from step 3" in out.stderr
  )
  # stands out
  assert re.search(r"^warning: checkpoint 6 in .* is unreadable", out.stderr, re.MULTILINE)
  assert (damaged / "checkpoints" / "damaged-6").is_dir()
  again = _losses(damaged)
  assert sorted(again) == [4, 5, 6] and all(again[s] == expected[s] for s in again)


def test_bad_configs_fail_before_compiling(tmp_path, monkeypatch):
  config = synthetic_train_config()
  config.checkpoints.midms = str(tmp_path / "missing.pth")
  with pytest.raises(
      CheckpointError,
      match=r"missing.pth: config.checkpoints.midms names a file that does not exist",
  ):
    train.check_config(config)
  config = synthetic_train_config()
  config.loss.vgg = "vgg19"
  with pytest.raises(
      CheckpointError, match=r"config.loss.vgg_checkpoint must name CoCosNet's vgg19_conv.pth"
  ):
    train.check_config(config)
  unprepared = celebahq.get_config("tiny")
  unprepared.loss.vgg = "none"
  unprepared.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(
      InputError,
      match=r"no 'train' split of celebahq.*python -m midms_jax.data.prepare --dataset=celebahq",
  ):
    train.train_and_evaluate(unprepared, tmp_path / "workdir")
  assert not (tmp_path / "workdir").exists()
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  with pytest.raises(
      InputError, match=r"batch_size=2 must be a positive multiple of the 4 devices"
  ):
    train.check_config(synthetic_train_config())
  with pytest.raises(InputError, match=r"config.train.fsdp=3 must divide the 4 devices"):
    train.check_config(synthetic_train_config(batch_size=4, fsdp=3))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(train=dict(batch_size=0)),
            r"config.train.batch_size=0 must be a positive multiple of the 1 devices",
        ),
        (dict(ldm=dict(batch_size=-2)), r"config.ldm.batch_size=-2 must be a positive multiple"),
        (
            dict(train=dict(num_steps=-5), ldm=dict(num_steps=0)),
            r"config.ldm.num_steps=0 must be >= 1",
        ),
        (dict(train=dict(num_steps=-5)), r"config.train.num_steps=-5 must be >= 0"),
        (
            dict(train=dict(num_steps=0, epochs=0)),
            r"config.train.epochs=0 must be >= 1 when config.train.num_steps",
        ),
        (dict(train=dict(checkpoint_every=0)), r"config.train.checkpoint_every=0 must be >= 1"),
        (dict(ldm=dict(log_every=0)), r"config.ldm.log_every=0 must be >= 1"),
        (dict(train=dict(warmup_iter=-1)), r"config.train.warmup_iter=-1 must be >= 0"),
        (
            dict(midms=dict(loop_start_step=0)),
            r"config.midms.loop_start_step=0 with interleave_steps=3 needs hijack",
        ),
        (
            dict(midms=dict(inference=dict(rewarp_steps=(3,)))),
            r"config.midms.inference.rewarp_steps \[3\] outside the 3 loop steps",
        ),
        (
            dict(evaluate=dict(results_pairs=10**6)),
            r"results_pairs=1000000, but the validation split has \d+ records",
        ),
    ],
)
def test_preflight_stops_before_writing_anything(tmp_path, overrides, message):
  config = synthetic_train_config()
  for section, values in overrides.items():
    config[section].update(values)
  with pytest.raises(InputError, match=message):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_mis_shaped_pretrained_file_stops_before_any_model_is_built(
    tmp_path, monkeypatch, ldm_checkpoint_path
):
  """The official small LDM checkpoint against the synthetic config's U-Net: refused by the
  preflight's read of its keys and shapes (no random init compiled: build.init_variables is never
  called), nothing written.
  """
  monkeypatch.setattr(
      train.build, "init_variables", lambda *a, **k: pytest.fail("initialised a model")
  )
  config = synthetic_train_config("midms")
  config.checkpoints.ldm = str(ldm_checkpoint_path)
  with pytest.raises(CheckpointError, match=str(ldm_checkpoint_path)):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
  out = subprocess.run(
      _cli_args(tmp_path, f"--config.checkpoints.midms={tmp_path}/nope.pth"),
      cwd=ROOT,
      env=_cli_env(os.environ),
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )
  assert out.returncode == 2
  assert (
      out.stderr.strip().splitlines()[-1]
      == f"error: {tmp_path}/nope.pth: config.checkpoints.midms names a file that does not exist"
  )


def _scripted_steps(monkeypatch, loss_at, on_step=lambda step: None) -> None:
  """Replaces the compiled steps by a step that only counts and reports ``loss_at(step)``: the
  loop's control flow (logging, NaN stop, checkpoints, SIGTERM) without compiling a model."""

  def step(state, frozen, batch):
    del frozen, batch
    done = int(state.step) + 1
    on_step(done)
    loss = jnp.asarray(loss_at(done), jnp.float32)
    return state.replace(step=state.step + 1), {"loss_total": loss, "finite": jnp.isfinite(loss)}

  monkeypatch.setattr(
      train.train_step,
      "make_train_steps",
      lambda *args, **kwargs: train_step.StepFunctions(warmup=step, main=step),
  )


@pytest.mark.parametrize("log_every", [1, 3])
def test_non_finite_step_stops_and_names_the_last_verified_checkpoint(
    tmp_path, monkeypatch, log_every
):
  """The step's finiteness report is read at the next logging or saving step, whichever comes first:
  the checkpoint at step 4 (after the NaN of step 3) is never written, whatever log_every is."""
  _scripted_steps(monkeypatch, lambda step: float("nan") if step == 3 else 1.0)
  config = synthetic_train_config(
      "midms", num_steps=6, checkpoint_every=2, image_every=0, log_every=log_every
  )
  with pytest.raises(
      train.TrainingError,
      match=r"non-finite loss, gradient or parameters at step 3; the newest "
      r"checkpoint verified finite is step 2 in ",
  ):
    train.train_and_evaluate(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_non_finite_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
  _scripted_steps(monkeypatch, lambda step: float("inf"))
  config = synthetic_train_config(
      "midms", num_steps=4, checkpoint_every=2, image_every=0, log_every=1
  )
  with pytest.raises(
      train.TrainingError, match=r"at step 1; no checkpoint in .* is verified finite"
  ):
    train.train_and_evaluate(config, tmp_path)
  assert not list((tmp_path / "checkpoints").iterdir())


def test_the_save_path_refuses_a_non_finite_state(tmp_path):
  state = train_step.TrainState(
      step=jnp.int32(2), params={"w": jnp.array([1.0, jnp.nan])}, spectral={}, opt_state=()
  )
  manager = train.checkpoint_manager(epath.Path(tmp_path), keep=2)
  with pytest.raises(train.TrainingError, match=r"refusing to save step 2 .* non-finite"):
    train.save_checkpoint(manager, state, iterator=None)
  assert not list((tmp_path / "checkpoints").iterdir())


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, monkeypatch):
  before = signal.getsignal(signal.SIGTERM)
  preempt = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None
  _scripted_steps(monkeypatch, lambda step: 1.0, on_step=preempt)
  config = synthetic_train_config("midms", num_steps=5, checkpoint_every=10, image_every=0)
  with pytest.raises(train.Preempted, match=r"SIGTERM: saved step 2 .*exit status 143"):
    train.train_and_evaluate(config, tmp_path)
  # saved at once, then stopped
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  assert sorted(_losses(tmp_path)) == [1, 2]
  assert signal.getsignal(signal.SIGTERM) is before  # the job's handler is gone after it returns


def test_the_job_caches_compiled_programs_in_its_workdir(tmp_path):
  """``config.compilation_cache`` (default ``{workdir}/compilation_cache``): compiled programs are
  written there, so a resumed run loads them; "" turns the cache off, and a directory the user gave
  JAX is kept."""
  session = (
      jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  config = celebahq.get_config("tiny")
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    assert (
        train.use_compilation_cache(config, epath.Path(tmp_path)) == f"{tmp_path}/compilation_cache"
    )
    jax.jit(lambda x: jnp.sin(x) * 3.25 + 1.5).lower(jnp.ones(7)).compile()
    assert any(name.endswith("-cache") for name in os.listdir(tmp_path / "compilation_cache"))
    assert (
        train.use_compilation_cache(config, epath.Path(tmp_path / "b"))
        == f"{tmp_path}/b/compilation_cache"
    )
    config.compilation_cache = ""
    assert train.use_compilation_cache(config, epath.Path(tmp_path)) is None
    assert jax.config.jax_compilation_cache_dir is None
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    config.compilation_cache = "{workdir}/compilation_cache"
    assert train.use_compilation_cache(config, epath.Path(tmp_path)) == str(tmp_path / "mine")
  finally:
    jax.config.update("jax_compilation_cache_dir", session[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", session[1])
    compilation_cache.reset_cache()
    train._cache_dir_set_here = None  # pylint: disable=protected-access


class _Iterator:
  """The part of the data iterator the checkpoint functions use."""

  def __init__(self):
    self.state = {
        k: 0 for k in ("data", "split", "seed", "global_batch_size", "train", "next_batch")
    }

  def get_state(self):
    return dict(self.state)

  def set_state(self, state):
    self.state = state


def _small_state(step: int, width: int = 3, value: float = 1.0) -> train_step.TrainState:
  return train_step.TrainState(
      step=jnp.int32(step),
      params={"w": jnp.full((2, width), value)},
      spectral={"u": jnp.ones(2)},
      opt_state=(),
  )


def _saved(tmp_path, steps=(2, 4)) -> tuple[epath.Path, dict[str, bytes]]:
  """A workdir with small checkpoints at ``steps``, and the bytes of every file in it."""
  workdir = epath.Path(tmp_path)
  manager = train.checkpoint_manager(workdir, keep=5)
  for step in steps:
    train.save_checkpoint(manager, _small_state(step, value=step), _Iterator())
  manager.wait_until_finished()
  manager.close()
  return workdir, _file_bytes(tmp_path)


def _file_bytes(root) -> dict[str, bytes]:
  return {
      str(p.relative_to(root)): p.read_bytes() for p in pathlib.Path(root).rglob("*") if p.is_file()
  }


def _restore(workdir: epath.Path, state) -> tuple[object, int]:
  manager = train.checkpoint_manager(workdir, keep=5)
  try:
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return train.restore_checkpoint(manager, abstract, _Iterator())
  finally:
    manager.close()


def test_a_checkpoint_of_another_model_is_refused_and_left_in_place(tmp_path):
  workdir, before = _saved(tmp_path)
  with pytest.raises(
      CheckpointError,
      match=r"checkpoints/4: holds another model or optimiser than the config "
      r"builds \(params.w is \(2, 3\) in the checkpoint, \(2, 5\) in the config",
  ):
    _restore(workdir, _small_state(0, width=5))
  assert _file_bytes(tmp_path) == before


def test_a_storage_error_is_not_taken_for_damage(tmp_path, monkeypatch):
  workdir, before = _saved(tmp_path)

  def unavailable(*args, **kwargs):
    raise ValueError("UNAVAILABLE: the bucket did not answer")

  monkeypatch.setattr(train.ocp.CheckpointManager, "restore", unavailable)
  with pytest.raises(
      CheckpointError,
      match=r"checkpoints/4: could not be read \(UNAVAILABLE: .*nothing was changed",
  ):
    _restore(workdir, _small_state(0))

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(train.ocp.CheckpointManager, "restore", denied)
  with pytest.raises(CheckpointError, match=r"could not be read"):
    _restore(workdir, _small_state(0))
  assert _file_bytes(tmp_path) == before


def test_damaged_files_are_set_aside_and_the_older_checkpoint_restored(tmp_path):
  workdir, _ = _saved(tmp_path)
  for f in (pathlib.Path(tmp_path) / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"not a checkpoint")
  state, step = _restore(workdir, _small_state(0))
  assert step == 2 and float(state.params["w"][0, 0]) == 2.0
  assert (pathlib.Path(tmp_path) / "checkpoints" / "damaged-4").is_dir()
  for f in (pathlib.Path(tmp_path) / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"not a checkpoint")
  with pytest.raises(
      CheckpointError, match=r"every checkpoint is damaged .* remove them or use a new --workdir"
  ):
    _restore(workdir, _small_state(0))
  # never silently from step 0
  with pytest.raises(CheckpointError, match=r"every checkpoint is damaged"):
    _restore(workdir, _small_state(0))


def test_a_non_finite_checkpoint_of_an_older_version_is_not_resumed(tmp_path):
  workdir = epath.Path(tmp_path)
  manager = train.checkpoint_manager(workdir, keep=5)
  state = _small_state(2, value=float("nan"))
  manager.save(
      2,
      args=train.ocp.args.Composite(
          state=train.ocp.args.StandardSave(state),
          data=train.ocp.args.JsonSave(_Iterator().get_state()),
      ),
  )
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(CheckpointError, match=r"checkpoints/2: holds non-finite values .* delete it"):
    _restore(workdir, _small_state(0))


def test_resume_contract_allows_the_documented_fields_and_names_the_others(tmp_path):
  recorded = synthetic_train_config()
  stages = train.plan_stages(recorded, epath.Path(tmp_path))
  for stage in stages:
    stage.workdir.mkdir(parents=True, exist_ok=True)
    train.workdir_lib.write_config(stage.workdir, stage.config)
  longer = synthetic_train_config(num_steps=60, log_every=7)
  longer.data.worker_count = 4
  longer.evaluate.results_pairs = 16
  # allowed
  train.check_resume(train.plan_stages(longer, epath.Path(tmp_path)), epath.Path(tmp_path))
  # a copied run: its {workdir} paths moved with it
  moved = tmp_path.parent / f"{tmp_path.name}-moved"
  shutil.copytree(tmp_path, moved)
  train.check_resume(train.plan_stages(longer, epath.Path(moved)), epath.Path(moved))
  changed = synthetic_train_config(lr=1e-3)
  changed.model.correspondence.width = 64
  with pytest.raises(
      InputError,
      match=r"ldm/config.json: this run was started with another config: "
      r"model.correspondence.width \(32 -> 64\), train.lr \(.* -> 0.001\); use a new "
      r"--workdir, or resume with --allow_config_changes=model.correspondence.width,"
      r"train.lr to",
  ):
    train.check_resume(train.plan_stages(changed, epath.Path(tmp_path)), epath.Path(tmp_path))
  train.check_resume(
      train.plan_stages(changed, epath.Path(tmp_path)),
      epath.Path(tmp_path),
      ("model.correspondence.width", "train.lr"),
  )


def test_cli_resume_with_another_model_changes_nothing(synthetic_run, tmp_path):
  """Item 1 of issue 22: a finished workdir rerun with another correspondence width. Refused in one
  line before anything is read; with the change allowed, refused again when the checkpoint's shapes
  are compared (it is not set aside as damaged, and config.json keeps the run's identity)."""
  reference, _ = synthetic_run
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  before = _file_bytes(workdir)
  out = subprocess.run(
      _cli_args(workdir, "--config.model.correspondence.width=64"),
      cwd=ROOT,
      env=_cli_env(os.environ),
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      f"error: {workdir}/ldm/config.json: this run was started with another config: "
      "model.correspondence.width "
      "(32 -> 64); use a new --workdir, or resume with "
      "--allow_config_changes=model.correspondence.width to train "
      "on with the new values"
  ]
  assert _file_bytes(workdir) == before
  config = synthetic_train_config()
  config.model.correspondence.width = 64
  with pytest.raises(
      CheckpointError,
      match=r"checkpoints/6: holds another model or optimiser than the config "
      r"builds \(params.correspondence.* in the checkpoint",
  ):
    train.train_and_evaluate(config, workdir, allow_config_changes=("model.correspondence.width",))
  assert _file_bytes(workdir) == before


def _run_cli_cases(cases: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
  """The training CLI with each case's extra arguments, run side by side (each stops in its
  preflight)."""
  procs = {
      name: subprocess.Popen(
          args,
          cwd=ROOT,
          env=_cli_env(os.environ),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for name, args in cases.items()
  }
  results = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  return results


def test_cli_mistakes_are_one_line(tmp_path):
  """Items 3 and 5 of issue 22 for the training job: each mistake is one ``error:`` line, exit
  status 2, and the workdir is not created."""
  (tmp_path / "a_file").write_text("")
  workdir = tmp_path / "run"
  cases = {
      "override": (
          _cli_args(workdir, "--config.train.nonexistent=1"),
          r"--config.train.nonexistent",
      ),
      "config": (
          [
              sys.executable,
              "-m",
              "midms_jax.train",
              f"--config={tmp_path}/nope.py",
              f"--workdir={workdir}",
          ],
          r"--config.*nope.py",
      ),
      "workdir": (
          _cli_args(tmp_path / "a_file" / "run"),
          r"a_file/run: --workdir lies under .*a_file, which is a file",
      ),
      "batch": (
          _cli_args(workdir, "--config.train.batch_size=0"),
          r"config.train.batch_size=0 must be a positive multiple of the 1 devices",
      ),
      "no_workdir": (
          [sys.executable, "-m", "midms_jax.train", f"--config={ROOT}/configs/synthetic.py"],
          r"--workdir is required",
      ),
  }
  results = _run_cli_cases({name: args for name, (args, _) in cases.items()})
  for name, (_, message) in cases.items():
    out = results[name]
    assert out.returncode == 2, (name, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), (
        name,
        lines,
    )
  assert not workdir.exists()
