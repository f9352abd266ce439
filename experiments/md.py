"""Molecular dynamics with a trained polarjax model (jax-md).

  python -m experiments.md --run runs/water --structure ../shared/data/water_rpbe_d3.xyz \
      --ensemble nvt --temperature 300 --timestep 0.5 --steps 20000 --output traj.xyz \
      [--stride 10] [--outputs dipole_rate,charges] [--field 0,0,0.01 [--field-wavenumber 1600]]

Ensembles: nve, nvt (Nosé–Hoover chain), langevin, npt (isotropic Nosé–Hoover, --pressure
in bar). Units: Å, fs, K, eV, field V/Å. The trajectory is extended XYZ (velocities in
Å/fs; see polarjax.md.TrajectoryWriter); ``<output>.restart.npz`` is written after every
chunk and ``--restart`` continues from it up to ``--steps`` in total. Per-frame extras
(--outputs): charges, dipoles, zstar, total_dipole, dipole_rate (for IR), polarizability
(for Raman). A progress bar shows the simulated ns/day (compilation excluded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _vector(text):
    values = [float(x) for x in text.replace(" ", "").split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError("expected three comma-separated numbers, e.g. 0,0,0.01")
    return values


def _ints(text):
    return [int(x) for x in text.split(",")]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of a trained model")
    p.add_argument("--which", default="best", choices=("best", "latest"), help="checkpoint to load")
    p.add_argument("--structure", required=True, help="structure file (anything ase.io.read reads)")
    p.add_argument("--index", type=int, default=0, help="frame of the structure file (default 0)")
    p.add_argument("--replicate", type=_ints, default=None, help="supercell, e.g. 2,2,2")
    p.add_argument("--ensemble", default="nvt", help="nve | nvt | langevin | npt")
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--pressure", type=float, default=1.0, help="bar (npt)")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--steps", type=int, required=True, help="total number of steps")
    p.add_argument("--tau-t", type=float, default=100.0, help="thermostat time constant (fs)")
    p.add_argument("--tau-p", type=float, default=1000.0, help="barostat time constant (fs)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction (1/fs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--velocities", default="auto", choices=("auto", "maxwell", "zero", "velocities"),
                   help="initial velocities: from the file if present (auto), Maxwell–Boltzmann, zero")
    p.add_argument("--field", type=_vector, default=None, help="uniform field E0 (V/Å), e.g. 0,0,0.01")
    p.add_argument("--field-wavenumber", type=float, default=0.0, help="E(t) = E0 cos(2π c ν̃ t + φ), ν̃ in cm⁻¹")
    p.add_argument("--field-phase", type=float, default=0.0, help="φ (rad)")
    p.add_argument("--polarize", action="store_true", help="the field also polarizes the induced dipoles")
    p.add_argument("--zstar-every", type=int, default=1, help="recompute Z* every k steps (periodic)")
    p.add_argument("--stride", type=int, default=10, help="steps between frames")
    p.add_argument("--frames-per-call", type=int, default=10, help="frames per jitted call (host I/O interval)")
    p.add_argument("--outputs", default="", help="comma list of: charges,dipoles,zstar,total_dipole,dipole_rate,"
                                                   "polarizability")
    p.add_argument("--skin", type=float, default=1.0, help="neighbor-list skin (Å)")
    p.add_argument("--capacity", type=float, default=1.25, help="neighbor-list capacity multiplier")
    p.add_argument("--float64", action="store_true", help="run in float64 (default: the model's training dtype)")
    p.add_argument("--output", required=True, help="trajectory (extended XYZ)")
    p.add_argument("--restart", action="store_true", help="continue from <output>.restart.npz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trajectory instead of refusing")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import jax

    if args.float64:
        jax.config.update("jax_enable_x64", True)
    import ase.io
    import jax.numpy as jnp
    import numpy as np

    from polarjax import md
    from polarjax.training.inference import load_model

    loaded = load_model(args.run, which=args.which)
    dtype = np.float64 if args.float64 else loaded.dtype
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, loaded.params)
    atoms = ase.io.read(args.structure, index=args.index)
    system = md.MDSystem.from_atoms(atoms)
    if args.replicate:
        system = system.replicate(args.replicate)
    ensemble = md.canonical_ensemble(args.ensemble)
    field = None
    if args.field is not None:
        field = md.ExternalField(args.field, args.field_wavenumber, args.field_phase, args.polarize, args.zstar_every)
    outputs = tuple(x for x in args.outputs.split(",") if x)
    config = md.MDConfig(ensemble=ensemble, timestep=args.timestep, temperature=args.temperature,
                         pressure=args.pressure * md.BAR, tau_thermostat=args.tau_t, tau_barostat=args.tau_p,
                         friction=args.friction, seed=args.seed, stride=args.stride,
                         frames_per_call=args.frames_per_call, outputs=outputs, field=field,
                         initial_velocities=args.velocities)
    potential = md.ModelPotential(loaded.model, params, loaded.cutoff, system, skin=args.skin,
                                  capacity_multiplier=args.capacity, variable_box=ensemble == "npt_nose_hoover",
                                  dtype=dtype)
    sim = md.Simulation(potential, system, config)
    output = Path(args.output)
    restart = output.with_name(output.name + ".restart.npz")
    if output.exists() and not (args.restart or args.overwrite):
        raise SystemExit(f"{output} exists: pass --restart to continue it or --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.restart and restart.exists():
        sim.load_restart(restart)
        print(f"restarting from {restart} at step {sim.step}")
        resume = sim.step
    else:
        resume = None
    info = dict(ensemble=ensemble, timestep=args.timestep, target_temperature=args.temperature,
                model=f"{loaded.spec.encoder}/{loaded.spec.variant}", run=str(Path(args.run).resolve()))
    writer = md.TrajectoryWriter(output, info=info, resume_step=resume)
    remaining = args.steps - sim.step
    if remaining <= 0:
        print(f"nothing to do: already at step {sim.step} >= {args.steps}")
        return 0
    remaining -= remaining % args.stride
    print(f"{system.num_atoms} atoms, {'periodic' if system.periodic else 'open'}, {ensemble}, "
          f"dt = {args.timestep} fs, {remaining} steps, model {info['model']} ({np.dtype(dtype).name}), "
          f"neighbor capacity {md.ModelPotential.capacity(sim.neighbor)}")
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=remaining, unit="step", dynamic_ncols=True, file=sys.stdout)

    start = sim.step

    def progress(info):
        if bar is not None:
            bar.update(info["step"] - start - bar.n)
            bar.set_postfix(ns_day=f"{info['ns_per_day']:.3f}", T=f"{info['temperature']:.0f}K",
                            E=f"{info['energy']:.3f}")

    try:
        sim.run(remaining, writer=writer, restart=restart, progress=progress)
    except md.MDError as error:
        if bar is not None:
            bar.close()
        print(f"MD stopped: {error}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    timing = sim.timing
    if timing["steps"]:
        rate = timing["steps"] * args.timestep * 1e-6 / timing["seconds"] * 86400
        per = timing["seconds"] / timing["steps"] / system.num_atoms * 1e6
        print(f"{rate:.4f} ns/day, {per:.2f} µs/atom/step (compilation excluded); "
              f"{sim.reallocations} neighbor-list reallocations")
    print(f"wrote {output} (and {restart})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
