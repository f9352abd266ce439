"""Molecular dynamics with jax-md: NVE, NVT (Nosé–Hoover, Langevin), isotropic NPT, and MD
under a uniform external electric field.

Units: energy eV, length Å, time fs, mass amu on input, charge e, field V/Å, temperature K.
jax-md is unit-agnostic, so masses are converted to eV·fs²/Å² (``AMU = 103.6427`` per amu:
then F/m is in Å/fs² and p/m in Å/fs) and temperatures to kT in eV (``KB = 8.617333e-5``).

Pieces
------
* :class:`MDSystem`: one structure on the host (positions, numbers, cell, periodic, masses).
  Periodic cells are brought into the orientation jax-md needs (``box`` upper triangular,
  i.e. ``cell`` rows lower triangular) by a fixed rotation ``Q``; every input vector
  (positions, field) is rotated in and every output (positions, velocities, forces, dipoles,
  Z*, polarizability, cell) is rotated back, so callers never see it.
* :class:`ModelPotential`: a polarjax model as jax-md functions,
  ``energy_fn(R, box=..., neighbor=..., perturbation=..., field=...)``. Periodic systems use
  ``space.periodic_general`` with fractional coordinates (triclinic), open systems
  ``space.free``. The jax-md neighbor list (``partition.neighbor_list``, format Sparse or
  OrderedSparse, a capacity margin ``capacity_multiplier``) is converted in-jit into the
  model's senders / receivers / image shifts (shift = −round(s_recv − s_send) of the
  fractional displacement, the minimum image). The list radius is ``cutoff + skin``; it is
  rebuilt when 2·(largest displacement since the last build + 1.5 steps of motion) plus the
  shrinkage of the box since then exceeds ``skin`` (so no pair can enter the cutoff unseen).
  The pairs within the cutoff are packed into the model's own edge buffer
  (``edge_capacity`` = their count at the start × ``capacity_multiplier``), so the encoder
  never works on the skin shell (≈ (1 + skin/cutoff)³ more edges).
* :class:`Simulation`: the runners. The inner loop is ``lax.scan`` over frames of
  ``lax.fori_loop`` over ``stride`` steps, one jitted call per chunk of ``frames_per_call``
  frames; the host only writes the chunk's frames and a restart file.

Electrostatics and the box (NPT without recompiling)
----------------------------------------------------
The k-grid *shape* (bounds M1, M2, M3) is static; the k-vector *set* inside it is data.
For a fixed box (NVE/NVT) the weights are selected once on the host in float64. Under NPT
they are re-selected in-jit from the current box at every force evaluation with
``kgrid_weights_jax(cell, bounds, dl)`` inside bounds fixed at the start from the initial
cell enlarged by ``kgrid_margin`` (lengths ×1.05 by default, ≈ +16 % volume). The k-set
is therefore exactly the one the model would use for that box, and box changes never
recompile. Only if the box outgrows the bounds (a flag raised in-jit) is the chunk redone
with larger bounds (one recompilation) — the same recovery as a neighbor-list overflow.

Safety
------
* An overflow of the neighbor list (or jax-md's cell list), of the model's edge buffer, or a
  box that grew past the k-grid bounds is flagged in-jit and checked after every chunk;
  the buffer / bounds are enlarged (one recompilation) and the chunk is redone from its
  start state, so a trajectory is never silently wrong. The redo is deterministic
  (Langevin's key is part of the state). A box that shrinks below twice the list radius
  (minimum image) stops the run with :class:`MDError`.
* A non-finite force, position or energy stops the run with :class:`MDError`; the last
  finite state is kept (``Simulation.state``), its frame is written to the trajectory and a
  restart file is saved.

MD under an external field
--------------------------
F_i = −∂E/∂r_i + Z*_iᵀ E_ext with the Born effective charges Z*_{i,αβ} = ∂M_α/∂r_iβ of
:mod:`polarjax.observables` (M from the total sources q + q_ind, u + u_ind; for periodic
cells the Berry-phase form, independent of how atoms are wrapped). Open systems: the field
force is the exact gradient of E_ext·M, taken in the same backward pass as the energy
gradient (no Jacobian is formed). Periodic systems: the periodic Z* is not the gradient of
a scalar, so it is formed by ``born_effective_charges`` (9 reverse passes) at every force
evaluation (``zstar_every=1``), or every k steps and held fixed in between
(``zstar_every=k``; Z* then lags by up to k steps). ``polarize=True`` also passes the
field to the model, polarizing the induced dipoles (u_ind = α (E_loc + E_ext)). The field
may be time dependent, E(t) = E_0 cos(ω t + φ) (:class:`ExternalField`). The reported
``energy`` is the model energy E without the coupling to the field; with a field nothing is
conserved.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition, simulate, space

from polarjax import observables
from polarjax.data.graph import Graph
from polarjax.data.structures import species_indices, species_lookup, species_table_from_elements
from polarjax.data.neighbors import neighbor_list as host_neighbor_list
from polarjax.electrostatics.kgrid import kgrid_bounds, kgrid_weights, kgrid_weights_jax

#: amu in eV·fs²/Å² (1 amu·Å²/fs² = 103.6427 eV).
AMU = 1.66053906660e-27 * 1e10 / 1.602176634e-19
#: Boltzmann constant, eV/K.
KB = 8.617333262e-5
#: Speed of light, cm/fs.
C_CM_PER_FS = 2.99792458e-5
#: 1 bar and 1 GPa in eV/Å³.
BAR = 1e5 / 1.602176634e-19 * 1e-30
GPA = 1e9 / 1.602176634e-19 * 1e-30

ENSEMBLES = ("nve", "nvt_nose_hoover", "nvt_langevin", "npt_nose_hoover")
_ALIASES = {"nvt": "nvt_nose_hoover", "nh": "nvt_nose_hoover", "nose_hoover": "nvt_nose_hoover",
            "langevin": "nvt_langevin", "npt": "npt_nose_hoover"}
#: Optional per-frame outputs (the base frame always has positions, velocities, forces, energies).
OPTIONAL_OUTPUTS = ("charges", "dipoles", "zstar", "total_dipole", "dipole_rate", "polarizability")

# Error bits reported by a chunk (besides jax-md's own neighbor-list error code).
ERR_NONFINITE = 1
ERR_KGRID = 2
ERR_MIN_IMAGE = 4
ERR_EDGES = 8


@contextlib.contextmanager
def _quiet_jax_md():
    """Silence two harmless warnings raised while jax-md is traced (its float64 sums in
    float32 mode and int64 → int32 scatters in its neighbor lists under x64)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64 requested in")
        warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")
        yield


class MDError(RuntimeError):
    """The run cannot continue (non-finite energy/forces, unrecoverable overflow, bad input)."""


def canonical_ensemble(name: str) -> str:
    name = name.lower().replace("-", "_")
    name = _ALIASES.get(name, name)
    if name not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {name!r}; choose one of {ENSEMBLES} (aliases {sorted(_ALIASES)})")
    return name


# ----------------------------------------------------------------------------- the system


def standard_orientation(cell: np.ndarray) -> np.ndarray:
    """Orthogonal Q (row-vector convention, x_std = x @ Q) with ``cell @ Q`` lower triangular
    and a positive diagonal (jax-md's ``box = (cell @ Q).T`` upper triangular). Identity when
    ``cell`` already is."""
    cell = np.asarray(cell, np.float64)
    if np.allclose(np.triu(cell, 1), 0.0) and np.all(np.diag(cell) > 0):
        return np.eye(3)
    q, r = np.linalg.qr(cell.T)  # cellᵀ = q r
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs[None, :]


