"""Symmetry, smoothness, padding and force tests of the NequIP and MACE encoders (float64).

Edge lists come from a brute-force numpy neighbour search on small open clusters, padded
to a fixed number of edges so that one compilation serves every test of an encoder.
"""

import jax

jax.config.update("jax_enable_x64", True)

import functools

import e3nn_jax as e3nn
import jax.numpy as jnp
import numpy as np
import pytest

from polarjax.encoders import ENCODERS, build_encoder
from polarjax.encoders.mace import MACE, SymmetricContraction
from polarjax.encoders.nequip import NequIP

CUTOFF = 3.0
NUM_SPECIES = 3
N_ATOMS = 7
N_PAD_NODES = 10  # real + padding atoms in the padded batches
E_PAD = 64  # fixed padded edge count (≥ N_ATOMS (N_ATOMS − 1))

SMALL = dict(
    num_species=NUM_SPECIES, cutoff=CUTOFF, num_channels=8, l_max=2, num_layers=2, num_radial_basis=6, radial_hidden=(16,)
)
ENCODER_NAMES = ["nequip", "mace"]
KEY = jax.random.key(1, impl="rbg")


# ----------------------------------------------------------------------------- helpers


def neighbour_list(positions, cutoff, num_nodes=None, num_edges=E_PAD):
    """Brute-force open-boundary edges (i ≠ j, |r_ij| < cutoff), padded to ``num_edges``.

    Padding edges connect the last (padding) atom to itself; returns senders, receivers, edge_mask.
    """
    positions = np.asarray(positions)
    n = len(positions)
    num_nodes = n if num_nodes is None else num_nodes
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    senders, receivers = np.nonzero((d < cutoff) & ~np.eye(n, dtype=bool))
    m = len(senders)
    assert m <= num_edges
    pad = num_nodes - 1
    senders = np.concatenate([senders, np.full(num_edges - m, pad)]).astype(np.int32)
    receivers = np.concatenate([receivers, np.full(num_edges - m, pad)]).astype(np.int32)
    edge_mask = np.arange(num_edges) < m
    return senders, receivers, edge_mask


def random_cluster(seed, n=N_ATOMS, box=3.2, min_dist=0.9):
    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n:
        p = rng.uniform(0.0, box, 3)
        if all(np.linalg.norm(p - q) > min_dist for q in pos):
            pos.append(p)
    return np.array(pos), rng.integers(0, NUM_SPECIES, n).astype(np.int32)


def random_rotation(seed, proper=True):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q if proper else -q


@functools.lru_cache(maxsize=None)
def _wigner_d():
    return jax.jit(lambda R: e3nn.Irreps("0e + 1o + 2e").D_from_matrix(R))


def rotate_features(features, R):
    """D(R) applied to every irrep (0e, 1o, 2e) of ``features``, with e3nn's ``D_from_matrix``
    (parity included: improper R act on 1o with det R = −1). One jitted D for all tests:
    e3nn's eager D_from_matrix is slow."""
    D = np.asarray(_wigner_d()(jnp.asarray(R)))
    blocks = {ir: D[sl, sl] for (_, ir), sl in zip(e3nn.Irreps("0e + 1o + 2e"), e3nn.Irreps("0e + 1o + 2e").slices())}
    chunks = [
        None if chunk is None else np.asarray(chunk) @ blocks[ir].T for (_, ir), chunk in zip(features.irreps, features.chunks)
    ]
    return e3nn.from_chunks(features.irreps, chunks, features.shape[:-1], features.dtype)


def edge_vectors(positions, senders, receivers, edge_mask):
    v = positions[receivers] - positions[senders]
    return jnp.where(edge_mask[:, None], v, 0.0)


