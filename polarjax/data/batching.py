"""Padded batches of structures (host numpy) and the size-bucketing policy.

``batch_structures`` concatenates structures into one :class:`~polarjax.data.graph.Graph`
with static padded sizes (the padding contract is in ``polarjax/data/graph.py``):

* atoms ``[0, total)`` are real, in structure order; atoms ``[total, n_node)`` are padding,
  with species 0, atomic number 0, zero position and ``graph_index = n_graph − 1``;
* edges ``[0, total_edges)`` are real; padding edges are self-loops on the first padding
  atom with a zero shift;
* graphs ``[0, S)`` are the structures; graphs ``[S, n_graph)`` are padding (zero cell,
  ``periodic=False``, zero k-weights, ``n_atoms = 0``). ``n_graph >= S + 1`` and
  ``n_node >= total + 1`` always, so the last graph and at least one atom are padding.

Every jit-compiled function recompiles for each distinct padded shape. ``SizeBuckets``
rounds the sizes up to a few values, and ``GraphBatcher`` records the shapes it produced
so a training log can report the number of compilations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from polarjax.data.graph import Graph
from polarjax.data.structures import PreparedStructure, SpeciesTable, prepare_structure, species_lookup
from polarjax.electrostatics.kgrid import batch_kgrid_weights, grid_bounds_of, round_up_bounds
from polarjax.units import DEFAULT_DL


class PaddedShape(NamedTuple):
    """The static sizes of a padded Graph (one jit compilation each).

    n_node: N atoms; n_edge: E edges; n_graph: G graphs; max_atoms: A, the width of
    ``graph_atoms``; kgrid_bounds: (M1, M2, M3) of the common k-grid.
    """

    n_node: int
    n_edge: int
    n_graph: int
    max_atoms: int
    kgrid_bounds: tuple[int, int, int]


def graph_shape(graph: Graph) -> PaddedShape:
    """The :class:`PaddedShape` of a (host or device) Graph."""
    return PaddedShape(int(graph.positions.shape[0]), int(graph.senders.shape[0]), int(graph.cell.shape[0]),
                       int(graph.graph_atoms.shape[1]), tuple(int(b) for b in grid_bounds_of(graph.kweights.shape)))


# --------------------------------------------------------------------------- bucketing


def round_size(n: int, step: int = 1, mode: str = "multiple", growth: float = 2.0) -> int:
    """Round ``n`` up to a bucket size.

    Modes: ``"multiple"``: the next multiple of ``step``; ``"pow2"``: the smallest
    ``step · 2^k >= n``; ``"geometric"``: the smallest term >= n of ``s_0 = step``,
    ``s_{k+1} = step · ceil(growth · s_k / step)`` (multiples of ``step`` growing by
    about ``growth``; ``growth=2`` equals ``"pow2"``). The result is at least ``step``.
    """
    n, step = int(n), int(step)
    if step < 1:
        raise ValueError(f"bucket step must be >= 1, got {step}")
    if mode == "multiple":
        return step * max(1, math.ceil(n / step))
    if mode == "pow2":
        return step * (1 << max(0, math.ceil(math.log2(max(n, 1) / step)))) if n > step else step
    if mode == "geometric":
        if not growth > 1.0:
            raise ValueError(f"geometric bucket growth must be > 1, got {growth}")
        size = step
        while size < n:
            size = max(size + step, step * math.ceil(growth * size / step))
        return size
    raise ValueError(f"unknown bucket mode {mode!r} (use 'multiple', 'pow2' or 'geometric')")


@dataclasses.dataclass(frozen=True)
class SizeBuckets:
    """How padded sizes are rounded up (see :func:`round_size` for ``mode``).

    Attributes:
      mode: ``"geometric"`` (default, steps of about ``growth``), ``"pow2"`` or ``"multiple"``;
        applies to atoms, edges and the per-graph atom slots.
      node_step: smallest size / granularity of the atom count N.
      edge_step: smallest size / granularity of the edge count E.
      atoms_step: smallest size / granularity of A (the largest structure).
      kgrid_step: k-grid bounds are rounded up to multiples of this.
      growth: ratio between buckets for ``mode="geometric"``.
      graph_step: the graph count G = S + 1 is rounded up to a multiple of this (1: exact).
    """

    mode: str = "geometric"
    node_step: int = 16
    edge_step: int = 256
    atoms_step: int = 8
    kgrid_step: int = 2
    growth: float = 1.5
    graph_step: int = 1

    def __post_init__(self):
        for name in ("node_step", "edge_step", "atoms_step", "kgrid_step", "graph_step"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SizeBuckets.{name} must be >= 1, got {getattr(self, name)}")
        round_size(1, 1, self.mode, self.growth)  # validates mode and growth

    def round(self, n: int, step: int) -> int:
        return round_size(n, step, self.mode, self.growth)

    def shape(self, total_atoms: int, total_edges: int, largest: int, n_structures: int,
              kbounds: Sequence[int] = (1, 1, 1), n_graph: Optional[int] = None) -> PaddedShape:
        """The bucketed shape for a batch with these totals (``n_graph`` fixes G if given)."""
        graphs = round_size(n_structures + 1, self.graph_step, "multiple") if n_graph is None else int(n_graph)
        return PaddedShape(self.round(total_atoms + 1, self.node_step), self.round(max(total_edges, 1), self.edge_step),
                           graphs, self.round(max(largest, 1), self.atoms_step),
                           round_up_bounds(kbounds, self.kgrid_step))


def shape_cost(shape: PaddedShape) -> int:
    """A rough work estimate of a padded shape: N + E + G·A·K (K = k-grid points)."""
    m1, m2, m3 = shape.kgrid_bounds
    return shape.n_node + shape.n_edge + shape.n_graph * shape.max_atoms * (m1 + 1) * (2 * m2 + 1) * (2 * m3 + 1)


def fits(shape: PaddedShape, need: PaddedShape) -> bool:
    """True when ``shape`` is at least ``need`` in every size (so it can hold that batch)."""
    return (shape.n_node >= need.n_node and shape.n_edge >= need.n_edge and shape.n_graph >= need.n_graph
            and shape.max_atoms >= need.max_atoms
            and all(a >= b for a, b in zip(shape.kgrid_bounds, need.kgrid_bounds)))


def _common_kbounds(prepared: Sequence[PreparedStructure]) -> tuple[int, int, int]:
    """Elementwise max of the structures' own k-grid bounds ((1, 1, 1) if all are open)."""
    bounds = np.ones(3, dtype=int)
    for item in prepared:
        if item.kbounds is not None:
            bounds = np.maximum(bounds, item.kbounds)
    return tuple(int(b) for b in bounds)


