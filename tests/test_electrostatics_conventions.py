"""The conventions of issue 2 section 3, checked against independent NumPy references.

* Constants: 1/(2 eps0) = 90.4756 exactly; k_e = 90.4756/(2π) (not a separately rounded 14.3996).
* Self-energy coefficients c_q, c_u, c_Q against the coincidence limit of the erf pair kernel.
* Periodic energy against a direct, full-space k-sum of the written formula (brute-force k-set,
  S(k) = Σ (q + i k·u − ½ kᵀQk) e^{ik·r}); open energy against a pair sum built from the radial
  functions of the erf kernel (a different derivation than the library's). Energy terms by source
  order against the bilinear cross terms of those references; the terms sum to the energy.
* ``remove_self_interaction``: False − True = E_self in the energy, +2 c_q q in the potential,
  −2 c_u u in the field, for both boundary types.
* Boundary conventions: an all-zero cell (or none) is open even with periodic=True; a left-handed
  cell is the same periodic system as its right-handed twin.
* The k-set: counts and members of the half-space weight grid against a brute-force enumeration.
* Quadrupoles with a trace and an antisymmetric part act as their symmetric traceless part.
* Bad input raises ValueError naming the offending argument.
"""

import itertools
import math

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np
import pytest

from polarjax import units
from polarjax.electrostatics import ewald, self_energy_coefficients
from polarjax.electrostatics.kgrid import count_kvectors, kgrid_weights

from _electrostatics_reference import (
    TRICLINIC_CELL,
    clean_quadrupoles,
    kvectors_full,
    open_energy_ref,
    periodic_energy_ref,
    random_positions,
    random_sources,
    self_coefficients,
    self_energy_ref,
)

NUM_ATOMS = 6
TERM_KEYS = {"charge_charge", "charge_dipole", "dipole_dipole", "charge_quadrupole", "dipole_quadrupole",
             "quadrupole_quadrupole", "self_interaction", "induced_charge", "induced_dipole"}


def _system(periodic: bool, seed: int = 17):
    rng = np.random.default_rng(seed)
    cell = TRICLINIC_CELL if periodic else np.zeros((3, 3))
    positions = random_positions(rng, NUM_ATOMS, TRICLINIC_CELL if periodic else None, box=5.0, min_dist=1.5)
    q, u, quad, kappa, alpha, field = random_sources(rng, NUM_ATOMS)
    return dict(positions=positions, cell=cell, periodic=periodic, charges=q, dipoles=u, quadrupoles=quad,
                kappa=kappa, alpha=alpha, external_field=field)


def _permanent(system):
    return {k: v for k, v in system.items() if k not in ("kappa", "alpha", "external_field")}


def _reference_energy(system, sigma=1.0, dl=2.0, remove_self=True, charges=True, dipoles=True, quadrupoles=True):
    q = system["charges"] if charges else np.zeros(NUM_ATOMS)
    u = system["dipoles"] if dipoles else None
    quad = system["quadrupoles"] if quadrupoles else None
    if system["periodic"]:
        return periodic_energy_ref(system["positions"], system["cell"], q, u, quad, sigma, dl, remove_self)
    return open_energy_ref(system["positions"], q, u, quad, sigma, remove_self)


# ----------------------------------------------------------------------------- constants


def test_constants():
    assert units.HALF_INV_EPS0 == 90.4756
    assert units.COULOMB == 90.4756 / (2.0 * math.pi)
    # 90.4756 / (2π) = 14.3996390 (the "14.399645…" is the CODATA value, not this quotient;
    # the rule "derived from 90.4756" is what is tested)
    assert abs(units.COULOMB - 14.399639) < 1e-6
    assert units.DEFAULT_SIGMA == 1.0 and units.DEFAULT_DL == 2.0


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.7])
def test_self_energy_coefficients(sigma):
    c_q, c_u, c_quad = self_energy_coefficients(sigma)
    # the formulas, literally
    np.testing.assert_allclose(c_q, 90.4756 / (sigma * (2.0 * math.pi) ** 1.5), rtol=1e-14)
    np.testing.assert_allclose(c_u, c_q / (3.0 * sigma**2), rtol=1e-14)
    np.testing.assert_allclose(c_quad, c_q / (10.0 * sigma**4), rtol=1e-14)
    # the coincidence limit of the erf pair kernel (Taylor coefficients), see the reference module
    np.testing.assert_allclose((c_q, c_u, c_quad), self_coefficients(sigma), rtol=1e-14)
    # c_q = ½ k_e lim_{r→0} erf(r/(√2σ))/r, evaluated numerically
    r = 1e-6
    np.testing.assert_allclose(c_q, 0.5 * units.COULOMB * math.erf(r / (math.sqrt(2) * sigma)) / r, rtol=1e-10)


