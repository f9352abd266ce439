"""CACE: the Cartesian atomic cluster expansion encoder (Cheng, 2024).

Angular basis: the Cartesian monomials of the unit edge vector, ``n_x^a n_y^b n_z^c`` with
``a + b + c = l ≤ l_max`` — the independent entries of the symmetric rank-l tensor
``n̂^{⊗l}``. With central atom i = receiver and neighbour j = sender,

    A_i[c, (a,b,c)] = (1/n̄) Σ_j  R_{c,l}(r_ij) s_c(Z_j) t_c(Z_i)  n_x^a n_y^b n_z^c,

where R_{c,l} = a linear map (per l) of the enveloped Bessel radial basis, s and t are
species embeddings, and n̄ = ``avg_num_neighbors`` is a fixed constant.

Symmetrised invariants (channel-wise, products of ν ≤ 3 A's, i.e. up to (ν+1)-body):

* ``B1 = A_{l=0}``                                     (2-body),
* ``B2_l = Σ_{i1..il} A_{i1..il} A_{i1..il}``          (3-body; full contraction, the
  multinomial weights of the monomials come from expanding to the full tensor),
* ``B3_{l1 l2 l3}``: the complete contraction of three tensors of ranks l1 ≤ l2 ≤ l3
  (l1 + l2 + l3 even, triangle inequality), e.g. ``A_i A_j A_ij``  (4-body).

Optional message passing (``message_passing=True``: ``num_layers − 1`` steps, one with the
defaults): ``A_i += (1/n̄) Σ_j [R'_{c,l}(r_ij) h_j,c n̂_ij^{⊗l} + R''_{c,l}(r_ij) A_j]``,
with ``h_j`` a linear map of the neighbour's invariants, then the invariants are
recomputed; the readout sees the invariants of every layer.

Energy: an invariant SiLU MLP of all invariants. Equivariant features: scalars
(linear map of the invariants), vectors from the rank-1 tensors (A_1 and the contraction
A_2·A_1) — a Cartesian vector is e3nn's 1o in (x, y, z) order — and rank-2 tensors (the
traceless parts of A_2 and A_1 A_1ᵀ) converted to 2e with the change of basis of
:mod:`polarjax.cartesian`; each kind also gated by invariants, then linearly mixed to
``C × (0e + 1o + 2e)``. Parity: a rank-l monomial has parity (−1)^l, so all complete
contractions are O(3) invariant.
"""

from __future__ import annotations

import itertools
import string
from typing import List, Tuple

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from polarjax.cartesian import cartesian_to_irrep2
from polarjax.encoders import common

__all__ = ["CACE", "monomial_exponents", "monomials", "to_full_tensor", "symmetrised_invariants", "three_body_paths"]


def monomial_exponents(l: int) -> List[Tuple[int, int, int]]:
    """The exponents (a, b, c), a + b + c = l, in a fixed order ((l+1)(l+2)/2 of them)."""
    return [(a, b, l - a - b) for a in range(l, -1, -1) for b in range(l - a, -1, -1)]


def _full_index(l: int) -> np.ndarray:
    """[3]*l array: the monomial index of every entry (i1..il) of a symmetric rank-l tensor."""
    lookup = {e: k for k, e in enumerate(monomial_exponents(l))}
    index = np.zeros((3,) * l, dtype=np.int32)
    for entry in itertools.product(range(3), repeat=l):
        counts = tuple(entry.count(axis) for axis in range(3))
        index[entry] = lookup[counts]
    return index


def monomials(unit: jnp.ndarray, l: int) -> jnp.ndarray:
    """[E, 3] → [E, (l+1)(l+2)/2] monomials n_x^a n_y^b n_z^c (products only: safe at n = 0)."""
    cols = []
    for a, b, c in monomial_exponents(l):
        term = jnp.ones(unit.shape[:-1], unit.dtype)
        for axis, power in zip(range(3), (a, b, c)):
            for _ in range(power):
                term = term * unit[..., axis]
        cols.append(term)
    return jnp.stack(cols, axis=-1)


