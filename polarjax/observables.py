"""Electrical response from the latent multipoles: polarization, Born effective charges,
polarizability and field-driven forces.

Everything here is a pure, jit-able function, either of per-atom arrays on the padded flat
layout of a :class:`~polarjax.data.graph.Graph` (atoms [N], structures [G]) or of
``(model, params, graph)``. Units: e, Å, V, eV. ``boundary`` is the model's static
'periodic' | 'open' | 'mixed'.

Sources
-------
The polarization is made of the *total* sources the electrostatics sees:
q_i = q_latent,i + q_ind,i and u_i = u_latent,i + u_ind,i (quadrupoles carry no dipole).
``remove_mean_charge`` replaces q_i by q_i − Q/n per structure (Q its total charge, n its
atoms), which makes the open-boundary dipole independent of the origin and the charge
part of the acoustic sum rule exact for fixed charges. Latent charges are not constrained
to a fixed total: when Q depends on the geometry, the open-boundary Z* = ∂P/∂r (P about the
origin) changes under a translation t by t ⊗ ∂Q/∂r_i; with ``remove_mean_charge`` it is
translation invariant (recommended when comparing molecules with DFT). The periodic Z*
below is translation invariant either way.

Polarization (``polarization`` [G, 3], e·Å)
-------------------------------------------
* open:      P = Σ_i q_i r_i + Σ_i u_i, the dipole moment about the coordinate origin.
* periodic:  the Berry-phase form, per lattice direction j (cell rows a_j, fractional
  coordinates s_i = r_i · cell⁻¹). For point charges the many-body phase along j is
  Π_i exp(2πi q_i s_ij), whose phase gives

      P·V = Σ_j a_j · w(Σ_i q_i s_ij) + Σ_i u_i,      w(x) = x − round(x) ∈ [−½, ½)

  i.e. **P times the cell volume V** (divide by ``volume`` for e/Å²). It is defined modulo
  the polarization quantum e·a_j (per cell), reduced to the principal branch; it equals
  Σ q r + Σ u (mod quanta) and positions are used as given (not wrapped). (The phase of
  the charge-weighted sum Σ_k q_k exp(2πi s_kj) itself is not a polarization for point
  charges: for a compact neutral molecule in a large cell it tends to the constant π/2 and
  does not reproduce Σ q r. That sum enters through p̃_j below, for Z*.)

Born effective charges (``bec`` [N, 3, 3], e; Z*_i[α, β] = ∂P_α/∂r_iβ)
-------------------------------------------------------------------------
Polarization component first, displacement second. Includes the dependence of the
predicted q, u and the induced q_ind, u_ind on *all* positions (autodiff through the
encoder, the heads and the electrostatics).

* open: exactly ∂P/∂r of the P above, from 3 reverse-mode passes (6 with the split into a
  charge part ``bec_charge`` = ∂(Σ q r)/∂r and a dipole part ``bec_dipole`` = ∂(Σ u)/∂r).
* periodic (the reference method's phase-referenced derivative): with the complex
  charge amplitude along direction j (the charge structure factor at the smallest
  reciprocal vector b_j, 2π b_j·a_k = 2π δ_jk)

      p̃_j = (1/2πi) Σ_k q_k exp(2πi s_kj)       (``berry_amplitudes``),

  the charge part is  Z*_q,i[α, β] = Σ_j a_jα Re[exp(−2πi s_ij) ∂p̃_j/∂r_iβ], i.e. the
  derivative of the polarization measured with the phase origin on atom i:

      Z*_q,i[α, β] = q_i δ_αβ + Σ_k Σ_j a_jα [sin(2π(s_kj − s_ij)) / 2π] ∂q_k/∂r_iβ.

  The charge-transfer lever arm r_k − r_i is replaced by its smooth periodic version
  (independent of the images in which coordinates are given; accurate when the range of
  charge transfer is small compared with the cell, ~6% short at Δs = 0.1, ~50% at Δs = 0.3).
  For fixed charges Z*_q = q_i I exactly, and it equals ∂P/∂r of the Berry-phase P above
  whenever the charges do not depend on the positions. The dipole part is
  ∂(Σ_k u_k)/∂r_i. Cost: 9 reverse passes (Re and Im of 3 amplitudes + 3 dipole
  components) sharing one linearization, vmapped, independent of N. (Forward mode,
  ``jax.jacfwd``, also works through the model and agrees; it needs 3N passes.)

``epsilon_inf`` (default 1) multiplies Z* by √ε∞: latent charges fitted to energies are
screened by the electronic dielectric constant (q_latent ≈ q/√ε∞). The reference work used
ε∞ = 1.78 for water and 5.365 for HfO2; use 1 for molecules in vacuum. The polarization and
the polarizability are not scaled.

``asr`` [G, 3, 3] = Σ_i Z*_i per structure (the acoustic-sum-rule violation; zero for a
neutral system with exact Z*). ``enforce_asr`` subtracts its mean over the structure's atoms
from every Z*_i (from both parts), so the sum becomes zero.

Polarizability
--------------
``polarizability`` [G, 3, 3] = ∂P_α/∂E_ext,β at fixed positions (3 forward-mode passes
through the model), in e·Å²/V. In the one-shot response of ``polarjax.electrostatics`` only
u_ind = α (E + E_ext) depends on E_ext, so it equals ``polarizability_sum`` = Σ_i α_i (the
per-atom latent polarizabilities, isotropic α_i → α_i I). Polarizability volume in Å³:
α[Å³] = α[e·Å²/V] × k_e with k_e = 1/(4πε0) = 14.3996 V·Å/e (``polarjax.units.COULOMB``);
see :func:`polarizability_volume`.

Field-driven forces
-------------------
Under a uniform field E_ext (V/Å): F_i = −∂E/∂r_i + Z*_iᵀ E_ext (eV/Å), with E the model
energy and Z* evaluated at the same field. For open structures (and ε∞ = 1) this is exactly
−∂(E − E_ext·P)/∂r_i, the gradient of the electric enthalpy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from polarjax.units import COULOMB

__all__ = [
    "ResponseConfig", "Layout", "layout_of", "single_layout",
    "berry_amplitudes", "polarization", "born_effective_charges", "born_effective_charges_fixed",
    "volumes", "polarizability_sum", "polarizability_volume", "field_driven_forces",
    "model_sources", "response", "make_response_fn", "system_polarizability",
]


@dataclasses.dataclass(frozen=True)
class ResponseConfig:
    """Options of the Born effective charges (hashable; static under jit).

    Attributes:
      epsilon_inf: Z* is multiplied by √epsilon_inf (1: no scaling; see module docstring).
      remove_mean_charge: use q − Q/n per structure in the polarization and Z*.
      enforce_asr: subtract the per-structure mean of Z* so that Σ_i Z*_i = 0.
      split: also return ``bec_charge`` and ``bec_dipole`` (costs 3 more passes for open
        boundaries; free for periodic ones).
    """

    epsilon_inf: float = 1.0
    remove_mean_charge: bool = False
    enforce_asr: bool = False
    split: bool = True

    def __post_init__(self):
        if not self.epsilon_inf > 0:
            raise ValueError(f"epsilon_inf must be > 0, got {self.epsilon_inf}")


class Layout(NamedTuple):
    """Where the atoms of a flat padded array belong.

    cell [G, 3, 3] (rows), graph_index [N], node_mask [N] bool, periodic [G] bool.
    """

    cell: jnp.ndarray
    graph_index: jnp.ndarray
    node_mask: jnp.ndarray
    periodic: jnp.ndarray


def layout_of(graph) -> Layout:
    """The :class:`Layout` of a Graph."""
    return Layout(graph.cell, graph.graph_index, graph.node_mask, graph.periodic)


def single_layout(num_atoms: int, cell=None, dtype=jnp.float64) -> Layout:
    """One structure of ``num_atoms`` real atoms (periodic iff ``cell`` is given)."""
    periodic = cell is not None
    cell = jnp.zeros((3, 3), dtype) if cell is None else jnp.asarray(cell, dtype)
    return Layout(cell[None], jnp.zeros((num_atoms,), jnp.int32), jnp.ones((num_atoms,), bool),
                  jnp.asarray([periodic]))


# ----------------------------------------------------------------------------- helpers


def _static_periodic(boundary: str):
    if boundary == "periodic":
        return True
    if boundary == "open":
        return False
    if boundary == "mixed":
        return None
    raise ValueError(f"boundary must be 'periodic', 'open' or 'mixed', got {boundary!r}")


def _atom_periodic(layout: Layout, boundary: str):
    """[N] bool: the atom's structure is periodic."""
    static = _static_periodic(boundary)
    n = layout.graph_index.shape[0]
    if static is not None:
        return jnp.full((n,), static)
    return jnp.asarray(layout.periodic)[layout.graph_index]


