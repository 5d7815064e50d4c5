"""Training on one host with several GPUs: one process drives every GPU it sees, so no ``jax.distributed`` set-up
is needed; the batch is split over all of them.

  python launch/multi_gpu.py --config=configs/celebahq.py --workdir=runs/celebahq --gpus=0,1,2,3 \\
      --config.train.batch_size=32

``--gpus`` picks the GPUs (``CUDA_VISIBLE_DEVICES``; default: all). The training process replaces this one, so
a SIGTERM sent to it (a scheduler's preemption) reaches training, which saves a checkpoint and stops.
``--dry_run`` prints the command and runs nothing.
"""

import argparse
import os
import sys

import common


def make_parser() -> argparse.ArgumentParser:
  parser = common.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  common.add_training_flags(parser)
  parser.add_argument(
      "--gpus", help="comma-separated GPU indices, e.g. 0,1,2,3 (default: every GPU)"
  )
  parser.add_argument(
      "--python", default=sys.executable, help="Python with midms-jax (default: this one)"
  )
  return parser


def training_command(
    args: argparse.Namespace, parser: argparse.ArgumentParser, overrides: list[str]
) -> common.Command:
  env = {}
  if args.gpus is not None:
    if not all(index.isdigit() for index in args.gpus.split(",")):
      parser.error(f"--gpus={args.gpus}: expected comma-separated GPU indices, e.g. 0,1,2,3")
    env["CUDA_VISIBLE_DEVICES"] = args.gpus
  config, variant = common.config_file(parser, args.config)
  return common.Command(
      tuple(
          common.train_argv(
              args.python, config + variant, common.local_or_remote(args.workdir), overrides
          )
      ),
      env,
  )


def main(argv: list[str] | None = None) -> int:
  parser = make_parser()
  args, overrides = common.parse_with_overrides(parser, argv)
  command = training_command(args, parser, overrides)
  if args.dry_run:
    print(command.line())
    return 0
  print(f"+ {command.line()}", file=sys.stderr, flush=True)
  try:
    os.execvpe(command.argv[0], command.argv, {**os.environ, **command.env})
  except OSError as e:
    print(f"error: {command.argv[0]}: {e.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
  sys.exit(main())
