"""Parameter-space penalties: spectral norm regularization and Eigenvalue Decay.

Each penalty is a pure, jittable function of a parameter pytree that returns a
scalar to add to the loss. The optax transforms in :mod:`margin_regs.transforms`
add the same penalties' gradients directly: both forms run the one power
iteration here (:func:`_spectral_triples`), the penalty differentiates ``½(uᵀKv)²``
with ``u, v`` held fixed and the transform adds its closed form ``σ u vᵀ``
(:func:`_rank_one`); a test proves the two steps equal.

Same-shaped kernels are stacked and iterated by one batched matvec, so a network
of many identical layers costs one small call per shape, not one per layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from margin_regs import _tree
from margin_regs.linalg import (
    SingularTriple,
    as_matrix,
    converged_singular_triple,
    power_iteration_step,
    safe_norm,
)

__all__ = [
    "eigenvalue_decay_penalty",
    "init_power_iteration",
    "spectral_norm_penalty",
]

# One compiled warm start per (batch, fan_in, fan_out), shared by every caller.
_converged_batch = jax.jit(jax.vmap(converged_singular_triple))


def _as_key(key: jax.Array | int) -> jax.Array:
    """A typed ``jax.random`` key from an int seed, a typed key or a raw ``PRNGKey``."""
    if isinstance(key, int):
        return jax.random.key(key)
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _batched(fn, matrices: list[jax.Array], *args: list[jax.Array]) -> list[Any]:
    """``fn`` applied once per (shape, dtype) group of matrices, results per matrix.

    ``fn`` gets the group's matrices as a list and the matching ``args`` stacked
    along a new first axis: the vector work is batched while the kernels are never
    stacked, which would copy each of them every step.
    """
    out: list[Any] = [None] * len(matrices)
    for idx in _tree.group_by_shape(matrices).values():
        batch = fn(
            [matrices[i] for i in idx], *(jnp.stack([a[i] for i in idx]) for a in args)
        )
        for j, i in enumerate(idx):
            out[i] = jax.tree.map(lambda x, j=j: x[j], batch)
    return out


def _flatten_state(selected: Any, state: Any) -> tuple[list, list, Any]:
    """Kernels and vectors as aligned lists, and the tree structure they share."""
    kernels, treedef = jax.tree.flatten(selected)
    vectors, state_def = jax.tree.flatten(state)
    if treedef != state_def:
        raise ValueError(
            "the power-iteration state does not match the selected kernels: build "
            "it with init_power_iteration(params, key, mask=...) using the same mask"
        )
    for k, v in zip(kernels, vectors, strict=True):
        if v.shape != (k.shape[-1],):
            raise ValueError(
                f"a state vector of shape {v.shape} does not fit a kernel of shape "
                f"{k.shape}; expected ({k.shape[-1]},)"
            )
    return kernels, vectors, treedef


def _spectral_triples(
    selected: Any, vectors: Any, n_power_iterations: int
) -> tuple[list[jax.Array], list[SingularTriple], Any]:
    """The shared core: ``n`` power iterations on each selected kernel.

    Args:
      selected: params with unselected leaves replaced by ``optax.MaskedNode()``.
      vectors: the persisted right vectors, same structure as ``selected``.
      n_power_iterations: a Python int ≥ 1.

    Returns:
      ``(kernels, triples, treedef)``: the kernels and their float32
      :class:`SingularTriple` as aligned lists, and the structure to rebuild
      trees with.
    """
    kernels, vectors, treedef = _flatten_state(selected, vectors)
    matrices = [as_matrix(k) for k in kernels]
    triples = _batched(
        lambda m, v: power_iteration_step(m, v, n_power_iterations), matrices, vectors
    )
    return kernels, triples, treedef


def _rank_one(kernel: jax.Array, scale: jax.Array, triple: SingularTriple) -> jax.Array:
    """``scale · u vᵀ`` in the kernel's shape and dtype.

    Built as a broadcast product, never materialised on its own under ``jit``: XLA
    fuses it into the elementwise update that consumes it, so adding it costs no
    extra pass over the weights.
    """
    term = (scale * triple.u)[:, None] * triple.v[None, :]
    return term.reshape(kernel.shape).astype(kernel.dtype)


def init_power_iteration(
    params: Any, key: jax.Array | int, *, mask: _tree.Mask = None
) -> Any:
    """Persisted power-iteration vectors, warm-started to convergence.

    For each selected kernel ``K (fan_in, fan_out)`` a Gaussian ``v₀``
    (Yoshida & Miyato 2017, Alg. 1, line 2) is iterated ``v ← KᵀK v / ‖KᵀK v‖``
    until converged, so that one iteration per training step afterwards tracks
    σ(K) (a cold start needs 20–250 iterations for 1e-3 relative accuracy).

    Args:
      params: a pytree of arrays (flax linen dict, ``nnx.State``, plain dict).
      key: a ``jax.random`` key or an int seed.
      mask: a pytree of bools or a callable, as in ``optax.masked``; by default
        every leaf with ``ndim >= 2``.

    Returns:
      A pytree like ``params`` holding a unit float32 ``(fan_out,)`` vector at each
      selected kernel and ``optax.MaskedNode()`` elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.diag(jnp.array([3.0, 1.0])), "b": jnp.zeros(2)}
      >>> state = mr.init_power_iteration(params, 0)
      >>> jnp.abs(state["w"]).round(3).tolist()
      [1.0, 0.0]

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, Algorithm 1.
    """
    selected = _tree.select(params, mask)
    kernels, treedef = jax.tree.flatten(selected)
    key = _as_key(key)
    matrices = [as_matrix(k) for k in kernels]
    vectors: list[jax.Array] = [None] * len(matrices)  # type: ignore[list-item]
    for idx in _tree.group_by_shape(matrices).values():
        stacked = jnp.stack([matrices[i] for i in idx])
        starts = jnp.stack(
            [
                jax.random.normal(jax.random.fold_in(key, i), stacked.shape[-1:])
                for i in idx
            ]
        )
        v = _converged_batch(stacked, starts).v
        for j, i in enumerate(idx):
            vectors[i] = v[j]
    return treedef.unflatten(vectors)


def spectral_norm_penalty(
    params: Any,
    state: Any,
    *,
    n_power_iterations: int = 1,
    mask: _tree.Mask = None,
) -> tuple[jax.Array, Any]:
    """Spectral norm regularization's penalty, with its power-iteration step.

    Runs ``n`` normalised power iterations per selected kernel from the persisted
    ``v`` (Yoshida & Miyato 2017, Alg. 1), then with ``u, v`` held fixed::

        value = ½ Σ_K (uᵀ K v)² = ½ Σ_K σ(K)²,    ∂value/∂K = σ(K) u vᵀ

    Add ``coeff · value`` to the loss (the paper's λ/2 · Σ σ² with ``coeff = λ``)
    and carry ``new_state`` to the next step.

    Args:
      params: a pytree of arrays.
      state: the vectors from :func:`init_power_iteration` (same ``mask``).
      n_power_iterations: iterations per call, a Python int ≥ 1 (the paper: 1).
      mask: a pytree of bools or a callable, as in ``optax.masked``; by default
        every leaf with ``ndim >= 2``.

    Returns:
      ``(value, new_state)``: a float32 scalar and the advanced vectors.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.diag(jnp.array([3.0, 1.0])), "b": jnp.zeros(2)}
      >>> state = mr.init_power_iteration(params, 0)
      >>> value, state = mr.spectral_norm_penalty(params, state)
      >>> round(float(value), 4)
      4.5
      >>> g = jax.grad(lambda p: mr.spectral_norm_penalty(p, state)[0])(params)
      >>> bool(jnp.allclose(g["w"], jnp.array([[3.0, 0.0], [0.0, 0.0]])))
      True
      >>> bool(jnp.all(g["b"] == 0))
      True

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, Algorithm 1.
    """
    kernels, triples, treedef = _spectral_triples(
        _tree.select(params, mask), state, n_power_iterations
    )
    value = jnp.zeros([], jnp.float32)
    for k, t in zip(kernels, triples, strict=True):
        u, v = jax.lax.stop_gradient((t.u, t.v))
        # uᵀ K v equals σ in value, and its gradient is exactly u vᵀ.
        sigma = u @ as_matrix(k).astype(jnp.float32) @ v
        value = value + 0.5 * sigma**2
    return value, treedef.unflatten([t.v for t in triples])


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
    kernels = jax.tree.leaves(_tree.select(params, mask))
    matrices = [as_matrix(k) for k in kernels]
    sigmas = _batched(
        lambda m: _eigenvalue_decay_sigma(m, n_power_iterations), matrices
    )
    return sum(sigmas, jnp.zeros([], jnp.float32))
