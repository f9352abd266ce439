"""Allegro and CACE encoders: O(3) equivariance with parity, permutation/translation
invariance, locality, smoothness at the cutoff, padding invariance, forces vs finite
differences; plus the Cartesian machinery of CACE (monomials, contractions, rank-2 → 2e).

Edge lists come from a brute-force numpy neighbour search on small open clusters; every
structure is padded to the same static sizes so each model compiles once.
"""

import jax

jax.config.update("jax_enable_x64", True)

import functools
import itertools

import e3nn_jax as e3nn
import jax.numpy as jnp
import numpy as np
import pytest

from polarjax.cartesian import cartesian_to_irrep2
from polarjax.encoders.allegro import Allegro
from polarjax.encoders.cace import CACE, monomials, symmetrised_invariants, three_body_paths, to_full_tensor

CUTOFF = 3.0
NUM_SPECIES = 2
N_PAD, E_PAD = 10, 56
C = 4

MODELS = {
    "allegro": Allegro(
        num_species=NUM_SPECIES, cutoff=CUTOFF, num_channels=C, l_max=2, num_layers=2, num_radial_basis=6,
        latent_dim=16, mlp_hidden=(16,), energy_hidden=(8,), avg_num_neighbors=4.0,
    ),
    "cace_mp": CACE(
        num_species=NUM_SPECIES, cutoff=CUTOFF, num_channels=C, l_max=2, num_layers=2, num_radial_basis=6,
        message_passing=True, readout_hidden=(16,), avg_num_neighbors=4.0,
    ),
    "cace": CACE(
        num_species=NUM_SPECIES, cutoff=CUTOFF, num_channels=C, l_max=3, num_layers=2, num_radial_basis=6,
        message_passing=False, readout_hidden=(16,), avg_num_neighbors=4.0,
    ),
}


# ----------------------------------------------------------------------------- helpers


def neighbour_list(positions, cutoff=CUTOFF):
    """Brute force ordered pairs (i ≠ j, |r_ij| < cutoff): receivers = centre i, senders = j."""
    n = len(positions)
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    recv, send = np.nonzero((d < cutoff) & ~np.eye(n, dtype=bool))
    return send.astype(np.int32), recv.astype(np.int32)


def pad_inputs(positions, species, edges=None, n_pad=N_PAD, e_pad=E_PAD, pad_positions=None):
    """Padded (positions, species, senders, receivers, node_mask, edge_mask) as numpy arrays."""
    n = len(positions)
    senders, receivers = neighbour_list(positions) if edges is None else edges
    e = len(senders)
    assert n < n_pad and e <= e_pad, (n, e)
    pos = np.zeros((n_pad, 3)) if pad_positions is None else np.array(pad_positions, float)
    pos[:n] = positions
    spec = np.zeros(n_pad, np.int32)
    spec[:n] = species
    s = np.full(e_pad, n_pad - 1, np.int32)  # padding edges: a padding atom to itself
    r = np.full(e_pad, n_pad - 1, np.int32)
    s[:e], r[:e] = senders, receivers
    return pos, spec, s, r, np.arange(n_pad) < n, np.arange(e_pad) < e


def random_cluster(seed, n=7, box=4.0, min_dist=0.9):
    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n:
        p = rng.uniform(0, box, 3)
        if all(np.linalg.norm(p - q) > min_dist for q in pos):
            pos.append(p)
    return np.array(pos), rng.integers(0, NUM_SPECIES, n).astype(np.int32)


def random_orthogonal(seed, proper=True):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q = -q
    return q


@functools.lru_cache(maxsize=None)
def model_fns(name):
    """(params, jitted f(params, *inputs) -> (atom energies, features array, forces))."""
    model = MODELS[name]
    pos, spec, s, r, nm, em = pad_inputs(*random_cluster(0))
    vectors = np.where(em[:, None], pos[r] - pos[s], 0.0)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), vectors, spec, s, r, nm, em)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)

    def energy(params, positions, species, senders, receivers, node_mask, edge_mask):
        vec = jnp.where(edge_mask[:, None], positions[receivers] - positions[senders], 0.0)
        atom_energy, features = model.apply(params, vec, species, senders, receivers, node_mask, edge_mask)
        return jnp.sum(atom_energy), (atom_energy, features)

    @jax.jit
    def run(params, *inputs):
        grad, (atom_energy, features) = jax.grad(energy, argnums=1, has_aux=True)(params, *inputs)
        return atom_energy, features, -grad

    return params, run


