"""A light host-side record of one atomic structure, and its batching-ready form.

``Structure`` holds numpy arrays only (no JAX). ``prepare_structure`` turns it into a
``PreparedStructure``: species indices, the neighbor list and the k-grid bounds, i.e.
everything :func:`polarjax.data.batching.batch_structures` concatenates and pads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from polarjax.data.neighbors import check_cell, check_positions, effective_pbc, neighbor_list, normalize_pbc
from polarjax.electrostatics.kgrid import kgrid_bounds
from polarjax.units import DEFAULT_DL

#: Largest atomic number accepted.
MAX_ATOMIC_NUMBER = 118


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


@dataclasses.dataclass(frozen=True, eq=False)
class Structure:
    """One structure on the host.

    Attributes:
      positions: [N, 3] float64 Cartesian positions (Å), N >= 1.
      atomic_numbers: [N] int32, 1..118.
      cell: [3, 3] float64, vectors as rows (Å); all zeros (or any value with pbc False) if open.
      pbc: [3] bool periodicity along each cell vector.
      labels: optional per-structure labels (energy, forces, ...), stored as given.
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((3, 3)))
    pbc: Any = False
    labels: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        positions = check_positions(self.positions)
        if len(positions) == 0:
            raise ValueError("a structure needs at least one atom")
        numbers = np.asarray(self.atomic_numbers)
        if numbers.shape != (len(positions),):
            raise ValueError(f"atomic_numbers must have shape [{len(positions)}], got {numbers.shape}")
        if numbers.dtype.kind not in "iu":
            if numbers.dtype.kind != "f" or not np.all(numbers == np.round(numbers)):
                raise ValueError(f"atomic_numbers must be integers, got dtype {numbers.dtype}")
        numbers = numbers.astype(np.int32)
        if np.any((numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)):
            bad = numbers[(numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)]
            raise ValueError(f"atomic numbers must lie in 1..{MAX_ATOMIC_NUMBER}, got {sorted(set(bad.tolist()))}")
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "atomic_numbers", numbers)
        object.__setattr__(self, "cell", check_cell(self.cell))
        object.__setattr__(self, "pbc", normalize_pbc(self.pbc))
        object.__setattr__(self, "labels", dict(self.labels or {}))

    @property
    def num_atoms(self) -> int:
        return len(self.atomic_numbers)

    @property
    def effective_pbc(self) -> np.ndarray:
        """[3] bool: periodic axes actually used (none when the cell is all zeros)."""
        return effective_pbc(self.cell, self.pbc)

    @property
    def is_open(self) -> bool:
        """No periodic axis (pbc all False or an all-zero cell)."""
        return not np.any(self.effective_pbc)

    @property
    def is_periodic(self) -> bool:
        """Periodic along all three axes with a non-zero cell."""
        return bool(np.all(self.effective_pbc))

    @property
    def is_mixed(self) -> bool:
        """Periodic along some axes only (e.g. a slab)."""
        return not self.is_open and not self.is_periodic


def structure_from_atoms(atoms, labels: Optional[Mapping[str, Any]] = None) -> Structure:
    """A :class:`Structure` from an ``ase.Atoms``.

    Args:
      atoms: the ASE structure (positions Å, cell rows, pbc).
      labels: labels to attach. When None, the results already stored on an attached
        calculator (``atoms.calc.results``; nothing is computed) are copied.
    """
    if labels is None:
        results = getattr(getattr(atoms, "calc", None), "results", None) or {}
        labels = {key: np.array(value) for key, value in results.items()}
    return Structure(
        positions=np.array(atoms.get_positions(), dtype=np.float64),
        atomic_numbers=np.array(atoms.get_atomic_numbers()),
        cell=np.array(atoms.get_cell()[:], dtype=np.float64),
        pbc=np.array(atoms.get_pbc(), dtype=bool),
        labels=labels,
    )


def as_structure(item) -> Structure:
    """Coerce a :class:`Structure`, an ``ase.Atoms`` or any record with ``positions``,
    ``numbers``/``atomic_numbers``, ``cell`` and ``pbc`` attributes (e.g. a training Frame)."""
    if isinstance(item, Structure):
        return item
    if hasattr(item, "get_positions") and hasattr(item, "get_atomic_numbers"):
        return structure_from_atoms(item)
    numbers = getattr(item, "atomic_numbers", None)
    if numbers is None:
        numbers = getattr(item, "numbers", None)
    if numbers is None or not hasattr(item, "positions"):
        raise TypeError(f"cannot make a Structure from {type(item).__name__}")
    return Structure(positions=item.positions, atomic_numbers=numbers,
                     cell=getattr(item, "cell", np.zeros((3, 3))), pbc=getattr(item, "pbc", False),
                     labels=getattr(item, "labels", None) or {})


# --------------------------------------------------------------------------- species


SpeciesTable = Union[Mapping[int, int], Sequence[int], np.ndarray]


