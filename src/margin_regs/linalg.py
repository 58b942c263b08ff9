"""Matrix views, power iteration and exact spectral quantities of weight kernels.

A *weight matrix* is any parameter leaf with ``ndim >= 2``, viewed as a 2-D matrix
``K`` of shape ``(fan_in, fan_out)``: a Dense kernel as it is, a conv kernel
``(kh, kw, in, out)`` reshaped to ``(kh*kw*in, out)`` (Yoshida & Miyato 2017, §3;
Zhao et al. 2019, appendix). Other layouts (equinox's fan-out first, DenseGeneral,
scanned stacks) are named by ``weight_dimension_numbers`` (:mod:`margin_regs._layouts`).

Power iteration here is matrix-free (two matvecs per iteration, never ``KᵀK``),
runs in float32 whatever the kernel's dtype, normalises every vector with a
scale-safe norm (so kernels of scale 1e-20 or 1e20 neither underflow nor overflow)
and is safe for the zero matrix (σ = 0, finite vectors, no NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from margin_regs import _layouts

View = Callable[[jax.Array], jax.Array]

__all__ = [
    "SingularTriple",
    "View",
    "as_matrix",
    "converged_singular_triple",
    "inv_threshold",
    "normalize",
    "power_iteration_step",
    "safe_norm",
    "singular_values",
    "spectral_norm",
    "stable_rank",
    "stable_rank_of",
]


class SingularTriple(NamedTuple):
    """Top singular triple of ``K (fan_in, fan_out)``: ``K v ≈ σ u``, ``Kᵀ u ≈ σ v``.

    Attributes:
      sigma: σ ≥ 0, a float32 scalar (or ``(batch,)`` for stacked matrices).
      u: unit left singular vector, ``(fan_in,)``.
      v: unit right singular vector, ``(fan_out,)``; the one persisted across steps.
    """

    sigma: jax.Array
    u: jax.Array
    v: jax.Array


def as_matrix(
    kernel: jax.Array,
    view: View | None = None,
    *,
    weight_dimension_numbers: MuonDimensionNumbers | None = None,
) -> jax.Array:
    """The ``(fan_in, fan_out)`` matrix view of a kernel, or its stack of them.

    By default ``K = kernel.reshape(-1, kernel.shape[-1])``: the flax/haiku layout,
    where the last axis is fan-out. A conv kernel ``(kh, kw, in, out)`` becomes
    ``(kh*kw*in, out)``, the matrix of Yoshida & Miyato 2017 (§3, "Convolutions").
    With ``weight_dimension_numbers = MuonDimensionNumbers(reduction, output)`` the
    reduction axes are the rows, the output axes the columns and every other axis
    a batch axis (as in ``optax.contrib.muon``): the view is
    ``(*batch, fan_in, fan_out)``.

    Args:
      kernel: an array with ``ndim >= 2``.
      view: optional callable returning the 2-D view for another layout.
      weight_dimension_numbers: optional layout, see above.

    Returns:
      ``(fan_in, fan_out)``, or ``(*batch, fan_in, fan_out)`` for a batched layout.

    Raises:
      ValueError: if ``kernel`` has fewer than two dimensions (biases and scales are
        not weight matrices), ``view`` does not return a 2-D array, or the layout's
        axes overlap, repeat or are out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax.contrib import MuonDimensionNumbers
      >>> import margin_regs as mr
      >>> mr.as_matrix(jnp.zeros((5, 5, 3, 32))).shape
      (75, 32)
      >>> equinox_conv = jnp.zeros((32, 3, 5, 5))   # (out, in, kh, kw)
      >>> layout = MuonDimensionNumbers((1, 2, 3), 0)
      >>> mr.as_matrix(equinox_conv, weight_dimension_numbers=layout).shape
      (75, 32)
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(
            f"a weight matrix needs ndim >= 2, got shape {kernel.shape}; "
            "1-D leaves (biases, scales) are not regularized"
        )
    if view is not None:
        matrix = view(kernel)
        if matrix.ndim != 2:
            raise ValueError(f"view returned shape {matrix.shape}, expected 2-D")
        return matrix
    _layouts.require_matrices(weight_dimension_numbers, "as_matrix")
    return _operator(kernel, weight_dimension_numbers).view(kernel)


