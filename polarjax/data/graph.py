"""The padded batch of atomic structures that every jitted function consumes.

All arrays have static, padded sizes. Padding atoms, edges and graphs carry
``False`` in their masks and must change no result:

* padding atoms have ``graph_index`` pointing at the last (padding) graph, species 0,
  positions far from each other is NOT required: masks are authoritative;
* padding edges connect a padding atom to itself with a zero shift;
* padding graphs have a zero cell, ``periodic=False``, zero k-weights.

Conventions: cell vectors are the rows of ``cell[g]``; the vector of edge e is

    positions[receivers[e]] − positions[senders[e]] + shifts[e] @ cell[graph_index[senders[e]]]

(``shifts`` are integer image shifts stored as floats).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Graph(NamedTuple):
    """A padded batch of structures.

    Attributes (N atoms, E edges, G graphs, all padded):
      positions: [N, 3] Cartesian positions (Å).
      species: [N] int32, index into the model's element list.
      atomic_numbers: [N] int32 (0 for padding).
      node_mask: [N] bool.
      graph_index: [N] int32, the structure each atom belongs to.
      senders: [E] int32.
      receivers: [E] int32.
      shifts: [E, 3] float, integer image shifts of the receiver side.
      edge_mask: [E] bool.
      cell: [G, 3, 3] cells (rows are vectors; zeros for open structures).
      periodic: [G] bool.
      graph_mask: [G] bool.
      n_atoms: [G] int32, real atoms per structure.
      kweights: [G, M1 + 1, 2 M2 + 1, 2 M3 + 1] half-space k-grid weights
        (see ``polarjax.electrostatics.kgrid``); zeros for open structures.
      graph_atoms: [G, A] int32, the flat indices of each structure's atoms (A = the
        padded largest structure), −1 for empty slots; the per-structure layout the
        electrostatics works in (see :func:`graph_atom_table`).
    """

    positions: jnp.ndarray
    species: jnp.ndarray
    atomic_numbers: jnp.ndarray
    node_mask: jnp.ndarray
    graph_index: jnp.ndarray
    senders: jnp.ndarray
    receivers: jnp.ndarray
    shifts: jnp.ndarray
    edge_mask: jnp.ndarray
    cell: jnp.ndarray
    periodic: jnp.ndarray
    graph_mask: jnp.ndarray
    n_atoms: jnp.ndarray
    kweights: jnp.ndarray
    graph_atoms: jnp.ndarray


def graph_atom_table(graph_index: np.ndarray, node_mask: np.ndarray, num_graphs: int, max_atoms: int) -> np.ndarray:
    """Host-side [G, A] table of each graph's atom indices (−1 padded), in flat order.

    Args:
      graph_index: [N] graph of each atom. node_mask: [N] real atoms.
      num_graphs: G. max_atoms: A, at least the largest structure.
    """
    graph_index = np.asarray(graph_index)
    node_mask = np.asarray(node_mask, bool)
    table = -np.ones((num_graphs, max_atoms), dtype=np.int32)
    counts = np.zeros(num_graphs, dtype=np.int64)
    for atom in np.flatnonzero(node_mask):
        g = graph_index[atom]
        if counts[g] >= max_atoms:
            raise ValueError(f"graph {g} has more than max_atoms={max_atoms} atoms")
        table[g, counts[g]] = atom
        counts[g] += 1
    return table


def edge_vectors(graph: Graph, positions: jnp.ndarray | None = None, cell: jnp.ndarray | None = None) -> jnp.ndarray:
    """Edge vectors [E, 3]; padded edges give exact zeros.

    ``positions`` [N, 3] and ``cell`` [G, 3, 3] override the graph's (for gradients).
    """
    positions = graph.positions if positions is None else positions
    cell = graph.cell if cell is None else cell
    edge_cell = cell[graph.graph_index[graph.senders]]
    offsets = jnp.einsum("ei,eij->ej", graph.shifts.astype(positions.dtype), edge_cell)
    vectors = positions[graph.receivers] - positions[graph.senders] + offsets
    return jnp.where(graph.edge_mask[:, None], vectors, 0.0)
