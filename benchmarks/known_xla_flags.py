"""Prints those of the given ``--xla_...`` flags that the installed XLA knows, space-separated.

XLA aborts the whole process on a flag it does not know, and its experimental GPU flags come and go
between releases, so a script meant for whatever jaxlib a machine has filters its wish list first:

    XLA_FLAGS="$(python3 benchmarks/known_xla_flags.py --xla_gpu_autotune_level=1 --xla_gpu_foo=bar)"

A flag is known when its name, as a NUL-terminated string, is in every XLA library installed
(jaxlib's and any PJRT plugin's under ``jax_plugins``, which parses ``XLA_FLAGS`` itself for its
platform). Reads the libraries (a few hundred MB) once; no backend is started.
"""

import importlib.util
import pathlib
import sys

_ANY_XLA = b"xla_dump_to\0"  # a flag every XLA build has: marks the libraries that parse XLA_FLAGS


def xla_libraries() -> list[bytes]:
  """The contents of the shared libraries of jaxlib and the PJRT plugins that hold an XLA."""
  roots = []
  for package in ("jaxlib", "jax_plugins"):
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
      roots.extend(spec.submodule_search_locations)
  contents = (path.read_bytes() for root in roots for path in pathlib.Path(root).rglob("*.so"))
  return [data for data in contents if _ANY_XLA in data]


def known_flags(flags: list[str], libraries: list[bytes]) -> list[str]:
  """The flags (``--name=value`` or ``--name``) whose name every library in ``libraries`` holds."""
  name = lambda flag: flag.lstrip("-").split("=", 1)[0].encode() + b"\0"
  return [f for f in flags if libraries and all(name(f) in data for data in libraries)]


if __name__ == "__main__":
  wanted = sys.argv[1:]
  kept = known_flags(wanted, xla_libraries())
  for dropped in sorted(set(wanted) - set(kept)):
    print(f"known_xla_flags.py: this XLA does not know {dropped}: left out", file=sys.stderr)
  print(" ".join(kept))
