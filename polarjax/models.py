"""The polarizable multipole energy model: encoder → heads → latent Ewald electrostatics.

    E = Σ_i E0(Z_i) + Σ_i E_sr,i + E_lr(q, u, Q, kappa, alpha; σ, dl)

Forces F = −∂E/∂r and stress σ = (1/V) ∂E/∂ε come from autodiff through everything (the
latent sources depend on positions). One public constructor, :func:`build`, turns a config
into a :class:`Model` with pure ``init`` / ``apply`` / ``energy`` / ``properties`` functions.

Variants (the paper's ablation), ``model.variant``:

    sr      short range only           les     charges q
    u       q + dipoles u              uQ      q + u + quadrupoles Q
    uiq     q + u + induced charges    uiu     q + u + induced dipoles
    uiqiu   q + u + both induced       uQiqiu  everything
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from polarjax.data.graph import Graph, edge_vectors
from polarjax.electrostatics import electrostatics_batch
from polarjax.encoders import build_encoder
from polarjax.heads import MultipoleHeads
from polarjax.units import DEFAULT_DL, DEFAULT_SIGMA

VARIANTS: dict[str, dict[str, bool]] = {
    "sr": dict(long_range=False, dipoles=False, quadrupoles=False, kappa=False, alpha=False),
    "les": dict(long_range=True, dipoles=False, quadrupoles=False, kappa=False, alpha=False),
    "u": dict(long_range=True, dipoles=True, quadrupoles=False, kappa=False, alpha=False),
    "uQ": dict(long_range=True, dipoles=True, quadrupoles=True, kappa=False, alpha=False),
    "uiq": dict(long_range=True, dipoles=True, quadrupoles=False, kappa=True, alpha=False),
    "uiu": dict(long_range=True, dipoles=True, quadrupoles=False, kappa=False, alpha=True),
    "uiqiu": dict(long_range=True, dipoles=True, quadrupoles=False, kappa=True, alpha=True),
    "uQiqiu": dict(long_range=True, dipoles=True, quadrupoles=True, kappa=True, alpha=True),
}

#: Static description of a batch's boundaries: one compiled branch per value.
BOUNDARIES = ("periodic", "open", "mixed")


def boundary_of(graph: Graph) -> str:
    """'periodic', 'open' or 'mixed' for the real graphs of a host-side batch."""
    periodic = np.asarray(graph.periodic)[np.asarray(graph.graph_mask, bool)]
    if periodic.size == 0 or not periodic.any():
        return "open"
    return "periodic" if periodic.all() else "mixed"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that defines the architecture (hashable; static under jit).

    Attributes:
      species: atomic numbers the model knows, in species-index order.
      encoder: name in ``polarjax.encoders.ENCODERS``; encoder_kwargs: its hyperparameters.
      variant: key of VARIANTS. anisotropic_alpha: 3×3 PSD polarizabilities.
      sigma, dl: Gaussian width and k-space resolution (Å).
      remove_self_interaction: see docs/electrostatics.md.
      atomic_energies: E0 per species (eV), added outside the network.
      baseline_charges / baseline_alpha: fixed per-species values added to the learned ones.
      head_kwargs: scales and width of the heads.
      latent_sign: +1 or -1, multiplies the learned charges, dipoles and quadrupoles. At zero
        external field the energy is even in the latent sources (every term is quadratic), so
        energies and forces cannot fix their global sign; it is fixed after training by
        :mod:`polarjax.training.orientation` (e.g. oxygen negative) and stored in the run.
    """

    species: tuple[int, ...]
    encoder: str = "nequip"
    encoder_kwargs: tuple = ()
    variant: str = "les"
    anisotropic_alpha: bool = False
    sigma: float = DEFAULT_SIGMA
    dl: float = DEFAULT_DL
    remove_self_interaction: bool = True
    atomic_energies: Optional[tuple[float, ...]] = None
    baseline_charges: Optional[tuple[float, ...]] = None
    baseline_alpha: Optional[tuple[float, ...]] = None
    head_kwargs: tuple = ()
    latent_sign: float = 1.0

    def __post_init__(self):
        if self.latent_sign not in (1.0, -1.0):
            raise ValueError(f"latent_sign must be +1 or -1, got {self.latent_sign}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown model variant {self.variant!r}; choose one of {sorted(VARIANTS)}")
        for name in ("atomic_energies", "baseline_charges", "baseline_alpha"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.species):
                raise ValueError(f"{name} has {len(values)} entries but the model has {len(self.species)} species")

    @property
    def flags(self) -> dict[str, bool]:
        return VARIANTS[self.variant]


class PolarizableNetwork(nn.Module):
    """Encoder + heads: per-atom short-range energies and latent sources."""

    spec: ModelSpec

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, node_mask, edge_mask):
        spec = self.spec
        encoder = build_encoder(spec.encoder, num_species=len(spec.species), **dict(spec.encoder_kwargs))
        energy, features = encoder(vectors, species, senders, receivers, node_mask, edge_mask)
        flags = spec.flags
        if not flags["long_range"]:
            return energy, None
        heads = MultipoleHeads(
            dipoles=flags["dipoles"], quadrupoles=flags["quadrupoles"], kappa=flags["kappa"], alpha=flags["alpha"],
            anisotropic_alpha=spec.anisotropic_alpha, **dict(spec.head_kwargs), name="heads",
        )
        return energy, heads(features, node_mask)


