"""launch/: the commands each script prints with --dry_run and runs otherwise (gcloud, sbatch, srun
and the training Python replaced by recording fakes), one-line argument errors, the automatic
jax.distributed set-up of midms_jax.train. Two CPU processes really training together through
launch/local_processes.py: tests/test_train_multiprocess.py."""

import json
import os
import pathlib
import re
import shlex
import stat
import subprocess
import sys

import pytest

from midms_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CONFIG = ROOT / "configs" / "synthetic.py"
SLICE = ["--tpu_name=pod", "--zone=us-central1-a"]
# tests/test_train_multiprocess.py's flags: warm-up steps only, a checkpoint and a preview at the
# last one.


def _launch(
    script: str,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: pathlib.Path = ROOT,
    timeout: float = 60,
) -> subprocess.CompletedProcess:
  # the launchers pass XLA_FLAGS on: start from none (tests/conftest.py set some here)
  if env is None:
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
  return subprocess.run(
      [sys.executable, str(LAUNCH / script), *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def _with_dry_run(args: tuple[str, ...]) -> list[str]:
  """``args`` and --dry_run, which goes before the command that follows ``--``."""
  split = args.index("--") if "--" in args else len(args)
  return [*args[:split], "--dry_run", *args[split:]]


def _dry_run(script: str, *args: str) -> list[list[str]]:
  """The printed commands, each split as the shell would."""
  result = _launch(script, *_with_dry_run(args))
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


# A fake program: logs its name, its arguments and the variables named in FAKE_ENV to FAKE_LOG, then
# runs a body.
FAKE_PROGRAM = """#!{python}
import json, os, subprocess, sys
env = {{name: os.environ.get(name) for name in os.environ.get("FAKE_ENV", "").split()}}
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(dict(program=os.path.basename(sys.argv[0]), argv=sys.argv[1:], env=env)) + "\\n")
"""


def _fake_program(path: pathlib.Path, body: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(FAKE_PROGRAM.format(python=sys.executable) + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def _fake_log(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------------------------------
# midms_jax.train.initialize_distributed
# --------------------------------------------------------------------------------------------------

FLAG_VALUES = ("10.0.0.1:8476", 4, 1)


# the flags win
@pytest.mark.parametrize(
    "flags, env, expected",
    [
        (FLAG_VALUES, {}, [FLAG_VALUES]),
        (
            FLAG_VALUES,
            {"TPU_WORKER_HOSTNAMES": "t0,t1", "SLURM_NTASKS": "8"},
            [FLAG_VALUES],
        ),
        ((None, None, None), {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, [()]),  # multi-host TPU slice
        ((None, None, None), {"TPU_WORKER_HOSTNAMES": "t0"}, []),  # one TPU host
        ((None, None, None), {"SLURM_NTASKS": "16"}, [()]),  # srun with several tasks
        ((None, None, None), {"SLURM_NTASKS": "1"}, []),  # one task: one process, all of its GPUs
        ((None, None, None), {"SLURM_NTASKS": ""}, []),
        ((None, None, None), {}, []),
    ],
)
def test_initialize_distributed_from_flags_tpu_or_slurm(monkeypatch, flags, env, expected):
  calls = []
  monkeypatch.setattr(train.jax.distributed, "initialize", lambda *args: calls.append(args))
  for name in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  train.initialize_distributed(*flags)
  assert calls == expected


# --------------------------------------------------------------------------------------------------
# tpu_pod.py
# --------------------------------------------------------------------------------------------------


def test_tpu_pod_create_and_delete_dry_run():
  [create] = _dry_run(
      "tpu_pod.py",
      "create",
      *SLICE,
      "--accelerator_type=v5litepod-64",
      "--runtime_version=v2-alpha-tpuv5-lite",
      "--project=proj",
      "--spot",
  )
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
  assert {
      "--accelerator-type=v5litepod-64",
      "--version=v2-alpha-tpuv5-lite",
      "--zone=us-central1-a",
      "--project=proj",
      "--spot",
  } <= set(create[6:])
  [delete] = _dry_run("tpu_pod.py", "delete", *SLICE)
  assert delete == [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "delete",
      "pod",
      "--quiet",
      "--zone=us-central1-a",
  ]


def test_tpu_pod_install_dry_run_copies_the_checkout_to_every_worker():
  archive, scp, ssh = _dry_run("tpu_pod.py", "install", *SLICE, "--ref=v1.0")
  assert (
      archive[:3] == ["git", "-C", str(ROOT)] and archive[3] == "archive" and archive[-1] == "v1.0"
  )
  local_archive = archive[archive.index("archive") + 2].removeprefix("--output=")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [local_archive, "pod:midms-jax.tar.gz"] and "--worker=all" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in ssh
  [remote] = [arg.removeprefix("--command=") for arg in ssh if arg.startswith("--command=")]
  assert "tar -xzf midms-jax.tar.gz -C midms-jax" in remote
  assert "python3.11 -m venv midms-jax/.venv" in remote
  assert 'midms-jax/.venv/bin/pip install -q -e midms-jax "jax[tpu]' in remote


def test_tpu_pod_jax_requirement_is_setup_pys():
  tpu_pod = (LAUNCH / "tpu_pod.py").read_text()
  setup_range = re.search(r'"jax(>=[^"]+)"', (ROOT / "setup.py").read_text()).group(1)
  assert f'JAX_TPU = "jax[tpu]{setup_range}"' in tpu_pod


def test_tpu_pod_run_dry_run_runs_the_same_training_on_every_worker(tmp_path):
  own_config = tmp_path / "my_config.py"
  own_config.write_text(CONFIG.read_text())
  scp, ssh = _dry_run(
      "tpu_pod.py",
      "run",
      *SLICE,
      f"--config={own_config}:tiny",
      "--bucket=bkt",
      "--config.train.batch_size=256",
      "--config.train.lr",
      "1e-5",
  )
  assert scp[5:7] == [str(own_config), "pod:midms-jax/my_config.py"] and "--worker=all" in scp
  assert "--worker=all" in ssh
  [remote] = [arg.removeprefix("--command=") for arg in ssh if arg.startswith("--command=")]
  assert remote.startswith(
      "set -o pipefail; cd midms-jax && .venv/bin/python -m midms_jax.train "
      "--config=my_config.py:tiny --workdir=gs://bkt/runs/pod "
      "--config.train.batch_size=256 --config.train.lr 1e-5 2>&1 | tee -a train.log"
  )
  # A config of this checkout keeps its path; --workdir names the bucket path itself; --background
  # detaches.
  scp, ssh = _dry_run(
      "tpu_pod.py", "run", *SLICE, f"--config={CONFIG}", "--workdir=gs://bkt/df", "--background"
  )
  assert scp[6] == "pod:midms-jax/configs/synthetic.py"
  assert ssh[7] == (
      "--command=cd midms-jax && setsid nohup .venv/bin/python -m midms_jax.train "
      "--config=configs/synthetic.py --workdir=gs://bkt/df >> train.log 2>&1 < /dev/null &"
  )


def test_tpu_pod_run_executes_through_gcloud_on_the_workers(tmp_path):
  """A fake gcloud whose scp copies into a fake worker home and whose ssh runs the command there
  with bash: the config arrives, the training command gets every argument intact, its output lands
  in the log and its exit status comes back."""
  home, bin_dir, log = tmp_path / "home", tmp_path / "bin", tmp_path / "calls.jsonl"
  _fake_program(
      bin_dir / "gcloud",
      (
          "home, verb = os.environ['FAKE_HOME'], sys.argv[4]\n"
          "if verb == 'scp':\n"
          "  target = os.path.join(home, sys.argv[6].split(':', 1)[1])\n"
          "  os.makedirs(os.path.dirname(target), exist_ok=True)\n"
          "  open(target, 'w').write(open(sys.argv[5]).read())\n"
          "elif verb == 'ssh':\n"
          "  [command] = [a[len('--command='):] for a in sys.argv if a.startswith('--command=')]\n"
          "  sys.exit(subprocess.run(['bash', '-c', command], cwd=home).returncode)\n"
      ),
  )
  _fake_program(
      home / "midms-jax" / ".venv" / "bin" / "python",
      "print('training output')\nsys.exit(int(os.environ.get('FAKE_STATUS', '0')))\n",
  )
  env = dict(
      os.environ,
      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
      FAKE_HOME=str(home),
      FAKE_LOG=str(log),
  )
  args = [
      "run",
      *SLICE,
      f"--config={CONFIG}",
      "--workdir=gs://bkt/run 1",
      "--config.data.data_dir=/data/my tfds",
  ]
  result = _launch("tpu_pod.py", *args, env=env)
  assert result.returncode == 0, result.stderr
  calls = _fake_log(log)
  assert [call["program"] for call in calls] == ["gcloud", "gcloud", "python"]
  assert calls[2]["argv"] == [
      "-m",
      "midms_jax.train",
      "--config=configs/synthetic.py",
      "--workdir=gs://bkt/run 1",
      "--config.data.data_dir=/data/my tfds",
  ]
  assert (home / "midms-jax" / "configs" / "synthetic.py").read_text() == CONFIG.read_text()
  assert (home / "midms-jax" / "train.log").read_text() == "training output\n"
  failed = _launch("tpu_pod.py", *args, env=dict(env, FAKE_STATUS="3"))
  assert failed.returncode == 3 and failed.stderr.splitlines()[-1].startswith(
      "error: exit status 3: gcloud "
  )


# --------------------------------------------------------------------------------------------------
# slurm.py
# --------------------------------------------------------------------------------------------------


def _sbatch_dry_run(*args: str, cwd: pathlib.Path = ROOT) -> tuple[list[str], str, list[str]]:
  """(mkdir command, the script of the here-document, sbatch command)."""
  result = _launch("slurm.py", *args, "--dry_run", cwd=cwd)
  assert result.returncode == 0, result.stderr
  match = re.fullmatch(
      r"(mkdir .*)\ncat > (\S+) <<'EOF'\n(.*)EOF\n(sbatch .*)\n", result.stdout, re.DOTALL
  )
  assert match, result.stdout
  mkdir, path, script, sbatch = match.groups()
  assert shlex.split(sbatch) == ["sbatch", path]
  return shlex.split(mkdir), script, shlex.split(sbatch)


def test_slurm_dry_run_one_process_per_gpu(tmp_path):
  mkdir, script, _ = _sbatch_dry_run(
      "--nodes=2",
      "--gpus_per_node=4",
      "--partition=a100",
      "--time=12:00:00",
      f"--config={CONFIG}:tiny",
      f"--workdir={tmp_path / 'run'}",
      f"--log_dir={tmp_path / 'logs'}",
      "--python=/venv/bin/python",
      "--config.train.batch_size=64",
  )
  assert mkdir == ["mkdir", "-p", str(tmp_path / "logs")]
  lines = script.splitlines()
  assert lines[0] == "#!/bin/bash"
  assert {
      "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=4",
      "#SBATCH --gres=gpu:4",
      "#SBATCH --partition=a100",
      "#SBATCH --time=12:00:00",
      f"#SBATCH --output={tmp_path / 'logs'}/%x-%j.out",
      "#SBATCH --signal=TERM@300",
  } <= set(lines)
  assert not any("JAX_LOCAL_DEVICE_IDS" in line for line in lines)
  assert shlex.split(lines[-1]) == [
      "srun",
      "--label",
      "--kill-on-bad-exit=1",
      "/venv/bin/python",
      "-m",
      "midms_jax.train",
      f"--config={CONFIG}:tiny",
      f"--workdir={tmp_path / 'run'}",
      "--config.train.batch_size=64",
  ]


def test_slurm_dry_run_one_process_per_node():
  _, script, _ = _sbatch_dry_run(
      "--nodes=3",
      "--gpus_per_node=8",
      "--mode=per_node",
      "--account=lab",
      f"--config={CONFIG}",
      "--workdir=gs://bkt/run",
  )
  lines = script.splitlines()
  assert {
      "#SBATCH --nodes=3",
      "#SBATCH --ntasks-per-node=1",
      "#SBATCH --gres=gpu:8",
      "#SBATCH --account=lab",
      "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
  } <= set(lines)
  assert not any(line.startswith(("#SBATCH --partition", "#SBATCH --time")) for line in lines)
  assert "--workdir=gs://bkt/run" in shlex.split(lines[-1])


def test_slurm_writes_submits_and_the_script_runs_srun(tmp_path):
  """A fake sbatch that runs the script with bash, and a fake srun: the script written is the dry
  run's, and it starts training with the right variables."""
  bin_dir, log, workdir = tmp_path / "bin", tmp_path / "calls.jsonl", tmp_path / "run"
  _fake_program(bin_dir / "sbatch", "sys.exit(subprocess.run(['bash', sys.argv[1]]).returncode)\n")
  _fake_program(bin_dir / "srun", "")
  env = dict(
      os.environ,
      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
      FAKE_LOG=str(log),
      FAKE_ENV="JAX_LOCAL_DEVICE_IDS",
  )
  args = [
      "--mode=per_node",
      "--gpus_per_node=2",
      f"--config={CONFIG}",
      "--workdir=run",
      "--log_dir=logs",
  ]
  _, dry_script, _ = _sbatch_dry_run(*args, f"--script={tmp_path / 'job.sh'}", cwd=tmp_path)
  result = _launch("slurm.py", *args, f"--script={tmp_path / 'job.sh'}", env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "job.sh").read_text() == dry_script
  assert (tmp_path / "logs").is_dir()
  sbatch, srun = _fake_log(log)
  assert sbatch["argv"] == [str(tmp_path / "job.sh")]
  assert srun["argv"] == [
      "--label",
      "--kill-on-bad-exit=1",
      sys.executable,
      "-m",
      "midms_jax.train",
      f"--config={CONFIG}",
      f"--workdir={workdir}",
  ]
  assert srun["env"] == {"JAX_LOCAL_DEVICE_IDS": "0,1"}


def test_slurm_unwritable_log_dir_or_script_is_one_line(tmp_path):
  """A --log_dir or --script under a file (unwritable for root too): one line naming it, nothing
  submitted."""
  (tmp_path / "a_file").write_text("not a folder")
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
  _fake_program(bin_dir / "sbatch", "")
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log))
  blocked = tmp_path / "a_file" / "logs"
  cases = {
      f"error: {blocked}: cannot write --log_dir there: ": [f"--log_dir={blocked}"],
      f"error: {blocked}/job.sh: cannot write --script there: {blocked}: Not a directory": [
          f"--log_dir={tmp_path / 'logs'}",
          f"--script={blocked}/job.sh",
      ],
  }
  for message, args in cases.items():
    result = _launch(
        "slurm.py", f"--config={CONFIG}", "--workdir=run", *args, env=env, cwd=tmp_path
    )
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
  assert not log.exists()  # sbatch never ran


# --------------------------------------------------------------------------------------------------
# multi_gpu.py
# --------------------------------------------------------------------------------------------------


def test_multi_gpu_dry_run_and_run(tmp_path):
  [command] = _dry_run(
      "multi_gpu.py",
      f"--config={CONFIG}",
      "--workdir=runs/x",
      "--gpus=0,1,2,3",
      "--config.train.fsdp=2",
  )
  assert command == [
      "CUDA_VISIBLE_DEVICES=0,1,2,3",
      sys.executable,
      "-m",
      "midms_jax.train",
      f"--config={CONFIG}",
      f"--workdir={ROOT / 'runs' / 'x'}",
      "--config.train.fsdp=2",
  ]
  log = tmp_path / "calls.jsonl"
  python = _fake_program(tmp_path / "python", "sys.exit(4)\n")
  env = dict(os.environ, FAKE_LOG=str(log), FAKE_ENV="CUDA_VISIBLE_DEVICES")
  result = _launch(
      "multi_gpu.py",
      f"--config={CONFIG}",
      "--workdir=gs://bkt/x",
      "--gpus=1",
      f"--python={python}",
      env=env,
  )
  # the training process replaced the launcher: its status is the script's
  assert result.returncode == 4
  [call] = _fake_log(log)
  assert call["argv"] == ["-m", "midms_jax.train", f"--config={CONFIG}", "--workdir=gs://bkt/x"]
  assert call["env"] == {"CUDA_VISIBLE_DEVICES": "1"}


# --------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, args",
    [
        ("tpu_pod.py", []),
        ("tpu_pod.py", ["create", *SLICE, "--runtime_version=v2-alpha-tpuv5-lite"]),
        ("tpu_pod.py", ["run", *SLICE, f"--config={CONFIG}", "--workdir=runs/local"]),
        ("tpu_pod.py", ["run", *SLICE, f"--config={CONFIG}"]),
        ("tpu_pod.py", ["run", *SLICE, f"--config={CONFIG}", "--bucket=b", "--workers=all"]),
        ("tpu_pod.py", ["delete", *SLICE, "--config.train.lr=1"]),
        ("slurm.py", [f"--config={CONFIG}", "--workdir=w", "--nodes=0"]),
        ("slurm.py", ["--config=missing.py", "--workdir=w"]),
        ("slurm.py", [f"--config={CONFIG.parent}", "--workdir=w"]),
        ("slurm.py", [f"--config={CONFIG}", "--workdir=w", "--mode=per_socket"]),
        ("multi_gpu.py", [f"--config={CONFIG}", "--workdir=w", "--gpus=0,x"]),
        ("multi_gpu.py", ["--workdir=w"]),
        ("local_processes.py", ["--num_processes=2"]),
        ("local_processes.py", ["--num_processes=two", "--", "true"]),
        ("local_processes.py", ["--num_processes=2", "--devices_per_process=0", "--", "true"]),
    ],
)
def test_bad_arguments_are_one_line_errors(script, args):
  result = _launch(script, *_with_dry_run(tuple(args)))
  assert result.returncode == 2 and result.stdout == ""
  assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr


# --------------------------------------------------------------------------------------------------
# local_processes.py
# --------------------------------------------------------------------------------------------------


def test_local_processes_dry_run():
  commands = _dry_run(
      "local_processes.py",
      "--num_processes=3",
      "--devices_per_process=4",
      "--port=12345",
      "--",
      "python",
      "-m",
      "midms_jax.train",
      f"--config={CONFIG}",
      "--workdir=w",
  )
  assert len(commands) == 3
  for i, command in enumerate(commands):
    assert command[:3] == [
        "JAX_PLATFORMS=cpu",
        "XLA_FLAGS=--xla_force_host_platform_device_count=4",
        "PYTHONUNBUFFERED=1",
    ]
    assert command[3:] == [
        "python",
        "-m",
        "midms_jax.train",
        f"--config={CONFIG}",
        "--workdir=w",
        "--coordinator_address=localhost:12345",
        "--num_processes=3",
        f"--process_id={i}",
    ]


def test_local_processes_prefix_output_and_replace_the_device_count():
  probe = (
      "import os, sys; print(os.environ['JAX_PLATFORMS'], os.environ['XLA_FLAGS'], *sys.argv[1:])"
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x")
  result = _launch(
      "local_processes.py",
      "--num_processes=2",
      "--devices_per_process=3",
      "--",
      sys.executable,
      "-c",
      probe,
      env=env,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  lines = sorted(result.stdout.splitlines())
  port = re.search(r"localhost:(\d+)", lines[0]).group(1)
  assert lines == [
      f"[{i}] cpu --xla_dump_to=/tmp/x --xla_force_host_platform_device_count=3 "
      f"--coordinator_address=localhost:{port} --num_processes=2 --process_id={i}"
      for i in range(2)
  ]


def test_local_processes_kill_the_others_when_one_fails():
  # Process 1 fails at once; processes 0 and 2 would wait an hour for it.
  probe = (
      "import sys, time; sys.argv[-1] == '--process_id=1' and sys.exit(3); print('waiting', "
      "flush=True); "
      "time.sleep(3600)"
  )
  result = _launch(
      "local_processes.py", "--num_processes=3", "--", sys.executable, "-c", probe, timeout=120
  )
  assert result.returncode == 3
  assert result.stderr.strip() == "error: process 1 exited with status 3; killing the others"