@dataclasses.dataclass
class MDSystem:
    """One structure for MD (host numpy, the caller's frame).

    positions [n, 3] Å; atomic_numbers [n]; cell [3, 3] rows (zeros when open); periodic;
    masses [n] amu; velocities [n, 3] Å/fs or None.
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    periodic: bool
    masses: np.ndarray
    velocities: Optional[np.ndarray] = None

    def __post_init__(self):
        self.positions = np.asarray(self.positions, np.float64).reshape(-1, 3)
        self.atomic_numbers = np.asarray(self.atomic_numbers, np.int32)
        self.cell = np.asarray(self.cell, np.float64).reshape(3, 3)
        self.periodic = bool(self.periodic)
        self.masses = np.asarray(self.masses, np.float64).reshape(-1)
        if self.velocities is not None:
            self.velocities = np.asarray(self.velocities, np.float64).reshape(-1, 3)
        n = len(self.positions)
        if len(self.atomic_numbers) != n or len(self.masses) != n:
            raise ValueError("positions, atomic_numbers and masses must have the same length")
        if not np.all(np.isfinite(self.positions)):
            raise ValueError("positions contain NaN or inf")
        if self.periodic and abs(np.linalg.det(self.cell)) < 1e-8:
            raise ValueError("a periodic system needs a non-singular cell")
        if np.any(self.masses <= 0):
            raise ValueError("masses must be positive")

    @property
    def num_atoms(self) -> int:
        return len(self.positions)

    @property
    def rotation(self) -> np.ndarray:
        return standard_orientation(self.cell) if self.periodic else np.eye(3)

    @classmethod
    def from_atoms(cls, atoms, velocities: bool = True) -> "MDSystem":
        """From an ``ase.Atoms`` (fully periodic or open; velocities converted from ASE units)."""
        import ase.units

        pbc = np.asarray(atoms.get_pbc(), bool)
        if pbc.any() and not pbc.all():
            raise ValueError(f"mixed periodicity pbc={pbc.tolist()} is not supported for MD")
        vel = None
        if velocities and atoms.get_momenta() is not None and np.any(atoms.get_momenta()):
            vel = atoms.get_velocities() * ase.units.fs  # ASE velocity units → Å/fs
        return cls(atoms.get_positions(), atoms.get_atomic_numbers(), np.asarray(atoms.get_cell()[:]) if pbc.all()
                   else np.zeros((3, 3)), bool(pbc.all()), atoms.get_masses(), vel)

    def replicate(self, reps: Sequence[int]) -> "MDSystem":
        """A supercell ``reps = (na, nb, nc)`` (periodic only)."""
        if not self.periodic:
            raise ValueError("only periodic systems can be replicated")
        shifts = np.array([[i, j, k] for i in range(reps[0]) for j in range(reps[1]) for k in range(reps[2])], float)
        offsets = shifts @ self.cell
        pos = (self.positions[None] + offsets[:, None]).reshape(-1, 3)
        tile = lambda x: np.tile(x, (len(shifts),) + (1,) * (x.ndim - 1))
        return MDSystem(pos, tile(self.atomic_numbers), self.cell * np.asarray(reps, float)[:, None], True,
                        tile(self.masses), None if self.velocities is None else tile(self.velocities))


# ----------------------------------------------------------------------------- the field


@dataclasses.dataclass(frozen=True)
class ExternalField:
    """A uniform field E(t) = amplitude · cos(2π c ν̃ t + phase) (V/Å, constant when ν̃ = 0).

    Attributes:
      amplitude: [3] V/Å in the caller's frame.
      wavenumber: ν̃ in cm⁻¹ (0: static field).
      phase: φ in radians.
      polarize: also pass the field to the model (polarizes the induced dipoles).
      zstar_every: recompute Z* every this many steps (1: exact every step, no Jacobian).
    """

    amplitude: tuple = (0.0, 0.0, 0.0)
    wavenumber: float = 0.0
    phase: float = 0.0
    polarize: bool = False
    zstar_every: int = 1

    def __post_init__(self):
        object.__setattr__(self, "amplitude", tuple(float(x) for x in np.asarray(self.amplitude).reshape(3)))
        if int(self.zstar_every) < 1:
            raise ValueError("zstar_every must be >= 1")

    def value(self, t, rotation=None):
        """E(t) [3] (jnp), optionally rotated into the internal frame (x @ Q)."""
        amp = jnp.asarray(self.amplitude)
        if rotation is not None:
            amp = amp @ jnp.asarray(rotation, amp.dtype)
        if self.wavenumber == 0.0:
            return amp * jnp.cos(jnp.asarray(self.phase, amp.dtype)) if self.phase else amp
        omega = 2.0 * math.pi * C_CM_PER_FS * self.wavenumber
        return amp * jnp.cos(omega * t + self.phase)


# ----------------------------------------------------------------------------- potentials


class Potential(abc.ABC):
    """What :class:`Simulation` needs from a potential (jax-md conventions).

    ``R`` is fractional when ``periodic`` (jax-md ``periodic_general``), Cartesian otherwise;
    ``box`` is jax-md's (columns are cell vectors). Subclasses implement ``forward``.
    """

    periodic: bool = False
    box: Optional[np.ndarray] = None
    num_atoms: int = 0
    uses_neighbors: bool = False
    skin: float = 0.0
    list_radius: float = 0.0
    energy_offset: float = 0.0

    def space(self):
        if self.periodic:
            return space.periodic_general(jnp.asarray(self.box, getattr(self, "dtype", None)), fractional_coordinates=True)
        return space.free()

    def cartesian(self, R, box=None, perturbation=None):
        """Cartesian positions; gradients w.r.t. fractional R come out in Cartesian units."""
        if self.periodic:
            box = self.box_or_default(box, R.dtype)
            r = space.transform(box, R)
        else:
            r = R
        if perturbation is not None:
            r = space.raw_transform(perturbation, r)
        return r

    def box_or_default(self, box, dtype):
        return jnp.asarray(self.box, dtype) if box is None else box

    @abc.abstractmethod
    def forward(self, R, box=None, neighbor=None, perturbation=None, field=None) -> dict:
        """dict with energy [] (eV), total_dipole [3] (e·Å) and per-atom outputs (subclasses)."""

    # -- derived -----------------------------------------------------------------------
    def energy(self, R, box=None, neighbor=None, perturbation=None, field=None):
        return self.forward(R, box, neighbor, perturbation, field)["energy"]

    def dipole(self, R, box=None, neighbor=None, field=None):
        return self.forward(R, box, neighbor, None, field)["total_dipole"]

    def zstar(self, R, box=None, neighbor=None, field=None):
        """Born effective charges [n, 3, 3], Z_{i,αβ} = ∂M_α/∂r_iβ (internal frame)."""
        jac = jax.jacrev(lambda x: self.dipole(x, box, neighbor, field))(R)  # [3, n, 3]
        return jnp.transpose(jac, (1, 0, 2))

    def polarizability(self, R, box=None, neighbor=None, field=None):
        """∂M/∂E_ext [3, 3] at fixed positions."""
        f0 = jnp.zeros(3, R.dtype) if field is None else field
        return jax.jacfwd(lambda e: self.dipole(R, box, neighbor, e))(f0)

    def check(self, R, box):
        """In-jit error bits (k-grid bounds, minimum image) for a traced box; 0 when fine."""
        return jnp.zeros((), jnp.int32)

    def edge_error(self, R, box, neighbor):
        """In-jit ERR_EDGES when the model's edge buffer is too small; 0 when fine."""
        return jnp.zeros((), jnp.int32)

    # neighbor lists (override when uses_neighbors)
    def allocate_neighbors(self, R, box=None, extra_capacity: int = 0):
        return None

    def update_neighbors(self, R, neighbor, box=None):
        return neighbor


def _total_sources(out, graph):
    """Total charges q + q_ind [N] and dipoles u + u_ind [N, 3] (zero on padding atoms)."""
    q = jnp.where(graph.node_mask, out["charges"] + out["induced_charges"], 0.0)
    u = jnp.where(graph.node_mask[:, None], out["dipoles"] + out["induced_dipoles"], 0.0)
    return q, u


def _min_height(cell_rows):
    """Smallest distance between opposite faces of a cell (rows are vectors)."""
    volume = jnp.abs(jnp.linalg.det(cell_rows))
    areas = jnp.stack([jnp.linalg.norm(jnp.cross(cell_rows[(i + 1) % 3], cell_rows[(i + 2) % 3])) for i in range(3)])
    return volume / jnp.max(areas)


