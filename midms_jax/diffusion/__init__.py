"""Diffusion side of MIDMs: noise schedules (and, built on them, the DDIM sampling used by the
loop)."""

from midms_jax.diffusion.schedule import DDIMSchedule, DiffusionSchedule, HijackStep, make_beta_schedule

__all__ = ["DDIMSchedule", "DiffusionSchedule", "HijackStep", "make_beta_schedule"]