def minimal_shape(prepared: Sequence[PreparedStructure], n_graph: Optional[int] = None) -> PaddedShape:
    """The smallest valid shape for these structures (no bucketing)."""
    total = sum(p.num_atoms for p in prepared)
    return PaddedShape(total + 1, max(1, sum(p.num_edges for p in prepared)),
                       len(prepared) + 1 if n_graph is None else int(n_graph),
                       max([p.num_atoms for p in prepared] + [1]), _common_kbounds(prepared))


def choose_padding(prepared: Sequence[PreparedStructure], buckets: Optional[SizeBuckets] = None,
                   n_graph: Optional[int] = None) -> PaddedShape:
    """The padded shape for a batch of prepared structures.

    Args:
      prepared: the batch's structures (from :func:`prepare_structure`).
      buckets: rounding policy; None gives the exact minimal shape.
      n_graph: fix the graph count G (e.g. ``batch_size + 1`` so G never changes).
    """
    if buckets is None:
        return minimal_shape(prepared, n_graph)
    return buckets.shape(sum(p.num_atoms for p in prepared), sum(p.num_edges for p in prepared),
                         max([p.num_atoms for p in prepared] + [1]), len(prepared),
                         _common_kbounds(prepared), n_graph)


def check_shape(prepared: Sequence[PreparedStructure], shape: PaddedShape) -> None:
    """ValueError if ``shape`` cannot hold ``prepared`` (with its mandatory padding)."""
    need = minimal_shape(prepared)
    problems = []
    if shape.n_node < need.n_node:
        problems.append(f"n_node={shape.n_node} < {need.n_node} (atoms + 1 padding atom)")
    total_edges = sum(p.num_edges for p in prepared)
    if shape.n_edge < total_edges:
        problems.append(f"n_edge={shape.n_edge} < {total_edges} edges")
    if shape.n_graph < need.n_graph:
        problems.append(f"n_graph={shape.n_graph} < {need.n_graph} (structures + 1 padding graph)")
    if shape.max_atoms < need.max_atoms:
        problems.append(f"max_atoms={shape.max_atoms} < largest structure {need.max_atoms}")
    if any(int(b) < n for b, n in zip(shape.kgrid_bounds, need.kgrid_bounds)):
        problems.append(f"kgrid_bounds={tuple(shape.kgrid_bounds)} < the cells' own bounds {need.kgrid_bounds}")
    if problems:
        raise ValueError("padded shape too small: " + "; ".join(problems))


