"""Electrical response observables (polarjax.observables), float64.

* fixed sources (no network, arrays only): Z* = q I, no dipole part, mean-charge removal and
  the sum rule, ε∞ scaling, Berry-phase quanta and the large-cell limit, image independence;
* a small random nequip ``uQiqiu`` model (position-dependent q, u, q_ind, u_ind, anisotropic
  α): Z* against finite differences (periodic and open, one mixed batch), translation and
  rotation covariance, α_sys against finite differences in E_ext, field-driven forces.

The model part compiles one function (``response`` on a mixed batch, ~40 s on 2 busy cores);
every perturbed structure is padded to the same shape.
"""

import jax

jax.config.update("jax_enable_x64", True)

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from polarjax import observables as obs
from polarjax.models import build
from polarjax.training.batches import BatchBuilder
from polarjax.training.dataset import Frame

CUTOFF = 3.5
SPECIES = (11, 17)


def _frame(positions, numbers, cell=None):
    periodic = cell is not None
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, float)
    return Frame(np.asarray(positions, float), np.asarray(numbers), cell, np.full(3, periodic), {}, "test")


def _random_orthogonal(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


CELL = np.array([[6.4, 0.0, 0.0], [0.9, 6.1, 0.0], [-0.6, 1.1, 6.7]])


def _periodic_frame():
    rng = np.random.default_rng(11)
    inverse = np.linalg.inv(CELL)
    positions = []
    while len(positions) < 8:
        p = rng.uniform(0, 1, 3) @ CELL
        if all(np.linalg.norm(((p - q) @ inverse - np.round((p - q) @ inverse)) @ CELL) > 1.3 for q in positions):
            positions.append(p)
    return _frame(positions, [11, 17, 11, 17, 17, 11, 11, 17], CELL)


def _open_frame():
    rng = np.random.default_rng(12)
    positions = []
    while len(positions) < 6:
        p = rng.uniform(0, 3.2, 3)
        if all(np.linalg.norm(p - q) > 1.2 for q in positions):
            positions.append(p)
    return _frame(positions, [17, 11, 11, 17, 11, 17])


PERIODIC, OPEN = _periodic_frame(), _open_frame()

#: jit (one compilation per call signature is much cheaper than op-by-op dispatch)
bec_fixed = jax.jit(obs.born_effective_charges_fixed, static_argnames=("boundary", "config"))
polarization = jax.jit(obs.polarization, static_argnames=("boundary", "remove_mean_charge"))


@functools.partial(jax.jit, static_argnames=("sources", "boundary", "config"))
def bec_of(sources, positions, layout, boundary, config=obs.ResponseConfig()):
    return obs.born_effective_charges(sources, positions, layout, boundary=boundary, config=config)


# ----------------------------------------------------------------------------- fixed sources


def _two_structure_layout(n_periodic, n_open, cell, pad=3):
    """Layout of [periodic (n_periodic atoms), open (n_open atoms), padding graph]."""
    n = n_periodic + n_open + pad
    graph_index = np.array([0] * n_periodic + [1] * n_open + [2] * pad, np.int32)
    node_mask = np.arange(n) < n_periodic + n_open
    cells = np.stack([cell, np.zeros((3, 3)), np.zeros((3, 3))])
    return obs.Layout(jnp.asarray(cells), jnp.asarray(graph_index), jnp.asarray(node_mask),
                      jnp.asarray([True, False, False]))


def test_fixed_point_charges_give_q_identity_batched():
    rng = np.random.default_rng(0)
    layout = _two_structure_layout(5, 4, CELL)
    n = layout.graph_index.shape[0]
    positions = jnp.asarray(rng.uniform(-2, 8, (n, 3)))
    charges = jnp.asarray(rng.normal(size=n))
    dipoles = jnp.asarray(rng.normal(size=(n, 3)))
    out = bec_fixed(positions, charges, dipoles, layout, boundary="mixed")
    mask = np.asarray(layout.node_mask)
    expected = np.asarray(charges)[:, None, None] * np.eye(3) * mask[:, None, None]
    np.testing.assert_allclose(out["bec"], expected, atol=1e-12)
    np.testing.assert_allclose(out["bec_charge"], expected, atol=1e-12)
    np.testing.assert_allclose(out["bec_dipole"], 0.0, atol=1e-12)  # fixed dipoles: no dipole part
    q = np.asarray(charges)
    np.testing.assert_allclose(out["asr"][0], q[:5].sum() * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(out["asr"][1], q[5:9].sum() * np.eye(3), atol=1e-12)
    # the open structure's polarization is the dipole moment Σ q r + Σ u
    p_open = q[5:9] @ np.asarray(positions)[5:9] + np.asarray(dipoles)[5:9].sum(0)
    np.testing.assert_allclose(out["polarization"][1], p_open, atol=1e-12)
    # static boundaries give the same Z* for their structures
    single = obs.single_layout(4)
    out_open = bec_fixed(positions[5:9], charges[5:9], dipoles[5:9], single, boundary="open")
    np.testing.assert_allclose(out_open["bec"], expected[5:9], atol=1e-12)
    periodic = obs.single_layout(5, CELL)
    out_per = bec_fixed(positions[:5], charges[:5], dipoles[:5], periodic, boundary="periodic")
    np.testing.assert_allclose(out_per["bec"], expected[:5], atol=1e-12)


def test_mean_charge_removal_epsilon_scaling_and_sum_rule():
    rng = np.random.default_rng(1)
    positions = jnp.asarray(rng.uniform(0, 5, (6, 3)))
    charges = jnp.asarray(rng.normal(size=6) + 0.3)
    q = np.asarray(charges)
    for layout, boundary in ((obs.single_layout(6), "open"), (obs.single_layout(6, CELL), "periodic")):
        config = obs.ResponseConfig(remove_mean_charge=True, epsilon_inf=4.0)
        out = bec_fixed(positions, charges, None, layout, boundary=boundary, config=config)
        np.testing.assert_allclose(out["bec"], 2.0 * (q - q.mean())[:, None, None] * np.eye(3), atol=1e-12)
        np.testing.assert_allclose(out["asr"], 0.0, atol=1e-12)
        out = bec_fixed(positions, charges, None, layout, boundary=boundary,
                                               config=obs.ResponseConfig(enforce_asr=True))
        np.testing.assert_allclose(out["asr"][0], q.sum() * np.eye(3), atol=1e-12)  # reported before enforcing
        np.testing.assert_allclose(np.sum(out["bec"], axis=0), 0.0, atol=1e-12)
    # mean-charge removal makes the dipole of a charged molecule origin independent
    p1 = polarization(positions, charges, None, obs.single_layout(6), boundary="open", remove_mean_charge=True)
    p2 = polarization(positions + 3.0, charges, None, obs.single_layout(6), boundary="open", remove_mean_charge=True)
    np.testing.assert_allclose(p1, p2, atol=1e-12)


def test_berry_phase_polarization_quantum():
    """Moving a unit charge by a lattice vector changes P·V by one quantum e·a_j."""
    layout = obs.single_layout(2, CELL)
    charges = jnp.array([1.0, -1.0])
    start = np.array([[1.0, 1.2, 0.8], [3.0, 3.5, 3.1]])
    path = np.linspace(0.0, 1.0, 41)
    values = []
    for t in path:
        positions = start.copy()
        positions[0] += t * CELL[1]
        values.append(np.asarray(polarization(jnp.asarray(positions), charges, None, layout, boundary="periodic"))[0])
    values = np.array(values)
    # principal branch: the end point equals the start point
    np.testing.assert_allclose(values[-1], values[0], atol=1e-10)
    # unwrapped along the path (fractional components): exactly one quantum along a_2
    frac = values @ np.linalg.inv(CELL)
    steps = np.diff(frac, axis=0)
    steps -= np.round(steps)
    total = steps.sum(axis=0)
    np.testing.assert_allclose(total, [0.0, 1.0, 0.0], atol=1e-10)
    # each branch jump is a whole quantum
    jumps = np.diff(frac, axis=0) - steps
    np.testing.assert_allclose(jumps, np.round(jumps), atol=1e-10)


def test_berry_phase_agrees_with_dipole_in_large_cell():
    """A compact molecule in a large cell: P·V = Σ q r and Z* (position-dependent charges) → open-boundary Z*."""
    big = 60.0 * np.eye(3) + np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, -2.0, 0.0]])
    rng = np.random.default_rng(3)
    positions = jnp.asarray(rng.uniform(-1.5, 1.5, (5, 3)) + 0.7)
    q0 = jnp.asarray(rng.normal(size=5))
    u0 = jnp.asarray(rng.normal(size=(5, 3)))
    layout_p, layout_o = obs.single_layout(5, big), obs.single_layout(5)
    p_per = polarization(positions, q0, u0, layout_p, boundary="periodic")
    p_open = polarization(positions, q0, u0, layout_o, boundary="open")
    np.testing.assert_allclose(p_per, p_open, atol=1e-10)
    shift = jnp.zeros((5, 3)).at[2, 1].set(1e-3)
    dp_per = polarization(positions + shift, q0, u0, layout_p, boundary="periodic") - p_per
    np.testing.assert_allclose(dp_per[0], [0.0, 1e-3 * float(q0[2]), 0.0], atol=1e-12)

    def sources(r):  # charge transfer and dipoles that depend on all distances
        d = r[:, None, :] - r[None, :, :]
        w = jnp.exp(-0.3 * jnp.sum(d**2, -1))
        q = q0 + 0.2 * (w @ q0 - jnp.sum(w, 1) * q0)
        u = u0 + 0.1 * jnp.einsum("ij,ijk->ik", w, d)
        return q, u

    z_per = bec_of(sources, positions, layout_p, boundary="periodic")
    z_open = bec_of(sources, positions, layout_o, boundary="open")
    # O((extent / L)^2) difference from sin(2πΔs)/2π vs Δs
    np.testing.assert_allclose(z_per["bec"], z_open["bec"], atol=2e-3)
    np.testing.assert_allclose(z_per["bec_dipole"], z_open["bec_dipole"], atol=1e-12)