def _safe_cell(layout: Layout, boundary: str):
    """Cells with the identity in open structures (so that inverses are finite)."""
    static = _static_periodic(boundary)
    eye = jnp.eye(3, dtype=layout.cell.dtype)
    if static is False:
        return jnp.broadcast_to(eye, layout.cell.shape)
    periodic = jnp.asarray(layout.periodic)[:, None, None] if static is None else True
    cell = jnp.where(periodic, layout.cell, eye)
    # padding structures have zero cells even when 'periodic' is static
    singular = jnp.abs(jnp.linalg.det(cell)) < 1e-12
    return jnp.where(singular[:, None, None], eye, cell)


def _per_graph(values, layout: Layout):
    return jax.ops.segment_sum(values, layout.graph_index, layout.cell.shape[0])


def _mask(values, layout: Layout):
    mask = layout.node_mask.reshape(layout.node_mask.shape + (1,) * (values.ndim - 1))
    return jnp.where(mask, values, 0.0)


def _effective_charges(charges, layout: Layout, remove_mean: bool):
    charges = _mask(charges, layout)
    if not remove_mean:
        return charges
    counts = _per_graph(layout.node_mask.astype(charges.dtype), layout)
    mean = _per_graph(charges, layout) / jnp.maximum(counts, 1.0)
    return _mask(charges - mean[layout.graph_index], layout)


