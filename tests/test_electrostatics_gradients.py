"""Forces, stress, potential and field of ``polarjax.electrostatics.ewald`` against central finite differences.

* Forces: F = -∂E/∂r from ``jax.grad`` vs central differences of the energy (h = 2e-5 Å), for a
  triclinic periodic cell and for open boundaries, with every source present (q, u, Q, kappa,
  anisotropic alpha, external field).
* Stress: strain ε applied as positions → positions (I + ε), cell → cell (I + ε) with the k-set
  held fixed (explicit ``kweights``); (1/V) ∂E/∂ε from ``jax.grad`` vs central differences over the
  nine components of ε.
* Potential and field: phi_i = ∂E_perm/∂q_i and E_i = -∂E_perm/∂u_i, with E_perm the energy of the
  permanent sources alone (kappa = alpha = None). E_perm is exactly quadratic in (q, u), so a
  central difference is exact up to round-off for any step; this is checked for
  ``remove_self_interaction`` True and False, periodic and open.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

from polarjax.electrostatics import ewald
from polarjax.electrostatics.kgrid import kgrid_weights

from _electrostatics_reference import TRICLINIC_CELL, random_positions, random_sources

NUM_ATOMS = 8


def _system(periodic: bool, seed: int = 11):
    rng = np.random.default_rng(seed)
    cell = TRICLINIC_CELL if periodic else np.zeros((3, 3))
    positions = random_positions(rng, NUM_ATOMS, TRICLINIC_CELL if periodic else None, box=6.0, min_dist=1.5)
    q, u, quad, kappa, alpha, field = random_sources(rng, NUM_ATOMS)
    return dict(positions=positions, cell=cell, periodic=periodic, charges=q, dipoles=u, quadrupoles=quad,
                kappa=kappa, alpha=alpha, external_field=field)


def _central_difference(f, x, h):
    """Gradient of scalar f at x (any shape) by central differences."""
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        grad[index] = (float(f(plus)) - float(f(minus))) / (2.0 * h)
    return grad


@pytest.mark.parametrize(
    "periodic, remove_self",
    [(True, True), (False, False)],
    ids=["periodic", "open-keep-self"],
)
def test_forces_and_stress_match_finite_differences(periodic, remove_self):
    """One jax.grad with respect to (positions, strain); finite differences for each separately."""
    system = _system(periodic)
    positions = system.pop("positions")
    cell = system.pop("cell")
    kweights = kgrid_weights(cell, 2.0) if periodic else None
    volume = abs(np.linalg.det(cell)) if periodic else 1.0  # open: compare dE/dε itself

    def energy(r, strain):
        deformation = jnp.eye(3) + strain
        return ewald(positions=jnp.asarray(r) @ deformation, cell=jnp.asarray(cell) @ deformation,
                     kweights=kweights, remove_self_interaction=remove_self, **system).energy

    zero = np.zeros((3, 3))
    grad_r, grad_strain = jax.grad(energy, argnums=(0, 1))(jnp.asarray(positions), jnp.asarray(zero))
    forces = -np.asarray(grad_r)
    stress = np.asarray(grad_strain) / volume

    forces_fd = -_central_difference(lambda r: energy(r, zero), positions, h=2e-5)
    scale = np.max(np.abs(forces_fd))
    assert scale > 0.1  # a meaningful, non-trivial force field
    np.testing.assert_allclose(forces, forces_fd, rtol=0, atol=1e-6 * scale)

    stress_fd = _central_difference(lambda e: energy(positions, e), zero, h=1e-5) / volume
    scale = np.max(np.abs(stress_fd))
    assert scale > 1e-3
    np.testing.assert_allclose(stress, stress_fd, rtol=0, atol=1e-6 * scale)


def test_stress_of_charges_is_symmetric_and_matches_fd():
    """Charges only: E is invariant under rotating positions and cell together, so ∂E/∂ε is symmetric."""
    system = _system(True, seed=5)
    positions, cell, charges = system["positions"], system["cell"], system["charges"]
    kweights = kgrid_weights(cell, 2.0)

    def energy(strain):
        deformation = jnp.eye(3) + strain
        return ewald(positions=jnp.asarray(positions) @ deformation, cell=jnp.asarray(cell) @ deformation,
                     periodic=True, charges=charges, kweights=kweights).energy

    zero = np.zeros((3, 3))
    grad = np.asarray(jax.grad(energy)(jnp.asarray(zero)))
    grad_fd = _central_difference(energy, zero, h=1e-5)
    scale = np.max(np.abs(grad_fd))
    np.testing.assert_allclose(grad, grad_fd, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(grad, grad.T, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize(
    "periodic, remove_self",
    [(True, True), (True, False), (False, False)],
    ids=["periodic", "periodic-keep-self", "open-keep-self"],
)
def test_potential_and_field_are_derivatives_of_permanent_energy(periodic, remove_self):
    """(Open boundaries with remove_self_interaction=True: the same pair sum without the self
    terms; the difference of the two settings is checked in test_electrostatics_conventions.)"""
    system = _system(periodic, seed=23)
    permanent = {k: v for k, v in system.items() if k not in ("kappa", "alpha", "external_field", "charges", "dipoles")}
    q, u = system["charges"], system["dipoles"]

    def energy_q(charges):
        return ewald(charges=charges, dipoles=u, remove_self_interaction=remove_self, **permanent).energy

    def energy_u(dipoles):
        return ewald(charges=q, dipoles=dipoles, remove_self_interaction=remove_self, **permanent).energy

    # E_perm is a quadratic form in (q, u): central differences are exact up to round-off.
    phi_fd = _central_difference(energy_q, q, h=1e-2)
    field_fd = -_central_difference(energy_u, u, h=1e-2)

    # (that phi and E do not change when kappa/alpha are switched on is checked in test_electrostatics_limits)
    result = ewald(charges=q, dipoles=u, remove_self_interaction=remove_self, **permanent)
    np.testing.assert_allclose(np.asarray(result.potential), phi_fd, rtol=0, atol=1e-9 * np.max(np.abs(phi_fd)))
    np.testing.assert_allclose(np.asarray(result.field), field_fd, rtol=0, atol=1e-9 * np.max(np.abs(field_fd)))