# ----------------------------------------------------------------------------- energies vs references


@pytest.mark.parametrize("sigma, remove_self", [(1.0, True), (0.75, False)], ids=["sigma1", "sigma0.75-keep-self"])
@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_energy_matches_independent_reference(periodic, sigma, remove_self):
    system = _system(periodic)
    result = ewald(**_permanent(system), sigma=sigma, remove_self_interaction=remove_self)
    expected = _reference_energy(system, sigma=sigma, remove_self=remove_self)
    np.testing.assert_allclose(float(result.energy), expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_energy_terms_by_source_order(periodic):
    system = _system(periodic)
    result = ewald(**system)
    terms = {k: float(v) for k, v in result.terms.items()}
    assert set(terms) == TERM_KEYS
    np.testing.assert_allclose(sum(terms.values()), float(result.energy), rtol=1e-13, atol=1e-12)

    def ref(**orders):
        flags = dict(charges=False, dipoles=False, quadrupoles=False)
        flags.update(orders)
        return _reference_energy(system, remove_self=False, **flags)

    e_q, e_u, e_quad = ref(charges=True), ref(dipoles=True), ref(quadrupoles=True)
    cross = {
        "charge_dipole": ref(charges=True, dipoles=True) - e_q - e_u,
        "charge_quadrupole": ref(charges=True, quadrupoles=True) - e_q - e_quad,
        "dipole_quadrupole": ref(dipoles=True, quadrupoles=True) - e_u - e_quad,
    }
    for name, value in cross.items():
        assert abs(value) > 1e-3, name
        np.testing.assert_allclose(terms[name], value, rtol=1e-10, atol=1e-11, err_msg=name)
    # Same-order terms plus the self term: where the continuum self energy is booked is a detail,
    # their sum is not.
    diagonal = terms["charge_charge"] + terms["dipole_dipole"] + terms["quadrupole_quadrupole"]
    e_self = self_energy_ref(system["charges"], system["dipoles"], system["quadrupoles"])
    expected_diagonal = e_q + e_u + e_quad - e_self
    np.testing.assert_allclose(diagonal + terms["self_interaction"], expected_diagonal, rtol=1e-11)
    if not periodic:  # open boundaries: the pair terms alone are the i ≠ j sums, no self part
        for name, value in (("charge_charge", e_q), ("dipole_dipole", e_u), ("quadrupole_quadrupole", e_quad)):
            c = self_energy_ref(
                system["charges"] if name == "charge_charge" else np.zeros(NUM_ATOMS),
                system["dipoles"] if name == "dipole_dipole" else None,
                system["quadrupoles"] if name == "quadrupole_quadrupole" else None,
            )
            np.testing.assert_allclose(terms[name], value - c, rtol=1e-10, atol=1e-11, err_msg=name)
        assert terms["self_interaction"] == 0.0
    # induced terms are those of the response (formulas checked in test_electrostatics_limits)
    phi, field = np.asarray(result.potential), np.asarray(result.field)
    np.testing.assert_allclose(terms["induced_charge"], -0.5 * np.sum(system["kappa"] * phi**2), rtol=1e-12)
    u_ind = np.einsum("nab,nb->na", system["alpha"], field + system["external_field"])
    np.testing.assert_allclose(terms["induced_dipole"], -0.5 * np.sum(field * u_ind), rtol=1e-12)


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_self_interaction_switch(periodic):
    system = _system(periodic)
    perm = _permanent(system)
    removed = ewald(**perm, remove_self_interaction=True)
    kept = ewald(**perm, remove_self_interaction=False)
    c_q, c_u, _ = self_coefficients(1.0)
    e_self = self_energy_ref(system["charges"], system["dipoles"], system["quadrupoles"])
    assert e_self > 1.0
    np.testing.assert_allclose(float(kept.energy) - float(removed.energy), e_self, rtol=1e-12)
    np.testing.assert_allclose(float(kept.terms["self_interaction"]) - float(removed.terms["self_interaction"]),
                               e_self, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(kept.potential) - np.asarray(removed.potential),
                               2.0 * c_q * system["charges"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(kept.field) - np.asarray(removed.field),
                               -2.0 * c_u * system["dipoles"], rtol=1e-10, atol=1e-12)
    if not periodic:  # open: the direct sum never contains i = j, so True adds nothing
        np.testing.assert_allclose(float(removed.energy), open_energy_ref(
            system["positions"], system["charges"], system["dipoles"], system["quadrupoles"]), rtol=1e-12)


# ----------------------------------------------------------------------------- boundaries


def test_zero_cell_means_open():
    system = _system(False)
    reference = ewald(**dict(system, periodic=False))
    for variant in (dict(system, periodic=True), dict(system, periodic=True, cell=None),
                    dict(system, periodic=False, cell=None)):
        result = ewald(**variant)
        np.testing.assert_allclose(float(result.energy), float(reference.energy), rtol=1e-14)
        np.testing.assert_allclose(np.asarray(result.potential), np.asarray(reference.potential), rtol=1e-13)
        np.testing.assert_allclose(np.asarray(result.induced_dipoles), np.asarray(reference.induced_dipoles),
                                   rtol=1e-13)
    # a singular but non-zero cell is fine when the caller says open
    flat = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 0]])
    result = ewald(**dict(system, periodic=False, cell=flat))
    np.testing.assert_allclose(float(result.energy), float(reference.energy), rtol=1e-14)


