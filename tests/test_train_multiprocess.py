"""Multi-host training: two processes on 127.0.0.1 form one JAX system (``jax.distributed``, gloo) and run the
real training CLI together: one global batch split over the hosts, one checkpoint, the same losses."""

import os
import pathlib
import re
import subprocess
import sys

import portpicker

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 2
# Warm-up steps only (matching, U-Net frozen): the cheaper of the two programs to compile. The image grid at
# the last step checks that every host takes part in the preview (process 0 alone would hang).
FLAGS = [f"--config={ROOT}/configs/synthetic.py", f"--config.train.num_steps={STEPS}",
         f"--config.train.warmup_iter={STEPS}", "--config.train.log_every=1", f"--config.train.checkpoint_every={STEPS}",
         f"--config.train.image_every={STEPS}", "--config.train.batch_size=2"]
LOSS_LINE = re.compile(r"step (\d+)/\d+ warm-up loss ([-+0-9.eE]+|nan|inf)")


def _losses(stderr: str) -> dict[int, str]:
  return {int(step): loss for step, loss in LOSS_LINE.findall(stderr)}


def test_two_processes_train_together_and_agree(tmp_path):
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device per process: the mesh spans the two processes
  procs = [subprocess.Popen([sys.executable, "-m", "midms_jax.train", *FLAGS, f"--workdir={tmp_path / 'run'}",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:  # a missing peer aborts the other process; a hang must not stall the suite
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for i, (proc, err) in enumerate(zip(procs, errors)):
    assert proc.returncode == 0, f"process {i}:\n{err[-3000:]}"
  losses = [_losses(err) for err in errors]
  assert sorted(losses[0]) == list(range(1, STEPS + 1)), errors[0][-3000:]
  assert losses[0] == losses[1]  # the global loss, the same on both hosts
  assert all(loss not in ("nan", "inf") for loss in losses[0].values())
  checkpoint = tmp_path / "run" / "checkpoints" / str(STEPS)
  assert (checkpoint / "_CHECKPOINT_METADATA").is_file() and (checkpoint / "state").is_dir()
  assert list((tmp_path / "run").glob("events.out.tfevents.*")), "process 0 wrote no TensorBoard events"
