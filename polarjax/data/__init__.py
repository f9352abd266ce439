"""Data: the padded Graph batch, neighbor lists, structures, batching and bucketing."""

from polarjax.data.graph import Graph, edge_vectors, graph_atom_table
from polarjax.data.neighbors import neighbor_list
from polarjax.data.structures import (PreparedStructure, Structure, as_structure, prepare_structure,
                                      species_lookup, species_table_from_elements, structure_from_atoms)
from polarjax.data.batching import (GraphBatcher, PaddedShape, SizeBuckets, batch_structures, choose_padding,
                                    collate, graph_shape, round_size)

__all__ = [
    "Graph", "edge_vectors", "graph_atom_table",
    "neighbor_list",
    "Structure", "PreparedStructure", "structure_from_atoms", "as_structure", "prepare_structure",
    "species_lookup", "species_table_from_elements",
    "GraphBatcher", "PaddedShape", "SizeBuckets", "batch_structures", "choose_padding", "collate",
    "graph_shape", "round_size",
]