def _fractional(positions, cell_safe, layout: Layout):
    inverse = jnp.linalg.inv(cell_safe)
    return jnp.einsum("ni,nij->nj", positions, inverse[layout.graph_index])


# ----------------------------------------------------------------------------- polarization


def berry_amplitudes(positions, charges, layout: Layout, *, remove_mean_charge: bool = False):
    """Complex charge amplitudes p̃_j = (1/2πi) Σ_k q_k exp(2πi s_kj), [G, 3] (e).

    The charge structure factor at the smallest reciprocal vector of each lattice direction,
    divided by 2πi; Z*_q,i[α, β] = Σ_j a_jα Re[exp(−2πi s_ij) ∂p̃_j/∂r_iβ] (periodic).
    """
    q = _effective_charges(charges, layout, remove_mean_charge)
    s = _fractional(positions, _safe_cell(layout, "periodic"), layout)
    phase = jnp.exp(2j * jnp.pi * s)
    return _per_graph(q[:, None] * phase, layout) / (2j * jnp.pi)


def polarization(positions, charges, dipoles=None, layout: Optional[Layout] = None, *, boundary: str = "mixed",
                 remove_mean_charge: bool = False):
    """Polarization [G, 3] (e·Å): the dipole moment (open) or P·V in the Berry-phase form
    (periodic), from total per-atom charges [N] and dipoles [N, 3] (see module docstring)."""
    if layout is None:
        layout = single_layout(positions.shape[0], dtype=positions.dtype)
    q = _effective_charges(charges, layout, remove_mean_charge)
    dipole_sum = 0.0 if dipoles is None else _per_graph(_mask(dipoles, layout), layout)
    static = _static_periodic(boundary)
    open_part = _per_graph(q[:, None] * positions, layout)
    if static is False:
        return open_part + dipole_sum
    cell = _safe_cell(layout, boundary)
    s = _fractional(positions, cell, layout)
    x = _per_graph(q[:, None] * s, layout)
    periodic_part = jnp.einsum("gj,gja->ga", x - jnp.round(x), cell)
    if static is None:
        periodic_part = jnp.where(jnp.asarray(layout.periodic)[:, None], periodic_part, open_part)
    return periodic_part + dipole_sum


def volumes(layout: Layout):
    """|det cell| [G] for periodic structures, 1 for open ones (so P·V / V is safe)."""
    volume = jnp.abs(jnp.linalg.det(layout.cell))
    return jnp.where(jnp.asarray(layout.periodic) & (volume > 0), volume, 1.0)


# ----------------------------------------------------------------------------- Born charges