class ModelPotential(Potential):
    """A polarjax :class:`~polarjax.models.Model` as a jax-md potential for one structure.

    Args:
      model, params: the model and its parameters.
      cutoff: the encoder cutoff (Å).
      system: the :class:`MDSystem` (its rotation is applied here).
      skin: neighbor-list skin (Å); the list radius is ``cutoff + skin``.
      capacity_multiplier: jax-md's capacity margin of the edge buffer.
      neighbor_format: 'sparse' (full list) or 'ordered_sparse' (half list, doubled here).
      variable_box: the box changes (NPT): k-weights re-selected in-jit within fixed bounds.
      kgrid_margin: length factor of the static k-grid bounds for a variable box.
      dtype: float dtype of the simulation (that of ``params`` by default).
      response_config: :class:`polarjax.observables.ResponseConfig` of the Born charges
        (default: no ε∞ scaling, no ASR correction).
    """

    def __init__(self, model, params, cutoff: float, system: MDSystem, *, skin: float = 1.0,
                 capacity_multiplier: float = 1.25, neighbor_format: str = "sparse", variable_box: bool = False,
                 kgrid_margin: float = 1.05, dtype=None, disable_cell_list: Optional[bool] = None,
                 energy_offset: Optional[float] = None, response_config: Optional[Any] = None):
        self.model, self.params = model, params
        self.response_config = observables.ResponseConfig(split=False) if response_config is None else response_config
        self.spec = model.spec
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        if self.skin < 0:
            raise ValueError("skin must be >= 0")
        self.list_radius = self.cutoff + self.skin
        self.periodic = system.periodic
        self.num_atoms = system.num_atoms
        self.capacity_multiplier = float(capacity_multiplier)
        self.uses_neighbors = True
        if dtype is None:
            leaves = [x for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
            dtype = leaves[0].dtype if leaves else jnp.float32
        self.dtype = jnp.dtype(dtype)
        fmt = neighbor_format.lower().replace("-", "_")
        formats = {"sparse": partition.Sparse, "ordered_sparse": partition.OrderedSparse}
        if fmt not in formats:
            raise ValueError(f"neighbor_format must be 'sparse' or 'ordered_sparse', got {neighbor_format!r}")
        self.format = formats[fmt]
        lookup = species_lookup(species_table_from_elements(self.spec.species))
        self.species = species_indices(system.atomic_numbers, lookup).astype(np.int32)
        self.atomic_numbers = system.atomic_numbers
        if energy_offset is None:
            e0 = self.spec.atomic_energies
            energy_offset = float(np.sum(np.asarray(e0, np.float64)[self.species])) if e0 is not None else 0.0
        self.energy_offset = float(energy_offset)
        self.variable_box = bool(variable_box)
        self.rotation = system.rotation
        self.long_range = self.spec.flags["long_range"]
        if self.periodic:
            cell = system.cell @ self.rotation
            self.box = cell.T.copy()
            height = float(_min_height(jnp.asarray(cell)))
            if 2.0 * self.list_radius >= height:
                raise MDError(
                    f"the cell is too small for minimum-image neighbor lists: the list radius cutoff + skin = "
                    f"{self.list_radius:.2f} Å must be below half the smallest cell height ({height / 2:.2f} Å). "
                    "Replicate the cell (MDSystem.replicate) or reduce the skin.")
            own = kgrid_bounds(cell, self.spec.dl)
            if self.variable_box:
                self.kbounds = tuple(int(b) for b in kgrid_bounds(cell * float(kgrid_margin), self.spec.dl))
                self.kbounds = tuple(max(a, b) for a, b in zip(self.kbounds, own))
                self.kweights = None
            else:
                self.kbounds = tuple(own)
                self.kweights = np.asarray(kgrid_weights(cell, self.spec.dl, self.kbounds))
        else:
            self.box = None
            self.kbounds = (1, 1, 1)
            self.kweights = np.zeros((2, 3, 3))
        self._disable_cell_list = (not self.periodic) if disable_cell_list is None else bool(disable_cell_list)
        self.edge_capacity: Optional[int] = None  # set at the first allocation
        self._make_neighbor_fns()

    # -- neighbor lists ------------------------------------------------------------------
    def _list_displacement(self):
        """Displacement for building the neighbor list.

        Periodic: minimum image in fractional coordinates mapped by the box with the three
        components written out. jax-md's ``periodic_general`` displacement (``box @ ds``) is,
        vmapped over the N² candidate pairs and jitted, miscompiled by the CPU backend of
        jax/jaxlib 0.10.2 for more than 2¹⁵ (float32) or 2¹⁴ (float64) pairs
        (jax-ml/jax#39103: rows past that are wrong), which scrambled the lists of periodic
        systems above ~180 atoms. The explicit form is not turned into that dot.
        """
        if not self.periodic:
            return space.free()[0]
        default_box = jnp.asarray(self.box, self.dtype)

        def displacement(Ra, Rb, box=None, **unused):
            b = default_box if box is None else box
            ds = Ra - Rb
            ds = ds - jnp.round(ds)
            return jnp.stack([b[i, 0] * ds[0] + b[i, 1] * ds[1] + b[i, 2] * ds[2] for i in range(3)])

        return displacement

    def _make_neighbor_fns(self):
        displacement = self._list_displacement()
        box = jnp.asarray(self.box) if self.periodic else jnp.ones(3)  # box only sizes the cell list
        self.neighbor_fns = partition.neighbor_list(
            displacement, box, self.list_radius, dr_threshold=0.0, capacity_multiplier=self.capacity_multiplier,
            disable_cell_list=self._disable_cell_list, fractional_coordinates=self.periodic, format=self.format)

    def allocate_neighbors(self, R, box=None, extra_capacity: int = 0):
        kwargs = {} if (box is None or not self.periodic) else {"box": jnp.asarray(box)}
        with _quiet_jax_md():
            neighbor = self.neighbor_fns.allocate(R, extra_capacity=int(extra_capacity), **kwargs)
        if neighbor.cell_size is not None:
            # jax-md stores the cell size as an array in a static (metadata) field; a float keeps
            # pytree comparisons in jit caches well defined
            neighbor = dataclasses.replace(neighbor, cell_size=float(neighbor.cell_size))
        if getattr(self, "_count_edges_jit", None) is None:
            self._count_edges_jit = jax.jit(self.count_edges)
        count = int(self._count_edges_jit(R, None if box is None else jnp.asarray(box), neighbor))
        self.check_edge_count(R, box, count)
        if self.edge_capacity is None:
            self.edge_capacity = max(16, int(math.ceil(count * self.capacity_multiplier)))
        return neighbor

    def check_edge_count(self, R, box, count: int):
        """Compare the in-cutoff edges of a freshly built jax-md list with an independent host
        list (vesin); a mismatch means a wrong list and stops the run (never a silent error)."""
        cell = np.zeros((3, 3))
        if self.periodic:
            cell = np.asarray(self.box if box is None else box, np.float64).T
        positions = np.asarray(self.cartesian(jnp.asarray(R), None if box is None else jnp.asarray(box)), np.float64)
        senders, _, _ = host_neighbor_list(positions, cell, self.periodic, self.cutoff)
        expected = len(senders)
        if abs(count - expected) > max(2, 1e-4 * expected):  # pairs at the cutoff may differ by rounding
            raise MDError(
                f"the jax-md neighbor list holds {count} directed pairs within {self.cutoff} Å but there are "
                f"{expected} (independent host list): the list is wrong. Known cause: the CPU backend of "
                f"jax/jaxlib 0.10.2 (jax-ml/jax#39103); this JAX is {jax.__version__}.")

    def update_neighbors(self, R, neighbor, box=None):
        """Rebuild the list at R (jax-md, jittable; ``box`` for a variable cell)."""
        kwargs = {} if (box is None or not self.periodic) else {"box": box}
        return neighbor.update(R, **kwargs)

    def _list_edges(self, R, box, neighbor, perturbation=None):
        """All list slots: receivers, senders, image shifts, in-cutoff mask, positions, cell."""
        n, dtype = self.num_atoms, R.dtype
        r = self.cartesian(R, box, perturbation)
        if self.periodic:
            box = self.box_or_default(box, dtype)
            cell = box.T
            if perturbation is not None:
                cell = space.raw_transform(perturbation, cell)
        else:
            cell = jnp.zeros((3, 3), dtype)
        positions = jnp.concatenate([r, jnp.zeros((1, 3), dtype)])
        idx = neighbor.idx
        recv, send = idx[0], idx[1]
        if self.format is partition.OrderedSparse:
            recv, send = jnp.concatenate([idx[0], idx[1]]), jnp.concatenate([idx[1], idx[0]])
        recv = jnp.minimum(recv, n).astype(jnp.int32)
        send = jnp.minimum(send, n).astype(jnp.int32)
        valid = (recv < n) & (send < n)
        if self.periodic:
            s = jnp.concatenate([jax.lax.stop_gradient(R), jnp.zeros((1, 3), dtype)])
            shifts = -jnp.floor(s[recv] - s[send] + 0.5)
            shifts = jnp.where(valid[:, None], shifts, 0.0)
        else:
            shifts = jnp.zeros((recv.shape[0], 3), dtype)
        vec = jax.lax.stop_gradient(positions[recv] - positions[send] + shifts @ cell)
        inside = valid & (jnp.sum(vec * vec, axis=-1) < self.cutoff**2)
        return recv, send, shifts, inside, positions, cell

    def count_edges(self, R, box=None, neighbor=None):
        """Number of directed edges within the cutoff."""
        return jnp.sum(self._list_edges(R, box, neighbor)[3])

    def edge_error(self, R, box, neighbor):
        """ERR_EDGES when the in-cutoff edges do not fit the model's edge buffer."""
        return jnp.where(self.count_edges(R, box, neighbor) > self.edge_capacity, ERR_EDGES, 0)

    def grow_edges(self, count: int):
        """A larger edge buffer after an ERR_EDGES overflow (invalidates compiled chunks)."""
        self.edge_capacity = max(int(math.ceil(count * self.capacity_multiplier)),
                                 int(math.ceil(1.2 * self.edge_capacity)))

    @staticmethod
    def capacity(neighbor) -> int:
        return int(neighbor.idx.shape[-1])

    # -- graph -----------------------------------------------------------------------------
    def graph(self, R, box=None, neighbor=None, perturbation=None):
        """The padded one-structure Graph (n real atoms + 1 padding atom, one graph).

        The in-cutoff edges of the neighbor list are packed into ``edge_capacity`` slots
        (the list also holds the skin shell, which would cost the encoder ~(1 + skin/rc)³
        more); overflowing edges are dropped here and flagged by :meth:`edge_error`.
        """
        n, dtype = self.num_atoms, R.dtype
        recv, send, shifts, inside, positions, cell = self._list_edges(R, box, neighbor, perturbation)
        if self.edge_capacity is not None:
            size = self.edge_capacity
            slot = jnp.where(inside, jnp.cumsum(inside) - 1, size)
            recv = jnp.full((size,), n, jnp.int32).at[slot].set(recv, mode="drop")
            send = jnp.full((size,), n, jnp.int32).at[slot].set(send, mode="drop")
            shifts = jnp.zeros((size, 3), dtype).at[slot].set(shifts, mode="drop")
            edge_mask = jnp.arange(size) < jnp.sum(inside)
        else:
            edge_mask = inside
        if self.periodic:
            if self.variable_box:
                kw = kgrid_weights_jax(jax.lax.stop_gradient(cell), self.kbounds, self.spec.dl)
            else:
                kw = jnp.asarray(self.kweights, dtype)
        else:
            kw = jnp.asarray(self.kweights, dtype)
        node_mask = jnp.arange(n + 1) < n
        return Graph(
            positions=positions,
            species=jnp.asarray(np.concatenate([self.species, [0]]), jnp.int32),
            atomic_numbers=jnp.asarray(np.concatenate([self.atomic_numbers, [0]]), jnp.int32),
            node_mask=node_mask,
            graph_index=jnp.zeros(n + 1, jnp.int32),
            senders=send, receivers=recv, shifts=shifts, edge_mask=edge_mask,
            cell=cell[None], periodic=jnp.asarray([self.periodic]), graph_mask=jnp.asarray([True]),
            n_atoms=jnp.asarray([n], jnp.int32), kweights=kw[None],
            graph_atoms=jnp.arange(n, dtype=jnp.int32)[None],
        )

    def _boundary(self):
        return "periodic" if self.periodic else "open"

    def _apply(self, graph, positions, field):
        ext = None if field is None else jnp.asarray(field, positions.dtype)[None]
        return self.model.apply(self.params, graph, positions, graph.cell, ext, boundary=self._boundary(),
                                include_e0=False)

    def forward(self, R, box=None, neighbor=None, perturbation=None, field=None) -> dict:
        graph = self.graph(R, box, neighbor, perturbation)
        out = self._apply(graph, graph.positions, field)
        n = self.num_atoms
        q, u = _total_sources(out, graph)
        result = {k: v[:n] for k, v in out.items() if k != "terms" and jnp.ndim(v) >= 1 and v.shape[0] == n + 1}
        result["energy"] = out["energy"][0]
        result["total_charges"] = q[:n]
        result["total_dipoles"] = u[:n]
        result["total_dipole"] = observables.polarization(graph.positions, q, u, observables.layout_of(graph),
                                                          boundary=self._boundary())[0]
        return result

    def zstar(self, R, box=None, neighbor=None, field=None):
        """Born effective charges [n, 3, 3] from :func:`polarjax.observables.born_effective_charges`
        (Berry-phase referenced for periodic cells, so independent of how atoms are wrapped)."""
        return self.response(R, box, neighbor, field)["bec"]

    def response(self, R, box=None, neighbor=None, field=None) -> dict:
        """bec [n, 3, 3] and polarization [3] (e·Å; P·V for periodic) at fixed neighbor list."""
        graph = self.graph(jax.lax.stop_gradient(R), box, neighbor)
        r0 = self.cartesian(R, box)
        positions = jnp.concatenate([r0, jnp.zeros((1, 3), R.dtype)])

        def sources(r):
            return _total_sources(self._apply(graph, r, field), graph)

        out = observables.born_effective_charges(sources, positions, observables.layout_of(graph),
                                                 boundary=self._boundary(), config=self.response_config)
        return {"bec": out["bec"][: self.num_atoms], "polarization": out["polarization"][0]}

    def polarizability(self, R, box=None, neighbor=None, field=None):
        """System polarizability ∂M/∂E_ext [3, 3] (e·Å²/V) at fixed positions."""
        graph = self.graph(R, box, neighbor)
        ext = None if field is None else jnp.asarray(field, R.dtype)[None]
        return observables.system_polarizability(self.model, self.params, graph, ext, self._boundary())[0]

    def check(self, R, box):
        if not (self.periodic and self.variable_box):
            return jnp.zeros((), jnp.int32)
        cell = box.T
        own = jnp.maximum(1.0, jnp.floor(jnp.linalg.norm(cell, axis=1) / self.spec.dl))
        kgrid_bad = jnp.any(own > jnp.asarray(self.kbounds, cell.dtype))
        image_bad = 2.0 * self.list_radius >= _min_height(cell)
        return jnp.where(kgrid_bad, ERR_KGRID, 0) | jnp.where(image_bad, ERR_MIN_IMAGE, 0)

    def grow_kgrid(self, cell_rows):
        """Larger static bounds for a box that outgrew them (NPT); invalidates compiled chunks."""
        need = kgrid_bounds(np.asarray(cell_rows) * 1.05, self.spec.dl)
        self.kbounds = tuple(max(a, int(b)) for a, b in zip(self.kbounds, need))

    # -- convenience: stress ---------------------------------------------------------------
    def stress(self, R, box=None, neighbor=None):
        """(1/V) ∂E/∂ε (eV/Å³, the sign of Model.properties; jax-md's ``quantity.stress`` is its
        negative), from the ``perturbation`` argument."""
        box = self.box_or_default(box, R.dtype)
        eye = jnp.eye(3, dtype=R.dtype)
        grad = jax.grad(lambda eps: self.energy(R, box, neighbor, eye + eps))(jnp.zeros((3, 3), R.dtype))
        return grad / jnp.abs(jnp.linalg.det(box))


# ----------------------------------------------------------------------------- simulation


@dataclasses.dataclass
class MDConfig:
    """Integrator and I/O settings.

    ensemble: 'nve', 'nvt_nose_hoover' ('nvt'), 'nvt_langevin' ('langevin'), 'npt_nose_hoover' ('npt').
    timestep: fs. temperature: K (initial velocities and thermostat target).
    pressure: eV/Å³ (NPT; use ``BAR`` / ``GPA``). tau_thermostat, tau_barostat: fs.
    friction: Langevin γ in 1/fs. chain_length: Nosé–Hoover chain length.
    stride: steps between recorded frames. frames_per_call: frames per jitted call (host I/O).
    outputs: subset of OPTIONAL_OUTPUTS recorded per frame.
    field: an :class:`ExternalField` or None.
    max_reallocations: give up after this many overflow recoveries in a row.
    """

    ensemble: str = "nve"
    timestep: float = 0.5
    temperature: float = 300.0
    pressure: float = 0.0
    tau_thermostat: float = 100.0
    tau_barostat: float = 1000.0
    friction: float = 0.01
    chain_length: int = 3
    seed: int = 0
    stride: int = 10
    frames_per_call: int = 10
    outputs: tuple = ()
    field: Optional[ExternalField] = None
    initial_velocities: str = "auto"  # 'auto' (from the system if present), 'maxwell', 'zero'
    max_reallocations: int = 8

    def __post_init__(self):
        self.ensemble = canonical_ensemble(self.ensemble)
        self.outputs = tuple(self.outputs)
        unknown = set(self.outputs) - set(OPTIONAL_OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OPTIONAL_OUTPUTS}")
        if self.timestep <= 0 or self.stride < 1 or self.frames_per_call < 1:
            raise ValueError("timestep must be > 0, stride and frames_per_call >= 1")
        if self.ensemble != "nve" and self.temperature <= 0:
            raise ValueError("a thermostat needs temperature > 0")


@dataclasses.dataclass
class _Aux:
    """Loop bookkeeping carried with the jax-md state (a pytree)."""

    step: Any
    neighbor_box: Any
    zstar: Any
    error: Any
    good_state: Any
    good_step: Any


jax.tree_util.register_pytree_node(
    _Aux, lambda a: ((a.step, a.neighbor_box, a.zstar, a.error, a.good_state, a.good_step), None),
    lambda _, c: _Aux(*c))


def _tree_where(pred, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


class Simulation:
    """An MD run of one structure with a :class:`Potential`.

    Usage::

        sim = Simulation(potential, system, MDConfig(ensemble="nvt", temperature=300, timestep=0.5))
        sim.run(10_000, writer=TrajectoryWriter("traj.xyz"), restart="traj.restart.npz")

    The state lives in ``sim.state`` (jax-md), ``sim.neighbor``, ``sim.step``.
    """

    def __init__(self, potential: Potential, system: MDSystem, config: MDConfig):
        self.potential = potential
        self.system = system
        self.config = config
        self.dtype = getattr(potential, "dtype", jnp.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32))
        self.rotation = system.rotation
        self.ensemble = config.ensemble
        self.kT = KB * config.temperature
        self.dt = float(config.timestep)
        self.masses = jnp.asarray(system.masses * AMU, self.dtype)
        self.field = config.field
        if self.ensemble == "npt_nose_hoover" and not potential.periodic:
            raise MDError("NPT needs a periodic system")
        if self.ensemble == "npt_nose_hoover" and getattr(potential, "variable_box", True) is False:
            raise MDError("NPT changes the box: build the ModelPotential with variable_box=True "
                          "(k-vectors re-selected in-jit for every box)")
        self.reallocations = 0
        self.recompilations = 0
        self._chunks = {}
        self._build_simulator()
        self._initialise()

    # -- energy with the field ----------------------------------------------------------
    def _energy_fn(self):
        pot, field_cfg = self.potential, self.field

        def energy_fn(R, box=None, neighbor=None, perturbation=None, field=None, zstar=None, **unused):
            if field is None:
                return pot.energy(R, box, neighbor, perturbation, None)
            model_field = field if field_cfg.polarize else None
            if zstar is None and not pot.periodic:
                # open: Z*ᵀE = ∂(E·M)/∂r exactly, one backward pass, no Jacobian
                out = pot.forward(R, box, neighbor, perturbation, model_field)
                return out["energy"] - jnp.dot(field, out["total_dipole"])
            if zstar is None:
                # periodic: the Berry-phase Z* is not a gradient; form it at these positions
                zstar = pot.zstar(jax.lax.stop_gradient(R), box, neighbor, model_field)
            energy = pot.energy(R, box, neighbor, perturbation, model_field)
            r = pot.cartesian(R, box, perturbation)
            return energy - jnp.einsum("a,iab,ib->", field, jax.lax.stop_gradient(zstar), r)

        return energy_fn

    def _build_simulator(self):
        cfg = self.config
        self.displacement, self.shift = self.potential.space()
        energy_fn = self._energy_fn()
        self.energy_fn = energy_fn
        dt, kT = self.dt, self.kT
        nhc = dict(chain_length=cfg.chain_length, chain_steps=2, sy_steps=3)
        if self.ensemble == "nve":
            init, apply = simulate.nve(energy_fn, self.shift, dt)
            self._init = lambda key, R, **kw: init(key, R, kT, mass=self.masses, **kw)
        elif self.ensemble == "nvt_nose_hoover":
            init, apply = simulate.nvt_nose_hoover(energy_fn, self.shift, dt, kT, tau=cfg.tau_thermostat, **nhc)
            self._init = lambda key, R, **kw: init(key, R, mass=self.masses, **kw)
        elif self.ensemble == "nvt_langevin":
            init, apply = simulate.nvt_langevin(energy_fn, self.shift, dt, kT, gamma=cfg.friction)
            self._init = lambda key, R, **kw: init(key, R, mass=self.masses, **kw)
        else:
            init, apply = simulate.npt_nose_hoover(
                energy_fn, self.shift, dt, cfg.pressure, kT,
                barostat_kwargs=dict(tau=cfg.tau_barostat, **nhc), thermostat_kwargs=dict(tau=cfg.tau_thermostat, **nhc))
            box0 = jnp.asarray(self.potential.box, self.dtype)
            self._init = lambda key, R, **kw: init(key, R, box0, mass=self.masses, **kw)
        self._apply = apply

    def _box_of(self, state):
        if self.ensemble == "npt_nose_hoover":
            return simulate.npt_box(state)
        return None if not self.potential.periodic else jnp.asarray(self.potential.box, self.dtype)

    def _initialise(self):
        sys, pot, cfg = self.system, self.potential, self.config
        r = sys.positions @ self.rotation
        if pot.periodic:
            R = r @ np.linalg.inv(np.asarray(pot.box).T)
            R = R - np.floor(R)
        else:
            R = r
        R = jnp.asarray(R, self.dtype)
        box = self._box_of_initial()
        self.neighbor = pot.allocate_neighbors(R, box)
        if self.neighbor is not None and bool(self.neighbor.did_buffer_overflow):
            raise MDError("the neighbor list overflowed at allocation")
        field0 = self._field_at(0.0)
        kwargs = self._force_kwargs(self.neighbor, field0, self._initial_zstar(R, box, field0))
        key = jax.random.PRNGKey(cfg.seed)
        mode = cfg.initial_velocities
        momenta = None
        if mode == "zero" or (mode == "auto" and cfg.ensemble == "nve" and cfg.temperature <= 0 and sys.velocities is None):
            momenta = jnp.zeros_like(R)
        elif mode in ("auto", "velocities") and sys.velocities is not None:
            momenta = jnp.asarray(sys.velocities @ self.rotation, self.dtype) * self.masses[:, None]
        elif mode not in ("auto", "maxwell", "velocities"):
            raise ValueError(f"initial_velocities must be 'auto', 'maxwell', 'velocities' or 'zero', got {mode!r}")
        with _quiet_jax_md():
            self.state = jax.jit(lambda k, R, p, kw: self._init(k, R, momenta=p, **kw))(key, R, momenta, kwargs)
        self.step = 0
        self._zstar0 = kwargs.get("zstar")

    def _box_of_initial(self):
        return None if not self.potential.periodic else jnp.asarray(self.potential.box, self.dtype)

    def _field_at(self, t):
        if self.field is None:
            return None
        return self.field.value(jnp.asarray(t, self.dtype), self.rotation).astype(self.dtype)

    def _zstar_mode(self):
        return self.field is not None and self.field.zstar_every > 1

    def _initial_zstar(self, R, box, field):
        if not self._zstar_mode():
            return None
        model_field = field if self.field.polarize else None
        return jax.jit(lambda R, nbr: self.potential.zstar(R, box, nbr, model_field))(R, self.neighbor)

    def _force_kwargs(self, neighbor, field, zstar):
        kwargs = {}
        if neighbor is not None:
            kwargs["neighbor"] = neighbor
        if field is not None:
            kwargs["field"] = field
            if zstar is not None:
                kwargs["zstar"] = zstar
        return kwargs

    # -- one chunk -------------------------------------------------------------------------
    def _frame(self, state, neighbor, step):
        """Per-frame outputs in the internal frame (jnp)."""
        pot, outputs = self.potential, self.config.outputs
        box = self._box_of(state)
        R = state.position
        velocity = state.momentum / state.mass
        t = step * self.dt
        field = self._field_at(t)
        model_field = field if (field is not None and self.field.polarize) else None
        need_rate = "dipole_rate" in outputs
        fwd = lambda x: pot.forward(x, box, neighbor, None, model_field)
        rate_by_jvp = need_rate and not pot.periodic
        if rate_by_jvp:  # open: Ṁ = Σ Z*_i v_i = (∂M/∂r)·v in one forward-mode pass
            out, tangent = jax.jvp(fwd, (R,), (velocity,))
        else:
            out, tangent = fwd(R), None
        energy = out["energy"]
        kinetic = 0.5 * jnp.sum(state.momentum**2 / state.mass)
        frame = dict(positions=pot.cartesian(R, box), velocities=velocity, forces=state.force, energy=energy,
                     kinetic_energy=kinetic, conserved=energy + kinetic + self._extended_terms(state), step=step)
        if box is not None:
            frame["box"] = box
        if "charges" in outputs:
            frame["charges"] = out["total_charges"]
        if "dipoles" in outputs:
            frame["dipoles"] = out["total_dipoles"]
        if "total_dipole" in outputs:
            frame["total_dipole"] = out["total_dipole"]
        zstar = None
        if "zstar" in outputs or (need_rate and not rate_by_jvp):
            zstar = pot.zstar(R, box, neighbor, model_field)
        if "zstar" in outputs:
            frame["zstar"] = zstar
        if need_rate:
            frame["dipole_rate"] = tangent["total_dipole"] if rate_by_jvp else jnp.einsum("iab,ib->a", zstar, velocity)
        if "polarizability" in outputs:
            frame["polarizability"] = pot.polarizability(R, box, neighbor, model_field)
        if field is not None:
            frame["field"] = field
        return frame

    def _extended_terms(self, state):
        """Thermostat / barostat energies of the Nosé–Hoover extended systems (0 otherwise)."""
        kT = self.kT
        if self.ensemble == "nvt_nose_hoover":
            c = state.chain
            dof = state.position.size
            e = c.momentum[0] ** 2 / (2 * c.mass[0]) + dof * kT * c.position[0]
            return e + jnp.sum(c.momentum[1:] ** 2 / (2 * c.mass[1:]) + kT * c.position[1:])
        if self.ensemble == "npt_nose_hoover":
            c = state.thermostat
            dof = state.position.size
            e = c.momentum[0] ** 2 / (2 * c.mass[0]) + dof * kT * c.position[0]
            e = e + jnp.sum(c.momentum[1:] ** 2 / (2 * c.mass[1:]) + kT * c.position[1:])
            b = state.barostat
            e = e + jnp.sum(b.momentum**2 / (2 * b.mass) + kT * b.position)
            volume = jnp.abs(jnp.linalg.det(simulate.npt_box(state)))
            return e + self.config.pressure * volume + state.box_momentum**2 / (2 * state.box_mass)
        return jnp.zeros((), state.position.dtype)

    def _step(self, carry):
        state, neighbor, aux = carry
        pot = self.potential
        step = aux.step
        t_next = (step + 1) * self.dt
        field = self._field_at(t_next)
        zstar = aux.zstar
        if self._zstar_mode():
            k = self.field.zstar_every
            model_field = self._field_at(step * self.dt) if self.field.polarize else None
            box = self._box_of(state)
            zstar = jax.lax.cond(step % k == 0, lambda: pot.zstar(state.position, box, neighbor, model_field),
                                 lambda: zstar)
        state = self._apply(state, **self._force_kwargs(neighbor, field, zstar))
        error = aux.error
        neighbor_box = aux.neighbor_box
        if neighbor is not None:
            box = self._box_of(state)
            # the forces just computed used `neighbor` at these positions: were all edges kept?
            error = error | pot.edge_error(state.position, box, neighbor)
            rebuild = self._needs_rebuild(state, neighbor, box, neighbor_box)
            if box is None:
                neighbor = jax.lax.cond(rebuild, lambda: pot.update_neighbors(state.position, neighbor), lambda: neighbor)
            else:
                neighbor, neighbor_box = jax.lax.cond(
                    rebuild, lambda: (pot.update_neighbors(state.position, neighbor,
                                                           box if self.ensemble == "npt_nose_hoover" else None), box),
                    lambda: (neighbor, neighbor_box))
            if self.ensemble == "npt_nose_hoover":
                error = error | pot.check(state.position, box)
        finite = jnp.all(jnp.isfinite(state.position)) & jnp.all(jnp.isfinite(state.force)) & jnp.all(
            jnp.isfinite(state.momentum))
        error = error | jnp.where(finite, 0, ERR_NONFINITE)
        ok = error == 0
        good_state = _tree_where(ok, state, aux.good_state)
        good_step = jnp.where(ok, step + 1, aux.good_step)
        return state, neighbor, _Aux(step + 1, neighbor_box, zstar, error, good_state, good_step)

    def _needs_rebuild(self, state, neighbor, box, neighbor_box):
        """2·(max displacement since the build + 1.5 steps of motion) + box shrinkage > skin."""
        pot = self.potential
        R, ref = state.position, neighbor.reference_position
        speed = jnp.max(jnp.linalg.norm(state.momentum / state.mass, axis=-1))
        if pot.periodic:
            d = R - ref
            d = d - jnp.round(d)
            disp = space.transform(box, d)
            # pairs at the list radius in the build box are at least s_min · r_list now
            deform = box @ jnp.linalg.inv(neighbor_box)
            s_min = jnp.linalg.svd(deform, compute_uv=False)[-1]
            shrink = jnp.maximum(0.0, 1.0 - s_min) * pot.list_radius
        else:
            disp = R - ref
            shrink = 0.0
        max_disp = jnp.max(jnp.linalg.norm(disp, axis=-1))
        return 2.0 * (max_disp + 1.5 * speed * self.dt) + shrink > pot.skin

    def _chunk_fn(self, num_frames: int):
        key = (num_frames, None if self.neighbor is None else self.potential.capacity(self.neighbor),
               getattr(self.potential, "kbounds", None), getattr(self.potential, "edge_capacity", None))
        if key in self._chunks:
            return self._chunks[key]
        stride = self.config.stride

        def chunk(state, neighbor, aux):
            def frame_body(carry, _):
                carry = jax.lax.fori_loop(0, stride, lambda i, c: jax.lax.cond(
                    c[2].error == 0, self._step, lambda c: c, c), carry)
                s, nbr, a = carry
                return carry, self._frame(s, nbr, a.step)

            carry, frames = jax.lax.scan(frame_body, (state, neighbor, aux), None, length=num_frames)
            state, neighbor, aux = carry
            nbr_error = jnp.zeros((), jnp.int32) if neighbor is None else neighbor.error.code.astype(jnp.int32)
            return state, neighbor, aux, frames, nbr_error

        fn = jax.jit(chunk)
        self._chunks[key] = fn
        if len(self._chunks) > 1:
            self.recompilations += 1
        return fn

    def _aux(self):
        zstar = self._zstar0 if self._zstar_mode() else None
        box = self._box_of(self.state)
        return _Aux(jnp.asarray(self.step, jnp.int32), box if box is not None else jnp.zeros(()),
                    zstar, jnp.zeros((), jnp.int32), self.state, jnp.asarray(self.step, jnp.int32))

    # -- the host loop ---------------------------------------------------------------------
    def run(self, num_steps: int, writer=None, restart: Optional[str | Path] = None,
            progress: Optional[Callable[[dict], None]] = None):
        """Advance ``num_steps`` steps (a multiple of ``stride``), writing every frame.

        Args:
          writer: a :class:`TrajectoryWriter` (or anything with ``write(frames: dict of arrays)``).
          restart: path of the restart file written after every chunk.
          progress: called after every chunk with dict(step, steps, ns_per_day, wall, temperature, energy).

        Raises:
          MDError: non-finite state (the last finite frame is written and kept in ``state``), or
            repeated overflows.
        """
        cfg = self.config
        if num_steps % cfg.stride:
            raise ValueError(f"num_steps={num_steps} must be a multiple of stride={cfg.stride}")
        target = self.step + num_steps
        retries = 0
        start_wall, done_steps, timed_wall, timed_steps = time.perf_counter(), 0, 0.0, 0
        while self.step < target:
            frames_left = (target - self.step) // cfg.stride
            num_frames = min(cfg.frames_per_call, frames_left)
            compiled_before = len(self._chunks)
            fn = self._chunk_fn(num_frames)
            t0 = time.perf_counter()
            with _quiet_jax_md():
                state, neighbor, aux, frames, nbr_error = fn(self.state, self.neighbor, self._aux())
            error = int(aux.error)
            nbr_error = int(nbr_error)
            elapsed = time.perf_counter() - t0
            overflow = bool(nbr_error & (int(partition.PEC.NEIGHBOR_LIST_OVERFLOW) | int(partition.PEC.CELL_LIST_OVERFLOW)
                                         | int(partition.PEC.CELL_SIZE_TOO_SMALL)))
            if overflow or error & (ERR_KGRID | ERR_MIN_IMAGE | ERR_EDGES):
                retries += 1
                if retries > cfg.max_reallocations:
                    raise MDError(f"gave up after {retries - 1} reallocations at step {self.step}")
                self._recover(nbr_error, error, state)
                continue
            retries = 0
            frames = jax.device_get(frames)
            if error & ERR_NONFINITE:
                good_step = int(aux.good_step)
                keep = frames["step"] <= good_step
                self.state, self.step = aux.good_state, good_step
                if self.neighbor is not None:  # a list valid at the last finite positions
                    self.neighbor = self.potential.allocate_neighbors(self.state.position, self._box_of(self.state))
                if writer is not None:
                    if np.any(keep):
                        writer.write(self.to_output(_select(frames, keep)))
                    if not np.any(frames["step"] == good_step):
                        writer.write(self.to_output(self.current_frame()))
                if restart is not None:
                    self.save_restart(restart)
                raise MDError(f"non-finite forces, positions or energy after step {good_step} "
                              f"(t = {good_step * self.dt:.1f} fs); the last finite state (step {good_step}) "
                              "was written to the trajectory and the restart file")
            if not np.all(np.isfinite(frames["energy"])):
                bad = int(frames["step"][~np.isfinite(frames["energy"])][0])
                keep = frames["step"] < bad
                if writer is not None and np.any(keep):
                    writer.write(self.to_output(_select(frames, keep)))
                if np.any(keep):
                    last = int(frames["step"][keep][-1])
                    raise MDError(f"non-finite energy at step {bad}; frames up to step {last} were written "
                                  "(the restart file is from the previous chunk)")
                raise MDError(f"non-finite energy at step {bad}")
            self.state, self.neighbor, self.step = state, neighbor, int(aux.step)
            if self._zstar_mode():
                self._zstar0 = aux.zstar
            if writer is not None:
                writer.write(self.to_output(frames))
            if restart is not None:
                self.save_restart(restart)
            steps = num_frames * cfg.stride
            done_steps += steps
            if len(self._chunks) == compiled_before:  # exclude compilation from the timing
                timed_wall += elapsed
                timed_steps += steps
            if progress is not None:
                wall = time.perf_counter() - start_wall
                rate_wall, rate_steps = (timed_wall, timed_steps) if timed_steps else (elapsed, steps)
                ns_day = rate_steps * self.dt * 1e-6 / max(rate_wall, 1e-12) * 86400.0
                progress(dict(step=self.step, steps=target, ns_per_day=ns_day, wall=wall,
                              temperature=float(2 * frames["kinetic_energy"][-1] / (3 * self.system.num_atoms * KB)),
                              energy=float(frames["energy"][-1]) + self.potential.energy_offset))
        self.timing = dict(steps=timed_steps, seconds=timed_wall)
        return self

    def _recover(self, nbr_error, error, state_after):
        """Reallocate the neighbor list / k-grid bounds after an overflow (state unchanged)."""
        pot = self.potential
        if error & ERR_MIN_IMAGE:
            raise MDError("the box shrank below twice the neighbor-list radius (minimum image); "
                          "use a larger (replicated) cell or a smaller skin")
        if error & ERR_KGRID:
            box = np.asarray(self._box_of(state_after))
            pot.grow_kgrid(box.T)
        if error & ERR_EDGES:
            box = self._box_of(state_after)
            fresh = pot.allocate_neighbors(state_after.position, box, extra_capacity=pot.num_atoms)
            pot.grow_edges(int(jax.jit(pot.count_edges)(state_after.position, box, fresh)))
        if nbr_error:
            box = self._box_of(self.state)
            old = pot.capacity(self.neighbor)
            fresh = pot.allocate_neighbors(self.state.position, box)
            need = pot.capacity(fresh)
            per_unit = pot.num_atoms  # sparse extra capacity is counted in units of N edges
            target = max(need, int(math.ceil(old * 1.5)))
            extra = max(0, int(math.ceil((target - need) / per_unit)))
            self.neighbor = pot.allocate_neighbors(self.state.position, box, extra_capacity=extra)
        self.reallocations += 1

    # -- frames on the host ----------------------------------------------------------------
    def current_frame(self) -> dict:
        """The frame of the current state (host numpy, internal frame)."""
        fn = jax.jit(lambda s, n, k: self._frame(s, n, k))
        frame = jax.device_get(fn(self.state, self.neighbor, jnp.asarray(self.step, jnp.int32)))
        return {k: np.asarray(v)[None] for k, v in frame.items()}

    def to_output(self, frames: dict) -> dict:
        """Rotate stacked frames back to the caller's frame and add derived quantities."""
        q = self.rotation
        out = {}
        vec = lambda x: np.asarray(x) @ q.T
        for key, value in frames.items():
            value = np.asarray(value)
            if key in ("positions", "velocities", "forces", "dipoles", "total_dipole", "dipole_rate", "field"):
                out[key] = vec(value)
            elif key in ("zstar", "polarizability"):
                out[key] = np.einsum("ab,...bc,dc->...ad", q, value, q)
            elif key == "box":
                out["cell"] = np.swapaxes(value, -1, -2) @ q.T
            else:
                out[key] = value
        out["energy"] = np.asarray(frames["energy"], np.float64) + self.potential.energy_offset
        out["conserved"] = np.asarray(frames["conserved"], np.float64) + self.potential.energy_offset
        out["time"] = np.asarray(frames["step"], np.float64) * self.dt
        out["temperature"] = 2.0 * np.asarray(frames["kinetic_energy"]) / (3 * self.system.num_atoms * KB)
        if "cell" not in out and self.potential.periodic:
            out["cell"] = np.broadcast_to(self.system.cell, (len(out["time"]), 3, 3))
        out["atomic_numbers"] = self.system.atomic_numbers
        out["periodic"] = self.potential.periodic
        return out

    # -- restart -----------------------------------------------------------------------------
    def save_restart(self, path):
        """Atomically write the full integrator state (npz) to ``path``."""
        path = Path(path)
        leaves = jax.tree_util.tree_leaves(jax.device_get(self.state))
        arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)}
        if self._zstar_mode() and self._zstar0 is not None:
            arrays["zstar"] = np.asarray(self._zstar0)
        meta = dict(step=self.step, ensemble=self.ensemble, num_leaves=len(leaves), num_atoms=self.system.num_atoms,
                    timestep=self.dt, rotation=self.rotation.tolist())
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, meta=json.dumps(meta), **arrays)
        os.replace(tmp, path)

    def load_restart(self, path):
        """Continue from a restart file written by :meth:`save_restart` with the same setup."""
        data = np.load(path)
        meta = json.loads(str(data["meta"]))
        if meta["ensemble"] != self.ensemble or meta["num_atoms"] != self.system.num_atoms:
            raise MDError(f"restart file {path} is for {meta['ensemble']} with {meta['num_atoms']} atoms, "
                          f"not {self.ensemble} with {self.system.num_atoms}")
        leaves, treedef = jax.tree_util.tree_flatten(self.state)
        if meta["num_leaves"] != len(leaves):
            raise MDError(f"restart file {path} does not match this integrator's state")
        new = [jnp.asarray(data[f"leaf_{i}"], getattr(x, "dtype", None)) for i, x in enumerate(leaves)]
        for old, value in zip(leaves, new):
            if np.shape(old) != np.shape(value):
                raise MDError(f"restart file {path}: state shape {np.shape(value)} != {np.shape(old)}")
        self.state = jax.tree_util.tree_unflatten(treedef, new)
        self.step = int(meta["step"])
        if "zstar" in data:
            self._zstar0 = jnp.asarray(data["zstar"], self.dtype)
        box = self._box_of(self.state)
        if self.neighbor is not None:
            self.neighbor = self.potential.allocate_neighbors(self.state.position, box)
        return self