def species_lookup(species_table: SpeciesTable) -> np.ndarray:
    """A [119] int32 lookup array, ``lookup[Z]`` = species index or −1 if unknown.

    Args:
      species_table: a dict ``{atomic number: species index}``, or an array/sequence
        indexed by atomic number whose entries are species indices (< 0 for unknown).
        For a model's ordered element list use :func:`species_table_from_elements`.
    """
    lookup = -np.ones(MAX_ATOMIC_NUMBER + 1, dtype=np.int32)
    if isinstance(species_table, Mapping):
        for z, index in species_table.items():
            z, index = int(z), int(index)
            if not 1 <= z <= MAX_ATOMIC_NUMBER:
                raise ValueError(f"species table key {z} is not an atomic number")
            if index < 0:
                raise ValueError(f"species table maps Z={z} to a negative index {index}")
            lookup[z] = index
        return lookup
    array = np.asarray(species_table)
    if array.ndim != 1 or array.dtype.kind not in "iu" or len(array) > MAX_ATOMIC_NUMBER + 1:
        raise ValueError("an array species table must be a 1-D integer array indexed by atomic number "
                         f"(length <= {MAX_ATOMIC_NUMBER + 1}), got shape {array.shape} dtype {array.dtype}")
    lookup[: len(array)] = np.where(array >= 0, array, -1)
    lookup[0] = -1
    return lookup


def species_table_from_elements(elements: Sequence[int]) -> dict[int, int]:
    """``{Z: i}`` for an ordered element list (e.g. ``ModelSpec.species``)."""
    elements = [int(z) for z in elements]
    if len(set(elements)) != len(elements):
        raise ValueError(f"duplicate elements in {elements}")
    return {z: i for i, z in enumerate(elements)}


def species_indices(atomic_numbers: np.ndarray, lookup: np.ndarray, index: Optional[int] = None) -> np.ndarray:
    """[N] int32 species indices; ValueError naming the element(s) and the structure if unknown."""
    species = lookup[atomic_numbers]
    if np.any(species < 0):
        unknown = sorted(set(atomic_numbers[species < 0].tolist()))
        where = "" if index is None else f"structure {index}: "
        known = [_symbol(z) for z in np.flatnonzero(lookup >= 0)]
        raise ValueError(f"{where}element(s) {[_symbol(z) for z in unknown]} (Z={unknown}) "
                         f"not in the species table {known}")
    return species.astype(np.int32)


# --------------------------------------------------------------------------- prepared


class PreparedStructure(NamedTuple):
    """A structure with everything batching needs (host numpy, local atom indices).

    positions [n, 3] float64; atomic_numbers, species [n] int32; cell [3, 3] float64
    (zeros when open); periodic bool; senders, receivers [e] int32; shifts [e, 3] int32;
    kbounds (M1, M2, M3) of its own k-grid (None when open); index: position in the dataset;
    cutoff, dl: the neighbor cutoff and k-space resolution it was prepared with (Å).
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    species: np.ndarray
    cell: np.ndarray
    periodic: bool
    senders: np.ndarray
    receivers: np.ndarray
    shifts: np.ndarray
    kbounds: Optional[tuple[int, int, int]]
    index: Optional[int]
    cutoff: float
    dl: float

    @property
    def num_atoms(self) -> int:
        return len(self.species)

    @property
    def num_edges(self) -> int:
        return len(self.senders)


def prepare_structure(
    structure,
    species_table: SpeciesTable,
    cutoff: float,
    dl: float = DEFAULT_DL,
    index: Optional[int] = None,
    n_threads: int = 1,
) -> PreparedStructure:
    """Species indices, neighbor list and k-grid bounds of one structure.

    Args:
      structure: a :class:`Structure` (or anything :func:`as_structure` accepts).
      species_table: see :func:`species_lookup` (a precomputed [119] lookup also works).
      cutoff: neighbor cutoff (Å). dl: k-space resolution (Å).
      index: the structure's position in its dataset, for error messages.

    Raises:
      ValueError: unknown elements, mixed periodicity (the electrostatics treats a
        structure as fully periodic or open), or anything :func:`neighbor_list` rejects.
    """
    structure = as_structure(structure)
    where = "" if index is None else f"structure {index}: "
    lookup = species_lookup(species_table)
    species = species_indices(structure.atomic_numbers, lookup, index)
    if structure.is_mixed:
        raise ValueError(
            f"{where}mixed periodic boundaries pbc={structure.pbc.tolist()} are not supported: the "
            "electrostatics treats a structure as fully periodic or open. Use pbc=True with a vacuum "
            "gap for a slab, or pbc=False for an isolated structure")
    periodic = structure.is_periodic
    cell = structure.cell if periodic else np.zeros((3, 3))
    try:
        senders, receivers, shifts = neighbor_list(structure.positions, cell, periodic, cutoff, n_threads=n_threads)
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None
    kbounds = kgrid_bounds(cell, dl) if periodic else None
    return PreparedStructure(structure.positions, structure.atomic_numbers, species, cell, periodic,
                             senders, receivers, shifts, kbounds, index, float(cutoff), float(dl))
