"""Training on GPU nodes under SLURM: writes an sbatch script and submits it.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \\
      --config=configs/deepfashion.py --workdir=/shared/runs/df --config.train.batch_size=64

``srun`` starts the processes; ``python -m midms_jax.train`` sees SLURM_NTASKS > 1 and lets
``jax.distributed.initialize()`` read the coordinator, process count and index from SLURM's variables.

* ``--mode=per_gpu`` (default): one process per GPU; every process sees all GPUs of its node and JAX gives
  process ``SLURM_LOCALID`` its own one. Do not bind GPUs to tasks (no ``--gpus-per-task``/``--gpu-bind``).
* ``--mode=per_node``: one process per node driving all its GPUs (``JAX_LOCAL_DEVICE_IDS``, which would
  otherwise be the first GPU only under SLURM).

The workdir, the config and the Python environment must be on a file system that every node mounts. Logs:
``<log_dir>/<job name>-<job id>.out``, every line prefixed with its task's index. SLURM sends SIGTERM
``--term_before_end_s`` before the time limit: training saves a checkpoint and stops, and submitting the same
script again resumes from it. ``--dry_run`` prints the shell commands (the script as a here-document) and
submits nothing.
"""

import argparse
import os
import shlex
import sys

import common


def sbatch_script(args: argparse.Namespace, train: list[str]) -> str:
  per_gpu = args.mode == "per_gpu"
  directives = [
      f"--job-name={args.job_name}",
      f"--nodes={args.nodes}",
      f"--ntasks-per-node={args.gpus_per_node if per_gpu else 1}",
      f"--gres=gpu:{args.gpus_per_node}",
      f"--output={os.path.join(args.log_dir, '%x-%j.out')}",
      f"--signal=TERM@{args.term_before_end_s}",
  ]
  optional = dict(
      partition=args.partition,
      time=args.time,
      account=args.account,
      cpus_per_task=args.cpus_per_task,
  )
  directives += [f"--{name.replace('_', '-')}={value}" for name, value in optional.items() if value]
  lines = (
      ["#!/bin/bash"] + [f"#SBATCH {directive}" for directive in directives] + ["set -euo pipefail"]
  )
  if not per_gpu:
    lines.append(f"export JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(args.gpus_per_node)))}")
  lines.append(shlex.join(["srun", "--label", "--kill-on-bad-exit=1", *train]))
  return "\n".join(lines) + "\n"


def make_parser() -> argparse.ArgumentParser:
  parser = common.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  common.add_training_flags(parser)
  parser.add_argument("--nodes", type=int, default=1, help="number of nodes")
  parser.add_argument("--gpus_per_node", type=int, default=8, help="GPUs of each node to use")
  parser.add_argument(
      "--mode",
      choices=("per_gpu", "per_node"),
      default="per_gpu",
      help="one process per GPU, or one per node",
  )
  parser.add_argument("--partition", help="SLURM partition (default: the cluster's)")
  parser.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the partition's)")
  parser.add_argument("--account", help="SLURM account to charge")
  parser.add_argument("--cpus_per_task", type=int, help="CPU cores per process (data loading)")
  parser.add_argument("--job_name", default="midms-jax")
  parser.add_argument(
      "--term_before_end_s",
      type=int,
      default=300,
      help="SIGTERM this many seconds before the time limit, to save a checkpoint",
  )
  parser.add_argument("--log_dir", default="slurm_logs", help="where SLURM writes the job's output")
  parser.add_argument(
      "--script", help="the sbatch script to write (default: <log_dir>/<job_name>.sbatch)"
  )
  parser.add_argument(
      "--python",
      default=sys.executable,
      help="Python of the environment with midms-jax on the nodes (default: this one)",
  )
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = make_parser()
  args, overrides = common.parse_with_overrides(parser, argv)
  for name in ("nodes", "gpus_per_node", "term_before_end_s", "cpus_per_task"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be at least 1")
  config, variant = common.config_file(parser, args.config)
  args.log_dir = os.path.abspath(args.log_dir)
  script_path = os.path.abspath(
      args.script or os.path.join(args.log_dir, f"{args.job_name}.sbatch")
  )
  script = sbatch_script(
      args,
      common.train_argv(
          args.python, config + variant, common.local_or_remote(args.workdir), overrides
      ),
  )
  submit = common.Command(("sbatch", script_path))
  if args.dry_run:
    print(shlex.join(["mkdir", "-p", args.log_dir]))
    print(f"cat > {shlex.quote(script_path)} <<'EOF'\n{script}EOF")
    print(submit.line())
    return 0
  try:
    for directory in (args.log_dir, os.path.dirname(script_path)):
      os.makedirs(directory, exist_ok=True)
    with open(script_path, "w", encoding="utf-8") as f:
      f.write(script)
  except OSError as e:  # a --log_dir or --script under a file, or in a folder one cannot write
    on_log_dir = bool(e.filename) and os.path.abspath(e.filename) == args.log_dir
    target, flag = (args.log_dir, "--log_dir") if on_log_dir else (script_path, "--script")
    where = f"{e.filename}: " if e.filename and os.path.abspath(e.filename) != target else ""
    parser.error(f"{target}: cannot write {flag} there: {where}{e.strerror or e}")
  print(f"wrote {script_path}", file=sys.stderr)
  return common.run_commands([submit], dry_run=False)


if __name__ == "__main__":
  sys.exit(main())
