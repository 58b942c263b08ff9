"""Eigenvalue Decay (Ludwig 2016): the seed's penalty and a fast transform.

The penalty is the seed's formulation, differentiated through ``p`` power
iterations from the all-ones vector; the transform adds the same penalty's
converged gradient ``C · u vᵀ`` from the persisted power iteration of spectral norm
regularization (:func:`margin_regs._spectral.power_iteration_transform`), the two
methods differing only in the weight of ``u vᵀ`` (1 here, σ there).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from margin_regs import _common, _tree
from margin_regs._spectral import batched, power_iteration_transform
from margin_regs.linalg import as_matrix, power_iteration_step, safe_norm

__all__ = ["eigenvalue_decay", "eigenvalue_decay_penalty"]


def _eigenvalue_decay_sigma(
    matrices: list[jax.Array], n_power_iterations: int
) -> jax.Array:
    """``sqrt(λ_dom(KᵀK))`` of same-shaped matrices by the seed's power method,
    normalised per iteration."""
    fan_out = matrices[0].shape[-1]
    ones = jnp.full((len(matrices), fan_out), fan_out**-0.5, jnp.float32)
    # σ(K) = s·σ(K/s) with s = max|K| held constant: the backward pass through the
    # normalised iterations multiplies 1/‖K v‖-sized factors, which overflow float32
    # for tiny kernels (σ ≈ 1e-12) unless the iterations see K at unit scale.
    scales = [
        jax.lax.stop_gradient(jnp.max(jnp.abs(m))).astype(jnp.float32) for m in matrices
    ]
    scales = [jnp.where(s > 0, s, 1.0) for s in scales]
    unit = [m.astype(jnp.float32) / s for m, s in zip(matrices, scales, strict=True)]
    # v ← normalize(Kᵀ normalize(K v)) points along M v = Kᵀ(K v): the seed's
    # iterate M^p 1, rescaled so that no float32 power of λ can overflow or vanish.
    v = power_iteration_step(unit, ones, n_power_iterations).v
    kv = jnp.stack([m @ v[i] for i, m in enumerate(unit)])
    # The Rayleigh quotient (Mv·v)/(v·v) = ‖Kv‖²/‖v‖², square-rooted.
    return jnp.stack(scales) * safe_norm(kv) / safe_norm(v)


def eigenvalue_decay_penalty(
    params: Any, *, n_power_iterations: int = 9, mask: _tree.Mask = None
) -> jax.Array:
    """Eigenvalue Decay: the sum of each kernel's estimated ``sqrt(λ_dom(KᵀK))``.

    The seed's formulation (Ludwig 2016, eqs. 25–26, and the Keras code): with
    ``M = KᵀK`` (fan_out × fan_out, the paper's ``W Wᵀ`` with ``W = Kᵀ``), applied
    matrix-free as ``Kᵀ(K v)``::

        v = M^p 1,    λ = (M v · v) / (v · v),    value = Σ_K sqrt(λ) ≈ Σ_K σ(K)

    differentiated through the ``p`` iterations. Each iteration is normalised,
    which leaves ``λ`` unchanged but keeps float32 finite where the unnormalised
    original under- or overflows (σ ≈ 0.02 or σ ≈ 18 already give NaN there).

    Args:
      params: a pytree of arrays.
      n_power_iterations: ``p``, a Python int ≥ 1 (the paper: 9).
      mask: a pytree of bools or a callable, as in ``optax.masked``; by default
        every leaf with ``ndim >= 2``.

    Returns:
      A float32 scalar; add ``C · value`` to the loss.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]]), "b": jnp.zeros(2)}
      >>> round(float(mr.eigenvalue_decay_penalty(params)), 3)
      2.0
      >>> g = jax.grad(mr.eigenvalue_decay_penalty)(params)
      >>> bool(jnp.allclose(g["w"], jnp.array([[1.0, 0.0], [0.0, 0.0]]), atol=1e-4))
      True

    References:
      Ludwig, "Deep Learning with Eigenvalue Decay Regularizer",
      arXiv:1604.06985, 2016, §4, eqs. (25)–(26).
    """
    _common.check_positive_int(
        n_power_iterations, "n_power_iterations", "eigenvalue_decay_penalty"
    )
    kernels = jax.tree.leaves(_tree.select(params, mask))
    matrices = [as_matrix(k) for k in kernels]
    sigmas = batched(lambda m: _eigenvalue_decay_sigma(m, n_power_iterations), matrices)
    return sum(sigmas, jnp.zeros([], jnp.float32))


def _unit_weight(sigma: jax.Array) -> jax.Array:
    # σ is NaN exactly when the kernel holds NaN or inf: pass it on, so the update
    # shows the bad kernel instead of adding a finite u vᵀ that hides it.
    return jnp.where(jnp.isnan(sigma), sigma, 1.0)


def eigenvalue_decay(
    coeff: optax.ScalarOrSchedule,
    *,
    n_power_iterations: int = 1,
    mask: _tree.Mask = None,
    key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Eigenvalue Decay, fast form: add ``coeff · u vᵀ`` to each kernel's update.

    The gradient of the penalty ``coeff · Σ sqrt(λ_dom(KᵀK)) = coeff · Σ σ(K)``
    (Ludwig et al.), with ``(u, v)`` tracked by persisted power iteration as in
    :func:`spectral_norm_regularization` instead of ``p = 9`` iterations from the
    all-ones vector differentiated every step (that is
    :func:`margin_regs.eigenvalue_decay_penalty`)::

        g_K ← g_K + coeff · u vᵀ

    Args:
      coeff: the paper's ``C``: a float, an array or an optax schedule of the step
        count, as in ``optax.add_decayed_weights``.
      n_power_iterations: iterations per step, a Python int ≥ 1.
      mask: a pytree of bools or a callable, as in ``optax.masked``; by default
        every leaf with ``ndim >= 2`` (kernels, not biases).
      key: a ``jax.random`` key or an int seed for the starting vectors.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` wrapped in ``optax.masked``; its
      inner state is a :class:`PowerIterationState`. Under
      ``optax.inject_hyperparams`` pass ``static_args=("n_power_iterations",
      "key", "mask")``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import margin_regs as mr
      >>> params = {"w": jnp.diag(jnp.array([3.0, 1.0])), "b": jnp.ones(2)}
      >>> tx = mr.eigenvalue_decay(0.1)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
      >>> updates, state = tx.update(grads, state, params)
      >>> bool(jnp.allclose(updates["w"], jnp.array([[0.1, 0.0], [0.0, 0.0]])))
      True
      >>> bool(jnp.all(updates["b"] == 0))
      True

    References:
      Ludwig, "Deep Learning with Eigenvalue Decay Regularizer",
      arXiv:1604.06985, 2016.
    """
    return power_iteration_transform(
        "eigenvalue_decay",
        coeff,
        n_power_iterations,
        mask,
        key,
        weight=_unit_weight,
    )