def test_left_handed_cell_is_the_same_crystal():
    system = _system(True)
    right = ewald(**system)
    assert np.linalg.det(system["cell"]) > 0
    for left_cell in (system["cell"][[1, 0, 2]], -system["cell"], system["cell"] * np.array([[1.0], [-1.0], [1.0]])):
        assert np.linalg.det(left_cell) < 0
        left = ewald(**dict(system, cell=left_cell))
        np.testing.assert_allclose(float(left.energy), float(right.energy), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(left.potential), np.asarray(right.potential), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(left.field), np.asarray(right.field), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(left.induced_dipoles), np.asarray(right.induced_dipoles),
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(left.energy) - float(left.terms["induced_charge"])
                                   - float(left.terms["induced_dipole"]),
                                   _reference_energy(dict(system, cell=left_cell)), rtol=1e-11)


# ----------------------------------------------------------------------------- k-set


def _integers_from_weights(weights):
    """Full-space set of integer n encoded by half-space weights (weight 2: n and −n; 1: n)."""
    m1 = weights.shape[0] - 1
    m2, m3 = (weights.shape[1] - 1) // 2, (weights.shape[2] - 1) // 2
    out = set()
    for a, b, c in zip(*np.nonzero(weights)):
        n = (int(a), int(b) - m2, int(c) - m3)
        w = weights[a, b, c]
        assert w in (1.0, 2.0)
        assert (w == 2.0) == (n[0] > 0)
        out.add(n)
        if w == 2.0:
            out.add(tuple(-x for x in n))
    assert m1 >= 0
    return out


def _brute_force_integers(cell, dl):
    cell = np.asarray(cell, dtype=np.float64)
    recip = 2.0 * np.pi * np.linalg.inv(cell).T
    k = kvectors_full(cell, dl)
    return {tuple(int(x) for x in np.rint(row)) for row in k @ cell.T / (2.0 * np.pi)}, recip


@pytest.mark.parametrize("side, dl, exact_count", [(8.0, 2.0, 256), (10.0, 2.0, 514), (12.0, 1.5, 2108)])
def test_kvector_count_cubic(side, dl, exact_count):
    """Cubic cells whose side is a multiple of dl: many k sit exactly on the cutoff, all are kept.

    The expected count is the number of integer n with 0 < |n|² <= (side/dl)² (exact integer
    arithmetic), e.g. 256 for side 8, dl 2 (the ball of radius 4 holds 257 lattice points).
    """
    m = int(round(side / dl))
    integer_count = sum(1 for n in itertools.product(range(-m, m + 1), repeat=3) if 0 < sum(x * x for x in n) <= m * m)
    assert integer_count == exact_count
    weights = kgrid_weights(np.eye(3) * side, dl)
    assert count_kvectors(weights) == exact_count
    assert round(float(np.sum(weights))) == exact_count
    members, _ = _brute_force_integers(np.eye(3) * side, dl)
    assert _integers_from_weights(weights) == members
    assert (m, 0, 0) in members and (0, 0, -m) in members  # exactly on the cutoff: kept