def test_periodic_bec_is_independent_of_images_and_translation():
    rng = np.random.default_rng(4)
    positions = jnp.asarray(rng.uniform(0, 1, (6, 3)) @ CELL)
    q0 = jnp.asarray(rng.normal(size=6))
    inverse = jnp.asarray(np.linalg.inv(CELL))
    cell = jnp.asarray(CELL)

    def sources(r):  # periodic (minimum-image) charge transfer
        s = (r[:, None, :] - r[None, :, :]) @ inverse
        d = (s - jnp.round(s)) @ cell
        w = jnp.exp(-0.5 * jnp.sum(d**2, -1))
        return q0 + 0.3 * (w @ q0 - jnp.sum(w, 1) * q0), None

    layout = obs.single_layout(6, CELL)
    ref = bec_of(sources, positions, layout, boundary="periodic")["bec"]
    moved = positions.at[2].add(jnp.asarray(CELL[0] - CELL[2])).at[4].add(jnp.asarray(CELL[1]))
    np.testing.assert_allclose(bec_of(sources, moved, layout, boundary="periodic")["bec"], ref,
                               atol=1e-12)
    shifted = positions + jnp.array([2.3, -1.1, 7.7])
    np.testing.assert_allclose(bec_of(sources, shifted, layout, boundary="periodic")["bec"], ref,
                               atol=1e-12)


