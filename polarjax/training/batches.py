"""Frames → padded :class:`~polarjax.data.graph.Graph` batches with size buckets.

Padding policy: node and edge counts are rounded up to multiples (``node_multiple``,
``edge_multiple``), the graph count is the number of frames + 1 (one padding graph), and
k-grid bounds are rounded up to multiples of ``kgrid_bucket``. Each distinct padded shape
costs one jit compilation; ``num_shapes`` counts them (logged as ``compiles``).

Neighbor lists are computed once per frame on the host (vesin) and cached.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from polarjax.data.graph import Graph, graph_atom_table
from polarjax.electrostatics.kgrid import batch_kgrid_weights, kgrid_bounds, round_up_bounds
from polarjax.training.dataset import Frame


def neighbor_pairs(positions: np.ndarray, cell: np.ndarray, periodic: bool, cutoff: float):
    """Full neighbor list (both directions): senders [E], receivers [E], shifts [E, 3].

    vector = positions[receivers] − positions[senders] + shifts @ cell; correct for
    triclinic cells and cells smaller than twice the cutoff (several images).
    """
    import vesin

    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    box = np.asarray(cell, dtype=np.float64) if periodic else np.zeros((3, 3))
    i, j, shifts = calculator.compute(np.asarray(positions, dtype=np.float64), box, bool(periodic), quantities="ijS")
    return i.astype(np.int32), j.astype(np.int32), shifts.astype(np.int32)


def _round_up(value: int, multiple: int) -> int:
    return int(multiple * math.ceil(max(value, 1) / multiple))


class BatchBuilder:
    """Builds padded Graph batches (and their labels) from frames, with caching and buckets."""

    def __init__(self, spec, cutoff: float, dtype=np.float32, node_multiple: int = 32, edge_multiple: int = 256,
                 kgrid_bucket: int = 2):
        self.spec = spec
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self.node_multiple = node_multiple
        self.edge_multiple = edge_multiple
        self.kgrid_bucket = kgrid_bucket
        self.species_index = {int(z): k for k, z in enumerate(spec.species)}
        self._neighbors: dict[int, tuple] = {}
        self.shapes: set = set()

    @property
    def num_shapes(self) -> int:
        return len(self.shapes)

    def atoms_slot(self, num_atoms: int) -> int:
        """Flat slots used by a frame of ``num_atoms`` atoms (frames are packed without gaps)."""
        return num_atoms

    def neighbors(self, frame: Frame):
        key = id(frame)
        if key not in self._neighbors:
            self._neighbors[key] = neighbor_pairs(frame.positions, frame.cell, frame.periodic, self.cutoff)
        return self._neighbors[key]

    def padding_for(self, frames: Sequence[Frame]) -> tuple:
        """(n_node, n_edge, n_graph, max_atoms, kbounds) for these frames."""
        n_node = _round_up(sum(f.num_atoms for f in frames) + 1, self.node_multiple)
        n_edge = _round_up(sum(len(self.neighbors(f)[0]) for f in frames), self.edge_multiple)
        max_atoms = _round_up(max(f.num_atoms for f in frames), 8)
        bounds = (1, 1, 1)
        for f in frames:
            if f.periodic:
                bounds = tuple(max(a, b) for a, b in zip(bounds, kgrid_bounds(f.cell, self.spec.dl)))
        return n_node, n_edge, len(frames) + 1, max_atoms, round_up_bounds(bounds, self.kgrid_bucket)

    def build(self, frames: Sequence[Frame], padding: tuple | None = None):
        """One padded Graph and its labels dict for ``frames``."""
        padding = self.padding_for(frames) if padding is None else padding
        n_node, n_edge, n_graph, max_atoms, kbounds = padding
        self.shapes.add(padding)
        dtype = self.dtype
        positions = np.zeros((n_node, 3), dtype)
        species = np.zeros(n_node, np.int32)
        numbers = np.zeros(n_node, np.int32)
        node_mask = np.zeros(n_node, bool)
        graph_index = np.full(n_node, n_graph - 1, np.int32)
        pad_atom = n_node - 1
        senders = np.full(n_edge, pad_atom, np.int32)
        receivers = np.full(n_edge, pad_atom, np.int32)
        shifts = np.zeros((n_edge, 3), dtype)
        edge_mask = np.zeros(n_edge, bool)
        cell = np.zeros((n_graph, 3, 3), dtype)
        periodic = np.zeros(n_graph, bool)
        graph_mask = np.zeros(n_graph, bool)
        n_atoms = np.zeros(n_graph, np.int32)
        labels = {"energy": np.zeros(n_graph, dtype), "forces": np.zeros((n_node, 3), dtype),
                  "stress": np.zeros((n_graph, 3, 3), dtype), "has_stress": np.zeros(n_graph, bool)}
        atom, edge = 0, 0
        for g, frame in enumerate(frames):
            n = frame.num_atoms
            try:
                species[atom:atom + n] = [self.species_index[int(z)] for z in frame.numbers]
            except KeyError as error:
                from ase.data import chemical_symbols
                raise ValueError(f"{frame.source}: element {chemical_symbols[int(error.args[0])]} is not among the "
                                 f"model's species {[chemical_symbols[z] for z in self.spec.species]}") from None
            positions[atom:atom + n] = frame.positions
            numbers[atom:atom + n] = frame.numbers
            node_mask[atom:atom + n] = True
            graph_index[atom:atom + n] = g
            s, r, sh = self.neighbors(frame)
            senders[edge:edge + len(s)] = s + atom
            receivers[edge:edge + len(r)] = r + atom
            shifts[edge:edge + len(s)] = sh
            edge_mask[edge:edge + len(s)] = True
            cell[g] = frame.cell
            periodic[g] = frame.periodic
            graph_mask[g] = True
            n_atoms[g] = n
            labels["energy"][g] = frame.labels.get("energy", 0.0)
            if "forces" in frame.labels:
                labels["forces"][atom:atom + n] = frame.labels["forces"]
            if "stress" in frame.labels and frame.periodic:
                labels["stress"][g] = frame.labels["stress"]
                labels["has_stress"][g] = True
            atom += n
            edge += len(s)
        if atom >= n_node or edge > n_edge:
            raise ValueError(f"padding {padding} too small for {atom} atoms / {edge} edges")
        kweights = batch_kgrid_weights(cell.astype(np.float64), periodic, self.spec.dl, 1, kbounds).astype(dtype)
        table = graph_atom_table(graph_index, node_mask, n_graph, max_atoms)
        graph = Graph(positions, species, numbers, node_mask, graph_index, senders, receivers, shifts, edge_mask,
                      cell, periodic, graph_mask, n_atoms, kweights, table)
        return graph, labels

    def build_sharded(self, frames: Sequence[Frame], num_shards: int):
        """Split ``frames`` into ``num_shards`` equal groups padded alike; stack with a leading axis."""
        if len(frames) % num_shards:
            raise ValueError(f"{len(frames)} frames cannot be split into {num_shards} equal shards")
        per = len(frames) // num_shards
        groups = [frames[k * per:(k + 1) * per] for k in range(num_shards)]
        paddings = [self.padding_for(group) for group in groups]
        padding = tuple(max(p[i] for p in paddings) for i in range(4)) + (
            tuple(max(p[4][d] for p in paddings) for d in range(3)),)
        built = [self.build(group, padding) for group in groups]
        stack = lambda *xs: np.stack(xs)
        import jax
        graphs = jax.tree_util.tree_map(stack, *[b[0] for b in built])
        labels = jax.tree_util.tree_map(stack, *[b[1] for b in built])
        return graphs, labels