def to_full_tensor(compact: jnp.ndarray, l: int) -> jnp.ndarray:
    """[..., (l+1)(l+2)/2] monomial coefficients → [..., 3, …, 3] the symmetric rank-l tensor."""
    if l == 0:
        return compact[..., 0]
    return compact[..., _full_index(l)]


def three_body_paths(l_max: int) -> List[Tuple[int, int, int]]:
    """(l1 ≤ l2 ≤ l3 ≤ l_max) with a complete pairwise contraction: even sum, triangle inequality."""
    return [
        (l1, l2, l3)
        for l1 in range(l_max + 1)
        for l2 in range(l1, l_max + 1)
        for l3 in range(l2, l_max + 1)
        if (l1 + l2 + l3) % 2 == 0 and l3 <= l1 + l2
    ]


def _contraction_string(l1: int, l2: int, l3: int) -> str:
    """einsum string contracting three symmetric tensors completely (leading '...')."""
    k12, k13, k23 = (l1 + l2 - l3) // 2, (l1 + l3 - l2) // 2, (l2 + l3 - l1) // 2
    letters = iter(string.ascii_lowercase)
    s12 = "".join(next(letters) for _ in range(k12))
    s13 = "".join(next(letters) for _ in range(k13))
    s23 = "".join(next(letters) for _ in range(k23))
    return f"...{s12}{s13},...{s12}{s23},...{s13}{s23}->..."


def symmetrised_invariants(full: List[jnp.ndarray], l_max: int) -> jnp.ndarray:
    """Channel-wise invariants of the A-basis.

    Args:
      full: ``full[l]`` the rank-l A tensors [N, C, 3, …, 3] for l = 0..l_max.
    Returns: [N, C, 1 + (l_max + 1) + len(three_body_paths(l_max))].
    """
    invariants = [full[0]]
    for l in range(l_max + 1):
        invariants.append(jnp.sum((full[l] * full[l]).reshape(full[l].shape[:2] + (-1,)), axis=-1))
    for l1, l2, l3 in three_body_paths(l_max):
        invariants.append(jnp.einsum(_contraction_string(l1, l2, l3), full[l1], full[l2], full[l3]))
    return jnp.stack(invariants, axis=-1)


def _traceless(t: jnp.ndarray) -> jnp.ndarray:
    return t - jnp.trace(t, axis1=-2, axis2=-1)[..., None, None] * jnp.eye(3, dtype=t.dtype) / 3.0


