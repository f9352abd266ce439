"""Building blocks shared by the short-range encoders.

Conventions (all encoders):

* ``vectors`` [E, 3] are edge vectors receiver − sender (+ image shift); padded edges are
  exact zeros and every helper here is NaN-safe there, values *and* gradients
  (double-``where``: the unsafe branch never sees a zero).
* The radial basis is the Bessel basis multiplied by the polynomial cutoff envelope
  u(r/r_c) of Gasteiger et al. (exponent p), which vanishes with its first two
  derivatives at r_c and is identically zero beyond, so anything linear in the basis
  (or multiplied by the envelope) is C² across the cutoff: energies and forces are
  continuous as a neighbour crosses it.
* Messages are summed onto the *receiver* (the central atom).
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "safe_norm",
    "poly_envelope",
    "bessel_basis",
    "radial_basis",
    "radial_embedding",
    "spherical_harmonics",
    "safe_spherical_harmonics",
    "scatter_to_nodes",
    "weight_by_irrep",
    "species_embedding",
    "RadialMLP",
    "feature_irreps",
    "hidden_irreps",
]


def safe_norm(vectors: jnp.ndarray) -> jnp.ndarray:
    """|v| over the last axis, exactly 0 (with zero gradient) for zero vectors."""
    sq = jnp.sum(vectors**2, axis=-1)
    positive = sq > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def poly_envelope(lengths: jnp.ndarray, cutoff: float, p: int = 6) -> jnp.ndarray:
    """Polynomial cutoff envelope u(x), x = r / r_c (DimeNet / NequIP form).

        u(x) = 1 − (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) − p(p+1)/2 x^(p+2)   for x < 1, else 0.

    u(1) = u'(1) = u''(1) = 0, so the energy and forces are continuous at the cutoff.
    """
    x = lengths / cutoff
    xc = jnp.where(x < 1.0, x, 0.0)  # keep the polynomial bounded beyond the cutoff
    u = 1.0 - 0.5 * (p + 1) * (p + 2) * xc**p + p * (p + 2) * xc ** (p + 1) - 0.5 * p * (p + 1) * xc ** (p + 2)
    return jnp.where(x < 1.0, u, 0.0)


def bessel_basis(lengths: jnp.ndarray, cutoff: float, num_basis: int) -> jnp.ndarray:
    """Bessel functions sqrt(2/r_c) sin(nπ r/r_c)/r, n = 1..num_basis: [..., num_basis] (finite at r = 0)."""
    return e3nn.bessel(lengths, num_basis, cutoff)


def radial_embedding(lengths: jnp.ndarray, cutoff: float, num_basis: int, envelope_p: int = 6) -> jnp.ndarray:
    """Enveloped Bessel basis [..., num_basis]: bessel(r) · u(r/r_c); zero at and beyond the cutoff."""
    return bessel_basis(lengths, cutoff, num_basis) * poly_envelope(lengths, cutoff, envelope_p)[..., None]


def radial_basis(lengths: jnp.ndarray, cutoff: float, num_basis: int, envelope_p: int = 6) -> jnp.ndarray:
    """Alias of :func:`radial_embedding`."""
    return radial_embedding(lengths, cutoff, num_basis, envelope_p)


def safe_spherical_harmonics(irreps: Union[e3nn.Irreps, str, int, Sequence[int]], vectors: jnp.ndarray) -> e3nn.IrrepsArray:
    """Component-normalised spherical harmonics Y(v̂) of ``vectors`` [..., 3] (parity (−1)^l: 1o, 2e, ...).

    NaN-safe for zero vectors: there Y_0 = 1 and every l > 0 component is 0, with zero
    gradient.
    """
    if isinstance(irreps, int):
        irreps = e3nn.Irreps.spherical_harmonics(irreps)
    nonzero = jnp.sum(vectors**2, axis=-1) > 0.0
    safe = jnp.where(nonzero[..., None], vectors, jnp.array([0.0, 0.0, 1.0], vectors.dtype))
    sh = e3nn.spherical_harmonics(irreps, safe, normalize=True, normalization="component")
    chunks = []
    for (_, ir), chunk in zip(sh.irreps, sh.chunks):
        if chunk is None or ir.l == 0:
            chunks.append(chunk)
        else:
            chunks.append(jnp.where(nonzero[..., None, None], chunk, 0.0))
    return e3nn.from_chunks(sh.irreps, chunks, sh.shape[:-1], sh.dtype)


def spherical_harmonics(vectors: jnp.ndarray, l_max: int) -> e3nn.IrrepsArray:
    """Y_0 ... Y_lmax of ``vectors`` (0e + 1o + 2e + ...), NaN-safe; see :func:`safe_spherical_harmonics`."""
    return safe_spherical_harmonics(e3nn.Irreps.spherical_harmonics(l_max), vectors)


def scatter_to_nodes(
    edge_values: Union[jnp.ndarray, e3nn.IrrepsArray],
    receivers: jnp.ndarray,
    num_nodes: int,
    edge_mask: jnp.ndarray | None = None,
) -> Union[jnp.ndarray, e3nn.IrrepsArray]:
    """Σ over edges onto their receiver: [E, ...] → [num_nodes, ...] (arrays or IrrepsArrays).

    With ``edge_mask`` [E] the masked-out edges are zeroed first.
    """
    if edge_mask is not None:
        mask = edge_mask.reshape(edge_mask.shape + (1,) * (edge_values.ndim - 1))
        edge_values = edge_values * mask.astype(edge_values.dtype)
    if isinstance(edge_values, e3nn.IrrepsArray):
        array = jax.ops.segment_sum(edge_values.array, receivers, num_segments=num_nodes)
        return e3nn.IrrepsArray(edge_values.irreps, array)
    return jax.ops.segment_sum(edge_values, receivers, num_segments=num_nodes)


def weight_by_irrep(x: e3nn.IrrepsArray, weights: jnp.ndarray) -> e3nn.IrrepsArray:
    """Scale every irrep copy of ``x`` [..., irreps] by its own scalar: ``weights`` [..., irreps.num_irreps]."""
    index = np.repeat(np.arange(x.irreps.num_irreps), [ir.dim for mul, ir in x.irreps for _ in range(mul)])
    return e3nn.IrrepsArray(x.irreps, x.array * weights[..., index])


def species_embedding(
    species: jnp.ndarray, num_species: int, num_channels: int, name: str = "species_embedding"
) -> e3nn.IrrepsArray:
    """Learnable scalar embedding of species indices: IrrepsArray [N, num_channels x 0e].

    Must be called inside a compact Flax module (it creates an ``nn.Embed`` named ``name``).
    """
    emb = nn.Embed(num_species, num_channels, embedding_init=nn.initializers.normal(1.0), name=name)(species)
    return e3nn.IrrepsArray(f"{num_channels}x0e", emb)


class RadialMLP(nn.Module):
    """SiLU MLP on the radial basis, no biases, so zero in → zero out.

    Because the input (enveloped basis) vanishes smoothly at the cutoff and there are
    no biases, the output vanishes smoothly too. Weights ~ N(0, 1/fan_in) (variance
    preserving with the √2-rescaled SiLU).
    """

    hidden: Tuple[int, ...] = (64,)
    num_out: int = 1

    @nn.compact
    def __call__(self, basis: jnp.ndarray) -> jnp.ndarray:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        x = basis
        for k, width in enumerate(self.hidden):
            x = jax.nn.silu(nn.Dense(width, use_bias=False, kernel_init=init, name=f"hidden_{k}")(x)) * 1.679
        return nn.Dense(self.num_out, use_bias=False, kernel_init=init, name="out")(x)


def feature_irreps(num_channels: int) -> e3nn.Irreps:
    """The irreps every encoder returns as atom features: C x (0e + 1o + 2e)."""
    return (num_channels * e3nn.Irreps("0e + 1o + 2e")).regroup()


def hidden_irreps(num_channels: int, l_max: int, parities: str = "natural") -> e3nn.Irreps:
    """C x (0e + 1o + 2e + ... up to l_max); ``parities="both"`` adds 0o + 1e + 2o + ... too."""
    irs = []
    for l in range(l_max + 1):
        natural = "e" if l % 2 == 0 else "o"
        irs.append(f"{l}{natural}")
        if parities == "both":
            irs.append(f"{l}{'o' if natural == 'e' else 'e'}")
    return (num_channels * e3nn.Irreps(" + ".join(irs))).regroup()
