"""Atomic multipole sources: normalisation and the continuum self-energy.

Conventions (see docs/electrostatics.md):
  * q [N] (e), u [N, 3] (e·Å), Q [N, 3, 3] (e·Å²) is the *primitive* second moment,
    Q = Σ_a c_a x_a x_aᵀ for a cluster of charges c_a at offsets x_a, symmetrised and made
    traceless on input (not the Buckingham Θ = 1.5 × that).
  * A Gaussian-smeared source of width σ has the self-energy
    E_self = Σ_i c_q q_i² + c_u |u_i|² + c_Q ‖Q_i‖_F², with
    c_q = (1/(2ε0)) / (σ (2π)^{3/2}),  c_u = c_q / (3σ²),  c_Q = c_q / (10σ⁴).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from polarjax.units import HALF_INV_EPS0


def self_energy_coefficients(sigma: float) -> tuple[float, float, float]:
    """Coefficients ``(c_q, c_u, c_Q)`` of the continuum self-energy (eV, e, Å)."""
    c_q = HALF_INV_EPS0 / (sigma * (2.0 * math.pi) ** 1.5)
    return c_q, c_q / (3.0 * sigma**2), c_q / (10.0 * sigma**4)


def traceless_symmetric(quadrupoles: jnp.ndarray) -> jnp.ndarray:
    """Symmetrise and remove the trace: [..., 3, 3] → [..., 3, 3]."""
    sym = 0.5 * (quadrupoles + jnp.swapaxes(quadrupoles, -1, -2))
    trace = jnp.trace(sym, axis1=-2, axis2=-1)
    return sym - trace[..., None, None] * jnp.eye(3, dtype=sym.dtype) / 3.0


def self_energy(
    charges: jnp.ndarray,
    dipoles: jnp.ndarray | None,
    quadrupoles: jnp.ndarray | None,
    sigma: float,
) -> jnp.ndarray:
    """Continuum self-energy (eV) of Gaussian multipoles; sources must already be masked.

    Args:
      charges: [N]; dipoles: [N, 3] or None; quadrupoles: [N, 3, 3] traceless or None.
    """
    c_q, c_u, c_quad = self_energy_coefficients(sigma)
    energy = c_q * jnp.sum(charges**2)
    if dipoles is not None:
        energy = energy + c_u * jnp.sum(dipoles**2)
    if quadrupoles is not None:
        energy = energy + c_quad * jnp.sum(quadrupoles**2)
    return energy
