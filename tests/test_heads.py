"""Heads: positivity of the response coefficients and equivariance of every output."""

import jax

jax.config.update("jax_enable_x64", True)

import e3nn_jax as e3nn
import jax.numpy as jnp
import numpy as np
import pytest

from polarjax.cartesian import cartesian_to_irrep2, irrep2_to_cartesian, skew
from polarjax.heads import MultipoleHeads

IRREPS = e3nn.Irreps("8x0e + 8x1o + 8x2e")


def random_rotation(seed):
    """A float64 proper rotation matrix."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _features(seed, n=6):
    return e3nn.normal(IRREPS, jax.random.PRNGKey(seed), (n,))


def _transform(features, rotation):
    """Act with an O(3) matrix (rotation or improper) on the features."""
    return features.transform_by_matrix(rotation)


@pytest.fixture(scope="module")
def heads_and_params():
    heads = MultipoleHeads(dipoles=True, quadrupoles=True, kappa=True, alpha=True, anisotropic_alpha=True)
    params = heads.init(jax.random.PRNGKey(0), _features(0), jnp.ones(6, bool))
    return heads, params


def test_irrep2_cartesian_roundtrip_and_equivariance():
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(4, 5)))
    tensors = irrep2_to_cartesian(y)
    np.testing.assert_allclose(np.trace(tensors, axis1=1, axis2=2), 0, atol=1e-12)
    np.testing.assert_allclose(tensors, np.swapaxes(tensors, 1, 2), atol=1e-12)
    np.testing.assert_allclose(cartesian_to_irrep2(tensors), y, atol=1e-10)
    rotation = random_rotation(3)
    wigner = np.asarray(e3nn.Irreps("2e").D_from_matrix(rotation))
    np.testing.assert_allclose(irrep2_to_cartesian(y @ wigner.T), rotation @ tensors @ rotation.T, atol=1e-10)


def test_skew_is_cross_product():
    rng = np.random.default_rng(1)
    w, x = rng.normal(size=3), rng.normal(size=3)
    np.testing.assert_allclose(skew(jnp.asarray(w)) @ x, np.cross(w, x), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kappa_nonnegative_and_alpha_psd_for_random_parameters(seed):
    heads = MultipoleHeads(dipoles=True, quadrupoles=True, kappa=True, alpha=True, anisotropic_alpha=True,
                           kappa_scale=1.0, alpha_scale=1.0)
    features = _features(seed, 32) * 3.0
    params = heads.init(jax.random.PRNGKey(100 + seed), features, jnp.ones(32, bool))
    out = heads.apply(params, features, jnp.ones(32, bool))
    assert np.all(np.asarray(out["kappa"]) >= 0)
    alpha = np.asarray(out["alpha"])
    np.testing.assert_allclose(alpha, np.swapaxes(alpha, 1, 2), atol=1e-12)
    assert np.linalg.eigvalsh(alpha).min() >= -1e-12
    iso = MultipoleHeads(alpha=True, alpha_scale=1.0)
    iso_params = iso.init(jax.random.PRNGKey(seed), features, jnp.ones(32, bool))
    assert np.all(np.asarray(iso.apply(iso_params, features, jnp.ones(32, bool))["alpha"]) >= 0)


@pytest.mark.parametrize("improper", [False, True])
def test_heads_equivariance(heads_and_params, improper):
    heads, params = heads_and_params
    rotation = random_rotation(7)
    if improper:
        rotation = -rotation
    features = _features(5)
    mask = jnp.ones(6, bool)
    out = heads.apply(params, features, mask)
    out_rot = heads.apply(params, _transform(features, rotation), mask)
    proper = np.linalg.det(rotation) > 0
    np.testing.assert_allclose(out_rot["charges"], out["charges"], atol=1e-10)
    np.testing.assert_allclose(out_rot["kappa"], out["kappa"], atol=1e-10)
    # dipoles are polar vectors: they follow the full O(3) matrix (inversion flips them).
    np.testing.assert_allclose(out_rot["dipoles"], out["dipoles"] @ rotation.T, atol=1e-10)
    rotate = lambda t: np.einsum("ij,njk,lk->nil", rotation, t, rotation)
    np.testing.assert_allclose(out_rot["quadrupoles"], rotate(out["quadrupoles"]), atol=1e-10)
    np.testing.assert_allclose(out_rot["alpha"], rotate(out["alpha"]), atol=1e-10)
    assert proper != improper


def test_padding_atoms_get_zero_outputs(heads_and_params):
    heads, params = heads_and_params
    mask = jnp.array([True, True, True, False, False, True])
    out = heads.apply(params, _features(9), mask)
    for key in ("charges", "dipoles", "quadrupoles", "kappa", "alpha"):
        assert np.all(np.asarray(out[key])[~np.asarray(mask)] == 0), key
