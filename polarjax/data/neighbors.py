"""Host-side neighbor lists (numpy, built with the ``vesin`` library).

Convention (the one :func:`polarjax.data.graph.edge_vectors` uses): for edge ``e``

    vector[e] = positions[receivers[e]] − positions[senders[e]] + shifts[e] @ cell

with integer image ``shifts`` and cell vectors as the ROWS of ``cell``. The list is full
(each pair appears in both directions), includes an atom's own periodic images when the
cutoff reaches them, and excludes only the ``i == j``, zero-shift self pair. Pairs are
sorted by (sender, receiver, shift) so the order is reproducible.

Boundaries: a structure is open when ``pbc`` is all False or the cell is all zeros (then
every shift is zero and the cell is ignored). Mixed ``pbc`` (e.g. a slab periodic in x, y)
is supported here: no images are taken along non-periodic axes, and the cell rows of those
axes may be anything, even zero.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import vesin

PbcLike = Union[bool, Sequence[bool], np.ndarray]

#: |det(cell)| / Π|a_i| below this is treated as a singular (degenerate) cell.
SINGULAR_TOLERANCE = 1e-8


def normalize_pbc(pbc: PbcLike) -> np.ndarray:
    """``pbc`` as a [3] bool array (a single bool applies to all three axes)."""
    array = np.asarray(pbc)
    if array.ndim == 0:
        array = np.repeat(array, 3)
    if array.shape != (3,):
        raise ValueError(f"pbc must be a bool or 3 bools, got shape {np.shape(pbc)}")
    if array.dtype != bool:
        if not np.all(np.isin(array, (0, 1))):
            raise ValueError(f"pbc must contain booleans, got {pbc!r}")
        array = array.astype(bool)
    return array


def check_cell(cell, name: str = "cell") -> np.ndarray:
    """``cell`` as a finite [3, 3] float64 array (rows are the cell vectors)."""
    try:
        array = np.asarray(cell, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is not numeric: {cell!r}") from None
    if array.shape != (3, 3):
        raise ValueError(f"{name} must have shape [3, 3], got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    return array


def check_positions(positions, name: str = "positions") -> np.ndarray:
    """``positions`` as a finite [N, 3] float64 array."""
    try:
        array = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is not numeric") from None
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3], got {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.all(np.isfinite(array), axis=1))
        raise ValueError(f"{name} contain NaN or inf (atoms {bad[:10].tolist()})")
    return array


def effective_pbc(cell: np.ndarray, pbc: PbcLike) -> np.ndarray:
    """[3] bool: the axes along which images are taken (none when the cell is all zeros)."""
    flags = normalize_pbc(pbc)
    if not np.any(np.asarray(cell)):
        return np.zeros(3, dtype=bool)
    return flags


def _independent(rows: np.ndarray) -> bool:
    """True when the [k, 3] ``rows`` are linearly independent (relative tolerance)."""
    lengths = np.linalg.norm(rows, axis=1)
    if np.any(lengths == 0.0):
        return False
    unit = rows / lengths[:, None]
    # Gram determinant = squared volume of the unit parallelepiped.
    return float(np.linalg.det(unit @ unit.T)) > SINGULAR_TOLERANCE**2


def _box_for_vesin(cell: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """A non-singular [3, 3] box whose periodic rows are those of ``cell``.

    Rows of non-periodic axes never enter a shift, so where they make the cell singular
    (e.g. a zero vacuum vector) they are replaced by unit vectors orthogonal to the rest.
    """
    if _independent(cell):
        return cell
    box = cell.copy()
    periodic_rows = cell[flags]
    # Orthonormal basis of the complement of the periodic rows' span.
    _, _, vt = np.linalg.svd(periodic_rows) if len(periodic_rows) else (None, None, np.eye(3))
    complement = vt[len(periodic_rows):]
    for axis, row in zip(np.flatnonzero(~flags), complement):
        box[axis] = row
    return box


def neighbor_list(
    positions,
    cell,
    pbc: PbcLike,
    cutoff: float,
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full neighbor list within ``cutoff`` (all periodic images).

    Args:
      positions: [N, 3] Cartesian positions (Å); atoms may lie outside the cell.
      cell: [3, 3] cell, vectors as rows (Å); all zeros for an open structure.
      pbc: a bool or [3] bools, periodicity along each cell vector.
      cutoff: interaction cutoff (Å), > 0. Pairs with distance strictly below it are kept.
      n_threads: CPU threads for vesin (0: all available).

    Returns:
      senders [E] int32, receivers [E] int32, shifts [E, 3] int32 such that
      ``positions[receivers] − positions[senders] + shifts @ cell`` are the pair vectors.

    Raises:
      ValueError: bad shapes, non-finite positions or cell, ``cutoff <= 0`` or not finite,
        or periodic axes whose cell vectors are zero or linearly dependent.
    """
    positions = check_positions(positions)
    cell = check_cell(cell)
    try:
        cutoff = float(cutoff)
    except (TypeError, ValueError):
        raise ValueError(f"cutoff must be a number, got {cutoff!r}") from None
    if not (np.isfinite(cutoff) and cutoff > 0.0):
        raise ValueError(f"cutoff must be a positive finite length in Å, got {cutoff!r}")
    flags = effective_pbc(cell, pbc)

    if not np.any(flags):
        box = np.zeros((3, 3))
    else:
        if not _independent(cell[flags]):
            raise ValueError(
                f"cell is singular along the periodic axes {np.flatnonzero(flags).tolist()} "
                f"(pbc={flags.tolist()}, cell={cell.tolist()}); a periodic structure needs "
                "linearly independent, non-zero cell vectors")
        box = _box_for_vesin(cell, flags)

    empty = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, 3), np.int32))
    if len(positions) == 0:
        return empty
    try:
        calculator = vesin.NeighborList(cutoff=cutoff, full_list=True, n_threads=n_threads)
    except TypeError:  # vesin without the n_threads option
        calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)
    senders, receivers, shifts = calculator.compute(positions, box, flags.tolist(), quantities="ijS")
    senders = np.asarray(senders, dtype=np.int32)
    receivers = np.asarray(receivers, dtype=np.int32)
    shifts = np.asarray(shifts, dtype=np.int32).reshape(-1, 3)
    # The self pair (i, i, 0) is never an edge (vesin omits it; be explicit).
    keep = ~((senders == receivers) & np.all(shifts == 0, axis=1))
    senders, receivers, shifts = senders[keep], receivers[keep], shifts[keep]
    if np.any(shifts[:, ~flags]):
        raise RuntimeError("vesin returned an image shift along a non-periodic axis")
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], receivers, senders))
    return senders[order], receivers[order], shifts[order]


def edge_vectors_numpy(positions, cell, senders, receivers, shifts) -> np.ndarray:
    """[E, 3] float64 pair vectors ``positions[receivers] − positions[senders] + shifts @ cell``."""
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    return positions[receivers] - positions[senders] + np.asarray(shifts, dtype=np.float64) @ cell