@pytest.mark.parametrize("cell", [TRICLINIC_CELL, np.array([[12.0, 0, 0], [11.0, 2.5, 0], [0.5, 0.3, 3.0]]),
                                  np.array([[1.5, 0, 0], [0, 7.0, 0], [0, 0, 4.1]])],
                         ids=["triclinic", "skewed", "thin"])
def test_kvector_set_brute_force(cell):
    weights = kgrid_weights(cell, 2.0)
    members, _ = _brute_force_integers(cell, 2.0)
    assert len(members) == len(kvectors_full(cell, 2.0)) > 0
    assert count_kvectors(weights) == len(members)
    assert _integers_from_weights(weights) == members


# ----------------------------------------------------------------------------- quadrupoles


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_quadrupoles_are_symmetrised_and_made_traceless(periodic):
    system = _system(periodic)
    rng = np.random.default_rng(5)
    clean = clean_quadrupoles(system["quadrupoles"])
    antisym = rng.normal(size=(NUM_ATOMS, 3, 3))
    antisym = antisym - np.swapaxes(antisym, 1, 2)
    dirty = clean + rng.normal(size=NUM_ATOMS)[:, None, None] * np.eye(3) + antisym
    assert np.max(np.abs(dirty - clean)) > 0.5
    a = ewald(**dict(system, quadrupoles=clean))
    b = ewald(**dict(system, quadrupoles=dirty))
    for name in ("energy", "potential", "field", "induced_charges", "induced_dipoles"):
        np.testing.assert_allclose(np.asarray(getattr(b, name)), np.asarray(getattr(a, name)), rtol=1e-12, atol=1e-13,
                                   err_msg=name)
    for name in a.terms:
        np.testing.assert_allclose(float(b.terms[name]), float(a.terms[name]), rtol=1e-12, atol=1e-13, err_msg=name)


# ----------------------------------------------------------------------------- bad input


def _bad_inputs():
    system = _system(True)
    n = NUM_ATOMS
    nan_positions = system["positions"].copy()
    nan_positions[2, 1] = np.nan
    inf_positions = system["positions"].copy()
    inf_positions[4, 0] = np.inf
    singular = np.array([[6.0, 0, 0], [3.0, 0.0, 0], [0, 1.0, 7.0]])
    negative_kappa = system["kappa"].copy()
    negative_kappa[3] = -0.1
    indefinite = system["alpha"].copy()
    indefinite[1] = np.diag([1.0, 0.5, -0.2])
    negative_scalar = np.full(n, 0.3)
    negative_scalar[0] = -0.3
    return [
        ("positions-shape", dict(positions=system["positions"][:, :2]), r"positions"),
        ("cell-shape", dict(cell=system["cell"][:2]), r"cell"),
        ("charges-shape", dict(charges=np.zeros(n + 1)), r"charges"),
        ("dipoles-shape", dict(dipoles=np.zeros((n, 2))), r"dipoles"),
        ("quadrupoles-shape", dict(quadrupoles=np.zeros((n, 3))), r"quadrupoles"),
        ("kappa-shape", dict(kappa=np.zeros(n - 1)), r"kappa"),
        ("alpha-shape", dict(alpha=np.zeros((n, 2, 2))), r"alpha"),
        ("field-shape", dict(external_field=np.zeros(2)), r"external_field"),
        ("mask-shape", dict(atom_mask=np.ones(n + 2, bool)), r"atom_mask"),
        ("positions-nan", dict(positions=nan_positions), r"positions"),
        ("positions-inf", dict(positions=inf_positions), r"positions"),
        ("singular-cell", dict(cell=singular), r"singular|volume"),
        ("negative-kappa", dict(kappa=negative_kappa), r"kappa"),
        ("indefinite-alpha", dict(alpha=indefinite), r"alpha"),
        ("negative-scalar-alpha", dict(alpha=negative_scalar), r"alpha"),
    ]


@pytest.mark.parametrize("name, changes, match", _bad_inputs(), ids=[case[0] for case in _bad_inputs()])
def test_bad_input_raises_helpful_value_error(name, changes, match):
    system = _system(True)
    with pytest.raises(ValueError, match=match):
        ewald(**dict(system, **changes))
