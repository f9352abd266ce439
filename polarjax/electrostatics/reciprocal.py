"""Reciprocal-space (periodic) energy of Gaussian multipoles: the latent Ewald k-sum.

    E = (1/(2ε0 V)) Σ_k exp(−σ²|k|²/2) / |k|² |S(k)|²,
    S(k) = Σ_j (q_j + i k·u_j − ½ kᵀ Q_j k) exp(i k·r_j),

over the k-set described in :mod:`polarjax.electrostatics.kgrid`.

Fast evaluation. With fractional coordinates s_j = r_j cell⁻¹ and k = n G (G = 2π cell⁻ᵀ),
exp(i k·r_j) = Π_d exp(2πi n_d s_jd) factorises over the three integer components, and
the multipole weight is a polynomial in n: k·u_j = Σ_d n_d a_jd with a_j = G u_j and
kᵀQ_jk = nᵀ B_j n with B_j = G Q_j Gᵀ. So S on the whole grid is a sum of at most ten
"channels"

    T_c(n1, n2, n3) = Σ_j coef_jc e1_j(n1) e2_j(n2) e3_j(n3),   coef ∈ {q, a_d, B_de},

and T is one dense matrix product  [coef ⊗ e1]ᵀ [e2 ⊗ e3]  of shapes [N, C·A] and
[N, B·Z], chunked over atoms so that memory stays bounded for large N. Positions enter
only through s (phases), the cell only through G and V, which makes the strain
derivative (stress) exact.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from polarjax.electrostatics.kgrid import grid_bounds_of
from polarjax.units import HALF_INV_EPS0

#: Upper bound on the number of floats in one chunk of the [chunk, 2·B·Z] phase matrix.
DEFAULT_CHUNK_FLOATS = 2**22

# Order of the six independent components of a symmetric 3x3 tensor.
_SYM_INDEX = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


class StructureFactor(NamedTuple):
    """S(n) on the half-space grid, split by source order; each [A, B, Z] complex or None."""

    charge: jnp.ndarray
    dipole: jnp.ndarray | None
    quadrupole: jnp.ndarray | None


def _channel_coefficients(charges, dipoles, quadrupoles, recip):
    """Per-atom channel coefficients [N, C] (C = 1, 4, 7 or 10)."""
    columns = [charges[:, None]]
    if dipoles is not None:
        columns.append(dipoles @ recip.T)  # a_jd = b_d · u_j
    if quadrupoles is not None:
        b = jnp.einsum("di,nij,ej->nde", recip, quadrupoles, recip)  # B_j = G Q_j Gᵀ
        columns.append(jnp.stack([b[:, d, e] for d, e in _SYM_INDEX], axis=-1))
    return jnp.concatenate(columns, axis=-1)


def _phase_table(frac_1d, max_n, symmetric):
    """exp(2πi n s) for n = 0..max_n (or −max_n..max_n when ``symmetric``).

    Computed as powers z**n of z = exp(2πi s) by a cumulative product: one sin/cos per
    atom, and (unlike elementwise cos/sin) XLA cannot fuse it into the large outer
    products downstream, where it would be re-evaluated for every grid point.

    Args:
      frac_1d: [N] fractional coordinates along one cell vector.

    Returns:
      [N, K] complex, K = max_n + 1 or 2 max_n + 1.
    """
    z = jnp.exp(2j * jnp.pi * frac_1d)
    powers = jnp.cumprod(jnp.broadcast_to(z[:, None], (z.shape[0], max_n)), axis=1)
    ones = jnp.ones((z.shape[0], 1), z.dtype)
    if symmetric:
        table = jnp.concatenate([jnp.conj(powers[:, ::-1]), ones, powers], axis=1)
    else:
        table = jnp.concatenate([ones, powers], axis=1)
    return table


def _channel_sums_block(frac, coef, bounds):
    """T for one block of atoms: [C, A, B, Z] complex.

    Two equivalent contractions; the one with the smaller per-atom intermediate is used:
      * [coef ⊗ e1 ⊗ e2] (n × C·A·B) times e3 (n × Z), when C·A < Z;
      * [coef ⊗ e1] (n × C·A) times [e2 ⊗ e3] (n × B·Z), otherwise.
    The outer products are written as einsums (dot_general), whose transposes XLA
    evaluates as fast batched contractions in the backward pass; the large product of the
    second form uses three real matrix products instead of four (Gauss).

    Args:
      frac: [n, 3] fractional coordinates in [0, 1).
      coef: [n, C] channel coefficients.
      bounds: static (M1, M2, M3).
    """
    m1, m2, m3 = bounds
    e1 = _phase_table(frac[:, 0], m1, symmetric=False)
    e2 = _phase_table(frac[:, 1], m2, symmetric=True)
    e3 = _phase_table(frac[:, 2], m3, symmetric=True)
    n, num_channels = coef.shape
    coef = coef.astype(e1.dtype)
    if num_channels * (m1 + 1) < 2 * m3 + 1:
        left = jnp.einsum("nc,na,nb->ncab", coef, e1, e2).reshape(n, -1)
        return (left.T @ e3).reshape(num_channels, m1 + 1, 2 * m2 + 1, 2 * m3 + 1)
    else:
        left = jnp.einsum("nc,na->nca", coef, e1).reshape(n, -1)
        right = jnp.einsum("nb,nz->nbz", e2, e3).reshape(n, -1)
    return _complex_gram(left, right).reshape(num_channels, m1 + 1, 2 * m2 + 1, 2 * m3 + 1)


def _complex_gram(left, right):
    """leftᵀ @ right for complex [n, p] and [n, r] with three real products (Gauss)."""
    lr, li = jnp.real(left), jnp.imag(left)
    rr, ri = jnp.real(right), jnp.imag(right)
    p1 = lr.T @ rr
    p2 = li.T @ ri
    p3 = (lr + li).T @ (rr + ri)
    return jax.lax.complex(p1 - p2, p3 - p1 - p2)


def _block_floats(num_channels, bounds):
    """Floats per atom of the larger intermediate of :func:`_channel_sums_block`."""
    m1, m2, m3 = bounds
    if num_channels * (m1 + 1) < 2 * m3 + 1:
        return 2 * num_channels * (m1 + 1) * (2 * m2 + 1)
    return 2 * (2 * m2 + 1) * (2 * m3 + 1) + 2 * num_channels * (m1 + 1)


def channel_sums(frac, coef, bounds, chunk_floats: int = DEFAULT_CHUNK_FLOATS):
    """T_c(n) = Σ_j coef_jc exp(2πi n·s_j) on the half-space grid.

    Args:
      frac: [N, 3] fractional coordinates.
      coef: [N, C] real coefficients (zero for padding atoms).
      bounds: static grid bounds (M1, M2, M3).
      chunk_floats: bound on the size of one atom block's intermediate (atoms are
        processed in blocks under ``lax.scan`` + ``checkpoint`` so memory stays flat in N).

    Returns:
      [C, A, B, Z] complex channel sums, A = M1 + 1, B = 2 M2 + 1, Z = 2 M3 + 1.
    """
    num_atoms, num_channels = coef.shape
    frac = frac - jnp.floor(frac)  # exact periodicity; better phase precision
    max_block = max(8, chunk_floats // _block_floats(num_channels, bounds))
    num_blocks = -(-num_atoms // max_block)
    if num_blocks == 1:
        return _channel_sums_block(frac, coef, bounds)
    block = -(-num_atoms // num_blocks)  # balanced blocks: at most num_blocks − 1 padding rows
    pad = num_blocks * block - num_atoms
    frac_blocks = jnp.pad(frac, ((0, pad), (0, 0))).reshape(num_blocks, block, 3)
    coef_blocks = jnp.pad(coef, ((0, pad), (0, 0))).reshape(num_blocks, block, num_channels)

    @jax.checkpoint
    def body(total, blocks):
        return total + _channel_sums_block(blocks[0], blocks[1], bounds), None

    m1, m2, m3 = bounds
    dtype = jnp.result_type(coef.dtype, jnp.complex64)
    init = jnp.zeros((num_channels, m1 + 1, 2 * m2 + 1, 2 * m3 + 1), dtype=dtype)
    total, _ = jax.lax.scan(body, init, (frac_blocks, coef_blocks))
    return total


def _grid_integers(bounds, dtype):
    """Integer grid coordinates n1 [A,1,1], n2 [1,B,1], n3 [1,1,Z] as floats."""
    m1, m2, m3 = bounds
    n1 = jnp.arange(0, m1 + 1, dtype=dtype)[:, None, None]
    n2 = jnp.arange(-m2, m2 + 1, dtype=dtype)[None, :, None]
    n3 = jnp.arange(-m3, m3 + 1, dtype=dtype)[None, None, :]
    return n1, n2, n3


def structure_factor(positions, cell, charges, dipoles, quadrupoles, bounds, chunk_floats=DEFAULT_CHUNK_FLOATS):
    """S(n) split by source order on the half-space grid of ``bounds``.

    Args:
      positions: [N, 3]; cell: [3, 3] (rows); charges [N]; dipoles [N, 3] or None;
      quadrupoles [N, 3, 3] traceless or None (all masked already).

    Returns:
      StructureFactor with [A, B, Z] complex parts (None for absent orders).
    """
    recip = 2.0 * jnp.pi * jnp.linalg.inv(cell).T
    frac = positions @ jnp.linalg.inv(cell)
    coef = _channel_coefficients(charges, dipoles, quadrupoles, recip)
    t = channel_sums(frac, coef, bounds, chunk_floats)
    n = _grid_integers(bounds, positions.dtype)
    s_charge = t[0]
    s_dipole = s_quad = None
    offset = 1
    if dipoles is not None:
        s_dipole = 1j * (n[0] * t[1] + n[1] * t[2] + n[2] * t[3])
        offset = 4
    if quadrupoles is not None:
        s_quad = jnp.zeros_like(s_charge)
        for c, (d, e) in enumerate(_SYM_INDEX):
            factor = 1.0 if d == e else 2.0
            s_quad = s_quad + factor * n[d] * n[e] * t[offset + c]
        s_quad = -0.5 * s_quad
    return StructureFactor(s_charge, s_dipole, s_quad)


def kspace_kernel(cell, kweights, sigma):
    """w(n) exp(−σ²|k|²/2) / |k|² · (1/(2ε0 V)) on the grid, zero where w = 0.

    Args:
      cell: [3, 3]; kweights: [A, B, Z] half-space weights.
    """
    bounds = grid_bounds_of(kweights.shape)
    recip = 2.0 * jnp.pi * jnp.linalg.inv(cell).T
    metric = recip @ recip.T
    n = _grid_integers(bounds, cell.dtype)
    k2 = sum(metric[d, e] * n[d] * n[e] for d in range(3) for e in range(3))
    selected = kweights > 0
    k2_safe = jnp.where(selected, k2, 1.0)
    volume = jnp.abs(jnp.linalg.det(cell))
    kernel = kweights * jnp.exp(-0.5 * sigma**2 * k2_safe) / k2_safe
    return jnp.where(selected, kernel, 0.0) * (HALF_INV_EPS0 / volume)


def _pair(kernel, s_a, s_b):
    """Σ_n kernel Re(s_a s_b*) (one ordered pair of source orders)."""
    return jnp.sum(kernel * jnp.real(s_a * jnp.conj(s_b)))


def reciprocal_terms(positions, cell, charges, dipoles, quadrupoles, kweights, sigma, chunk_floats=DEFAULT_CHUNK_FLOATS):
    """The k-sum energy split by source orders (self-interaction included).

    Returns:
      dict with keys charge_charge, charge_dipole, dipole_dipole, charge_quadrupole,
      dipole_quadrupole, quadrupole_quadrupole (only those whose sources are present).
    """
    bounds = grid_bounds_of(kweights.shape)
    sf = structure_factor(positions, cell, charges, dipoles, quadrupoles, bounds, chunk_floats)
    kernel = kspace_kernel(cell, kweights, sigma)
    terms = {"charge_charge": _pair(kernel, sf.charge, sf.charge)}
    if sf.dipole is not None:
        terms["charge_dipole"] = 2.0 * _pair(kernel, sf.charge, sf.dipole)
        terms["dipole_dipole"] = _pair(kernel, sf.dipole, sf.dipole)
    if sf.quadrupole is not None:
        terms["charge_quadrupole"] = 2.0 * _pair(kernel, sf.charge, sf.quadrupole)
        if sf.dipole is not None:
            terms["dipole_quadrupole"] = 2.0 * _pair(kernel, sf.dipole, sf.quadrupole)
        terms["quadrupole_quadrupole"] = _pair(kernel, sf.quadrupole, sf.quadrupole)
    return terms
