"""Host data layer: neighbor lists (vs brute-force image enumeration), padded batching, bucketing."""

import itertools
import types

import ase
import numpy as np
import pytest

from polarjax.data import (GraphBatcher, SizeBuckets, Structure, batch_structures, choose_padding, edge_vectors,
                           graph_atom_table, graph_shape, neighbor_list, prepare_structure, round_size,
                           species_table_from_elements, structure_from_atoms)
from polarjax.electrostatics.kgrid import kgrid_weights

TRICLINIC = np.array([[3.1, 0.0, 0.0], [0.9, 2.8, 0.0], [-0.6, 0.7, 3.3]])
SPECIES = {1: 0, 8: 1, 11: 2, 17: 3}


# ----------------------------------------------------------------------------- reference


def brute_force_pairs(positions, cell, pbc, cutoff):
    """{(i, j, n1, n2, n3): vector} by explicit enumeration of all images within range."""
    positions = np.asarray(positions, float)
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
    if not np.any(cell):
        pbc = np.zeros(3, bool)
    # dual vectors of the periodic rows: |b| = 1 / (spacing of lattice planes)
    dual = np.linalg.pinv(cell[pbc]).T if np.any(pbc) else None
    ranges = []
    for axis in range(3):
        if not pbc[axis]:
            ranges.append([0])
            continue
        recip = dual[int(np.sum(pbc[:axis]))]  # positions may lie outside the cell
        frac = positions @ recip
        n_max = int(np.ceil(cutoff * np.linalg.norm(recip) + np.ptp(frac))) + 1
        ranges.append(range(-n_max, n_max + 1))
    pairs = {}
    for shift in itertools.product(*ranges):
        offset = np.asarray(shift, float) @ cell
        vectors = positions[None, :, :] - positions[:, None, :] + offset  # [i, j]
        dist = np.linalg.norm(vectors, axis=-1)
        for i, j in zip(*np.nonzero(dist < cutoff)):
            if i == j and not any(shift):
                continue
            assert abs(dist[i, j] - cutoff) > 1e-6, "ambiguous pair at the cutoff; change the test geometry"
            pairs[(int(i), int(j)) + tuple(shift)] = vectors[i, j]
    return pairs


def as_pairs(senders, receivers, shifts):
    keys = [(int(s), int(r)) + tuple(int(x) for x in n) for s, r, n in zip(senders, receivers, shifts)]
    assert len(set(keys)) == len(keys), "duplicate edges"
    return keys


def check_against_brute_force(positions, cell, pbc, cutoff):
    senders, receivers, shifts = neighbor_list(positions, cell, pbc, cutoff)
    assert senders.dtype == receivers.dtype == shifts.dtype == np.int32
    assert shifts.shape == (len(senders), 3)
    expected = brute_force_pairs(positions, cell, pbc, cutoff)
    keys = as_pairs(senders, receivers, shifts)
    assert set(keys) == set(expected)
    vectors = positions[receivers] - positions[senders] + shifts @ cell
    np.testing.assert_allclose(vectors, np.array([expected[k] for k in keys]).reshape(-1, 3), atol=1e-12)
    return senders, receivers, shifts


# ----------------------------------------------------------------------------- neighbor lists


def test_triclinic_small_cell_cutoff_beyond_half_cell():
    rng = np.random.default_rng(0)
    frac = rng.uniform(-0.3, 1.3, size=(4, 3))  # some atoms outside the cell
    positions = frac @ TRICLINIC
    cutoff = 4.0  # longer than every cell vector: many images of every atom
    senders, receivers, shifts = check_against_brute_force(positions, TRICLINIC, True, cutoff)
    assert np.any((senders == receivers) & np.any(shifts != 0, axis=1))  # own images present
    assert not np.any((senders == receivers) & np.all(shifts == 0, axis=1))
    assert np.abs(shifts).max() >= 2  # genuinely multiple images along some direction
    # full list: every edge has its reverse
    keys = set(as_pairs(senders, receivers, shifts))
    assert all((r, s, -a, -b, -c) in keys for s, r, a, b, c in keys)


def test_open_cluster():
    rng = np.random.default_rng(1)
    positions = rng.uniform(0, 6.0, size=(12, 3))
    ref = check_against_brute_force(positions, np.zeros((3, 3)), False, 3.0)
    assert np.all(ref[2] == 0)
    # pbc=False ignores a non-zero cell; an all-zero cell is open even with pbc=True
    for cell, pbc in ((5.0 * np.eye(3), False), (np.zeros((3, 3)), True), (TRICLINIC, [False] * 3)):
        got = neighbor_list(positions, cell, pbc, 3.0)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


