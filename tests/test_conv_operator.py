"""ConvOperator: the spec's normalisation and validation, and the operator's maths
against the dense matrix of the convolution (every basis input pushed through)."""

import jax
import pytest
from jax import lax

import margin_regs as mr


def test_spec_normalises_to_one_canonical_value():
    equinox = mr.ConvOperator((3, 6, 6), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    numbers = lax.conv_dimension_numbers(
        (1, 3, 6, 6), (4, 3, 3, 3), ("NCHW", "OIHW", "NCHW")
    )
    assert mr.ConvOperator((3, 6, 6), dimension_numbers=numbers) == equinox
    assert equinox.in_channels == 3
    renamed = mr.ConvOperator((6, 6, 2), dimension_numbers=("NXYC", "XYIO", "NXYC"))
    assert renamed == mr.ConvOperator((6, 6, 2))
    assert renamed.dimension_numbers == ("NHWC", "HWIO", "NHWC")
    one_d = mr.ConvOperator((6, 2), strides=2, padding=[[1, 2]], rhs_dilation=(3,))
    assert (one_d.strides, one_d.padding, one_d.rhs_dilation) == ((2,), ((1, 2),), (3,))
    assert one_d.dimension_numbers == ("NWC", "WIO", "NWC")
    assert mr.ConvOperator((4, 4, 4, 2)).dimension_numbers[1] == "DHWIO"
    assert mr.ConvOperator((6, 6, 2), padding="same").padding == "SAME"
    # A pytree leaf (not a container), hashable, so usable as a static layout.
    assert jax.tree.leaves({"w": equinox}) == [equinox]
    assert hash(equinox) == hash(
        mr.ConvOperator((3, 6, 6), (1, 1), "SAME", 1, 1, numbers)
    )


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"input_shape": (6,)}, "input_shape"),
        ({"input_shape": (6, 6, 0)}, "input_shape"),
        ({"input_shape": (6, 6, 2), "strides": 0}, "strides"),
        ({"input_shape": (6, 6, 2), "strides": (1, 2, 1)}, "strides"),
        ({"input_shape": (6, 6, 2), "rhs_dilation": 1.5}, "rhs_dilation"),
        ({"input_shape": (6, 6, 2), "padding": "FULL"}, "padding"),
        ({"input_shape": (6, 6, 2), "padding": [(1, 1)]}, "padding"),
        ({"input_shape": (6, 6, 2), "padding": [(1, -1), (0, 0)]}, "padding"),
        ({"input_shape": (6, 6, 3), "feature_group_count": 2}, "feature_group_count"),
        ({"input_shape": (6, 6, 2), "feature_group_count": 0}, "feature_group_count"),
        (
            {"input_shape": (6, 6, 2), "dimension_numbers": ("NWC",) * 3},
            "dimension_numbers",
        ),
        ({"input_shape": (6, 6, 2), "dimension_numbers": "NHWC"}, "dimension_numbers"),
    ],
)
def test_spec_rejects_bad_arguments_by_name(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        mr.ConvOperator(**kwargs)
