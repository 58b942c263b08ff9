"""Test matrices with known spectra and their float64 SVD terms, shared by the
spectral and Eigenvalue Decay tests."""

import jax
import jax.numpy as jnp
import numpy as np


def with_spectrum(rng, shape, sigmas):
    """A matrix of ``shape`` with the given singular values, random singular vectors."""
    d, p = shape
    u, _ = np.linalg.qr(rng.standard_normal((d, len(sigmas))))
    v, _ = np.linalg.qr(rng.standard_normal((p, len(sigmas))))
    return (u * np.asarray(sigmas)) @ v.T


def top_sigma(k):
    return np.linalg.svd(np.asarray(k, np.float64).reshape(-1, k.shape[-1]))[1][0]


def svd_term(kernel):
    """σ u vᵀ and u vᵀ of the kernel's matrix view, in float64, kernel-shaped."""
    k = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    u, s, vt = np.linalg.svd(k)
    uv = np.outer(u[:, 0], vt[0]).reshape(kernel.shape)
    return s[0] * uv, uv


def make_params(rng, dtype=jnp.float32):
    return {
        "dense": jnp.asarray(rng.standard_normal((18, 8)), dtype),
        "conv": jnp.asarray(rng.standard_normal((3, 3, 2, 8)) / 3, dtype),
        "bias": jnp.asarray(rng.standard_normal(8), dtype),
    }


def loss(params):
    """Any loss touching every leaf, so the incoming gradients are not zero."""
    return sum(jnp.sum(jnp.sin(p.astype(jnp.float32))) for p in jax.tree.leaves(params))
