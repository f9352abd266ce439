"""MD with jax-md on random-initialised (smooth) polarjax models, float64.

Small systems (12 atoms) and a tiny NeqIP (4 channels, l_max = 1, one layer) keep each jit
compilation to ~10–20 s on a CPU. Energy-drift numbers are printed (``pytest -s``).
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

from polarjax import md
from polarjax.data.batching import batch_structures
from polarjax.data.structures import Structure
from polarjax.models import ModelSpec, build

CUTOFF = 3.0
ENCODER = dict(cutoff=CUTOFF, num_channels=4, l_max=1, num_layers=1, num_radial_basis=4, radial_hidden=(8,),
               readout_hidden=(8,), avg_num_neighbors=4.0)
MASSES = {1: 1.008, 8: 15.999, 11: 22.99, 17: 35.45}


def make_model(variant, species=(1, 8), example=None, seed=0, **spec_kwargs):
    spec = ModelSpec(species=species, encoder="nequip", encoder_kwargs=tuple(sorted(ENCODER.items())),
                     variant=variant, **spec_kwargs)
    model = build(spec)
    graph = batch_structures([example], {z: i for i, z in enumerate(species)}, CUTOFF, dtype=np.float64)
    return model, random_params(model, graph, seed)


def random_params(model, graph, seed):
    """Random float64 parameters of the right shapes (``eval_shape`` avoids compiling the init).

    Matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.1²): a smooth, generic model."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), graph)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(seed)
    values = []
    for leaf in leaves:
        shape = leaf.shape
        scale = 1.0 / np.sqrt(shape[-2]) if len(shape) >= 2 else 0.1
        values.append(jnp.asarray(scale * rng.normal(size=shape), jnp.float64))
    return jax.tree_util.tree_unflatten(treedef, values)


def random_positions(n, extent, seed, min_dist=1.0):
    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n:
        p = rng.uniform(0.0, extent, 3)
        if all(np.linalg.norm(p - q) > min_dist for q in pos):
            pos.append(p)
    return np.array(pos)


def water_like(periodic, seed=0, cell=None, min_dist=1.0):
    numbers = np.array([8, 1, 1] * 4)
    if periodic:
        cell = np.eye(3) * 8.0 if cell is None else np.asarray(cell)
        frac = random_positions(12, 1.0, seed, min_dist=min_dist / 8.0)
        positions = frac @ cell
    else:
        cell = np.zeros((3, 3))
        positions = random_positions(12, 4.0, seed)
    system = md.MDSystem(positions, numbers, cell, periodic, [MASSES[z] for z in numbers])
    return system, Structure(positions, numbers, cell, periodic)


class Recorder:
    def __init__(self):
        self.chunks = []

    def write(self, frames):
        self.chunks.append(frames)

    def __getitem__(self, key):
        return np.concatenate([np.asarray(c[key]) for c in self.chunks])


def drift_per_atom_per_ps(rec, num_atoms):
    t, e = rec["time"], rec["conserved"]
    slope = np.polyfit(t, e, 1)[0]  # eV/fs
    return slope * 1000.0 / num_atoms, np.max(np.abs(e - e[0])) / num_atoms


# ----------------------------------------------------------------------------- NVE