def test_single_atom_sees_its_own_images():
    positions = np.array([[0.3, 0.2, 0.1]])
    senders, receivers, shifts = check_against_brute_force(positions, 2.5 * np.eye(3), True, 3.0)
    assert len(senders) == 6 and np.all(senders == 0) and np.all(receivers == 0)
    assert sorted(map(tuple, shifts.tolist())) == sorted(
        [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)])


def test_atom_pair_with_own_images_triclinic():
    rng = np.random.default_rng(5)
    positions = rng.uniform(0, 1, size=(2, 3)) @ TRICLINIC
    check_against_brute_force(positions, TRICLINIC, [True, True, True], 3.5)


@pytest.mark.parametrize("vacuum_row", [True, False])
def test_mixed_pbc_slab(vacuum_row):
    rng = np.random.default_rng(2)
    cell = TRICLINIC.copy()
    cell[2] = 0.0 if vacuum_row else [0.0, 0.0, 9.0]
    positions = rng.uniform(0, 1, size=(5, 3)) @ TRICLINIC + [0, 0, 1.0]
    _, _, shifts = check_against_brute_force(positions, cell, [True, True, False], 3.7)
    assert np.all(shifts[:, 2] == 0)


@pytest.mark.parametrize("bad, match", [
    (dict(positions=np.array([[0.0, 0.0, np.nan], [1, 1, 1]])), "NaN or inf"),
    (dict(positions=np.zeros((3, 2))), r"shape \[N, 3\]"),
    (dict(cell=np.eye(2)), r"shape \[3, 3\]"),
    (dict(cutoff=0.0), "cutoff"),
    (dict(cutoff=-1.0), "cutoff"),
    (dict(cutoff=np.inf), "cutoff"),
    (dict(cell=np.array([[2.0, 0, 0], [0, 2.0, 0], [2.0, 2.0, 0]])), "singular"),
    (dict(cell=np.diag([2.0, 2.0, 0.0])), "singular"),
    (dict(pbc=[True, False]), "pbc"),
])
def test_neighbor_list_errors(bad, match):
    args = dict(positions=np.array([[0.0, 0, 0], [1.0, 1.0, 1.0]]), cell=3.0 * np.eye(3), pbc=True, cutoff=2.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        neighbor_list(**args)


# ----------------------------------------------------------------------------- batching


def _mixed_structures():
    rng = np.random.default_rng(3)
    periodic = Structure(rng.uniform(0, 1, size=(4, 3)) @ TRICLINIC, [8, 1, 1, 11], TRICLINIC, True)
    cluster = ase.Atoms("NaClNaCl", positions=rng.uniform(0, 4.0, size=(4, 3)), cell=10.0 * np.eye(3), pbc=False)
    cubic = ase.Atoms("H2O", positions=[[0.0, 0, 0], [0.96, 0, 0], [-0.2, 0.93, 0]], cell=6.5 * np.eye(3), pbc=True)
    return [periodic, structure_from_atoms(cluster), cubic]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batched_edge_vectors_match_brute_force(dtype):
    structures = _mixed_structures()
    cutoff = 3.6
    graph = batch_structures(structures, SPECIES, cutoff, n_node=20, n_edge=600, n_graph=5, dtype=dtype)
    assert graph.positions.dtype == dtype and graph.kweights.dtype == dtype
    vectors = np.asarray(edge_vectors(graph))
    offset = 0
    for g, item in enumerate(structures):
        s = item if isinstance(item, Structure) else structure_from_atoms(item)
        expected = brute_force_pairs(s.positions, s.cell, s.is_periodic, cutoff)
        in_graph = graph.edge_mask & (graph.graph_index[graph.senders] == g)
        keys = as_pairs(graph.senders[in_graph] - offset, graph.receivers[in_graph] - offset,
                        graph.shifts[in_graph].astype(int))
        assert set(keys) == set(expected)
        np.testing.assert_allclose(vectors[in_graph], [expected[k] for k in keys], atol=1e-5)
        assert np.all(graph.graph_index[graph.receivers[in_graph]] == g)
        offset += s.num_atoms
    np.testing.assert_array_equal(vectors[~graph.edge_mask], 0.0)


def test_padding_invariants_and_mixed_boundaries():
    structures = _mixed_structures()
    dl = 2.0
    graph = batch_structures(structures, SPECIES, 3.6, dl, n_node=20, n_edge=600, n_graph=5)
    n_real = 4 + 4 + 3
    assert graph.positions.shape == (20, 3) and graph.senders.shape == (600,) and graph.cell.shape == (5, 3, 3)
    np.testing.assert_array_equal(graph.node_mask, np.arange(20) < n_real)
    np.testing.assert_array_equal(graph.graph_index[n_real:], 4)  # padding atoms -> last (padding) graph
    np.testing.assert_array_equal(graph.graph_index[:n_real], [0] * 4 + [1] * 4 + [2] * 3)
    np.testing.assert_array_equal(graph.species[:4], [1, 0, 0, 2])
    np.testing.assert_array_equal(graph.species[4:8], [2, 3, 2, 3])
    np.testing.assert_array_equal(graph.species[n_real:], 0)
    np.testing.assert_array_equal(graph.atomic_numbers[n_real:], 0)
    pad_edges = ~graph.edge_mask
    assert pad_edges.sum() > 0 and graph.edge_mask[: graph.edge_mask.sum()].all()
    assert np.all(graph.senders[pad_edges] == graph.receivers[pad_edges])
    assert not graph.node_mask[graph.senders[pad_edges]].any()
    np.testing.assert_array_equal(graph.shifts[pad_edges], 0.0)
    assert graph.node_mask[graph.senders[graph.edge_mask]].all() and graph.node_mask[graph.receivers[graph.edge_mask]].all()
    np.testing.assert_array_equal(graph.graph_mask, [True, True, True, False, False])
    np.testing.assert_array_equal(graph.periodic, [True, False, True, False, False])
    np.testing.assert_array_equal(graph.n_atoms, [4, 4, 3, 0, 0])
    np.testing.assert_array_equal(graph.cell[1], 0.0)  # open: zero cell even though ASE gave one
    np.testing.assert_array_equal(graph.cell[3:], 0.0)
    np.testing.assert_array_equal(graph.cell[2], 6.5 * np.eye(3))
    # k-weights: common bounds, each periodic cell's own set, zeros for open and padding graphs
    bounds = (max(1, int(6.5 // dl)),) * 3
    assert graph.kweights.shape == (5, bounds[0] + 1, 2 * bounds[1] + 1, 2 * bounds[2] + 1)
    np.testing.assert_array_equal(graph.kweights[0], kgrid_weights(TRICLINIC, dl, bounds))
    np.testing.assert_array_equal(graph.kweights[2], kgrid_weights(6.5 * np.eye(3), dl, bounds))
    np.testing.assert_array_equal(graph.kweights[[1, 3, 4]], 0.0)
    np.testing.assert_array_equal(graph.graph_atoms, graph_atom_table(graph.graph_index, graph.node_mask, 5, 4))
    assert graph_shape(graph) == (20, 600, 5, 4, bounds)


def test_minimal_and_explicit_shapes():
    structures = _mixed_structures()
    graph = batch_structures(structures, SPECIES, 3.6)
    n_edges = sum(prepare_structure(s, SPECIES, 3.6).num_edges for s in structures)
    assert graph_shape(graph)[:4] == (12, n_edges, 4, 4)
    graph = batch_structures(structures, SPECIES, 3.6, kgrid_bounds=(5, 4, 4), max_atoms=7)
    assert graph.kweights.shape[1:] == (6, 9, 9) and graph.graph_atoms.shape == (4, 7)
    graph = batch_structures(structures, SPECIES, 3.6, kbucket=4)
    assert graph.kweights.shape[1:] == (5, 9, 9)
    # training-style records (positions / numbers / cell / pbc attributes) are accepted too
    frame = types.SimpleNamespace(positions=structures[0].positions, numbers=structures[0].atomic_numbers,
                                  cell=structures[0].cell, pbc=np.array([True] * 3), labels={"energy": 1.0})
    reference = batch_structures(structures, SPECIES, 3.6)
    for a, b in zip(batch_structures([frame] + structures[1:], SPECIES, 3.6), reference):
        np.testing.assert_array_equal(a, b)
    # element list (model order) -> table
    table = species_table_from_elements([8, 1, 11, 17])
    np.testing.assert_array_equal(batch_structures(structures, table, 3.6).species[:4], [0, 1, 1, 2])
    # array form indexed by Z
    lookup = -np.ones(20, int)
    lookup[[1, 8, 11, 17]] = [0, 1, 2, 3]
    np.testing.assert_array_equal(batch_structures(structures, lookup, 3.6).species[:4], [1, 0, 0, 2])


def test_batching_errors():
    structures = _mixed_structures()
    uranium = Structure(np.array([[0.0, 0, 0], [1.5, 0, 0]]), [1, 92])
    with pytest.raises(ValueError, match=r"structure 3: element\(s\) \['U'\]"):
        batch_structures(structures + [uranium], SPECIES, 3.6)
    with pytest.raises(ValueError, match="n_graph=3 < 4"):
        batch_structures(structures, SPECIES, 3.6, n_graph=3)
    with pytest.raises(ValueError, match=r"n_node=11 < 12"):
        batch_structures(structures, SPECIES, 3.6, n_node=11)
    with pytest.raises(ValueError, match="n_edge"):
        batch_structures(structures, SPECIES, 3.6, n_edge=5)
    with pytest.raises(ValueError, match="kgrid_bounds"):
        batch_structures(structures, SPECIES, 3.6, kgrid_bounds=(1, 1, 1))
    slab = Structure(np.array([[0.0, 0, 0]]), [1], 3.0 * np.eye(3), [True, True, False])
    with pytest.raises(ValueError, match="structure 1: mixed periodic"):
        batch_structures([structures[0], slab], SPECIES, 3.6)
    with pytest.raises(ValueError, match="structure 0: .*singular"):
        batch_structures([Structure(np.zeros((1, 3)), [1], np.diag([3.0, 3.0, 0.0]), True)], SPECIES, 3.6)
    with pytest.raises(ValueError, match="NaN or inf"):
        Structure(np.array([[0.0, np.inf, 0]]), [1])
    with pytest.raises(ValueError, match="atomic_numbers"):
        Structure(np.zeros((2, 3)), [1])
    with pytest.raises(ValueError, match="cutoff"):
        batch_structures(structures, SPECIES, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        batch_structures(structures, SPECIES, 3.6, dtype=np.int32)


# ----------------------------------------------------------------------------- bucketing


def test_round_size_modes():
    assert [round_size(n, 16, "pow2") for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]
    assert [round_size(n, 16, "multiple") for n in (1, 16, 17, 100)] == [16, 16, 32, 112]
    sizes = {round_size(n, 8, "geometric", 1.5) for n in range(1, 400)}
    assert all(s % 8 == 0 for s in sizes) and len(sizes) < 12
    with pytest.raises(ValueError, match="mode"):
        SizeBuckets(mode="fibonacci")


def _random_dataset(n=50, seed=4):
    rng = np.random.default_rng(seed)
    structures = []
    for k in range(n):
        n_atoms = int(rng.integers(2, 40))
        numbers = rng.choice([1, 8, 11, 17], size=n_atoms)
        if k % 3 == 0:  # open cluster
            structures.append(Structure(rng.uniform(0, 6.0, size=(n_atoms, 3)), numbers))
        else:
            length = float(rng.uniform(5.0, 9.0))
            cell = length * np.eye(3) + rng.uniform(-0.5, 0.5, size=(3, 3))
            structures.append(Structure(rng.uniform(0, 1, size=(n_atoms, 3)) @ cell, numbers, cell, True))
    return structures


def test_bucketing_keeps_few_shapes():
    structures = _random_dataset()
    batcher = GraphBatcher(structures, SPECIES, 3.0, batch_size=4, shuffle=True, seed=1)  # default buckets
    exact = set()
    seen = []
    for epoch in range(3):
        for indices, graph in batcher.epoch(epoch):
            assert graph.graph_mask.sum() == len(indices) and graph.cell.shape[0] == 5
            np.testing.assert_array_equal(graph.n_atoms[: len(indices)], [structures[i].num_atoms for i in indices])
            exact.add(choose_padding([batcher.prepared(i) for i in indices]))
            seen.append(graph_shape(graph))
    assert set(seen) == batcher.shapes_seen
    assert len(batcher) == 13 and len(exact) > 30
    assert batcher.num_shapes <= 8, batcher.shapes_seen
    # without reusing shapes (pure pow2 rounding) there are more, but still far fewer than batches
    plain = GraphBatcher(structures, SPECIES, 3.0, batch_size=4, shuffle=True, seed=1, reuse_factor=None,
                         buckets=SizeBuckets(mode="pow2", node_step=16, edge_step=256, kgrid_step=2))
    for epoch in range(3):
        list(plain.epoch(epoch))
    assert batcher.num_shapes < plain.num_shapes < len(exact) // 2
    # one shape for everything
    single = GraphBatcher(structures, SPECIES, 3.0, batch_size=4, shuffle=True, single_shape=True)
    for epoch in range(2):
        for graph in single:
            pass
    assert single.num_shapes == 1
    # the same structure gives the same neighbor list alone or in the batcher's cache
    alone = prepare_structure(structures[7], SPECIES, 3.0)
    np.testing.assert_array_equal(alone.shifts, batcher.prepared(7).shifts)


def test_batcher_reports_bad_structure_index():
    structures = _random_dataset(6)
    structures[4] = Structure(np.zeros((1, 3)), [26])
    with pytest.raises(ValueError, match=r"structure 4: element\(s\) \['Fe'\]"):
        GraphBatcher(structures, SPECIES, 3.0, batch_size=2)
