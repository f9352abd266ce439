"""MD throughput (ns/day, µs/atom/step) of polarjax models under jax-md.

Systems: the first frame of ../shared/data/water_rpbe_d3.xyz (64 H2O, 192 atoms, 12.4 Å
box) and its 2×2×2 replica (1,536 atoms). Model: the water config's architecture (NequIP,
cutoff 4.5 Å, 16 channels, l_max 2, 2 layers, avg_num_neighbors 30; sigma 1, dl 2) with
random parameters, variants ``sr`` (short range only) and ``uQiqiu`` (q, u, Q, induced q and
u with the latent Ewald sum). NVE, velocity Verlet, dt = 0.5 fs, skin 1 Å, capacity ×1.25;
``steps_per_call`` steps per jitted call with one recorded frame per call, so the timing is
the integrator (one energy + force evaluation per step, neighbor-list checks and rebuilds).
Columns: list = neighbor-list slots (radius cutoff + skin), edges = the model's packed
in-cutoff edge buffer.
The first call (compilation) is excluded; the median over calls is reported.

Usage:
  python -m benchmarks.md                 # 192 and 1536 atoms, sr and uQiqiu, float32
  python -m benchmarks.md --quick         # fewer steps
  python -m benchmarks.md --sizes 192 --variants uQiqiu --steps-per-call 20 --calls 3
Output: a table and benchmarks/results/md_<backend>.json (never overwritten: an existing
file gets a numbered sibling unless --overwrite).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from benchmarks.electrostatics import _unique_path

WATER = Path(__file__).resolve().parents[2] / "shared" / "data" / "water_rpbe_d3.xyz"
ENCODER = dict(cutoff=4.5, num_channels=16, l_max=2, num_layers=2, num_radial_basis=8, avg_num_neighbors=30.0)


def random_params(model, graph, seed, dtype):
    """Random parameters of the right shapes (``eval_shape`` avoids compiling the init)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), graph)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(seed)
    values = [jnp.asarray((1.0 / np.sqrt(l.shape[-2]) if len(l.shape) >= 2 else 0.1) * rng.normal(size=l.shape), dtype)
              for l in leaves]
    return jax.tree_util.tree_unflatten(treedef, values)


def run_one(num_atoms, variant, steps_per_call, calls, dtype_name, structure_path):
    import ase.io
    import jax
    import numpy as np

    from polarjax import md
    from polarjax.data.batching import batch_structures
    from polarjax.data.structures import Structure
    from polarjax.electrostatics.kgrid import count_kvectors, kgrid_weights
    from polarjax.models import ModelSpec, build

    dtype = np.float64 if dtype_name == "float64" else np.float32
    atoms = ase.io.read(structure_path, index=0)
    system = md.MDSystem.from_atoms(atoms, velocities=False)
    reps = round((num_atoms / system.num_atoms) ** (1 / 3))
    if reps > 1:
        system = system.replicate((reps, reps, reps))
    if system.num_atoms != num_atoms:
        raise ValueError(f"{num_atoms} atoms is not a cubic replica of the {len(atoms)}-atom box")
    spec = ModelSpec(species=(1, 8), encoder="nequip", encoder_kwargs=tuple(sorted(ENCODER.items())), variant=variant)
    model = build(spec)
    small = batch_structures([Structure(atoms.positions, atoms.numbers, atoms.cell[:], True)], {1: 0, 8: 1},
                             ENCODER["cutoff"], dtype=dtype)
    params = random_params(model, small, 0, dtype)
    potential = md.ModelPotential(model, params, ENCODER["cutoff"], system, skin=1.0, dtype=dtype)
    config = md.MDConfig(ensemble="nve", timestep=0.5, temperature=300.0, stride=steps_per_call, frames_per_call=1)
    t0 = time.perf_counter()
    sim = md.Simulation(potential, system, config)
    sim.run(steps_per_call)  # compiles
    jax.block_until_ready(sim.state.position)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sim.run(steps_per_call)
        jax.block_until_ready(sim.state.position)
        times.append(time.perf_counter() - start)
    per_step = float(np.median(times)) / steps_per_call
    kvectors = count_kvectors(kgrid_weights(system.cell, spec.dl)) if variant != "sr" else 0
    return dict(num_atoms=system.num_atoms, variant=variant, dtype=dtype_name, ensemble="nve", timestep_fs=0.5,
                steps_per_call=steps_per_call, calls=calls, seconds_per_step=per_step,
                us_per_atom_step=per_step / system.num_atoms * 1e6,
                ns_per_day=0.5 * 1e-6 / per_step * 86400.0, first_call_s=compile_s,
                neighbor_capacity=md.ModelPotential.capacity(sim.neighbor), model_edges=potential.edge_capacity,
                kvectors=kvectors,
                reallocations=sim.reallocations, call_times_s=times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 1536])
    parser.add_argument("--variants", nargs="+", default=["sr", "uQiqiu"])
    parser.add_argument("--steps-per-call", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke run on a busy machine)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--structure", default=str(WATER))
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/md_<backend>.json)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    backend = jax.default_backend()
    rows = []
    print(f"{'atoms':>6} {'variant':>8} {'ms/step':>10} {'µs/atom/step':>13} {'ns/day':>9} {'first call s':>13} "
          f"{'list':>8} {'edges':>7} {'k-vectors':>10}")
    for size in args.sizes:
        steps = args.steps_per_call or ((10 if size <= 200 else 4) if args.quick else (50 if size <= 200 else 10))
        calls = args.calls or (2 if args.quick else 5)
        for variant in args.variants:
            row = run_one(size, variant, steps, calls, args.dtype, args.structure)
            rows.append(row)
            print(f"{row['num_atoms']:>6} {variant:>8} {1e3 * row['seconds_per_step']:>10.2f} "
                  f"{row['us_per_atom_step']:>13.1f} {row['ns_per_day']:>9.4f} {row['first_call_s']:>13.1f} "
                  f"{row['neighbor_capacity']:>8} {row['model_edges']:>7} {row['kvectors']:>10}", flush=True)
    device = jax.devices()[0]
    meta = dict(backend=backend, device=str(getattr(device, "device_kind", device)), jax=jax.__version__,
                python=platform.python_version(), machine=platform.machine(), processor=platform.processor(),
                cpu_count=__import__("os").cpu_count(), quick=args.quick, dtype=args.dtype,
                encoder=ENCODER, structure=args.structure, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    path = Path(args.output) if args.output else Path(__file__).parent / "results" / f"md_{backend}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path = _unique_path(path, args.overwrite)
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
