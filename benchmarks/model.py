"""Benchmark of the full model: jitted energy + forces throughput and compile time.

For each encoder × variant (default: all four encoders × {sr, les, uQiqiu}, anisotropic alpha
for uQiqiu), each system and each batch size, it builds the padded batch with the training
``BatchBuilder`` (float32), initialises the model, compiles ``Model.properties`` (energy and
forces, no stress) with the static boundary of the system, and times it (median of repeats
after a warm-up call). It reports atoms/s and the long-range overhead: time / time of ``sr``
(same encoder, system and batch size).

Systems:
  water  the first B frames of ../shared/data/water_rpbe_d3.xyz (192 atoms, periodic
         12.4 Å box); batch size 1 is the first frame
  nacl   the first B 17-atom frames (Na9Cl8+ clusters, open) of the bundled nacl_clusters.xyz
Cutoff 4.5 Å, sigma 1 Å, dl 2 Å; moderate hyperparameters (ENCODER_KWARGS: 16 channels,
l_max 2, 2 layers, 8 radial functions).

Usage:
  python -m benchmarks.model                       # full matrix, table + JSON
  python -m benchmarks.model --quick               # a subset (batch 1, sr/les, two encoders)
  python -m benchmarks.model --encoders mace --variants les --systems water --batch-sizes 8
Output: a table on stdout (plain, and Markdown with --markdown) and
benchmarks/results/model_<backend>.json (never overwritten: an existing file gets a
numbered sibling unless --overwrite).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.electrostatics import _unique_path

ROOT = Path(__file__).resolve().parents[1]
WATER_PATH = ROOT.parent / "shared" / "data" / "water_rpbe_d3.xyz"
CUTOFF = 4.5

ENCODERS = ("nequip", "mace", "allegro", "cace")
VARIANTS = ("sr", "les", "uQiqiu")
SYSTEMS = ("water", "nacl")
BATCH_SIZES = (1, 8)

_COMMON = dict(cutoff=CUTOFF, num_channels=16, l_max=2, num_layers=2, num_radial_basis=8)
ENCODER_KWARGS = {
    "nequip": dict(_COMMON, parity=False, radial_hidden=(32,), readout_hidden=(16,), avg_num_neighbors=20.0),
    "mace": dict(_COMMON, correlation=3, radial_hidden=(32,), readout_hidden=(16,), avg_num_neighbors=20.0),
    "allegro": dict(_COMMON, latent_dim=32, mlp_hidden=(32,), energy_hidden=(32,), avg_num_neighbors=20.0),
    "cace": dict(_COMMON, message_passing=True, readout_hidden=(32,), avg_num_neighbors=20.0),
}
QUICK = dict(encoders=("nequip", "allegro"), variants=("sr", "les"), systems=("water", "nacl"), batch_sizes=(1,),
             repeats=3)


#: Atoms per frame of each system (the NaCl file also holds 16-atom Na8Cl8+ clusters; they are skipped).
SYSTEM_ATOMS = {"water": 192, "nacl": 17}


def load_frames(system: str, count: int, water_path: Path):
    """The first ``count`` frames of a system with SYSTEM_ATOMS atoms, and its boundary ('periodic' or 'open')."""
    from polarjax.data.bundled import bundled_path
    from polarjax.training.dataset import read_frames

    path = water_path if system == "water" else bundled_path("nacl_clusters.xyz")
    frames, _ = read_frames(path, index=f":{4 * count}", require=())
    frames = [f for f in frames if f.num_atoms == SYSTEM_ATOMS[system]][:count]
    if len(frames) < count:
        raise ValueError(f"{path}: only {len(frames)} frames with {SYSTEM_ATOMS[system]} atoms among the first "
                         f"{4 * count}, {count} requested")
    boundary = "periodic" if all(f.periodic for f in frames) else "open" if not any(f.periodic for f in frames) else "mixed"
    return frames, boundary


def _median_time(fn, args, repeats):
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def run_one(system, batch_size, encoder, variant, frames, boundary, repeats, params_cache):
    """Compile and time one configuration; returns a result dict."""
    import jax
    import numpy as np

    from polarjax.models import build
    from polarjax.training.batches import BatchBuilder
    from polarjax.training.dataset import species_of

    species = tuple(species_of(frames))
    model = build(dict(species=species, encoder=encoder, encoder_kwargs=ENCODER_KWARGS[encoder], variant=variant,
                       anisotropic_alpha=(variant == "uQiqiu")))
    builder = BatchBuilder(model.spec, CUTOFF, dtype=np.float32)
    graph, _ = builder.build(frames)
    graph = jax.device_put(graph)
    key = (system, encoder, variant)
    if key not in params_cache:  # parameters do not depend on the batch size
        params_cache[key] = model.init(jax.random.PRNGKey(0), graph)
    params = params_cache[key]
    num_params = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))

    def energy_forces(params, graph):
        out = model.properties(params, graph, boundary=boundary, stress=False)
        return out["energy"], out["forces"]

    start = time.perf_counter()
    compiled = jax.jit(energy_forces).lower(params, graph).compile()
    compile_s = time.perf_counter() - start
    energy, forces = jax.block_until_ready(compiled(params, graph))  # warm-up
    if not (np.all(np.isfinite(energy)) and np.all(np.isfinite(forces))):
        raise FloatingPointError(f"non-finite output for {key}")
    seconds = _median_time(compiled, (params, graph), repeats)
    num_atoms = int(np.sum(np.asarray(graph.node_mask)))
    shape = tuple(int(s) if not isinstance(s, tuple) else list(s) for s in builder.padding_for(frames))
    return {
        "system": system, "boundary": boundary, "batch_size": batch_size, "n_atoms": num_atoms,
        "n_edges": int(np.sum(np.asarray(graph.edge_mask))), "padded_shape": shape,
        "encoder": encoder, "variant": variant, "anisotropic_alpha": variant == "uQiqiu", "n_params": num_params,
        "compile_s": compile_s, "ms_per_call": 1e3 * seconds, "atoms_per_s": num_atoms / seconds,
    }


def _add_overheads(rows):
    base = {(r["system"], r["batch_size"], r["encoder"]): r["ms_per_call"] for r in rows if r["variant"] == "sr"}
    for r in rows:
        sr = base.get((r["system"], r["batch_size"], r["encoder"]))
        r["ratio_to_sr"] = None if sr is None else r["ms_per_call"] / sr


def _fmt_ratio(value):
    return "—" if value is None else f"{value:.2f}"


def format_table(rows, markdown=False):
    columns = ("system", "B", "atoms", "encoder", "variant", "compile (s)", "ms/call", "atoms/s", "× sr")
    lines = []
    values = [(r["system"], str(r["batch_size"]), str(r["n_atoms"]), r["encoder"], r["variant"], f"{r['compile_s']:.1f}",
               f"{r['ms_per_call']:.1f}", f"{r['atoms_per_s']:.0f}", _fmt_ratio(r.get("ratio_to_sr"))) for r in rows]
    if markdown:
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" if i < 2 or i in (3, 4) else "---:" for i in range(len(columns))) + "|")
        lines += ["| " + " | ".join(v) + " |" for v in values]
    else:
        widths = [max(len(c), *(len(v[i]) for v in values)) if values else len(c) for i, c in enumerate(columns)]
        lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        lines.append("-" * len(lines[0]))
        lines += ["  ".join(x.rjust(w) for x, w in zip(v, widths)) for v in values]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=None)
    parser.add_argument("--variants", nargs="+", choices=("sr", "les", "u", "uQ", "uiq", "uiu", "uiqiu", "uQiqiu"),
                        default=None)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per configuration (median; default 5)")
    parser.add_argument("--quick", action="store_true", help="a subset: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--water", type=Path, default=WATER_PATH, help=f"water file (default {WATER_PATH})")
    parser.add_argument("--backend", default="cpu", help="JAX platform (default cpu)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/model_<backend>.json)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    defaults = QUICK if args.quick else dict(encoders=ENCODERS, variants=VARIANTS, systems=SYSTEMS,
                                             batch_sizes=BATCH_SIZES, repeats=5)
    encoders = args.encoders or defaults["encoders"]
    variants = list(args.variants or defaults["variants"])
    systems = args.systems or defaults["systems"]
    batch_sizes = args.batch_sizes or defaults["batch_sizes"]
    repeats = args.repeats or defaults["repeats"]
    if "sr" in variants:  # sr first: the overhead ratios need it
        variants.remove("sr")
        variants.insert(0, "sr")

    os.environ.setdefault("JAX_PLATFORMS", args.backend)
    import jax

    jax.config.update("jax_platforms", args.backend)
    if "water" in systems and not args.water.exists():
        print(f"skipping water: {args.water} not found (use --water)", file=sys.stderr)
        systems = [s for s in systems if s != "water"]

    backend = jax.default_backend()
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "dtype": "float32",
            "cutoff": CUTOFF, "repeats": repeats, "encoder_kwargs": {k: ENCODER_KWARGS[k] for k in encoders},
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    path = Path(args.output) if args.output else Path(__file__).parent / "results" / f"model_{backend}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path = _unique_path(path, args.overwrite)

    def save(rows, complete):
        _add_overheads(rows)
        path.write_text(json.dumps({"meta": dict(meta, complete=complete), "results": rows}, indent=2))

    rows, params_cache = [], {}
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), float32, cutoff {CUTOFF} Å, "
          f"repeats {repeats}", flush=True)
    for system in systems:
        for batch_size in batch_sizes:
            frames, boundary = load_frames(system, batch_size, args.water)
            for encoder in encoders:
                for variant in variants:
                    try:
                        row = run_one(system, batch_size, encoder, variant, frames, boundary, repeats, params_cache)
                    except Exception as error:  # report and go on with the other configurations
                        print(f"{system} B={batch_size} {encoder} {variant}: FAILED {type(error).__name__}: {error}",
                              flush=True)
                        continue
                    rows.append(row)
                    save(rows, complete=False)  # partial results survive an interrupted run
                    print(f"{system:>6} B={batch_size} {encoder:>8} {variant:>7}: compile {row['compile_s']:6.1f} s, "
                          f"{row['ms_per_call']:9.1f} ms/call, {row['atoms_per_s']:9.0f} atoms/s", flush=True)
    save(rows, complete=True)
    print()
    print(format_table(rows))
    if args.markdown:
        print()
        print(format_table(rows, markdown=True))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
