"""polarjax: latent polarizable multipoles and Ewald electrostatics for MLIPs in JAX."""

__version__ = "0.1.0"