def _select(frames: dict, mask: np.ndarray) -> dict:
    return {k: np.asarray(v)[mask] for k, v in frames.items()}


# ----------------------------------------------------------------------------- trajectories


_PER_ATOM = (("velocities", 3), ("forces", 3), ("charges", 1), ("dipoles", 3), ("zstar", 9))
_PER_FRAME = ("energy", "kinetic_energy", "conserved", "temperature", "time", "step")
_PER_FRAME_VEC = ("total_dipole", "dipole_rate", "polarizability", "field")


class TrajectoryWriter:
    """Extended XYZ frames (ASE-readable) appended to ``path``.

    Per-atom columns: species, pos (Å), velocities (Å/fs), forces (eV/Å), and when recorded
    charges (e), dipoles (e·Å), zstar (9 numbers, row-major Z_{αβ} = ∂M_α/∂r_β, e). Per-frame
    keys: energy (eV, model potential energy incl. E0), kinetic_energy, conserved (eV),
    temperature (K), time (fs), step; when recorded total_dipole (e·Å), dipole_rate
    (e·Å/fs), polarizability (9 numbers, e·Å²/V), field (V/Å). Periodic frames carry
    ``Lattice`` and ``pbc="T T T"``. Header: ``units`` and the run's metadata (``info``).

    ``resume_step``: keep only frames with step <= this (a restart), then append.
    """

    def __init__(self, path, info: Optional[dict] = None, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.info = dict(info or {})
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_trajectory(self.path, resume_step)

    def write(self, frames: dict):
        from ase.data import chemical_symbols

        symbols = [chemical_symbols[z] for z in frames["atomic_numbers"]]
        num_frames = len(frames["time"])
        lines = []
        for f in range(num_frames):
            columns = [frames["positions"][f]]
            props = ["species:S:1", "pos:R:3"]
            for key, width in _PER_ATOM:
                if key in frames:
                    columns.append(np.asarray(frames[key][f]).reshape(len(symbols), width))
                    props.append(f"{key}:R:{width}")
            header = []
            if frames["periodic"]:
                header.append('Lattice="' + " ".join(f"{x:.10f}" for x in np.asarray(frames["cell"][f]).reshape(-1)) + '"')
            header.append("Properties=" + ":".join(props))
            for key in _PER_FRAME:
                value = np.asarray(frames[key][f])
                header.append(f"{key}={int(value)}" if key == "step" else f"{key}={float(value):.10f}")
            for key in _PER_FRAME_VEC:
                if key in frames:
                    header.append(f'{key}="' + " ".join(f"{x:.10e}" for x in np.asarray(frames[key][f]).reshape(-1)) + '"')
            for key, value in self.info.items():
                header.append(f"{key}={value}" if not isinstance(value, str) or " " not in value else f'{key}="{value}"')
            header.append('pbc="T T T"' if frames["periodic"] else 'pbc="F F F"')
            data = np.concatenate(columns, axis=1)
            body = "\n".join(s + " " + " ".join(f"{x:.10f}" for x in row) for s, row in zip(symbols, data))
            lines.append(f"{len(symbols)}\n{' '.join(header)}\n{body}\n")
        with open(self.path, "a") as handle:
            handle.write("".join(lines))


def truncate_trajectory(path, max_step: int) -> int:
    """Drop frames with ``step > max_step`` from an extended XYZ file; returns frames kept."""
    path = Path(path)
    if not path.exists():
        path.write_text("")
        return 0
    lines = path.read_text().splitlines(keepends=True)
    out, i, kept = [], 0, 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        n = int(lines[i])
        header = lines[i + 1]
        step = None
        for token in header.split():
            if token.startswith("step="):
                step = int(token[5:])
        if step is None or step <= max_step:
            out.extend(lines[i:i + n + 2])
            kept += 1
        i += n + 2
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(out))
    os.replace(tmp, path)
    return kept


