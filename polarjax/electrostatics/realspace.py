"""Open-boundary (real-space) energy of Gaussian multipoles.

Pairs i ≠ j interact through the Gaussian-screened Coulomb kernel

    g(r) = k_e erf(r / (√2 σ)) / r,   k_e = 1/(4π ε0) = 90.4756 / (2π),

and the multipole interactions are its derivatives: with D = r_i − r_j,

    E_ij = (q_i + u_i·∇ + ½ Q_i:∇∇)(q_j − u_j·∇ + ½ Q_j:∇∇) g(|D|).

Writing g as h(s) of s = |D|² and h_n = dⁿh/dsⁿ, every Cartesian derivative of g is a
polynomial in D with coefficients h_n (∇g = 2h₁D, ∇∇g = 2h₁I + 4h₂DDᵀ, …). For traceless
quadrupoles the contractions reduce to the closed forms used in :func:`pair_terms`.
The h_n come from nested forward-mode derivatives of the scalar h(s), evaluated only on
real pairs (double-``where`` on s keeps gradients finite at r = 0 and on padding).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from polarjax.units import COULOMB


def _screened_kernel(sigma: float):
    """h(s) = k_e erf(√s / (√2 σ)) / √s as an elementwise function of s = r² > 0."""
    inv_width = 1.0 / (math.sqrt(2.0) * sigma)

    def h(s):
        r = jnp.sqrt(s)
        return COULOMB * jax.scipy.special.erf(inv_width * r) / r

    return h


def _derivative(f):
    """Elementwise derivative of an elementwise function (forward mode)."""

    def df(s):
        return jax.jvp(f, (s,), (jnp.ones_like(s),))[1]

    return df


def kernel_derivatives(s: jnp.ndarray, sigma: float, order: int) -> list[jnp.ndarray]:
    """[h_0, h_1, …, h_order] at s (all entries of s must be > 0)."""
    functions = [_screened_kernel(sigma)]
    for _ in range(order):
        functions.append(_derivative(functions[-1]))
    return [f(s) for f in functions]


def realspace_terms(positions, charges, dipoles, quadrupoles, atom_mask, sigma):
    """Open-boundary pair energy split by source order (i ≠ j pairs only; no self term).

    Args:
      positions: [N, 3] (Å); charges [N]; dipoles [N, 3] or None; quadrupoles [N, 3, 3]
        traceless or None; atom_mask [N] bool. Sources must be zero on masked atoms.

    Returns:
      dict with the same keys as the reciprocal version (present orders only).
    """
    num_atoms = positions.shape[0]
    pair_mask = atom_mask[:, None] & atom_mask[None, :] & ~jnp.eye(num_atoms, dtype=bool)
    d = positions[:, None, :] - positions[None, :, :]  # D = r_i − r_j, [N, N, 3]
    s = jnp.sum(d * d, axis=-1)
    s_safe = jnp.where(pair_mask, s, 1.0)
    order = 4 if quadrupoles is not None else (2 if dipoles is not None else 0)
    h = [jnp.where(pair_mask, hn, 0.0) for hn in kernel_derivatives(s_safe, sigma, order)]

    def total(pair_energy):
        return 0.5 * jnp.sum(pair_energy)

    q = charges
    terms = {"charge_charge": total(q[:, None] * q[None, :] * h[0])}
    if dipoles is not None:
        u = dipoles
        u_dot_d_i = jnp.einsum("ia,ija->ij", u, d)  # u_i · D
        u_dot_d_j = jnp.einsum("ja,ija->ij", u, d)  # u_j · D
        terms["charge_dipole"] = total(2.0 * h[1] * (q[None, :] * u_dot_d_i - q[:, None] * u_dot_d_j))
        terms["dipole_dipole"] = total(-(2.0 * h[1] * (u @ u.T) + 4.0 * h[2] * u_dot_d_i * u_dot_d_j))
    if quadrupoles is not None:
        quad = quadrupoles
        quad_d_i = jnp.einsum("iab,ijb->ija", quad, d)  # Q_i D
        quad_d_j = jnp.einsum("jab,ijb->ija", quad, d)  # Q_j D
        dqd_i = jnp.sum(d * quad_d_i, axis=-1)  # Dᵀ Q_i D
        dqd_j = jnp.sum(d * quad_d_j, axis=-1)
        terms["charge_quadrupole"] = total(2.0 * h[2] * (q[:, None] * dqd_j + q[None, :] * dqd_i))
        if dipoles is not None:
            u_quad_j = jnp.einsum("ia,ija->ij", u, quad_d_j)  # u_iᵀ Q_j D
            u_quad_i = jnp.einsum("ja,ija->ij", u, quad_d_i)  # u_jᵀ Q_i D
            terms["dipole_quadrupole"] = total(
                4.0 * h[2] * (u_quad_j - u_quad_i) + 4.0 * h[3] * (u_dot_d_i * dqd_j - u_dot_d_j * dqd_i)
            )
        quad_contract = jnp.einsum("iab,jab->ij", quad, quad)
        terms["quadrupole_quadrupole"] = total(
            2.0 * h[2] * quad_contract
            + 8.0 * h[3] * jnp.sum(quad_d_i * quad_d_j, axis=-1)
            + 4.0 * h[4] * dqd_i * dqd_j
        )
    return terms
