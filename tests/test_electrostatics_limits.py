"""Physical limits of the latent-Ewald electrostatics, each against an independent truth.

(a) Multipole limits. A point dipole u at r0 is the d → 0 limit of charges ±c at r0 ± d/2 with
    u = c d; a traceless quadrupole Q at r0 is the limit of six charges λ_k/(2d²) at r0 ± d v_k
    (Q = Σ_k λ_k v_k v_kᵀ), whose primitive second moment Σ c x xᵀ is exactly Q and whose
    monopole, dipole and third moment vanish. Only the interaction with OTHER sources A (charges,
    dipoles, quadrupoles on four nearby atoms) is compared. The energy is a quadratic form in the
    sources, so the interaction is the exact bilinear cross term
        E_int(A, B) = [E(A + t B) − E(A − t B)] / (2t)   (any t; small t avoids round-off from the
    huge intra-cluster energy). The cluster error is O(d²); Richardson extrapolation from d and d/2
    removes it.
(b) Madelung. See :func:`test_madelung_rock_salt` for the identity.
(c) Periodic → open. A neutral, dipole-free cluster in a cubic box of side L: the periodic energy
    minus the open energy is the interaction with the images, which for a neutral, dipole-free
    cluster starts with the quadrupole–quadrupole lattice sum
        ΔE(L) = (k_e / (8 L⁵)) Σ_abcd M_ab M_cd S_abcd + O(L⁻⁷),
    S_abcd = Σ_{n ∈ ℤ³ \\ 0} ∂_a∂_b∂_c∂_d (1/|n|), M = the cluster's total primitive second moment
    Σ_i (q_i r_i r_iᵀ + u_i r_iᵀ + r_i u_iᵀ + Q_i). (The O(L⁻⁶) quadrupole–octupole sum vanishes by
    inversion symmetry of the lattice.) The lattice sum is done by brute force in the test.
(d) Linear response: q_ind = −kappa phi, u_ind = alpha (E + E_ext), with phi and E from finite
    differences of the permanent-source energy (exact: that energy is quadratic), and the energy
    E_perm − ½ Σ kappa phi² − ½ Σ E·alpha (E + E_ext). E_ext only acts through u_ind.
"""

import itertools
import math

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np
import pytest

from polarjax.electrostatics import ewald
from polarjax.electrostatics.kgrid import kgrid_bounds, kgrid_weights

from _electrostatics_reference import (
    COULOMB_REF,
    TRICLINIC_CELL,
    clean_quadrupoles,
    random_positions,
    random_sources,
)

# ============================================================================ (a) multipole limits

SITE = np.array([4.0, 4.2, 4.5])
OTHERS = np.array([[1.5, 4.0, 4.8], [4.3, 1.6, 3.9], [6.3, 5.5, 5.0], [3.6, 5.4, 2.0]])  # 2.5-2.8 Å from SITE
NUM_SLOTS = len(OTHERS) + 1 + 6  # others, the multipole site, six cluster slots


def _zeros():
    return np.zeros(NUM_SLOTS), np.zeros((NUM_SLOTS, 3)), np.zeros((NUM_SLOTS, 3, 3))


def _sources_a():
    rng = np.random.default_rng(4)
    q, u, quad, *_ = random_sources(rng, len(OTHERS))
    charges, dipoles, quadrupoles = _zeros()
    charges[: len(OTHERS)], dipoles[: len(OTHERS)], quadrupoles[: len(OTHERS)] = q, u, quad
    return charges, dipoles, quadrupoles


def _interaction(positions, sources_b, periodic, t=1e-3):
    """Exact bilinear cross term between the sources A (on OTHERS) and B."""
    cell = TRICLINIC_CELL if periodic else np.zeros((3, 3))

    def energy(sign):
        q, u, quad = (a + sign * t * b for a, b in zip(_sources_a(), sources_b))
        return float(ewald(positions=positions, cell=cell, periodic=periodic, charges=q, dipoles=u,
                           quadrupoles=quad).energy)

    return (energy(1.0) - energy(-1.0)) / (2.0 * t)


def _slots(half_separation, axes):
    """Positions: OTHERS, SITE, then SITE ± half_separation · axis_k for three axes (rows)."""
    cluster = [SITE + sign * half_separation * axis for axis in axes for sign in (1.0, -1.0)]
    return np.concatenate([OTHERS, SITE[None], np.array(cluster)])


