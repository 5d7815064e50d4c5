"""Diffusion noise schedules: LDM's DDPM buffers and the DDIM sub-schedules MIDMs samples with.

Plain numpy, built once on the host (no JAX needed). Every buffer is computed with the same
precision mix as the official PyTorch code so that it agrees to within 1 ulp (bit for bit except
where PyTorch's vectorised float32 ``sqrt`` is not correctly rounded):

* ``DiffusionSchedule`` (LDM ``DDPM.register_schedule``): float64 math, stored as float32.
* ``DDIMSchedule`` (MIDMs ``DDIMSampler.make_schedule``): derived from those *float32* buffers, with
  ``sqrt(1 - a)`` in float32 and the sigmas in a float32/float64 mix (see ``DDIMSchedule.make``).

Index conventions of the MIDMs sampler (``time_range``, ``index = total_steps - k - 1`` and the
off-by-one noise level of a hijacked first step) are exposed by ``DDIMSchedule.hijack_step`` and
``DDIMSchedule.sampling_steps``.
"""

import dataclasses
from typing import NamedTuple

import numpy as np

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def _frozen(array: np.ndarray, dtype) -> np.ndarray:
  out = np.array(array, dtype=dtype)
  out.setflags(write=False)
  return out


def make_beta_schedule(
    name: str,
    timesteps: int,
    linear_start: float = 0.0015,
    linear_end: float = 0.0195,
    cosine_s: float = 8e-3,
) -> np.ndarray:
  """float64 betas of LDM's ``make_beta_schedule``.

  Names as in LDM (note its naming): ``linear`` is linear in sqrt(beta), ``sqrt_linear`` is linear
  in beta, ``sqrt`` is the square root of a linear ramp, ``cosine`` is the improved-DDPM schedule.
  """
  if timesteps < 1:
    raise ValueError(f"beta schedule: timesteps must be >= 1, got {timesteps}")
  if name == "linear":
    return np.linspace(linear_start**0.5, linear_end**0.5, timesteps) ** 2
  if name == "cosine":
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps + cosine_s
    alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
    alphas = alphas / alphas[0]
    return np.clip(1 - alphas[1:] / alphas[:-1], 0.0, 0.999)
  if name == "sqrt_linear":
    return np.linspace(linear_start, linear_end, timesteps)
  if name == "sqrt":
    return np.linspace(linear_start, linear_end, timesteps) ** 0.5
  raise ValueError(f"unknown beta schedule {name!r}; expected one of {BETA_SCHEDULES}")


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionSchedule:
  """LDM's DDPM schedule buffers (float32, read-only), named like the PyTorch buffers."""

  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  log_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray

  @classmethod
  def from_betas(cls, betas: np.ndarray) -> "DiffusionSchedule":
    """All buffers from float64 betas (LDM ``register_schedule`` with ``v_posterior = 0``)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not betas.size:
      raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    buffers = dict(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    )
    return cls(**{name: _frozen(value, np.float32) for name, value in buffers.items()})

  @classmethod
  def make(
      cls,
      beta_schedule: str = "linear",
      timesteps: int = 1000,
      linear_start: float = 0.0015,
      linear_end: float = 0.0195,
      cosine_s: float = 8e-3,
  ) -> "DiffusionSchedule":
    """Schedule by beta-schedule name; the defaults are the MIDMs/LDM CelebA-HQ config."""
    return cls.from_betas(
        make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
    )

  @classmethod
  def linear(
      cls, timesteps: int = 1000, linear_start: float = 0.0015, linear_end: float = 0.0195
  ) -> "DiffusionSchedule":
    """LDM's default ``linear`` (linear in sqrt(beta)) schedule."""
    return cls.make("linear", timesteps, linear_start, linear_end)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  def buffers(self) -> dict[str, np.ndarray]:
    """The 12 buffers by their PyTorch state-dict name (e.g. ``diff_model.<name>`` in a MIDMs
    checkpoint)."""
    return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


