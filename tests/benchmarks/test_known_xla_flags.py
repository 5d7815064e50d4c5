"""The accelerator script's flag filter: flags this XLA knows are kept (and start a backend), others
dropped."""

import os
import subprocess
import sys

from benchmarks import known_xla_flags

_GPU_FLAGS = [
    "--xla_gpu_autotune_level=1",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_per_fusion_autotune_cache_dir=/tmp/autotune",
]


def _start_backend(xla_flags: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True, text=True
  )


def test_installed_xla_keeps_known_flags_and_drops_unknown_ones():
  libraries = known_xla_flags.xla_libraries()
  assert libraries, "no XLA library found under jaxlib"
  kept = known_xla_flags.known_flags(_GPU_FLAGS + ["--xla_gpu_no_such_flag=1"], libraries)
  assert kept == _GPU_FLAGS
  assert _start_backend(" ".join(kept)).returncode == 0
  # what the filter prevents: XLA aborts the process
  unknown = _start_backend("--xla_gpu_no_such_flag=1")
  assert unknown.returncode != 0 and "xla_gpu_no_such_flag" in unknown.stderr


def test_a_flag_must_be_in_every_library_by_its_whole_name():
  jaxlib, plugin = b"..xla_dump_to\0xla_gpu_a\0xla_gpu_ab\0", b"..xla_dump_to\0xla_gpu_ab\0"
  assert known_xla_flags.known_flags(["--xla_gpu_a=1", "--xla_gpu_ab"], [jaxlib, plugin]) == [
      "--xla_gpu_ab"
  ]
  assert known_xla_flags.known_flags(["--xla_gpu_ab"], []) == []
