"""Timestamped progress lines on stderr for the benchmarks: where a long run's minutes go (tracing,
XLA compile, autotuning, each step), so that a run cut off by its time limit still says where it
was."""

import sys
import time

_START = time.perf_counter()


def progress(what: str) -> None:
  """Prints ``[seconds since the script started] what`` to stderr at once."""
  print(f"[{time.perf_counter() - _START:7.1f} s] {what}", file=sys.stderr, flush=True)
