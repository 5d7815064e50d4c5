"""Command-line plumbing shared by the tools: absl flag errors as one ``error:`` line with exit status 2,
and an in-process entry point (tests, notebooks) that parses a fresh argv every call."""

import sys
from typing import Callable, Sequence

from absl import flags


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str], doc: str | None = None) -> list[str]:
  """Parses ``argv`` into ``flag_values``; a bad flag prints one ``error:`` line and exits with 2 (absl: 1).

  ``--help`` prints ``doc`` and the flags and exits with 0 (for a tool with its own ``FlagValues``, which
  absl's help does not know).
  """
  if doc is not None and any(arg in HELP_FLAGS for arg in argv[1:]):
    print(f"{doc.strip()}\n\nflags:\n{flag_values.get_help()}")
    sys.exit(0)
  try:
    return flag_values(list(argv))
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run_in_process(flag_values: flags.FlagValues, main: Callable[[list[str]], int], argv: Sequence[str],
                   doc: str | None = None) -> int:
  """Parses ``argv`` (program name first) afresh, every flag not given taking its default, runs ``main``
  on the remaining arguments and returns its exit status.

  ``sys.argv`` is ``argv`` meanwhile: ml_collections reads ``--config.*`` overrides from there and defines a
  flag for each, so the previous call's override flags are removed first.
  """
  for name in [name for name in flag_values if name.startswith("config.")]:
    delattr(flag_values, name)
  flag_values.unparse_flags()
  saved, sys.argv = sys.argv, list(argv)
  try:
    try:
      remaining = parse_flags(flag_values, argv, doc)
    except SystemExit as e:
      return int(e.code)
    return main(remaining)
  finally:
    sys.argv = saved