@pytest.mark.parametrize("periodic,variant", [(True, "les"), (False, "uQiqiu")], ids=["periodic-les", "open-uQiqiu"])
def test_nve_energy_conservation(periodic, variant):
    system, structure = water_like(periodic)
    model, params = make_model(variant, example=structure)
    pot = md.ModelPotential(model, params, CUTOFF, system, skin=0.5)
    sim = md.Simulation(pot, system, md.MDConfig(ensemble="nve", temperature=300.0, timestep=0.5, stride=10,
                                                 frames_per_call=20))
    rec = Recorder()
    sim.run(1000, writer=rec)  # 0.5 ps
    drift, max_dev = drift_per_atom_per_ps(rec, system.num_atoms)
    epot_range = np.ptp(rec["energy"]) / system.num_atoms
    print(f"\nNVE {'periodic' if periodic else 'open'} {variant}: drift {drift:.2e} eV/atom/ps, "
          f"max |ΔE| {max_dev:.2e} eV/atom, potential-energy range {epot_range:.2e} eV/atom, "
          f"<T> {rec['temperature'].mean():.0f} K")
    # The potential energy swings by ~1e-2 eV/atom; a correct integrator keeps the total
    # within 1e-4 eV/atom (observed ~1e-6); a wrong force sign drifts by ~1e-2 (see below).
    assert epot_range > 1e-3
    assert abs(drift) < 1e-4
    assert max_dev < 1e-4
    # the list followed the atoms: it holds every pair within the cutoff at the end
    box = None if not periodic else jnp.asarray(pot.box)
    fresh = pot.allocate_neighbors(sim.state.position, box)
    count = jax.jit(pot.count_edges)
    assert int(count(sim.state.position, box, sim.neighbor)) == int(count(sim.state.position, box, fresh))
    assert np.max(np.linalg.norm(rec["positions"][-1] - rec["positions"][0], axis=-1)) > pot.skin  # it had to


def test_wrong_force_sign_violates_the_bound():
    """The bound above is meaningful: flipping the force sign breaks it by orders of magnitude."""
    system, structure = water_like(True)
    model, params = make_model("les", example=structure)
    pot = md.ModelPotential(model, params, CUTOFF, system, skin=0.5)
    true_energy = pot.energy
    pot.energy = lambda *a, **k: -true_energy(*a, **k)  # forces +∇E; frames still report E
    sim = md.Simulation(pot, system, md.MDConfig(ensemble="nve", temperature=300.0, timestep=0.5, stride=10,
                                                 frames_per_call=20))
    rec = Recorder()
    sim.run(1000, writer=rec)
    drift, max_dev = drift_per_atom_per_ps(rec, system.num_atoms)
    print(f"\nwrong sign: drift {drift:.2e} eV/atom/ps, max |ΔE| {max_dev:.2e} eV/atom")
    assert max_dev > 1e-3


class MorseCluster(md.Potential):
    """Toy: all-pairs Morse cluster E = Σ D (1 − e^{−a (r − r0)})² (open, no neighbor list)."""

    def __init__(self, n, depth=0.3, a=1.5, r0=2.0):
        self.num_atoms, self.periodic, self.dtype = n, False, jnp.float64
        self.depth, self.a, self.r0 = depth, a, r0

    def forward(self, R, box=None, neighbor=None, perturbation=None, field=None):
        r = self.cartesian(R, box, perturbation)
        i, j = np.triu_indices(self.num_atoms, 1)
        d = jnp.linalg.norm(r[i] - r[j], axis=-1)
        energy = jnp.sum(self.depth * (1.0 - jnp.exp(-self.a * (d - self.r0))) ** 2)
        q = jnp.zeros(self.num_atoms)
        return dict(energy=energy, total_dipole=jnp.zeros(3), total_charges=q, total_dipoles=jnp.zeros((self.num_atoms, 3)))


@pytest.mark.parametrize("ensemble", ["nvt", "langevin"])
def test_thermostats_reach_the_target_temperature(ensemble):
    """A 13-atom Morse cluster at 300 K: ⟨T⟩ on target; Nosé–Hoover conserves its extended energy."""
    positions = random_positions(13, 4.0, seed=4, min_dist=1.6)
    system = md.MDSystem(positions, np.full(13, 18), np.zeros((3, 3)), False, np.full(13, 39.95))
    config = md.MDConfig(ensemble=ensemble, temperature=300.0, timestep=1.0, stride=10, frames_per_call=500,
                         tau_thermostat=100.0, friction=0.01, seed=1)
    sim = md.Simulation(MorseCluster(13), system, config)
    rec = Recorder()
    sim.run(40000, writer=rec)  # 40 ps
    temperature = rec["temperature"][500:].mean()  # after 5 ps
    print(f"\n{ensemble}: <T> = {temperature:.1f} K (target 300 K)")
    assert temperature == pytest.approx(300.0, rel=0.1)
    if ensemble == "nvt":
        _, max_dev = drift_per_atom_per_ps(rec, 13)
        assert max_dev < 1e-4