def _bec_outputs(positions, charges, dipoles, layout: Layout, boundary: str, config: ResponseConfig):
    """The vector Y (summed over structures) whose Jacobian gives Z*, and its layout tag."""
    q = _effective_charges(charges, layout, config.remove_mean_charge)
    u = _mask(dipoles, layout) if dipoles is not None else jnp.zeros_like(positions)
    static = _static_periodic(boundary)
    if static is False:
        charge = jnp.sum(q[:, None] * positions, axis=0)
        dipole = jnp.sum(u, axis=0)
        if config.split:
            return jnp.concatenate([charge, dipole])
        return charge + dipole
    per_atom = _atom_periodic(layout, boundary)
    s = _fractional(positions, _safe_cell(layout, boundary), layout)
    theta = 2.0 * jnp.pi * s
    re = q[:, None] * jnp.sin(theta) / (2.0 * jnp.pi)  # Re p̃ contributions
    im = -q[:, None] * jnp.cos(theta) / (2.0 * jnp.pi)  # Im p̃ contributions
    a = jnp.where(per_atom[:, None], re, q[:, None] * positions)
    b = jnp.where(per_atom[:, None], im, 0.0)
    return jnp.concatenate([jnp.sum(a, axis=0), jnp.sum(b, axis=0), jnp.sum(u, axis=0)])


def _assemble_bec(jacobian, positions, layout: Layout, boundary: str, config: ResponseConfig):
    """Z* and its parts from the Jacobian [M, N, 3] of :func:`_bec_outputs`."""
    static = _static_periodic(boundary)
    jac = jnp.transpose(jacobian, (1, 0, 2))  # [N, M, 3]: jac[i, m, β]
    if static is False:
        if config.split:
            z_charge, z_dipole = jac[:, :3], jac[:, 3:]
        else:
            z_charge, z_dipole = jac, None
    else:
        cell = _safe_cell(layout, boundary)
        s = _fractional(positions, cell, layout)
        theta = 2.0 * jnp.pi * s  # [N, 3]
        d_re, d_im, z_dipole = jac[:, 0:3], jac[:, 3:6], jac[:, 6:9]
        local = jnp.cos(theta)[:, :, None] * d_re + jnp.sin(theta)[:, :, None] * d_im  # [N, j, β]
        z_periodic = jnp.einsum("nja,njb->nab", cell[layout.graph_index], local)
        if static is None:
            per_atom = _atom_periodic(layout, boundary)
            z_charge = jnp.where(per_atom[:, None, None], z_periodic, d_re)
        else:
            z_charge = z_periodic
    scale = math.sqrt(config.epsilon_inf)
    mask = layout.node_mask[:, None, None]
    z_charge = jnp.where(mask, scale * z_charge, 0.0)
    z_dipole = None if z_dipole is None else jnp.where(mask, scale * z_dipole, 0.0)
    total = z_charge if z_dipole is None else z_charge + z_dipole
    asr = _per_graph(total, layout)
    if config.enforce_asr:
        counts = jnp.maximum(_per_graph(layout.node_mask.astype(total.dtype), layout), 1.0)

        def fix(z):
            return jnp.where(mask, z - (_per_graph(z, layout) / counts[:, None, None])[layout.graph_index], 0.0)

        z_charge = fix(z_charge)
        z_dipole = None if z_dipole is None else fix(z_dipole)
        total = z_charge if z_dipole is None else z_charge + z_dipole
    out = {"bec": total, "asr": asr}
    if z_dipole is not None:
        out["bec_charge"], out["bec_dipole"] = z_charge, z_dipole
    return out


def _cotangents(num_outputs: int, dtype):
    return jnp.eye(num_outputs, dtype=dtype)


def born_effective_charges(sources: Callable, positions, layout: Layout, *, boundary: str = "mixed",
                           config: ResponseConfig = ResponseConfig()):
    """Born effective charges of sources that depend on the positions.

    Args:
      sources: positions [N, 3] → (charges [N], dipoles [N, 3] or None), the total sources.
      positions: [N, 3]. layout: see :class:`Layout`. boundary: static.

    Returns:
      dict: bec [N, 3, 3], asr [G, 3, 3], polarization [G, 3] (e·Å), and bec_charge,
      bec_dipole [N, 3, 3] when ``config.split`` (or periodic).
    """

    def outputs(r):
        q, u = sources(r)
        return _bec_outputs(r, q, u, layout, boundary, config), (q, u)

    y, pullback, (q, u) = jax.vjp(outputs, positions, has_aux=True)
    (jacobian,) = jax.vmap(pullback)(_cotangents(y.shape[0], y.dtype))
    out = _assemble_bec(jacobian, positions, layout, boundary, config)
    out["polarization"] = polarization(positions, q, u, layout, boundary=boundary,
                                       remove_mean_charge=config.remove_mean_charge)
    return out


