"""Training on a Cloud TPU pod slice: every worker (host) runs the same command, and JAX finds the others by
itself (``midms_jax.train.initialize_distributed``).

  python launch/tpu_pod.py create  --tpu_name=midms --zone=us-central1-a \\
      --accelerator_type=v5litepod-64 --runtime_version=v2-alpha-tpuv5-lite
  python launch/tpu_pod.py install --tpu_name=midms --zone=us-central1-a
  python launch/tpu_pod.py run     --tpu_name=midms --zone=us-central1-a --config=configs/celebahq.py \\
      --workdir=gs://my-bucket/runs/celebahq --config.train.batch_size=256
  python launch/tpu_pod.py delete  --tpu_name=midms --zone=us-central1-a

``install`` copies this checkout (``git archive`` of --ref) to every worker and installs it with ``jax[tpu]`` in
a virtual environment; ``run`` copies the config file there too, so a config edited here needs no reinstall.
Every subcommand takes ``--dry_run``: print the gcloud commands, one a line, and run nothing. See
launch/README.md.
"""

import argparse
import os
import shlex
import sys
import tempfile

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# setup.py's jax range with the TPU runtime (libtpu); tests/test_launch.py keeps the two in step.
JAX_TPU = "jax[tpu]>=0.10.2,<0.11"
ARCHIVE = "midms-jax.tar.gz"


def gcloud(args: argparse.Namespace, verb: str, *operands: str) -> list[str]:
  argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *operands, f"--zone={args.zone}"]
  return argv + [f"--project={args.project}"] if args.project else argv


def copy_to_workers(args: argparse.Namespace, local: str, remote: str) -> common.Command:
  """``local`` to ``remote`` (relative to the home directory) on every worker."""
  return common.Command(
      tuple(gcloud(args, "scp", local, f"{args.tpu_name}:{remote}", "--worker=all"))
  )


def on_workers(args: argparse.Namespace, remote_command: str) -> common.Command:
  """``remote_command`` run by the shell of every worker at once, in its home directory."""
  return common.Command(
      tuple(gcloud(args, "ssh", args.tpu_name, "--worker=all", f"--command={remote_command}"))
  )


def create_commands(args: argparse.Namespace) -> list[common.Command]:
  spot = ["--spot"] if args.spot else []
  return [
      common.Command(
          tuple(
              gcloud(
                  args,
                  "create",
                  args.tpu_name,
                  f"--accelerator-type={args.accelerator_type}",
                  f"--version={args.runtime_version}",
                  *spot,
              )
          )
      )
  ]


def install_commands(args: argparse.Namespace) -> list[common.Command]:
  """This checkout at --ref into --remote_dir on every worker, installed in --remote_dir/.venv with
  jax[tpu].

  TPU VM images may lack the Python that midms-jax needs (3.11): it comes from apt when missing."""
  archive = os.path.join(tempfile.gettempdir(), f"midms-jax-{args.tpu_name}.tar.gz")
  python, remote_dir = shlex.quote(args.python), shlex.quote(args.remote_dir)
  pip = f"{remote_dir}/.venv/bin/pip"
  remote = " && ".join(
      [
          f'({python} -c "import ensurepip" 2>/dev/null || (sudo apt-get update -q && '
          f"sudo apt-get install -y -q {python} {python}-venv))",
          f"mkdir -p {remote_dir}",
          f"tar -xzf {ARCHIVE} -C {remote_dir}",
          f"{python} -m venv {remote_dir}/.venv",
          f"{pip} install -q --upgrade pip",
          f'{pip} install -q -e {remote_dir} "{JAX_TPU}"',
      ]
  )
  return [
      common.Command(
          ("git", "-C", ROOT, "archive", "--format=tar.gz", f"--output={archive}", args.ref)
      ),
      copy_to_workers(args, archive, ARCHIVE),
      on_workers(args, remote),
  ]


def remote_config_path(config: str) -> str:
  """Where ``run`` puts the config file, relative to --remote_dir: its own path for a file of this
  checkout, else the top directory."""
  relative = os.path.relpath(config, ROOT)
  return os.path.basename(config) if relative.startswith("..") else relative