# ----------------------------------------------------------------------------- stress / NPT


def test_stress_matches_finite_differences_and_model_triclinic():
    cell = np.array([[8.0, 0.6, 0.3], [0.4, 8.3, -0.2], [0.5, 0.7, 7.9]])  # not lower triangular: rotated
    system, structure = water_like(True, seed=1, cell=cell)
    model, params = make_model("uQ", example=structure)
    pot = md.ModelPotential(model, params, CUTOFF, system, skin=0.5)
    assert not np.allclose(system.rotation, np.eye(3))
    q = system.rotation
    R = jnp.asarray(((system.positions @ q) @ np.linalg.inv(pot.box.T)) % 1.0)
    nbr = pot.allocate_neighbors(R, jnp.asarray(pot.box))
    # one compilation: E(P) at the perturbation P = I + ε, forces and the stress at P = I
    evaluate = jax.jit(lambda R, p, n: (pot.energy(R, None, n, p), -jax.grad(pot.energy)(R, None, n),
                                        pot.stress(R, None, n)))
    eye = jnp.eye(3)
    e0, forces, stress = (np.asarray(x) for x in evaluate(R, eye, nbr))

    graph = batch_structures([structure], {1: 0, 8: 1}, CUTOFF, dtype=np.float64)
    ref = jax.jit(lambda p, g: model.properties(p, g, boundary="periodic", include_e0=False))(params, graph)
    assert float(e0) == pytest.approx(float(ref["energy"][0]), abs=1e-10)
    np.testing.assert_allclose(forces @ q.T, np.asarray(ref["forces"][:12]), atol=1e-9)
    np.testing.assert_allclose(q @ stress @ q.T, np.asarray(ref["stress"][0]), atol=1e-10)

    h = 1e-5
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            plus = float(evaluate(R, eye + eps, nbr)[0])
            minus = float(evaluate(R, eye - eps, nbr)[0])
            fd[a, b] = (plus - minus) / (2 * h) / abs(np.linalg.det(pot.box))
    np.testing.assert_allclose(stress, fd, atol=1e-8)
    assert np.max(np.abs(stress)) > 1e-5


def test_short_npt_run_keeps_box_and_energy_finite():
    system, structure = water_like(True, seed=2, cell=np.eye(3) * 9.0)
    model, params = make_model("les", example=structure)
    pot = md.ModelPotential(model, params, CUTOFF, system, skin=0.5, variable_box=True)
    config = md.MDConfig(ensemble="npt", temperature=300.0, pressure=0.1 * md.GPA, timestep=0.5, stride=10,
                         frames_per_call=20, tau_barostat=100.0, tau_thermostat=50.0)
    sim = md.Simulation(pot, system, config)
    rec = Recorder()
    sim.run(200, writer=rec)
    volumes = np.abs(np.linalg.det(rec["cell"]))
    drift, max_dev = drift_per_atom_per_ps(rec, system.num_atoms)
    print(f"\nNPT: V {volumes[0]:.1f} → {volumes[-1]:.1f} Å³, extended-energy max |ΔH| {max_dev:.2e} eV/atom, "
          f"reallocations {sim.reallocations}")
    assert np.all(np.isfinite(rec["cell"])) and np.all(np.isfinite(rec["energy"]))
    assert np.ptp(volumes) > 1e-3  # the box moves
    assert max_dev < 1e-2


# ----------------------------------------------------------------------------- overflow


