"""Symmetries of the latent-Ewald electrostatics: every output transforms as the physics says.

* Translation r → r + t: nothing changes (periodic and open).
* Permutation of the atoms: per-atom outputs are permuted, the rest is unchanged.
* Rotation (proper and improper) R: positions → positions Rᵀ, cell rows → cell Rᵀ, u → R u,
  Q → R Q Rᵀ, alpha → R alpha Rᵀ, E_ext → R E_ext. Energy, potential, induced charges are
  invariant; field and induced dipoles rotate (rows → rows Rᵀ). For the periodic case the
  k-set of the rotated cell is the rotated k-set, which we make sure is not decided by
  round-off (no |k|² near the cutoff).
* Periodic image shift r_i → r_i + integer combination of cell rows: nothing changes.
* Padding: extra masked atoms (anywhere, even on top of real atoms) carrying garbage sources
  change nothing on the real atoms, their own per-atom outputs are zero, and (open
  boundaries, where the real-space kernel would be singular) the forces on them are zero and
  finite.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

from polarjax.electrostatics import ewald

from _electrostatics_reference import TRICLINIC_CELL, cutoff_gap, random_positions, random_rotation, random_sources

NUM_ATOMS = 7
RTOL = 1e-10


def _system(periodic: bool, seed: int = 3):
    rng = np.random.default_rng(seed)
    cell = TRICLINIC_CELL if periodic else np.zeros((3, 3))
    positions = random_positions(rng, NUM_ATOMS, TRICLINIC_CELL if periodic else None, box=6.0, min_dist=1.5)
    q, u, quad, kappa, alpha, field = random_sources(rng, NUM_ATOMS)
    return dict(positions=positions, cell=cell, periodic=periodic, charges=q, dipoles=u, quadrupoles=quad,
                kappa=kappa, alpha=alpha, external_field=field)


def _outputs(result):
    return dict(
        energy=np.asarray(result.energy),
        potential=np.asarray(result.potential),
        field=np.asarray(result.field),
        induced_charges=np.asarray(result.induced_charges),
        induced_dipoles=np.asarray(result.induced_dipoles),
        **{f"term_{k}": np.asarray(v) for k, v in result.terms.items()},
    )


def _assert_outputs_close(got, expected, rtol=RTOL):
    assert set(got) == set(expected)
    for name in expected:
        scale = max(np.max(np.abs(expected[name])), 1e-3) if np.size(expected[name]) else 1.0
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_translation_invariance(periodic):
    system = _system(periodic)
    reference = _outputs(ewald(**system))
    for shift in (np.array([0.37, -1.9, 2.6]), np.array([13.0, 7.5, -21.0])):
        moved = dict(system, positions=system["positions"] + shift)
        _assert_outputs_close(_outputs(ewald(**moved)), reference)


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_permutation_equivariance(periodic):
    system = _system(periodic)
    reference = _outputs(ewald(**system))
    perm = np.random.default_rng(0).permutation(NUM_ATOMS)
    assert np.any(perm != np.arange(NUM_ATOMS))
    per_atom = ("positions", "charges", "dipoles", "quadrupoles", "kappa", "alpha")
    permuted = dict(system, **{k: system[k][perm] for k in per_atom})
    got = _outputs(ewald(**permuted))
    expected = dict(reference)
    for name in ("potential", "field", "induced_charges", "induced_dipoles"):
        expected[name] = reference[name][perm]
    _assert_outputs_close(got, expected)


def _rotate_system(system, rotation):
    rot = rotation
    return dict(
        system,
        positions=system["positions"] @ rot.T,
        cell=system["cell"] @ rot.T,
        dipoles=system["dipoles"] @ rot.T,
        quadrupoles=np.einsum("ab,nbc,dc->nad", rot, system["quadrupoles"], rot),
        alpha=np.einsum("ab,nbc,dc->nad", rot, system["alpha"], rot),
        external_field=rot @ system["external_field"],
    )


@pytest.mark.parametrize("proper", [True, False], ids=["proper", "improper"])
@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_rotation_equivariance(periodic, proper):
    system = _system(periodic)
    if periodic:
        # The k-set must not depend on round-off at the cutoff for this test to be meaningful.
        assert cutoff_gap(system["cell"], 2.0) > 1e-4
    rotation = random_rotation(np.random.default_rng(7 if proper else 8), proper=proper)
    reference = _outputs(ewald(**system))
    got = _outputs(ewald(**_rotate_system(system, rotation)))
    expected = dict(reference)
    expected["field"] = reference["field"] @ rotation.T
    expected["induced_dipoles"] = reference["induced_dipoles"] @ rotation.T
    _assert_outputs_close(got, expected)
    # Non-trivial: the field really is rotated (not invariant).
    assert np.max(np.abs(expected["field"] - reference["field"])) > 1e-2


def test_periodic_image_shift_invariance():
    system = _system(True)
    reference = _outputs(ewald(**system))
    cell = system["cell"]
    integers = np.array([[1, 0, 0], [0, -1, 0], [0, 0, 2], [1, 1, -1], [0, 0, 0], [-2, 1, 0], [0, 3, 1]])
    assert len(integers) == NUM_ATOMS
    shifted = dict(system, positions=system["positions"] + integers @ cell)
    _assert_outputs_close(_outputs(ewald(**shifted)), reference)
    # Each cell row on its own, for a single atom.
    for row in range(3):
        positions = system["positions"].copy()
        positions[2] += cell[row]
        _assert_outputs_close(_outputs(ewald(**dict(system, positions=positions))), reference)


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_padding_atoms_change_nothing(periodic):
    system = _system(periodic)
    rng = np.random.default_rng(99)
    num_pad = 4
    total = NUM_ATOMS + num_pad
    # Interleave padding atoms; place them on top of real atoms, each other, and far away.
    real_slots = np.sort(rng.choice(total, NUM_ATOMS, replace=False))
    pad_slots = np.setdiff1d(np.arange(total), real_slots)
    pad_positions = np.array([system["positions"][0], system["positions"][0], [0.0, 0.0, 0.0], [1e3, -5e2, 7.0]])
    garbage = dict(
        positions=pad_positions,
        charges=rng.normal(size=num_pad) * 50.0,
        dipoles=rng.normal(size=(num_pad, 3)) * 50.0,
        quadrupoles=rng.normal(size=(num_pad, 3, 3)) * 50.0,
        kappa=rng.uniform(0.0, 10.0, size=num_pad),
        alpha=np.abs(rng.normal(size=(num_pad, 1, 1))) * 10.0 * np.eye(3),
    )
    padded = dict(system)
    for name, pad_values in garbage.items():
        values = np.zeros((total,) + system[name].shape[1:])
        values[real_slots] = system[name]
        values[pad_slots] = pad_values
        padded[name] = values
    mask = np.zeros(total, bool)
    mask[real_slots] = True
    padded["atom_mask"] = mask

    reference = _outputs(ewald(**system))
    got = _outputs(ewald(**padded))
    for name in ("potential", "field", "induced_charges", "induced_dipoles"):
        assert np.all(got[name][pad_slots] == 0.0), name
        got[name] = got[name][real_slots]
    _assert_outputs_close(got, reference)

    if periodic:
        return
    # Forces (open boundaries, where padding atoms sit at r = 0 from real atoms and each other):
    # zero and finite on padding atoms, and on real atoms those of the unpadded system
    # (central differences of its energy, h = 2e-5 Å).
    def energy(r, sys_):
        rest = {k: v for k, v in sys_.items() if k != "positions"}
        return ewald(positions=r, **rest).energy

    forces_pad = -np.asarray(jax.grad(energy)(jnp.asarray(padded["positions"]), padded))
    assert np.all(np.isfinite(forces_pad))
    assert np.all(forces_pad[pad_slots] == 0.0)
    h = 2e-5
    forces_ref = np.zeros((NUM_ATOMS, 3))
    for i, a in np.ndindex(NUM_ATOMS, 3):
        plus, minus = system["positions"].copy(), system["positions"].copy()
        plus[i, a] += h
        minus[i, a] -= h
        forces_ref[i, a] = -(float(energy(plus, system)) - float(energy(minus, system))) / (2 * h)
    np.testing.assert_allclose(forces_pad[real_slots], forces_ref, rtol=0, atol=1e-6 * np.max(np.abs(forces_ref)))
