"""Top eigenpairs of a PSD operator by restarted block Krylov iteration.

For operators too large for a dense decomposition (a convolution on a realistic
input has thousands of singular values): each round builds the block Krylov basis
``[V, GV, …, G^depth V]``, takes the Ritz pairs of ``G`` on it and restarts from
the top Ritz vectors. Krylov rather than plain power or subspace iteration
because a convolution's top singular values cluster, where power iteration
converges like ``1/t`` and Krylov like ``1/t²``. Rounds are a ``while_loop`` and
the basis grows in a ``fori_loop``: the program does not grow with either count.

References:
  Musco & Musco, "Randomized Block Krylov Methods for Stronger and Faster
  Approximate Singular Value Decomposition", 2015.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from margin_regs import _batching

__all__ = ["block_and_depth", "block_krylov"]

# Krylov parameters: extra block vectors beyond k (so the k-th value converges at
# the rate set by the gap to the (k+8)-th), and blocks per round.
OVERSAMPLE = 8
DEPTH = 8


def block_and_depth(n: int, k: int | None) -> tuple[int, int]:
    """The block size and the blocks per round for the top ``k`` of ``R^n``.

    A depth below 1 means the space is too small for Krylov: decompose densely.
    """
    block = min(n, (k or 0) + OVERSAMPLE)
    return block, min(DEPTH, n // block - 1)


# Directions whose Gram eigenvalue is below this fraction of the largest are
# (numerically) spanned by the others: within a new block (whose condition number
# two orthonormalisation passes repair up to ~1e3) and in the whole basis (whose
# columns are orthonormal or zero by then).
_BLOCK_THRESHOLD = 1e-6
_SPAN_THRESHOLD = 1e-3


# One matrix per LAPACK call under vmap too: batched ones can deadlock XLA's CPU
# thread pool (margin_regs._batching).
_eigh = _batching.per_matrix(lambda a: jnp.linalg.eigh(a))


def _whitener(w: jax.Array, threshold: float) -> jax.Array:
    """``W`` with ``w @ W`` orthonormal on ``w``'s span, zero columns elsewhere.

    From the eigendecomposition of the small Gram matrix ``wᵀw`` (the square of
    ``w``'s singular values): directions below ``threshold`` times the largest are
    taken as not spanned and dropped, so a rank-deficient ``w`` gives zero columns
    rather than the arbitrary ones a QR would. A Gram eigensolve instead of XLA's
    Householder QR, which on a CPU costs 50 ms for a ``(6272, 9)`` block.
    """
    values, vectors = _eigh(w.T @ w)
    keep = values > threshold * values[-1]
    return vectors * jnp.where(keep, lax.rsqrt(jnp.where(keep, values, 1.0)), 0.0)


def _orthonormal(w: jax.Array, basis: jax.Array) -> jax.Array:
    """Orthonormal (or zero) columns spanning ``w``'s components off ``basis``.

    Projects and orthonormalises twice ("twice is enough", Parlett; CholeskyQR2),
    so rounding leaves no component along ``basis`` and the columns orthonormal.
    """
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
        w = w @ _whitener(w, _BLOCK_THRESHOLD)
    return w


def block_krylov(
    gram: Callable[[jax.Array], jax.Array],
    n: int,
    k: int,
    block: int,
    depth: int,
    tol: float,
    max_rounds: int,
) -> jax.Array:
    """The top ``k`` eigenpairs of the PSD ``gram`` on ``R^n``: ``(k,)``, ``(n, k)``.

    Each round builds the block Krylov basis ``[V, GV, …, G^depth V]`` (orthonormal),
    takes the Ritz pairs of ``G`` on it, and restarts from the top ``block`` Ritz
    vectors; Ritz values only grow across rounds (the restart vectors stay in the
    next basis), so a round that moves none of the top ``k`` by more than
    ``tol · θ₁`` has converged; the ``block - k`` extra vectors only speed it up.
    """
    start = jax.random.normal(jax.random.key(0), (n, block), jnp.float32)

    def one_round(v: jax.Array) -> tuple[jax.Array, jax.Array]:
        # One buffer for the whole basis (unfilled columns are zero, which the
        # projections ignore), filled by a fori_loop: compiles once, whatever depth.
        basis = jnp.zeros((n, block * (depth + 1)), jnp.float32).at[:, :block].set(v)

        def grow(j, carry):
            basis, image = carry
            g = gram(lax.dynamic_slice_in_dim(basis, j * block, block, axis=1))
            image = lax.dynamic_update_slice_in_dim(image, g, j * block, axis=1)
            new = _orthonormal(g, basis)
            basis = lax.dynamic_update_slice_in_dim(basis, new, (j + 1) * block, axis=1)
            return basis, image

        basis, image = lax.fori_loop(0, depth, grow, (basis, jnp.zeros_like(basis)))
        image = image.at[:, depth * block :].set(gram(basis[:, depth * block :]))
        # Re-orthonormalise the whole basis once more (Rayleigh-Ritz on a basis
        # that is not orthonormal would overestimate); G is linear, so
        # G(B W) = G(B) W and the images follow without another product.
        whiten = _whitener(basis, _SPAN_THRESHOLD)
        basis, image = basis @ whiten, image @ whiten
        ritz = basis.T @ image
        theta, vectors = _eigh((ritz + ritz.T) / 2)
        return basis @ vectors[:, ::-1][:, :block], theta[::-1][:block]

    def not_done(carry):
        _, theta, previous, rounds = carry
        moved = jnp.max(jnp.abs(theta[:k] - previous[:k]))
        return (rounds < max_rounds) & (moved > tol * theta[0])

    def body(carry):
        v, theta, _, rounds = carry
        v, new = one_round(v)
        return v, new, theta, rounds + 1

    # θ = 0 after "round 0" and -inf before it: the first test always passes.
    theta = jnp.zeros(block, jnp.float32)
    start = start @ _whitener(start, _BLOCK_THRESHOLD)
    init = (start, theta, jnp.full_like(theta, -jnp.inf), 0)
    v, theta, _, _ = lax.while_loop(not_done, body, init)
    return theta[:k], v[:, :k]
