"""MACE: higher body-order equivariant message passing (Batatia et al., 2022).

Node features h_i are ``C x (0e + 1o + 2e + ... up to L)``, L = max(l_max, 2), starting from
a learned species embedding ``C x 0e``. Each layer t:

1. **A-basis** (one-particle basis, summed over neighbours):

       A_i,c = Linear( 1/n̄ Σ_j  R(r_ij)_{c,path} ⊙ [Linear(h_j)_c ⊗ Y(r̂_ij)]_path )

   with Y the spherical harmonics up to ``l_max``, R a bias-free radial MLP on the
   enveloped Bessel basis, n̄ = ``avg_num_neighbors``; A is ``C x (0e + 1o + ... up to L)``.

2. **Symmetric contraction** to correlation order ν ≤ ``correlation`` (default 3, body order 4),
   channel by channel (channels are not mixed inside the products):

       B¹ = A,   B² = Sym²(A) (every symmetric Clebsch–Gordan coupling of two copies of A),
       B³ = B²_{l≤L} ⊗ A (every coupling of B² with A),
       m_i,c = Σ_ν Σ_paths W^ν_{Z_i, c, path} B^ν_{i,c,path}      (per-species, per-channel weights),

   keeping only the irreps of h. m is a polynomial of degree ≤ ``correlation`` in A and
   E(3)-equivariant (couplings by e3nn's real Clebsch–Gordan coefficients, allowed only
   between irreps whose parities multiply to the output parity). The couplings are
   precomputed dense tensors (numpy) and the degree-3 weights are folded into them, so
   the contraction is a few einsums (fast to compile); see :class:`SymmetricContraction`.

3. **Update**: h_i' = Linear(m_i) + Linear_{Z_i}(h_i) (species-indexed residual).

4. **Readout** per layer: linear on the 0e channels for all but the last layer, an MLP for the
   last one; the site energy is the sum of the layer readouts.

Features: a linear map of the last layer's h to ``C x (0e + 1o + 2e)``.
Smoothness and padding: as NequIP (enveloped, bias-free radial weights; padded edges get a
zero basis; outputs of padded atoms are zeroed).
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from polarjax.encoders import common

__all__ = ["MACE", "SymmetricContraction", "coupling_tensors"]


def _coupled_products(left: e3nn.Irreps, right: e3nn.Irreps, keep, symmetric: bool) -> Tuple[np.ndarray, e3nn.Irreps]:
    """Dense bilinear coupling W[i, j, r]: out_r = Σ_ij W[i, j, r] x_i y_j of ``left`` ⊗ ``right`` (each irrep mul 1)
    into every irrep accepted by ``keep`` (a predicate), with component normalisation.

    ``symmetric`` (x = y, left = right): each unordered pair of irreps once, and l_out with an
    antisymmetric coupling (odd l_out for equal irreps) dropped since it vanishes.
    Outputs are sorted by irrep (stable), so the returned irreps are regrouped.
    """
    blocks = []
    left_slices, right_slices = left.slices(), right.slices()
    for i, (_, ir_i) in enumerate(left):
        for j, (_, ir_j) in enumerate(right):
            if symmetric and j < i:
                continue
            for ir_out in ir_i * ir_j:
                if not keep(ir_out) or (symmetric and i == j and ir_out.l % 2 == 1):
                    continue
                block = np.zeros((left.dim, right.dim, ir_out.dim))
                cg = e3nn.clebsch_gordan(ir_i.l, ir_j.l, ir_out.l) * math.sqrt(ir_out.dim)
                block[left_slices[i], right_slices[j], :] = cg
                blocks.append((ir_out, block))
    blocks.sort(key=lambda item: item[0])
    irreps = e3nn.Irreps([(1, ir) for ir, _ in blocks]).simplify()
    return np.concatenate([block for _, block in blocks], axis=-1), irreps


@functools.lru_cache(maxsize=None)
def coupling_tensors(a_irreps: str, l_max_inner: int, keep: str) -> Tuple[np.ndarray, e3nn.Irreps, np.ndarray, e3nn.Irreps]:
    """Dense Clebsch–Gordan coupling tensors of the symmetric contraction (numpy, cached).

    Returns ``(W2, inner_irreps, W3, out3_irreps)`` with

        Sym²(A)_q = Σ_ij W2[i, j, q] A_i A_j          (all symmetric couplings with l ≤ l_max_inner)
        B³_r      = Σ_qk W3[q, k, r] Sym²(A)_q A_k     (all couplings into the irreps of ``keep``)

    ``a_irreps`` is the per-channel irreps of A (each with multiplicity 1). Coupling
    coefficients are e3nn's real Clebsch–Gordan coefficients (the basis of its irreps),
    scaled by √(2 l_out + 1) (component normalisation).
    """
    irreps = e3nn.Irreps(a_irreps)
    if any(mul != 1 for mul, _ in irreps):
        raise ValueError(f"A must have multiplicity 1 per irrep, got {irreps}")
    keep_irs = {ir for _, ir in e3nn.Irreps(keep)}
    W2, inner_irreps = _coupled_products(irreps, irreps, lambda ir: ir.l <= l_max_inner, symmetric=True)
    inner_split = e3nn.Irreps([(1, ir) for mul, ir in inner_irreps for _ in range(mul)])
    W3, out3_irreps = _coupled_products(inner_split, irreps, lambda ir: ir in keep_irs, symmetric=False)
    return W2, inner_irreps, W3, out3_irreps


class SymmetricContraction(nn.Module):
    """Per-species, per-channel symmetric contraction of A [N, C, irreps] to ``irreps_out`` (mul 1 each).

    For each output irrep ``ir`` a parameter ``w_<ir>`` [num_species, C, P] weights the P
    copies of ``ir`` among B¹ = A, B² = Sym²(A), B³ = Sym²(A)_{l ≤ l_max_inner} ⊗ A (in this
    order, normalised by 1/√P): out = Σ_p w[Z, c, p] B_p. B¹ and B² are formed explicitly;
    the degree-3 term is evaluated with the weights folded into the coupling tensor first:

        m³[n, c, o] = Σ_qk T[Z_n, c, q, k, o] Sym²(A)[n, c, q] A[n, c, k],
        T[z, c, q, k, o] = Σ_p w[z, c, p] W3[q, k, p, o],

    which costs ∝ num_species · dim(irreps_out) per (node, channel, q, k) instead of ∝ the
    number of degree-3 paths (~100 for l ≤ 2): several times fewer flops for a few species.
    """

    num_species: int
    irreps_out: e3nn.Irreps
    correlation: int = 3
    l_max_inner: int = 2

    @nn.compact
    def __call__(self, species: jnp.ndarray, A: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
        if not 1 <= self.correlation <= 3:
            raise ValueError("correlation must be 1, 2 or 3")
        num_nodes, C = A.shape[0], A.shape[1]
        dtype = A.dtype
        keep = e3nn.Irreps([(1, ir) for _, ir in e3nn.Irreps(self.irreps_out)])
        a = A.array
        terms = [A.filter(keep=keep)]
        if self.correlation >= 2:
            W2, inner_irreps, W3, out3_irreps = coupling_tensors(str(A.irreps), self.l_max_inner, str(keep))
            a2 = jnp.einsum("nci,ncj,ijq->ncq", a, a, W2.astype(dtype))  # Sym²(A), l ≤ l_max_inner
            terms.append(e3nn.IrrepsArray(inner_irreps, a2).filter(keep=keep))
        low = e3nn.concatenate(terms, axis=-1).regroup()  # B¹ and B² restricted to the output irreps

        chunks, folded = [], []
        for _, ir in keep:
            parts = [chunk for (_, ir_in), chunk in zip(low.irreps, low.chunks) if ir_in == ir and chunk is not None]
            n12 = sum(part.shape[-2] for part in parts)
            w3_blocks = []
            if self.correlation >= 3:
                for (mul, ir3), sl in zip(out3_irreps, out3_irreps.slices()):
                    if ir3 == ir:
                        w3_blocks.append(W3[:, :, sl].reshape(W3.shape[0], W3.shape[1], mul, ir.dim))
            n3 = sum(block.shape[2] for block in w3_blocks)
            # (an output irrep reachable by no product gets a zero-size weight and stays zero)
            w = self.param(f"w_{ir}", nn.initializers.normal(1.0), (self.num_species, C, n12 + n3), jnp.float32)
            w = w.astype(dtype) / math.sqrt(max(n12 + n3, 1))
            out = jnp.zeros((num_nodes, C, ir.dim), dtype)
            if n12:
                block = jnp.concatenate(parts, axis=-2)  # [N, C, n12, dim]
                out = out + jnp.einsum("nckd,nck->ncd", block, w[species][:, :, :n12])
            chunks.append(out)
            if self.correlation >= 3:
                W3_ir = np.concatenate(w3_blocks, axis=2) if w3_blocks else np.zeros(W3.shape[:2] + (0, ir.dim))
                folded.append(jnp.einsum("qkpd,zcp->zcqkd", W3_ir.astype(dtype), w[:, :, n12:]))

        if self.correlation >= 3:
            T = jnp.concatenate(folded, axis=-1)  # [S, C, Q, dim, dim(keep)]
            S, _, Q, D, O = T.shape
            P = (a2[:, :, :, None] * a[:, :, None, :]).reshape(num_nodes, C, Q * D)
            Y = jnp.einsum("ncx,zcxo->nzco", P, T.reshape(S, C, Q * D, O))
            m3 = jnp.einsum("nz,nzco->nco", jax.nn.one_hot(species, S, dtype=dtype), Y)
            offsets = np.cumsum([0] + [ir.dim for _, ir in keep])
            chunks = [chunk + m3[:, :, offsets[i] : offsets[i + 1]] for i, chunk in enumerate(chunks)]
        return e3nn.from_chunks(keep, [chunk[:, :, None, :] for chunk in chunks], (num_nodes, C), dtype)


class MACE(nn.Module):
    """MACE encoder; see the module docstring.

    Attributes:
      num_species: number of species indices.
      cutoff: radial cutoff r_c (Å).
      num_channels: C, multiplicity of each irrep of the hidden features and the A-basis.
      l_max: largest l of the edge spherical harmonics (≥ 1); hidden features and A go up to max(l_max, 2).
      num_layers: message-passing layers (1 or 2 in the paper's setting; any ≥ 1 works).
      num_radial_basis: Bessel functions in the radial basis.
      correlation: body order − 1 of the symmetric contraction (1, 2 or 3).
      radial_hidden: hidden widths of the radial MLPs.
      readout_hidden: hidden widths of the last layer's energy MLP.
      avg_num_neighbors: fixed n̄; the A-basis sums are scaled by 1/n̄.
      envelope_p: exponent of the polynomial cutoff envelope.
    """

    num_species: int
    cutoff: float
    num_channels: int = 32
    l_max: int = 2
    num_layers: int = 2
    num_radial_basis: int = 8
    correlation: int = 3
    radial_hidden: Tuple[int, ...] = (64,)
    readout_hidden: Tuple[int, ...] = (16,)
    avg_num_neighbors: float = 10.0
    envelope_p: int = 6

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, node_mask, edge_mask):
        """See :mod:`polarjax.encoders`: returns (energy [N], features IrrepsArray [N, C x (0e + 1o + 2e)])."""
        if self.l_max < 1:
            raise ValueError("MACE needs l_max >= 1")
        dtype = vectors.dtype
        num_nodes = species.shape[0]
        C = self.num_channels
        L = max(self.l_max, 2)
        per_channel = e3nn.Irreps.spherical_harmonics(L)  # 0e + 1o + 2e + ... (natural parity)
        hidden = (C * per_channel).regroup()

        edge_mask_f = edge_mask.astype(dtype)
        lengths = common.safe_norm(vectors)
        basis = common.radial_embedding(lengths, self.cutoff, self.num_radial_basis, self.envelope_p)
        basis = basis * edge_mask_f[:, None]  # padded edges: zero basis → zero contributions
        sh = common.spherical_harmonics(vectors, self.l_max)

        h = common.species_embedding(species, self.num_species, C)  # [N, C x 0e]
        energy = jnp.zeros((num_nodes,), dtype)
        for layer in range(self.num_layers):
            last = layer == self.num_layers - 1
            # 1. A-basis
            x = e3nn.flax.Linear(h.irreps, name=f"linear_up_{layer}")(h)
            tp = e3nn.tensor_product(x[senders], sh, filter_ir_out=per_channel)  # [E, paths]
            weights = common.RadialMLP(self.radial_hidden, tp.irreps.num_irreps, name=f"radial_{layer}")(basis)
            density = common.scatter_to_nodes(common.weight_by_irrep(tp, weights), receivers, num_nodes)
            density = density / self.avg_num_neighbors
            A = e3nn.flax.Linear(hidden, force_irreps_out=True, name=f"linear_A_{layer}")(density)
            A = A.mul_to_axis(C)  # [N, C, per_channel]

            # 2. symmetric contraction with per-species weights
            m = SymmetricContraction(self.num_species, per_channel, self.correlation, L, name=f"contraction_{layer}")(species, A)
            m = m.axis_to_mul()  # [N, C x per_channel]

            # 3. update with species-indexed residual
            m = e3nn.flax.Linear(hidden, force_irreps_out=True, name=f"linear_message_{layer}")(m)
            skip = e3nn.flax.Linear(
                hidden, num_indexed_weights=self.num_species, force_irreps_out=True, name=f"self_connection_{layer}"
            )(species, h)
            h = m.regroup() + skip.regroup()

            # 4. readout
            s = h.filter(keep="0e").array
            if last:
                for k, width in enumerate(self.readout_hidden):
                    s = jax.nn.silu(nn.Dense(width, name=f"readout_{layer}_{k}")(s))
            energy = energy + nn.Dense(1, name=f"readout_{layer}_out")(s)[:, 0]

        features = e3nn.flax.Linear(common.feature_irreps(C), force_irreps_out=True, name="features")(h)
        node_mask_f = node_mask.astype(dtype)
        return energy * node_mask_f, features * node_mask_f[:, None]