def _to_graph_layout(values, table):
    """Flat per-atom values [N, ...] → per-graph [G, A, ...] (zeros in empty slots)."""
    if values is None:
        return None
    valid = table >= 0
    gathered = values[jnp.where(valid, table, 0)]
    return jnp.where(valid.reshape(valid.shape + (1,) * (values.ndim - 1)), gathered, 0.0)


def _to_flat_layout(values, table, num_atoms):
    """Per-graph [G, A, ...] → flat [N, ...] (empty slots dropped)."""
    index = jnp.where(table >= 0, table, num_atoms).reshape(-1)
    flat = values.reshape((-1,) + values.shape[2:])
    return jnp.zeros((num_atoms,) + values.shape[2:], values.dtype).at[index].set(flat, mode="drop")


def _add_baseline(values, baseline, species, mask):
    if baseline is None or values is None:
        return values
    extra = jnp.asarray(baseline, values.dtype)[species]
    if values.ndim == 3:  # anisotropic alpha: isotropic baseline
        extra = extra[:, None, None] * jnp.eye(3, dtype=values.dtype)
    return values + jnp.where(mask.reshape(mask.shape + (1,) * (values.ndim - 1)), extra, 0.0)


class Model:
    """Pure functions of (params, graph) for one architecture.

    ``boundary`` arguments are static: 'periodic', 'open' or 'mixed' (see :func:`boundary_of`).
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.network = PolarizableNetwork(spec)

    # -- parameters ---------------------------------------------------------------------
    def init(self, rng, graph: Graph):
        """Initialise parameters from an example batch."""
        vectors = edge_vectors(graph)
        return self.network.init(rng, vectors, graph.species, graph.senders, graph.receivers,
                                 graph.node_mask, graph.edge_mask)

    # -- forward --------------------------------------------------------------------------
    def apply(self, params, graph: Graph, positions=None, cell=None, external_field=None, boundary: str = "mixed",
              need_fields: bool = False, include_e0: bool = True):
        """Energies and per-atom outputs.

        Args:
          params: from :meth:`init`. graph: padded batch.
          positions [N, 3] and cell [G, 3, 3]: override the graph's (for derivatives).
          external_field: [G, 3] uniform field per structure (V/Å) or None.
          boundary: static 'periodic' | 'open' | 'mixed'.
          need_fields: also compute potentials and fields when the variant does not need them.
          include_e0: add the per-element reference energies to ``energy``. Training and
            evaluation use False with E0 removed from the labels in float64 on the host:
            totals of ~1e5 eV would otherwise lose meV/atom precision in float32.

        Returns:
          dict: energy [G], energy_sr [G], energy_lr [G], energy_e0 [G], atomic_energy_sr [N],
          charges [N], dipoles [N,3], quadrupoles [N,3,3], kappa [N], alpha [N] or [N,3,3],
          induced_charges [N], induced_dipoles [N,3], potential [N], field [N,3]
          (absent sources are zeros; energies of padding graphs are zero).
        """
        spec = self.spec
        positions = graph.positions if positions is None else positions
        cell = graph.cell if cell is None else cell
        num_atoms = positions.shape[0]
        num_graphs = cell.shape[0]
        dtype = positions.dtype
        vectors = edge_vectors(graph, positions, cell)
        atomic_sr, sources = self.network.apply(params, vectors, graph.species, graph.senders, graph.receivers,
                                                graph.node_mask, graph.edge_mask)
        atomic_sr = jnp.where(graph.node_mask, atomic_sr, 0.0).astype(dtype)
        per_graph = lambda x: jax.ops.segment_sum(x, graph.graph_index, num_graphs)
        energy_sr = per_graph(atomic_sr)
        if spec.atomic_energies is not None:
            e0 = jnp.where(graph.node_mask, jnp.asarray(spec.atomic_energies, dtype)[graph.species], 0.0)
            energy_e0 = per_graph(e0)
        else:
            energy_e0 = jnp.zeros((num_graphs,), dtype)
        zeros_n, zeros_n3 = jnp.zeros((num_atoms,), dtype), jnp.zeros((num_atoms, 3), dtype)
        out = dict(atomic_energy_sr=atomic_sr, energy_sr=energy_sr, energy_e0=energy_e0,
                   charges=zeros_n, dipoles=zeros_n3, quadrupoles=jnp.zeros((num_atoms, 3, 3), dtype),
                   kappa=zeros_n, alpha=zeros_n, induced_charges=zeros_n, induced_dipoles=zeros_n3,
                   potential=zeros_n, field=zeros_n3, energy_lr=jnp.zeros((num_graphs,), dtype))
        if sources is not None:
            sources = {k: None if v is None else v.astype(dtype) for k, v in sources.items()}
            if spec.latent_sign != 1.0:
                for key in ("charges", "dipoles", "quadrupoles"):
                    if sources[key] is not None:
                        sources[key] = spec.latent_sign * sources[key]
            sources["charges"] = _add_baseline(sources["charges"], spec.baseline_charges, graph.species, graph.node_mask)
            sources["alpha"] = _add_baseline(sources["alpha"], spec.baseline_alpha, graph.species, graph.node_mask)
            table = graph.graph_atoms
            slot_mask = _to_graph_layout(graph.node_mask, table).astype(bool)
            if boundary == "periodic":
                periodic = True
            elif boundary == "open":
                periodic = False
            elif boundary == "mixed":
                periodic = graph.periodic
            else:
                raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
            result = electrostatics_batch(
                _to_graph_layout(positions, table), cell,
                _to_graph_layout(sources["charges"], table),
                _to_graph_layout(sources["dipoles"], table),
                _to_graph_layout(sources["quadrupoles"], table),
                _to_graph_layout(sources["kappa"], table),
                _to_graph_layout(sources["alpha"], table),
                external_field, slot_mask, graph.kweights.astype(dtype),
                periodic=periodic, sigma=spec.sigma, remove_self_interaction=spec.remove_self_interaction,
                need_fields=need_fields,
            )
            out["energy_lr"] = jnp.where(graph.graph_mask, result.energy, 0.0)
            for key in ("charges", "dipoles", "quadrupoles", "kappa", "alpha"):
                if sources[key] is not None:
                    out[key] = sources[key]
            for key, value in (("induced_charges", result.induced_charges), ("induced_dipoles", result.induced_dipoles),
                               ("potential", result.potential), ("field", result.field)):
                out[key] = _to_flat_layout(value, table, num_atoms)
            out["terms"] = {k: jnp.where(graph.graph_mask, v, 0.0) for k, v in result.terms.items()}
        e0 = out["energy_e0"] if include_e0 else 0.0
        out["energy"] = jnp.where(graph.graph_mask, e0 + energy_sr + out["energy_lr"], 0.0)
        return out

    def energy(self, params, graph: Graph, positions=None, cell=None, external_field=None, boundary="mixed",
               include_e0: bool = True):
        """Total energy per structure [G] (eV)."""
        return self.apply(params, graph, positions, cell, external_field, boundary, include_e0=include_e0)["energy"]

    def properties(self, params, graph: Graph, external_field=None, boundary: str = "mixed", stress: bool = True,
                   include_e0: bool = True):
        """Energy [G], forces [N, 3] (eV/Å), stress [G, 3, 3] (eV/Å³; zero for open) and outputs.

        Forces are −∂E/∂r; the stress is (1/V) ∂E/∂ε for the homogeneous strain
        r → r (I + ε_g), cell → cell (I + ε_g) of each structure g.
        """
        num_graphs = graph.cell.shape[0]
        dtype = graph.positions.dtype

        def total_energy(positions, strain):
            deformation = jnp.eye(3, dtype=dtype) + strain
            strained_positions = jnp.einsum("ni,nij->nj", positions, deformation[graph.graph_index])
            strained_cell = jnp.einsum("gij,gjk->gik", graph.cell, deformation)
            out = self.apply(params, graph, strained_positions, strained_cell, external_field, boundary,
                             include_e0=include_e0)
            return jnp.sum(out["energy"]), out

        strain = jnp.zeros((num_graphs, 3, 3), dtype)
        argnums = (0, 1) if stress else 0
        grads, out = jax.grad(total_energy, argnums=argnums, has_aux=True)(graph.positions, strain)
        if stress:
            d_positions, d_strain = grads
            volume = jnp.abs(jnp.linalg.det(jnp.where(graph.periodic[:, None, None], graph.cell, jnp.eye(3, dtype=dtype))))
            out["stress"] = jnp.where(graph.periodic[:, None, None] & graph.graph_mask[:, None, None],
                                      d_strain / volume[:, None, None], 0.0)
        else:
            d_positions = grads
        out["forces"] = jnp.where(graph.node_mask[:, None], -d_positions, 0.0)
        return out


def spec_from_config(config: Mapping[str, Any]) -> ModelSpec:
    """ModelSpec from a (ml_collections) config mapping with the keys of ModelSpec."""
    config = dict(config)
    for key in ("encoder_kwargs", "head_kwargs"):
        if key in config and config[key] is not None:
            value = config[key]
            value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
            config[key] = tuple(sorted(value.items()))
    for key in ("species", "atomic_energies", "baseline_charges", "baseline_alpha"):
        if key in config and config[key] is not None:
            config[key] = tuple(config[key])
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
    return ModelSpec(**config)


def build(config: Mapping[str, Any] | ModelSpec) -> Model:
    """The public constructor: a config (mapping or ModelSpec) → :class:`Model`."""
    spec = config if isinstance(config, ModelSpec) else spec_from_config(config)
    return Model(spec)
