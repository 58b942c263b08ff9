"""Convolutions as the linear maps they are on inputs of a given shape.

A conv kernel ``K`` defines the linear operator ``A(K): x ↦ conv(x, K)`` on one
sample ``x`` of a fixed input shape. Its largest singular value is the layer's
Lipschitz constant, the quantity every margin bound needs (Sokolić et al. 2017,
Thm. 5); the σ of the reshaped ``(kh·kw·in, out)`` kernel matrix (Yoshida & Miyato
2017, §3) is a different number, neither an upper nor a lower bound in general.
:class:`ConvOperator` names that operator for one parameter leaf, wherever a
``weight_dimension_numbers`` layout is accepted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from margin_regs import _batching, _krylov
from margin_regs._numerics import rescaled

__all__ = ["ConvLinearOperator", "ConvOperator"]

# The letters of the spatial axes, by spatial rank (flax's channels-last names).
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}
_CHANNELS_LAST = {
    rank: ("N" + s + "C", s + "IO", "N" + s + "C") for rank, s in _SPATIAL.items()
}


@dataclasses.dataclass(frozen=True)
class ConvOperator:
    """The convolution ``x ↦ conv(x, K)`` of one sample, as a parameter's layout.

    ``A(K) x = lax.conv_general_dilated(x[None], K, strides, padding,
    rhs_dilation=rhs_dilation, feature_group_count=feature_group_count,
    dimension_numbers=dimension_numbers)[0]``: a linear map from inputs of
    ``input_shape`` to outputs of one sample, whose σ is the operator norm (the
    layer's Lipschitz constant), not the σ of the reshaped kernel. A hashable
    pytree *leaf*, passed where ``weight_dimension_numbers`` takes a layout;
    arguments are normalised, so two specs of the same operator compare equal.

    Args:
      input_shape: one sample's shape in the lhs layout, channels included, no batch
        axis: ``(H, W, C)`` for ``"NHWC"``, ``(C, H, W)`` for ``"NCHW"``; 1-D, 2-D or
        3-D convolutions.
      strides: window strides, an int (every spatial axis) or one per spatial axis.
      padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"``, or one ``(lo, hi)`` pair of
        non-negative ints per spatial axis.
      rhs_dilation: kernel (atrous) dilation, an int or one per spatial axis.
      feature_group_count: grouped convolution; the input channels must be a
        multiple of it (depthwise: the number of input channels).
      dimension_numbers: ``(lhs, rhs, out)`` layout strings as in
        ``lax.conv_general_dilated`` (flax: ``("NHWC", "HWIO", "NHWC")``; equinox:
        ``("NCHW", "OIHW", "NCHW")``), or a ``lax.ConvDimensionNumbers``. ``None``
        means flax's channels-last layout of ``input_shape``'s rank (``"NWC"``,
        ``"NHWC"`` or ``"NDHWC"``).

    Raises:
      ValueError: naming the argument, for any value out of range or of the wrong
        rank, or input channels not divisible by ``feature_group_count``.

    Example:
      >>> import margin_regs as mr
      >>> op = mr.ConvOperator((8, 8, 3), strides=2)
      >>> op.strides, op.dimension_numbers
      ((2, 2), ('NHWC', 'HWIO', 'NHWC'))
      >>> op == mr.ConvOperator((8, 8, 3), strides=(2, 2))
      True

    References:
      Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers", 2019.
    """

    input_shape: tuple[int, ...]
    strides: int | tuple[int, ...] = 1
    padding: str | tuple[tuple[int, int], ...] = "SAME"
    rhs_dilation: int | tuple[int, ...] = 1
    feature_group_count: int = 1
    dimension_numbers: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        input_shape = _positive_ints("input_shape", self.input_shape)
        if not 2 <= len(input_shape) <= 4:
            raise ValueError(
                "ConvOperator: input_shape must be one sample's shape with channels"
                f" and 1 to 3 spatial axes (no batch axis), got {input_shape}"
            )
        rank = len(input_shape) - 1
        dimension_numbers = _canonical_dimension_numbers(self.dimension_numbers, rank)
        set_ = object.__setattr__  # the dataclass is frozen; normalise once, here
        set_(self, "input_shape", input_shape)
        set_(self, "dimension_numbers", dimension_numbers)
        set_(self, "strides", _per_axis("strides", self.strides, rank))
        set_(self, "rhs_dilation", _per_axis("rhs_dilation", self.rhs_dilation, rank))
        set_(self, "padding", _padding(self.padding, rank))
        groups = self.feature_group_count
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(
                f"ConvOperator: feature_group_count must be a positive int, got {groups!r}"
            )
        if self.in_channels % groups:
            raise ValueError(
                f"ConvOperator: feature_group_count={groups} does not divide the"
                f" {self.in_channels} input channels of input_shape={input_shape}"
            )

    @property
    def spatial_rank(self) -> int:
        """The number of spatial axes (1, 2 or 3)."""
        return len(self.input_shape) - 1

    @property
    def in_channels(self) -> int:
        """The input's channel count, read from ``input_shape`` in the lhs layout."""
        lhs = self.dimension_numbers[0].replace("N", "")
        return self.input_shape[lhs.index("C")]

    def operator(self, kernel_shape: Sequence[int]) -> ConvLinearOperator:
        """The linear operator ``A(K)`` for kernels of ``kernel_shape``.

        Args:
          kernel_shape: the kernel's shape in the rhs layout (flax ``(kh, kw, in /
            groups, out)``, equinox ``(out, in / groups, kh, kw)``).

        Returns:
          A :class:`ConvLinearOperator` with ``batch_shape=()``, ``in_shape`` the
          input shape and ``out_shape`` one sample's output shape.

        Raises:
          ValueError: if the kernel's rank, input channels or output channels do not
            fit this spec (``in / groups`` channels, ``out`` a multiple of the
            groups), or the convolution's output would be empty.

        Example:
          >>> import margin_regs as mr
          >>> op = mr.ConvOperator((8, 8, 3), strides=2).operator((3, 3, 3, 16))
          >>> op.in_shape, op.out_shape
          ((8, 8, 3), (4, 4, 16))
        """
        return ConvLinearOperator(self, _check_kernel_shape(self, kernel_shape))


@dataclasses.dataclass(frozen=True)
class ConvLinearOperator:
    """``A(K) x = conv(x, K)`` for one :class:`ConvOperator` spec and kernel shape.

    The layout contract's LinearOperator for a convolution: ``batch_shape=()``
    (one operator per kernel), ``in_shape`` the spec's ``input_shape`` and
    ``out_shape`` one sample's output. Every method runs in float32 (the kernel and
    vectors are cast), takes the kernel as an argument, never forms the dense
    operator except where :meth:`singular_values` says so, and accepts extra
    leading axes on the vectors (a stack of inputs, convolved as one batch).

    Attributes:
      spec: the :class:`ConvOperator`.
      kernel_shape: the kernel's shape in the rhs layout.
      out_shape: one sample's output shape in the output layout.
    """

    spec: ConvOperator
    kernel_shape: tuple[int, ...]
    out_shape: tuple[int, ...] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        f32 = jnp.float32
        inputs = jax.ShapeDtypeStruct((1, *self.in_shape), f32)
        try:
            out = jax.eval_shape(
                self._conv, inputs, jax.ShapeDtypeStruct(self.kernel_shape, f32)
            )
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"ConvOperator: cannot convolve {self.spec} with a kernel of shape"
                f" {self.kernel_shape}: {err}"
            ) from None
        if min(out.shape) < 1:
            raise ValueError(
                f"ConvOperator: {self.spec} with a kernel of shape {self.kernel_shape}"
                f" has an empty output {out.shape[1:]}; use a smaller kernel or padding"
            )
        object.__setattr__(self, "out_shape", tuple(out.shape[1:]))

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """``()``: a kernel is one operator."""
        return ()

    @property
    def in_shape(self) -> tuple[int, ...]:
        """One input sample's shape, the spec's ``input_shape``."""
        return self.spec.input_shape

    def _conv(
        self, xs: jax.Array, kernel: jax.Array, fan_out_first: bool = False
    ) -> jax.Array:
        """``(B, *in_shape) -> (B, *out_shape)``: the lax convolution of B samples.

        Runs in the channels-last layout (``NHWC`` / ``HWIO``) whatever the spec's,
        transposing the sample and kernel explicitly: XLA's CPU backend has a fast
        convolution only for that layout, and inside a ``while_loop`` (the warm
        start, the Krylov rounds) it cannot re-layout a kernel itself and falls back
        to a convolution 50-200x slower. ``fan_out_first`` lays the kernel out as
        ``HWOI``, the same operator, whose transpose (``rmatvec``) is then the
        fast ``HWIO`` convolution.
        """
        spec = self.spec
        lhs, rhs, out = spec.dimension_numbers
        spatial = _SPATIAL[spec.spatial_rank]
        features = "OI" if fan_out_first else "IO"
        x = jnp.transpose(
            xs, [("N" + lhs.replace("N", "")).index(c) for c in "N" + spatial + "C"]
        )
        kernel = jnp.transpose(kernel, [rhs.index(c) for c in spatial + features])
        y = lax.conv_general_dilated(
            x,
            kernel,
            spec.strides,
            spec.padding,
            rhs_dilation=spec.rhs_dilation,
            dimension_numbers=(
                "N" + spatial + "C",
                spatial + features,
                "N" + spatial + "C",
            ),
            feature_group_count=spec.feature_group_count,
        )
        return jnp.transpose(
            y, [("N" + spatial + "C").index(c) for c in "N" + out.replace("N", "")]
        )

    def _stack(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Flattens the leading axes of ``x (..., *shape)`` into one, float32."""
        x = jnp.asarray(x, jnp.float32)
        if x.shape[x.ndim - len(shape) :] != shape:
            raise ValueError(
                f"ConvOperator: expected vectors of shape (..., *{shape}), got {x.shape}"
            )
        return x.reshape(-1, *shape)

    def matvec(self, kernel: jax.Array, v: jax.Array) -> jax.Array:
        """``u = A(K) v = conv(v, K)``: ``(..., *in_shape) -> (..., *out_shape)``."""
        xs = self._stack(v, self.in_shape)
        u = self._conv(xs, jnp.asarray(kernel, jnp.float32))
        return u.reshape(
            *jnp.shape(v)[: jnp.ndim(v) - len(self.in_shape)], *self.out_shape
        )

    def rmatvec(self, kernel: jax.Array, u: jax.Array) -> jax.Array:
        """``v = A(K)ᵀ u``, the transposed convolution: ``(..., *out_shape) -> (..., *in_shape)``."""
        ys = self._stack(u, self.out_shape)
        kernel = jnp.asarray(kernel, jnp.float32)
        inputs = jax.ShapeDtypeStruct((ys.shape[0], *self.in_shape), jnp.float32)
        conv = lambda x: self._conv(x, kernel, fan_out_first=True)  # noqa: E731
        (v,) = jax.linear_transpose(conv, inputs)(ys)
        return v.reshape(
            *jnp.shape(u)[: jnp.ndim(u) - len(self.out_shape)], *self.in_shape
        )

    def outer(self, kernel: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
        """``∂/∂K Σ_b <u_b, A(K) v_b>``: the VJP of ``K ↦ conv(v, K)`` at ``u``.

        The convolution's analogue of the rank-one ``u vᵀ``: for unit ``u, v`` with
        ``A v = σ u`` it is ``∂σ/∂K``. Returns a float32 array of the kernel's shape.
        """
        del kernel  # A(K) is linear in K: its VJP does not depend on K
        xs, ys = self._stack(v, self.in_shape), self._stack(u, self.out_shape)
        weights = jax.ShapeDtypeStruct(self.kernel_shape, jnp.float32)
        (grad,) = jax.linear_transpose(lambda k: self._conv(xs, k), weights)(ys)
        return grad

    def frobenius_norm(self, kernel: jax.Array) -> jax.Array:
        """``‖A(K)‖_F = sqrt(Σ σᵢ²)``, exactly, by one convolution of a ones input.

        Every output entry of ``conv(1, K ⊙ K)`` is ``Σ K[t, i, o]²`` over the taps
        ``t`` that land inside the (unpadded) input, so its sum is ``‖A‖_F²``: padding
        and strides counted exactly, without the spectrum (the stable rank
        ``‖A‖_F² / σ₁²`` needs only the top singular value besides). Computed on
        ``K`` divided by a power of two near ``max|K|`` and rescaled, so it neither
        under- nor overflows where the norm itself is a float32.
        """
        unit, scale = rescaled(jnp.asarray(kernel, jnp.float32))
        ones = jnp.ones((1, *self.in_shape), jnp.float32)
        return jnp.sqrt(jnp.sum(self._conv(ones, jnp.square(unit)))) * scale.reshape(())

    def stable_rank(self, kernel: jax.Array) -> jax.Array:
        """``‖A‖_F² / σ₁²``, in ``[1, rank A]``; 0 for the zero kernel.

        From :meth:`frobenius_norm` and the top singular value alone, so it is
        exact without the full spectrum (Krylov for large operators). NaN for a
        kernel with NaN or inf entries, whose Frobenius norm is NaN.
        """
        frobenius = self.frobenius_norm(kernel)
        # Only the zero kernel has ‖A‖_F = 0; a NaN norm fails every comparison,
        # so it must not be the branch that a failed `> 0` test selects.
        zero = frobenius == 0
        top = jnp.where(zero, 1.0, self.singular_values(kernel, 1)[0])
        return jnp.where(zero, 0.0, (frobenius / top) ** 2)

    def spectrum(self, kernel: jax.Array) -> jax.Array:
        """The singular values a spectrum plot shows, descending.

        All of them when the dense SVD is cheap (``n · m · min(n, m) ≤ 2³⁰``, well
        under a second), else the top 64 by Krylov iteration: a convolution on a
        realistic input has thousands of singular values (6,272 for 14×14×32),
        whose dense SVD would take minutes.
        """
        n, m = math.prod(self.in_shape), math.prod(self.out_shape)
        k = None if _dense_is_cheap(n, m) else min(_SPECTRUM_TOP_K, n, m)
        return self.singular_values(kernel, k)

    def singular_values(
        self,
        kernel: jax.Array,
        k: int | None = None,
        *,
        method: str = "auto",
        tol: float = 1e-5,
        max_rounds: int = 100,
    ) -> jax.Array:
        """The operator's singular values, descending: all of them, or the top ``k``.

        ``"dense"``: the ``(n, m)`` operator matrix (the convolution of every basis
        input, ``n = prod(in_shape)``, ``m = prod(out_shape)``) and its SVD, exact to
        float32; always used for ``k=None``. ``"krylov"``: restarted block Krylov
        iteration on ``AᵀA`` (:mod:`margin_regs._krylov`), matrix-free, until no
        Ritz value moves by more than ``tol · σ₁²`` in a round; not the FFT (Sedghi
        et al. 2019), exact only for circular padding. ``"auto"``: dense when its SVD
        is cheap (``n · m · min(n, m) ≤ 2³⁰``), else Krylov. The kernel is rescaled
        first, so tiny or huge kernels neither under- nor overflow. Not
        differentiable: gradients come from the persisted power iteration.

        Args:
          kernel: the kernel, of ``kernel_shape``.
          k: how many of the largest values, ``1 ≤ k ≤ min(n, m)``; None for all
            (dense, so only for operators of at most 2²⁸ matrix entries).
          method: ``"auto"``, ``"dense"`` or ``"krylov"``.
          tol: the Krylov stopping tolerance, relative to ``σ₁²``.
          max_rounds: the most Krylov rounds.

        Returns:
          A float32 array ``(k,)`` (or ``(min(n, m),)``), descending.

        Raises:
          ValueError: for ``k`` out of range, ``k=None`` on an operator too large to
            decompose densely, or an unknown ``method``.

        Example:
          >>> import jax.numpy as jnp
          >>> import margin_regs as mr
          >>> op = mr.ConvOperator((6, 6, 1)).operator((3, 3, 1, 1))
          >>> box = jnp.ones((3, 3, 1, 1)) / 9  # a mean filter: A·1 ≈ 1 inside
          >>> bool(op.singular_values(box, k=1)[0] <= 1.0)
          True

        References:
          Musco & Musco, "Randomized Block Krylov Methods...", 2015; Sedghi, Gupta &
          Long, "The Singular Values of Convolutional Layers", 2019.
        """
        n, m = math.prod(self.in_shape), math.prod(self.out_shape)
        if k is not None and (not _is_int(k) or not 1 <= k <= min(n, m)):
            raise ValueError(
                f"ConvOperator.singular_values: k must be an int in [1, {min(n, m)}]"
                f" (the operator is {m} x {n}), got {k!r}"
            )
        if k is None and n * m > _DENSE_MAX_ENTRIES:
            raise ValueError(
                f"ConvOperator.singular_values: all {min(n, m)} singular values of this"
                f" {m} x {n} operator need its dense matrix ({n * m * 4 / 2**30:.1f}"
                " GiB in float32); pass k for the top k"
            )
        if method not in ("auto", "dense", "krylov"):
            raise ValueError(
                "ConvOperator.singular_values: method must be 'auto', 'dense' or"
                f" 'krylov', got {method!r}"
            )
        return self._decompose(kernel, k, method, tol, max_rounds)[0]

    def top_right_singular_vector(self, kernel: jax.Array) -> jax.Array:
        """The unit input ``v`` with ``‖A v‖ = σ₁``: a converged power-iteration start.

        A convolution's top singular values cluster (they sample ``|K̂(ω)|`` near
        its maximum), where power iteration from a random vector mixes the top
        singular vectors and settles σ only to about 1e-4 in a thousand steps. This
        is the dense SVD's vector, or the top Ritz vector of the Krylov iteration
        of :meth:`singular_values`.

        Returns:
          A float32 array of ``in_shape``, unit norm (up to sign).
        """
        return _top_right_singular_vector(self, kernel)

    def _decompose(
        self, kernel: jax.Array, k: int | None, method: str, tol: float, rounds: int
    ) -> tuple[jax.Array, jax.Array]:
        """The top ``k`` (or all) singular values, and the ``(n, k)`` right vectors."""
        n, m = math.prod(self.in_shape), math.prod(self.out_shape)
        unit, safe = rescaled(jnp.asarray(kernel, jnp.float32))
        safe = safe.reshape(())
        block, depth = _krylov.block_and_depth(n, k)
        dense = k is None or method == "dense" or depth < 1
        if method == "auto" and _dense_is_cheap(n, m):
            dense = True
        if dense:
            basis = jnp.eye(n, dtype=jnp.float32).reshape(n, *self.in_shape)
            # Row j is A e_j: the matrix is Aᵀ, whose left vectors are A's right ones.
            matrix = self.matvec(unit, basis).reshape(n, m)
            vectors, sigma, _ = _svd(matrix)
            return sigma[:k] * safe, vectors[:, :k]

        def gram(x: jax.Array) -> jax.Array:
            xs = x.T.reshape(-1, *self.in_shape)
            return self.rmatvec(unit, self.matvec(unit, xs)).reshape(-1, n).T

        theta, vectors = _krylov.block_krylov(gram, n, k, block, depth, tol, rounds)
        return jnp.sqrt(jnp.maximum(theta, 0.0)) * safe, vectors


# One matrix per LAPACK call under vmap too (margin_regs._batching).
_svd = _batching.per_matrix(lambda m: jnp.linalg.svd(m, full_matrices=False))


# Compiled once per operator: init_power_iteration calls it outside any jit.
@functools.partial(jax.jit, static_argnums=0)
def _top_right_singular_vector(op: ConvLinearOperator, kernel: jax.Array) -> jax.Array:
    vectors = op._decompose(kernel, 1, "auto", 1e-5, 100)[1]
    return vectors[:, 0].reshape(op.in_shape)


# The cost n·m·min(n, m) of the largest dense SVD taken when Krylov would do: about
# 1 GFLOP, a fraction of a second on a CPU (a 1024 x 1024 operator).
_DENSE_FLOPS = 2**30
# How many singular values :meth:`ConvLinearOperator.spectrum` shows of an operator
# too large for a dense SVD.
_SPECTRUM_TOP_K = 64
# The largest operator whose full spectrum (k=None) is computed at all: 1 GiB.
_DENSE_MAX_ENTRIES = 2**28


def _dense_is_cheap(n: int, m: int) -> bool:
    return n * m * min(n, m) <= _DENSE_FLOPS


def _check_kernel_shape(spec: ConvOperator, kernel_shape: Sequence[int]) -> tuple:
    shape = tuple(int(d) for d in kernel_shape)
    rhs = spec.dimension_numbers[1]
    where = f"kernel of shape {shape} for {spec}"
    if len(shape) != len(rhs):
        raise ValueError(
            f"ConvOperator: a {rhs} kernel has {len(rhs)} axes, got a {where}"
        )
    groups = spec.feature_group_count
    kernel_in, kernel_out = shape[rhs.index("I")], shape[rhs.index("O")]
    if kernel_in * groups != spec.in_channels:
        raise ValueError(
            f"ConvOperator: the kernel's input channels ({kernel_in}) times"
            f" feature_group_count ({groups}) must equal the input's"
            f" {spec.in_channels} channels; got a {where}"
        )
    if kernel_out % groups:
        raise ValueError(
            f"ConvOperator: the kernel's output channels ({kernel_out}) must be a"
            f" multiple of feature_group_count ({groups}); got a {where}"
        )
    return shape


def _positive_ints(name: str, value: object) -> tuple[int, ...]:
    try:
        values = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"ConvOperator: {name} must be a sequence of ints, got {value!r}"
        ) from None
    if not all(_is_int(v) and v >= 1 for v in values):
        raise ValueError(f"ConvOperator: {name} must hold positive ints, got {value!r}")
    return tuple(int(v) for v in values)


def _is_int(value: object) -> bool:
    # numpy integers count (shapes often come from arrays); bools do not.
    return not isinstance(value, bool) and hasattr(value, "__index__")


def _per_axis(name: str, value: object, rank: int) -> tuple[int, ...]:
    values = _positive_ints(name, (value,) * rank if _is_int(value) else value)
    if len(values) != rank:
        raise ValueError(
            f"ConvOperator: {name} needs one value per spatial axis ({rank}),"
            f" got {value!r}"
        )
    return values


def _padding(value: object, rank: int) -> str | tuple[tuple[int, int], ...]:
    if isinstance(value, str):
        if value.upper() not in ("SAME", "SAME_LOWER", "VALID"):
            raise ValueError(
                "ConvOperator: padding must be 'SAME', 'SAME_LOWER', 'VALID' or"
                f" (lo, hi) pairs, got {value!r}"
            )
        return value.upper()
    try:
        pairs = tuple(tuple(pair) for pair in value)  # type: ignore[union-attr]
    except TypeError:
        pairs = ()
    ok = len(pairs) == rank and all(
        len(p) == 2 and all(_is_int(v) and v >= 0 for v in p) for p in pairs
    )
    if not ok:
        raise ValueError(
            f"ConvOperator: padding needs one (lo, hi) pair of non-negative ints per"
            f" spatial axis ({rank}), got {value!r}"
        )
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def _canonical_dimension_numbers(value: object, rank: int) -> tuple[str, str, str]:
    """Strings or ``lax.ConvDimensionNumbers`` -> the canonical string triple.

    Canonical: batch ``N``, channels ``C``, kernel ``O``/``I``, and the spatial axes
    lettered ``W`` / ``HW`` / ``DHW`` in the kernel's spatial order, so the strings
    of two specs of the same layout are equal.
    """
    if value is None:
        return _CHANNELS_LAST[rank]
    if isinstance(value, lax.ConvDimensionNumbers):
        numbers = value
    elif isinstance(value, Sequence) and not isinstance(value, str):
        shape = (1,) * (rank + 2)
        try:
            numbers = lax.conv_dimension_numbers(shape, shape, tuple(value))
        except TypeError as err:
            raise ValueError(
                f"ConvOperator: bad dimension_numbers {value!r} for a {rank}-D"
                f" convolution (input_shape has {rank} spatial axes): {err}"
            ) from None
    else:
        raise ValueError(
            "ConvOperator: dimension_numbers must be three layout strings or a"
            f" lax.ConvDimensionNumbers, got {value!r}"
        )
    specs = tuple(tuple(spec) for spec in numbers)
    if any(sorted(spec) != list(range(rank + 2)) for spec in specs):
        raise ValueError(
            f"ConvOperator: dimension_numbers {value!r} do not describe a {rank}-D"
            f" convolution (input_shape has {rank} spatial axes)"
        )
    spatial = _SPATIAL[rank]
    strings = []
    for spec, (first, second) in zip(
        specs, (("N", "C"), ("O", "I"), ("N", "C")), strict=True
    ):
        letters = [""] * (rank + 2)
        letters[spec[0]], letters[spec[1]] = first, second
        for letter, axis in zip(spatial, spec[2:], strict=True):
            letters[axis] = letter
        strings.append("".join(letters))
    return tuple(strings)  # type: ignore[return-value]
