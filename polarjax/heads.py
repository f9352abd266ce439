"""Heads: per-atom latent multipoles and linear-response coefficients from equivariant features.

Input features are an ``e3nn.IrrepsArray`` [N, irreps] with 0e, 1o and 2e channels.

* charges q [N]: invariant MLP on the 0e channels, scaled by ``charge_scale``;
* dipoles u [N, 3]: a linear map of the 1o channels (a polar vector);
* quadrupoles Q [N, 3, 3]: a linear map of the 2e channels, returned as a symmetric
  traceless Cartesian tensor (primitive second-moment convention);
* kappa [N] >= 0: softplus of an invariant MLP, scaled by ``kappa_scale``;
* alpha: isotropic [N] >= 0 (softplus), or anisotropic [N, 3, 3] = s · A Aᵀ with a general
  A = a I + [w]_× + S built from 0e (a), 1e (w, from 1o ⊗ 1o) and 2e (S) channels —
  positive semidefinite for every parameter value and equivariant (R A Rᵀ).
"""

from __future__ import annotations

from typing import Optional

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from polarjax.cartesian import irrep2_to_cartesian, skew


class ScalarMLP(nn.Module):
    """Two-layer SiLU MLP on invariant features: [N, F] → [N, num_outputs]."""

    hidden: int
    num_outputs: int

    @nn.compact
    def __call__(self, x):
        x = jax.nn.silu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_outputs)(x)


class MultipoleHeads(nn.Module):
    """Predict the latent sources the electrostatics needs.

    Attributes:
      dipoles, quadrupoles, kappa, alpha: which sources to predict (charges always).
      anisotropic_alpha: 3×3 PSD alpha instead of a scalar.
      *_scale: output scales at initialisation (small response coefficients).
      hidden: width of the invariant MLPs.
    """

    dipoles: bool = False
    quadrupoles: bool = False
    kappa: bool = False
    alpha: bool = False
    anisotropic_alpha: bool = False
    charge_scale: float = 0.1
    dipole_scale: float = 0.1
    quadrupole_scale: float = 0.1
    kappa_scale: float = 0.01
    alpha_scale: float = 0.01
    hidden: int = 32

    @nn.compact
    def __call__(self, features: e3nn.IrrepsArray, node_mask: jnp.ndarray) -> dict:
        """features [N, irreps] → dict of per-atom sources (absent ones are None).

        Returns keys: charges [N], dipoles [N,3], quadrupoles [N,3,3], kappa [N],
        alpha [N] or [N,3,3]; padding atoms get zeros.
        """
        scalars = features.filter(keep="0e").array
        mask = node_mask
        out: dict[str, Optional[jnp.ndarray]] = {"dipoles": None, "quadrupoles": None, "kappa": None, "alpha": None}
        num_scalar_outputs = 1 + int(self.kappa) + int(self.alpha)
        heads = ScalarMLP(self.hidden, num_scalar_outputs, name="scalar_heads")(scalars)
        out["charges"] = jnp.where(mask, self.charge_scale * heads[:, 0], 0.0)
        column = 1
        if self.kappa:
            out["kappa"] = jnp.where(mask, self.kappa_scale * jax.nn.softplus(heads[:, column]), 0.0)
            column += 1
        if self.dipoles:
            vector = e3nn.flax.Linear("1x1o", name="dipole_head")(features.filter(keep="1o")).array
            out["dipoles"] = jnp.where(mask[:, None], self.dipole_scale * vector, 0.0)
        if self.quadrupoles:
            comps = e3nn.flax.Linear("1x2e", name="quadrupole_head")(features.filter(keep="2e")).array
            out["quadrupoles"] = jnp.where(mask[:, None, None], self.quadrupole_scale * irrep2_to_cartesian(comps), 0.0)
        if self.alpha:
            if self.anisotropic_alpha:
                out["alpha"] = jnp.where(mask[:, None, None], self._anisotropic_alpha(features, heads[:, column]), 0.0)
            else:
                out["alpha"] = jnp.where(mask, self.alpha_scale * jax.nn.softplus(heads[:, column]), 0.0)
        return out

    def _anisotropic_alpha(self, features, isotropic_part):
        """alpha = s A Aᵀ with A = a I + [w]_× + S: [N, 3, 3] PSD."""
        vectors = features.filter(keep="1o")
        pseudo = e3nn.tensor_product(vectors, vectors, filter_ir_out=["1e"])
        w = e3nn.flax.Linear("1x1e", name="alpha_pseudovector")(pseudo).array
        s = irrep2_to_cartesian(e3nn.flax.Linear("1x2e", name="alpha_tensor")(features.filter(keep="2e")).array)
        a = (1.0 + isotropic_part)[:, None, None] * jnp.eye(3, dtype=s.dtype)
        matrix = a + skew(w) + s
        return self.alpha_scale * jnp.einsum("nij,nkj->nik", matrix, matrix)
