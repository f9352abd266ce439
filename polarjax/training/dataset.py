"""Reading labelled structures (extended XYZ or anything ASE reads) with strict checks.

Every problem is reported with the file and the frame index; nothing is dropped silently.
``skip_invalid=True`` (an explicit user option) skips bad frames instead of raising, and
the skipped frames are listed in the returned report.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

#: Default label keys. Energies eV, forces eV/Å, stress eV/Å³ (ASE sign convention:
#: σ = (1/V) ∂E/∂ε), virial eV, dipole e·Å, charges e, BEC e (row-major Z*[pol, disp]),
#: polarizability as stored.
DEFAULT_KEYS = dict(energy="energy", forces="forces", stress="stress", virial="virial", dipole="dipole",
                    quadrupole="quadrupole", charges="charges", bec="bec", polarizability="polarizability")

#: Minimum allowed interatomic distance (Å) before a frame is called overlapping.
MIN_DISTANCE = 0.1


class DataError(ValueError):
    """A problem with an input dataset (names the file and the frame)."""


@dataclasses.dataclass
class Frame:
    """One labelled structure on the host (numpy, float64).

    positions [N, 3] Å, numbers [N], cell [3, 3] (rows; zeros if open), pbc [3] bool,
    labels: energy [], forces [N, 3], stress [3, 3], dipole [3], quadrupole [3, 3],
    charges [N], bec [N, 3, 3], polarizability [3, 3] (only those present).
    source: "file:frame" for error messages.
    """

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    labels: dict
    source: str

    @property
    def periodic(self) -> bool:
        return bool(np.all(self.pbc)) and bool(np.any(self.cell))

    @property
    def num_atoms(self) -> int:
        return len(self.numbers)


def _lookup(atoms, key: str):
    """A label from calc.results, info or arrays (in that order), or None."""
    if key is None:
        return None
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    for source in (results, atoms.info, atoms.arrays):
        if key in source:
            return source[key]
    return None


def _as_array(value, shape, what, where):
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {what!r} is not numeric: {value!r}") from None
    if array.size != int(np.prod(shape)):
        raise DataError(f"{where}: label {what!r} has shape {array.shape}, expected {shape}")
    array = array.reshape(shape)
    if not np.all(np.isfinite(array)):
        raise DataError(f"{where}: label {what!r} contains NaN or inf")
    return array


def _stress_matrix(value, where, key):
    array = np.asarray(value, dtype=np.float64).ravel()
    if array.size == 6:  # Voigt xx yy zz yz xz xy
        xx, yy, zz, yz, xz, xy = array
        array = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    return _as_array(array, (3, 3), key, where)


def _check_geometry(positions, cell, pbc, where):
    if not np.all(np.isfinite(positions)):
        raise DataError(f"{where}: positions contain NaN or inf")
    if np.any(pbc) and not np.all(pbc):
        raise DataError(f"{where}: mixed periodicity pbc={pbc.tolist()} is not supported (use all True or all False)")
    if np.all(pbc):
        volume = abs(np.linalg.det(cell))
        if not np.isfinite(volume) or volume < 1e-6:
            raise DataError(f"{where}: periodic frame with a singular cell (volume {volume:.3g} Å³)")
    n = len(positions)
    if n < 2:
        return
    if np.all(pbc):
        frac = positions @ np.linalg.inv(cell)
        delta = frac[:, None, :] - frac[None, :, :]
        delta -= np.round(delta)
        distances = np.linalg.norm(delta @ cell, axis=-1)
    else:
        distances = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    distances[np.diag_indices(n)] = np.inf
    i, j = np.unravel_index(np.argmin(distances), distances.shape)
    if distances[i, j] < MIN_DISTANCE:
        raise DataError(f"{where}: atoms {min(i, j)} and {max(i, j)} overlap (distance {distances[i, j]:.3g} Å)")


def frame_from_atoms(atoms, keys: Mapping[str, Optional[str]], where: str, require: Sequence[str] = ("energy", "forces")) -> Frame:
    """Convert one ase.Atoms with labels into a checked :class:`Frame`."""
    n = len(atoms)
    if n == 0:
        raise DataError(f"{where}: frame has no atoms")
    positions = np.asarray(atoms.get_positions(), dtype=np.float64)
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    cell = np.asarray(atoms.get_cell()[:], dtype=np.float64) if np.any(pbc) else np.zeros((3, 3))
    _check_geometry(positions, cell, pbc, where)
    labels: dict[str, np.ndarray] = {}
    shapes = dict(energy=(), forces=(n, 3), dipole=(3,), quadrupole=(3, 3), charges=(n,), bec=(n, 3, 3),
                  polarizability=(3, 3))
    for name, shape in shapes.items():
        key = keys.get(name)
        value = _lookup(atoms, key)
        if value is None:
            continue
        labels[name] = _as_array(value, shape, key, where)
    stress = _lookup(atoms, keys.get("stress"))
    if stress is not None:
        labels["stress"] = _stress_matrix(stress, where, keys.get("stress"))
    elif _lookup(atoms, keys.get("virial")) is not None and np.all(pbc):
        virial = _stress_matrix(_lookup(atoms, keys.get("virial")), where, keys.get("virial"))
        labels["stress"] = -virial / abs(np.linalg.det(cell))
    for name in require:
        if name not in labels:
            key = keys.get(name)
            available = sorted(set(getattr(atoms.calc, "results", {}) if atoms.calc else {}) | set(atoms.info)
                               | (set(atoms.arrays) - {"numbers", "positions"}))
            raise DataError(f"{where}: required label {name!r} (key {key!r}) not found; available keys: {available}")
    return Frame(positions, np.asarray(atoms.numbers, dtype=np.int64), cell, pbc, labels, where)


@dataclasses.dataclass
class ReadReport:
    path: str
    num_frames: int
    skipped: list  # [(frame index, reason)]
    fingerprint: str


def parse_label_keys(items: Sequence[str]) -> dict[str, str]:
    """``["forces=force", "energy=E"]`` (command-line overrides) → ``{"forces": "force", "energy": "E"}``."""
    keys = {}
    for item in items:
        name, sep, key = item.partition("=")
        if not sep or not name or not key:
            raise ValueError(f"label key overrides must look like name=key, got {item!r}")
        keys[name] = key
    return keys


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of the file contents (recorded in run directories)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_frames(path: str | Path, keys: Optional[Mapping[str, Optional[str]]] = None, index: str = ":",
                skip_invalid: bool = False, require: Sequence[str] = ("energy", "forces")) -> tuple[list[Frame], ReadReport]:
    """Read and check every frame of a file.

    Args:
      path: extended XYZ (or any ASE-readable format).
      keys: label-name → key overrides of DEFAULT_KEYS (None disables a label).
      skip_invalid: skip (and report) bad frames instead of raising DataError.
      require: labels every frame must have.

    Returns:
      (frames, report)
    """
    import ase.io

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    merged = dict(DEFAULT_KEYS)
    merged.update(dict(keys or {}))
    images = []
    try:  # frame by frame, so that a parse error can say where it happened
        for atoms in ase.io.iread(str(path), index=index):
            images.append(atoms)
    except Exception as error:  # ASE raises many types for malformed files
        raise DataError(f"{path}: could not be parsed by ASE after {len(images)} good frame(s) (the problem is at or "
                        f"after frame {len(images)}): {type(error).__name__}: {error}") from error
    if not images:
        raise DataError(f"{path}: contains no frames")
    frames, skipped = [], []
    for i, atoms in enumerate(images):
        where = f"{path}:frame {i}"
        try:
            frames.append(frame_from_atoms(atoms, merged, where, require))
        except DataError as error:
            if not skip_invalid:
                raise
            skipped.append((i, str(error)))
    if not frames:
        raise DataError(f"{path}: every frame was invalid; first problem: {skipped[0][1]}")
    return frames, ReadReport(str(path), len(images), skipped, file_fingerprint(path))


def fit_atomic_energies(frames: Sequence[Frame], species: Sequence[int]) -> np.ndarray:
    """Least-squares per-element reference energies E0 [S] (eV) from total energies.

    Solves min Σ_f (E_f − Σ_s n_fs E0_s)² (minimum-norm solution when compositions are
    linearly dependent, e.g. a single stoichiometry).
    """
    index = {int(z): k for k, z in enumerate(species)}
    counts = np.zeros((len(frames), len(species)))
    energies = np.zeros(len(frames))
    for f, frame in enumerate(frames):
        for z in frame.numbers:
            counts[f, index[int(z)]] += 1
        energies[f] = frame.labels["energy"]
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return solution


def split_indices(num_frames: int, valid_fraction: float, test_fraction: float, seed: int):
    """Reproducible random (train, valid, test) index arrays from a seed."""
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError(f"invalid split fractions valid={valid_fraction}, test={test_fraction}")
    order = np.random.default_rng(seed).permutation(num_frames)
    n_valid = int(round(valid_fraction * num_frames))
    n_test = int(round(test_fraction * num_frames))
    return np.sort(order[n_valid + n_test:]), np.sort(order[:n_valid]), np.sort(order[n_valid:n_valid + n_test])


def species_of(frames: Sequence[Frame]) -> list[int]:
    """Sorted atomic numbers present in ``frames``."""
    return sorted({int(z) for frame in frames for z in frame.numbers})


def check_species(frames: Sequence[Frame], species: Sequence[int]) -> None:
    """DataError naming the frame when it contains an element the model does not know."""
    known = set(int(z) for z in species)
    for frame in frames:
        unknown = sorted(set(int(z) for z in frame.numbers) - known)
        if unknown:
            from ase.data import chemical_symbols
            names = [chemical_symbols[z] for z in unknown]
            raise DataError(f"{frame.source}: element(s) {names} not in the model's species "
                            f"{[chemical_symbols[z] for z in sorted(known)]}")
