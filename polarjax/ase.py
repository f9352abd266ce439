"""ASE calculator for polarjax models: energy, forces, stress and the electrical response.

    from polarjax.ase import Calculator
    atoms.calc = Calculator("runs/water")                 # a run directory (best EMA params)
    atoms.calc = Calculator(loaded_model, external_field=[0, 0, 0.01])   # a LoadedModel, field in V/Å
    atoms.calc = Calculator.from_model(model, params, cutoff=5.0)        # an untrained/in-memory model

Properties (units eV, Å, e, V):

==================  =========  ==========================================================
``energy``          []         total energy incl. the per-element E0 (added on the host in
                               float64); with a field, open structures add −√ε∞ E_ext·P
                               (the electric enthalpy, consistent with the forces)
``free_energy``     []         = energy
``forces``          [N, 3]     −∂E/∂r; with a field the field-driven forces −∂E/∂r + Z*ᵀE_ext
``stress``          [6]        Voigt (xx, yy, zz, yz, xz, xy), eV/Å³, periodic cells only
``charges``         [N]        total charges q_latent + q_induced
``dipoles``         [N, 3]     total dipoles u_latent + u_induced
``quadrupoles``     [N, 3, 3]  latent quadrupoles (primitive, traceless)
``bec``             [N, 3, 3]  Born effective charges Z*[pol, disp] (see polarjax.observables)
``dipole``          [3]        open: P = Σ q r + Σ u; periodic: Berry-phase P × volume (e·Å)
``polarizability``  [3, 3]     α_sys = ∂P/∂E_ext (e·Å²/V; ``polarizability_A3`` in Å³)
==================  =========  ==========================================================

Extra result keys (when computed): ``bec_charge``, ``bec_dipole``, ``asr``, ``latent_charges``,
``induced_charges``, ``latent_dipoles``, ``induced_dipoles``, ``kappa``, ``alpha``,
``polarizability_sum``, ``polarizability_A3``, ``energy_sr``, ``energy_lr``.

Structures are padded to the size buckets of the model's :class:`BatchBuilder`; the jitted
function recompiles only when the padded shape changes (``num_compilations`` counts them).
Born effective charges (9 reverse passes) and the polarizability (3 forward passes) are
computed only when requested, or — Z* — when an external field is set (the forces need it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import CalculatorSetupError, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from polarjax.data.batching import SizeBuckets, choose_padding, collate
from polarjax.data.structures import Structure, prepare_structure
from polarjax.observables import ResponseConfig, polarizability_volume, response

__all__ = ["Calculator"]


class Calculator(_AseCalculator):
    """ASE calculator around a trained polarjax model.

    Args:
      model: a run directory (str or Path) or a :class:`~polarjax.training.inference.LoadedModel`.
      external_field: uniform field [3] (V/Å) or None.
      config: :class:`~polarjax.observables.ResponseConfig` for Z* (ε∞ scaling, mean-charge
        removal, sum-rule enforcement); keyword shortcuts ``epsilon_inf``,
        ``remove_mean_charge``, ``enforce_asr`` override its fields.
      checkpoint: 'best' or 'latest' when loading a run directory.
      buckets: size buckets (default: the model builder's).
      compute_response: always compute Z* and α_sys (otherwise only when requested).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "charges", "dipoles", "quadrupoles",
                              "bec", "dipole", "polarizability"]
    name = "polarjax"

    def __init__(self, model, external_field=None, *, config: Optional[ResponseConfig] = None,
                 epsilon_inf: Optional[float] = None, remove_mean_charge: Optional[bool] = None,
                 enforce_asr: Optional[bool] = None, checkpoint: str = "best", buckets: Optional[SizeBuckets] = None,
                 compute_response: bool = False, **kwargs):
        super().__init__(**kwargs)
        from polarjax.training.inference import LoadedModel, load_model

        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, checkpoint)
        if not isinstance(model, LoadedModel):
            raise TypeError(f"model must be a run directory or a LoadedModel, got {type(model).__name__} "
                            "(use Calculator.from_model(model, params, cutoff) for an in-memory model)")
        self.loaded = model
        self.dtype = np.dtype(model.dtype)
        config = config or ResponseConfig()
        overrides = {k: v for k, v in dict(epsilon_inf=epsilon_inf, remove_mean_charge=remove_mean_charge,
                                           enforce_asr=enforce_asr).items() if v is not None}
        self.config = dataclasses.replace(config, **overrides)
        self.external_field = self._check_field(external_field)
        self.buckets = buckets or model.builder.buckets
        self.compute_response = bool(compute_response)
        self._species_table = model.builder.species_table
        self._e0 = None if model.spec.atomic_energies is None else np.asarray(model.spec.atomic_energies, np.float64)
        self._functions: dict = {}
        self._compiled: set = set()

    @classmethod
    def from_model(cls, model, params, cutoff: float, dtype=np.float64, **kwargs) -> "Calculator":
        """A calculator for an in-memory ``Model`` and its parameters (no run directory)."""
        from polarjax.training.inference import LoadedModel

        loaded = LoadedModel(model, params, float(cutoff), {}, None, dtype)
        return cls(loaded, **kwargs)

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def _check_field(field):
        if field is None:
            return None
        field = np.asarray(field, dtype=np.float64)
        if field.shape != (3,) or not np.all(np.isfinite(field)):
            raise ValueError(f"external_field must be 3 finite numbers (V/Å), got {field!r}")
        return field

    def set_external_field(self, field) -> None:
        """Change the uniform external field (V/Å); clears the stored results."""
        self.external_field = self._check_field(field)
        self.reset()

    @property
    def num_compilations(self) -> int:
        """Distinct (function, padded shape) pairs compiled so far."""
        return len(self._compiled)

    def _function(self, boundary: str, bec: bool, polarizability: bool):
        key = (boundary, bec, polarizability)
        if key not in self._functions:
            model, config = self.loaded.model, self.config

            def fn(params, graph, field):
                return response(model, params, graph, field, boundary, config=config, bec=bec,
                                stress=boundary == "periodic", polarizability=polarizability, include_e0=False)

            self._functions[key] = jax.jit(fn)
        return self._functions[key]

    # ------------------------------------------------------------------ structures

    def _structure(self, atoms) -> Structure:
        numbers = np.asarray(atoms.get_atomic_numbers())
        if len(numbers) == 0:
            raise CalculatorSetupError("polarjax: the structure has no atoms")
        known = set(self._species_table)
        unknown = sorted(set(int(z) for z in numbers) - known)
        if unknown:
            raise CalculatorSetupError(
                f"polarjax: element(s) {[chemical_symbols[z] for z in unknown]} are not supported by this model "
                f"(it knows {[chemical_symbols[z] for z in sorted(known)]})")
        pbc = np.asarray(atoms.get_pbc(), bool)
        cell = np.asarray(atoms.get_cell()[:], np.float64)
        if pbc.any() and not pbc.all():
            raise CalculatorSetupError(
                f"polarjax: mixed periodic boundaries pbc={pbc.tolist()} are not supported; use pbc=True "
                "(with a vacuum gap for slabs) or pbc=False for isolated structures")
        if pbc.all():
            volume = abs(np.linalg.det(cell))
            if not np.isfinite(volume) or volume < 1e-6:
                raise CalculatorSetupError(f"polarjax: periodic structure with a singular cell (volume {volume:.3g} Å³)")
        positions = np.asarray(atoms.get_positions(), np.float64)
        if not np.all(np.isfinite(positions)):
            raise CalculatorSetupError("polarjax: positions contain NaN or inf")
        return Structure(positions, numbers, cell if pbc.all() else np.zeros((3, 3)), bool(pbc.all()))

    def _graph(self, atoms):
        structure = self._structure(atoms)
        spec = self.loaded.spec
        try:
            prepared = prepare_structure(structure, self._species_table, self.loaded.cutoff, spec.dl)
        except ValueError as error:
            raise CalculatorSetupError(f"polarjax: {error}") from None
        shape = choose_padding([prepared], self.buckets, n_graph=2)
        graph = collate([prepared], shape, spec.dl, dtype=self.dtype)
        return prepared, shape, graph

    def reference_energy(self, atoms) -> float:
        """Σ E0 of the atoms (float64, eV; 0 without per-element energies)."""
        if self._e0 is None:
            return 0.0
        species = [self._species_table[int(z)] for z in atoms.get_atomic_numbers()]
        return float(np.sum(self._e0[species]))

    # ------------------------------------------------------------------ calculation

    def calculate(self, atoms=None, properties: Sequence[str] = ("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        prepared, shape, graph = self._graph(atoms)
        boundary = "periodic" if prepared.periodic else "open"
        field = self.external_field
        want = set(properties)
        bec = self.compute_response or field is not None or "bec" in want
        polarizability = self.compute_response or "polarizability" in want
        fn = self._function(boundary, bec, polarizability)
        self._compiled.add((boundary, bec, polarizability, tuple(shape)))
        field_array = np.zeros((shape.n_graph, 3), self.dtype)
        if field is not None:
            field_array[0] = field
        out = jax.device_get(fn(self.loaded.params, graph, jnp.asarray(field_array)))
        n = len(atoms)
        scale = float(np.sqrt(self.config.epsilon_inf))
        energy = float(out["energy"][0]) + self.reference_energy(atoms)
        if field is not None and boundary == "open":
            energy -= scale * float(np.dot(field, np.asarray(out["polarization"][0], np.float64)))
        forces = out["field_forces"] if field is not None else out["forces"]
        results = {
            "energy": energy,
            "free_energy": energy,
            "forces": np.array(forces[:n], np.float64),
            "charges": np.array(out["total_charges"][:n], np.float64),
            "dipoles": np.array(out["total_dipoles"][:n], np.float64),
            "quadrupoles": np.array(out["quadrupoles"][:n], np.float64),
            "dipole": np.array(out["polarization"][0], np.float64),
            "latent_charges": np.array(out["charges"][:n], np.float64),
            "induced_charges": np.array(out["induced_charges"][:n], np.float64),
            "latent_dipoles": np.array(out["dipoles"][:n], np.float64),
            "induced_dipoles": np.array(out["induced_dipoles"][:n], np.float64),
            "kappa": np.array(out["kappa"][:n], np.float64),
            "alpha": np.array(out["alpha"][:n], np.float64),
            "polarizability_sum": np.array(out["polarizability_sum"][0], np.float64),
            "energy_sr": float(out["energy_sr"][0]),
            "energy_lr": float(out["energy_lr"][0]),
        }
        if boundary == "periodic":
            results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out["stress"][0], np.float64))
        if bec:
            for key in ("bec", "bec_charge", "bec_dipole"):
                if key in out:
                    results[key] = np.array(out[key][:n], np.float64)
            results["asr"] = np.array(out["asr"][0], np.float64)
        if polarizability:
            results["polarizability"] = np.array(out["polarizability"][0], np.float64)
            results["polarizability_A3"] = np.asarray(polarizability_volume(results["polarizability"]))
        self.results.update(results)
