"""The global sign of the latent multipoles (ModelSpec.latent_sign, polarjax.training.orientation).

* flipping the sign is an exact symmetry of energy, forces and stress at zero field (every
  long-range term is quadratic in the latent sources), flips every source and the
  polarization, leaves α_sys unchanged, and is *not* a symmetry under an external field;
* ``orientation`` chooses the sign that makes the reference element negative (or positive).
"""

import jax

jax.config.update("jax_enable_x64", True)

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from polarjax import observables as obs
from polarjax.models import build
from polarjax.training.batches import BatchBuilder
from polarjax.training.dataset import Frame
from polarjax.training.inference import LoadedModel
from polarjax.training.orientation import (default_reference, orientation, oriented, parse_reference,
                                           read_latent_sign, write_orientation)

CUTOFF = 3.5
ENCODER = dict(cutoff=CUTOFF, num_channels=4, l_max=2, num_radial_basis=4, num_layers=1,
               radial_hidden=(8,), readout_hidden=(8,), avg_num_neighbors=6.0)
HEADS = dict(charge_scale=0.5, dipole_scale=0.3, quadrupole_scale=0.3, kappa_scale=0.05, alpha_scale=0.05, hidden=8)
CELL = np.array([[6.2, 0.0, 0.0], [0.7, 6.0, 0.0], [-0.4, 0.9, 6.5]])


def _frames():
    rng = np.random.default_rng(3)
    frames = []
    for k in range(3):
        positions = []
        while len(positions) < 8:
            p = rng.uniform(0, 1, 3) @ CELL
            frac = lambda d: d @ np.linalg.inv(CELL)
            if all(np.linalg.norm((frac(p - q) - np.round(frac(p - q))) @ CELL) > 1.4 for q in positions):
                positions.append(p)
        frames.append(Frame(np.array(positions), np.array([11, 17] * 4), CELL, np.full(3, True), {}, f"test:{k}"))
    return frames


@pytest.fixture(scope="module")
def models():
    model = build(dict(species=(11, 17), encoder="nequip", encoder_kwargs=ENCODER, variant="uQiqiu",
                       anisotropic_alpha=True, head_kwargs=HEADS))
    flipped = build(dataclasses.replace(model.spec, latent_sign=-1.0))
    builder = BatchBuilder(model.spec, CUTOFF, dtype=np.float64)
    graph, _ = builder.build(_frames()[:1])
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), model.init(jax.random.PRNGKey(1), graph))
    return model, flipped, params, graph


def test_sign_flip_is_a_symmetry_only_at_zero_field(models):
    model, flipped, params, graph = models
    props = jax.jit(lambda m, p, g, f: m.properties(p, g, external_field=f, boundary="periodic"), static_argnums=0)
    zero = jnp.zeros((graph.cell.shape[0], 3))
    a, b = props(model, params, graph, zero), props(flipped, params, graph, zero)
    for key in ("energy", "forces", "stress", "energy_lr"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-10, atol=1e-12, err_msg=key)
    for key in ("charges", "dipoles", "quadrupoles", "induced_charges", "induced_dipoles"):
        assert np.max(np.abs(a[key])) > 1e-4, key  # the check below is not vacuous
        np.testing.assert_allclose(b[key], -a[key], rtol=1e-10, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(b["alpha"], a["alpha"], rtol=1e-12)
    # the polarization flips with the sources
    layout = obs.layout_of(graph)
    p = lambda out: obs.polarization(graph.positions, out["charges"] + out["induced_charges"],
                                     out["dipoles"] + out["induced_dipoles"], layout, boundary="periodic")
    np.testing.assert_allclose(p(b), -p(a), atol=1e-10)
    # under a field the sign is physical: the energies differ
    field = zero.at[0].set(jnp.array([0.3, -0.2, 0.1]))
    fa, fb = props(model, params, graph, field), props(flipped, params, graph, field)
    assert abs(float(fa["energy"][0] - fb["energy"][0])) > 1e-3
    # α_sys = ∂P/∂E_ext does not depend on the convention
    alpha = jax.jit(obs.system_polarizability, static_argnums=0, static_argnames="boundary")
    np.testing.assert_allclose(alpha(flipped, params, graph, boundary="periodic"),
                               alpha(model, params, graph, boundary="periodic"), rtol=1e-9, atol=1e-12)


def test_orientation_makes_the_reference_element_negative(models, tmp_path):
    model, _, params, _ = models
    frames = _frames()
    loaded = LoadedModel(model, params, CUTOFF, {}, tmp_path, np.float64)
    by_sign = {1.0: loaded, -1.0: oriented(loaded, -1.0)}  # each LoadedModel compiles its predictions once
    mean_cl = {sign: np.mean([q for f, item in zip(frames, m.predict(frames)) for q, z in zip(item["charges"], f.numbers)
                              if z == 17]) for sign, m in by_sign.items()}
    assert np.sign(mean_cl[1.0]) == -np.sign(mean_cl[-1.0]) != 0
    for reference, expected in ((None, -1), ("Cl=-1", -1), ("Cl=+1", 1), ("Na=+", -1), ("Na=-1", 1)):
        for start in (1.0, -1.0):
            result = orientation(by_sign[start], frames, reference)
            assert result["latent_sign_before"] == start
            assert np.sign(mean_cl[result["latent_sign"]]) == expected, (reference, start)
    write_orientation(tmp_path, orientation(loaded, frames))
    assert read_latent_sign(tmp_path) in (1.0, -1.0)
    assert read_latent_sign(tmp_path / "elsewhere") == 1.0


def test_reference_parsing_and_defaults():
    assert parse_reference("O=-1") == (8, -1.0) and parse_reference("Na=+") == (11, 1.0)
    for bad in ("O", "Xx=-1", "O=0", "O=minus"):
        with pytest.raises(ValueError, match="reference"):
            parse_reference(bad)
    assert default_reference((1, 8)) == (8, -1.0)
    assert default_reference((72, 8)) == (8, -1.0)
    assert default_reference((11, 17)) == (17, -1.0)
    with pytest.raises(ValueError, match="electronegativity"):
        default_reference((8, 118))
    with pytest.raises(ValueError, match="latent_sign"):
        build(dict(species=(1,), latent_sign=0.5))