def test_open_bec_translation_with_mean_charge_removed():
    """Charges whose total depends on the geometry: Z* is translation invariant after mean removal."""
    rng = np.random.default_rng(6)
    positions = jnp.asarray(rng.uniform(0, 3, (5, 3)))
    q0 = jnp.asarray(rng.normal(size=5))

    def sources(r):
        d2 = jnp.sum((r[:, None, :] - r[None, :, :]) ** 2, -1)
        return q0 * (1.0 + 0.3 * jnp.sum(jnp.exp(-0.4 * d2), 1)), None

    layout = obs.single_layout(5)
    config = obs.ResponseConfig(remove_mean_charge=True)
    ref = bec_of(sources, positions, layout, boundary="open", config=config)["bec"]
    out = bec_of(sources, positions + 5.0, layout, boundary="open", config=config)["bec"]
    np.testing.assert_allclose(out, ref, atol=1e-12)
    raw = bec_of(sources, positions + 5.0, layout, boundary="open")["bec"]
    assert np.max(np.abs(raw - bec_of(sources, positions, layout, boundary="open")["bec"])) > 1e-3


def test_polarizability_units():
    alpha = jnp.array([0.1, 0.2, 0.0])
    layout = obs.Layout(jnp.zeros((2, 3, 3)), jnp.array([0, 0, 1]), jnp.array([True, True, False]),
                        jnp.array([False, False]))
    total = obs.polarizability_sum(alpha, layout)
    np.testing.assert_allclose(total[0], 0.3 * np.eye(3), atol=1e-15)
    np.testing.assert_allclose(obs.polarizability_volume(total[0]), 0.3 * 14.3996 * np.eye(3), rtol=1e-5)


# ----------------------------------------------------------------------------- the network


HEAD_KWARGS = dict(charge_scale=0.5, dipole_scale=0.3, quadrupole_scale=0.3, kappa_scale=0.05, alpha_scale=0.05,
                   hidden=8)
