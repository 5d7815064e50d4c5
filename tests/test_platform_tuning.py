"""Platform tuning: the XLA flags the tools set, no side effect on import, tunings per backend."""

import os
import subprocess
import sys

import jax
import pytest

from midms_jax import platform_tuning


def test_default_flags_are_appended():
  env = {}
  platform_tuning.set_xla_flags(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


def test_a_flag_the_user_set_is_kept_with_its_value():
  env = {
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"
  }
  platform_tuning.set_xla_flags(env)
  assert (
      env["XLA_FLAGS"]
      == "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"
  )


def test_other_flags_are_kept_in_order():
  assert (
      platform_tuning.with_default_flags("--a=1  --b")
      == "--a=1 --b --xla_cpu_experimental_ynn_fusion_type="
  )


def test_importing_the_package_sets_no_xla_flags():
  """(TensorFlow and OpenCV, which the data pipeline imports, set variables of their own.)"""
  probe = (
      "import os; before = os.environ.get('XLA_FLAGS'); import midms_jax, midms_jax.midms.model, "
      "midms_jax.train; assert os.environ.get('XLA_FLAGS') == before, os.environ.get('XLA_FLAGS')"
  )
  for env in (
      {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
      dict(os.environ, XLA_FLAGS="--a=1"),
  ):
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=300)


def test_tunings_apply_only_on_their_backends(monkeypatch):
  assert platform_tuning.tuned("canonical_conv_backward") == (jax.default_backend() == "cpu")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not any(platform_tuning.tuned(name) for name in platform_tuning.TUNED_BACKENDS)
  with pytest.raises(KeyError):
    platform_tuning.tuned("no_such_tuning")


def test_nothing_is_set_for_an_unchecked_jaxlib(monkeypatch):
  monkeypatch.setattr(platform_tuning, "CHECKED_JAXLIB", ("0.0.",))
  env = {"XLA_FLAGS": "--a=1"}
  platform_tuning.set_xla_flags(env)
  assert env == {"XLA_FLAGS": "--a=1"}


def test_autotuning_off_on_gpus_is_warned_about():
  (warning,) = platform_tuning.slow_flag_warnings(
      "--xla_dump_to=/tmp --xla_gpu_autotune_level=0", "gpu"
  )
  assert "--xla_gpu_autotune_level=0" in warning and "--xla_gpu_autotune_level=1" in warning
  assert platform_tuning.slow_flag_warnings("--xla_gpu_autotune_level=0", "cpu") == []
  assert (
      platform_tuning.slow_flag_warnings(
          "--xla_gpu_autotune_level=1 --xla_gpu_enable_triton_gemm", "gpu"
      )
      == []
  )
  assert platform_tuning.slow_flag_warnings("", "gpu") == []
