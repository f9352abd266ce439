"""Latent Ewald electrostatics of Gaussian multipoles with one-shot linear response.

The pure core is :func:`electrostatics` (jit-able, static shapes, one structure) and its
batched form :func:`electrostatics_batch` (vmap over padded frames). :func:`ewald` is the
public entry point: it validates concrete inputs with clear errors, prepares the k-set on
the host in float64, and calls the jitted core.

Energy (eV) = E_perm(q, u, Q) + E_ind, with
  periodic:  E_perm = k-sum − [remove_self_interaction] E_self
  open:      E_perm = Σ_{i<j} pair energy + [not remove_self_interaction] E_self
  phi_i = ∂E_perm/∂q_i,  E_i = −∂E_perm/∂u_i   (permanent sources only)
  q_ind = −kappa phi,    E_ind,q = ½ Σ phi q_ind
  u_ind = alpha (E + E_ext), E_ind,u = −½ Σ E · u_ind
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from polarjax.electrostatics.kgrid import cell_is_open, kgrid_weights
from polarjax.electrostatics.realspace import realspace_terms
from polarjax.electrostatics.reciprocal import DEFAULT_CHUNK_FLOATS, reciprocal_terms
from polarjax.electrostatics.sources import self_energy, traceless_symmetric
from polarjax.units import DEFAULT_DL, DEFAULT_SIGMA

#: Keys of ``EwaldResult.terms``, always all present (zero for absent sources).
TERM_NAMES = (
    "charge_charge",
    "charge_dipole",
    "dipole_dipole",
    "charge_quadrupole",
    "dipole_quadrupole",
    "quadrupole_quadrupole",
    "self_interaction",
    "induced_charge",
    "induced_dipole",
)


class EwaldResult(NamedTuple):
    """Electrostatics of one structure (or a batch: leading axis G on every field).

    energy: [] total long-range energy (eV).
    potential: [N] phi of the permanent sources (V), zero on padding atoms.
    field: [N, 3] E of the permanent sources (V/Å), zero on padding atoms.
    induced_charges: [N] −kappa phi (e).
    induced_dipoles: [N, 3] alpha (E + E_ext) (e·Å).
    terms: dict name → [] energy breakdown (eV) over TERM_NAMES; sums to ``energy``.
    """

    energy: jnp.ndarray
    potential: jnp.ndarray
    field: jnp.ndarray
    induced_charges: jnp.ndarray
    induced_dipoles: jnp.ndarray
    terms: dict


def _masked(values, atom_mask):
    """Zero the sources of padding atoms (``where``, so gradients stay finite)."""
    if values is None:
        return None
    mask = atom_mask.reshape(atom_mask.shape + (1,) * (values.ndim - 1))
    return jnp.where(mask, values, 0.0)


def _apply_polarizability(alpha, field):
    """alpha [N] or [N, 3, 3] times field [N, 3] → [N, 3]."""
    if alpha.ndim == 1:
        return alpha[:, None] * field
    return jnp.einsum("nab,nb->na", alpha, field)


def _permanent_terms(positions, cell, charges, dipoles, quadrupoles, atom_mask, kweights, periodic, sigma, remove_self, chunk_floats):
    """Energy terms of the permanent sources for one static boundary type."""
    if periodic:
        terms = reciprocal_terms(positions, cell, charges, dipoles, quadrupoles, kweights, sigma, chunk_floats)
        sign = -1.0 if remove_self else 0.0
    else:
        terms = realspace_terms(positions, charges, dipoles, quadrupoles, atom_mask, sigma)
        sign = 0.0 if remove_self else 1.0
    if sign != 0.0:
        terms["self_interaction"] = sign * self_energy(charges, dipoles, quadrupoles, sigma)
    return terms


def _permanent_terms_any(positions, cell, periodic, charges, dipoles, quadrupoles, atom_mask, kweights, sigma, remove_self, chunk_floats):
    """Dispatch on ``periodic``: a Python bool compiles one branch; an array selects."""
    args = (charges, dipoles, quadrupoles, atom_mask)
    if isinstance(periodic, (bool, np.bool_)):
        return _permanent_terms(positions, cell, *args, kweights, bool(periodic), sigma, remove_self, chunk_floats)
    periodic = jnp.asarray(periodic)
    safe_cell = jnp.where(periodic, cell, jnp.eye(3, dtype=cell.dtype))
    on_k = _permanent_terms(positions, safe_cell, *args, kweights, True, sigma, remove_self, chunk_floats)
    on_r = _permanent_terms(positions, cell, *args, kweights, False, sigma, remove_self, chunk_floats)
    names = set(on_k) | set(on_r)
    zero = jnp.zeros((), positions.dtype)
    return {name: jnp.where(periodic, on_k.get(name, zero), on_r.get(name, zero)) for name in names}


def electrostatics(
    positions,
    cell,
    charges,
    dipoles=None,
    quadrupoles=None,
    kappa=None,
    alpha=None,
    external_field=None,
    atom_mask=None,
    kweights=None,
    *,
    periodic=True,
    sigma: float = DEFAULT_SIGMA,
    remove_self_interaction: bool = True,
    need_fields: bool = True,
    chunk_floats: int = DEFAULT_CHUNK_FLOATS,
) -> EwaldResult:
    """Pure, jit-able electrostatics of one structure (no validation).

    Args:
      positions: [N, 3] (Å).
      cell: [3, 3], rows are vectors (ignored for open boundaries).
      charges: [N] (e). dipoles: [N, 3] or None. quadrupoles: [N, 3, 3] or None
        (symmetrised and made traceless here).
      kappa: [N] or None. alpha: [N] or [N, 3, 3] or None. external_field: [3] or None.
      atom_mask: [N] bool or None (all real).
      kweights: [A, B, Z] half-space k-grid weights (required when periodic).
      periodic: Python bool (static) or a traced bool scalar (both branches are evaluated).
      sigma: Gaussian width (Å). remove_self_interaction: see module docstring.
      need_fields: compute potential and field even without kappa/alpha (costs a backward
        pass); when False and not needed by the response they are returned as zeros.

    Returns:
      EwaldResult.
    """
    num_atoms = positions.shape[0]
    dtype = positions.dtype
    if atom_mask is None:
        atom_mask = jnp.ones((num_atoms,), dtype=bool)
    atom_mask = atom_mask.astype(bool)
    if periodic is not False and kweights is None:
        raise ValueError("periodic electrostatics needs kweights (see polarjax.electrostatics.kgrid.kgrid_weights)")
    charges = _masked(charges.astype(dtype), atom_mask)
    quadrupoles = None if quadrupoles is None else _masked(traceless_symmetric(quadrupoles.astype(dtype)), atom_mask)
    need_potential = need_fields or kappa is not None
    need_field = need_fields or alpha is not None
    if dipoles is None and need_field:
        dipoles = jnp.zeros((num_atoms, 3), dtype)
    dipoles = None if dipoles is None else dipoles.astype(dtype)

    def permanent(q, u):
        q = _masked(q, atom_mask)
        u = _masked(u, atom_mask)
        terms = _permanent_terms_any(
            positions, cell, periodic, q, u, quadrupoles, atom_mask, kweights, sigma, remove_self_interaction, chunk_floats
        )
        return sum(terms.values()), terms

    zeros_n = jnp.zeros((num_atoms,), dtype)
    zeros_n3 = jnp.zeros((num_atoms, 3), dtype)
    if need_potential or need_field:
        energy_perm, pullback, terms = jax.vjp(permanent, charges, dipoles, has_aux=True)
        potential, minus_field = pullback(jnp.ones((), dtype))
        field = -minus_field
    else:
        energy_perm, terms = permanent(charges, dipoles)
        potential, field = zeros_n, zeros_n3

    induced_charges, induced_dipoles = zeros_n, zeros_n3
    terms = dict(terms)
    if kappa is not None:
        induced_charges = _masked(-kappa.astype(dtype) * potential, atom_mask)
        terms["induced_charge"] = 0.5 * jnp.sum(potential * induced_charges)
    if alpha is not None:
        total_field = field if external_field is None else field + external_field.astype(dtype)
        induced_dipoles = _masked(_apply_polarizability(alpha.astype(dtype), total_field), atom_mask)
        terms["induced_dipole"] = -0.5 * jnp.sum(field * induced_dipoles)
    zero = jnp.zeros((), dtype)
    terms = {name: terms.get(name, zero) for name in TERM_NAMES}
    energy = energy_perm + terms["induced_charge"] + terms["induced_dipole"]
    return EwaldResult(energy, potential, field, induced_charges, induced_dipoles, terms)


def electrostatics_batch(positions, cell, charges, dipoles=None, quadrupoles=None, kappa=None, alpha=None,
                         external_field=None, atom_mask=None, kweights=None, *, periodic, **options) -> EwaldResult:
    """:func:`electrostatics` vmapped over a leading frame axis G.

    Shapes gain a leading G: positions [G, N, 3], cell [G, 3, 3], kweights [G, A, B, Z],
    external_field [G, 3]; ``periodic`` is a Python bool (all frames alike, one branch)
    or a [G] bool array (mixed batch: both branches are evaluated and selected per frame).
    Padding frames: atom_mask all False.
    """
    static_periodic = isinstance(periodic, (bool, np.bool_))

    def one(p, c, q, u, quad, kap, alp, ext, mask, kw, per):
        return electrostatics(p, c, q, u, quad, kap, alp, ext, mask, kw,
                              periodic=bool(periodic) if static_periodic else per, **options)

    per = jnp.zeros(positions.shape[0], bool) if static_periodic else jnp.asarray(periodic)
    return jax.vmap(one)(positions, cell, charges, dipoles, quadrupoles, kappa, alpha, external_field, atom_mask, kweights, per)


_electrostatics_jit = jax.jit(
    electrostatics, static_argnames=("periodic", "sigma", "remove_self_interaction", "need_fields", "chunk_floats")
)


# ----------------------------------------------------------------------------- validation


def _concrete(value):
    """The value as a NumPy array, or None while it is being traced."""
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _check_shape(name, value, shape):
    if value is None:
        return
    actual = tuple(np.shape(value))
    if len(actual) != len(shape) or any(e is not None and a != e for a, e in zip(actual, shape)):
        expected = "[" + ", ".join("N" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {list(actual)}")


def _check_finite(name, value):
    array = _concrete(value)
    if array is not None and not np.all(np.isfinite(array)):
        bad = np.argwhere(~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)).ravel() if array.ndim else []
        where = f" (atoms {bad[:10].tolist()})" if len(bad) else ""
        raise ValueError(f"{name} contains NaN or inf{where}")


def validate_inputs(positions, cell, periodic, charges, dipoles, quadrupoles, kappa, alpha, external_field, atom_mask, sigma, dl):
    """Raise ValueError with a clear message for malformed inputs (concrete values only).

    Returns:
      The effective boundary: True (periodic) or False (open; also for an all-zero cell).
    """
    num_atoms = np.shape(positions)[0] if np.ndim(positions) >= 1 else None
    _check_shape("positions", positions, (None, 3))
    _check_shape("cell", cell, (3, 3))
    _check_shape("charges", charges, (num_atoms,))
    _check_shape("dipoles", dipoles, (num_atoms, 3))
    _check_shape("quadrupoles", quadrupoles, (num_atoms, 3, 3))
    _check_shape("kappa", kappa, (num_atoms,))
    if alpha is not None and np.ndim(alpha) == 1:
        _check_shape("alpha", alpha, (num_atoms,))
    else:
        _check_shape("alpha", alpha, (num_atoms, 3, 3))
    _check_shape("external_field", external_field, (3,))
    _check_shape("atom_mask", atom_mask, (num_atoms,))
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive length in Å, got {sigma!r}")
    if not (np.isfinite(dl) and dl > 0):
        raise ValueError(f"dl must be a positive length in Å, got {dl!r}")
    for name, value in (("positions", positions), ("cell", cell), ("charges", charges), ("dipoles", dipoles),
                        ("quadrupoles", quadrupoles), ("kappa", kappa), ("alpha", alpha),
                        ("external_field", external_field)):
        _check_finite(name, value)
    mask = _concrete(atom_mask)
    real = np.ones(num_atoms, bool) if mask is None else mask.astype(bool)
    kappa_np = _concrete(kappa)
    if kappa_np is not None and np.any(kappa_np[real] < 0):
        raise ValueError(f"kappa must be >= 0; negative on atoms {np.flatnonzero(real & (kappa_np < 0))[:10].tolist()}")
    alpha_np = _concrete(alpha)
    if alpha_np is not None:
        if alpha_np.ndim == 1:
            bad = np.flatnonzero(real & (alpha_np < 0))
        else:
            asym = np.abs(alpha_np - np.swapaxes(alpha_np, -1, -2)).max(axis=(-1, -2))
            scale = np.abs(alpha_np).max(axis=(-1, -2)) + 1e-300
            eig = np.linalg.eigvalsh(0.5 * (alpha_np + np.swapaxes(alpha_np, -1, -2)))
            bad = np.flatnonzero(real & ((asym > 1e-6 * scale) | (eig[:, 0] < -1e-6 * scale)))
        if len(bad):
            raise ValueError(f"alpha must be symmetric positive semidefinite; violated on atoms {bad[:10].tolist()}")
    cell_np = _concrete(cell)
    if not periodic:
        return False
    if cell_np is None:
        return True
    if cell_is_open(cell_np):
        return False
    volume = abs(np.linalg.det(cell_np))
    lengths = np.linalg.norm(cell_np, axis=1)
    if not volume > 1e-8 * max(np.prod(lengths), 1e-300):
        raise ValueError(f"cell is singular (volume {volume:.3g} Å³) but periodic=True; "
                         "use an all-zero cell or periodic=False for open boundaries")
    return True


def ewald(
    *,
    positions,
    cell=None,
    periodic: bool = True,
    charges,
    dipoles=None,
    quadrupoles=None,
    kappa=None,
    alpha=None,
    external_field=None,
    atom_mask=None,
    sigma: float = DEFAULT_SIGMA,
    dl: float = DEFAULT_DL,
    remove_self_interaction: bool = True,
    kweights=None,
    need_fields: bool = True,
    chunk_floats: int = DEFAULT_CHUNK_FLOATS,
) -> EwaldResult:
    """Long-range energy, potential, field and induced sources of one structure.

    Keyword-only. Validates concrete inputs, prepares the k-set on the host (float64) when
    the cell is concrete and ``kweights`` is not given, and runs the jitted core. Works
    under ``jax.grad``/``jax.jit`` of the caller; to differentiate with respect to the cell
    pass ``kweights`` explicitly (a fixed k-set).

    Args:
      positions: [N, 3] (Å). cell: [3, 3] rows are vectors; None or zeros → open boundaries.
      periodic: periodic boundaries (an all-zero cell is open regardless).
      charges: [N] (e). dipoles: [N, 3] (e·Å). quadrupoles: [N, 3, 3] (e·Å², primitive,
        symmetrised and made traceless). kappa: [N] >= 0 (e/V). alpha: [N] or [N, 3, 3]
        PSD (e·Å²/V). external_field: [3] (V/Å). atom_mask: [N] bool.
      sigma: Gaussian width (Å). dl: k-space resolution (Å).
      remove_self_interaction: subtract (periodic) / do not add (open) the continuum
        self-energy of the Gaussian sources.
      kweights: optional [A, B, Z] k-grid weights (see ``kgrid.kgrid_weights``).
      need_fields: also return potential/field without kappa/alpha (default True).

    Returns:
      EwaldResult (energy, potential, field, induced_charges, induced_dipoles, terms).
    """
    positions = jnp.asarray(positions)
    if positions.dtype not in (jnp.float32, jnp.float64):
        positions = positions.astype(jnp.result_type(float))
    if cell is None:
        cell = np.zeros((3, 3))
    effective_periodic = validate_inputs(positions, cell, periodic, charges, dipoles, quadrupoles, kappa, alpha,
                                         external_field, atom_mask, sigma, dl)
    cell_np = _concrete(cell)
    if effective_periodic and kweights is None:
        if cell_np is None:
            raise ValueError("the cell is traced (e.g. differentiated for stress): pass kweights="
                             "kgrid_weights(cell, dl) computed from the concrete cell")
        kweights = kgrid_weights(cell_np, dl)
    dtype = positions.dtype
    as_array = lambda x: None if x is None else jnp.asarray(x, dtype)
    return _electrostatics_jit(
        positions,
        jnp.asarray(cell, dtype),
        as_array(charges),
        as_array(dipoles),
        as_array(quadrupoles),
        as_array(kappa),
        as_array(alpha),
        as_array(external_field),
        None if atom_mask is None else jnp.asarray(atom_mask, bool),
        None if not effective_periodic else jnp.asarray(kweights, dtype),
        periodic=bool(effective_periodic),
        sigma=float(sigma),
        remove_self_interaction=bool(remove_self_interaction),
        need_fields=bool(need_fields),
        chunk_floats=int(chunk_floats),
    )