def run_commands(
    args: argparse.Namespace, parser: argparse.ArgumentParser, overrides: list[str]
) -> list[common.Command]:
  """The config file to every worker, then training on all of them, its output appended to --log
  there."""
  config, variant = common.config_file(parser, args.config)
  if not (args.workdir or args.bucket):
    parser.error("run needs --workdir=gs://<bucket>/<path> (or --bucket)")
  workdir = args.workdir or f"gs://{args.bucket}/runs/{args.tpu_name}"
  if not (workdir.startswith("gs://") or os.path.isabs(workdir)):
    parser.error(
        f"--workdir={workdir}: every worker must write to the same place: a gs:// path, or an "
        "absolute "
        "path of a file system that all workers mount"
    )
  remote_config = remote_config_path(config)
  train = shlex.join(
      common.train_argv(".venv/bin/python", remote_config + variant, workdir, overrides)
  )
  log = shlex.quote(args.log)
  if args.background:  # survives the end of the ssh session; follow it with tail -f on a worker
    remote = (
        f"cd {shlex.quote(args.remote_dir)} && setsid nohup {train} >> {log} 2>&1 < /dev/null &"
    )
  else:
    remote = f"set -o pipefail; cd {shlex.quote(args.remote_dir)} && {train} 2>&1 | tee -a {log}"
  return [
      copy_to_workers(args, config, f"{args.remote_dir}/{remote_config}"),
      on_workers(args, remote),
  ]


def delete_commands(args: argparse.Namespace) -> list[common.Command]:
  return [common.Command(tuple(gcloud(args, "delete", args.tpu_name, "--quiet")))]


def make_parser() -> argparse.ArgumentParser:
  slice_flags = common.ArgumentParser(add_help=False)
  slice_flags.add_argument("--tpu_name", required=True, help="name of the TPU VM (the pod slice)")
  slice_flags.add_argument("--zone", required=True, help="e.g. us-central1-a")
  slice_flags.add_argument("--project", help="Google Cloud project (default: gcloud's)")
  slice_flags.add_argument(
      "--dry_run", action="store_true", help="print the commands instead of running them"
  )
  remote_dir = dict(
      default="midms-jax", help="the checkout on every worker, relative to the home directory"
  )

  parser = common.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  commands = parser.add_subparsers(
      dest="command", required=True, metavar="{create,install,run,delete}"
  )
  create = commands.add_parser("create", parents=[slice_flags], help="create the TPU VM slice")
  create.add_argument("--accelerator_type", required=True, help="e.g. v5litepod-64, v4-32, v6e-64")
  create.add_argument(
      "--runtime_version",
      required=True,
      help="TPU software version: v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), "
      "v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4)",
  )
  create.add_argument(
      "--spot", action="store_true", help="a Spot slice (cheaper, can be preempted)"
  )
  install = commands.add_parser(
      "install", parents=[slice_flags], help="copy this checkout and install it"
  )
  install.add_argument(
      "--ref",
      default="HEAD",
      help="git commit of this checkout to install (uncommitted " "changes are not copied)",
  )
  install.add_argument(
      "--python",
      default="python3.11",
      help="Python on the workers (pythonX.Y: apt installs it " "when missing)",
  )
  install.add_argument("--remote_dir", **remote_dir)
  run = commands.add_parser(
      "run",
      parents=[slice_flags],
      help="train on every worker; further " "--config.<field>=<value> pass through",
  )
  run.add_argument(
      "--config",
      required=True,
      help="config file here, optionally with a variant: configs/x.py:tiny",
  )
  run.add_argument(
      "--workdir", help="gs://<bucket>/<path> (default: gs://<bucket>/runs/<tpu_name>)"
  )
  run.add_argument("--bucket", help="GCS bucket of the default workdir")
  run.add_argument("--remote_dir", **remote_dir)
  run.add_argument(
      "--log", default="train.log", help="log file on every worker, relative to --remote_dir"
  )
  run.add_argument(
      "--background",
      action="store_true",
      help="return at once; training goes on after this terminal closes (output only in --log)",
  )
  commands.add_parser("delete", parents=[slice_flags], help="delete the TPU VM slice")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = make_parser()
  args, overrides = common.parse_with_overrides(parser, argv)
  if overrides and args.command != "run":
    parser.error(f"unrecognized arguments for {args.command}: {' '.join(overrides)}")
  if args.command == "create":
    commands = create_commands(args)
  elif args.command == "install":
    commands = install_commands(args)
  elif args.command == "run":
    commands = run_commands(args, parser, overrides)
  else:
    commands = delete_commands(args)
  return common.run_commands(commands, args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