def _richardson(f, d):
    """Extrapolate f(d) = f0 + a d² + O(d⁴) to d = 0 from d and d/2."""
    return (4.0 * f(d / 2.0) - f(d)) / 3.0


def _orthonormal_frame(direction):
    e = direction / np.linalg.norm(direction)
    helper = np.array([1.0, 0.0, 0.0]) if abs(e[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    f = np.cross(e, helper)
    f /= np.linalg.norm(f)
    return np.stack([e, f, np.cross(e, f)])


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_dipole_is_limit_of_two_opposite_charges(periodic):
    dipole = np.array([0.3, -0.5, 0.4])
    axes = _orthonormal_frame(dipole)

    q, u, quad = _zeros()
    u[len(OTHERS)] = dipole
    exact = _interaction(_slots(0.5, axes), (q, u, quad), periodic)

    def pair(d):
        q, u, quad = _zeros()
        c = np.linalg.norm(dipole) / d
        q[len(OTHERS) + 1], q[len(OTHERS) + 2] = c, -c  # at SITE + d/2 ê and SITE − d/2 ê
        return _interaction(_slots(d / 2.0, axes), (q, u, quad), periodic)

    raw = pair(0.02)
    assert abs(exact) > 0.1
    assert 1e-7 < abs(raw - exact) / abs(exact) < 1e-4  # the pair really is only approximately a dipole
    np.testing.assert_allclose(_richardson(pair, 0.02), exact, rtol=1e-8)


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_quadrupole_is_limit_of_small_charge_cluster(periodic):
    target = clean_quadrupoles(np.array([[0.4, -0.3, 0.25], [-0.3, -0.6, 0.1], [0.25, 0.1, 0.2]]))
    eigenvalues, eigenvectors = np.linalg.eigh(target)
    axes = eigenvectors.T

    q, u, quad = _zeros()
    quad[len(OTHERS)] = target
    exact = _interaction(_slots(0.5, axes), (q, u, quad), periodic)

    def cluster(d):
        q, u, quad = _zeros()
        q[len(OTHERS) + 1:] = np.repeat(eigenvalues / (2.0 * d**2), 2)
        positions = _slots(d, axes)
        offsets = positions[len(OTHERS) + 1:] - SITE
        # the cluster really is neutral, dipole-free, with primitive second moment = target
        c = q[len(OTHERS) + 1:]
        np.testing.assert_allclose(np.sum(c), 0.0, atol=1e-9)
        np.testing.assert_allclose(c @ offsets, 0.0, atol=1e-9)
        np.testing.assert_allclose(np.einsum("a,ai,aj->ij", c, offsets, offsets), target, atol=1e-9)
        return _interaction(positions, (q, u, quad), periodic)

    raw = cluster(0.04)
    assert abs(exact) > 0.05
    assert 1e-6 < abs(raw - exact) / abs(exact) < 1e-2
    np.testing.assert_allclose(_richardson(cluster, 0.04), exact, rtol=1e-6)


# ============================================================================ (b) Madelung

MADELUNG_ROCK_SALT = 1.7475645946331822  # = 1.747565 to the 7 digits quoted in the issue


def _erfc_lattice_sum(positions, cell, charges, sigma, max_shift=3):
    """½ Σ_i Σ_j Σ_n' q_i q_j k_e erfc(|r_ij + n·cell| / (√2σ)) / |r_ij + n·cell|, brute force."""
    total = 0.0
    for shift in itertools.product(range(-max_shift, max_shift + 1), repeat=3):
        offset = np.asarray(shift, dtype=np.float64) @ cell
        for i, j in itertools.product(range(len(positions)), repeat=2):
            if i == j and not any(shift):
                continue
            r = np.linalg.norm(positions[i] - positions[j] + offset)
            total += 0.5 * charges[i] * charges[j] * COULOMB_REF * math.erfc(r / (math.sqrt(2.0) * sigma)) / r
    return total


def _gaussian_self_energy(charges, sigma, r=1e-7):
    """½ Σ q² lim_{r→0} k_e erf(r/(√2σ))/r, the coincidence limit of the pair kernel (evaluated at tiny r)."""
    return 0.5 * np.sum(charges**2) * COULOMB_REF * math.erf(r / (math.sqrt(2.0) * sigma)) / r


@pytest.mark.parametrize("structure", ["conventional", "primitive"])
def test_madelung_rock_salt(structure):
    r"""Rock salt: the converged periodic energy = Madelung − erfc short-range correction (− self).

    Identity. Write φ_σ(r) = erf(r/(√2σ))/r. The k-sum kernel exp(−σ²k²/2)/k² is the Fourier
    transform of φ_σ/(4π) (two Gaussians of width σ/√2 each), so with every k ≠ 0 kept,

        E_k = ½ Σ_i Σ_j Σ_n k_e q_i q_j φ_σ(|r_ij + n·cell|)          (i = j, n = 0 included)
            = E_self + ½ Σ' k_e q_i q_j φ_σ,                              E_self = ½ Σ q_i² k_e φ_σ(0)
            = E_self + ½ Σ' k_e q_i q_j / r − ½ Σ' k_e q_i q_j erfc(r/(√2σ)) / r
            = E_self + E_Madelung − E_short,

    where Σ' omits i = j at n = 0, and the conditionally convergent point-charge sum is the Ewald
    (tin-foil, k = 0 omitted) one, which for rock salt is E_Madelung = −(N/2) M k_e q² / (a/2),
    M = 1.747565. So ``remove_self_interaction=True`` gives E_Madelung − E_short, and ``False``
    adds E_self. E_short and E_self are computed here by brute force (lattice sum, r → 0 limit).
    σ = 1 Å and dl = 0.8 Å make exp(−σ²k_c²/2) ≈ 4e-14, i.e. the k-sum converged.
    """
    a = 5.64
    sigma, dl = 1.0, 0.8
    if structure == "conventional":
        cell = a * np.eye(3)
        frac_na = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
        positions = np.concatenate([frac_na, frac_na + np.array([0.5, 0.0, 0.0])]) * a
    else:  # the 2-atom primitive fcc cell: a triclinic (rhombohedral) cell
        cell = 0.5 * a * np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
        positions = np.array([[0.0, 0.0, 0.0], [0.5 * a, 0.0, 0.0]])
    n = len(positions)
    charges = np.array([1.0] * (n // 2) + [-1.0] * (n // 2))

    e_madelung = -(n / 2.0) * MADELUNG_ROCK_SALT * COULOMB_REF / (a / 2.0)
    e_madelung_issue = -(n / 2.0) * 1.747565 * COULOMB_REF / (a / 2.0)
    e_short = _erfc_lattice_sum(positions, cell, charges, sigma)
    e_self = _gaussian_self_energy(charges, sigma)
    assert abs(e_short) > 1e-2 * abs(e_madelung)  # the short-range correction matters at this σ

    energy = float(ewald(positions=positions, cell=cell, periodic=True, charges=charges, sigma=sigma, dl=dl).energy)
    np.testing.assert_allclose(energy, e_madelung - e_short, rtol=1e-10)
    np.testing.assert_allclose(energy, e_madelung_issue - e_short, rtol=5e-7)

    if structure == "primitive":
        energy_keep = float(ewald(positions=positions, cell=cell, periodic=True, charges=charges, sigma=sigma, dl=dl,
                                  remove_self_interaction=False).energy)
        np.testing.assert_allclose(energy_keep, e_madelung - e_short + e_self, rtol=1e-10)


# ============================================================================ (c) periodic → open


def _cubic_lattice_t4(max_norm=30):
    """S_abcd = Σ_{0 < |n| <= max_norm} ∂⁴(1/r)/∂r_a∂r_b∂r_c∂r_d at r = n (spherical truncation)."""
    r = np.arange(-max_norm, max_norm + 1)
    n = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float64)
    n2 = np.sum(n * n, axis=1)
    n = n[(n2 > 0) & (n2 <= max_norm**2)]
    norm = np.linalg.norm(n, axis=1)
    eye = np.eye(3)
    t4 = 105.0 * np.einsum("pa,pb,pc,pd,p->abcd", n, n, n, n, norm**-9)
    dd = np.einsum("pa,pb,p->ab", n, n, norm**-7)
    t4 -= 15.0 * sum(np.einsum(f"{x},{y}->abcd", eye, dd)
                     for x, y in (("ab", "cd"), ("ac", "bd"), ("ad", "bc"), ("bc", "ad"), ("bd", "ac"), ("cd", "ab")))
    t4 += 3.0 * np.sum(norm**-5) * (np.einsum("ab,cd->abcd", eye, eye) + np.einsum("ac,bd->abcd", eye, eye)
                                    + np.einsum("ad,bc->abcd", eye, eye))
    return t4


@pytest.mark.parametrize(
    "with_multipoles",
    [pytest.param(False, id="charges"), pytest.param(True, id="multipoles", marks=pytest.mark.slow)],
)
def test_periodic_approaches_open_for_neutral_cluster(with_multipoles):
    rng = np.random.default_rng(2)
    n = 8
    positions = random_positions(rng, n, None, box=4.0, min_dist=1.5)
    positions -= positions.mean(axis=0)
    # charges: neutral and with zero dipole Σ q r = 0 (null space of [1; x; y; z])
    constraints = np.vstack([np.ones(n), positions.T])
    null_space = np.linalg.svd(constraints)[2][4:]
    charges = null_space.T @ rng.normal(size=n - 4)
    charges *= 1.5 / np.max(np.abs(charges))
    dipoles = quadrupoles = None
    second_moment = np.einsum("i,ia,ib->ab", charges, positions, positions)
    if with_multipoles:
        _, dipoles, quadrupoles, *_ = random_sources(rng, n)
        dipoles -= dipoles.mean(axis=0)  # Σ u = 0: the whole cluster stays dipole-free
        second_moment += np.einsum("ia,ib->ab", dipoles, positions) + np.einsum("ia,ib->ab", positions, dipoles)
        second_moment += np.sum(quadrupoles, axis=0)
    np.testing.assert_allclose(constraints @ charges, 0.0, atol=1e-12)

    e_open = float(ewald(positions=positions, cell=np.zeros((3, 3)), periodic=False, charges=charges,
                         dipoles=dipoles, quadrupoles=quadrupoles).energy)
    lattice = _cubic_lattice_t4()
    leading = COULOMB_REF / 8.0 * np.einsum("ab,cd,abcd->", second_moment, second_moment, lattice)

    sides = (20.0, 30.0, 40.0)
    dl = 0.9  # exp(−σ² k_c²/2) ≈ 4e-11: the k-sum is converged far below the finite-size effect
    common_bounds = kgrid_bounds(np.eye(3) * max(sides), dl)  # one grid shape → one compilation
    deviations = []
    for side in sides:
        cell = np.eye(3) * side
        energy = float(ewald(positions=positions + side / 2.0, cell=cell, periodic=True, charges=charges,
                             dipoles=dipoles, quadrupoles=quadrupoles, dl=dl,
                             kweights=kgrid_weights(cell, dl, common_bounds)).energy)
        difference = energy - e_open
        predicted = leading / side**5
        assert abs(difference) < 1e-3 * abs(e_open)
        deviations.append(difference / predicted - 1.0)
    # ΔE(L) = C/L⁵ (1 + O(L⁻²)): the relative deviation from the predicted leading term is small and
    # shrinks like L⁻² (40² / 20² = 4).
    assert abs(deviations[-1]) < 0.06, deviations
    assert abs(deviations[0]) > abs(deviations[1]) > abs(deviations[2]), deviations
    assert 3.0 < deviations[0] / deviations[2] < 5.0, deviations


# ============================================================================ (d) induced response


def _response_system(periodic, scalar_alpha, seed=31):
    rng = np.random.default_rng(seed)
    n = 7
    cell = TRICLINIC_CELL if periodic else np.zeros((3, 3))
    positions = random_positions(rng, n, TRICLINIC_CELL if periodic else None, box=6.0, min_dist=1.5)
    q, u, quad, kappa, alpha, field = random_sources(rng, n)
    if scalar_alpha:
        alpha = rng.uniform(0.1, 0.6, size=n)
    return dict(positions=positions, cell=cell, periodic=periodic, charges=q, dipoles=u, quadrupoles=quad), \
        kappa, alpha, field


def _phi_and_field_by_finite_differences(system, remove_self, h=1e-2):
    """phi = ∂E_perm/∂q, E = −∂E_perm/∂u by central differences (exact for a quadratic energy)."""
    def energy(**changes):
        return float(ewald(**dict(system, **changes), remove_self_interaction=remove_self).energy)

    q, u = system["charges"], system["dipoles"]
    phi = np.zeros_like(q)
    field = np.zeros_like(u)
    for i in range(len(q)):
        step = np.zeros_like(q)
        step[i] = h
        phi[i] = (energy(charges=q + step) - energy(charges=q - step)) / (2 * h)
        for a in range(3):
            step_u = np.zeros_like(u)
            step_u[i, a] = h
            field[i, a] = -(energy(dipoles=u + step_u) - energy(dipoles=u - step_u)) / (2 * h)
    return phi, field, energy()


def _apply(alpha, vectors):
    return alpha[:, None] * vectors if alpha.ndim == 1 else np.einsum("nab,nb->na", alpha, vectors)


@pytest.mark.parametrize(
    "periodic, scalar_alpha, remove_self",
    [(True, False, True), (False, True, False)],
    ids=["periodic-tensor-alpha", "open-scalar-alpha-keep-self"],
)
def test_induced_response(periodic, scalar_alpha, remove_self):
    system, kappa, alpha, external = _response_system(periodic, scalar_alpha)
    phi, field, e_perm = _phi_and_field_by_finite_differences(system, remove_self)
    assert np.max(np.abs(field)) > 0.1 and np.max(np.abs(phi)) > 0.1

    full = ewald(**system, kappa=kappa, alpha=alpha, external_field=external, remove_self_interaction=remove_self)
    q_ind = -kappa * phi
    u_ind = _apply(alpha, field + external)
    e_ind_q = -0.5 * np.sum(kappa * phi**2)
    e_ind_u = -0.5 * np.sum(field * u_ind)
    tol = dict(rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(full.induced_charges), q_ind, **tol)
    np.testing.assert_allclose(np.asarray(full.induced_dipoles), u_ind, **tol)
    np.testing.assert_allclose(float(full.terms["induced_charge"]), e_ind_q, **tol)
    np.testing.assert_allclose(float(full.terms["induced_dipole"]), e_ind_u, **tol)
    np.testing.assert_allclose(float(full.energy), e_perm + e_ind_q + e_ind_u, **tol)
    np.testing.assert_allclose(np.asarray(full.potential), phi, **tol)
    np.testing.assert_allclose(np.asarray(full.field), field, **tol)


def test_external_field_acts_only_through_induced_dipoles():
    """E_ext changes u_ind by alpha E_ext and the energy by −½ Σ E·alpha E_ext, nothing else;
    without alpha it has no effect at all. (Open boundaries, charges and dipoles: the response
    code is shared by both boundary types and the periodic case is covered above.)"""
    system, kappa, alpha, external = _response_system(False, False, seed=32)
    system.pop("quadrupoles")
    tol = dict(rtol=1e-10, atol=1e-12)
    perm = ewald(**system)
    phi, field = np.asarray(perm.potential), np.asarray(perm.field)
    e_ind_q = -0.5 * np.sum(kappa * phi**2)
    alpha_ext = _apply(alpha, np.broadcast_to(external, field.shape))

    full = ewald(**system, kappa=kappa, alpha=alpha, external_field=external)
    no_ext = ewald(**system, kappa=kappa, alpha=alpha)
    np.testing.assert_allclose(np.asarray(full.induced_dipoles) - np.asarray(no_ext.induced_dipoles), alpha_ext, **tol)
    np.testing.assert_allclose(float(full.energy) - float(no_ext.energy), -0.5 * np.sum(field * alpha_ext), **tol)
    assert abs(float(full.energy) - float(no_ext.energy)) > 1e-3
    for name in ("potential", "field", "induced_charges"):
        np.testing.assert_array_equal(np.asarray(getattr(full, name)), np.asarray(getattr(no_ext, name)), err_msg=name)
    for name in full.terms:
        if name != "induced_dipole":
            np.testing.assert_array_equal(np.asarray(full.terms[name]), np.asarray(no_ext.terms[name]), err_msg=name)

    # Without alpha: E_ext does nothing; the result is the permanent energy plus the induced-charge term.
    kappa_only_ext = ewald(**system, kappa=kappa, external_field=external)
    np.testing.assert_allclose(float(kappa_only_ext.energy), float(perm.energy) + e_ind_q, **tol)
    np.testing.assert_allclose(np.asarray(kappa_only_ext.induced_charges), -kappa * phi, **tol)
    np.testing.assert_array_equal(np.asarray(kappa_only_ext.induced_dipoles), 0.0)
    np.testing.assert_array_equal(np.asarray(kappa_only_ext.terms["induced_dipole"]), 0.0)