def random_params(model, seed=0):
    """Random float64 parameters with the shapes of ``model.init`` and its scales.

    ``jax.eval_shape`` traces the init without compiling it (a jitted init compiles slower
    than the forward pass): Dense kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1²), everything
    else (e3nn Linear weights, which are normalised in the forward pass, embeddings,
    contraction weights) ~ N(0, 1).
    """
    index = jnp.zeros(2, jnp.int32)
    dummy = (jnp.zeros((2, 3)), index, index, index, jnp.ones(2, bool), jnp.ones(2, bool))
    shapes = jax.eval_shape(model.init, KEY, *dummy)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        scale = 1.0 / np.sqrt(leaf.shape[0]) if name == "kernel" else 0.1 if name == "bias" else 1.0
        return jnp.asarray(scale * rng.normal(size=leaf.shape), jnp.float64)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def make_functions(model):
    """Jitted ``forward(positions, species, senders, receivers, node_mask, edge_mask)`` → (energy [N], features)
    and ``evaluate(...)`` → (energy [N], features, total energy, forces [N, 3]), with :func:`random_params`."""
    params = random_params(model)

    def forward(params, positions, species, senders, receivers, node_mask, edge_mask):
        vectors = edge_vectors(positions, senders, receivers, edge_mask)
        return model.apply(params, vectors, species, senders, receivers, node_mask, edge_mask)

    def evaluate(params, positions, *graph):
        def total(p):
            energy, features = forward(params, p, *graph)
            return energy.sum(), (energy, features)

        (e, (energy, features)), grad = jax.value_and_grad(total, has_aux=True)(positions)
        return energy, features, e, -grad

    forward_jit, evaluate_jit = jax.jit(forward), jax.jit(evaluate)
    return (lambda *inputs: forward_jit(params, *inputs)), (lambda *inputs: evaluate_jit(params, *inputs))


@functools.lru_cache(maxsize=None)
def setup(name):
    """(forward, evaluate) of encoder ``name`` with the SMALL sizes (see :func:`make_functions`)."""
    return make_functions(build_encoder(name, **SMALL))


def padded_inputs(positions, species, cutoff=CUTOFF, num_nodes=N_PAD_NODES, num_edges=E_PAD):
    """Pad a structure to ``num_nodes`` atoms (species 0 at the origin) and ``num_edges`` edges."""
    n = len(positions)
    pos = np.zeros((num_nodes, 3))
    pos[:n] = positions
    spec = np.zeros(num_nodes, np.int32)
    spec[:n] = species
    s, r, em = neighbour_list(positions, cutoff, num_nodes, num_edges)
    return jnp.asarray(pos), jnp.asarray(spec), s, r, np.arange(num_nodes) < n, em


def run(name, positions, species):
    """(energy, features) of the real atoms of a structure, evaluated inside the fixed padded shapes."""
    energy, features, _, _ = setup(name)[1](*padded_inputs(positions, species))
    n = len(positions)
    return energy[:n], features[:n]


def forces_of(name, positions, species, cutoff=CUTOFF):
    """(total energy, forces [n, 3]) of a structure, inside the fixed padded shapes."""
    _, _, e, f = setup(name)[1](*padded_inputs(positions, species, cutoff))
    return e, f[: len(positions)]


# ----------------------------------------------------------------------------- tests


def test_registry():
    assert ENCODERS["nequip"] is NequIP and ENCODERS["mace"] is MACE
    with pytest.raises(ValueError):
        build_encoder("nope", num_species=1, cutoff=1.0)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_output_shapes_and_irreps(name):
    pos, species = random_cluster(1)
    energy, features = run(name, pos, species)
    assert energy.shape == (N_ATOMS,)
    assert features.shape == (N_ATOMS, features.irreps.dim)
    for ir in ["0e", "1o", "2e"]:
        assert features.irreps.count(ir) >= SMALL["num_channels"]
    assert np.all(np.isfinite(energy)) and np.all(np.isfinite(features.array))
    # the features are not trivially zero in any of the required irreps
    for ir in ["0e", "1o", "2e"]:
        assert np.abs(features.filter(keep=ir).array).max() > 1e-3


