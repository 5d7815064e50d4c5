"""Everything the code does differently on one backend, in one place, with the reason for each.

Importing the package changes nothing: the command-line tools call ``set_xla_flags`` first thing in
their entry point (``if __name__ == "__main__"``), before JAX starts its backends, and so does
``tests/conftest.py``.

``DEFAULT_XLA_FLAGS``: ``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no YNNPACK fusions) sends
XLA:CPU's convolutions to its Eigen kernels, faster for MIDMs' convolutions, the backward ones most
(``docs/benchmarks.md``); other backends ignore it. A flag the user already put in ``XLA_FLAGS``
(any value) is left as the user set it; with a jaxlib release outside ``CHECKED_JAXLIB`` nothing is
set (XLA aborts on a flag that release no longer knows).

``TUNED_BACKENDS``: code paths taken only on the backends where they were measured to help, decided
when tracing by ``jax.default_backend()`` (``tuned``):

- ``"canonical_conv_backward"`` (``models.conv``): convolution gradients built as canonical
  convolutions with explicit transposes; XLA:CPU otherwise runs the gradients of convolutions inside
  a ``lax.scan`` body through a naive loop.
- ``"spade_map_barrier"`` (``models.correspondence.SPADE``): the resized condition map materialised
  once (optimisation barrier) instead of fused into every convolution that reads it (XLA:CPU).

``slow_flag_warnings`` names flags a user may set to shorten compiles that make the programs
themselves far slower (``--xla_gpu_autotune_level=0`` on GPUs).
"""

import importlib.metadata
import os
from typing import MutableMapping

import jax

DEFAULT_XLA_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}
# XLA aborts on a flag it does not know, and experimental flags come and go: they are set only for
# the jaxlib releases they were checked on (version prefixes).
CHECKED_JAXLIB = ("0.10.",)
TUNED_BACKENDS = {"canonical_conv_backward": ("cpu",), "spade_map_barrier": ("cpu",)}


def tuned(name: str) -> bool:
  """Whether the tuning ``name`` of ``TUNED_BACKENDS`` applies on JAX's default backend."""
  return jax.default_backend() in TUNED_BACKENDS[name]


def with_default_flags(xla_flags: str) -> str:
  """``xla_flags`` with every ``DEFAULT_XLA_FLAGS`` entry it does not already name appended."""
  named = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  added = [f"{name}={value}" for name, value in DEFAULT_XLA_FLAGS.items() if name not in named]
  return " ".join([*xla_flags.split(), *added])


def _jaxlib_checked() -> bool:
  try:
    return importlib.metadata.version("jaxlib").startswith(CHECKED_JAXLIB)
  except importlib.metadata.PackageNotFoundError:
    return False


def set_xla_flags(environ: MutableMapping[str, str] = os.environ) -> None:
  """Writes ``with_default_flags`` of ``environ['XLA_FLAGS']`` back to ``environ`` (with a checked
  jaxlib). Takes effect only before JAX starts its backends (the first computation or device
  query)."""
  if _jaxlib_checked():
    environ["XLA_FLAGS"] = with_default_flags(environ.get("XLA_FLAGS", ""))


def slow_flag_warnings(xla_flags: str, backend: str) -> list[str]:
  """Warnings for flags in ``xla_flags`` that make programs on ``backend`` ('cpu', 'gpu', 'tpu') far
  slower."""
  values = dict((flag.split("=", 1) + [""])[:2] for flag in xla_flags.split())
  if backend == "gpu" and values.get("--xla_gpu_autotune_level") == "0":
    return [
        "XLA_FLAGS has --xla_gpu_autotune_level=0: XLA:GPU then runs each convolution with the "
        "first "
        "cuDNN configuration that compiles, not a chosen one, and MIDMs' convolutions ran ~1000x "
        "below "
        "the GPU's peak (docs/benchmarks.md). For shorter compiles use "
        "--xla_gpu_autotune_level=1 and "
        "--xla_gpu_per_fusion_autotune_cache_dir=<an existing folder> instead."
    ]
  return []
