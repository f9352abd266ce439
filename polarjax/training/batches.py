"""Labelled frames → padded Graph batches and label arrays for training and evaluation.

The graph side (neighbor lists, padding, size buckets) is :mod:`polarjax.data`; this module
adds the labels, removes the per-element reference energies in float64, and stacks equal
shards for data-parallel steps. Each distinct padded shape costs one jit compilation;
``num_shapes`` counts them (logged as ``compiles``). Neighbor lists are computed once per
frame and cached.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from polarjax.data.batching import PaddedShape, SizeBuckets, choose_padding, collate
from polarjax.data.structures import prepare_structure, species_table_from_elements
from polarjax.training.dataset import Frame


class BatchBuilder:
    """Builds padded Graph batches and their labels from frames (cached, bucketed)."""

    def __init__(self, spec, cutoff: float, dtype=np.float32, buckets: SizeBuckets | None = None):
        self.spec = spec
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self.buckets = buckets or SizeBuckets()
        self.species_table = species_table_from_elements(spec.species)
        self._e0 = None if spec.atomic_energies is None else np.asarray(spec.atomic_energies, dtype=np.float64)
        self._prepared: dict[int, object] = {}
        self.shapes: set = set()

    @property
    def num_shapes(self) -> int:
        return len(self.shapes)

    def prepared(self, frame: Frame):
        """Species, neighbor list and k-bounds of ``frame`` (computed once)."""
        # Keyed by id(); the cache keeps the frame alive so that its id cannot be reused by
        # another (temporary) frame, which would silently get this frame's graph.
        key = id(frame)
        cached = self._prepared.get(key)
        if cached is None or cached[0] is not frame:
            try:
                cached = (frame, prepare_structure(frame, self.species_table, self.cutoff, self.spec.dl))
            except ValueError as error:
                raise ValueError(f"{frame.source}: {error}") from None
            self._prepared[key] = cached
        return cached[1]

    def reference_energy(self, frame: Frame) -> float:
        """Σ E0 of the frame's atoms in float64 (0 when the model has no E0)."""
        if self._e0 is None:
            return 0.0
        return float(np.sum(self._e0[self.prepared(frame).species]))

    def padding_for(self, frames: Sequence[Frame]) -> PaddedShape:
        return choose_padding([self.prepared(f) for f in frames], self.buckets, n_graph=len(frames) + 1)

    def build(self, frames: Sequence[Frame], padding: PaddedShape | None = None):
        """One padded Graph and its labels for ``frames`` (atoms packed in frame order).

        Labels: energy [G] = E − Σ E0 (reference energies removed in float64, matching
        model predictions made with ``include_e0=False``), forces [N, 3], stress [G, 3, 3],
        has_stress [G].
        """
        prepared = [self.prepared(f) for f in frames]
        shape = choose_padding(prepared, self.buckets, n_graph=len(frames) + 1) if padding is None else padding
        self.shapes.add(tuple(shape))
        graph = collate(prepared, shape, self.spec.dl, dtype=self.dtype)
        n_node, n_graph = graph.positions.shape[0], graph.cell.shape[0]
        labels = {"energy": np.zeros(n_graph, self.dtype), "forces": np.zeros((n_node, 3), self.dtype),
                  "stress": np.zeros((n_graph, 3, 3), self.dtype), "has_stress": np.zeros(n_graph, bool)}
        atom = 0
        for g, frame in enumerate(frames):
            n = frame.num_atoms
            labels["energy"][g] = frame.labels.get("energy", 0.0) - self.reference_energy(frame)
            if "forces" in frame.labels:
                labels["forces"][atom:atom + n] = frame.labels["forces"]
            if "stress" in frame.labels and frame.periodic:
                labels["stress"][g] = frame.labels["stress"]
                labels["has_stress"][g] = True
            atom += n
        return graph, labels

    def build_sharded(self, frames: Sequence[Frame], num_shards: int):
        """Split ``frames`` into ``num_shards`` equal groups padded alike; stack on a leading axis."""
        if len(frames) % num_shards:
            raise ValueError(f"{len(frames)} frames cannot be split into {num_shards} equal shards")
        per = len(frames) // num_shards
        groups = [frames[k * per:(k + 1) * per] for k in range(num_shards)]
        shapes = [self.padding_for(group) for group in groups]
        common = PaddedShape(*(max(s[i] for s in shapes) for i in range(4)),
                             tuple(max(s.kgrid_bounds[d] for s in shapes) for d in range(3)))
        built = [self.build(group, common) for group in groups]
        stack = lambda *xs: np.stack(xs)
        graphs = jax.tree_util.tree_map(stack, *[b[0] for b in built])
        labels = jax.tree_util.tree_map(stack, *[b[1] for b in built])
        return graphs, labels