@pytest.mark.parametrize("name", ENCODER_NAMES)
@pytest.mark.parametrize("proper", [True, False], ids=["rotation", "improper"])
def test_rotation_equivariance(name, proper):
    pos, species = random_cluster(2)
    R = random_rotation(3, proper)
    e0, f0 = run(name, pos, species)
    e1, f1 = run(name, pos @ R.T, species)
    np.testing.assert_allclose(e1, e0, atol=1e-10)
    expected = rotate_features(f0, R)
    for ir in ["0e", "1o", "2e"]:
        np.testing.assert_allclose(f1.filter(keep=ir).array, expected.filter(keep=ir).array, atol=1e-10)
    # 1o channels are polar vectors in e3nn-jax's (x, y, z) order: they transform with R itself, proper or not
    C = SMALL["num_channels"]
    v0 = f0.filter(keep="1o").array.reshape(N_ATOMS, -1, 3)
    v1 = f1.filter(keep="1o").array.reshape(N_ATOMS, -1, 3)
    assert v0.shape[1] >= C
    np.testing.assert_allclose(v1, v0 @ R.T, atol=1e-10)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_inversion_parity(name):
    pos, species = random_cluster(4)
    e0, f0 = run(name, pos, species)
    e1, f1 = run(name, -pos, species)
    np.testing.assert_allclose(e1, e0, atol=1e-10)
    np.testing.assert_allclose(f1.filter(keep="0e").array, f0.filter(keep="0e").array, atol=1e-10)
    np.testing.assert_allclose(f1.filter(keep="1o").array, -f0.filter(keep="1o").array, atol=1e-10)
    np.testing.assert_allclose(f1.filter(keep="2e").array, f0.filter(keep="2e").array, atol=1e-10)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_permutation_and_translation(name):
    pos, species = random_cluster(5)
    e0, f0 = run(name, pos, species)
    perm = np.random.default_rng(6).permutation(N_ATOMS)
    e1, f1 = run(name, pos[perm], species[perm])
    np.testing.assert_allclose(e1, e0[perm], atol=1e-10)
    np.testing.assert_allclose(f1.array, f0.array[perm], atol=1e-10)
    e2, f2 = run(name, pos + np.array([10.3, -4.1, 7.7]), species)
    np.testing.assert_allclose(e2, e0, atol=1e-9)
    np.testing.assert_allclose(f2.array, f0.array, atol=1e-9)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_padding_invariance(name):
    pos, species = random_cluster(7)
    forward, evaluate = setup(name)
    # unpadded: exactly N_ATOMS atoms and only the real edges
    s, r, em = neighbour_list(pos, CUTOFF, N_ATOMS, num_edges=int(neighbour_list(pos, CUTOFF)[2].sum()))
    assert em.all()
    e0, f0 = forward(jnp.asarray(pos), jnp.asarray(species), s, r, np.ones(N_ATOMS, bool), em)
    forces0 = None
    # padded (padding atoms at the origin, species 0)
    inputs = padded_inputs(pos, species)
    # other padding content: padding atoms elsewhere (one on top of a real atom), other species,
    # padding edges spread over all padding atoms
    pad_pos = np.array(inputs[0])
    pad_pos[N_ATOMS:] = [[50.0, 0.0, 0.0], pos[0], [0.3, -0.2, 0.1]]
    pad_species = np.array(inputs[1])
    pad_species[N_ATOMS:] = [2, 1, 0]
    s2, r2 = np.array(inputs[2]), np.array(inputs[3])
    m = int(inputs[5].sum())
    loops = N_ATOMS + np.arange(E_PAD - m) % (N_PAD_NODES - N_ATOMS)
    s2[m:] = loops
    r2[m:] = loops
    other = (jnp.asarray(pad_pos), jnp.asarray(pad_species), s2, r2, inputs[4], inputs[5])
    for padded in (inputs, other):
        e1, f1, t1, forces1 = evaluate(*padded)
        np.testing.assert_allclose(e1[:N_ATOMS], e0, atol=1e-12)
        np.testing.assert_allclose(f1.array[:N_ATOMS], f0.array, atol=1e-12)
        np.testing.assert_allclose(t1, e0.sum(), atol=1e-12)
        assert np.all(e1[N_ATOMS:] == 0.0) and np.all(f1.array[N_ATOMS:] == 0.0)
        # forces: finite everywhere (zero-length padded edges), zero on padding atoms, independent of the padding
        assert np.all(np.isfinite(forces1))
        if forces0 is not None:
            np.testing.assert_allclose(forces1, forces0, atol=1e-12)
        forces0 = forces1
        assert np.all(forces1[N_ATOMS:] == 0.0)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_forces_match_finite_differences(name):
    pos, species = random_cluster(8)
    evaluate = setup(name)[1]
    inputs = padded_inputs(pos, species)  # edges fixed: no pair crosses the cutoff within ±h
    forces = evaluate(*inputs)[3]
    assert np.all(np.isfinite(forces))
    assert np.abs(forces[:N_ATOMS]).max() > 1e-4
    h = 1e-5
    fd = np.zeros_like(pos)
    for i in range(N_ATOMS):
        for k in range(3):
            dp = np.zeros((N_PAD_NODES, 3))
            dp[i, k] = h
            ep = evaluate(inputs[0] + dp, *inputs[1:])[2]
            em = evaluate(inputs[0] - dp, *inputs[1:])[2]
            fd[i, k] = -(ep - em) / (2 * h)
    np.testing.assert_allclose(forces[:N_ATOMS], fd, atol=1e-7, rtol=1e-6)


