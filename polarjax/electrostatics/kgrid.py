"""The reciprocal-space k-vector set, stored as a weighted half-space integer grid.

The latent-Ewald k-set of a periodic cell (rows ``a_i``) is

    k = n @ G,   G = 2π (cell⁻¹)ᵀ,   n ∈ ℤ³,   |n_i| <= M_i = max(1, floor(|a_i| / dl)),
    0 < |k|² <= (2π / dl)².

Because the set is symmetric under n → −n and the sources are real (S(−k) = S(k)*),
we keep only the half space n_1 >= 0 and give every n with n_1 > 0 the weight 2 and
every n in the plane n_1 = 0 (where both n and −n are present) the weight 1.

Storage: a dense grid of weights with shape ``[M1 + 1, 2 M2 + 1, 2 M3 + 1]``; entry
``[a, b, c]`` belongs to ``n = (a, b − M2, c − M3)``. The grid shape is the only static
(compile-time) information; the weights are data. Padding a grid to larger bounds
(for batching several cells, or to bucket shapes so jit compiles a handful of times)
adds zero weights and changes nothing.

The selection is done on the host in float64 exactly as written above, because for
cells whose lengths are multiples of ``dl`` many k-vectors lie exactly on the cutoff.
``kgrid_weights_jax`` re-derives the same set inside jit from a traced cell (for
variable-cell MD), at the precision of the traced cell.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import jax.numpy as jnp

from polarjax.units import DEFAULT_DL


def _check_dl(dl: float) -> None:
    if not (np.isfinite(dl) and dl > 0):
        raise ValueError(f"dl must be a positive finite length in Å, got {dl!r}")


def cell_is_open(cell: np.ndarray) -> bool:
    """True when ``cell`` [3, 3] is all zeros (the open-boundary convention)."""
    return not np.any(np.asarray(cell))


def kgrid_bounds(cell: np.ndarray, dl: float = DEFAULT_DL) -> tuple[int, int, int]:
    """Integer bounds ``(M1, M2, M3)``, ``M_i = max(1, floor(|a_i| / dl))``.

    Args:
      cell: [3, 3] cell, vectors as rows (Å).
      dl: k-space resolution (Å).
    """
    _check_dl(dl)
    lengths = np.linalg.norm(np.asarray(cell, dtype=np.float64), axis=1)
    return tuple(int(max(1, math.floor(length / dl))) for length in lengths)


def _integer_grid(bounds: Sequence[int]) -> np.ndarray:
    """All ``n`` of the half-space grid, shape ``[M1 + 1, 2 M2 + 1, 2 M3 + 1, 3]``."""
    m1, m2, m3 = bounds
    n1 = np.arange(0, m1 + 1)
    n2 = np.arange(-m2, m2 + 1)
    n3 = np.arange(-m3, m3 + 1)
    return np.stack(np.meshgrid(n1, n2, n3, indexing="ij"), axis=-1)


def kgrid_weights(
    cell: np.ndarray,
    dl: float = DEFAULT_DL,
    bounds: Sequence[int] | None = None,
) -> np.ndarray:
    """Half-space weights (0, 1 or 2) of the k-set of one periodic cell, in float64 on the host.

    Args:
      cell: [3, 3] non-singular cell, vectors as rows (Å).
      dl: k-space resolution (Å).
      bounds: grid bounds to pad to; each must be >= the cell's own bounds.

    Returns:
      [M1 + 1, 2 M2 + 1, 2 M3 + 1] float64 weights.
    """
    cell = np.asarray(cell, dtype=np.float64)
    own = kgrid_bounds(cell, dl)
    if bounds is None:
        bounds = own
    bounds = tuple(int(b) for b in bounds)
    if any(b < o for b, o in zip(bounds, own)):
        raise ValueError(f"k-grid bounds {bounds} are smaller than the cell's own bounds {own}")
    recip = 2.0 * np.pi * np.linalg.inv(cell).T
    n = _integer_grid(bounds)
    k = n.astype(np.float64) @ recip
    k2 = np.sum(k * k, axis=-1)
    kcut2 = (2.0 * np.pi / dl) ** 2
    inside_box = np.all(np.abs(n) <= np.asarray(own), axis=-1)
    selected = inside_box & (k2 > 0.0) & (k2 <= kcut2)
    weights = np.where(n[..., 0] > 0, 2.0, 1.0)
    return np.where(selected, weights, 0.0)


def count_kvectors(weights: np.ndarray) -> int:
    """Number of k-vectors (full space, both k and −k) represented by ``weights``."""
    return int(round(float(np.sum(weights))))


def round_up_bounds(bounds: Sequence[int], multiple: int) -> tuple[int, int, int]:
    """Round each bound up to a multiple of ``multiple`` (size bucketing of k-grids)."""
    if multiple <= 1:
        return tuple(int(b) for b in bounds)
    return tuple(int(multiple * math.ceil(b / multiple)) for b in bounds)


def batch_kgrid_weights(
    cells: np.ndarray,
    periodic: Sequence[bool],
    dl: float = DEFAULT_DL,
    bucket: int = 1,
    min_bounds: Sequence[int] = (1, 1, 1),
) -> np.ndarray:
    """Weights for a batch of structures on one common (padded) grid.

    Open structures (``periodic`` False or an all-zero cell) get all-zero weights.

    Args:
      cells: [G, 3, 3] cells, rows are vectors.
      periodic: [G] flags.
      dl: k-space resolution (Å).
      bucket: round the common bounds up to a multiple of this (limits recompiles).
      min_bounds: smallest bounds of the common grid.

    Returns:
      [G, M1 + 1, 2 M2 + 1, 2 M3 + 1] float64 weights.
    """
    cells = np.asarray(cells, dtype=np.float64)
    flags = [bool(p) and not cell_is_open(c) for p, c in zip(periodic, cells)]
    bounds = np.asarray(min_bounds, dtype=int)
    for cell, flag in zip(cells, flags):
        if flag:
            bounds = np.maximum(bounds, kgrid_bounds(cell, dl))
    bounds = round_up_bounds(bounds, bucket)
    shape = (bounds[0] + 1, 2 * bounds[1] + 1, 2 * bounds[2] + 1)
    out = np.zeros((len(cells),) + shape)
    for g, (cell, flag) in enumerate(zip(cells, flags)):
        if flag:
            out[g] = kgrid_weights(cell, dl, bounds)
    return out


def grid_bounds_of(weights_shape: Sequence[int]) -> tuple[int, int, int]:
    """Invert the grid shape ``[M1 + 1, 2 M2 + 1, 2 M3 + 1]`` (trailing three axes) to bounds."""
    a, b, c = weights_shape[-3:]
    if b % 2 != 1 or c % 2 != 1:
        raise ValueError(f"not a half-space k-grid shape: {tuple(weights_shape)}")
    return (a - 1, (b - 1) // 2, (c - 1) // 2)


def kgrid_weights_jax(cell: jnp.ndarray, bounds: Sequence[int], dl: float = DEFAULT_DL) -> jnp.ndarray:
    """Traced equivalent of :func:`kgrid_weights` for a fixed (static) grid ``bounds``.

    The per-direction limits ``M_i(cell)`` and the spherical cutoff are evaluated from the
    traced cell, so a changing box (NPT) selects its own k-set without recompiling as long
    as it fits in ``bounds``. Weights are piecewise constant in the cell (zero gradient).

    Args:
      cell: [3, 3] traced cell.
      bounds: static grid bounds (M1, M2, M3).

    Returns:
      [M1 + 1, 2 M2 + 1, 2 M3 + 1] weights in the dtype of ``cell``.
    """
    n = jnp.asarray(_integer_grid(bounds), dtype=cell.dtype)
    recip = 2.0 * jnp.pi * jnp.linalg.inv(cell).T
    k = n @ recip
    k2 = jnp.sum(k * k, axis=-1)
    own = jnp.maximum(1.0, jnp.floor(jnp.linalg.norm(cell, axis=1) / dl))
    inside_box = jnp.all(jnp.abs(n) <= own, axis=-1)
    selected = inside_box & (k2 > 0.0) & (k2 <= (2.0 * jnp.pi / dl) ** 2)
    weights = jnp.where(n[..., 0] > 0, 2.0, 1.0).astype(cell.dtype)
    return jnp.where(selected, weights, 0.0)
