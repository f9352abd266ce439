"""IR and Raman spectra from an MD trajectory written by ``python -m experiments.md``.

  python -m experiments.spectra --trajectory traj.xyz [--kind ir|raman|both] \
      [--temperature 300] [--skip-fs 1000] [--max-lag-fs 1000] [--window hann] \
      [--quantum harmonic] [--output spectra/water]

IR uses the recorded Ṁ (``--outputs dipole_rate`` in the MD run), else Σ Z*_i v_i (``zstar``),
else the finite difference of ``total_dipole``. Raman needs ``polarizability``. Writes
``<output>_ir.csv`` / ``_ir.png`` (α(ω)n(ω) in cm⁻¹, per cell volume; cm⁻¹·Å³ for open
systems) and ``<output>_raman.csv`` / ``_raman.png`` (isotropic, anisotropic, VV, VH in
arbitrary units), and prints the strongest peaks. Units, normalisation and the quantum
correction are documented in :mod:`polarjax.spectra`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectory", required=True)
    p.add_argument("--kind", default="ir", choices=("ir", "raman", "both"))
    p.add_argument("--temperature", type=float, default=None, help="K (default: the run's target, else mean T)")
    p.add_argument("--skip-fs", type=float, default=0.0, help="drop the first frames (equilibration), fs")
    p.add_argument("--max-lag-fs", type=float, default=None, help="correlation length (default: half the series)")
    p.add_argument("--window", default="hann", choices=("hann", "gaussian", "none"))
    p.add_argument("--quantum", default="harmonic", choices=("harmonic", "standard", "schofield", "none"))
    p.add_argument("--pad", type=int, default=4, help="zero-padding factor of the Fourier transform")
    p.add_argument("--xmax", type=float, default=4500.0, help="plot range (cm⁻¹)")
    p.add_argument("--output", default=None, help="output prefix (default: the trajectory without .xyz)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import numpy as np

    from polarjax import md, spectra

    traj = md.read_trajectory(args.trajectory)
    if args.skip_fs > 0:
        keep = traj["time"] >= traj["time"][0] + args.skip_fs
        traj = {k: (v[keep] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == len(keep)
                    and k != "atomic_numbers" else v) for k, v in traj.items()}
    prefix = Path(args.output) if args.output else Path(args.trajectory).with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    options = dict(max_lag_fs=args.max_lag_fs, window=args.window, quantum=args.quantum, pad=args.pad)
    n = len(traj["time"])
    print(f"{args.trajectory}: {n} frames, {traj['time'][-1] - traj['time'][0]:.1f} fs")
    status = 0
    for kind in (("ir", "raman") if args.kind == "both" else (args.kind,)):
        try:
            if kind == "ir":
                spec = spectra.ir_from_trajectory(traj, args.temperature, **options)
                curves = None
            else:
                spec = spectra.raman_from_trajectory(traj, args.temperature, **options)
                curves = ["isotropic", "anisotropic"]
        except ValueError as error:
            print(f"{kind}: {error}", file=sys.stderr)
            status = 1
            continue
        csv_path = spec.write_csv(f"{prefix}_{kind}.csv")
        png_path = spec.plot(f"{prefix}_{kind}.png", xlim=(0.0, args.xmax),
                             title=f"{kind.upper()} ({spec.meta['temperature_K']:.0f} K, {args.quantum} QCF)",
                             curves=curves)
        peaks = spec.peaks(min_wavenumber=50.0)
        print(f"{kind}: peaks at {', '.join(f'{p:.0f}' for p in peaks[:6])} cm⁻¹ "
              f"(resolution ≈ {1.0 / (spectra.C_CM_PER_FS * spec.meta['max_lag_fs']):.0f} cm⁻¹); "
              f"wrote {csv_path}, {png_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