def _crossing_cluster(delta):
    """Atom 3 sits at distance CUTOFF + delta from atom 0; every other distance is far from the cutoff."""
    base = np.array([[0.0, 0.0, 0.0], [1.2, 0.3, 0.0], [0.4, 1.1, 0.5], [0.0, 0.0, 0.0]])
    direction = np.array([-0.6, -0.5, 0.9])
    direction /= np.linalg.norm(direction)
    base[3] = (CUTOFF + delta) * direction
    d = np.linalg.norm(base[:, None] - base[None], axis=-1)
    off = d[np.triu_indices(4, 1)]
    assert np.sum(np.abs(off - CUTOFF) < 0.2) == 1
    return base, np.array([0, 1, 2, 1], np.int32)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_smooth_at_cutoff(name):
    results = {}
    for delta in (-1e-6, 1e-6):
        pos, species = _crossing_cluster(delta)
        assert padded_inputs(pos, species)[5].sum() == (8 if delta < 0 else 6)  # pair 0–3 listed only inside
        results[delta] = forces_of(name, pos, species)
        # same positions, with the 0–3 pair dropped (inside) or forced in (outside): no jump
        other = forces_of(name, pos, species, cutoff=CUTOFF - 2e-6 if delta < 0 else CUTOFF + 2e-6)
        np.testing.assert_allclose(other[0], results[delta][0], atol=1e-12)
        np.testing.assert_allclose(other[1], results[delta][1], atol=1e-10)
    (e_in, f_in), (e_out, f_out) = results[-1e-6], results[1e-6]
    assert np.all(np.isfinite(f_in)) and np.all(np.isfinite(f_out))
    assert np.abs(f_in).max() > 1e-4  # the cluster is not trivially flat
    np.testing.assert_allclose(e_in, e_out, atol=1e-6)
    np.testing.assert_allclose(f_in, f_out, atol=1e-5)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_other_configurations(name):
    """l_max = 1 with a single layer still produces 2e features and stays equivariant."""
    overrides = dict(l_max=1, num_layers=1, num_radial_basis=4)
    forward, _ = make_functions(build_encoder(name, **dict(SMALL, **overrides)))

    pos, species = random_cluster(9)
    R = random_rotation(10, proper=False)
    e0, f0 = forward(*padded_inputs(pos, species))
    e1, f1 = forward(*padded_inputs(pos @ R.T, species))
    assert f0.irreps.count("2e") >= SMALL["num_channels"]
    assert np.abs(f0.filter(keep="2e").array).max() > 1e-4
    np.testing.assert_allclose(e1, e0, atol=1e-10)
    np.testing.assert_allclose(f1.array, rotate_features(f0, R).array, atol=1e-10)


def test_symmetric_contraction_equivariant_cubic():
    """MACE's contraction: equivariant (with parity) and a polynomial of degree exactly 3 in A."""
    irreps = e3nn.Irreps("0e + 1o + 2e")
    module = SymmetricContraction(NUM_SPECIES, irreps, correlation=3, l_max_inner=2)
    species = jnp.array([0, 1, 2, 1], jnp.int32)
    A = e3nn.IrrepsArray(irreps, jnp.asarray(np.random.default_rng(11).normal(size=(4, 3, irreps.dim))))
    rng = np.random.default_rng(13)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), jax.eval_shape(module.init, KEY, species, A))
    apply = jax.jit(lambda a: module.apply(params, species, e3nn.IrrepsArray(irreps, a)).array)
    out = e3nn.IrrepsArray(irreps, apply(A.array))
    R = random_rotation(12, proper=False)
    rotated = apply(rotate_features(A, R).array)
    np.testing.assert_allclose(rotated, rotate_features(out, R).array, atol=1e-10)
    # p(λ) = apply(λ A): the 4th finite difference vanishes, the 3rd does not
    values = np.stack([apply(lam * A.array) for lam in np.arange(5.0)])
    d3 = values[3] - 3 * values[2] + 3 * values[1] - values[0]
    d4 = values[4] - 4 * values[3] + 6 * values[2] - 4 * values[1] + values[0]
    assert np.abs(d4).max() < 1e-9 * np.abs(values).max()
    assert np.abs(d3).max() > 1e-3
