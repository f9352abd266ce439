"""Allegro: a strictly local, edge-centred equivariant encoder (Musaelian et al., 2023).

Every ordered edge ij (central atom i = receiver, neighbour j = sender) carries

* an invariant latent ``x_ij`` (MLP of the two species and the radial basis), and
* equivariant features ``V_ij`` [C, 0e + 1o + 2e + … up to l_max] (natural parity).

Each layer builds the environment embedding of the central atom,

    Γ_i = (1/√n̄) Σ_k  u(r_ik) w(x_ik) ⊙ Y(r̂_ik)          (channel- and l-wise weights),

takes the channel-wise tensor product ``V_ij ⊗ Γ_i`` (all paths into the kept irreps),
mixes channels/paths linearly into the new ``V_ij`` and feeds the invariant (0e) outputs
of the product, with ``x_ij``, through an MLP for the residual update of ``x_ij``.
There is no message passing between atoms: atom i only ever sees atoms within the cutoff
of itself, so the receptive field is the cutoff.

Outputs: the per-edge energy ``MLP(x_ij) u(r_ij)`` summed onto the central atom (scaled
by 1/√n̄), and atom features: envelope-weighted sums of the edge features onto the
central atom, linearly mapped to ``C × (0e + 1o + 2e)``.

Every contribution of edge ij to anything outside the edge carries the polynomial
envelope u(r_ij) (and the radial basis itself is enveloped), so energy and forces are
smooth as a neighbour crosses the cutoff. ``n̄ = avg_num_neighbors`` is a fixed constant.
"""

from __future__ import annotations

import math
from typing import Tuple

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from polarjax.encoders import common

__all__ = ["Allegro"]


def _mlp(x: jnp.ndarray, hidden: Tuple[int, ...], out: int, name: str, out_bias: bool = True) -> jnp.ndarray:
    """SiLU MLP [.., F] → [.., out] (default Flax Dense initialisation)."""
    for k, width in enumerate(hidden):
        x = jax.nn.silu(nn.Dense(width, name=f"{name}_{k}")(x))
    return nn.Dense(out, use_bias=out_bias, name=f"{name}_out")(x)


