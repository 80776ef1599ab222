"""x2gs-jax: 4D radiative Gaussian splatting (X2-Gaussian, PhysX-Gaussian) for continuous-time CT in JAX."""

__version__ = "0.1.0"