def _operator(kernel: jax.Array, layout: MuonDimensionNumbers | None) -> Any:
    layout = _layouts.default_layout(kernel.ndim) if layout is None else layout
    checked = _layouts.check_layout(layout, kernel.shape, "kernel")
    return _layouts.make_operator(checked, kernel.shape)


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """‖x‖₂ along ``axis``, free of overflow, underflow and NaN gradients.

    Computed as ``m · ‖x / m‖`` with ``m = max|x|``, so float32 vectors of scale
    1e-30 or 1e30 keep their norm; the zero vector has norm 0 and gradient 0.
    """
    m = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    safe_m = jnp.where(m > 0, m, 1.0)
    scaled = x / safe_m
    sq = jnp.sum(scaled * scaled, axis=axis, keepdims=True)
    positive = sq > 0
    # The last branch passes 0 for the zero vector and NaN for a NaN entry: a NaN
    # weight must show up in σ, not read as a zero matrix.
    norm = safe_m * jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), sq)
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


def power_iteration_step(
    matrix: jax.Array | Sequence[jax.Array], v: jax.Array, n_iterations: int = 1
) -> SingularTriple:
    """``n_iterations`` of normalised power iteration from the right vector ``v``.

    Each iteration is Yoshida & Miyato 2017, Alg. 1, line 7, normalised::

        u ← K v / ‖K v‖,   v ← Kᵀ u / ‖Kᵀ u‖,   σ ← ‖Kᵀ u‖ = uᵀ K v

    so ``σ u vᵀ`` is exactly the gradient of ``uᵀ K v`` with ``u, v`` held fixed.
    Runs in float32; where ``K v`` or ``Kᵀ u`` vanishes (the zero matrix) the old
    ``v`` is kept and σ = 0. Works on stacked matrices ``(..., fan_in, fan_out)``
    with vectors ``(..., fan_out)``, and on a list of ``b`` same-shaped matrices
    with vectors ``(b, fan_out)``: their matvecs run one by one, their vector work
    batched, and no kernel is copied into a stack (a full extra pass per step).

    Args:
      matrix: ``K``, ``(..., fan_in, fan_out)``, or a list of ``(fan_in, fan_out)``.
      v: the current right vector, ``(..., fan_out)``, unit norm.
      n_iterations: a Python int ≥ 1.

    Returns:
      The :class:`SingularTriple` after the last iteration (float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_regs.linalg import power_iteration_step
      >>> k = jnp.diag(jnp.array([3.0, 1.0]))
      >>> t = power_iteration_step(k, jnp.array([0.6, 0.8]), n_iterations=20)
      >>> round(float(t.sigma), 4)
      3.0

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, Algorithm 1.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    if isinstance(matrix, Sequence):
        ks = [m.astype(jnp.float32) for m in matrix]

        def matvec(x):
            return jnp.stack([k @ x[i] for i, k in enumerate(ks)])

        def rmatvec(y):
            return jnp.stack([y[i] @ k for i, k in enumerate(ks)])

        fan_in = (len(ks), ks[0].shape[0])
    else:
        k = matrix.astype(jnp.float32)

        def matvec(x):
            return jnp.einsum("...ij,...j->...i", k, x)

        def rmatvec(y):
            return jnp.einsum("...ij,...i->...j", k, y)

        fan_in = k.shape[:-1]
    v = v.astype(jnp.float32)
    sigma = jnp.zeros(v.shape[:-1], jnp.float32)
    u = jnp.zeros(fan_in, jnp.float32)
    for _ in range(n_iterations):
        u, _ = normalize(matvec(v), u)
        v, sigma = normalize(rmatvec(u), v)
    return SingularTriple(sigma, u, v)


def converged_singular_triple(
    matrix: jax.Array,
    v0: jax.Array,
    *,
    max_iterations: int = 1000,
    tolerance: float = 1e-6,
) -> SingularTriple:
    """Power iteration run to convergence from ``v0``, for a warm start.

    Uses ``optax.power_iteration`` on ``Kᵀ K`` applied matrix-free as
    ``v ↦ Kᵀ(K v)`` on ``K / max|K|`` (so the product cannot overflow), then one
    :func:`power_iteration_step` for a consistent ``(σ, u, v)`` at the true scale.
    A cold start needs 20–250 iterations for 1e-3 relative accuracy on realistic
    matrices; afterwards one iteration per training step tracks σ.

    Args:
      matrix: ``K``, ``(fan_in, fan_out)``.
      v0: a starting vector ``(fan_out,)``, e.g. Gaussian (Alg. 1, line 2).
      max_iterations: cap on the iterations.
      tolerance: ``optax.power_iteration``'s relative residual tolerance.

    Returns:
      The converged :class:`SingularTriple` (float32).
    """
    k = matrix.astype(jnp.float32)
    scale = jnp.max(jnp.abs(k))
    k = k / jnp.where(scale > 0, scale, 1.0)
    v0 = v0.astype(jnp.float32)
    v0 = normalize(v0, jnp.ones_like(v0) / jnp.sqrt(v0.shape[-1]))[0]
    _, v = optax.power_iteration(
        lambda x: k.T @ (k @ x),
        v0=v0,
        num_iters=max_iterations,
        error_tolerance=tolerance,
    )
    v = jnp.where(jnp.all(jnp.isfinite(v)), v, v0)
    return power_iteration_step(matrix, v)


def spectral_norm(
    kernel: jax.Array,
    view: View | None = None,
    *,
    weight_dimension_numbers: MuonDimensionNumbers | None = None,
) -> jax.Array:
    """Exact σ_max of the kernel's matrix view (per batch slice), by SVD.

    Args:
      kernel: an array with ``ndim >= 2``.
      view: optional layout view, as in :func:`as_matrix`.
      weight_dimension_numbers: optional layout, as in :func:`as_matrix`.

    Returns:
      A float32 scalar, the largest singular value; ``(*batch,)`` for a batched
      layout.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> float(mr.spectral_norm(jnp.diag(jnp.array([3.0, -4.0]))))
      4.0
    """
    s = singular_values(kernel, view, weight_dimension_numbers=weight_dimension_numbers)
    return s[..., 0]


def singular_values(
    kernel: jax.Array,
    view: View | None = None,
    *,
    weight_dimension_numbers: MuonDimensionNumbers | None = None,
) -> jax.Array:
    """All singular values of the kernel's matrix view, in descending order (SVD).

    ``(min(fan_in, fan_out),)``, or ``(*batch, min(fan_in, fan_out))`` for a
    batched layout (see :func:`as_matrix`).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> mr.singular_values(jnp.diag(jnp.array([1.0, 3.0]))).tolist()
      [3.0, 1.0]
    """
    if view is not None:
        matrix = as_matrix(kernel, view).astype(jnp.float32)
        return jnp.linalg.svd(matrix, compute_uv=False)
    kernel = jnp.asarray(kernel)
    as_matrix(kernel)  # the ndim check and its message
    return _operator(kernel, weight_dimension_numbers).singular_values(kernel)


def stable_rank_of(s: jax.Array) -> jax.Array:
    """``Σ σ_i² / σ_1²`` over the last axis of descending singular values; 0 if σ_1 = 0."""
    top = s[..., 0]
    safe_top = jnp.where(top > 0, top, 1.0)
    return jnp.where(top > 0, jnp.sum((s / safe_top[..., None]) ** 2, axis=-1), 0.0)


def stable_rank(
    kernel: jax.Array,
    view: View | None = None,
    *,
    weight_dimension_numbers: MuonDimensionNumbers | None = None,
) -> jax.Array:
    """Stable rank ``‖K‖_F² / σ_max(K)²``, in ``[1, rank K]``; 0 for the zero matrix.

    The smooth surrogate of rank that Zhao et al. 2019 (§5) track; per batch slice
    for a batched layout (see :func:`as_matrix`).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> float(mr.stable_rank(jnp.eye(4)))
      4.0
    """
    return stable_rank_of(
        singular_values(kernel, view, weight_dimension_numbers=weight_dimension_numbers)
    )


def inv_threshold(delta: jax.Array, m: float, lower: float, upper: float) -> jax.Array:
    """The minimiser of ``tr(Ω Δ) − m log det Ω`` over ``lower·I ⪯ Ω ⪯ upper·I``.

    INVTHRESHOLD of Zhao et al. 2019 (Alg. 1, Corollary 1): with the symmetric PSD
    ``Δ = Q diag(r) Qᵀ``::

        Ω = Q diag(clip(m / r, lower, upper)) Qᵀ

    The problem separates over the eigenvalues of ``Δ`` (each ``ω r − m log ω`` is
    minimised at ``m / r``, then clipped), so this holds for any
    ``0 < lower ≤ upper``, not only the paper's ``lower · upper = 1``. ``Δ`` is
    symmetrised and decomposed by ``jnp.linalg.eigh`` in float32. Eigenvalues at
    most ``8 · eps · max r`` count as 0 and map to ``upper``, never to inf or NaN:
    float32 ``eigh`` leaves the zero eigenvalues of a singular ``Δ`` at up to
    ``2 · eps · max r`` (measured, n = 8…392), and 8× that floor still resolves
    ``r = 0.05`` next to ``1e4`` (``m / r = 200``, not ``upper``).

    Args:
      delta: ``Δ``, symmetric PSD, ``(n, n)`` or stacked ``(..., n, n)``.
      m: the weight of the log-determinant, > 0 (the paper's ``d`` or ``p``).
      lower: lower eigenvalue bound of ``Ω``, > 0.
      upper: upper eigenvalue bound of ``Ω``, ≥ ``lower``.

    Returns:
      ``Ω``, float32, the shape of ``delta``.

    Raises:
      ValueError: if ``delta`` is not (a stack of) square matrices, or concrete
        ``m``, ``lower``, ``upper`` are out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> mr.inv_threshold(jnp.diag(jnp.array([4.0, 0.0, 1e-6])), 2.0, 0.1, 10.0)
      Array([[ 0.5,  0. ,  0. ],
             [ 0. , 10. ,  0. ],
             [ 0. ,  0. , 10. ]], dtype=float32)

    References:
      Zhao, Tsai, Salakhutdinov & Gordon, "Learning Neural Networks with Adaptive
      Regularization", NeurIPS 2019, Algorithm 1 and Corollary 1.
    """
    a = jnp.asarray(delta, jnp.float32)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"inv_threshold needs square matrices, got shape {a.shape}")
    if isinstance(m, int | float) and not m > 0:
        raise ValueError(f"inv_threshold needs m > 0, got {m}")
    if isinstance(lower, int | float) and isinstance(upper, int | float):
        if not 0 < lower <= upper:
            raise ValueError(
                f"inv_threshold needs 0 < lower <= upper, got {lower}, {upper}"
            )
    a = 0.5 * (a + jnp.swapaxes(a, -1, -2))
    r, q = jnp.linalg.eigh(a, symmetrize_input=False)
    r = jnp.maximum(r, 0.0)
    noise = 8 * jnp.finfo(jnp.float32).eps * jnp.max(r, -1, keepdims=True)
    positive = r > noise
    omega = jnp.where(positive, m / jnp.where(positive, r, 1.0), upper)
    omega = jnp.clip(omega, lower, upper)
    result = (q * omega[..., None, :]) @ jnp.swapaxes(q, -1, -2)
    # Exact symmetry, so that Ω K Ω' and autodiff of tr(Ω K Ω' Kᵀ) agree to rounding.
    return 0.5 * (result + jnp.swapaxes(result, -1, -2))
