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
from collections.abc import Sequence

from jax import lax

__all__ = ["ConvOperator"]

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
    layer's Lipschitz constant), not the σ of the reshaped kernel. A frozen,
    hashable dataclass, so a pytree *leaf*: pass it where ``weight_dimension_numbers``
    takes a layout. Arguments are normalised: ints become per-axis tuples, explicit
    padding a tuple of ``(lo, hi)`` pairs, and ``dimension_numbers`` (strings or a
    ``lax.ConvDimensionNumbers``) a canonical string triple, so two specs of the
    same operator compare equal.

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
      ValueError: naming the argument, for a non-positive or mis-sized shape, stride
        or dilation, an unknown padding, dimension numbers of the wrong rank or with
        bad letters, or input channels not divisible by ``feature_group_count``.

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
