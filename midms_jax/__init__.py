"""midms-jax: Matching Interleaved Diffusion Models (exemplar-based image translation) in JAX/Flax."""

__version__ = "0.1.0"