class CACE(nn.Module):
    """Cartesian ACE encoder; see the module docstring.

    Attributes:
      num_species: number of species indices.
      cutoff: radial cutoff (Å).
      num_channels: C, channels of the A-basis (and of the output features).
      l_max: largest Cartesian rank in the invariants (the rank-1/2 tensors for the output
        features are always built).
      num_layers: 1 + the number of message-passing steps when ``message_passing``.
      num_radial_basis: Bessel functions in the radial basis.
      message_passing: enable the message-passing step(s).
      readout_hidden: hidden widths of the invariant energy MLP.
      avg_num_neighbors: fixed normalisation n̄ of the neighbour sums (1/n̄).
      envelope_p: exponent p of the polynomial cutoff envelope.
    """

    num_species: int
    cutoff: float
    num_channels: int = 32
    l_max: int = 2
    num_layers: int = 2
    num_radial_basis: int = 8
    message_passing: bool = True
    readout_hidden: Tuple[int, ...] = (64, 64)
    avg_num_neighbors: float = 12.0
    envelope_p: int = 6

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, node_mask, edge_mask):
        """See :mod:`polarjax.encoders`: returns (energy [N], features IrrepsArray [N, C×(0e+1o+2e)])."""
        dtype = vectors.dtype
        num_nodes = species.shape[0]
        C = self.num_channels
        L = max(self.l_max, 2)  # ranks built; invariants use l <= l_max
        norm = 1.0 / self.avg_num_neighbors

        edge_mask_f = edge_mask.astype(dtype)
        lengths = common.safe_norm(vectors)
        unit = vectors / jnp.where(lengths > 0, lengths, 1.0)[:, None]
        basis = common.radial_basis(lengths, self.cutoff, self.num_radial_basis, self.envelope_p)
        basis = basis * edge_mask_f[:, None]  # [E, nb], vanishes smoothly at the cutoff
        angular = [monomials(unit, l) for l in range(L + 1)]  # [E, n_l]

        s_emb = common.species_embedding(species, self.num_species, C, name="neighbour_embedding").array
        t_emb = common.species_embedding(species, self.num_species, C, name="centre_embedding").array
        species_w = s_emb[senders] * t_emb[receivers]  # [E, C]

        def radial(name: str) -> List[jnp.ndarray]:
            """Per-l linear maps of the (enveloped) radial basis, no bias: [E, C] each."""
            return [nn.Dense(C, use_bias=False, name=f"{name}_l{l}")(basis) for l in range(L + 1)]

        def scatter(edge_values: jnp.ndarray) -> jnp.ndarray:
            return common.scatter_to_nodes(edge_values, receivers, num_nodes) * norm

        radial0 = radial("radial")
        A = [scatter((radial0[l] * species_w)[:, :, None] * angular[l][:, None, :]) for l in range(L + 1)]

        def invariants(A):
            full = [to_full_tensor(A[l], l) for l in range(self.l_max + 1)]
            return symmetrised_invariants(full, self.l_max).reshape(num_nodes, -1)

        all_b = [invariants(A)]
        steps = (self.num_layers - 1) if self.message_passing else 0
        for step in range(steps):
            h = nn.Dense(C, name=f"message_scalars_{step}")(all_b[-1])  # [N, C] invariant
            r_scalar, r_tensor = radial(f"message_radial_{step}"), radial(f"message_mix_{step}")
            A = [
                A[l]
                + scatter((r_scalar[l] * h[senders])[:, :, None] * angular[l][:, None, :])
                + scatter(r_tensor[l][:, :, None] * A[l][senders])
                for l in range(L + 1)
            ]
            all_b.append(invariants(A))
        b = jnp.concatenate(all_b, axis=-1)  # [N, F]

        # --- invariant readout
        x = b
        for k, width in enumerate(self.readout_hidden):
            x = jax.nn.silu(nn.Dense(width, name=f"readout_{k}")(x))
        energy = nn.Dense(1, name="readout_out")(x)[:, 0]

        # --- equivariant features from the last layer's rank-1 and rank-2 tensors
        a1 = A[1]  # [N, C, 3]: monomials (x, y, z) in this order
        a2 = to_full_tensor(A[2], 2)  # [N, C, 3, 3] symmetric
        vec = [a1, jnp.einsum("ncij,ncj->nci", a2, a1)]
        ten = [_traceless(a2), _traceless(jnp.einsum("nci,ncj->ncij", a1, a1))]
        gates = nn.Dense(4 * C, name="feature_gates")(b).reshape(num_nodes, 4, C)
        vec = vec + [gates[:, k, :, None] * v for k, v in enumerate(vec)]
        ten = ten + [gates[:, 2 + k, :, None, None] * t for k, t in enumerate(ten)]
        vec = jnp.concatenate(vec, axis=1)  # [N, 4C, 3]
        ten = cartesian_to_irrep2(jnp.concatenate(ten, axis=1))  # [N, 4C, 5]
        scalars = nn.Dense(C, name="feature_scalars")(b)
        raw = e3nn.concatenate(
            [
                e3nn.IrrepsArray(f"{C}x0e", scalars),
                e3nn.IrrepsArray(f"{4 * C}x1o", vec.reshape(num_nodes, -1)),
                e3nn.IrrepsArray(f"{4 * C}x2e", ten.reshape(num_nodes, -1)),
            ]
        )
        features = e3nn.flax.Linear(common.feature_irreps(C), name="atom_features")(raw)

        node_mask_f = node_mask.astype(dtype)
        return energy * node_mask_f, features * node_mask_f[:, None]