# --------------------------------------------------------------------------- collation


def collate(prepared: Sequence[PreparedStructure], shape: PaddedShape, dl: Optional[float] = None,
            dtype=np.float64) -> Graph:
    """Concatenate prepared structures into a padded host :class:`Graph` of ``shape``.

    Args:
      prepared: S >= 0 structures, all prepared with the same cutoff and ``dl``.
      shape: the padded sizes (checked by :func:`check_shape`).
      dl: k-space resolution (Å); defaults to the one the structures were prepared with.
      dtype: float dtype of positions, shifts, cell and k-weights (float32 or float64).

    Returns:
      A Graph of numpy arrays with [N], [E] and [G]-leading shapes from ``shape``.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    dls = sorted({p.dl for p in prepared})
    if len(dls) > 1:
        raise ValueError(f"structures were prepared with different dl values {dls}")
    if dl is None:
        dl = dls[0] if dls else DEFAULT_DL
    elif dls and not math.isclose(dls[0], dl):
        raise ValueError(f"structures were prepared with dl={dls[0]}, but dl={dl} was requested")
    cutoffs = {p.cutoff for p in prepared}
    if len(cutoffs) > 1:
        raise ValueError(f"structures were prepared with different cutoffs {sorted(cutoffs)}")
    check_shape(prepared, shape)

    n_node, n_edge, n_graph, max_atoms, kbounds = shape
    n_struct = len(prepared)
    atom_counts = np.array([p.num_atoms for p in prepared], dtype=np.int64)
    edge_counts = np.array([p.num_edges for p in prepared], dtype=np.int64)
    total, total_edges = int(atom_counts.sum()), int(edge_counts.sum())
    offsets = np.concatenate([[0], np.cumsum(atom_counts)[:-1]]).astype(np.int64) if n_struct else np.zeros(0, np.int64)

    def cat(name, width=None, kind=np.float64):
        parts = [getattr(p, name) for p in prepared]
        empty = np.zeros((0,) if width is None else (0, width), kind)
        return np.concatenate(parts).astype(kind) if parts else empty

    positions = np.zeros((n_node, 3), dtype)
    positions[:total] = cat("positions", 3)
    species = np.zeros(n_node, np.int32)
    species[:total] = cat("species", kind=np.int32)
    atomic_numbers = np.zeros(n_node, np.int32)
    atomic_numbers[:total] = cat("atomic_numbers", kind=np.int32)
    node_mask = np.arange(n_node) < total
    graph_index = np.full(n_node, n_graph - 1, np.int32)
    graph_index[:total] = np.repeat(np.arange(n_struct, dtype=np.int32), atom_counts)

    edge_offsets = np.repeat(offsets, edge_counts)
    senders = np.full(n_edge, total, np.int32)  # padding: self-loops on the first padding atom
    receivers = np.full(n_edge, total, np.int32)
    senders[:total_edges] = cat("senders", kind=np.int64) + edge_offsets
    receivers[:total_edges] = cat("receivers", kind=np.int64) + edge_offsets
    shifts = np.zeros((n_edge, 3), dtype)
    shifts[:total_edges] = cat("shifts", 3)
    edge_mask = np.arange(n_edge) < total_edges

    cell = np.zeros((n_graph, 3, 3), np.float64)
    periodic = np.zeros(n_graph, bool)
    for g, p in enumerate(prepared):
        cell[g] = p.cell
        periodic[g] = p.periodic
    graph_mask = np.arange(n_graph) < n_struct
    n_atoms = np.zeros(n_graph, np.int32)
    n_atoms[:n_struct] = atom_counts

    graph_atoms = -np.ones((n_graph, max_atoms), np.int32)
    rows = graph_index[:total]
    cols = np.arange(total) - np.repeat(offsets, atom_counts)
    graph_atoms[rows, cols] = np.arange(total, dtype=np.int32)

    kweights = batch_kgrid_weights(cell, periodic, dl, bucket=1, min_bounds=kbounds)
    if grid_bounds_of(kweights.shape) != tuple(kbounds):  # cannot happen after check_shape
        raise RuntimeError(f"k-grid bounds {grid_bounds_of(kweights.shape)} != requested {tuple(kbounds)}")

    return Graph(positions=positions, species=species, atomic_numbers=atomic_numbers, node_mask=node_mask,
                 graph_index=graph_index, senders=senders, receivers=receivers, shifts=shifts, edge_mask=edge_mask,
                 cell=cell.astype(dtype), periodic=periodic, graph_mask=graph_mask, n_atoms=n_atoms,
                 kweights=kweights.astype(dtype), graph_atoms=graph_atoms)


def batch_structures(
    structures: Sequence,
    species_table: SpeciesTable,
    cutoff: float,
    dl: float = DEFAULT_DL,
    n_node: Optional[int] = None,
    n_edge: Optional[int] = None,
    n_graph: Optional[int] = None,
    *,
    max_atoms: Optional[int] = None,
    kgrid_bounds: Optional[Sequence[int]] = None,
    kbucket: int = 1,
    buckets: Optional[SizeBuckets] = None,
    dtype=np.float64,
    n_threads: int = 1,
) -> Graph:
    """One padded :class:`Graph` from a list of structures.

    Args:
      structures: S structures: :class:`Structure`, ``ase.Atoms``, training frames, or
        :class:`PreparedStructure` (used as is; must match ``cutoff`` and ``dl``).
      species_table: ``{Z: species index}`` or an array indexed by Z (see ``species_lookup``).
      cutoff: neighbor cutoff (Å). dl: k-space resolution (Å).
      n_node, n_edge, n_graph, max_atoms: padded sizes N, E, G, A. Each left None is the
        bucketed size from ``buckets`` (or the minimal size when ``buckets`` is None:
        N = atoms + 1, E = edges, G = S + 1, A = largest structure).
        Requires N >= atoms + 1 and G >= S + 1 (the last graph is always padding).
      kgrid_bounds: the common k-grid bounds (M1, M2, M3); None: the largest own bounds
        rounded up to a multiple of ``kbucket`` (or of ``buckets.kgrid_step``).
      dtype: float32 or float64 for positions, shifts, cell and k-weights.
      n_threads: vesin threads per neighbor list.

    Returns:
      A Graph of numpy arrays (see ``polarjax/data/graph.py`` for the padding contract).

    Raises:
      ValueError: unknown elements (naming the element and the structure index), a
        shape too small for the batch, mixed periodicity, or bad structure data.
    """
    lookup = species_lookup(species_table)
    prepared = []
    for index, item in enumerate(structures):
        if isinstance(item, PreparedStructure):
            if not math.isclose(item.cutoff, float(cutoff)):
                raise ValueError(f"structure {index} was prepared with cutoff {item.cutoff}, not {cutoff}")
            prepared.append(item)
        else:
            prepared.append(prepare_structure(item, lookup, cutoff, dl, index=index, n_threads=n_threads))
    auto = choose_padding(prepared, buckets)
    if kgrid_bounds is None and buckets is None:
        auto = auto._replace(kgrid_bounds=round_up_bounds(auto.kgrid_bounds, kbucket))
    shape = PaddedShape(
        auto.n_node if n_node is None else int(n_node),
        auto.n_edge if n_edge is None else int(n_edge),
        auto.n_graph if n_graph is None else int(n_graph),
        auto.max_atoms if max_atoms is None else int(max_atoms),
        auto.kgrid_bounds if kgrid_bounds is None else tuple(int(b) for b in kgrid_bounds),
    )
    return collate(prepared, shape, dl, dtype)


# --------------------------------------------------------------------------- batcher


class GraphBatcher:
    """Groups structures into padded batches of at most ``batch_size``, with bucketed shapes.

    Neighbor lists, species and k-grid bounds are computed once per structure (at
    construction, so bad data fails early with the structure index) and cached.

    Args:
      structures: the dataset (anything :func:`batch_structures` accepts).
      species_table, cutoff, dl: as in :func:`batch_structures`.
      batch_size: at most this many structures per batch; G = batch_size + 1 always.
      buckets: size rounding; None means ``SizeBuckets()``.
      shuffle, seed: shuffle the order each epoch with ``default_rng(seed + epoch)``.
      drop_last: drop the final incomplete batch of an epoch.
      reuse_factor: give a batch the cheapest already-produced shape that holds it when that
        costs at most ``reuse_factor`` times its own bucketed shape (by :func:`shape_cost`),
        instead of making a new shape; keeps the number of compilations small when several
        sizes vary independently. None: never reuse (each batch gets its bucketed shape).
      single_shape: pad every batch to one shape that fits any ``batch_size`` structures
        of the dataset (exactly one compilation, at the cost of more padding).
      dtype: float32 or float64.

    Attributes:
      shapes_seen: set of :class:`PaddedShape` of the Graphs produced so far.
    """

    def __init__(self, structures: Sequence, species_table: SpeciesTable, cutoff: float, batch_size: int,
                 dl: float = DEFAULT_DL, buckets: Optional[SizeBuckets] = None, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, reuse_factor: Optional[float] = 2.0, single_shape: bool = False, dtype=np.float64,
                 n_threads: int = 1):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(structures) == 0:
            raise ValueError("GraphBatcher needs at least one structure")
        self.batch_size = int(batch_size)
        self.cutoff, self.dl = float(cutoff), float(dl)
        self.buckets = SizeBuckets() if buckets is None else buckets
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        if reuse_factor is not None and not reuse_factor >= 1.0:
            raise ValueError(f"reuse_factor must be >= 1 or None, got {reuse_factor}")
        self.reuse_factor = reuse_factor
        self.dtype = np.dtype(dtype)
        lookup = species_lookup(species_table)
        self._prepared = [p if isinstance(p, PreparedStructure) else
                          prepare_structure(p, lookup, cutoff, dl, index=i, n_threads=n_threads)
                          for i, p in enumerate(structures)]
        self.shapes_seen: set[PaddedShape] = set()
        self._epoch = 0
        self._fixed_shape = self._covering_shape() if single_shape else None

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self._prepared)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_structures(self) -> int:
        return len(self._prepared)

    @property
    def num_shapes(self) -> int:
        """Distinct padded shapes produced so far (= jit compilations of a shape-polymorphic caller)."""
        return len(self.shapes_seen)

    def prepared(self, index: int) -> PreparedStructure:
        """The cached prepared structure ``index``."""
        return self._prepared[index]

    def _covering_shape(self) -> PaddedShape:
        atoms = np.sort([p.num_atoms for p in self._prepared])[::-1][: self.batch_size]
        edges = np.sort([p.num_edges for p in self._prepared])[::-1][: self.batch_size]
        return self.buckets.shape(int(atoms.sum()), int(edges.sum()), int(atoms[0]), self.batch_size,
                                  _common_kbounds(self._prepared), self.batch_size + 1)

    def batch_indices(self, epoch: int = 0) -> list[np.ndarray]:
        """The structure indices of each batch of ``epoch`` (reproducible from the seed)."""
        n = len(self._prepared)
        order = np.random.default_rng(self.seed + int(epoch)).permutation(n) if self.shuffle else np.arange(n)
        return [order[i:i + self.batch_size] for i in range(0, len(self) * self.batch_size, self.batch_size)]

    def shape_for(self, indices: Sequence[int]) -> PaddedShape:
        """The padded shape the batch of ``indices`` gets."""
        if self._fixed_shape is not None:
            return self._fixed_shape
        prepared = [self._prepared[i] for i in indices]
        own = choose_padding(prepared, self.buckets, self.batch_size + 1)
        if self.reuse_factor is not None and own not in self.shapes_seen:
            need = minimal_shape(prepared, self.batch_size + 1)
            limit = self.reuse_factor * shape_cost(own)
            candidates = [shape for shape in self.shapes_seen if fits(shape, need) and shape_cost(shape) <= limit]
            if candidates:
                return min(candidates, key=lambda shape: (shape_cost(shape), shape))
        return own

    def build(self, indices: Sequence[int]) -> Graph:
        """The padded Graph of the structures ``indices`` (at most ``batch_size`` of them)."""
        indices = [int(i) for i in indices]
        if len(indices) > self.batch_size:
            raise ValueError(f"{len(indices)} structures exceed batch_size={self.batch_size}")
        shape = self.shape_for(indices)
        graph = collate([self._prepared[i] for i in indices], shape, self.dl, self.dtype)
        self.shapes_seen.add(shape)
        return graph

    def epoch(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, Graph]]:
        """Yield ``(indices, graph)`` for every batch of ``epoch``."""
        for indices in self.batch_indices(epoch):
            yield indices, self.build(indices)

    def __iter__(self) -> Iterator[Graph]:
        """Graphs of the next epoch (the epoch counter advances on each call)."""
        epoch, self._epoch = self._epoch, self._epoch + 1
        for _, graph in self.epoch(epoch):
            yield graph
