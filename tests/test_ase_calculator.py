"""The ASE calculator (polarjax.ase.Calculator), float64, small random nequip 'uiu' model
with baseline charges Na +0.8 e, Cl −0.8 e (so that the cluster below is bound).

* periodic: ASE's numeric forces and stress agree with the analytic ones, a few MD steps
  conserve the energy, finite differences do not recompile;
* open cluster: BFGS converges; the response properties (charges, dipoles, bec, dipole,
  polarizability) are consistent; with an external field the forces are the field-driven
  forces and are the gradient of the reported energy (electric enthalpy);
* clear errors for unknown elements, mixed periodicity and singular cells.

Two compilations (one periodic, one open with the response), ~1 min on 2 busy cores.
"""

import jax

jax.config.update("jax_enable_x64", True)

import ase
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.calculator import CalculatorSetupError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

from polarjax.ase import Calculator
from polarjax.models import build
from polarjax.training.batches import BatchBuilder
from polarjax.training.dataset import Frame

CUTOFF = 3.5
SPECIES = (11, 17)
ENCODER = dict(cutoff=CUTOFF, num_channels=4, l_max=2, num_radial_basis=4, num_layers=1, parity=False,
               radial_hidden=(8,), readout_hidden=(8,), avg_num_neighbors=6.0)
HEADS = dict(charge_scale=0.5, dipole_scale=0.3, alpha_scale=0.05, hidden=8)
CELL = np.array([[6.4, 0.0, 0.0], [0.9, 6.1, 0.0], [-0.6, 1.1, 6.7]])


def _periodic_atoms():
    rng = np.random.default_rng(11)
    inverse = np.linalg.inv(CELL)
    positions = []
    while len(positions) < 8:
        p = rng.uniform(0, 1, 3) @ CELL
        if all(np.linalg.norm(((p - q) @ inverse - np.round((p - q) @ inverse)) @ CELL) > 1.6 for q in positions):
            positions.append(p)
    return ase.Atoms(numbers=[11, 17, 11, 17, 17, 11, 11, 17], positions=positions, cell=CELL, pbc=True)


def _cluster():
    positions = np.array([[0.0, 0.0, 0.0], [2.4, 0.1, 0.0], [0.2, 2.5, 0.1], [2.5, 2.4, -0.2], [1.2, 1.3, 2.1]])
    return ase.Atoms(numbers=[11, 17, 17, 11, 11], positions=positions)


@pytest.fixture(scope="module")
def model_and_params():
    model = build(dict(species=SPECIES, encoder="nequip", encoder_kwargs=ENCODER, variant="uiu",
                       atomic_energies=(-1.5, -2.5), baseline_charges=(0.8, -0.8), head_kwargs=HEADS))
    atoms = _periodic_atoms()
    frame = Frame(atoms.positions, atoms.numbers, CELL, np.full(3, True), {}, "init")
    graph = BatchBuilder(model.spec, CUTOFF, dtype=np.float64).build([frame])[0]
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), jax.jit(model.init)(jax.random.PRNGKey(1), graph))
    return model, params


@pytest.fixture(scope="module")
def periodic_calc(model_and_params):
    return Calculator.from_model(*model_and_params, cutoff=CUTOFF)


@pytest.fixture(scope="module")
def open_calc(model_and_params):
    return Calculator.from_model(*model_and_params, cutoff=CUTOFF, compute_response=True)


def test_periodic_forces_and_stress_match_ase_numerics(periodic_calc):
    atoms = _periodic_atoms()
    atoms.calc = periodic_calc
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    assert np.max(np.abs(forces)) > 1e-2 and np.max(np.abs(stress)) > 1e-4
    np.testing.assert_allclose(calculate_numerical_forces(atoms, 1e-4), forces, atol=2e-6)
    np.testing.assert_allclose(calculate_numerical_stress(atoms, 1e-5), stress, atol=2e-7)
    assert periodic_calc.num_compilations == 1  # displaced structures reuse the padded bucket
    # E0 is included; free_energy equals energy; per-atom outputs have the right shapes
    assert atoms.get_potential_energy() == pytest.approx(atoms.get_potential_energy(force_consistent=True))
    assert atoms.get_charges().shape == (8,)
    assert atoms.calc.get_property("dipoles").shape == (8, 3)
    assert atoms.calc.get_property("quadrupoles").shape == (8, 3, 3)