def born_effective_charges_fixed(positions, charges, dipoles=None, layout: Optional[Layout] = None, *,
                                 boundary: str = "mixed", config: ResponseConfig = ResponseConfig()):
    """Z* of sources that do not depend on the positions (point charges and dipoles)."""
    if layout is None:
        layout = single_layout(positions.shape[0], dtype=positions.dtype)
        boundary = "open" if boundary == "mixed" else boundary
    return born_effective_charges(lambda r: (charges, dipoles), positions, layout, boundary=boundary, config=config)


# ----------------------------------------------------------------------------- polarizability


def polarizability_sum(alpha, layout: Layout):
    """Σ_i α_i per structure [G, 3, 3] from per-atom α [N] (isotropic) or [N, 3, 3]."""
    alpha = _mask(alpha, layout)
    if alpha.ndim == 1:
        alpha = alpha[:, None, None] * jnp.eye(3, dtype=alpha.dtype)
    return _per_graph(alpha, layout)


def polarizability_volume(alpha):
    """e·Å²/V → Å³ (multiply by k_e = 1/(4πε0) = 14.3996 V·Å/e)."""
    return alpha * COULOMB


def field_driven_forces(forces, bec, external_field, graph_index):
    """F_i + Z*_iᵀ E_ext: forces [N, 3], bec [N, 3, 3], external_field [G, 3] (V/Å)."""
    field = jnp.asarray(external_field, forces.dtype)[graph_index]
    return forces + jnp.einsum("nab,na->nb", bec, field)


# ----------------------------------------------------------------------------- model level


def _device(graph):
    """Graph leaves as JAX arrays (host numpy graphs cannot be indexed by tracers)."""
    return jax.tree_util.tree_map(jnp.asarray, graph)


def _total_sources(out, graph):
    mask = graph.node_mask
    q = jnp.where(mask, out["charges"] + out["induced_charges"], 0.0)
    u = jnp.where(mask[:, None], out["dipoles"] + out["induced_dipoles"], 0.0)
    return q, u


def model_sources(model, params, graph, external_field=None, boundary: str = "mixed"):
    """positions → (total charges, total dipoles) of the model (for :func:`born_effective_charges`)."""
    graph = _device(graph)

    def sources(positions):
        out = model.apply(params, graph, positions, None, external_field, boundary)
        return _total_sources(out, graph)

    return sources


def system_polarizability(model, params, graph, external_field=None, boundary: str = "mixed",
                          remove_mean_charge: bool = False):
    """α_sys = ∂P/∂E_ext at fixed positions, [G, 3, 3] (e·Å²/V), by 3 forward-mode passes."""
    graph = _device(graph)
    layout = layout_of(graph)
    dtype = graph.positions.dtype
    num_graphs = graph.cell.shape[0]
    field = jnp.zeros((num_graphs, 3), dtype) if external_field is None else \
        jnp.broadcast_to(jnp.asarray(external_field, dtype), (num_graphs, 3))  # [3] or [1, 3]: every structure

    def p_of(f):
        out = model.apply(params, graph, None, None, f, boundary)
        q, u = _total_sources(out, graph)
        return polarization(graph.positions, q, u, layout, boundary=boundary, remove_mean_charge=remove_mean_charge)

    tangents = jnp.broadcast_to(jnp.eye(3, dtype=dtype)[:, None, :], (3, num_graphs, 3))
    columns = jax.vmap(lambda t: jax.jvp(p_of, (field,), (t,))[1])(tangents)  # [β, G, α]
    return jnp.where(graph.graph_mask[:, None, None], jnp.transpose(columns, (1, 2, 0)), 0.0)