def test_neighbor_overflow_recovery_reproduces_large_capacity_run():
    # a dilute start (no pair closer than 2.2 Å): the number of pairs within the cutoff grows
    system, structure = water_like(True, seed=3, min_dist=2.2)
    model, params = make_model("sr", example=structure)
    config = md.MDConfig(ensemble="nve", temperature=2000.0, timestep=0.5, stride=5, frames_per_call=10)
    runs = {}
    for name, multiplier in (("tight", 1.0), ("large", 4.0)):
        pot = md.ModelPotential(model, params, CUTOFF, system, skin=0.0, capacity_multiplier=multiplier)
        sim = md.Simulation(pot, system, config)
        rec = Recorder()
        sim.run(300, writer=rec)
        runs[name] = (sim, rec)
    tight, large = runs["tight"], runs["large"]
    print(f"\noverflow: {tight[0].reallocations} reallocations, capacity "
          f"{md.ModelPotential.capacity(tight[0].neighbor)} vs {md.ModelPotential.capacity(large[0].neighbor)}")
    assert tight[0].reallocations >= 1
    assert large[0].reallocations == 0
    np.testing.assert_array_equal(tight[1]["step"], large[1]["step"])
    np.testing.assert_allclose(tight[1]["positions"], large[1]["positions"], atol=1e-9)
    np.testing.assert_allclose(tight[1]["energy"], large[1]["energy"], atol=1e-9)


# ----------------------------------------------------------------------------- field MD


def ion_pair(periodic):
    numbers = np.array([11, 17])
    positions = np.array([[4.0, 4.0, 4.0], [6.2, 4.3, 4.1]])
    cell = np.eye(3) * 10.0 if periodic else np.zeros((3, 3))
    system = md.MDSystem(positions, numbers, cell, periodic, [MASSES[z] for z in numbers])
    return system, Structure(positions, numbers, cell, periodic)


def _verlet_com(accel_fn, dt, steps):
    """COM displacement of velocity Verlet from rest under a position-independent a(t)."""
    x, v, out = np.zeros(3), np.zeros(3), [np.zeros(3)]
    for n in range(steps):
        a0, a1 = accel_fn(n * dt), accel_fn((n + 1) * dt)
        x = x + v * dt + 0.5 * a0 * dt**2
        v = v + 0.5 * (a0 + a1) * dt
        out.append(x)
    return np.array(out)


@pytest.mark.parametrize("periodic,zstar_every,wavenumber", [
    (False, 1, 0.0), (False, 1, 500.0),
    pytest.param(True, 1, 0.0, marks=pytest.mark.slow), pytest.param(True, 3, 0.0, marks=pytest.mark.slow)],
    ids=["open-static", "open-sinusoid", "periodic-zstar1", "periodic-zstar3"])
