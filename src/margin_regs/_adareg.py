"""AdaReg: a matrix-normal prior on weight matrices with learned Kronecker precisions.

Zhao et al. 2019 place the prior ``W ~ MN(0, Σ_r, Σ_c)`` on a weight matrix and
learn its precisions with the weights by block coordinate descent (Alg. 1):
gradient steps on the weights with the penalty ``tr(Ω_in K Ω_out Kᵀ)``, then each
precision in closed form by INVTHRESHOLD. With ``K`` of shape
``(d, p) = (fan_in, fan_out)`` (the paper's ``W`` is ``Kᵀ``, its ``Ω_r`` our
``Ω_out``, its ``Ω_c`` our ``Ω_in``), the precisions minimise (eq. 4, 8–9)::

    tr(Ω_in K Ω_out Kᵀ) − d log det Ω_out − p log det Ω_in
    over  lower·I ⪯ Ω_out ⪯ upper·I,  lower·I ⪯ Ω_in ⪯ upper·I

one block at a time, output side first (Alg. 1, lines 3–4)::

    Ω_out ← INVTHRESHOLD(Kᵀ Ω_in K, d, lower, upper)        (p × p)
    Ω_in  ← INVTHRESHOLD(K Ω_out Kᵀ, p, lower, upper)       (d × d)

The authors' PyTorch code solves the input side first and weights each
log-determinant by the precision's own dimension, which is not the matrix-normal
density; after a full sweep both give the same penalty and gradient (checked to
1e-9 in float64), not the same factors. This module implements the paper.

The paper applies AdaReg to the last (softmax) layer (its appendix B.3 found that
best); a hidden ``d × p`` layer costs ``2 (d²p + dp²)`` multiply-adds per step
and two SVDs per re-solve. Conv kernels are viewed as ``(kh·kw·in, out)``.

**Float32.** After a re-solve ``Ω_in`` of a ``d > p`` kernel holds ``upper`` on
the directions ``K`` does not reach; dense, ``Ω_in K`` would multiply the rounding
noise of ``K`` there by ``upper``. :class:`AdaRegPrecisions` keeps eigenbases and
rotates only the kernel's change since the re-solve: penalty, gradient and
precisions stay within 1e-5 of float64 Alg. 1.

**CPU.** SVDs run one matrix at a time (two batched LAPACK calls at once can
deadlock XLA's CPU thread pool, :mod:`margin_regs._batching`). OpenBLAS's threads
compete with XLA's: on small or shared CPUs set ``OPENBLAS_NUM_THREADS=1`` before
Python starts (``benchmarks/adareg.py`` measures both).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from margin_regs import _batching, _common, _layouts, _tree, linalg
from margin_regs._numerics import rescaled

__all__ = [
    "AdaRegPrecisions",
    "AdaRegState",
    "adareg",
    "adareg_penalty",
    "adareg_update_precisions",
    "init_adareg_precisions",
]

# A singular value at most this many eps times the largest is rounding noise of a
# rank-deficient matrix (LAPACK's SVD leaves about 1-2 eps · s_max there): it counts
# as zero and its precision eigenvalue is ``upper``.
_NOISE = 8


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _dense(basis: jax.Array, values: jax.Array) -> jax.Array:
    return (basis * values[..., None, :]) @ _mT(basis)


class AdaRegPrecisions(NamedTuple):
    """The precisions of every selected kernel, in factored form.

    Each field is a pytree in the params' structure (``optax.MaskedNode`` at
    masked-out leaves), like the moments of ``optax.adam``. For a kernel viewed as
    ``K`` of shape ``(*batch, d, p)``::

        Ω_in  = basis_in  diag(values_in)  basis_inᵀ       (d × d)
        Ω_out = basis_out diag(values_out) basis_outᵀ      (p × p)

    After a re-solve, ``Ω_in`` of a ``d > p`` kernel holds ``upper`` on the
    ``d − p`` directions that ``K`` does not reach and ``≈ p / σ²`` on its range
    (condition number up to ``upper / lower``); stored densely in float32, the
    product ``Ω_in K`` would multiply the rounding noise of ``K``'s null-space
    component by ``upper``. Here ``K`` enters only as
    ``T = basis_inᵀ (K − anchor) basis_out + rotated``: the kernel at the last
    re-solve (``anchor``) is rotated into the eigenbases once, with the entries on
    directions where it is exactly zero in exact arithmetic set to exact zeros
    (``rotated``), and only the change since then is rotated at each step. Then
    ``Ω_in K Ω_out = basis_in (values_in values_outᵀ ⊙ T) basis_outᵀ`` with no
    cancellation (Zhao et al.'s maths, evaluated stably; the same for ``Ω_out``
    when ``d < p``).

    Attributes:
      basis_in: orthogonal, ``(*batch, d, d)``; eigenvectors of ``Ω_in``.
      values_in: ``(*batch, d)``; eigenvalues of ``Ω_in`` (the paper's ``Ω_c``).
      basis_out: orthogonal, ``(*batch, p, p)``; eigenvectors of ``Ω_out``.
      values_out: ``(*batch, p)``; eigenvalues of ``Ω_out`` (the paper's ``Ω_r``).
      anchor: ``(*batch, d, p)``; the kernel at the last re-solve (zeros before).
      rotated: ``(*batch, d, p)``; ``basis_inᵀ anchor basis_out``, exact zeros on
        the directions where the anchor has no component.
    """

    basis_in: Any
    values_in: Any
    basis_out: Any
    values_out: Any
    anchor: Any
    rotated: Any

    @property
    def omega_in(self) -> Any:
        """The dense ``Ω_in`` of every kernel, ``(*batch, d, d)`` (for plots)."""
        return jax.tree.map(_dense, self.basis_in, self.values_in)

    @property
    def omega_out(self) -> Any:
        """The dense ``Ω_out`` of every kernel, ``(*batch, p, p)`` (for plots)."""
        return jax.tree.map(_dense, self.basis_out, self.values_out)

    @classmethod
    def from_dense(cls, omega_in: Any, omega_out: Any) -> AdaRegPrecisions:
        """Precisions from dense symmetric positive definite ``Ω_in``, ``Ω_out``.

        Args:
          omega_in: a pytree of ``(*batch, d, d)`` matrices (``MaskedNode`` where
            not selected), e.g. a start for :func:`adareg_update_precisions`.
          omega_out: the matching pytree of ``(*batch, p, p)`` matrices.

        Returns:
          :class:`AdaRegPrecisions` whose ``omega_in``, ``omega_out`` are the
          given matrices (symmetrised).

        Example:
          >>> import jax.numpy as jnp
          >>> import margin_regs as mr
          >>> prec = mr.AdaRegPrecisions.from_dense(
          ...     {"w": jnp.diag(jnp.array([2.0, 1.0]))}, {"w": 3 * jnp.eye(3)})
          >>> jnp.diag(prec.omega_in["w"]).tolist(), prec.anchor["w"].shape
          ([2.0, 1.0], (2, 3))
        """

        def factor(o_in, o_out):
            dtype = jnp.promote_types(jnp.result_type(o_in, o_out), jnp.float32)
            o_in, o_out = jnp.asarray(o_in, dtype), jnp.asarray(o_out, dtype)
            c_in, q_in = jnp.linalg.eigh(0.5 * (o_in + _mT(o_in)))
            c_out, q_out = jnp.linalg.eigh(0.5 * (o_out + _mT(o_out)))
            shape = (*q_in.shape[:-1], q_out.shape[-1])
            # two buffers, so that the state can be donated
            anchor, rotated = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
            return cls(q_in, c_in, q_out, c_out, anchor, rotated)

        leaves, treedef = jax.tree.flatten(omega_in)
        pairs = zip(leaves, jax.tree.leaves(omega_out), strict=True)
        return _unflatten(treedef, [factor(a, b) for a, b in pairs])


class AdaRegState(NamedTuple):
    """State of :func:`adareg`.

    Attributes:
      count: steps taken, int32; drives ``coeff`` schedules and the re-solve period.
      precisions: the :class:`AdaRegPrecisions` in use.
    """

    count: jax.Array
    precisions: AdaRegPrecisions


# ------------------------------------------------------------- per-kernel maths
# Every function below takes K of shape (*batch, d, p) and one kernel's
# AdaRegPrecisions of arrays, and broadcasts over the batch axes.


def _rotate(k: jax.Array, f: AdaRegPrecisions) -> jax.Array:
    """``T = Q_inᵀ K Q_out``, rotating only the change since the last re-solve."""
    return (_mT(f.basis_in) @ (k - f.anchor)) @ f.basis_out + f.rotated


def _scaled(t: jax.Array, f: AdaRegPrecisions) -> jax.Array:
    return f.values_in[..., :, None] * t * f.values_out[..., None, :]


def _preconditioned(k: jax.Array, f: AdaRegPrecisions) -> jax.Array:
    """``Ω_in K Ω_out``, ``(*batch, d, p)``: half the penalty's gradient.

    Costs ``2 (d²p + dp²)`` flops; neither ``Ω_in ⊗ Ω_out`` nor a dense ``Ω`` is
    formed.
    """
    return (f.basis_in @ _scaled(_rotate(k, f), f)) @ _mT(f.basis_out)


def _value(k: jax.Array, f: AdaRegPrecisions) -> jax.Array:
    """``tr(Ω_in K Ω_out Kᵀ) = Σ c_in c_out T²``, summed over batch axes."""
    t = _rotate(k, f)
    return jnp.sum(_scaled(t, f) * t)


_prior = jax.custom_jvp(_value)


@_prior.defjvp
def _prior_jvp(primals, tangents):
    # Autodiff of Σ c c T² would differentiate the anchor's zeros away: the exact
    # derivative in K is 2 Ω_in K Ω_out, from the stable product.
    k, f = primals
    k_dot, f_dot = tangents
    value, from_f = jax.jvp(lambda g: _value(k, g), (f,), (f_dot,))
    return value, from_f + 2 * jnp.sum(_preconditioned(k, f) * k_dot)


def _inverse_clipped(s, scale, m, n, lower, upper):
    """INVTHRESHOLD's eigenvalues from ``s``, padded with ``upper`` to length n.

    ``s``: singular values of a factor divided by ``scale``, descending; those at
    the noise floor count as zero. Returns the values and the nonzero mask.
    """
    positive = s > _NOISE * jnp.finfo(s.dtype).eps * s[..., :1]
    values = linalg.clipped_inverse(scale * s, positive, m, lower, upper)
    pad = [(0, 0)] * (s.ndim - 1) + [(0, n - s.shape[-1])]
    return (
        jnp.pad(values, pad, constant_values=upper).astype(s.dtype),
        jnp.pad(positive, pad, constant_values=False),
    )


def _complete(u: jax.Array) -> jax.Array:
    """``u``'s columns with a canonical sign, completed to an orthonormal basis.

    Singular vectors are unique only up to sign, and the complement of their span
    (where a precision is ``upper``) has no preferred basis. Fixing each column's
    sign by its largest entry and taking the complement from a Householder QR of
    ``u`` make the state a continuous function of the kernel (almost everywhere):
    params that differ by rounding (a sharded and a single-device run) give states
    that differ by rounding.
    """
    top = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)
    u = u * jnp.where(jnp.take_along_axis(u, top, axis=-2) < 0, -1, 1).astype(u.dtype)
    n, k = u.shape[-2:]
    if n == k:
        return u
    complement = jnp.linalg.qr(u, mode="complete")[0][..., k:]
    return jnp.concatenate([u, complement], axis=-1)


def _sweep(k: jax.Array, f: AdaRegPrecisions, lower, upper) -> AdaRegPrecisions:
    """Alg. 1, lines 3–4, on a ``(d, p)`` kernel, by SVDs of the factors.

    ``Ω_out ← INVTHRESHOLD(Kᵀ Ω_in K, d)`` is read off the SVD of ``Ω_in^½ K`` and
    ``Ω_in ← INVTHRESHOLD(K Ω_out Kᵀ, p)`` off that of ``K Ω_out^½``: never a Gram
    matrix, whose eigenvalues float32 resolves only to ``eps · max r``. ``K`` is
    divided by a power of two near ``max |K|`` first (exact), and the scale is
    folded into the eigenvalues.
    """
    d, p = k.shape[-2:]
    k_unit, scale = rescaled(k)
    unit = f._replace(anchor=f.anchor / scale, rotated=f.rotated / scale)
    # Ω_in^½ K in Ω_in's eigenbasis: the rotation on the left keeps its right
    # singular vectors, which are Ω_out's eigenvectors.
    half_in = jnp.sqrt(f.values_in)[..., :, None] * (
        _rotate(k_unit, unit) @ _mT(f.basis_out)
    )
    _, s_out, vh = jnp.linalg.svd(half_in, full_matrices=False)
    basis_out = _complete(_mT(vh))
    values_out, positive_out = _inverse_clipped(
        s_out, scale[..., 0], d, p, lower, upper
    )
    # K Ω_out^½; the columns on K's null space are exactly zero in exact arithmetic.
    weights = jnp.sqrt(jnp.where(positive_out, values_out, 0))
    half_out = (k_unit @ basis_out) * weights[..., None, :]
    u, s_in, _ = jnp.linalg.svd(half_out, full_matrices=False)
    basis_in = _complete(u)
    values_in, positive_in = _inverse_clipped(s_in, scale[..., 0], p, d, lower, upper)
    rotated = (_mT(basis_in) @ k) @ basis_out
    rotated = jnp.where(
        positive_in[..., :, None] & positive_out[..., None, :], rotated, 0
    )
    return AdaRegPrecisions(basis_in, values_in, basis_out, values_out, k, rotated)


def _identity(k: jax.Array) -> AdaRegPrecisions:
    *batch, d, p = k.shape

    def eye(n):
        return jnp.broadcast_to(jnp.eye(n, dtype=k.dtype), (*batch, n, n))

    # every leaf its own buffer (none shared), so that the state can be donated
    anchor, rotated = jnp.zeros(k.shape, k.dtype), jnp.zeros(k.shape, k.dtype)
    ones = jnp.ones((*batch, d), k.dtype), jnp.ones((*batch, p), k.dtype)
    return AdaRegPrecisions(eye(d), ones[0], eye(p), ones[1], anchor, rotated)


# --------------------------------------------------------------- over pytrees


def _unflatten(treedef: Any, factors: list[AdaRegPrecisions]) -> AdaRegPrecisions:
    """Per-kernel factors (in leaf order) -> :class:`AdaRegPrecisions` of pytrees."""
    return AdaRegPrecisions(
        *(
            jax.tree.unflatten(treedef, [f[j] for f in factors])
            for j in range(len(AdaRegPrecisions._fields))
        )
    )


def _shapes(k: jax.Array) -> list[tuple[int, ...]]:
    *batch, d, p = k.shape
    return [(*batch, d, d), (*batch, d), (*batch, p, p), (*batch, p), k.shape, k.shape]


def _matrices(params: Any, layouts: Any, fn: str) -> tuple[list, Any]:
    """The selected kernels as ``(*batch, d, p)`` matrices, and the state treedef.

    In float32 (float64 for float64 kernels), whatever the kernel's dtype.
    """
    found = jax.tree_util.tree_flatten_with_path(layouts, is_leaf=_layouts.is_spec)
    for path, spec in found[0]:
        if spec is not None and not isinstance(spec, _layouts.MuonDimensionNumbers):
            raise ValueError(
                f"{fn}: {_tree.path_name(path)!r} has the layout {spec!r}; AdaReg's "
                "Kronecker precisions need a matrix (a MuonDimensionNumbers layout)"
            )
    leaves, _, ops, treedef = _layouts.flatten_selected(params, layouts)
    views = [op.view(k) for k, op in zip(leaves, ops, strict=True)]
    return [v.astype(jnp.promote_types(v.dtype, jnp.float32)) for v in views], treedef


def _factors(kernels: list, treedef: Any, precisions: Any) -> list[AdaRegPrecisions]:
    """Each kernel's factors, checked against its shape."""
    if isinstance(precisions, AdaRegPrecisions):
        try:
            fields = [treedef.flatten_up_to(x) for x in precisions]
        except (ValueError, TypeError):
            fields = None
        if fields is not None:
            factors = [AdaRegPrecisions(*f) for f in zip(*fields, strict=True)]
            shapes = [[getattr(x, "shape", None) for x in f] for f in factors]
            if shapes == [_shapes(k) for k in kernels]:
                return factors
    raise ValueError(
        "adareg: precisions do not match the selected kernels; build them with "
        "init_adareg_precisions using the same mask and weight_dimension_numbers"
    )


def _guarded(k: jax.Array, old: AdaRegPrecisions, new: AdaRegPrecisions) -> Any:
    # A non-finite kernel (a diverged step) keeps its old precisions, so one bad
    # step cannot leave NaN in the optimizer state for good.
    finite = jnp.all(jnp.isfinite(k))
    for x in new:
        finite &= jnp.all(jnp.isfinite(x))
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


@_batching.one_at_a_time
def _sweep_one(k: jax.Array, f: AdaRegPrecisions, lower, upper) -> AdaRegPrecisions:
    """:func:`_sweep` of one ``(d, p)`` matrix, guarded; a loop under ``vmap``.

    A batch of matrices goes through LAPACK one at a time: two batched SVDs that
    XLA runs at once can deadlock its CPU thread pool (see ``_batching``).
    """
    return _guarded(k, f, _sweep(k, f, lower, upper))


def _solve(kernels: list, factors: list, lower: Any, upper: Any) -> list:
    """One sweep for every kernel, each matrix of a batched layout on its own."""
    new = []
    for k, f in zip(kernels, factors, strict=True):
        d, p = k.shape[-2:]
        flat = jax.tree.map(lambda x, n=k.ndim - 2: x.reshape(-1, *x.shape[n:]), f)
        bounds = jnp.asarray(lower, k.dtype), jnp.asarray(upper, k.dtype)
        solved = jax.vmap(_sweep_one, in_axes=(0, 0, None, None))(
            k.reshape(-1, d, p), flat, *bounds
        )
        new.append(jax.tree.map(lambda x, like: x.reshape(like.shape), solved, f))
    return new


def _init(params: Any, layouts: Any, fn: str) -> AdaRegPrecisions:
    kernels, treedef = _matrices(params, layouts, fn)
    return _unflatten(treedef, [_identity(k) for k in kernels])


def init_adareg_precisions(
    params: Any,
    *,
    mask: _tree.Mask = None,
    weight_dimension_numbers: _layouts.WeightDimensionNumbers = None,
) -> Any:
    """Identity precisions ``Ω_in = I_d``, ``Ω_out = I_p`` for each selected kernel.

    With identities the penalty is ``‖K‖_F²``, plain L2 (Zhao et al. 2019, §3.2).

    Args:
      params: a pytree of parameters.
      mask: which leaves to regularize (pytree of bools or callable, as in
        ``optax.masked``); default: the weight matrices (``ndim >= 2``, not named
        ``bias``, ``scale`` or ``embedding``).
      weight_dimension_numbers: which matrix each leaf is: one
        ``optax.contrib.MuonDimensionNumbers``, a pytree of them with ``None`` for
        non-weights (a prefix of params allowed), or a callable ``params -> such a
        pytree``, as in ``optax.contrib.muon``. Batch axes give separate matrices,
        each with its own precisions. Default: the ``(-1, last)`` view of the
        leaves ``mask`` selects. A ``ConvOperator`` is a ValueError: the
        precisions need a matrix.

    Returns:
      :class:`AdaRegPrecisions` with the params' structure: identity factors at the
      selected kernels (float32; float64 for float64 kernels) and
      ``optax.MaskedNode()`` elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> prec = mr.init_adareg_precisions({"w": jnp.ones((5, 3)), "b": jnp.ones(3)})
      >>> prec.omega_in["w"].shape, prec.omega_out["w"].shape, prec.omega_in["b"]
      ((5, 5), (3, 3), MaskedNode())
    """
    layouts = _layouts.resolve_layouts(params, weight_dimension_numbers, mask)
    return _init(params, layouts, "init_adareg_precisions")


def adareg_penalty(
    params: Any,
    precisions: Any,
    *,
    mask: _tree.Mask = None,
    weight_dimension_numbers: _layouts.WeightDimensionNumbers = None,
) -> jax.Array:
    """The matrix-normal prior's penalty ``Σ tr(Ω_in K Ω_out Kᵀ)``.

    Equals ``Σ ‖Ω_in^½ K Ω_out^½‖_F²``; its gradient with respect to each kernel is
    ``2 Ω_in K Ω_out``, the term :func:`adareg` adds, computed from the factored
    precisions without cancellation (a custom JVP; plain autodiff would multiply
    the rounding noise of ``K``'s null-space component by ``upper``). The
    log-determinant terms do not depend on the weights and are left out. Add
    ``coeff`` times this to the loss.

    Args:
      params: a pytree of parameters.
      precisions: from :func:`init_adareg_precisions` or
        :func:`adareg_update_precisions`, with the same ``mask``.
      mask: which leaves to regularize, as for :func:`init_adareg_precisions`.
      weight_dimension_numbers: which matrix each leaf is, as for
        :func:`init_adareg_precisions`.

    Returns:
      A float32 scalar (float64 for float64 kernels).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.ones((2, 3))}
      >>> float(mr.adareg_penalty(params, mr.init_adareg_precisions(params)))
      6.0

    References:
      Zhao et al., "Learning Neural Networks with Adaptive Regularization", 2019, eq. 4.
    """
    layouts = _layouts.resolve_layouts(params, weight_dimension_numbers, mask)
    kernels, treedef = _matrices(params, layouts, "adareg_penalty")
    factors = _factors(kernels, treedef, precisions)
    terms = [_prior(k, f) for k, f in zip(kernels, factors, strict=True)]
    return sum(terms, jnp.zeros((), jnp.float32))


def adareg_update_precisions(
    params: Any,
    precisions: Any,
    *,
    lower: float,
    upper: float,
    mask: _tree.Mask = None,
    weight_dimension_numbers: _layouts.WeightDimensionNumbers = None,
) -> Any:
    """One block-coordinate sweep of the precisions (Zhao et al. 2019, Alg. 1, l. 3–4).

    With ``K = as_matrix(kernel)`` of shape ``(d, p)``::

        Ω_out ← INVTHRESHOLD(Kᵀ Ω_in K, d, lower, upper)
        Ω_in  ← INVTHRESHOLD(K Ω_out Kᵀ, p, lower, upper)

    Each solve is exact, so the objective
    ``tr(Ω_in K Ω_out Kᵀ) − d log det Ω_out − p log det Ω_in`` never increases.
    The eigenpairs come from SVDs of ``Ω_in^½ K`` and ``K Ω_out^½`` (not from the
    Gram matrices, whose small eigenvalues float32 loses), after dividing ``K`` by
    a power of two near ``max |K|``; singular values below ``8 · eps`` times the
    largest count as zero (their precision is ``upper``). Matrices go through
    LAPACK one at a time (batched CPU SVDs can deadlock XLA's thread pool). A
    kernel with non-finite entries keeps its old precisions.

    Args:
      params: a pytree of parameters.
      precisions: the current precisions (same ``mask``).
      lower: lower eigenvalue bound of each precision, > 0 (the paper's ``u``).
      upper: upper eigenvalue bound, ≥ ``lower`` (the paper's ``v``).
      mask: which leaves to regularize, as for :func:`init_adareg_precisions`.
      weight_dimension_numbers: which matrix each leaf is, as for
        :func:`init_adareg_precisions`.

    Returns:
      The new :class:`AdaRegPrecisions`, structured as ``precisions``.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.diag(jnp.array([1.0, 2.0]))}
      >>> prec = mr.init_adareg_precisions(params)
      >>> prec = mr.adareg_update_precisions(params, prec, lower=1e-3, upper=1e3)
      >>> jnp.diag(prec.omega_out["w"]).round(4).tolist()   # d / r = 2 / [1, 4]
      [2.0, 0.5]

    References:
      Zhao et al., "Learning Neural Networks with Adaptive Regularization", 2019,
      Algorithm 1 and Corollary 1.
    """
    _common.check_bounds(lower, upper, "adareg_update_precisions")
    layouts = _layouts.resolve_layouts(params, weight_dimension_numbers, mask)
    kernels, treedef = _matrices(params, layouts, "adareg_update_precisions")
    factors = _factors(kernels, treedef, precisions)
    return _unflatten(treedef, _solve(kernels, factors, lower, upper))


def adareg(
    coeff: optax.ScalarOrSchedule,
    *,
    lower: float = 0.1,
    upper: float = 10.0,
    update_every: int = 500,
    mask: _tree.Mask = None,
    weight_dimension_numbers: _layouts.WeightDimensionNumbers = None,
) -> optax.GradientTransformationExtraArgs:
    """Adds the gradient of AdaReg's matrix-normal prior, re-solving its precisions.

    For each selected kernel ``K`` (viewed as ``(fan_in, fan_out)``)::

        g ← g + 2 · coeff · Ω_in K Ω_out     (the gradient of coeff · tr(Ω_in K Ω_out Kᵀ))

    The precisions start at the identity (AdaReg starts as L2 with weight ``coeff``)
    and at every step whose count is a positive multiple of ``update_every`` are
    re-solved from ``params`` before the term (:func:`adareg_update_precisions`,
    Alg. 1's outer loop). The re-solve is a real branch, under ``jax.vmap`` too (an
    ensemble re-solves when any member is due, the others keep their precisions),
    so the other steps skip the SVDs. The default period, 500 steps, is the paper's
    inner block (30–50 epochs of 600–6,000 samples at batch 256).

    **Stability**: SGD needs ``coeff · lr < 1 / upper²`` (``docs/guides/layouts.md``,
    "AdaReg's box"); the default box ``[0.1, 10]`` is stable for ``coeff · lr < 1e-2``.

    Args:
      coeff: the paper's λ: a float, an array or an optax schedule of the count.
      lower: lower eigenvalue bound of the precisions (the paper's ``u``), > 0.
      upper: upper eigenvalue bound (the paper's ``v``), ≥ ``lower``.
      update_every: the re-solve period, a Python int ≥ 1 (static under
        ``optax.inject_hyperparams``, as are a callable ``mask`` and the layouts).
      mask: which leaves (``docs/guides/layouts.md``); the paper regularizes the
        last layer: ``mask=mask_by_path(r"Dense_2/kernel$")``.
      weight_dimension_numbers: each leaf's matrix (``docs/guides/layouts.md``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` holding an :class:`AdaRegState`;
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.ones((3, 2))}
      >>> tx = mr.adareg(0.5, update_every=100)
      >>> updates, _ = tx.update({"w": jnp.zeros((3, 2))}, tx.init(params), params)
      >>> updates["w"].tolist()   # 2 · 0.5 · K
      [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]

    References:
      Zhao, Tsai, Salakhutdinov & Gordon, "Learning Neural Networks with Adaptive
      Regularization", NeurIPS 2019, Algorithm 1.
    """
    _common.check_coeff(coeff, "coeff", "adareg")
    _common.check_bounds(lower, upper, "adareg")
    _common.check_positive_int(update_every, "update_every", "adareg")

    def init(params, layouts):
        return AdaRegState(jnp.zeros([], jnp.int32), _init(params, layouts, "adareg"))

    def update(updates, state, params, layouts):
        kernels, treedef = _matrices(params, layouts, "adareg")
        factors = _factors(kernels, treedef, state.precisions)
        resolve = (state.count > 0) & (state.count % update_every == 0)
        # a real branch under vmap too: the SVDs run only on re-solve steps
        _, factors = _batching.periodic_cond(
            resolve,
            lambda kf: (kf[0], _solve(*kf, lower, upper)),
            (kernels, factors),
        )
        c = _common.coeff_at(coeff, state.count)
        _, _, ops, _ = _layouts.flatten_selected(params, layouts)
        grads = treedef.flatten_up_to(updates)
        new = [
            g + op.unview(2 * c * _preconditioned(k, f)).astype(g.dtype)
            for g, op, k, f in zip(grads, ops, kernels, factors, strict=True)
        ]
        state = AdaRegState(
            optax.safe_increment(state.count), _unflatten(treedef, factors)
        )
        return treedef.unflatten(new), state

    return _layouts.masked_transform(
        "adareg", init, update, weight_dimension_numbers, mask
    )
