"""The training job on the synthetic config: end to end, exact resume after SIGKILL, bad configs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import pytest

from midms_jax import train
from midms_jax.errors import CheckpointError, InputError
from tests.conftest import synthetic_train_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT = ["--config.train.num_steps=8", "--config.train.warmup_iter=3", "--config.train.log_every=1",
         "--config.train.checkpoint_every=4", "--config.train.image_every=0"]


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  """Last logged total loss per step (a resumed run logs the steps after its checkpoint again)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    out[record["step"]] = record["loss_total"]
  return out


def _run_cli(workdir: pathlib.Path, *extra: str, wait: bool = True):
  """The CLI in a subprocess (sharing the session's compilation cache, see conftest)."""
  cmd = [sys.executable, "-m", "midms_jax.train", f"--config={ROOT}/configs/synthetic.py", f"--workdir={workdir}",
         *SHORT, *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if wait:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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
  acc = event_accumulator.EventAccumulator(str(events[0]), size_guidance={"images": 0, "tensors": 0})
  acc.Reload()
  tags = acc.Tags()
  assert "loss_total" in tags["tensors"] + tags["scalars"]
  assert any("condition" in t for t in tags["tensors"] + tags["images"])


def test_exact_resume_after_sigkill_and_damaged_checkpoints(tmp_path):
  """Kill -9 after the step-4 checkpoint, rerun the same command: steps 5..8 equal an uninterrupted run
  bitwise. Then damage the newest checkpoint: the next run resumes from the older one, with a warning."""
  reference = tmp_path / "reference"
  out = _run_cli(reference)
  assert out.returncode == 0, out.stderr[-3000:]
  expected = _losses(reference)

  killed = tmp_path / "killed"
  proc = _run_cli(killed, wait=False)
  deadline = time.time() + 600
  while time.time() < deadline and not (killed / "checkpoints" / "4" / "_CHECKPOINT_METADATA").exists():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.1)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  out = _run_cli(killed)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step" in out.stderr
  resumed = _losses(killed)
  assert sorted(resumed) == sorted(expected)
  for step in range(5, 9):
    assert resumed[step] == expected[step], (step, resumed[step], expected[step])

  for f in (reference / "checkpoints" / "8" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"not a checkpoint")
  (reference / "metrics.jsonl").unlink()
  out = _run_cli(reference)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "checkpoint 8" in out.stderr and "unreadable" in out.stderr and "resumed from step 4" in out.stderr
  assert (reference / "checkpoints" / "damaged-8").is_dir()
  again = _losses(reference)
  assert sorted(again) == [5, 6, 7, 8] and all(again[s] == expected[s] for s in again)


def test_bad_configs_fail_before_compiling(tmp_path, monkeypatch):
  config = synthetic_train_config()
  config.checkpoints.midms = str(tmp_path / "missing.pth")
  with pytest.raises(CheckpointError, match=r"missing.pth: config.checkpoints.midms names a file that does not exist"):
    train.check_config(config)
  config = synthetic_train_config()
  config.loss.vgg = "vgg19"
  with pytest.raises(CheckpointError, match=r"config.loss.vgg_checkpoint must name CoCosNet's vgg19_conv.pth"):
    train.check_config(config)
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  with pytest.raises(InputError, match=r"batch_size=2 is not divisible by the 4 devices"):
    train.check_config(synthetic_train_config())


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
  out = _run_cli(tmp_path, f"--config.checkpoints.midms={tmp_path}/nope.pth")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == \
      f"error: {tmp_path}/nope.pth: config.checkpoints.midms names a file that does not exist"
