"""Masks and paths behave as optax.masked and users' containers expect."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import margin_regs as mr
from margin_regs import _tree

PARAMS = {
    "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
    "conv": {"kernel": jnp.ones((2, 2, 1, 5)), "bias": jnp.zeros(5)},
}


def test_default_mask_selects_kernels_only():
    assert _tree.default_mask(PARAMS) == {
        "dense": {"kernel": True, "bias": False},
        "conv": {"kernel": True, "bias": False},
    }


def test_prefix_mask_broadcasts_like_optax_masked():
    full = _tree.resolve_mask({"dense": True, "conv": False}, PARAMS)
    assert full == {
        "dense": {"kernel": True, "bias": True},
        "conv": {"kernel": False, "bias": False},
    }


def test_callable_mask_is_called_on_params():
    full = _tree.resolve_mask(lambda p: {"dense": True, "conv": False}, PARAMS)
    assert full["dense"]["kernel"] and not full["conv"]["kernel"]


def test_select_puts_masked_nodes_where_optax_masked_does():
    picked = _tree.select(PARAMS, None)
    assert isinstance(picked["dense"]["bias"], optax.MaskedNode)
    assert picked["dense"]["kernel"] is PARAMS["dense"]["kernel"]
    assert len(jax.tree.leaves(picked)) == 2


def test_select_refuses_a_mask_that_picks_a_bias():
    with pytest.raises(ValueError, match=r"dense/bias"):
        _tree.select(PARAMS, {"dense": True, "conv": False})


def test_path_names_on_linen_nnx_and_plain_containers():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layer = nnx.Linear(3, 4, rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    names = [
        _tree.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]
    ]
    assert names == ["layer/bias", "layer/kernel"]
    linen = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}}
    (path, _), *_ = jax.tree_util.tree_flatten_with_path(linen)[0]
    assert _tree.path_name(path) == "params/Dense_0/kernel"
    (path, _), *_ = jax.tree_util.tree_flatten_with_path([jnp.ones((2, 2))])[0]
    assert _tree.path_name(path) == "0"


def test_group_by_shape_keeps_first_seen_order():
    arrays = [jnp.ones((3, 4)), jnp.ones((2, 2)), jnp.ones((3, 4))]
    groups = _tree.group_by_shape(arrays)
    assert list(groups.values()) == [[0, 2], [1]]


def test_mask_by_path_selects_matching_kernels_not_biases():
    params = {
        "Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
        "Dense_1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
    }
    assert _tree.mask_by_path(r"Dense_1/")(params) == {
        "Dense_0": {"kernel": False, "bias": False},
        "Dense_1": {"kernel": True, "bias": False},
    }
    assert mr.mask_by_path is _tree.mask_by_path


def test_integer_and_boolean_leaves_are_never_weights():
    params = {
        "counter": jnp.array([[7, 0], [0, 2]], jnp.int32),
        "flags": jnp.ones((2, 2), bool),
        "kernel": jnp.ones((2, 2), jnp.bfloat16),
    }
    assert _tree.default_mask(params) == {
        "counter": False,
        "flags": False,
        "kernel": True,
    }
    assert _tree.mask_by_path("")(params) == _tree.default_mask(params)
    with pytest.raises(ValueError, match="'counter' of dtype int32 is selected"):
        _tree.select(params, {"counter": True, "flags": False, "kernel": True})
