"""NequIP: E(3)-equivariant message passing with tensor-product convolutions (Batzner et al., 2022).

Node features h_i are an IrrepsArray ``C x (0e + 1o + 2e + ... up to L)`` (L = max(l_max, 2);
with ``parity=True`` also the opposite-parity irreps 0o + 1e + 2o + ...), starting from a
learned species embedding ``C x 0e``. Each interaction block does

    x_i   = Linear(h_i)                                                  (self-interaction)
    m_i   = 1/√n̄ Σ_j  R(r_ij)_path ⊙ [x_j ⊗ Y(r̂_ij)]_path                (convolution)
    h_i' = Gate(Linear(m_i)) + Linear_{Z_i}(h_i)                        (gated update + species-indexed self-connection)

where ⊗ is the channel-wise ("uvu") tensor product of each channel's irreps with the edge
spherical harmonics Y_0..Y_lmax, R is a bias-free radial MLP on the enveloped Bessel
basis giving one weight per (channel, path), n̄ = ``avg_num_neighbors``. The gate applies
SiLU (even) / tanh (odd) to scalars and sigmoid gates to the non-scalars.

Energy: an invariant readout (MLP on the 0e channels of the last block) per atom.
Features: a linear map of the last block's h to ``C x (0e + 1o + 2e)`` (with ``l_max = 1``
the channel-wise square 1o ⊗ 1o → 2e of h is added to its input, so that 2e features
exist even with a single block).

Normalisation: 1/√n̄ on the neighbour sums (messages of different neighbours are treated
as uncorrelated); e3nn's component-normalised spherical harmonics and path-normalised
linear layers, variance-preserving radial MLP initialisation.

Smoothness: every message is multiplied by R(r) ∝ the polynomial envelope (radial MLP
without biases on an enveloped basis), so messages vanish with two derivatives at r_c.
Padding: the radial basis of padded edges is zeroed, padded atoms' outputs are zeroed.
"""

from __future__ import annotations

import math
from typing import Tuple

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from polarjax.encoders import common

__all__ = ["NequIP"]


class NequIP(nn.Module):
    """NequIP encoder; see the module docstring.

    Attributes:
      num_species: number of species indices.
      cutoff: radial cutoff r_c (Å).
      num_channels: C, multiplicity of each irrep of the hidden features.
      l_max: largest l of the edge spherical harmonics (≥ 1); hidden features go up to max(l_max, 2).
      num_layers: number of interaction blocks.
      num_radial_basis: Bessel functions in the radial basis.
      parity: keep both parities of every l in the hidden features (0e, 0o, 1o, 1e, ...);
        False keeps only the natural ones (0e, 1o, 2e, ...), cheaper.
      radial_hidden: hidden widths of the radial MLPs.
      readout_hidden: hidden widths of the invariant energy readout.
      avg_num_neighbors: fixed n̄; neighbour sums are scaled by 1/√n̄.
      envelope_p: exponent of the polynomial cutoff envelope.
    """

    num_species: int
    cutoff: float
    num_channels: int = 32
    l_max: int = 2
    num_layers: int = 2
    num_radial_basis: int = 8
    parity: bool = True
    radial_hidden: Tuple[int, ...] = (64,)
    readout_hidden: Tuple[int, ...] = (16,)
    avg_num_neighbors: float = 10.0
    envelope_p: int = 6

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, node_mask, edge_mask):
        """See :mod:`polarjax.encoders`: returns (energy [N], features IrrepsArray [N, C x (0e + 1o + 2e)])."""
        if self.l_max < 1:
            raise ValueError("NequIP needs l_max >= 1")
        dtype = vectors.dtype
        num_nodes = species.shape[0]
        C = self.num_channels
        L = max(self.l_max, 2)
        hidden = common.hidden_irreps(C, L, "both" if self.parity else "natural")
        scalars_ir = hidden.filter(keep=["0e", "0o"])
        nonscalars_ir = hidden.filter(drop=["0e", "0o"])
        # gate input: activated scalars, then the (even) gates, then the gated non-scalars
        gate_in = scalars_ir + e3nn.Irreps(f"{nonscalars_ir.num_irreps}x0e") + nonscalars_ir
        norm = 1.0 / math.sqrt(self.avg_num_neighbors)

        edge_mask_f = edge_mask.astype(dtype)
        lengths = common.safe_norm(vectors)
        basis = common.radial_embedding(lengths, self.cutoff, self.num_radial_basis, self.envelope_p)
        basis = basis * edge_mask_f[:, None]  # padded edges: zero basis → zero messages
        sh = common.spherical_harmonics(vectors, self.l_max)  # [E, 0e + 1o + ...]

        h = common.species_embedding(species, self.num_species, C)  # [N, C x 0e]
        for layer in range(self.num_layers):
            x = e3nn.flax.Linear(h.irreps, name=f"linear_up_{layer}")(h)
            tp = e3nn.tensor_product(x[senders], sh, filter_ir_out=gate_in)  # [E, paths]
            weights = common.RadialMLP(self.radial_hidden, tp.irreps.num_irreps, name=f"radial_{layer}")(basis)
            messages = common.weight_by_irrep(tp, weights)
            m = common.scatter_to_nodes(messages, receivers, num_nodes) * norm
            update = e3nn.gate(
                e3nn.flax.Linear(gate_in, force_irreps_out=True, name=f"linear_down_{layer}")(m),
                even_act=jax.nn.silu,
                odd_act=jnp.tanh,
            )
            skip = e3nn.flax.Linear(
                hidden, num_indexed_weights=self.num_species, force_irreps_out=True, name=f"self_connection_{layer}"
            )(species, h)
            h = update.regroup() + skip.regroup()  # both exactly `hidden`

        # invariant energy readout from the last block's even scalars
        s = h.filter(keep="0e").array
        for k, width in enumerate(self.readout_hidden):
            s = jax.nn.silu(nn.Dense(width, name=f"readout_{k}")(s))
        energy = nn.Dense(1, name="readout_out")(s)[:, 0]

        if self.l_max < 2:
            # with l_max = 1 and a single block no 2e channel is reachable by convolution:
            # add the channel-wise symmetric square of the vectors (1o ⊗ 1o → 2e)
            vectors_sq = e3nn.tensor_square(h.filter(keep="1o").mul_to_axis(C)).filter(keep="2e").axis_to_mul()
            h = e3nn.concatenate([h, vectors_sq]).regroup()
        features = e3nn.flax.Linear(common.feature_irreps(C), force_irreps_out=True, name="features")(h)
        node_mask_f = node_mask.astype(dtype)
        return energy * node_mask_f, features * node_mask_f[:, None]
