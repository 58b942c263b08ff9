"""Parameter tying (Deep Learning book §7.9): an L2 penalty that pulls a model's
weights toward those of another model: a sister model's, a pretrained model's, or the
model's own initialization ("L2 toward the start point")."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from margin_regs import _tree

__all__ = ["parameter_tying_penalty"]


def _paths(tree: Any) -> list[tuple[str, Any]]:
    return [
        (_tree.path_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    ]


def _check_same_tree(params: Any, reference: Any) -> None:
    """A ValueError naming the first path where ``reference`` differs from ``params``."""
    mine, theirs = _paths(params), _paths(reference)
    for (name, p), (other, r) in zip(mine, theirs, strict=False):
        if name != other:
            raise ValueError(
                f"parameter_tying_penalty: params and reference differ at {name!r} "
                f"(reference has {other!r} there)"
            )
        if jnp.shape(p) != jnp.shape(r):
            raise ValueError(
                f"parameter_tying_penalty: {name!r} has shape {jnp.shape(p)} in params "
                f"but {jnp.shape(r)} in reference"
            )
    if len(mine) != len(theirs):
        longer, side = (
            (mine, "params") if len(mine) > len(theirs) else (theirs, "reference")
        )
        raise ValueError(
            f"parameter_tying_penalty: params and reference differ at "
            f"{longer[min(len(mine), len(theirs))][0]!r}, which only {side} has"
        )


def parameter_tying_penalty(
    params: Any, reference: Any, *, mask: _tree.Mask = None
) -> jax.Array:
    """Squared l2 distance of the selected weights to a reference model's.

    ``Ω(w) = Σ_ℓ ‖w_ℓ − w_ref,ℓ‖₂²`` over the selected leaves (no ½; its gradient is
    ``2 (w − w_ref)``), differentiable w.r.t. both pytrees.

    Args:
      params: a pytree of arrays.
      reference: a pytree of the same structure and shapes (a sister model's or a
        pretrained model's params, or the initialization).
      mask: pytree of bools or callable, as in ``optax.masked``; ``None`` selects the
        kernels (biases, scales, embeddings excluded), see ``docs/guides/layouts.md``.

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"kernel": jnp.array([[1.0, 2.0]]), "bias": jnp.array([5.0])}
      >>> start = {"kernel": jnp.array([[0.0, 0.0]]), "bias": jnp.array([0.0])}
      >>> print(mr.parameter_tying_penalty(params, start))
      5.0

    References:
      Goodfellow, Bengio & Courville, "Deep Learning", 2016, §7.9; Lasserre, Bishop
      & Minka, "Principled Hybrids of Generative and Discriminative Models", 2006.
    """
    _check_same_tree(params, reference)
    full = _tree.resolve_mask(mask, params)
    terms = [
        jnp.sum(jnp.square(jnp.asarray(w, jnp.float32) - jnp.asarray(r, jnp.float32)))
        for m, w, r in zip(
            jax.tree.leaves(full),
            jax.tree.leaves(params),
            jax.tree.leaves(reference),
            strict=True,
        )
        if m
    ]
    return sum(terms, jnp.zeros((), jnp.float32))