ENCODER = dict(cutoff=CUTOFF, num_channels=4, l_max=2, num_radial_basis=4, num_layers=1, parity=False,
               radial_hidden=(8,), readout_hidden=(8,), avg_num_neighbors=6.0)


class Setup:
    def __init__(self):
        self.model = build(dict(species=SPECIES, encoder="nequip", encoder_kwargs=ENCODER, variant="uQiqiu",
                                anisotropic_alpha=True, head_kwargs=HEAD_KWARGS))
        self.builder = BatchBuilder(self.model.spec, CUTOFF, dtype=np.float64)
        shape = self.builder.padding_for([PERIODIC, OPEN])
        self.shape = shape._replace(n_edge=shape.n_edge * 2)  # room for rotated/translated copies
        self.graph = self.batch([PERIODIC, OPEN])
        params = jax.jit(self.model.init)(jax.random.PRNGKey(0), self.graph)
        self.params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        self.fn = jax.jit(functools.partial(self._response, self.model))
        self.zero_field = np.zeros((self.graph.cell.shape[0], 3))

    @staticmethod
    def _response(model, params, graph, field):
        out = obs.response(model, params, graph, field, "mixed", bec=True, polarizability=True)
        q, u = out["total_charges"], out["total_dipoles"]
        layout = obs.layout_of(graph)
        out["amplitudes"] = obs.berry_amplitudes(graph.positions, q, layout)
        out["dipole_sum"] = jax.ops.segment_sum(u, graph.graph_index, graph.cell.shape[0])

        def total_charge(positions):  # Σ_g Q_g: its gradient is ∂Q_g(i)/∂r_i
            sources = obs.model_sources(model, params, graph, field, "mixed")
            return jnp.sum(sources(positions)[0])

        out["grad_total_charge"] = jax.grad(total_charge)(graph.positions)
        return out

    def batch(self, frames):
        return self.builder.build(frames, self.shape)[0]

    def run(self, graph, field=None):
        field = self.zero_field if field is None else field
        return jax.tree_util.tree_map(np.asarray, self.fn(self.params, graph, field))


@pytest.fixture(scope="module")
def setup():
    return Setup()


@pytest.fixture(scope="module")
def reference(setup):
    return setup.run(setup.graph)


def _with_positions(graph, positions):
    return graph._replace(positions=np.asarray(positions))


def test_bec_matches_finite_differences(setup, reference):
    """Z* = ∂P/∂r incl. the position dependence of q, u, q_ind, u_ind (periodic: rephased)."""
    graph = setup.graph
    positions = np.asarray(graph.positions)
    bec = reference["bec"]
    assert np.max(np.abs(bec[:14] - np.diagonal(bec[:14], axis1=1, axis2=2)[:, :, None] * np.eye(3))) > 1e-2
    inverse = np.linalg.inv(CELL)
    h = 1e-5
    worst = 0.0
    for i in range(PERIODIC.num_atoms + OPEN.num_atoms):
        g = int(graph.graph_index[i])
        for beta in range(3):
            step = np.zeros_like(positions)
            step[i, beta] = h
            plus, minus = setup.run(_with_positions(graph, positions + step)), setup.run(_with_positions(graph, positions - step))
            if g == 0:  # periodic: Re[exp(−2πi s_i) ∂p̃/∂r] projected on the cell rows + ∂Σu
                d_amp = (plus["amplitudes"][0] - minus["amplitudes"][0]) / (2 * h)
                d_dip = (plus["dipole_sum"][0] - minus["dipole_sum"][0]) / (2 * h)
                local = np.real(np.exp(-2j * np.pi * positions[i] @ inverse) * d_amp)
                fd = CELL.T @ local + d_dip
                fd_dipole = d_dip
            else:  # open: plain ∂P/∂r
                fd = (plus["polarization"][1] - minus["polarization"][1]) / (2 * h)
                fd_dipole = (plus["dipole_sum"][1] - minus["dipole_sum"][1]) / (2 * h)
            worst = max(worst, np.max(np.abs(fd - bec[i, :, beta])))
            np.testing.assert_allclose(reference["bec_dipole"][i, :, beta], fd_dipole, atol=1e-7)
    assert worst < 1e-7, worst
    np.testing.assert_allclose(reference["bec"], reference["bec_charge"] + reference["bec_dipole"], atol=1e-13)
    np.testing.assert_allclose(reference["asr"][:2], [bec[:8].sum(0), bec[8:14].sum(0)], atol=1e-12)
    assert np.all(bec[14:] == 0.0)  # padding atoms


