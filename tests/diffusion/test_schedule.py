"""Diffusion schedules vs the official buffers (schedule.npz) and the reference values of the
spec."""

import dataclasses

import numpy as np
import pytest

from midms_jax.diffusion.schedule import DDIMSchedule, DiffusionSchedule, make_beta_schedule
from tests.conftest import load_fixture

LDM_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
DDIM_BUFFERS = (
    "ddim_alphas",
    "ddim_alphas_prev",
    "ddim_sigmas",
    "ddim_sqrt_one_minus_alphas",
    "ddim_sigmas_for_original_num_steps",
)
DDIM_CASES = [("ddim_S16_eta0", 16, 0.0), ("ddim_S200_eta1", 200, 1.0)]


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
  return load_fixture("schedule.npz")


@pytest.fixture(scope="module")
def schedule() -> DiffusionSchedule:
  return DiffusionSchedule.linear()


def _assert_ulp(actual: np.ndarray, expected: np.ndarray) -> None:
  assert actual.dtype == expected.dtype == np.float32 and actual.shape == expected.shape
  np.testing.assert_array_max_ulp(actual, expected, maxulp=1)


@pytest.mark.parametrize("name", LDM_BUFFERS)
def test_ldm_buffers(reference, schedule, name):
  _assert_ulp(getattr(schedule, name), reference[f"ldm/{name}"])


def test_buffers_by_state_dict_name(schedule):
  assert tuple(schedule.buffers()) == LDM_BUFFERS
  assert schedule.num_timesteps == 1000


@pytest.mark.parametrize("prefix, steps, eta", DDIM_CASES)
def test_ddim_buffers(reference, schedule, prefix, steps, eta):
  ddim = DDIMSchedule.make(schedule, steps, eta)
  np.testing.assert_array_equal(ddim.ddim_timesteps, reference[f"{prefix}/ddim_timesteps"])
  np.testing.assert_array_equal(ddim.time_range, reference[f"{prefix}/time_range"])
  assert ddim.ddim_timesteps.dtype == np.int64
  for name in DDIM_BUFFERS:
    _assert_ulp(getattr(ddim, name), reference[f"{prefix}/{name}"])


def test_reference_alphas_cumprod(schedule):
  """Section 3.5 of the spec (6 decimals)."""
  values = {
      0: 0.998500,
      1: 0.996994,
      63: 0.893378,
      96: 0.830966,
      101: 0.821146,
      125: 0.772896,
      187: 0.642425,
      249: 0.510514,
      311: 0.385960,
      999: 0.000142,
  }
  for t, value in values.items():
    assert abs(schedule.alphas_cumprod[t] - value) <= 5e-7, t


def test_ddim_timesteps_layout(schedule):
  ddim = DDIMSchedule.make(schedule, 16)
  assert ddim.total_steps == 17
  np.testing.assert_array_equal(ddim.ddim_timesteps, np.arange(17) * 62 + 1)
  # a_prev of the first step is ā0, not 1
  assert ddim.ddim_alphas_prev[0] == schedule.alphas_cumprod[0]
  np.testing.assert_array_equal(
      DDIMSchedule.make(schedule, 8).ddim_timesteps, np.arange(8) * 125 + 1
  )
  assert np.all(DDIMSchedule.make(schedule, 16, eta=0.0).ddim_sigmas == 0)


def test_hijack_steps_of_the_interleaved_loop(schedule):
  """Table of section 1.4: the 16-step loop with t_list = [12, 13, 14, 15]."""
  ddim = DDIMSchedule.make(schedule, 16, 0.0)
  table = {  # k: (U-Net t, index, a_t, a_prev)
      12: (249, 4, 0.510514, 0.642425),
      13: (187, 3, 0.642425, 0.772896),
      14: (125, 2, 0.772896, 0.893378),
      15: (63, 1, 0.893378, 0.996994),
  }
  assert ddim.hijack_step(12).noise_t == 311  # the off-by-one noise level of the first step
  for k, (t, index, a_t, a_prev) in table.items():
    step = ddim.hijack_step(k)
    assert step.noise_t == ddim.time_range[k - 1]
    assert (step.t, step.index) == (t, index)
    assert abs(step.a_t - a_t) <= 5e-7 and abs(step.a_prev - a_prev) <= 5e-7
    assert step.a_t == ddim.ddim_alphas[index] == schedule.alphas_cumprod[t]
    assert step.sigma == 0.0
    assert step.sqrt_one_minus_a_t == ddim.ddim_sqrt_one_minus_alphas[index]


def test_refinement_sampling_steps(schedule):
  """Inference refinement ``sample(200, eta=1, hijack_step=180)``: noise to 101, denoise at 96, 91,
  ..., 1."""
  ddim = DDIMSchedule.make(schedule, 200, 1.0)
  noise_t, ts, indices = ddim.sampling_steps(180)
  assert noise_t == 101
  np.testing.assert_array_equal(ts, np.arange(96, 0, -5))
  np.testing.assert_array_equal(indices, np.arange(19, -1, -1))
  np.testing.assert_array_equal(ddim.ddim_timesteps[indices], ts)
  assert np.all(ddim.ddim_sigmas[indices] > 0)


def test_other_beta_schedules():
  torch = pytest.importorskip("torch")
  ramp = torch.linspace(0.0015, 0.0195, 1000, dtype=torch.float64).numpy()
  np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 1000), ramp, rtol=1e-15)
  np.testing.assert_allclose(make_beta_schedule("sqrt", 1000), ramp**0.5, rtol=1e-15)
  np.testing.assert_allclose(
      make_beta_schedule("linear", 1000), DiffusionSchedule.linear().betas, rtol=1e-7
  )
  # cosine: ā_t = f(t+1) / f(0) with f(t) = cos²((t/T + s)/(1 + s)·π/2), until betas are clipped at
  # 0.999.
  cosine = DiffusionSchedule.make("cosine", 1000)
  f = np.cos((np.arange(1001) / 1000 + 8e-3) / (1 + 8e-3) * np.pi / 2) ** 2
  np.testing.assert_allclose(
      cosine.alphas_cumprod[:990], (f[1:] / f[0])[:990], rtol=1e-5, atol=1e-9
  )
  assert cosine.betas.max() <= np.float32(0.999)


def test_schedules_are_immutable(schedule):
  with pytest.raises(dataclasses.FrozenInstanceError):
    schedule.betas = schedule.betas
  with pytest.raises(ValueError):
    schedule.betas[0] = 0.0
  ddim = DDIMSchedule.make(schedule, 16)
  with pytest.raises(ValueError):
    ddim.time_range[0] = 0


def test_bad_arguments_raise(schedule):
  with pytest.raises(ValueError, match="unknown beta schedule"):
    DiffusionSchedule.make("quadratic")
  with pytest.raises(ValueError, match="num_steps"):
    DDIMSchedule.make(schedule, 0)
  with pytest.raises(ValueError, match="beyond the last DDPM step"):
    # 1000 // 300 = 3 reaches timestep 1000, as in the official code
    DDIMSchedule.make(schedule, 300)
  ddim = DDIMSchedule.make(schedule, 16)
  for k in (0, 17):
    with pytest.raises(ValueError, match="hijack step"):
      ddim.hijack_step(k)
