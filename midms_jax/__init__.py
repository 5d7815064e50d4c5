"""midms-jax: Matching Interleaved Diffusion Models (exemplar-based image translation) in JAX/Flax."""

from midms_jax import xla_flags as _xla_flags

_xla_flags.set_default_flags()

__version__ = "0.1.0"