class HijackStep(NamedTuple):
  """One ``one_step_sample(hijack_step=k)`` call of the MIDMs sampler."""

  noise_t: (
      int  # time_range[k-1]: level ``q_sample`` noises the clean latent to (first loop step only)
  )
  t: int  # time_range[k]: timestep given to the U-Net
  index: int  # total_steps - k - 1: row of the ddim_* buffers
  a_t: float
  a_prev: float
  sigma: float
  sqrt_one_minus_a_t: float


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSchedule:
  """MIDMs' ``DDIMSampler.make_schedule(S, eta)`` buffers (uniform discretisation), read-only.

  ``ddim_timesteps = arange(0, T, T // S) + 1``, which has more than S entries when S does not
  divide T (S=16 gives 17). Row i of every ``ddim_*`` array belongs to ``ddim_timesteps[i]``.
  """

  num_steps: int
  eta: float
  ddim_timesteps: np.ndarray
  ddim_alphas: np.ndarray
  ddim_alphas_prev: np.ndarray
  ddim_sigmas: np.ndarray
  ddim_sqrt_one_minus_alphas: np.ndarray
  ddim_sigmas_for_original_num_steps: np.ndarray

  @classmethod
  def make(cls, schedule: DiffusionSchedule, num_steps: int, eta: float = 0.0) -> "DDIMSchedule":
    """Builds the sub-schedule from the float32 DDPM buffers, reproducing the official dtypes.

    ``sqrt(1 - a)`` and the full-length sigmas are float32 math. ``ddim_sigmas`` is float64 math on
    the float32 alphas except ``1 / (1 - a)``: in the official numpy/torch expression
    ``(1 - a_prev) / (1 - a)`` the divisor is a float32 tensor, so torch evaluates it as
    ``reciprocal(1 - a)`` in float32 times a float64 array (a clean float64 formula differs by 1 ulp
    in 29 of the 200 eta=1 entries).
    """
    total = schedule.num_timesteps
    if not 1 <= num_steps <= total:
      raise ValueError(f"DDIM: num_steps must be in [1, {total}], got {num_steps}")
    timesteps = np.arange(0, total, total // num_steps, dtype=np.int64) + 1
    if timesteps[-1] >= total:
      raise ValueError(
          f"DDIM: num_steps={num_steps} gives timestep {timesteps[-1]} beyond the last DDPM step "
          f"{total - 1} (the official uniform discretisation fails there too)"
      )
    ac = schedule.alphas_cumprod
    a = ac[timesteps]
    a_prev = np.concatenate([ac[:1], ac[timesteps[:-1]]])
    one = np.float32(1.0)
    a_prev64 = a_prev.astype(np.float64)
    recip_one_minus_a = (one / (one - a)).astype(np.float64)
    sigmas = eta * np.sqrt(
        recip_one_minus_a * (1.0 - a_prev64) * (1.0 - a.astype(np.float64) / a_prev64)
    )
    acp = schedule.alphas_cumprod_prev
    sigmas_full = np.float32(eta) * np.sqrt((one - acp) / (one - ac) * (one - ac / acp))
    return cls(
        num_steps=num_steps,
        eta=float(eta),
        ddim_timesteps=_frozen(timesteps, np.int64),
        ddim_alphas=_frozen(a, np.float32),
        ddim_alphas_prev=_frozen(a_prev, np.float32),
        ddim_sigmas=_frozen(sigmas, np.float32),
        ddim_sqrt_one_minus_alphas=_frozen(np.sqrt(one - a), np.float32),
        ddim_sigmas_for_original_num_steps=_frozen(sigmas_full, np.float32),
    )

  @property
  def total_steps(self) -> int:
    """Number of DDIM timesteps (``len(ddim_timesteps)``, 17 for S=16)."""
    return self.ddim_timesteps.shape[0]

  @property
  def time_range(self) -> np.ndarray:
    """The DDIM timesteps from noisiest to cleanest (``np.flip(ddim_timesteps)``)."""
    return self.ddim_timesteps[::-1]

  def _check_hijack(self, k: int) -> None:
    if not 1 <= k < self.total_steps:
      raise ValueError(f"DDIM: hijack step must be in [1, {self.total_steps - 1}], got {k}")

  def hijack_step(self, k: int) -> HijackStep:
    """Timesteps and coefficients of the official ``one_step_sample(hijack_step=k)``.

    Its first call noises the clean latent to ``time_range[k-1]`` but queries the U-Net at
    ``time_range[k]`` (one DDIM step less noisy): an off-by-one of the official code kept here.
    """
    self._check_hijack(k)
    index = self.total_steps - k - 1
    return HijackStep(
        noise_t=int(self.time_range[k - 1]),
        t=int(self.time_range[k]),
        index=index,
        a_t=float(self.ddim_alphas[index]),
        a_prev=float(self.ddim_alphas_prev[index]),
        sigma=float(self.ddim_sigmas[index]),
        sqrt_one_minus_a_t=float(self.ddim_sqrt_one_minus_alphas[index]),
    )

  def sampling_steps(self, hijack_step: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(noise_t, ts, indices)`` of the official ``sample(hijack_step=h)`` (``ddim_sampling``).

    The clean latent is noised to ``time_range[h-1]``; then DDIM runs at ``ts = time_range[h:]``
    with ``indices = total_steps - 1 - (h, h+1, ...)``, i.e. from row ``total_steps - h - 1`` down
    to 0.
    """
    self._check_hijack(hijack_step)
    positions = np.arange(hijack_step, self.total_steps)
    return (
        int(self.time_range[hijack_step - 1]),
        self.time_range[hijack_step:].copy(),
        self.total_steps - 1 - positions,
    )
