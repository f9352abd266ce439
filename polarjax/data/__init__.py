"""Data: the padded Graph batch, neighbor lists, readers and bucketing."""

from polarjax.data.graph import Graph, edge_vectors

__all__ = ["Graph", "edge_vectors"]