def read_trajectory(path) -> dict:
    """Stacked arrays of a trajectory written by :class:`TrajectoryWriter` (via ASE)."""
    import ase.io

    frames = ase.io.read(path, index=":", format="extxyz")
    if not frames:
        raise ValueError(f"{path} contains no frames")
    out: dict[str, Any] = {"positions": np.stack([a.get_positions() for a in frames]),
                           "atomic_numbers": frames[0].get_atomic_numbers(),
                           "periodic": bool(frames[0].pbc.all())}
    if out["periodic"]:
        out["cell"] = np.stack([np.asarray(a.get_cell()[:]) for a in frames])
    results = lambda a: {} if a.calc is None else a.calc.results  # ASE moves known properties here
    for key, _ in _PER_ATOM:
        if key in frames[0].arrays:
            out[key] = np.stack([a.arrays[key] for a in frames])
        elif key in results(frames[0]):
            out[key] = np.stack([results(a)[key] for a in frames])
    for key in _PER_FRAME + _PER_FRAME_VEC + ("target_temperature", "ensemble", "timestep"):
        values = []
        for a in frames:
            if key in a.info:
                values.append(a.info[key])
            elif key in results(a):
                values.append(results(a)[key])
        if len(values) == len(frames):
            out[key] = np.asarray(values)
    return out


# ----------------------------------------------------------------------------- builders


def model_potential_from_loaded(loaded, system: MDSystem, **kwargs) -> ModelPotential:
    """A :class:`ModelPotential` from :func:`polarjax.training.inference.load_model`'s result."""
    kwargs.setdefault("dtype", loaded.dtype)
    return ModelPotential(loaded.model, loaded.params, loaded.cutoff, system, **kwargs)