def evaluate(name, inputs):
    params, run = model_fns(name)
    atom_energy, features, forces = run(params, *[jnp.asarray(x) for x in inputs])
    return np.asarray(atom_energy), features, np.asarray(forces)


# ----------------------------------------------------------------------------- symmetry


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("proper", [True, False])
def test_o3_equivariance(name, proper):
    pos, spec = random_cluster(2)
    rot = random_orthogonal(3, proper)
    centre = pos.mean(0)
    e0, f0, F0 = evaluate(name, pad_inputs(pos, spec))
    e1, f1, F1 = evaluate(name, pad_inputs((pos - centre) @ rot.T + centre, spec))
    assert f0.irreps.count("0e") >= C and f0.irreps.count("1o") >= C and f0.irreps.count("2e") >= C
    assert np.abs(e0).max() > 1e-6 and np.abs(f0.array).max() > 1e-6  # not trivially zero
    np.testing.assert_allclose(e1, e0, atol=1e-10)
    np.testing.assert_allclose(F1, F0 @ rot.T, atol=1e-9)
    np.testing.assert_allclose(f1.array, f0.transform_by_matrix(jnp.asarray(rot)).array, atol=1e-9)
    for ir in ("1o", "2e"):
        assert np.abs(f0.filter(keep=ir).array).max() > 1e-6


@pytest.mark.parametrize("name", list(MODELS))
def test_parity(name):
    """Inversion: energy and 0e/2e unchanged, 1o flips sign."""
    pos, spec = random_cluster(4)
    e0, f0, F0 = evaluate(name, pad_inputs(pos, spec))
    e1, f1, F1 = evaluate(name, pad_inputs(-pos, spec))
    np.testing.assert_allclose(e1, e0, atol=1e-10)
    np.testing.assert_allclose(F1, -F0, atol=1e-9)
    for ir, sign in (("0e", 1), ("1o", -1), ("2e", 1)):
        np.testing.assert_allclose(f1.filter(keep=ir).array, sign * f0.filter(keep=ir).array, atol=1e-9)


@pytest.mark.parametrize("name", list(MODELS))
def test_permutation_and_translation(name):
    pos, spec = random_cluster(5)
    n = len(pos)
    e0, f0, F0 = evaluate(name, pad_inputs(pos, spec))
    perm = np.random.default_rng(6).permutation(n)
    e1, f1, F1 = evaluate(name, pad_inputs(pos[perm] + np.array([10.0, -3.0, 7.5]), spec[perm]))
    np.testing.assert_allclose(e1[:n], e0[perm], atol=1e-10)
    np.testing.assert_allclose(F1[:n], F0[perm], atol=1e-9)
    np.testing.assert_allclose(f1.array[:n], f0.array[perm], atol=1e-9)


# ----------------------------------------------------------------------------- locality, smoothness, padding


def _three_atoms(d):
    """Atom 2 at distance d from atom 0 (crossing the cutoff), well inside atom 1's."""
    direction = np.array([np.cos(np.deg2rad(30.0)), np.sin(np.deg2rad(30.0)), 0.1])
    direction /= np.linalg.norm(direction)
    return np.array([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], d * direction])


