"""XLA flags this package sets by default, before JAX starts its backends (``import midms_jax`` does it).

``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no YNNPACK fusions) sends XLA:CPU's convolutions
to its Eigen kernels, which on the development CPU ran MIDMs' convolutions 1.5 to 3x faster than
YNNPACK, the backward ones most (``docs/benchmarks.md``). It only concerns the CPU backend. A flag
the user already put in ``XLA_FLAGS`` (any value) is left as the user set it; importing this package
after JAX has initialised its backends leaves the flags without effect; with a jaxlib release outside
``CHECKED_JAXLIB`` nothing is set (XLA would abort on a flag that release no longer knows).

``slow_flag_warnings`` names flags a user may set to shorten compiles that make the programs themselves
far slower: ``--xla_gpu_autotune_level=0`` ran MIDMs' convolutions at ~0.5 TFLOP/s on an H200, since
XLA:GPU then takes the first kernel configuration that compiles instead of choosing one.
"""

import importlib.metadata
import os
from typing import MutableMapping

DEFAULT_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}
# XLA aborts on a flag it does not know, and experimental flags come and go: they are set only for the jaxlib
# releases they were checked on (version prefixes).
CHECKED_JAXLIB = ("0.10.",)


def with_default_flags(xla_flags: str) -> str:
  """``xla_flags`` with every ``DEFAULT_FLAGS`` entry it does not already name appended."""
  named = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  added = [f"{name}={value}" for name, value in DEFAULT_FLAGS.items() if name not in named]
  return " ".join([*xla_flags.split(), *added])


def _jaxlib_checked() -> bool:
  try:
    return importlib.metadata.version("jaxlib").startswith(CHECKED_JAXLIB)
  except importlib.metadata.PackageNotFoundError:
    return False


def set_default_flags(environ: MutableMapping[str, str] = os.environ) -> None:
  """Writes ``with_default_flags`` of ``environ['XLA_FLAGS']`` back to ``environ`` (with a checked jaxlib)."""
  if _jaxlib_checked():
    environ["XLA_FLAGS"] = with_default_flags(environ.get("XLA_FLAGS", ""))


def slow_flag_warnings(xla_flags: str, backend: str) -> list[str]:
  """Warnings for flags in ``xla_flags`` that make programs on ``backend`` ('cpu', 'gpu', 'tpu') far slower."""
  values = dict((flag.split("=", 1) + [""])[:2] for flag in xla_flags.split())
  if backend == "gpu" and values.get("--xla_gpu_autotune_level") == "0":
    return ["XLA_FLAGS has --xla_gpu_autotune_level=0: XLA:GPU then runs each convolution with the first cuDNN "
            "configuration that compiles, not a chosen one, and MIDMs' convolutions ran ~1000x below the GPU's "
            "peak (docs/benchmarks.md). For shorter compiles use --xla_gpu_autotune_level=1 and "
            "--xla_gpu_per_fusion_autotune_cache_dir=<an existing folder> instead."]
  return []
