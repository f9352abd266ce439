"""A padded, vmapped batch of frames (periodic and open mixed) gives what each frame gives alone.

The batch entry point is ``polarjax.electrostatics.ewald_batch`` when the package provides it,
otherwise the exported pure core ``electrostatics_batch`` (vmap over padded frames, k-grids padded
to common bounds by ``batch_kgrid_weights``). Frames have different numbers of atoms (padded with
masked garbage atoms), different cells (so different own k-grids) and boundary types, plus one
all-padding frame whose outputs must be zero.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

import polarjax.electrostatics as es
from polarjax.electrostatics import ewald
from polarjax.electrostatics.kgrid import batch_kgrid_weights

from _electrostatics_reference import TRICLINIC_CELL, random_positions, random_sources

MAX_ATOMS = 8
DL = 2.0


def _frames():
    rng = np.random.default_rng(21)
    specs = [  # (num_atoms, cell, periodic flag)
        (6, TRICLINIC_CELL, True),
        (8, np.zeros((3, 3)), False),
        (5, 7.0 * np.eye(3) + 0.3 * np.triu(np.ones((3, 3)), 1), True),  # smaller own k-grid: padded
    ]
    frames = []
    for num_atoms, cell, periodic in specs:
        is_open = not np.any(cell)
        positions = random_positions(rng, num_atoms, None if is_open else cell, box=5.0, min_dist=1.4)
        q, u, quad, kappa, alpha, field = random_sources(rng, num_atoms)
        frames.append(dict(positions=positions, cell=cell, periodic=periodic, charges=q, dipoles=u,
                           quadrupoles=quad, kappa=kappa, alpha=alpha, external_field=field + 0.01 * len(frames)))
    return frames


PER_ATOM = ("positions", "charges", "dipoles", "quadrupoles", "kappa", "alpha")


def _pad_batch(frames, num_padding_frames=1):
    rng = np.random.default_rng(3)
    batch = {name: [] for name in PER_ATOM + ("cell", "external_field", "atom_mask")}
    flags = []
    for frame in frames + [None] * num_padding_frames:
        n = 0 if frame is None else len(frame["charges"])
        for name in PER_ATOM:
            shape = (MAX_ATOMS,) + ((3,) if name in ("positions", "dipoles") else (3, 3) if name in ("quadrupoles", "alpha") else ())
            values = 30.0 * rng.normal(size=shape)  # garbage for padding atoms
            if name == "positions":
                values[n:] = 0.0 if frame is None else frame["positions"][0]  # on top of a real atom
            if frame is not None:
                values[:n] = frame[name]
            batch[name].append(values)
        batch["cell"].append(np.zeros((3, 3)) if frame is None else frame["cell"])
        batch["external_field"].append(rng.normal(size=3) if frame is None else frame["external_field"])
        batch["atom_mask"].append(np.arange(MAX_ATOMS) < n)
        flags.append(False if frame is None else bool(frame["periodic"] and np.any(frame["cell"])))
    batch = {k: np.stack(v) for k, v in batch.items()}
    kweights = batch_kgrid_weights(batch["cell"], flags, DL)
    return batch, np.array(flags), kweights


def _batch_function():
    if hasattr(es, "ewald_batch"):  # pragma: no cover - depends on the package version
        return lambda batch, flags, kweights: es.ewald_batch(**batch, periodic=flags, kweights=kweights, dl=DL)
    if not hasattr(es, "electrostatics_batch"):
        pytest.skip("polarjax.electrostatics provides neither ewald_batch nor electrostatics_batch")

    @jax.jit
    def run(batch, flags, kweights):
        return es.electrostatics_batch(batch["positions"], batch["cell"], batch["charges"], batch["dipoles"],
                                       batch["quadrupoles"], batch["kappa"], batch["alpha"], batch["external_field"],
                                       batch["atom_mask"], kweights, periodic=flags)

    return run


def test_mixed_padded_batch_equals_frame_by_frame():
    """Energies, per-atom outputs, terms, and forces (grad of the summed batch energy vs finite
    differences of each frame alone)."""
    frames = _frames()
    batch, flags, kweights = _pad_batch(frames)
    run = _batch_function()

    def total_energy(positions):
        result = run(dict(batch, positions=positions), jnp.asarray(flags), jnp.asarray(kweights))
        return jnp.sum(result.energy), result

    (_, result), grad = jax.jit(jax.value_and_grad(total_energy, has_aux=True))(jnp.asarray(batch["positions"]))
    forces = -np.asarray(grad)
    assert np.shape(result.energy) == (len(frames) + 1,)
    assert np.all(np.isfinite(forces))
    for g, frame in enumerate(frames):
        n = len(frame["charges"])
        rest = {k: v for k, v in frame.items() if k != "positions"}

        single = ewald(positions=frame["positions"], dl=DL, **rest)
        np.testing.assert_allclose(float(result.energy[g]), float(single.energy), rtol=1e-10, err_msg=f"frame {g}")
        for name in ("potential", "field", "induced_charges", "induced_dipoles"):
            got = np.asarray(getattr(result, name)[g])
            np.testing.assert_allclose(got[:n], np.asarray(getattr(single, name)), rtol=1e-10, atol=1e-12,
                                       err_msg=f"frame {g} {name}")
            assert np.all(got[n:] == 0.0), f"frame {g} {name} on padding atoms"
        for name, value in single.terms.items():
            np.testing.assert_allclose(float(result.terms[name][g]), float(value), rtol=1e-10, atol=1e-12,
                                       err_msg=f"frame {g} term {name}")
        # forces of the frame alone: central differences of its energy (h = 2e-5 Å)
        single_forces = np.zeros((n, 3))
        for i, a in np.ndindex(n, 3):
            plus, minus = frame["positions"].copy(), frame["positions"].copy()
            plus[i, a] += 2e-5
            minus[i, a] -= 2e-5
            single_forces[i, a] = -(float(ewald(positions=plus, dl=DL, **rest).energy)
                                    - float(ewald(positions=minus, dl=DL, **rest).energy)) / 4e-5
        np.testing.assert_allclose(forces[g, :n], single_forces, rtol=0, atol=1e-6 * np.max(np.abs(single_forces)),
                                   err_msg=f"frame {g} forces")
        assert np.all(forces[g, n:] == 0.0), f"frame {g} forces on padding atoms"
    # the all-padding frame contributes nothing
    pad = len(frames)
    assert float(result.energy[pad]) == 0.0
    for name in ("potential", "field", "induced_charges", "induced_dipoles"):
        assert np.all(np.asarray(getattr(result, name)[pad]) == 0.0), name
    for name, value in result.terms.items():
        assert float(value[pad]) == 0.0, name
    assert np.all(forces[pad] == 0.0)