@pytest.mark.parametrize("name", list(MODELS))
def test_smooth_at_cutoff(name):
    spec = np.array([0, 1, 1], np.int32)
    delta = 1e-6
    pos_in, pos_out = _three_atoms(CUTOFF - delta), _three_atoms(CUTOFF + delta)
    # the pair (0, 2) is just inside / just outside the cutoff
    assert np.linalg.norm(pos_in[2]) < CUTOFF < np.linalg.norm(pos_out[2])
    inside = pad_inputs(pos_in, spec)
    assert inside[5].sum() == 6
    outside = pad_inputs(pos_out, spec)
    assert outside[5].sum() == 4
    e_in, f_in, F_in = evaluate(name, inside)
    e_out, f_out, F_out = evaluate(name, outside)
    scale = np.abs(F_in).max() + 1.0
    np.testing.assert_allclose(e_in, e_out, atol=1e-5 * scale)
    np.testing.assert_allclose(F_in, F_out, atol=1e-4 * scale)
    np.testing.assert_allclose(f_in.array, f_out.array, atol=1e-4 * scale)
    # same positions, the near-cutoff pair dropped from the list: identical to round-off
    s, r = neighbour_list(pos_in)
    keep = ~(((s == 0) & (r == 2)) | ((s == 2) & (r == 0)))
    e_drop, f_drop, F_drop = evaluate(name, pad_inputs(pos_in, spec, edges=(s[keep], r[keep])))
    np.testing.assert_allclose(e_in, e_drop, atol=1e-12)
    np.testing.assert_allclose(F_in, F_drop, atol=1e-10)  # u'(r) ~ (r_c - r)^2
    np.testing.assert_allclose(f_in.array, f_drop.array, atol=1e-10)


@pytest.mark.parametrize("name", ["allegro", "cace"])
def test_receptive_field_is_cutoff(name):
    """No message passing: atom 0 does not see atom 2 (beyond its cutoff, inside atom 1's)."""
    spec = np.array([0, 1, 0], np.int32)
    pos = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.5, 0.0]])
    moved = pos.copy()
    moved[2] += [0.3, -0.4, 0.2]
    e0, f0, _ = evaluate(name, pad_inputs(pos, spec))
    e1, f1, _ = evaluate(name, pad_inputs(moved, spec))
    np.testing.assert_allclose(e1[0], e0[0], atol=1e-12)
    np.testing.assert_allclose(f1.array[0], f0.array[0], atol=1e-12)
    assert abs(e1[1] - e0[1]) > 1e-8  # atom 1 does see it


def test_cace_message_passing_extends_receptive_field():
    spec = np.array([0, 1, 0], np.int32)
    pos = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.5, 0.0]])
    moved = pos.copy()
    moved[2] += [0.3, -0.4, 0.2]
    e0, _, _ = evaluate("cace_mp", pad_inputs(pos, spec))
    e1, _, _ = evaluate("cace_mp", pad_inputs(moved, spec))
    assert abs(e1[0] - e0[0]) > 1e-10


@pytest.mark.parametrize("name", list(MODELS))
def test_padding_and_batching_invariance(name):
    """A structure alone (heavily padded, padding atoms scattered) or after another structure
    in the same padded batch (little padding) gives identical outputs; padding gives zeros."""
    pos_a, spec_a = random_cluster(7, n=5)
    pos_b, spec_b = random_cluster(12, n=4)
    pos_b = pos_b + np.array([25.0, 0.0, 0.0])  # no edges between the two structures
    pad_pos = np.random.default_rng(8).normal(size=(N_PAD, 3))
    e0, f0, F0 = evaluate(name, pad_inputs(pos_a, spec_a, pad_positions=pad_pos))
    e1, f1, F1 = evaluate(name, pad_inputs(np.concatenate([pos_b, pos_a]), np.concatenate([spec_b, spec_a])))
    for arr in (e0, f0.array, F0, e1, f1.array, F1):
        assert np.all(np.isfinite(arr))
    a0, a1 = slice(0, 5), slice(4, 9)
    np.testing.assert_allclose(e1[a1], e0[a0], atol=1e-12)
    np.testing.assert_allclose(F1[a1], F0[a0], atol=1e-12)
    np.testing.assert_allclose(f1.array[a1], f0.array[a0], atol=1e-12)
    for e, f, F, n in ((e0, f0, F0, 5), (e1, f1, F1, 9)):
        assert np.all(e[n:] == 0) and np.all(f.array[n:] == 0) and np.all(F[n:] == 0)


@pytest.mark.parametrize("name", list(MODELS))
def test_forces_match_finite_differences(name):
    pos, spec = random_cluster(9, n=5, box=3.0)
    inputs = pad_inputs(pos, spec)
    _, _, forces = evaluate(name, inputs)
    h = 1e-5
    fd = np.zeros_like(pos)
    for i, k in itertools.product(range(len(pos)), range(3)):
        plus, minus = pos.copy(), pos.copy()
        plus[i, k] += h
        minus[i, k] -= h
        # same edge list (a neighbour crossing would also be smooth, but keep FD clean)
        ep = evaluate(name, pad_inputs(plus, spec, edges=neighbour_list(pos)))[0].sum()
        em = evaluate(name, pad_inputs(minus, spec, edges=neighbour_list(pos)))[0].sum()
        fd[i, k] = -(ep - em) / (2 * h)
    np.testing.assert_allclose(forces[: len(pos)], fd, atol=1e-7 * (1 + np.abs(fd).max()))


