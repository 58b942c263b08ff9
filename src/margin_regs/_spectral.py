"""Spectral norm regularization (Yoshida & Miyato 2017): penalty and transform.

Both forms run one power iteration (:func:`margin_regs.linalg.power_iteration`)
per kernel, leaf by leaf: the penalty differentiates ``½(uᵀKv)²`` with ``u, v``
held fixed and the transform adds its closed form ``σ u vᵀ`` (:func:`rank_one`); a
test proves the two steps equal. Eigenvalue Decay's fast transform
(:mod:`margin_regs._eigenvalue_decay`) runs on the same core through
:func:`power_iteration_transform`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from margin_regs import _common, _layouts, _tree
from margin_regs._conv_operator import ConvLinearOperator
from margin_regs._layouts import WeightDimensionNumbers
from margin_regs.linalg import (
    SingularTriple,
    converged_power_iteration,
    power_iteration,
)

__all__ = [
    "PowerIterationState",
    "init_power_iteration",
    "spectral_norm_penalty",
    "spectral_norm_regularization",
]


def _check_vectors(state: Any, params: Any, layouts: Any) -> None:
    """A ValueError unless ``state`` holds one fitting vector per selected kernel."""
    _, _, ops, treedef = _layouts.flatten_selected(params, layouts)
    vectors, state_def = jax.tree.flatten(state)
    if treedef != state_def:
        raise ValueError(
            "the power-iteration state does not match the selected kernels: build "
            "it with init_power_iteration(params, key, ...) using the same mask and "
            "weight_dimension_numbers"
        )
    for v, op in zip(vectors, ops, strict=True):
        expected = tuple(op.batch_shape) + tuple(op.in_shape)
        if v.shape != expected:
            raise ValueError(
                f"a state vector of shape {v.shape} does not fit a kernel of shape "
                f"{op.kernel_shape}; expected {expected}"
            )


def rank_one(
    op: Any, update: jax.Array, scale: jax.Array, triple: SingularTriple
) -> jax.Array:
    """``Σ_b scale_b · u_b v_bᵀ`` (the operator's ``outer``) in the update's dtype.

    A broadcast product, never materialised on its own under ``jit``: XLA fuses it
    into the elementwise update that consumes it, so adding it costs no extra pass
    over the weights.
    """
    u = triple.u * scale.reshape(scale.shape + (1,) * len(op.out_shape))
    return op.outer(update, u, triple.v).astype(update.dtype)


def _start(op: Any, kernel: jax.Array, key: jax.Array) -> jax.Array:
    # A convolution's top singular values cluster, where power iteration from a
    # random vector settles σ only to ~1e-4: start it from the top Ritz vector.
    if isinstance(op, ConvLinearOperator):
        return op.top_right_singular_vector(kernel)
    return jax.random.normal(key, tuple(op.batch_shape) + tuple(op.in_shape))


def _init_vectors(params: Any, layouts: Any, key: jax.Array) -> Any:
    kernels, _, ops, treedef = _layouts.flatten_selected(params, layouts)
    vectors = [
        converged_power_iteration(op, k, _start(op, k, jax.random.fold_in(key, i))).v
        for i, (k, op) in enumerate(zip(kernels, ops, strict=True))
    ]
    return treedef.unflatten(vectors)


def init_power_iteration(
    params: Any,
    key: jax.Array | int,
    *,
    mask: _tree.Mask = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
) -> Any:
    """Persisted power-iteration vectors, warm-started to convergence.

    For each selected matrix ``K (fan_in, fan_out)`` a Gaussian ``v₀``
    (Yoshida & Miyato 2017, Alg. 1, line 2) is iterated ``v ← KᵀK v / ‖KᵀK v‖``
    until converged, so that one iteration per training step afterwards tracks
    σ(K) (a cold start needs 20–250 iterations for 1e-3 relative accuracy).

    Args:
      params: a pytree of arrays (flax linen dict, ``nnx.State``, plain dict).
      key: a ``jax.random`` key or an int seed.
      mask: which leaves, as in ``optax.masked`` (``docs/guides/layouts.md``).
      weight_dimension_numbers: each leaf's matrix or operator, as
        ``optax.contrib.muon`` takes it (``docs/guides/layouts.md``).

    Returns:
      A pytree like ``params`` holding a unit float32 ``(*batch, fan_out)`` vector
      at each selected kernel and ``optax.MaskedNode()`` elsewhere.

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
    layouts = _layouts.resolve_layouts(params, weight_dimension_numbers, mask)
    return _init_vectors(params, layouts, _common.as_key(key))


def spectral_norm_penalty(
    params: Any,
    state: Any,
    *,
    n_power_iterations: int = 1,
    mask: _tree.Mask = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
) -> tuple[jax.Array, Any]:
    """Spectral norm regularization's penalty, with its power-iteration step.

    Runs ``n`` normalised power iterations per selected kernel from the persisted
    ``v`` (Yoshida & Miyato 2017, Alg. 1), then with ``u, v`` held fixed::

        value = ½ Σ_K (uᵀ K v)² = ½ Σ_K σ(K)²,    ∂value/∂K = σ(K) u vᵀ

    summed over every batch slice of a batched layout.

    Add ``coeff · value`` to the loss (λ/2 · Σ σ² with ``coeff = λ``) and carry
    ``new_state`` to the next step.

    Args:
      params: a pytree of arrays.
      state: the vectors from :func:`init_power_iteration` (same ``mask`` and
        ``weight_dimension_numbers``).
      n_power_iterations: iterations per call, a Python int ≥ 1 (the paper: 1).
      mask: which leaves, as in ``optax.masked`` (``docs/guides/layouts.md``).
      weight_dimension_numbers: each leaf's matrix or operator, as
        ``optax.contrib.muon`` takes it (``docs/guides/layouts.md``).

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

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, Algorithm 1.
    """
    _common.check_positive_int(
        n_power_iterations, "n_power_iterations", "spectral_norm_penalty"
    )
    layouts = _layouts.resolve_layouts(params, weight_dimension_numbers, mask)
    _check_vectors(state, params, layouts)

    def leaf(op, k, v):
        t = power_iteration(op, jax.lax.stop_gradient(k), v, n_power_iterations)
        # uᵀ A v equals σ in value, and its gradient is exactly u vᵀ.
        out_axes = tuple(range(t.u.ndim - len(op.out_shape), t.u.ndim))
        sigma = jnp.sum(t.u * op.matvec(k, t.v), axis=out_axes)
        return 0.5 * jnp.sum(sigma**2), t.v

    values, vectors = _layouts.map_selected(leaf, layouts, params, state, n_outputs=2)
    return sum(jax.tree.leaves(values), jnp.zeros([], jnp.float32)), vectors


class PowerIterationState(NamedTuple):
    """State of the power-iteration transforms.

    Attributes:
      count: int32 number of updates so far (the argument of a ``coeff`` schedule).
      vectors: the persisted unit right singular vectors, float32
        ``(*batch, fan_out)`` per selected kernel, as built by
        :func:`margin_regs.init_power_iteration`.
    """

    count: jax.Array
    vectors: Any


def power_iteration_transform(
    name: str,
    coeff: optax.ScalarOrSchedule,
    n_power_iterations: int,
    mask: _tree.Mask,
    key: jax.Array | int,
    weight_dimension_numbers: WeightDimensionNumbers,
    weight: Callable[[jax.Array], jax.Array],
) -> optax.GradientTransformationExtraArgs:
    """Adds ``coeff · weight(σ_b) · u_b v_bᵀ`` to each selected matrix's update."""
    _common.check_coeff(coeff, "coeff", name)
    _common.check_positive_int(n_power_iterations, "n_power_iterations", name)
    # Converted here, so that a bad key fails where the transform is built.
    key = _common.as_key(key)

    def init(params, layouts):
        return PowerIterationState(
            count=jnp.zeros([], jnp.int32),
            vectors=_init_vectors(params, layouts, key),
        )

    def update(updates, state, params, layouts):
        _check_vectors(state.vectors, params, layouts)
        c = _common.coeff_at(coeff, state.count)

        def leaf(op, g, k, v):
            t = power_iteration(op, k, v, n_power_iterations)
            return g + rank_one(op, g, c * weight(t.sigma), t), t.v

        new_updates, vectors = _layouts.map_selected(
            leaf, layouts, updates, params, state.vectors, n_outputs=2
        )
        count = optax.safe_increment(state.count)
        return new_updates, PowerIterationState(count=count, vectors=vectors)

    return _layouts.masked_transform(name, init, update, weight_dimension_numbers, mask)


def spectral_norm_regularization(
    coeff: optax.ScalarOrSchedule,
    *,
    n_power_iterations: int = 1,
    mask: _tree.Mask = None,
    key: jax.Array | int = 0,
    weight_dimension_numbers: WeightDimensionNumbers = None,
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
      mask: which leaves, as in ``optax.masked`` (``docs/guides/layouts.md``).
      key: a ``jax.random`` key or an int seed for the starting vectors.
      weight_dimension_numbers: each leaf's matrix or operator, as
        ``optax.contrib.muon`` takes it (``docs/guides/layouts.md``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      ``optax.MaskedState`` around a :class:`PowerIterationState`, as inside
      ``optax.masked``. Under ``optax.inject_hyperparams`` pass
      ``static_args=("n_power_iterations", "key", "mask",
      "weight_dimension_numbers")``.

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

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, Algorithm 1.
    """
    return power_iteration_transform(
        "spectral_norm_regularization",
        coeff,
        n_power_iterations,
        mask,
        key,
        weight_dimension_numbers,
        weight=lambda sigma: sigma,
    )
