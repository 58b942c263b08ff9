"""Periodic work and LAPACK calls that keep their cost under ``jax.vmap``.

Two facts about ``vmap`` that a training step over an ensemble (seeds, a
coefficient grid) meets:

* a ``lax.cond`` whose predicate is batched becomes a ``select``: both branches
  run at every step. A re-solve every ``N`` steps on a batched step count then
  runs at every step. :func:`periodic_cond` keeps one real ``cond`` on "any
  member is due" and selects per member inside it.
* jaxlib's batched CPU decompositions (``svd``, ``eigh``, ``qr``) split the batch
  over XLA's intra-op thread pool and block a pool thread until the pieces are
  done (``ParallelBatchMap`` → ``BlockingCounter::Wait``). Two such calls that
  XLA runs at once on a two-thread pool block both threads, and the pieces they
  wait for never run: the program hangs at 0% CPU. :func:`one_at_a_time` runs a
  decomposition one matrix at a time (``lax.map``) under any number of ``vmap``
  levels; a single matrix never touches the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["one_at_a_time", "per_matrix", "periodic_cond"]

# ``fn`` under any ``vmap``: a loop over the batch (jax's own sequential rule).
one_at_a_time = jax.custom_batching.sequential_vmap


def per_matrix(
    fn: Callable[[jax.Array], Any], jvp: Callable[..., Any] | None = None
) -> Callable[[jax.Array], Any]:
    """``fn`` of one ``(m, n)`` matrix, applied to ``(..., m, n)`` one at a time.

    For LAPACK decompositions (``svd``, ``eigh``, ``qr``): under ``vmap`` too, each
    call sees one matrix, so none waits on XLA's thread pool. Outputs gain the
    leading axes of the input. Differentiable (``sequential_vmap`` alone is not in
    reverse mode): ``jvp(x, t) -> (primal, tangent)`` of the whole batch when given,
    else ``jax.jvp`` of ``fn`` itself, batched as usual.
    """
    single = one_at_a_time(fn)

    @jax.custom_jvp
    def apply(x: jax.Array) -> Any:
        if x.ndim == 2:
            return single(x)
        out = jax.vmap(single)(x.reshape(-1, *x.shape[-2:]))
        return jax.tree.map(lambda o: o.reshape(*x.shape[:-2], *o.shape[1:]), out)

    @apply.defjvp
    def _(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> Any:
        (x,), (t,) = primals, tangents
        if jvp is not None:
            return jvp(x, t)
        batched = fn
        for _ in range(x.ndim - 2):
            batched = jax.vmap(batched)
        return jax.jvp(batched, (x,), (t,))

    return apply


def _batched(operand: Any, flags: Any, size: int) -> Any:
    return jax.tree.map(
        lambda b, x: x if b else jnp.broadcast_to(x, (size, *jnp.shape(x))),
        flags,
        operand,
    )


def periodic_cond(pred: jax.Array, fn: Callable[[Any], Any], operand: Any) -> Any:
    """``lax.cond(pred, fn, identity, operand)`` that stays one branch under vmap.

    Under ``vmap`` with a batched ``pred``, ``fn`` runs once for the whole batch
    when any member's ``pred`` holds, and each member keeps its ``operand`` where
    its own ``pred`` does not; otherwise nothing runs. ``fn`` must return a
    pytree of the operand's structure, shapes and dtypes, and close over no
    batched value.
    """

    @jax.custom_batching.custom_vmap
    def run(pred, operand):
        return jax.lax.cond(pred, fn, lambda x: x, operand)

    @run.def_vmap
    def rule(axis_size, in_batched, pred, operand):
        operand = _batched(operand, in_batched[1], axis_size)
        each = jax.vmap(fn)
        if not in_batched[0]:
            out = periodic_cond(pred, each, operand)
        else:

            def selected(args):
                which, old = args
                new = each(old)
                keep = jax.tree.map(
                    lambda a, b: jnp.where(
                        which.reshape(-1, *[1] * (a.ndim - 1)), a, b
                    ),
                    new,
                    old,
                )
                return which, keep

            out = periodic_cond(jnp.any(pred), selected, (pred, operand))[1]
        return out, jax.tree.map(lambda _: True, out)

    return run(pred, operand)
