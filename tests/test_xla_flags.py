"""The XLA flags the package sets by default."""

from midms_jax import xla_flags


def test_default_flags_are_appended():
  env = {}
  xla_flags.set_default_flags(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


def test_a_flag_the_user_set_is_kept_with_its_value():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"}
  xla_flags.set_default_flags(env)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"


def test_other_flags_are_kept_in_order():
  assert (xla_flags.with_default_flags("--a=1  --b") ==
          "--a=1 --b --xla_cpu_experimental_ynn_fusion_type=")


def test_importing_the_package_set_them():
  import os  # pylint: disable=import-outside-toplevel
  assert "--xla_cpu_experimental_ynn_fusion_type" in os.environ["XLA_FLAGS"]


def test_nothing_is_set_for_an_unchecked_jaxlib(monkeypatch):
  monkeypatch.setattr(xla_flags, "CHECKED_JAXLIB", ("0.0.",))
  env = {"XLA_FLAGS": "--a=1"}
  xla_flags.set_default_flags(env)
  assert env == {"XLA_FLAGS": "--a=1"}


def test_autotuning_off_on_gpus_is_warned_about():
  (warning,) = xla_flags.slow_flag_warnings("--xla_dump_to=/tmp --xla_gpu_autotune_level=0", "gpu")
  assert "--xla_gpu_autotune_level=0" in warning and "--xla_gpu_autotune_level=1" in warning
  assert xla_flags.slow_flag_warnings("--xla_gpu_autotune_level=0", "cpu") == []
  assert xla_flags.slow_flag_warnings("--xla_gpu_autotune_level=1 --xla_gpu_enable_triton_gemm", "gpu") == []
  assert xla_flags.slow_flag_warnings("", "gpu") == []