def test_bec_translation_and_rotation(setup, reference):
    """Periodic Z* is translation invariant. Open Z* = ∂P/∂r with P about the origin moves by
    t ⊗ ∂Q/∂r_i when the model's total charge Q is not conserved (mean-charge removal makes
    it invariant, see test_open_bec_translation_with_mean_charge_removed)."""
    shift = np.array([1.7, -2.9, 4.1])
    moved = [_frame(PERIODIC.positions + shift, PERIODIC.numbers, CELL), _frame(OPEN.positions + shift, OPEN.numbers)]
    out = setup.run(setup.batch(moved))
    np.testing.assert_allclose(out["bec"][:8], reference["bec"][:8], atol=1e-10)
    expected_open = reference["bec"][8:14] + np.einsum("a,nb->nab", shift, reference["grad_total_charge"][8:14])
    np.testing.assert_allclose(out["bec"][8:14], expected_open, atol=1e-10)
    assert np.max(np.abs(reference["grad_total_charge"][8:14])) > 1e-3  # the check above is not vacuous
    rot = _random_orthogonal(5)
    rotated = [_frame(PERIODIC.positions @ rot.T, PERIODIC.numbers, CELL @ rot.T),
               _frame(OPEN.positions @ rot.T, OPEN.numbers)]
    out = setup.run(setup.batch(rotated))
    expected = np.einsum("ab,nbc,dc->nad", rot, reference["bec"], rot)
    np.testing.assert_allclose(out["bec"], expected, atol=1e-10)
    np.testing.assert_allclose(out["polarizability"][:2],
                               np.einsum("ab,gbc,dc->gad", rot, reference["polarizability"][:2], rot), atol=1e-12)


def test_polarizability_matches_field_derivative(setup, reference):
    graph = setup.graph
    alpha = reference["polarizability"]
    assert np.max(np.abs(alpha[:2])) > 1e-3
    np.testing.assert_allclose(alpha, reference["polarizability_sum"], atol=1e-13)  # one-shot response
    h = 1e-3  # P is linear in E_ext
    for beta in range(3):
        field = np.zeros((graph.cell.shape[0], 3))
        field[:2, beta] = h
        plus, minus = setup.run(graph, field), setup.run(graph, -field)
        fd = (plus["polarization"][:2] - minus["polarization"][:2]) / (2 * h)
        np.testing.assert_allclose(alpha[:2, :, beta], fd, atol=1e-9)


def test_field_driven_forces(setup):
    graph = setup.graph
    field = np.zeros((graph.cell.shape[0], 3))
    field[0] = [0.05, -0.02, 0.03]
    field[1] = [-0.04, 0.06, 0.01]
    out = setup.run(graph, field)
    expected = out["forces"] + np.einsum("nab,na->nb", out["bec"], field[np.asarray(graph.graph_index)])
    np.testing.assert_allclose(out["field_forces"], expected, atol=1e-13)
    assert np.max(np.abs(out["field_forces"] - out["forces"])) > 1e-3
    # open structure: the field forces are −∂(E − E_ext·P)/∂r
    positions = np.asarray(graph.positions)
    h = 1e-5
    for i in range(8, 14):
        for beta in range(3):
            step = np.zeros_like(positions)
            step[i, beta] = h
            plus, minus = setup.run(_with_positions(graph, positions + step), field), setup.run(_with_positions(graph, positions - step), field)
            enthalpy = lambda o: o["energy"][1] - field[1] @ o["polarization"][1]
            np.testing.assert_allclose(-(enthalpy(plus) - enthalpy(minus)) / (2 * h), out["field_forces"][i, beta], atol=1e-7)


@pytest.mark.slow
def test_forward_mode_born_charges_agree(setup):
    """jacfwd through the model (forward-over-reverse electrostatics) gives the same Z* (open)."""
    graph = jax.tree_util.tree_map(jnp.asarray, setup.builder.build([OPEN])[0])
    sources = obs.model_sources(setup.model, setup.params, graph, None, "open")
    layout = obs.layout_of(graph)

    def p_of(r):
        q, u = sources(r)
        return polarization(r, q, u, layout, boundary="open")[0]

    forward = jax.jit(jax.jacfwd(p_of))(graph.positions)  # [3, N, 3]
    reverse = bec_of(sources, graph.positions, layout, boundary="open")["bec"]
    np.testing.assert_allclose(np.transpose(forward, (1, 0, 2)), reverse, atol=1e-12)
