"""Matrix views, power iteration and exact spectral quantities of weight kernels.

A *weight matrix* is any parameter leaf with ``ndim >= 2``, viewed as a 2-D matrix
``K`` of shape ``(fan_in, fan_out)``: a Dense kernel as it is, a conv kernel
``(kh, kw, in, out)`` reshaped to ``(kh*kw*in, out)`` (Yoshida & Miyato 2017, §3;
Zhao et al. 2019, appendix). Other layouts (equinox's fan-out first, DenseGeneral,
scanned stacks) are named by ``weight_dimension_numbers`` (:mod:`margin_regs._layouts`).

Power iteration here runs on any linear operator of the layout contract
(:func:`margin_regs._layouts.make_operator`: matrices, their batched stacks,
convolutions), is matrix-free (two matvecs per iteration, never ``KᵀK``), runs in
float32 whatever the kernel's dtype, normalises every vector with a
scale-safe norm (so kernels of scale 1e-20 or 1e20 neither underflow nor overflow)
and is safe for the zero matrix (σ = 0, finite vectors, no NaN).
``optax.power_iteration`` does not fit here: it is a ``while_loop`` (the seed
Eigenvalue Decay penalty differentiates through its iterations), it normalises a
whole pytree by one norm (a batched layout needs one per slice), and the zero
matrix divides by zero.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers

from margin_regs import _batching, _layouts
from margin_regs._numerics import normalize, rescaled, safe_norm

View = Callable[[jax.Array], jax.Array]

__all__ = [
    "SingularTriple",
    "View",
    "as_matrix",
    "clipped_inverse",
    "converged_power_iteration",
    "converged_singular_triple",
    "inv_threshold",
    "normalize",
    "power_iteration",
    "power_iteration_step",
    "safe_norm",
    "singular_values",
    "spectral_norm",
    "stable_rank",
    "stable_rank_of",
]


class SingularTriple(NamedTuple):
    """Top singular triple of an operator ``A``: ``A v ≈ σ u``, ``Aᵀ u ≈ σ v``.

    For a matrix ``K (fan_in, fan_out)``, ``A = K``; stacked operators add leading
    batch axes to every field.

    Attributes:
      sigma: σ ≥ 0, float32, ``(*batch,)``.
      u: unit left singular vector, ``(*batch, *out_shape)`` (a matrix: fan_in).
      v: unit right singular vector, ``(*batch, *in_shape)`` (a matrix: fan_out);
        the one persisted across steps.
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
        not weight matrices), no layout is given for a kernel that is neither 2-D
        nor 4-D (a 3-D one has no default), ``view`` does not return a 2-D array,
        or the layout's axes overlap, repeat or are out of range.

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
    layout = _layouts.default_layout(kernel.shape) if layout is None else layout
    checked = _layouts.check_layout(layout, kernel.shape, "kernel")
    return _layouts.make_operator(checked, kernel.shape)


_MAX_WARM_ITERATIONS = 1000
_WARM_TOLERANCE = 1e-6


def _start(op: Any, v: jax.Array) -> SingularTriple:
    v = jnp.asarray(v, jnp.float32)
    lead = v.shape[: v.ndim - len(op.in_shape)]
    u = jnp.zeros(lead + tuple(op.out_shape), jnp.float32)
    return SingularTriple(jnp.zeros(lead, jnp.float32), u, v)


def _step(op: Any, kernel: jax.Array, t: SingularTriple) -> SingularTriple:
    """One iteration of Yoshida & Miyato 2017, Alg. 1, line 7, on every slice."""
    u, _ = normalize(op.matvec(kernel, t.v), t.u, len(op.out_shape))
    v, sigma = normalize(op.rmatvec(kernel, u), t.v, len(op.in_shape))
    return SingularTriple(sigma, u, v)


def power_iteration(
    op: Any, kernel: jax.Array, v: jax.Array, n_iterations: int
) -> SingularTriple:
    """``n`` normalised power iterations on one kernel, every batch slice at once::

        u ← A v / ‖A v‖,   v ← Aᵀ u / ‖Aᵀ u‖,   σ ← ‖Aᵀ u‖ = uᵀ A v

    A ``fori_loop`` (a ``scan`` to autodiff), so the program does not grow with
    ``n``. Where ``A v`` or ``Aᵀ u`` vanishes (a zero kernel) the old vector is
    kept and σ = 0. The one power iteration of the package: the penalties, the
    transforms and :func:`converged_power_iteration` all run it.

    Args:
      op: the kernel's operator (:func:`margin_regs._layouts.make_operator`).
      kernel: the kernel.
      v: ``(*batch, *in_shape)`` start vectors.
      n_iterations: a Python int ≥ 1 (Yoshida & Miyato 2017, Alg. 1: 1 per step).

    Returns:
      float32 ``(σ (*batch,), u (*batch, *out_shape), v)``.
    """
    return jax.lax.fori_loop(
        0, n_iterations, lambda _, t: _step(op, kernel, t), _start(op, v)
    )


