"""Change of basis between e3nn irreps and Cartesian tensors.

e3nn-jax orders l = 1 components as (x, y, z), so a 1o/1e irrep *is* a Cartesian vector.
For l = 2 (5 components) the map to a symmetric traceless 3×3 tensor is the unique
intertwiner (up to scale) between the two representations; we fix it from e3nn's own
spherical harmonics: the 2e part of a vector v corresponds to  v vᵀ − |v|² I / 3  with the
"component" normalisation, solved exactly by least squares on the host at import time.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax.numpy as jnp
import numpy as np


def _l2_harmonics_float64(vectors: np.ndarray) -> np.ndarray:
    """e3nn-jax's unnormalised l=2 harmonics ("component" normalisation), in float64.

    Written out so the change of basis is exact in float64; checked against e3nn below.
    """
    x, y, z = vectors[:, 0], vectors[:, 1], vectors[:, 2]
    s15, s5 = np.sqrt(15.0), np.sqrt(5.0)
    return np.stack([s15 * x * z, s15 * x * y, s5 * (y**2 - 0.5 * (x**2 + z**2)), s15 * y * z,
                     0.5 * s15 * (z**2 - x**2)], axis=1)


def _irrep2_to_cartesian_matrix() -> np.ndarray:
    """M [5, 3, 3] with  T = Σ_m y_m M_m  mapping 2e components to traceless symmetric T."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(64, 3))
    harmonics = _l2_harmonics_float64(vectors)
    reference = np.asarray(e3nn.spherical_harmonics("2e", vectors.astype(np.float32), normalize=False,
                                                    normalization="component").array, dtype=np.float64)
    # A changed convention gives O(1) differences; the tolerance only absorbs float32 and
    # accelerator (TF32) round-off.
    if not np.allclose(harmonics, reference, rtol=1e-2, atol=1e-2 * np.abs(reference).max()):
        raise RuntimeError("e3nn's l=2 harmonics convention changed; update polarjax.cartesian")
    outer = np.einsum("ni,nj->nij", vectors, vectors)
    traceless = outer - np.einsum("nii->n", outer)[:, None, None] * np.eye(3) / 3.0
    solution, *_ = np.linalg.lstsq(harmonics, traceless.reshape(64, 9), rcond=None)
    return solution.reshape(5, 3, 3)


IRREP2_TO_CARTESIAN = _irrep2_to_cartesian_matrix()
#: Inverse map: y = Σ_ij T_ij C[ij, m] for traceless symmetric T.
CARTESIAN_TO_IRREP2 = np.linalg.pinv(IRREP2_TO_CARTESIAN.reshape(5, 9))


def irrep2_to_cartesian(components: jnp.ndarray) -> jnp.ndarray:
    """[..., 5] 2e components → [..., 3, 3] symmetric traceless tensors."""
    return jnp.einsum("...m,mij->...ij", components, jnp.asarray(IRREP2_TO_CARTESIAN, components.dtype))


def cartesian_to_irrep2(tensors: jnp.ndarray) -> jnp.ndarray:
    """[..., 3, 3] symmetric traceless tensors → [..., 5] 2e components."""
    flat = tensors.reshape(tensors.shape[:-2] + (9,))
    return flat @ jnp.asarray(CARTESIAN_TO_IRREP2, tensors.dtype)


def skew(vectors: jnp.ndarray) -> jnp.ndarray:
    """[..., 3] → [..., 3, 3] antisymmetric matrices [w]_× (w × x = [w]_× x)."""
    x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
    zero = jnp.zeros_like(x)
    return jnp.stack(
        [jnp.stack([zero, -z, y], -1), jnp.stack([z, zero, -x], -1), jnp.stack([-y, x, zero], -1)], axis=-2
    )