def test_field_accelerates_the_centre_of_mass(periodic, zstar_every, wavenumber):
    """Fixed charges (+0.8, −0.3): Z* = q I, so the COM feels (Σ q) E(t) / M exactly."""
    system, structure = ion_pair(periodic)
    charges = (0.8, -0.3)
    model, params = make_model("les", species=(11, 17), example=structure, baseline_charges=charges,
                               head_kwargs=(("charge_scale", 0.0),))
    field = md.ExternalField([0.02, -0.01, 0.05], wavenumber=wavenumber, zstar_every=zstar_every)
    pot = md.ModelPotential(model, params, CUTOFF, system, skin=0.5)
    config = md.MDConfig(ensemble="nve", timestep=0.5, temperature=0.0, stride=10, frames_per_call=10,
                         initial_velocities="zero", outputs=("zstar",), field=field)
    sim = md.Simulation(pot, system, config)
    rec = Recorder()
    sim.run(100, writer=rec)
    np.testing.assert_allclose(rec["zstar"][-1], np.array(charges)[:, None, None] * np.eye(3), atol=1e-12)
    masses = system.masses * md.AMU
    com0 = masses @ system.positions / masses.sum()
    positions = rec["positions"]
    if periodic:  # undo wrapping relative to the start
        d = positions - system.positions
        positions = system.positions + d - np.round(d @ np.linalg.inv(system.cell)) @ system.cell
    com = np.einsum("i,tia->ta", masses, positions) / masses.sum()
    accel = lambda t: sum(charges) * np.asarray(field.value(t)) / masses.sum()
    expected = _verlet_com(accel, 0.5, 100)[rec["step"]]
    np.testing.assert_allclose(com - com0, expected, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(rec["field"], np.stack([field.value(t) for t in rec["time"]]), atol=1e-15)
    assert np.max(np.abs(com - com0)) > 1e-4


# ----------------------------------------------------------------------------- restart, I/O, failure


class CollapsingPair(md.Potential):
    """Toy: E = c d + √(d − 0.8), d = |r12|: the pair collapses and E is NaN below 0.8 Å."""

    def __init__(self, c=1.0):
        self.c, self.num_atoms, self.periodic, self.dtype = c, 2, False, jnp.float64

    def forward(self, R, box=None, neighbor=None, perturbation=None, field=None):
        r = self.cartesian(R, box, perturbation)
        d = jnp.linalg.norm(r[0] - r[1])
        q = jnp.asarray([0.5, -0.5])
        return dict(energy=self.c * d + jnp.sqrt(d - 0.8), total_dipole=q @ r, total_charges=q,
                    total_dipoles=jnp.zeros((2, 3)))


def test_non_finite_energy_stops_with_last_good_frame(tmp_path):
    system = md.MDSystem([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [1, 1], np.zeros((3, 3)), False, [1.0, 1.0])
    config = md.MDConfig(ensemble="nve", timestep=0.5, temperature=0.0, stride=5, frames_per_call=50,
                         initial_velocities="zero")
    sim = md.Simulation(CollapsingPair(), system, config)
    path = tmp_path / "crash.xyz"
    with pytest.raises(md.MDError, match="non-finite"):
        sim.run(2000, writer=md.TrajectoryWriter(path), restart=tmp_path / "crash.npz")
    traj = md.read_trajectory(path)
    assert np.all(np.isfinite(traj["positions"])) and np.all(np.isfinite(traj["energy"]))
    assert traj["step"][-1] == sim.step  # the last finite state is the last frame
    assert np.all(np.isfinite(np.asarray(sim.state.position)))
    assert (tmp_path / "crash.npz").exists()


class HarmonicDiatomic(md.Potential):
    """Toy: E = ½ k (|r12| − r0)², charges ±q."""

    def __init__(self, k, r0, q):
        self.k, self.r0, self.q, self.num_atoms, self.periodic, self.dtype = k, r0, q, 2, False, jnp.float64

    def forward(self, R, box=None, neighbor=None, perturbation=None, field=None):
        r = self.cartesian(R, box, perturbation)
        charges = jnp.asarray([self.q, -self.q])
        return dict(energy=0.5 * self.k * (jnp.linalg.norm(r[0] - r[1]) - self.r0) ** 2, total_dipole=charges @ r,
                    total_charges=charges, total_dipoles=jnp.zeros((2, 3)))


def test_restart_continues_identically(tmp_path):
    system = md.MDSystem([[0.0, 0.0, 0.0], [1.3, 0.2, 0.0]], [6, 8], np.zeros((3, 3)), False, [12.0, 16.0])
    pot = HarmonicDiatomic(20.0, 1.2, 0.4)
    config = md.MDConfig(ensemble="langevin", timestep=0.5, temperature=300.0, stride=5, frames_per_call=4,
                         friction=0.05, seed=3)
    whole = md.Simulation(pot, system, config)
    rec = Recorder()
    whole.run(80, writer=rec)
    path, restart = tmp_path / "traj.xyz", tmp_path / "traj.npz"
    first = md.Simulation(pot, system, config)
    first.run(40, writer=md.TrajectoryWriter(path), restart=restart)
    first.run(20, writer=md.TrajectoryWriter(path, resume_step=60))  # frames beyond the restart point
    second = md.Simulation(pot, system, config).load_restart(restart)
    assert second.step == 40
    second.run(40, writer=md.TrajectoryWriter(path, resume_step=second.step))
    traj = md.read_trajectory(path)
    np.testing.assert_array_equal(traj["step"], rec["step"])
    np.testing.assert_allclose(traj["positions"], rec["positions"], atol=1e-8)
    np.testing.assert_allclose(traj["velocities"], rec["velocities"], atol=1e-8)


def _dense_periodic_box(n=200, length=12.0, seed=5):
    numbers = np.array(([8, 1, 1] * n)[:n])
    positions = random_positions(n, length, seed, min_dist=1.0)
    cell = np.eye(3) * length
    system = md.MDSystem(positions, numbers, cell, True, [MASSES[z] for z in numbers])
    return system, Structure(positions, numbers, cell, True)


def test_large_periodic_box_forces_match_the_model():
    """200 atoms (40,000 candidate pairs): the MD potential's energy and forces equal the model's
    on a vesin-built graph. jax-md's own periodic displacement, vmapped over more than 2¹⁴
    float64 pairs, is miscompiled by jax/jaxlib 0.10.2 on CPU (jax-ml/jax#39103) and gave a
    wrong neighbor list here before polarjax built the list with its own displacement."""
    system, structure = _dense_periodic_box()
    model, params = make_model("les", example=structure, seed=3)
    potential = md.ModelPotential(model, params, CUTOFF, system)
    sim = md.Simulation(potential, system, md.MDConfig(ensemble="nve", timestep=0.5, stride=1, frames_per_call=1,
                                                       initial_velocities="zero"))
    frame = sim.current_frame()
    graph = batch_structures([structure], {1: 0, 8: 1}, CUTOFF, dtype=np.float64)
    reference = jax.jit(lambda p, g: model.properties(p, g, boundary="periodic", include_e0=False))(params, graph)
    n = system.num_atoms
    assert int(np.sum(np.asarray(graph.edge_mask))) > 2000
    np.testing.assert_allclose(np.asarray(frame["forces"]).reshape(n, 3), np.asarray(reference["forces"])[:n], atol=1e-9)
    np.testing.assert_allclose(float(np.asarray(frame["energy"]).ravel()[0]),
                               float(reference["energy"][0]) + potential.energy_offset, rtol=1e-10, atol=1e-9)


def test_wrong_neighbor_list_is_refused(monkeypatch):
    """A jax-md list that disagrees with the independent host list stops the run."""
    system, structure = water_like(True, cell=np.eye(3) * 9.0)
    model, params = make_model("sr", example=structure)
    real = md.host_neighbor_list
    monkeypatch.setattr(md, "host_neighbor_list", lambda *a: tuple(x[:-6] for x in real(*a)))
    with pytest.raises(md.MDError, match="neighbor list holds"):
        md.ModelPotential(model, params, CUTOFF, system).allocate_neighbors(
            jnp.asarray(system.positions @ np.linalg.inv(system.cell)))


def test_supercell_is_extensive_for_large_systems():
    """The model on a 2×2×2 replica (1,600 atoms, >16,384 edges in float64) gives 8× the energy
    and the replicated forces of the 200-atom cell: periodic images are consistent, and the
    large-array paths of the model are not hit by CPU miscompilations like jax-ml/jax#39103."""
    system, structure = _dense_periodic_box()
    model, params = make_model("les", example=structure, seed=3)
    big = system.replicate((2, 2, 2))
    graphs = [batch_structures([s], {1: 0, 8: 1}, CUTOFF, dtype=np.float64)
              for s in (structure, Structure(big.positions, big.atomic_numbers, big.cell, True))]
    assert int(np.sum(np.asarray(graphs[1].edge_mask))) > 16384
    props = jax.jit(lambda p, g: model.properties(p, g, boundary="periodic", include_e0=False))
    small, large = props(params, graphs[0]), props(params, graphs[1])
    for key in ("energy_sr", "energy_lr"):
        np.testing.assert_allclose(float(large[key][0]), 8 * float(small[key][0]), rtol=1e-9, err_msg=key)
    np.testing.assert_allclose(np.asarray(large["forces"])[:big.num_atoms],
                               np.tile(np.asarray(small["forces"])[:system.num_atoms], (8, 1)), atol=1e-9)
