"""What the launch scripts share: one-line argument errors, the ``--config.<field>=<value>``
overrides they pass through to training, and commands that are either printed (``--dry_run``) or
run.

Standard library only: the scripts run where midms-jax is not installed (a laptop driving a TPU pod,
a SLURM login node before the first job)."""

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Mapping, NoReturn, Sequence

TRAIN_MODULE = "midms_jax.train"


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the project's CLI convention: a bad argument is one ``error:`` line and exit
  status 2."""

  def __init__(self, **kwargs):
    super().__init__(allow_abbrev=False, **kwargs)

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"error: {message}\n")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
  """``--config`` / ``--workdir`` of the training job and ``--dry_run``, the same in every
  script."""
  parser.add_argument(
      "--config", required=True, help="config file, optionally with a variant: configs/x.py:tiny"
  )
  parser.add_argument("--workdir", required=True, help="training output directory")
  parser.add_argument(
      "--dry_run", action="store_true", help="print the commands instead of running them"
  )


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
  """Parses the script's own flags; what is left must be ``--config.<field>=<value>`` overrides for
  training (``--config.<field> <value>`` too), anything else is an error."""
  args, extra = parser.parse_known_args(argv)
  overrides: list[str] = []
  for arg in extra:
    takes_value = (
        bool(overrides) and overrides[-1].startswith("--config.") and "=" not in overrides[-1]
    )
    if not (arg.startswith("--config.") or (takes_value and not arg.startswith("--"))):
      parser.error(
          f"unrecognized argument {arg!r} (only --config.<field>=<value> overrides pass through)"
      )
    overrides.append(arg)
  return args, overrides


def config_file(parser: argparse.ArgumentParser, spec: str) -> tuple[str, str]:
  """``path[:variant]`` -> (absolute path of an existing file, ``:variant`` or "")."""
  path, sep, variant = spec.partition(":")
  if not os.path.isfile(path):
    what = "a folder, not a config file" if os.path.isdir(path) else "a file that does not exist"
    parser.error(f"{path}: --config names {what}")
  return os.path.abspath(path), sep + variant


def local_or_remote(path: str) -> str:
  """A ``gs://`` (or other URL) path as it is, a local one made absolute (the job may start
  elsewhere)."""
  return path if "://" in path else os.path.abspath(path)


def train_argv(python: str, config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
  return [python, "-m", TRAIN_MODULE, f"--config={config}", f"--workdir={workdir}", *overrides]


@dataclasses.dataclass(frozen=True)
class Command:
  """A program and the variables it gets on top of the caller's environment."""

  argv: tuple[str, ...]
  env: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def line(self) -> str:
    """The command as one shell line (``NAME=value ... program args``) that a user can paste."""
    return " ".join(
        [f"{name}={shlex.quote(value)}" for name, value in self.env.items()]
        + [shlex.join(self.argv)]
    )


def run_commands(commands: Sequence[Command], dry_run: bool) -> int:
  """Prints every command (``--dry_run``) or runs them in order, stopping at the first failure; the
  exit status."""
  for command in commands:
    if dry_run:
      print(command.line())
      continue
    print(f"+ {command.line()}", file=sys.stderr, flush=True)
    try:
      status = subprocess.run(
          command.argv, env={**os.environ, **command.env}, check=False
      ).returncode
    except FileNotFoundError:
      print(f"error: {command.argv[0]}: program not found", file=sys.stderr)
      return 127
    if status:
      print(f"error: exit status {status}: {command.line()}", file=sys.stderr)
      return exit_status(status)
  return 0


def exit_status(returncode: int) -> int:
  """A child's return code as a shell reports it: killed by signal N -> 128 + N."""
  return returncode if returncode >= 0 else 128 - returncode
