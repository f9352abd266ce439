"""Evaluation of a trained model on a labelled file: error table, predictions, parity plots.

Molecular multipoles implied by the latent sources (open structures, about the origin of
the given coordinates; total = permanent + induced):

    dipole      D = Σ_i q_i r_i + Σ_i u_i                                 (e·Å)
    quadrupole  M = Σ_i q_i r_i r_iᵀ + Σ_i (u_i r_iᵀ + r_i u_iᵀ) + Σ_i Q_i   (e·Å², primitive)

compared with DFT through their traceless parts (the DFT quadrupole convention is not
stated in the data; the traceless primitive second moment is origin-independent only for
neutral, dipole-free molecules, so the comparison uses the frames' own coordinates).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from polarjax.electrostatics.sources import traceless_symmetric


def molecular_multipoles(positions, charges, dipoles, quadrupoles):
    """(dipole [3], primitive second moment [3, 3]) of point multipoles (numpy)."""
    positions = np.asarray(positions, np.float64)
    charges = np.asarray(charges, np.float64)
    dipoles = np.asarray(dipoles, np.float64)
    dipole = charges @ positions + dipoles.sum(axis=0)
    second = np.einsum("i,ia,ib->ab", charges, positions, positions)
    second += np.einsum("ia,ib->ab", dipoles, positions) + np.einsum("ia,ib->ab", positions, dipoles)
    second += np.asarray(quadrupoles, np.float64).sum(axis=0)
    return dipole, second


def _traceless(m):
    return np.asarray(traceless_symmetric(np.asarray(m, np.float64)))


def _stats(pred, ref):
    pred, ref = np.asarray(pred, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    residual = pred - ref
    rmse = float(np.sqrt(np.mean(residual**2)))
    ss_tot = float(np.sum((ref - ref.mean()) ** 2))
    r2 = float(1.0 - np.sum(residual**2) / ss_tot) if ss_tot > 0 else float("nan")
    # scale-free measures: Pearson r of the components and the least-squares slope pred ≈ s·ref
    # (latent multipoles are only defined up to the screening of the long-range interaction)
    spread = float(np.std(pred) * np.std(ref))
    pearson = float(np.mean((pred - pred.mean()) * (ref - ref.mean())) / spread) if spread > 0 else float("nan")
    slope = float(np.dot(pred, ref) / np.dot(ref, ref)) if np.dot(ref, ref) > 0 else float("nan")
    return {"rmse": rmse, "mae": float(np.mean(np.abs(residual))), "r2": r2, "pearson_r": pearson, "slope": slope}


def evaluate(loaded, frames: Sequence, batch_size: int = 16, external_field=None):
    """Predictions and error summary for labelled frames.

    Returns:
      (summary dict, list of per-frame prediction dicts)
    """
    from ase.data import chemical_symbols

    predictions = []
    for start in range(0, len(frames), batch_size):
        predictions.extend(loaded.predict(frames[start:start + batch_size], external_field))
    summary = {"n_frames": len(frames), "n_atoms": int(sum(f.num_atoms for f in frames))}
    e_res, f_res, s_res = [], [], []
    per_element: dict[int, list] = {}
    dip_pred, dip_ref, quad_pred, quad_ref = [], [], [], []
    for frame, pred in zip(frames, predictions):
        n = frame.num_atoms
        if "energy" in frame.labels:
            e_res.append(1e3 * (pred["energy"] - frame.labels["energy"]) / n)
        if "forces" in frame.labels:
            residual = 1e3 * (pred["forces"] - frame.labels["forces"])
            f_res.append(residual.ravel())
            for z in np.unique(frame.numbers):
                per_element.setdefault(int(z), []).append(residual[frame.numbers == z].ravel())
        if "stress" in frame.labels and frame.periodic and "stress" in pred:
            s_res.append(1e3 * (pred["stress"] - frame.labels["stress"]).ravel())
        charges = pred["charges"] + pred["induced_charges"]
        dipoles = pred["dipoles"] + pred["induced_dipoles"]
        dipole, second = molecular_multipoles(frame.positions, charges, dipoles, pred["quadrupoles"])
        pred["dipole"], pred["quadrupole"] = dipole, second
        if "dipole" in frame.labels and not frame.periodic:
            dip_pred.append(dipole)
            dip_ref.append(frame.labels["dipole"])
        if "quadrupole" in frame.labels and not frame.periodic:
            quad_pred.append(_traceless(second))
            quad_ref.append(_traceless(frame.labels["quadrupole"]))
    if e_res:
        e = np.asarray(e_res)
        summary["energy_rmse_meV_per_atom"] = float(np.sqrt(np.mean(e**2)))
        summary["energy_mae_meV_per_atom"] = float(np.mean(np.abs(e)))
    if f_res:
        f = np.concatenate(f_res)
        summary["forces_rmse_meV_per_A"] = float(np.sqrt(np.mean(f**2)))
        summary["forces_mae_meV_per_A"] = float(np.mean(np.abs(f)))
        summary["forces_rmse_meV_per_A_by_element"] = {
            chemical_symbols[z]: float(np.sqrt(np.mean(np.concatenate(r) ** 2))) for z, r in sorted(per_element.items())}
    if s_res:
        s = np.concatenate(s_res)
        summary["stress_rmse_meV_per_A3"] = float(np.sqrt(np.mean(s**2)))
        summary["stress_mae_meV_per_A3"] = float(np.mean(np.abs(s)))
    if dip_ref:
        stats = _stats(dip_pred, dip_ref)
        summary.update(dipole_rmse_eA=stats["rmse"], dipole_mae_eA=stats["mae"], dipole_r2=stats["r2"],
                       dipole_pearson_r=stats["pearson_r"], dipole_slope=stats["slope"])
    if quad_ref:
        stats = _stats(quad_pred, quad_ref)
        summary.update(quadrupole_traceless_rmse_eA2=stats["rmse"], quadrupole_traceless_r2=stats["r2"],
                       quadrupole_traceless_pearson_r=stats["pearson_r"], quadrupole_traceless_slope=stats["slope"])
    return summary, predictions


def write_predictions(path: Path, frames, predictions) -> None:
    """Extended XYZ with predicted energy, forces, charges, dipoles, quadrupoles and induced terms."""
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    images = []
    for frame, pred in zip(frames, predictions):
        atoms = ase.Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        results = {"energy": pred["energy"], "forces": pred["forces"]}
        if frame.periodic and "stress" in pred:
            s = pred["stress"]
            results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.arrays["latent_charges"] = np.asarray(pred["charges"], np.float64)
        atoms.arrays["latent_dipoles"] = np.asarray(pred["dipoles"], np.float64)
        atoms.arrays["latent_quadrupoles"] = np.asarray(pred["quadrupoles"], np.float64).reshape(-1, 9)
        atoms.arrays["induced_charges"] = np.asarray(pred["induced_charges"], np.float64)
        atoms.arrays["induced_dipoles"] = np.asarray(pred["induced_dipoles"], np.float64)
        atoms.info["energy_sr"] = float(pred["energy_sr"])
        atoms.info["energy_lr"] = float(pred["energy_lr"])
        atoms.info["pred_dipole"] = np.asarray(pred["dipole"], np.float64)
        atoms.info["ref_energy"] = float(frame.labels.get("energy", np.nan))
        images.append(atoms)
    ase.io.write(str(path), images, format="extxyz")


def parity_plots(path: Path, frames, predictions) -> None:
    """PNG with energy-per-atom and force-component parity plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    e_ref = [f.labels["energy"] / f.num_atoms for f in frames if "energy" in f.labels]
    e_pred = [p["energy"] / f.num_atoms for f, p in zip(frames, predictions) if "energy" in f.labels]
    f_ref = np.concatenate([f.labels["forces"].ravel() for f in frames if "forces" in f.labels] or [np.zeros(0)])
    f_pred = np.concatenate([p["forces"].ravel() for f, p in zip(frames, predictions) if "forces" in f.labels]
                            or [np.zeros(0)])
    for ax, ref, pred, label in ((axes[0], e_ref, e_pred, "E / atom (eV)"), (axes[1], f_ref, f_pred, "F (eV/Å)")):
        ax.scatter(ref, pred, s=4, alpha=0.6)
        if len(ref):
            lo, hi = float(np.min([np.min(ref), np.min(pred)])), float(np.max([np.max(ref), np.max(pred)]))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"DFT {label}")
        ax.set_ylabel(f"model {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(summary: dict) -> str:
    rows = [("frames", summary["n_frames"]), ("atoms", summary["n_atoms"])]
    for key, label in (("energy_rmse_meV_per_atom", "E RMSE (meV/atom)"), ("energy_mae_meV_per_atom", "E MAE (meV/atom)"),
                       ("forces_rmse_meV_per_A", "F RMSE (meV/Å)"), ("forces_mae_meV_per_A", "F MAE (meV/Å)"),
                       ("stress_rmse_meV_per_A3", "stress RMSE (meV/Å³)"), ("dipole_rmse_eA", "dipole RMSE (e·Å)"),
                       ("dipole_r2", "dipole R²"), ("dipole_pearson_r", "dipole Pearson r"),
                       ("dipole_slope", "dipole slope (pred/DFT)"),
                       ("quadrupole_traceless_rmse_eA2", "traceless Q RMSE (e·Å²)"),
                       ("quadrupole_traceless_r2", "traceless Q R²"), ("quadrupole_traceless_pearson_r", "traceless Q Pearson r"),
                       ("quadrupole_traceless_slope", "traceless Q slope (pred/DFT)")):
        if key in summary:
            rows.append((label, f"{summary[key]:.4g}"))
    for element, value in summary.get("forces_rmse_meV_per_A_by_element", {}).items():
        rows.append((f"F RMSE {element} (meV/Å)", f"{value:.4g}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
