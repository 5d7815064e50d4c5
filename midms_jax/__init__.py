"""midms-jax: Matching Interleaved Diffusion Models (exemplar-based image translation) in JAX/Flax.

Importing the package has no side effect; platform tuning: ``midms_jax.platform_tuning``.
"""

__version__ = "0.1.0"