def _scale_by_l(weights: jnp.ndarray, y: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
    """weights [E, C, L+1] ⊙ y → [E, C, irreps]: every irrep of degree l is scaled by weights[..., l].

    ``y`` is [E, irreps] (broadcast over the C channels) or already [E, C, irreps].
    """
    chunks = []
    for (_, ir), chunk in zip(y.irreps, y.chunks):
        if chunk is None:
            chunks.append(None)
            continue
        if y.ndim == 2:
            chunk = chunk[:, None]
        chunks.append(weights[:, :, ir.l, None, None] * chunk)
    return e3nn.from_chunks(y.irreps, chunks, weights.shape[:2], y.dtype)


class Allegro(nn.Module):
    """Allegro encoder; see the module docstring.

    Attributes:
      num_species: number of species indices.
      cutoff: radial cutoff (Å).
      num_channels: C, equivariant channels per edge (and per atom in the output features).
      l_max: largest l of the edge features and environment embeddings (≥ 1).
      num_layers: number of Allegro tensor-product layers.
      num_radial_basis: Bessel functions in the radial basis.
      latent_dim: width of the invariant edge latent x_ij.
      mlp_hidden: hidden widths of the latent MLPs (two-body embedding and updates).
      energy_hidden: hidden widths of the per-edge energy MLP.
      avg_num_neighbors: fixed normalisation n̄ of the neighbour sums (1/√n̄).
      envelope_p: exponent p of the polynomial cutoff envelope.
    """

    num_species: int
    cutoff: float
    num_channels: int = 32
    l_max: int = 2
    num_layers: int = 2
    num_radial_basis: int = 8
    latent_dim: int = 64
    mlp_hidden: Tuple[int, ...] = (64,)
    energy_hidden: Tuple[int, ...] = (32,)
    avg_num_neighbors: float = 12.0
    envelope_p: int = 6

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, node_mask, edge_mask):
        """See :mod:`polarjax.encoders`: returns (energy [N], features IrrepsArray [N, C×(0e+1o+2e)])."""
        if self.l_max < 1:
            raise ValueError("Allegro needs l_max >= 1")
        dtype = vectors.dtype
        num_nodes = species.shape[0]
        num_edges = vectors.shape[0]
        C = self.num_channels
        norm = 1.0 / math.sqrt(self.avg_num_neighbors)

        edge_mask_f = edge_mask.astype(dtype)
        lengths = common.safe_norm(vectors)
        envelope = common.poly_envelope(lengths, self.cutoff, self.envelope_p) * edge_mask_f  # u(r) [E]
        basis = common.radial_basis(lengths, self.cutoff, self.num_radial_basis, self.envelope_p)
        basis = basis * edge_mask_f[:, None]
        sh_lmax = max(self.l_max, 2)
        harmonics = common.safe_spherical_harmonics(e3nn.Irreps.spherical_harmonics(sh_lmax), vectors)  # [E, sh]
        harmonics = harmonics * edge_mask_f[:, None]
        harm_l = harmonics.filter(lmax=self.l_max)  # edge-feature harmonics
        feature_irreps = e3nn.Irreps.spherical_harmonics(self.l_max)  # 0e + 1o + 2e + … (natural parity)

        # --- two-body latent from (Z_i, Z_j, radial basis)
        onehot_i = jax.nn.one_hot(species[receivers], self.num_species, dtype=dtype)
        onehot_j = jax.nn.one_hot(species[senders], self.num_species, dtype=dtype)
        x = _mlp(jnp.concatenate([onehot_i, onehot_j, basis], axis=-1), self.mlp_hidden, self.latent_dim, "two_body")
        x = x * envelope[:, None]

        # --- initial equivariant edge features V_ij = w(x_ij)_{c,l} Y_l(r̂_ij)
        w0 = nn.Dense(C * (self.l_max + 1), name="initial_weights")(x).reshape(num_edges, C, self.l_max + 1)
        features = _scale_by_l(w0, harm_l)  # [E, C, feature_irreps]

        for layer in range(self.num_layers):
            # environment embedding of the central atom (strictly local: sum over its own edges)
            w_env = nn.Dense(C * (self.l_max + 1), name=f"env_weights_{layer}")(x)
            w_env = w_env.reshape(num_edges, C, self.l_max + 1) * envelope[:, None, None]
            env_edges = _scale_by_l(w_env, harm_l)
            env = common.scatter_to_nodes(env_edges, receivers, num_nodes) * norm  # [N, C, sh]
            # channel-wise tensor product of the edge features with the central environment
            tp = e3nn.tensor_product(features, env[receivers], filter_ir_out=feature_irreps)  # [E, C, paths]
            scalars = tp.filter(keep="0e").array.reshape(num_edges, -1)
            # invariant latent update (residual), kept envelope-weighted
            update = _mlp(jnp.concatenate([x, scalars], axis=-1), self.mlp_hidden, self.latent_dim, f"latent_{layer}")
            x = (x + update * envelope[:, None]) / math.sqrt(2.0)
            # new equivariant features: mix channels and paths, gated by the updated latent
            mixed = e3nn.flax.Linear(C * feature_irreps, name=f"mix_{layer}")(tp.axis_to_mul())
            mixed = mixed.mul_to_axis(C)  # [E, C, feature_irreps]
            gates = nn.Dense(C * (self.l_max + 1), name=f"gates_{layer}")(x).reshape(num_edges, C, self.l_max + 1)
            features = _scale_by_l(gates, mixed)

        # --- per-edge energies summed onto the central atom
        edge_energy = _mlp(x, self.energy_hidden, 1, "edge_energy")[:, 0] * envelope
        energy = common.scatter_to_nodes(edge_energy, receivers, num_nodes) * norm

        # --- atom features: envelope-weighted pooling of the edge features onto the central atom
        pooled_v = common.scatter_to_nodes(features * envelope[:, None, None], receivers, num_nodes) * norm
        direct_w = nn.Dense(C * 3, name="direct_weights")(x).reshape(num_edges, C, 3) * envelope[:, None, None]
        direct = _scale_by_l(direct_w, harmonics.filter(lmax=2))
        pooled_direct = common.scatter_to_nodes(direct, receivers, num_nodes) * norm
        pooled_x = common.scatter_to_nodes(x * envelope[:, None], receivers, num_nodes) * norm
        atom_in = e3nn.concatenate(
            [e3nn.IrrepsArray(f"{self.latent_dim}x0e", pooled_x), pooled_v.axis_to_mul(), pooled_direct.axis_to_mul()]
        ).regroup()
        out = e3nn.flax.Linear(common.feature_irreps(C), name="atom_features")(atom_in)

        node_mask_f = node_mask.astype(dtype)
        energy = energy * node_mask_f
        out = out * node_mask_f[:, None]
        return energy, out
