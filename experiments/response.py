"""Electrical response of a trained run on a set of structures: Z*, P and α_sys per frame,
compared with DFT labels when present.

  python -m experiments.response --run RUN --data FILE.xyz --output response.json \
      [--epsilon-inf 5.365] [--remove-mean-charge] [--enforce-asr] [--keys bec=BEC polarizability=alpha]
  python -m experiments.response --run RUN --split test --output response.json   # the run's held-out frames

Labels (auto-detected unless given with --keys): Born effective charges per atom (``bec`` or
``BEC``, 9 numbers row-major Z*[pol, disp], e); the cell polarizability per frame
(``polarizability`` or ``alpha``, 3×3, compared in Å³: the model's α_sys in e·Å²/V is
multiplied by k_e = 14.3996 V·Å/e). Prints and writes (JSON): bec_rmse_e (all components),
per-species mean diagonal Z* (model vs DFT) and RMSE, the acoustic-sum-rule violation,
polarizability R² (components) and the ratio of the means of the diagonal, and per-frame
P (e·Å; P·V for periodic cells), α_sys (Å³) and optionally Z* (--per-atom).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BEC_KEYS = ("bec", "BEC", "born_charges", "born_effective_charges")
ALPHA_KEYS = ("polarizability", "alpha", "alpha_tensor")


def _detect_keys(path, keys):
    """Fill in the bec / polarizability label keys from the first frame when not given."""
    import ase.io

    atoms = ase.io.read(str(path), index=0)
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    available = set(results) | set(atoms.info) | set(atoms.arrays)
    keys = dict(keys)
    if "bec" not in keys:
        keys["bec"] = next((k for k in BEC_KEYS if k in available), "bec")
    if "polarizability" not in keys:
        keys["polarizability"] = next((k for k in ALPHA_KEYS if k in available), "polarizability")
    return keys


def _r2(pred, ref):
    pred, ref = np.ravel(pred), np.ravel(ref)
    ss = float(np.sum((ref - ref.mean()) ** 2))
    return float(1.0 - np.sum((pred - ref) ** 2) / ss) if ss > 0 else float("nan")


def compute(loaded, frames, config, batch_size: int = 4, external_field=None):
    """Per-frame response dicts (numpy): polarization, volume, bec (+ parts), asr,
    polarizability (e·Å²/V), polarizability_sum, charges (total)."""
    import jax

    from polarjax.observables import make_response_fn

    functions = {}
    results = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        graph, _ = loaded.builder.build(chunk)
        periodic = {f.periodic for f in chunk}
        boundary = "mixed" if len(periodic) > 1 else ("periodic" if periodic == {True} else "open")
        if boundary not in functions:
            functions[boundary] = make_response_fn(loaded.model, boundary, config, bec=True, polarizability=True,
                                                   include_e0=False)
        field = None
        if external_field is not None:
            field = np.broadcast_to(np.asarray(external_field, graph.positions.dtype), (graph.cell.shape[0], 3))
        out = jax.device_get(functions[boundary](loaded.params, graph, field))
        offset = 0
        for g, frame in enumerate(chunk):
            n = frame.num_atoms
            atoms = slice(offset, offset + n)
            item = {key: np.asarray(out[key][atoms], np.float64)
                    for key in ("bec", "bec_charge", "bec_dipole", "total_charges") if key in out}
            for key in ("polarization", "volume", "asr", "polarizability", "polarizability_sum"):
                item[key] = np.asarray(out[key][g], np.float64)
            results.append(item)
            offset += n
    return results


def summarize(frames, results, species):
    from ase.data import chemical_symbols

    from polarjax.units import COULOMB

    summary = {"n_frames": len(frames), "n_atoms": int(sum(f.num_atoms for f in frames))}
    asr = np.array([np.abs(r["asr"]).max() for r in results])
    summary["asr_max_abs_e"] = float(asr.max())
    summary["asr_mean_abs_e"] = float(np.mean([np.abs(r["asr"]).mean() for r in results]))
    # Born effective charges
    pairs = [(f, r) for f, r in zip(frames, results) if "bec" in f.labels]
    per_species = {}
    for z in species:
        pred = [np.trace(r["bec"][f.numbers == z], axis1=1, axis2=2) / 3 for f, r in zip(frames, results)]
        pred = np.concatenate(pred) if pred else np.zeros(0)
        if pred.size == 0:
            continue
        entry = {"n_atoms": int(pred.size), "model_mean_diagonal_e": float(pred.mean())}
        if pairs:
            ref = np.concatenate([np.trace(f.labels["bec"][f.numbers == z], axis1=1, axis2=2) / 3 for f, _ in pairs])
            res = np.concatenate([(r["bec"] - f.labels["bec"])[f.numbers == z].ravel() for f, r in pairs])
            entry.update(dft_mean_diagonal_e=float(ref.mean()), bec_rmse_e=float(np.sqrt(np.mean(res**2))))
        per_species[chemical_symbols[int(z)]] = entry
    summary["bec_by_species"] = per_species
    if pairs:
        pred = np.concatenate([r["bec"].ravel() for _, r in pairs])
        ref = np.concatenate([f.labels["bec"].ravel() for f, _ in pairs])
        summary["bec_rmse_e"] = float(np.sqrt(np.mean((pred - ref) ** 2)))
        summary["bec_mae_e"] = float(np.mean(np.abs(pred - ref)))
        summary["bec_r2"] = _r2(pred, ref)
        summary["bec_n_frames"] = len(pairs)
    # polarizability
    alpha_pairs = [(f, r) for f, r in zip(frames, results) if "polarizability" in f.labels]
    model_a3 = np.array([r["polarizability"] * COULOMB for r in results])
    summary["model_polarizability_mean_diagonal_A3"] = float(np.mean(np.trace(model_a3, axis1=1, axis2=2) / 3))
    if alpha_pairs:
        pred = np.array([r["polarizability"] * COULOMB for _, r in alpha_pairs])
        ref = np.array([f.labels["polarizability"] for f, _ in alpha_pairs])
        diag_pred = np.trace(pred, axis1=1, axis2=2) / 3
        diag_ref = np.trace(ref, axis1=1, axis2=2) / 3
        summary.update(
            polarizability_n_frames=len(alpha_pairs),
            polarizability_r2=_r2(pred, ref),
            polarizability_diagonal_r2=_r2(np.concatenate([np.diagonal(p) for p in pred]),
                                           np.concatenate([np.diagonal(p) for p in ref])),
            polarizability_mean_diagonal_r2=_r2(diag_pred, diag_ref),
            polarizability_ratio_of_means=float(diag_pred.mean() / diag_ref.mean()),
            polarizability_rmse_A3=float(np.sqrt(np.mean((pred - ref) ** 2))),
            dft_polarizability_mean_diagonal_A3=float(diag_ref.mean()),
        )
    return summary


def format_summary(summary) -> str:
    lines = [f"frames {summary['n_frames']}, atoms {summary['n_atoms']}"]
    if "bec_rmse_e" in summary:
        lines.append(f"bec_rmse_e {summary['bec_rmse_e']:.4f}  (MAE {summary['bec_mae_e']:.4f}, "
                     f"R² {summary['bec_r2']:.3f}, {summary['bec_n_frames']} labelled frames)")
    for name, entry in summary["bec_by_species"].items():
        text = f"  {name:>2}: mean diag Z* model {entry['model_mean_diagonal_e']:+.3f} e"
        if "dft_mean_diagonal_e" in entry:
            text += f"  DFT {entry['dft_mean_diagonal_e']:+.3f} e  RMSE {entry['bec_rmse_e']:.3f} e"
        lines.append(text)
    lines.append(f"acoustic sum rule |Σ Z*| max {summary['asr_max_abs_e']:.3g} e, mean {summary['asr_mean_abs_e']:.3g} e")
    if "polarizability_r2" in summary:
        lines.append(f"polarizability R² (components) {summary['polarizability_r2']:.3f}, diagonal "
                     f"{summary['polarizability_diagonal_r2']:.3f}; ratio of means (model/DFT) "
                     f"{summary['polarizability_ratio_of_means']:.3f}; RMSE {summary['polarizability_rmse_A3']:.3f} Å³")
    lines.append(f"model α_sys mean diagonal {summary['model_polarizability_mean_diagonal_A3']:.4g} Å³")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of experiments.train")
    parser.add_argument("--data", help="structures (extended XYZ or any ASE format); default with --split: the run's data")
    parser.add_argument("--split", choices=("train", "valid", "test"),
                        help="use this split of the run's own data (reproduced from its config and seed)")
    parser.add_argument("--output", required=True, help="summary JSON path")
    parser.add_argument("--keys", nargs="*", default=[], help="label key overrides, e.g. bec=BEC polarizability=alpha")
    parser.add_argument("--index", default=":", help="ASE frame selection, e.g. '-5:' for held-out frames")
    parser.add_argument("--epsilon-inf", type=float, default=1.0, help="Z* scaled by sqrt(epsilon_inf) (default 1)")
    parser.add_argument("--remove-mean-charge", action="store_true", help="use q - Q/n per structure")
    parser.add_argument("--enforce-asr", action="store_true", help="subtract the mean Z* per structure")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    parser.add_argument("--per-atom", action="store_true", help="also write per-atom Z* to the JSON")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from polarjax.observables import ResponseConfig
    from polarjax.training.dataset import check_species, parse_label_keys, read_frames
    from polarjax.training.inference import load_model

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        sys.exit(f"refusing to overwrite {output}; pass --overwrite or choose another --output")
    try:
        keys = parse_label_keys(args.keys)
    except ValueError as error:
        sys.exit(f"--keys: {error}")
    loaded = load_model(args.run, args.checkpoint)
    if args.split:
        from polarjax.training.loop import load_datasets

        data_config = dict(loaded.config["data"])
        if args.data:
            data_config.update(train_file=args.data, valid_file="", test_file="")
        keys = _detect_keys(data_config["train_file"], {**dict(data_config.get("label_keys") or {}), **keys})
        data_config["label_keys"] = keys
        frames = load_datasets(data_config)[args.split]
        args.data = f"{data_config['train_file']} ({args.split} split)"
        if args.index != ":":
            sys.exit("--index cannot be combined with --split")
    elif args.data:
        keys = _detect_keys(args.data, keys)
        frames, _ = read_frames(args.data, keys, index=args.index, require=())
    else:
        sys.exit("give --data or --split")
    check_species(frames, loaded.spec.species)
    config = ResponseConfig(epsilon_inf=args.epsilon_inf, remove_mean_charge=args.remove_mean_charge,
                            enforce_asr=args.enforce_asr)
    start = time.perf_counter()
    results = compute(loaded, frames, config, args.batch_size)
    elapsed = time.perf_counter() - start
    species = sorted({int(z) for f in frames for z in f.numbers})
    summary = summarize(frames, results, species)
    summary.update(run=str(args.run), data=str(args.data), index=args.index, keys=keys, seconds=elapsed,
                   config=dict(epsilon_inf=args.epsilon_inf, remove_mean_charge=args.remove_mean_charge,
                               enforce_asr=args.enforce_asr))
    from polarjax.units import COULOMB

    summary["frames"] = []
    for frame, result in zip(frames, results):
        entry = {"source": frame.source, "periodic": frame.periodic,
                 "polarization_eA": result["polarization"].tolist(),
                 "volume_A3": float(result["volume"]) if frame.periodic else None,
                 "polarizability_A3": (result["polarizability"] * COULOMB).tolist(),
                 "asr_e": result["asr"].tolist()}
        if "polarizability" in frame.labels:
            entry["dft_polarizability"] = frame.labels["polarizability"].tolist()
        if args.per_atom:
            entry["bec"] = result["bec"].tolist()
        summary["frames"].append(entry)
    print(format_summary(summary))
    print(f"({len(frames)} frames in {elapsed:.1f} s incl. compilation)")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
