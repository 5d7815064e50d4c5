"""Which collectives an optimised XLA program holds (``compiled.as_text()``):
``benchmarks/collectives.py``'s census, kept free of command-line flags so that tests can import
it."""

import collections
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"(\S+) = ([^=]+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def collective_census(hlo_text: str) -> tuple[dict[str, int], list[str]]:
  """({collective: count}, ["op shape"] of those that move data other than by reductions) of
  optimised HLO."""
  # no /*index=5*/
  found = [(m.group(3), m.group(2)) for m in _OP.finditer(re.sub(r"/\*.*?\*/", "", hlo_text))]
  moving = [f"{op} {shape}" for op, shape in found if op not in ("all-reduce", "reduce-scatter")]
  return dict(collections.Counter(op for op, _ in found)), moving


def activation_moves(counts: dict[str, int]) -> int:
  """The collectives of a census that move data between devices along the batch (collective-permute,
  all-to-all): none in a data-parallel step, where only reductions and parameter gathers
  communicate.
  """
  return counts.get("all-to-all", 0) + counts.get("collective-permute", 0)
