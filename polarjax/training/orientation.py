"""The global sign of the latent multipoles.

At zero external field every long-range energy term is quadratic in the latent sources
(q, u, Q, and the induced q_ind = −κφ, u_ind = αE that are linear in them), so flipping all
of them leaves energies, forces and stress unchanged: a model trained on energies and forces
has an arbitrary global sign. Polarization, Born effective charges and the coupling to an
external field are odd in that sign, so it has to be fixed by a convention before they mean
anything. The convention here: a reference species has a mean latent charge of a chosen sign
(by default the most electronegative species of the model is negative: O in water, HfO2 and
peptides, Cl in NaCl). The result is stored in ``orientation.json`` of the run directory and
applied by :func:`polarjax.load_model` through ``ModelSpec.latent_sign``.

  python -m experiments.orient --run runs/hfo2             # from the run's training data
  python -m experiments.orient --run runs/hfo2 --reference O=-1 --data frames.xyz
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

ORIENTATION_FILE = "orientation.json"

# Pauling electronegativities (CRC Handbook); only used to pick the default reference species.
PAULING = {
    "H": 2.20, "Li": 0.98, "Be": 1.57, "B": 2.04, "C": 2.55, "N": 3.04, "O": 3.44, "F": 3.98,
    "Na": 0.93, "Mg": 1.31, "Al": 1.61, "Si": 1.90, "P": 2.19, "S": 2.58, "Cl": 3.16,
    "K": 0.82, "Ca": 1.00, "Sc": 1.36, "Ti": 1.54, "V": 1.63, "Cr": 1.66, "Mn": 1.55, "Fe": 1.83,
    "Co": 1.88, "Ni": 1.91, "Cu": 1.90, "Zn": 1.65, "Ga": 1.81, "Ge": 2.01, "As": 2.18, "Se": 2.55,
    "Br": 2.96, "Rb": 0.82, "Sr": 0.95, "Y": 1.22, "Zr": 1.33, "Nb": 1.6, "Mo": 2.16, "Ag": 1.93,
    "Cd": 1.69, "In": 1.78, "Sn": 1.96, "Sb": 2.05, "Te": 2.1, "I": 2.66, "Cs": 0.79, "Ba": 0.89,
    "La": 1.10, "Hf": 1.3, "Ta": 1.5, "W": 2.36, "Pt": 2.28, "Au": 2.54, "Pb": 2.33, "Bi": 2.02,
}


def parse_reference(text: str) -> tuple[int, float]:
    """``"O=-1"`` / ``"Cl=-"`` / ``"Na=+1"`` → (atomic number, ±1)."""
    try:
        symbol, sign = text.split("=")
        symbol, sign = symbol.strip(), sign.strip()
        value = {"-": -1.0, "+": 1.0}.get(sign)
        value = float(sign) if value is None else value
        z = atomic_numbers[symbol]
    except (ValueError, KeyError):
        raise ValueError(f"reference {text!r} is not of the form ELEMENT=SIGN, e.g. O=-1 or Na=+1") from None
    if value == 0:
        raise ValueError(f"reference {text!r}: the sign must be + or -")
    return z, float(np.sign(value))


def default_reference(species: Sequence[int]) -> tuple[int, float]:
    """The most electronegative species of the model, negative."""
    known = {z: PAULING.get(chemical_symbols[z]) for z in species}
    missing = [chemical_symbols[z] for z, value in known.items() if value is None]
    if missing:
        raise ValueError(f"no electronegativity tabulated for {missing}; pass a reference such as "
                         f"--reference {chemical_symbols[species[0]]}=-1")
    ranked = sorted(known, key=lambda z: known[z], reverse=True)
    if len(ranked) > 1 and known[ranked[0]] == known[ranked[1]]:
        raise ValueError(f"{chemical_symbols[ranked[0]]} and {chemical_symbols[ranked[1]]} have the same "
                         "electronegativity; pass a reference explicitly")
    return ranked[0], -1.0


def mean_latent_charges(loaded, frames, batch_size: int = 8) -> dict[int, float]:
    """Mean learned (permanent) charge per atomic number over ``frames`` (e), current sign."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        for frame, item in zip(chunk, loaded.predict(chunk)):
            for z, q in zip(np.asarray(frame.numbers), np.asarray(item["charges"], np.float64)):
                sums[int(z)] = sums.get(int(z), 0.0) + float(q)
                counts[int(z)] = counts.get(int(z), 0) + 1
    return {z: sums[z] / counts[z] for z in sums}


def orientation(loaded, frames, reference: Optional[str] = None) -> dict:
    """Decide ``latent_sign`` for a loaded model from its charges on ``frames``.

    Returns a JSON-able dict: reference symbol and sign, the mean charge per element before
    orientation (with the model's current sign), and the ``latent_sign`` to store.
    """
    spec = loaded.spec
    if not spec.flags["long_range"]:
        return {"latent_sign": 1.0, "note": "short-range model: no latent multipoles"}
    if spec.baseline_charges is not None and any(spec.baseline_charges):
        return {"latent_sign": spec.latent_sign, "note": "baseline charges fix the sign"}
    if not frames:
        raise ValueError("orientation needs at least one frame")
    z_ref, sign_ref = parse_reference(reference) if reference else default_reference(spec.species)
    means = mean_latent_charges(loaded, frames)
    if z_ref not in means:
        raise ValueError(f"reference element {chemical_symbols[z_ref]} does not occur in the frames "
                         f"(elements: {sorted(chemical_symbols[z] for z in means)})")
    current = means[z_ref]
    if abs(current) < 1e-6:
        raise ValueError(f"the mean latent charge of {chemical_symbols[z_ref]} is {current:.2e} e: "
                         "too small to orient the model; choose another reference element")
    flip = np.sign(current) != sign_ref
    return {
        "reference": f"{chemical_symbols[z_ref]}={'+' if sign_ref > 0 else '-'}1",
        "mean_charge_before": {chemical_symbols[z]: m for z, m in sorted(means.items())},
        "latent_sign_before": spec.latent_sign,
        "latent_sign": -spec.latent_sign if flip else spec.latent_sign,
        "num_frames": len(frames),
    }


def write_orientation(run_dir: str | Path, result: Mapping) -> Path:
    path = Path(run_dir) / ORIENTATION_FILE
    path.write_text(json.dumps(dict(result), indent=2))
    return path


def read_latent_sign(run_dir: str | Path) -> float:
    """The stored ``latent_sign`` of a run (+1 when it was never oriented)."""
    path = Path(run_dir) / ORIENTATION_FILE
    if not path.exists():
        return 1.0
    return float(json.loads(path.read_text())["latent_sign"])


def oriented(loaded, latent_sign: float):
    """A copy of a LoadedModel with ``spec.latent_sign`` set."""
    from polarjax.models import build
    from polarjax.training.inference import LoadedModel

    spec = dataclasses.replace(loaded.spec, latent_sign=float(latent_sign))
    return LoadedModel(build(spec), loaded.params, loaded.cutoff, loaded.config, loaded.run_dir, loaded.dtype)