def test_periodic_md_conserves_energy(periodic_calc):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = _periodic_atoms()
    atoms.calc = periodic_calc
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(np.random.default_rng(0).normal(size=(8, 3)) * np.sqrt(masses * units.kB * 300))
    start = atoms.get_total_energy()
    VelocityVerlet(atoms, timestep=0.25 * units.fs).run(20)
    assert abs(atoms.get_total_energy() - start) < 2e-3 * len(atoms)


def test_open_cluster_bfgs_converges(open_calc):
    from ase.optimize import BFGS

    atoms = _cluster()
    atoms.calc = open_calc
    start = atoms.get_potential_energy()
    optimizer = BFGS(atoms, logfile=None)
    assert optimizer.run(fmax=0.02, steps=300)
    assert np.max(np.linalg.norm(atoms.get_forces(), axis=1)) < 0.02
    assert atoms.get_potential_energy() < start
    distances = atoms.get_all_distances()[np.triu_indices(5, 1)]
    assert 2.0 < distances.min() and distances.max() < 4.5  # still a bound cluster
    assert open_calc.num_compilations == 1


def test_open_response_properties(open_calc):
    atoms = _cluster()
    atoms.calc = open_calc
    charges, dipoles = atoms.get_charges(), atoms.calc.get_property("dipoles")
    dipole = atoms.get_dipole_moment()
    np.testing.assert_allclose(dipole, charges @ atoms.positions + dipoles.sum(0), atol=1e-12)
    bec = atoms.calc.get_property("bec")
    assert bec.shape == (5, 3, 3)
    np.testing.assert_allclose(bec, atoms.calc.results["bec_charge"] + atoms.calc.results["bec_dipole"], atol=1e-13)
    alpha = atoms.calc.get_property("polarizability")
    np.testing.assert_allclose(alpha, np.sum(atoms.calc.results["alpha"]) * np.eye(3), atol=1e-13)
    assert np.trace(alpha) > 0
    # Z* by ASE-style finite differences of the dipole property
    h = 1e-5
    for i, beta in ((0, 0), (4, 2)):
        moved = atoms.copy()
        moved.calc = open_calc
        moved.positions[i, beta] += h
        plus = moved.get_dipole_moment()
        moved.positions[i, beta] -= 2 * h
        minus = moved.get_dipole_moment()
        np.testing.assert_allclose((plus - minus) / (2 * h), bec[i, :, beta], atol=1e-7)


def test_open_external_field(open_calc):
    atoms = _cluster()
    atoms.calc = open_calc
    forces0, bec = atoms.get_forces(), atoms.calc.get_property("bec")
    field = np.array([0.03, -0.05, 0.02])
    try:
        open_calc.set_external_field(field)
        atoms.calc = open_calc
        forces = atoms.get_forces()
        bec_field = atoms.calc.results["bec"]
        assert np.max(np.abs(forces - forces0)) > 1e-3
        assert np.max(np.abs(forces - (forces0 + np.einsum("nab,a->nb", bec, field)))) < 1e-2  # Z*(E) ≈ Z*(0)
        # the energy is the electric enthalpy E − E_ext·P, whose gradient are the forces
        np.testing.assert_allclose(calculate_numerical_forces(atoms, 1e-4), forces, atol=2e-6)
        assert bec_field.shape == (5, 3, 3)
        assert open_calc.num_compilations == 1
    finally:
        open_calc.set_external_field(None)


def test_clear_errors(periodic_calc):
    with pytest.raises(CalculatorSetupError, match="not supported by this model"):
        periodic_calc.get_potential_energy(ase.Atoms("NaK", positions=[[0, 0, 0], [2.5, 0, 0]]))
    slab = _periodic_atoms()
    slab.pbc = [True, True, False]
    with pytest.raises(CalculatorSetupError, match="mixed periodic"):
        periodic_calc.get_potential_energy(slab)
    flat = _periodic_atoms()
    flat.cell[2] = 0.0
    with pytest.raises(CalculatorSetupError, match="singular"):
        periodic_calc.get_potential_energy(flat)
    with pytest.raises(TypeError, match="run directory or a LoadedModel"):
        Calculator(object())
    with pytest.raises(ValueError, match="external_field"):
        Calculator(periodic_calc.loaded, external_field=[1.0, 2.0])