@functools.partial(jax.jit, static_argnums=0)
def converged_power_iteration(
    op: Any, kernel: jax.Array, v0: jax.Array
) -> SingularTriple:
    """Power iteration run to convergence from ``v0``, on every batch slice at once.

    Iterates on the kernel divided by a power of two near ``max|kernel|`` (so no
    product overflows) until no vector entry moves by more than 1e-6 or 1000
    iterations, then takes one step at the true scale for a consistent
    ``(σ, u, v)``. A cold start needs 20–250 iterations for 1e-3 relative
    accuracy on realistic matrices; afterwards one iteration per training step
    tracks σ. A non-finite kernel keeps ``v0``.
    """
    n_in = len(op.in_shape)
    unit = rescaled(jnp.asarray(kernel, jnp.float32))[0]
    v0 = jnp.asarray(v0, jnp.float32)
    v0 = normalize(v0, jnp.full_like(v0, math.prod(op.in_shape) ** -0.5), n_in)[0]

    def body(carry):
        i, t, _ = carry
        new = _step(op, unit, t)
        return i + 1, new, jnp.max(jnp.abs(new.v - t.v))

    def not_done(carry):
        i, _, change = carry
        return (i < _MAX_WARM_ITERATIONS) & (change > _WARM_TOLERANCE)

    init = (0, _start(op, v0), jnp.float32(jnp.inf))
    t = jax.lax.while_loop(not_done, body, init)[1]
    finite = jnp.all(jnp.isfinite(t.v), axis=tuple(range(t.v.ndim - n_in, t.v.ndim)))
    v = jnp.where(finite.reshape(finite.shape + (1,) * n_in), t.v, v0)
    return power_iteration(op, kernel, v, 1)


def power_iteration_step(
    matrix: jax.Array | Sequence[jax.Array], v: jax.Array, n_iterations: int = 1
) -> SingularTriple:
    """``n_iterations`` of normalised power iteration from the right vector ``v``.

    :func:`power_iteration` on plain matrices: ``K (..., fan_in, fan_out)`` with
    vectors ``(..., fan_out)``, or a list of ``b`` same-shaped matrices with vectors
    ``(b, fan_out)``.

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
    if isinstance(matrix, Sequence):
        matrix = jnp.stack(matrix)
    return power_iteration(_matrix_operator(matrix), matrix, v, n_iterations)


def _matrix_operator(matrix: jax.Array) -> Any:
    """The operator of ``(..., fan_in, fan_out)``: leading axes are batch axes."""
    n = jnp.ndim(matrix)
    return _layouts.make_operator(MuonDimensionNumbers(n - 2, n - 1), jnp.shape(matrix))


def converged_singular_triple(matrix: jax.Array, v0: jax.Array) -> SingularTriple:
    """:func:`converged_power_iteration` on a matrix ``(..., fan_in, fan_out)``."""
    return converged_power_iteration(_matrix_operator(matrix), matrix, v0)


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
        return _layouts.singular_values_of(matrix)
    kernel = jnp.asarray(kernel)
    if weight_dimension_numbers is None:
        as_matrix(kernel)  # the ndim and default-layout checks and their messages
    return _operator(kernel, weight_dimension_numbers).singular_values(kernel)


def stable_rank_of(s: jax.Array) -> jax.Array:
    """``Σ σ_i² / σ_1²`` over the last axis of descending singular values.

    0 only where ``σ_1 == 0`` (the zero matrix); NaN singular values (the SVD of a
    kernel with NaN or inf entries) give NaN, never that 0.
    """
    top = s[..., 0]
    # Test for the zero matrix, not for a positive σ_1: NaN > 0 is False.
    zero = top == 0
    safe_top = jnp.where(zero, 1.0, top)
    return jnp.where(zero, 0.0, jnp.sum((s / safe_top[..., None]) ** 2, axis=-1))


def stable_rank(
    kernel: jax.Array,
    view: View | None = None,
    *,
    weight_dimension_numbers: MuonDimensionNumbers | None = None,
) -> jax.Array:
    """Stable rank ``‖K‖_F² / σ_max(K)²``, in ``[1, rank K]``; 0 for the zero matrix.

    NaN for a kernel with NaN or inf entries (as :func:`spectral_norm`).

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


# One matrix per LAPACK call: batched ones can deadlock XLA's CPU pool (_batching).
_eigh = _batching.per_matrix(lambda a: jnp.linalg.eigh(a, symmetrize_input=False))


def clipped_inverse(
    root: jax.Array, positive: jax.Array, m: Any, lower: Any, upper: Any
) -> jax.Array:
    """INVTHRESHOLD's eigenvalues: ``clip(m / root², lower, upper)``, ``upper``
    where not ``positive``.

    ``root`` holds the square roots of ``Δ``'s eigenvalues (the singular values of
    a factor of ``Δ``, for AdaReg's sweep); ``root²`` is never formed, since it
    overflows float32 for kernels ≳ 2⁶⁴ (``m / root / root`` over- or underflows
    only where the clip takes over). Shared by :func:`inv_threshold` and
    :func:`margin_regs.adareg_update_precisions`.
    """
    safe = jnp.where(positive, root, 1)
    inverse = jnp.asarray(m, root.dtype) / safe / safe
    return jnp.clip(jnp.where(positive, inverse, upper), lower, upper)


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
    r, q = _eigh(a)
    r = jnp.maximum(r, 0.0)
    noise = 8 * jnp.finfo(jnp.float32).eps * jnp.max(r, -1, keepdims=True)
    omega = clipped_inverse(jnp.sqrt(r), r > noise, m, lower, upper)
    result = (q * omega[..., None, :]) @ jnp.swapaxes(q, -1, -2)
    # Exact symmetry, so that Ω K Ω' and autodiff of tr(Ω K Ω' Kᵀ) agree to rounding.
    return 0.5 * (result + jnp.swapaxes(result, -1, -2))
