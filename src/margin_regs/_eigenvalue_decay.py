"""Eigenvalue Decay (Ludwig 2016): the seed's penalty and a fast transform.

The penalty is the seed's formulation, differentiated through ``p`` power
iterations from the all-ones vector; the transform adds the same penalty's
converged gradient ``C · u vᵀ`` from the persisted power iteration of spectral norm
regularization (:func:`margin_regs._spectral.power_iteration_transform`), the two
methods differing only in the weight of ``u vᵀ`` (1 here, σ there).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from margin_regs import _common, _layouts, _tree
from margin_regs._layouts import WeightDimensionNumbers
from margin_regs._numerics import rescaled
from margin_regs._spectral import power_iteration_transform
from margin_regs.linalg import power_iteration, safe_norm

__all__ = ["eigenvalue_decay", "eigenvalue_decay_penalty"]


def _seed_sigma(op: Any, kernel: jax.Array, n_power_iterations: int) -> jax.Array:
    """``sqrt(λ_dom(AᵀA))`` per batch slice, by the seed's power method from the
    all-ones vector, normalised per iteration."""
    ones = jnp.full(
        (*op.batch_shape, *op.in_shape), math.prod(op.in_shape) ** -0.5, jnp.float32
    )
    # σ(K) = s·σ(K/s) with s constant: the backward pass through the normalised
    # iterations multiplies 1/‖K v‖-sized factors, which overflow float32 for tiny
    # kernels (σ ≈ 1e-12) unless the iterations see K at unit scale.
    unit, scale = rescaled(kernel.astype(jnp.float32))
    # v ← normalize(Aᵀ normalize(A v)) points along M v = Aᵀ(A v): the seed's
    # iterate M^p 1, rescaled so that no float32 power of λ can overflow or vanish.
    v = power_iteration(op, unit, ones, n_power_iterations).v
    av = op.matvec(unit, v)
    # The Rayleigh quotient (Mv·v)/(v·v) = ‖Av‖²/‖v‖², square-rooted.
    lead = len(op.batch_shape)
    av_norm = safe_norm(av.reshape(*av.shape[:lead], -1))
    return scale.reshape(()) * av_norm / safe_norm(v.reshape(*v.shape[:lead], -1))


def eigenvalue_decay_penalty(
    params: Any,
    *,
    n_power_iterations: int = 9,
    mask: _tree.Mask = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
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
      mask: which leaves, as in ``optax.masked`` (``docs/guides/layouts.md``).
      weight_dimension_numbers: each leaf's matrix or operator, as
        ``optax.contrib.muon`` takes it (``docs/guides/layouts.md``).

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
    layouts = _layouts.resolve_layouts(params, weight_dimension_numbers, mask)
    sigmas = _layouts.map_selected(
        lambda op, k: jnp.sum(_seed_sigma(op, k, n_power_iterations)), layouts, params
    )
    return sum(jax.tree.leaves(sigmas), jnp.zeros([], jnp.float32))


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
    weight_dimension_numbers: WeightDimensionNumbers = None,
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
      mask: which leaves, as in ``optax.masked`` (``docs/guides/layouts.md``).
      key: a ``jax.random`` key or an int seed for the starting vectors.
      weight_dimension_numbers: each leaf's matrix or operator, as
        ``optax.contrib.muon`` takes it (``docs/guides/layouts.md``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      ``optax.MaskedState`` around a :class:`PowerIterationState`. Under
      ``optax.inject_hyperparams`` pass ``static_args=("n_power_iterations",
      "key", "mask", "weight_dimension_numbers")``.

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
        weight_dimension_numbers,
        weight=_unit_weight,
    )
