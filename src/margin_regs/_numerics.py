"""Scale-safe norms and exact rescaling, shared by every iterative routine.

One place for "divide by a power of two near ``max |x|``": float32 kernels of scale
1e-20 or 1e20 neither under- nor overflow in products, norms or Gram matrices, and
since the scale is a power of two the division and the multiplication back are
exact. Power iteration, the seed Eigenvalue Decay penalty, AdaReg's sweep and the
convolution operator's Frobenius norm and decompositions all go through
:func:`rescaled`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["normalize", "rescaled", "safe_norm"]


def rescaled(
    x: jax.Array, axis: int | tuple[int, ...] | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(x / s, s)``, ``s`` a power of two with ``max |x / s|`` in ``[½, 1)``.

    Over ``axis`` (all axes by default; ``s`` keeps the reduced axes as size 1).
    ``s`` is constant to autodiff, which is exact for the positively homogeneous
    functions it is used with (``f(x) = s · f(x / s)``). A zero ``x`` gives
    ``s = 2``; NaN and inf entries stay NaN and inf in ``x / s``.
    """
    top = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    exponent = jnp.frexp(jnp.where(top > 0, top, 1))[1]
    scale = jnp.ldexp(jnp.ones_like(top), exponent)
    return x / scale, scale


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """‖x‖₂ along ``axis``, free of overflow, underflow and NaN gradients.

    Computed as ``s · ‖x / s‖`` (:func:`rescaled`), so float32 vectors of scale
    1e-30 or 1e30 keep their norm; the zero vector has norm 0 and gradient 0.
    """
    scaled, s = rescaled(x, axis)
    sq = jnp.sum(scaled * scaled, axis=axis, keepdims=True)
    positive = sq > 0
    # The last branch passes 0 for the zero vector and NaN for a NaN entry: a NaN
    # weight must show up in σ, not read as a zero matrix.
    norm = s * jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), sq)
    return norm if keepdims else jnp.squeeze(norm, axis=axis)


def normalize(
    x: jax.Array, fallback: jax.Array, n_axes: int = 1
) -> tuple[jax.Array, jax.Array]:
    """``(x / ‖x‖, ‖x‖)`` over the ``n_axes`` trailing axes, ``(fallback, 0)`` where
    ``x`` is zero."""
    lead = x.shape[: x.ndim - n_axes]
    norm = safe_norm(x.reshape(*lead, -1), keepdims=True)
    norm = norm.reshape(lead + (1,) * n_axes)
    ok = norm > 0
    unit = jnp.where(ok, x / jnp.where(ok, norm, 1.0), fallback)
    return unit, norm.reshape(lead)
