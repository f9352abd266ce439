"""Data: the padded Graph batch, neighbor lists, readers and bucketing."""

from polarjax.data.graph import Graph, edge_vectors, graph_atom_table

__all__ = ["Graph", "edge_vectors", "graph_atom_table"]
