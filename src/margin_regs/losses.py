"""Margin losses that ``optax.losses`` lacks.

Sokolić et al. train with "the multi-class hinge loss" without writing it out; the
standard multi-class hinge (Crammer & Singer 2001) is

    ``L(z, y) = max(0, 1 + max_{j≠y} z_j − z_y)``

and ``optax.losses.multiclass_hinge_loss`` computes exactly that, as
``max_j(z_j + 1 − [j = y]) − z_y`` (the two are equal: the ``j = y`` term of the max
is ``z_y``, giving the ``0`` of the outer max). So margin_regs uses optax's and adds
no copy; ``tests/test_losses.py`` checks the identity. What optax lacks is the
one-vs-all hinge of Ludwig et al., below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from margin_regs import _common

__all__ = ["one_vs_all_hinge_loss"]


def one_vs_all_hinge_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Ludwig et al.'s one-vs-all hinge loss with ±1 one-hot targets, per sample.

    ``L(z, y) = (1/C) Σ_c max(0, 1 − t_c z_c)``, ``t_c = +1`` if ``c = y`` else ``−1``

    Each class is its own binary SVM-like classifier (one-versus-all). The hinge is
    *averaged* over the ``C`` classes, as in the authors' Keras objective (``hinge2``
    in their VIEW code: ``mean(maximum(1 − (2y − 1)·ŷ, 0), axis=1)``, i.e. Keras'
    ``hinge`` with ±1 targets); multiply by ``C`` for the per-class sum. Reduce over
    the batch yourself, as with ``optax.losses``.

    Args:
      logits: ``(..., C)`` scores.
      labels: ``(...)`` integer class indices in ``[0, C)``. Out-of-range labels raise
        a ValueError when their values are known; under ``jit`` they cannot be
        checked and such a sample's loss is NaN (never a finite wrong value).

    Returns:
      ``(...)``, the per-sample losses.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> logits = jnp.array([[2.0, -1.0], [0.5, 0.0]])
      >>> mr.one_vs_all_hinge_loss(logits, jnp.array([0, 1])).tolist()
      [0.0, 1.25]

    References:
      Ludwig, "Deep Learning with Eigenvalue Decay Regularizer", arXiv:1604.06985,
      2016, §3 (±1 one-hot targets, one-versus-all) and §4 (the hinge loss for
      multiclass SVM-like learning).
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"logits (..., C) and labels (...) must agree, got logits {logits.shape} "
            f"and labels {labels.shape}"
        )
    n_classes = logits.shape[-1]
    _common.check_label_range(labels, n_classes)
    targets = 2.0 * jax.nn.one_hot(labels, n_classes, dtype=logits.dtype) - 1.0
    loss = jnp.mean(jax.nn.relu(1.0 - targets * logits), axis=-1)
    return jnp.where(_common.labels_in_range(labels, n_classes), loss, jnp.nan)