def response(model, params, graph, external_field=None, boundary: str = "mixed", *,
             config: ResponseConfig = ResponseConfig(), bec: bool = True, stress: bool = False,
             polarizability: bool = False, include_e0: bool = True):
    """Energy, forces and the electrical response of a padded batch, from one linearization.

    Args:
      model, params, graph: as for ``Model.properties``.
      external_field: [G, 3] uniform field (V/Å) or None ([3] is applied to every structure).
      boundary: static 'periodic' | 'open' | 'mixed'.
      config: :class:`ResponseConfig`. bec: compute Born effective charges (and, with a
        field, the field-driven forces). stress: also the stress (eV/Å³, periodic only).
      polarizability: also α_sys by forward mode (and its per-atom sum).
      include_e0: add the per-element reference energies to ``energy``.

    Returns:
      dict with the model outputs of ``Model.apply`` and: energy [G], forces [N, 3]
      (−∂E/∂r), total_charges [N], total_dipoles [N, 3], polarization [G, 3] (e·Å),
      volume [G], polarizability_sum [G, 3, 3]; with ``bec``: bec, bec_charge, bec_dipole
      [N, 3, 3], asr [G, 3, 3], field_forces [N, 3] (= forces without a field); with
      ``stress``: stress [G, 3, 3]; with ``polarizability``: polarizability [G, 3, 3].
    """
    graph = _device(graph)
    layout = layout_of(graph)
    dtype = graph.positions.dtype
    num_graphs = graph.cell.shape[0]
    if external_field is not None:
        external_field = jnp.broadcast_to(jnp.asarray(external_field, dtype), (num_graphs, 3))

    def evaluate(positions, strain):
        deformation = jnp.eye(3, dtype=dtype) + strain
        strained_positions = jnp.einsum("ni,nij->nj", positions, deformation[graph.graph_index])
        strained_cell = jnp.einsum("gij,gjk->gik", graph.cell, deformation)
        out = model.apply(params, graph, strained_positions, strained_cell, external_field, boundary,
                          include_e0=include_e0)
        q, u = _total_sources(out, graph)
        strained_layout = layout._replace(cell=strained_cell)
        y = _bec_outputs(strained_positions, q, u, strained_layout, boundary, config) if bec else jnp.zeros((0,), dtype)
        return (jnp.sum(out["energy"]), y), out

    strain = jnp.zeros((num_graphs, 3, 3), dtype)
    (energy_sum, y), pullback, out = jax.vjp(evaluate, graph.positions, strain, has_aux=True)
    num_y = y.shape[0]
    cot_energy = jnp.concatenate([jnp.ones((1,), dtype), jnp.zeros((num_y,), dtype)])
    cot_y = jnp.concatenate([jnp.zeros((1, num_y), dtype), jnp.eye(num_y, dtype=dtype)])
    d_positions, d_strain = jax.vmap(lambda ce, cy: pullback((ce, cy)))(cot_energy, cot_y)

    out = dict(out)
    node = graph.node_mask[:, None]
    out["forces"] = jnp.where(node, -d_positions[0], 0.0)
    if stress:
        volume = jnp.abs(jnp.linalg.det(jnp.where(graph.periodic[:, None, None], graph.cell, jnp.eye(3, dtype=dtype))))
        out["stress"] = jnp.where(graph.periodic[:, None, None] & graph.graph_mask[:, None, None],
                                  d_strain[0] / volume[:, None, None], 0.0)
    q, u = _total_sources(out, graph)
    out["total_charges"], out["total_dipoles"] = q, u
    out["polarization"] = jnp.where(
        graph.graph_mask[:, None],
        polarization(graph.positions, q, u, layout, boundary=boundary, remove_mean_charge=config.remove_mean_charge),
        0.0)
    out["volume"] = volumes(layout)
    out["polarizability_sum"] = polarizability_sum(out["alpha"], layout)
    if bec:
        out.update(_assemble_bec(d_positions[1:], graph.positions, layout, boundary, config))
        if external_field is not None:
            out["field_forces"] = jnp.where(node, field_driven_forces(out["forces"], out["bec"], external_field,
                                                                      graph.graph_index), 0.0)
        else:
            out["field_forces"] = out["forces"]
    if polarizability:
        out["polarizability"] = system_polarizability(model, params, graph, external_field, boundary,
                                                      config.remove_mean_charge)
    return out


def make_response_fn(model, boundary: str = "mixed", config: ResponseConfig = ResponseConfig(), **flags):
    """``jax.jit`` of :func:`response` as f(params, graph, external_field or None)."""

    def fn(params, graph, external_field=None):
        return response(model, params, graph, external_field, boundary, config=config, **flags)

    return jax.jit(fn)
