"""Demo: latent-Ewald electrostatics of a bundled NaCl cluster with its DFT reference charges.

  python -m experiments.electrostatics_demo [--frame 0] [--sigma 1.0] [--dl 2.0]

Prints the open-boundary energy breakdown, the potential and field on the first atoms,
and the periodic energy of the same cluster in growing cubic boxes (which approaches the
open-boundary result once the box is large; the cluster is charged, so the periodic
energies include the neutralising-background convention of the k-sum and converge as 1/L).
"""

from __future__ import annotations

import argparse

import numpy as np

from polarjax.data.bundled import bundled_path
from polarjax.electrostatics import ewald


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--dl", type=float, default=2.0)
    args = parser.parse_args(argv)

    import ase.io

    path = bundled_path("nacl_clusters.xyz")
    atoms = ase.io.read(path, index=args.frame)
    positions = atoms.get_positions()
    charges = atoms.get_initial_charges()
    print(f"{path.name} frame {args.frame}: {atoms.get_chemical_formula()}, total charge {charges.sum():+.3f} e")
    result = ewald(positions=positions, periodic=False, charges=charges, sigma=args.sigma, dl=args.dl)
    print(f"open-boundary long-range energy: {float(result.energy):.6f} eV")
    for name, value in result.terms.items():
        print(f"  {name:>22}: {float(value):+.6f} eV")
    print("atom  Z   q (e)    phi (V)   |E| (V/Å)")
    for i in range(min(5, len(atoms))):
        print(f"{i:>4} {atoms.numbers[i]:>2} {charges[i]:+.3f} {float(result.potential[i]):+9.4f} "
              f"{float(np.linalg.norm(result.field[i])):9.4f}")
    center = positions.mean(axis=0)
    print("periodic cubic box L (Å) -> energy (eV)")
    for length in (30.0, 60.0, 120.0):
        shifted = positions - center + length / 2
        energy = ewald(positions=shifted, cell=np.eye(3) * length, charges=charges, sigma=args.sigma, dl=args.dl).energy
        print(f"  {length:6.1f} -> {float(energy):.6f}")


if __name__ == "__main__":
    main()
