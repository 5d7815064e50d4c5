"""Multi-host training: two processes on localhost form one JAX system (``jax.distributed``, gloo)
and run the real training CLI together, started by ``launch/local_processes.py`` (the launch path a
user takes): one global batch split over the hosts, one checkpoint, the same losses."""

import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import BackgroundJob

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 2
# Warm-up steps only (matching, U-Net frozen): the cheaper of the two programs to compile. The image
# grid at the last step checks that every host takes part in the preview (process 0 alone would
# hang).
FLAGS = [
    f"--config={ROOT}/configs/synthetic.py:midms",
    "--config.checkpoints.ldm=",
    f"--config.train.num_steps={STEPS}",
    f"--config.train.warmup_iter={STEPS}",
    "--config.train.log_every=1",
    f"--config.train.checkpoint_every={STEPS}",
    f"--config.train.image_every={STEPS}",
    "--config.train.batch_size=2",
]


def _losses(output: str, process: int) -> dict[int, str]:
  """Warm-up losses that process ``process`` logged (its lines are prefixed ``[process] `` by the
  launcher)."""
  pattern = rf"^\[{process}\] .*step (\d+)/{STEPS} warm-up loss ([-+0-9.eE]+|nan|inf)$"
  return {int(step): loss for step, loss in re.findall(pattern, output, re.MULTILINE)}


def _train_two_processes(job: BackgroundJob) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
  """The two-host run of the test (a background job): its workdir and the launcher's result."""
  env = dict(job.environ)
  # the launcher gives each process one CPU device: the mesh spans the two processes
  env.pop("XLA_FLAGS", None)
  workdir = job.dir / "run"
  command = [
      sys.executable,
      str(ROOT / "launch" / "local_processes.py"),
      "--num_processes=2",
      "--devices_per_process=1",
      "--",
      sys.executable,
      "-m",
      "midms_jax.train",
      *FLAGS,
      f"--workdir={workdir}",
  ]
  # The launcher kills both processes when one fails; the timeout keeps a hang from stalling the
  # suite.
  return workdir, job.run(command, timeout=900, cwd=ROOT, env=env)


@pytest.mark.background(launcher=_train_two_processes)
def test_two_processes_train_together_and_agree(background):
  workdir, result = background()
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  losses = [_losses(result.stdout, i) for i in range(2)]
  assert sorted(losses[0]) == list(range(1, STEPS + 1)), result.stdout[-3000:]
  assert losses[0] == losses[1]  # the global loss, the same on both hosts
  assert all(loss not in ("nan", "inf") for loss in losses[0].values())
  checkpoint = workdir / "checkpoints" / str(STEPS)
  assert (checkpoint / "_CHECKPOINT_METADATA").is_file() and (checkpoint / "state").is_dir()
  assert list(workdir.glob("events.out.tfevents.*")), "process 0 wrote no TensorBoard events"
