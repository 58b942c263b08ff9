"""optax GradientTransformations that add a regularizer's gradient to the updates.

Chain one before the optimizer; it needs ``params`` in ``update``::

    tx = optax.chain(mr.spectral_norm_regularization(0.01), optax.sgd(0.1, 0.9))

Masks are applied by wrapping the transform in ``optax.masked``, so masked-out
leaves pass through untouched and the state holds ``optax.MaskedNode()`` there.
Under ``optax.inject_hyperparams`` only ``coeff`` is a hyperparameter: put
``n_power_iterations``, ``key`` and a callable ``mask`` in ``static_args``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from margin_regs import _tree
from margin_regs.penalties import (
    _rank_one,
    _spectral_triples,
    init_power_iteration,
)

__all__ = [
    "PowerIterationState",
    "eigenvalue_decay",
    "spectral_norm_regularization",
]


class PowerIterationState(NamedTuple):
    """State of the power-iteration transforms.

    Attributes:
      count: int32 number of updates so far (the argument of a ``coeff`` schedule).
      vectors: the persisted unit right singular vectors, float32 ``(fan_out,)`` per
        selected kernel, as built by :func:`margin_regs.init_power_iteration`.
    """

    count: jax.Array
    vectors: Any


def _power_iteration_transform(
    name: str,
    coeff: optax.ScalarOrSchedule,
    n_power_iterations: int,
    mask: _tree.Mask,
    key: jax.Array | int,
    weight: Callable[[jax.Array], jax.Array],
) -> optax.GradientTransformationExtraArgs:
    """Adds ``coeff · weight(σ) · u vᵀ`` to each selected kernel's update."""
    if n_power_iterations < 1:
        raise ValueError(
            f"{name}: n_power_iterations must be >= 1, got {n_power_iterations}"
        )

    def init_fn(params):
        # Inside optax.masked every leaf present is selected; `True` still rejects
        # a 1-D leaf that a user's mask picked.
        return PowerIterationState(
            count=jnp.zeros([], jnp.int32),
            vectors=init_power_iteration(params, key, mask=True),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(f"{name} needs params: call update(grads, state, params)")
        _, triples, treedef = _spectral_triples(
            params, state.vectors, n_power_iterations
        )
        c = coeff(state.count) if callable(coeff) else coeff
        grads = treedef.flatten_up_to(updates)
        new_updates = [
            g + _rank_one(g, c * weight(t.sigma), t)
            for g, t in zip(grads, triples, strict=True)
        ]
        new_state = PowerIterationState(
            count=optax.safe_increment(state.count),
            vectors=treedef.unflatten([t.v for t in triples]),
        )
        return treedef.unflatten(new_updates), new_state

    inner = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return optax.masked(inner, _tree.default_mask if mask is None else mask)


def spectral_norm_regularization(
    coeff: optax.ScalarOrSchedule,
    *,
    n_power_iterations: int = 1,
    mask: _tree.Mask = None,
    key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Spectral norm regularization: add ``coeff · σ u vᵀ`` to each kernel's update.

    The gradient of ``coeff/2 · Σ σ(K)²`` (Yoshida & Miyato 2017, Alg. 1), with
    ``(σ, u, v)`` from ``n_power_iterations`` of power iteration per step from the
    vector persisted in the state (warm-started to convergence in ``init``)::

        g_K ← g_K + coeff · σ(K) u vᵀ

    The same maths as ``jax.grad`` of ``coeff * spectral_norm_penalty(...)[0]``,
    without a second pass through the loss.

    Args:
      coeff: the paper's λ: a float, an array or an optax schedule of the step
        count, as in ``optax.add_decayed_weights``.
      n_power_iterations: iterations per step, a Python int ≥ 1 (the paper: 1).
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
      >>> tx = optax.chain(mr.spectral_norm_regularization(0.1), optax.sgd(1.0))
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
      >>> updates, state = tx.update(grads, state, params)
      >>> bool(jnp.allclose(updates["w"], jnp.array([[-0.3, 0.0], [0.0, 0.0]])))
      True
      >>> bool(jnp.all(updates["b"] == 0))
      True

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, Algorithm 1.
    """
    return _power_iteration_transform(
        "spectral_norm_regularization",
        coeff,
        n_power_iterations,
        mask,
        key,
        weight=lambda sigma: sigma,
    )


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
    return _power_iteration_transform(
        "eigenvalue_decay",
        coeff,
        n_power_iterations,
        mask,
        key,
        weight=_unit_weight,
    )
