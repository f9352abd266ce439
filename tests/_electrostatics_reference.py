"""Independent NumPy references for the electrostatics tests (no polarjax code is used here).

Everything is written from the conventions of docs/electrostatics.md (issue 2, section 3):

* units eV, Å, e;  1/(2 eps0) = 90.4756,  k_e = 1/(4 pi eps0) = 90.4756 / (2 pi);
* periodic: E = (1/(2 eps0 V)) Σ_{k in set} exp(-σ²k²/2)/k² |S(k)|²  (full k-space set, both
  k and -k), S(k) = Σ_j (q_j + i k·u_j - ½ kᵀQ_j k) exp(i k·r_j);
* open: pairs i ≠ j through g(r) = k_e erf(r/(√2σ))/r and its Cartesian derivatives;
* self energy E_self = Σ c_q q² + c_u |u|² + c_Q ‖Q‖_F² with the coefficients below.

The open-boundary multipole tensors are built here from the radial functions
B_n = (-(1/r) d/dr)^n B_0 of B_0 = erf(a r)/r (a = 1/(√2σ)), via the recursion
B_n = [(2n-1) B_{n-1} - (2a²)^n/(a√π) exp(-a²r²)] / r², which is a different route from
the library's (derivatives with respect to r² by forward-mode autodiff).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

HALF_INV_EPS0_REF = 90.4756
COULOMB_REF = 90.4756 / (2.0 * math.pi)


# ----------------------------------------------------------------------------- sources


def clean_quadrupoles(quadrupoles: np.ndarray) -> np.ndarray:
    """Symmetrise and remove the trace."""
    quadrupoles = np.asarray(quadrupoles, dtype=np.float64)
    sym = 0.5 * (quadrupoles + np.swapaxes(quadrupoles, -1, -2))
    trace = np.trace(sym, axis1=-2, axis2=-1)
    return sym - trace[..., None, None] * np.eye(3) / 3.0


def self_coefficients(sigma: float) -> tuple[float, float, float]:
    """(c_q, c_u, c_Q) from the coincidence limit of the erf kernel.

    With g(r) = k_e erf(a r)/r = k_e (2a/√π)(1 - a²r²/3 + a⁴r⁴/10 - ...), the self energy of a
    Gaussian source is ½ O(∂) O(-∂) g at r = 0, giving
      c_q = ½ k_e 2a/√π,   c_u = c_q · 2a²/3 = c_q/(3σ²),   c_Q = c_q · 2a⁴/5 = c_q/(10σ⁴).
    """
    a = 1.0 / (math.sqrt(2.0) * sigma)
    c_q = 0.5 * COULOMB_REF * 2.0 * a / math.sqrt(math.pi)
    return c_q, c_q * 2.0 * a**2 / 3.0, c_q * 2.0 * a**4 / 5.0


def self_energy_ref(charges, dipoles=None, quadrupoles=None, sigma=1.0) -> float:
    c_q, c_u, c_quad = self_coefficients(sigma)
    energy = c_q * np.sum(np.asarray(charges) ** 2)
    if dipoles is not None:
        energy += c_u * np.sum(np.asarray(dipoles) ** 2)
    if quadrupoles is not None:
        energy += c_quad * np.sum(clean_quadrupoles(quadrupoles) ** 2)
    return float(energy)


# ----------------------------------------------------------------------------- k-space


def kvectors_full(cell: np.ndarray, dl: float) -> np.ndarray:
    """All k of the latent-Ewald set (both k and -k), [K, 3], brute-force enumeration."""
    cell = np.asarray(cell, dtype=np.float64)
    bounds = [max(1, int(math.floor(np.linalg.norm(row) / dl))) for row in cell]
    recip = 2.0 * np.pi * np.linalg.inv(cell).T
    n = np.array(list(itertools.product(*[range(-m, m + 1) for m in bounds])), dtype=np.float64)
    k = n @ recip
    k2 = np.sum(k * k, axis=-1)
    keep = (k2 > 0.0) & (k2 <= (2.0 * np.pi / dl) ** 2)
    return k[keep]


def cutoff_gap(cell: np.ndarray, dl: float) -> float:
    """Smallest relative distance of any |k|² in the bounding box from the cutoff (2π/dl)²."""
    cell = np.asarray(cell, dtype=np.float64)
    bounds = [max(1, int(math.floor(np.linalg.norm(row) / dl))) for row in cell]
    recip = 2.0 * np.pi * np.linalg.inv(cell).T
    n = np.array(list(itertools.product(*[range(-m, m + 1) for m in bounds])), dtype=np.float64)
    k2 = np.sum((n @ recip) ** 2, axis=-1)
    kc2 = (2.0 * np.pi / dl) ** 2
    return float(np.min(np.abs(k2 - kc2)) / kc2)


def periodic_energy_ref(positions, cell, charges, dipoles=None, quadrupoles=None, sigma=1.0, dl=2.0,
                        remove_self_interaction=True) -> float:
    """Direct full-space k-sum of the convention, minus E_self when asked."""
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    k = kvectors_full(cell, dl)
    k2 = np.sum(k * k, axis=-1)
    phase = np.exp(1j * positions @ k.T)  # [N, K]
    amplitude = np.asarray(charges, dtype=np.float64)[:, None] + 0j
    if dipoles is not None:
        amplitude = amplitude + 1j * (np.asarray(dipoles) @ k.T)
    if quadrupoles is not None:
        quad = clean_quadrupoles(quadrupoles)
        amplitude = amplitude - 0.5 * np.einsum("ka,nab,kb->nk", k, quad, k)
    s = np.sum(amplitude * phase, axis=0)
    volume = abs(np.linalg.det(cell))
    energy = HALF_INV_EPS0_REF / volume * np.sum(np.exp(-0.5 * sigma**2 * k2) / k2 * np.abs(s) ** 2)
    if remove_self_interaction:
        energy -= self_energy_ref(charges, dipoles, quadrupoles, sigma)
    return float(energy)


# ----------------------------------------------------------------------------- open boundaries


def radial_functions(r: np.ndarray, sigma: float, order: int) -> list[np.ndarray]:
    """[B_0, ..., B_order] of k_e erf(a r)/r at r > 0."""
    a = 1.0 / (math.sqrt(2.0) * sigma)
    gauss = np.exp(-(a * r) ** 2)
    out = [COULOMB_REF * np.vectorize(math.erf)(a * r) / r]
    for n in range(1, order + 1):
        out.append((2 * n - 1) * out[-1] / r**2
                   - COULOMB_REF * (2.0 * a**2) ** n / (a * math.sqrt(math.pi)) * gauss / r**2)
    return out


def kernel_tensors(d: np.ndarray, sigma: float):
    """T_n = ∂ⁿ g(D)/∂Dⁿ for n = 0..4, for D = d [P, 3]."""
    r = np.linalg.norm(d, axis=-1)
    b0, b1, b2, b3, b4 = radial_functions(r, sigma, 4)
    eye = np.eye(3)
    t0 = b0
    t1 = -d * b1[:, None]
    t2 = np.einsum("pa,pb->pab", d, d) * b2[:, None, None] - eye * b1[:, None, None]
    sym3 = (np.einsum("ab,pc->pabc", eye, d) + np.einsum("ac,pb->pabc", eye, d) + np.einsum("bc,pa->pabc", eye, d))
    t3 = -np.einsum("pa,pb,pc->pabc", d, d, d) * b3[:, None, None, None] + sym3 * b2[:, None, None, None]
    dd = np.einsum("pa,pb->pab", d, d)
    sym4_dd = sum(np.einsum(f"{x},p{y}->pabcd", eye, dd) for x, y in
                  (("ab", "cd"), ("ac", "bd"), ("ad", "bc"), ("bc", "ad"), ("bd", "ac"), ("cd", "ab")))
    sym4_ee = (np.einsum("ab,cd->abcd", eye, eye) + np.einsum("ac,bd->abcd", eye, eye)
               + np.einsum("ad,bc->abcd", eye, eye))
    t4 = (np.einsum("pa,pb,pc,pd->pabcd", d, d, d, d) * b4[:, None, None, None, None]
          - sym4_dd * b3[:, None, None, None, None] + sym4_ee[None] * b2[:, None, None, None, None])
    return t0, t1, t2, t3, t4


def open_energy_ref(positions, charges, dipoles=None, quadrupoles=None, sigma=1.0,
                    remove_self_interaction=True) -> float:
    """Σ_{i<j} (q_i + u_i·∂ + ½Q_i:∂∂)(q_j - u_j·∂ + ½Q_j:∂∂) g(D), D = r_i - r_j."""
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    q = np.asarray(charges, dtype=np.float64)
    u = np.zeros((n, 3)) if dipoles is None else np.asarray(dipoles, dtype=np.float64)
    quad = np.zeros((n, 3, 3)) if quadrupoles is None else clean_quadrupoles(quadrupoles)
    i, j = np.triu_indices(n, 1)
    t0, t1, t2, t3, t4 = kernel_tensors(positions[i] - positions[j], sigma)
    e = q[i] * q[j] * t0
    e += np.einsum("pa,pa->p", q[j, None] * u[i] - q[i, None] * u[j], t1)
    e += 0.5 * np.einsum("pab,pab->p", q[i, None, None] * quad[j] + q[j, None, None] * quad[i], t2)
    e -= np.einsum("pa,pab,pb->p", u[i], t2, u[j])
    e += 0.5 * np.einsum("pa,pbc,pabc->p", u[i], quad[j], t3)
    e -= 0.5 * np.einsum("pa,pbc,pabc->p", u[j], quad[i], t3)
    e += 0.25 * np.einsum("pab,pcd,pabcd->p", quad[i], quad[j], t4)
    energy = float(np.sum(e))
    if not remove_self_interaction:
        energy += self_energy_ref(q, u, quad, sigma)
    return energy


# ----------------------------------------------------------------------------- structures


def random_rotation(rng: np.random.Generator, proper: bool = True) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return q


def min_image_distance(positions, cell=None) -> float:
    positions = np.asarray(positions)
    best = np.inf
    shifts = [np.zeros(3)] if cell is None else [np.array(s) @ cell for s in itertools.product((-1, 0, 1), repeat=3)]
    for a in range(len(positions)):
        for b in range(len(positions)):
            for shift in shifts:
                if a == b and not np.any(shift):
                    continue
                best = min(best, np.linalg.norm(positions[a] - positions[b] + shift))
    return best


def random_sources(rng: np.random.Generator, n: int, quadrupole_trace: bool = False):
    """q, u, Q (traceless unless asked), kappa, anisotropic PSD alpha, external field."""
    q = rng.normal(size=n)
    u = 0.4 * rng.normal(size=(n, 3))
    quad = 0.3 * rng.normal(size=(n, 3, 3))
    quad = 0.5 * (quad + np.swapaxes(quad, 1, 2))
    if not quadrupole_trace:
        quad = clean_quadrupoles(quad)
    kappa = rng.uniform(0.05, 0.3, size=n)
    a = 0.4 * rng.normal(size=(n, 3, 3))
    alpha = np.einsum("nab,ncb->nac", a, a) + 0.05 * np.eye(3)
    field = np.array([0.07, -0.12, 0.04])
    return q, u, quad, kappa, alpha, field


def random_positions(rng: np.random.Generator, n: int, cell=None, box=6.0, min_dist=1.4) -> np.ndarray:
    """Random positions (fractional in ``cell`` or in a cube of side ``box``) with a minimum distance."""
    for _ in range(1000):
        if cell is not None:
            positions = rng.uniform(0.0, 1.0, size=(n, 3)) @ cell
        else:
            positions = rng.uniform(0.0, box, size=(n, 3))
        if min_image_distance(positions, cell) >= min_dist:
            return positions
    raise RuntimeError("could not place atoms")


#: A triclinic, right-handed cell (Å), rows are vectors, ~8-9.5 Å.
TRICLINIC_CELL = np.array([[8.3, 0.0, 0.0], [1.1, 8.8, 0.0], [-0.9, 0.7, 9.3]])
