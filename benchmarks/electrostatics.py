"""Benchmark of the latent-Ewald electrostatics (periodic, reciprocal space).

Cubic boxes at 0.1 atoms/Å³, sigma = 1 Å, dl = 2 Å, float32 by default. For each N and
each source set it times the jitted energy and energy+forces (median of repeats after
compilation), counts the k-vectors, and measures peak memory of a fresh process.

  "charges": charges only
  "full":    charges + dipoles + quadrupoles + kappa + anisotropic alpha (3x3 PSD)

Usage:
  python -m benchmarks.electrostatics                    # default sizes, table + JSON
  python -m benchmarks.electrostatics --sizes 96 384 --repeats 3
Output: a table on stdout and benchmarks/results/electrostatics_<backend>.json
(never overwritten: an existing file gets a numbered sibling unless --overwrite).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SIZES = (96, 384, 1536, 3072, 12288)
MODES = ("charges", "full")


def _inputs(num_atoms, mode, dtype, seed=0):
    import numpy as np
    import jax.numpy as jnp

    from polarjax.electrostatics import count_kvectors, kgrid_weights

    rng = np.random.default_rng(seed)
    length = (num_atoms / 0.1) ** (1.0 / 3.0)
    cell = np.eye(3) * length
    weights = kgrid_weights(cell, 2.0)
    charges = rng.normal(size=num_atoms)
    charges -= charges.mean()
    args = dict(
        positions=jnp.asarray(rng.uniform(0, length, (num_atoms, 3)), dtype),
        cell=jnp.asarray(cell, dtype),
        charges=jnp.asarray(charges, dtype),
        kweights=jnp.asarray(weights, dtype),
    )
    if mode == "full":
        a = rng.normal(size=(num_atoms, 3, 3)) * 0.1
        args.update(
            dipoles=jnp.asarray(rng.normal(size=(num_atoms, 3)) * 0.1, dtype),
            quadrupoles=jnp.asarray(rng.normal(size=(num_atoms, 3, 3)) * 0.1, dtype),
            kappa=jnp.asarray(rng.uniform(0, 0.01, num_atoms), dtype),
            alpha=jnp.asarray(a @ np.swapaxes(a, 1, 2), dtype),
        )
    return args, count_kvectors(weights)


def _median_time(fn, arg, repeats):
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def run_one(num_atoms, mode, repeats, dtype_name):
    """Time one configuration in this process; returns a dict."""
    import jax
    import jax.numpy as jnp

    from polarjax.electrostatics import electrostatics

    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if dtype_name == "float64" else jnp.float32
    args, num_k = _inputs(num_atoms, mode, dtype)
    positions = args.pop("positions")

    def energy(r):
        return electrostatics(r, periodic=True, need_fields=False, **args).energy

    energy_jit = jax.jit(energy)
    forces_jit = jax.jit(jax.value_and_grad(energy))
    result = {"n_atoms": num_atoms, "mode": mode, "n_kvectors": num_k, "dtype": dtype_name}
    for name, fn in (("energy", energy_jit), ("energy_forces", forces_jit)):
        start = time.perf_counter()
        jax.block_until_ready(fn(positions))
        result[f"{name}_compile_s"] = time.perf_counter() - start
        result[f"{name}_ms"] = 1e3 * _median_time(fn, positions, repeats)
    result["backend"] = jax.default_backend()
    result["device"] = str(jax.devices()[0].device_kind)
    return result


def _peak_memory_mb():
    """Peak resident memory of this process (host) or device peak bytes (accelerators)."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(argv):
    """Entry of the per-configuration subprocess: prints one JSON line."""
    num_atoms, mode, repeats, dtype_name = int(argv[0]), argv[1], int(argv[2]), argv[3]
    result = run_one(num_atoms, mode, repeats, dtype_name)
    result["peak_memory_mb"] = _peak_memory_mb()
    print("RESULT " + json.dumps(result), flush=True)


def _unique_path(path: Path, overwrite: bool) -> Path:
    if overwrite or not path.exists():
        return path
    index = 1
    while path.with_name(f"{path.stem}.{index}{path.suffix}").exists():
        index += 1
    return path.with_name(f"{path.stem}.{index}{path.suffix}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/electrostatics_<backend>.json)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    rows = []
    header = f"{'N':>6} {'mode':>8} {'n_k':>7} {'E (ms)':>9} {'E+F (ms)':>9} {'compile E+F (s)':>15} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for num_atoms in args.sizes:
        for mode in args.modes:
            # A fresh process per configuration, so the peak memory belongs to it alone.
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.electrostatics", "--child", str(num_atoms), mode, str(args.repeats), args.dtype],
                capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{num_atoms:>6} {mode:>8} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(lines[-1][len("RESULT "):])
            rows.append(row)
            print(f"{num_atoms:>6} {mode:>8} {row['n_kvectors']:>7} {row['energy_ms']:>9.2f} {row['energy_forces_ms']:>9.2f} "
                  f"{row['energy_forces_compile_s']:>15.2f} {row['peak_memory_mb']:>8.0f}", flush=True)
    backend = rows[0]["backend"] if rows else "unknown"
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "device": rows[0]["device"] if rows else None}
    path = Path(args.output) if args.output else Path(__file__).parent / "results" / f"electrostatics_{backend}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path = _unique_path(path, args.overwrite)
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        main()