# ----------------------------------------------------------------------------- CACE Cartesian machinery


@jax.jit
def _cartesian_quantities(m, rot, coeff):
    full3 = to_full_tensor(monomials(m, 3), 3)
    full1 = to_full_tensor(monomials(m, 1), 1)
    single = symmetrised_invariants([to_full_tensor(monomials(m, l), l)[:, None] for l in range(4)], 3)
    pair = symmetrised_invariants(
        [to_full_tensor(monomials(m[:1], l) + monomials(m[1:2], l), l)[:, None] for l in range(3)], 2
    )
    A = [to_full_tensor(jnp.einsum("e,ek->k", coeff, monomials(m, l))[None, None], l) for l in range(4)]
    A_rot = [to_full_tensor(jnp.einsum("e,ek->k", coeff, monomials(m @ rot.T, l))[None, None], l) for l in range(4)]
    return full3, full1, single, pair, symmetrised_invariants(A, 3), symmetrised_invariants(A_rot, 3)


def test_cace_cartesian_basis():
    rng = np.random.default_rng(10)
    n = rng.normal(size=(5, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    rot = random_orthogonal(11, proper=False)
    coeff = rng.normal(size=(5,))
    full3, full1, single, pair, b_a, b_rot = _cartesian_quantities(jnp.asarray(n), jnp.asarray(rot), jnp.asarray(coeff))
    # the monomials expand to the full symmetric tensors n and n⊗n⊗n
    np.testing.assert_allclose(full3, np.einsum("ei,ej,ek->eijk", n, n, n), atol=1e-14)
    np.testing.assert_allclose(full1, n, atol=1e-14)
    # invariants of a single unit vector: every contraction is 1
    assert single.shape == (5, 1, 1 + 4 + len(three_body_paths(3)))
    np.testing.assert_allclose(single, 1.0, atol=1e-12)
    # two unit vectors a, c summed: B2_1 = |a+c|², B3_(1,1,2) = (a+c)ᵀ (aaᵀ + ccᵀ) (a+c)
    a, c = n[0], n[1]
    s = a + c
    b = np.asarray(pair)[0, 0]
    paths = three_body_paths(2)
    assert paths == [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 1, 2), (2, 2, 2)]
    np.testing.assert_allclose(b[2], s @ s, atol=1e-12)
    np.testing.assert_allclose(b[1 + 3 + paths.index((1, 1, 2))], s @ (np.outer(a, a) + np.outer(c, c)) @ s, atol=1e-12)
    # the invariants of a generic A-basis are O(3) invariant (improper rotation here)
    np.testing.assert_allclose(b_rot, b_a, atol=1e-12)


def test_cace_rank2_to_2e():
    """The traceless rank-2 Cartesian tensor n nᵀ − I/3 maps to e3nn's 2e harmonics of n."""
    rng = np.random.default_rng(12)
    n = rng.normal(size=(6, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    t = np.einsum("ei,ej->eij", n, n) - np.eye(3) / 3
    y = np.asarray(e3nn.spherical_harmonics("2e", jnp.asarray(n), normalize=True, normalization="component").array)
    mapped = np.asarray(cartesian_to_irrep2(jnp.asarray(t)))
    ratio = np.sum(mapped * y) / np.sum(y * y)
    np.testing.assert_allclose(mapped, ratio * y, atol=1e-12)
    assert abs(ratio) > 1e-3
    # and a rotated tensor maps to the D(R)-rotated components
    rot = random_orthogonal(13)
    rotated = np.asarray(cartesian_to_irrep2(jnp.asarray(rot @ t[0] @ rot.T)))
    expected = e3nn.IrrepsArray("2e", jnp.asarray(mapped[0])).transform_by_matrix(jnp.asarray(rot)).array
    np.testing.assert_allclose(rotated, expected, atol=1e-12)
