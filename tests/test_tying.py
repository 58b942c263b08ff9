"""Parameter tying against numpy, its mask and its errors on mismatched trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import margin_regs as mr


@pytest.fixture
def trees(rng):
    def tree():
        return {
            "Dense_0": {"kernel": rng.normal(size=(5, 4)), "bias": rng.normal(size=4)},
            "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4))},
            "norm": {"scale": rng.normal(size=(4, 4))},
        }

    return tree(), tree()


def as_jax(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_value_and_gradient_match_numpy_over_the_kernels(trees):
    params, reference = trees
    kernels = [("Dense_0", "kernel"), ("Conv_0", "kernel")]
    want = sum(np.sum((params[a][b] - reference[a][b]) ** 2) for a, b in kernels)
    value, grads = jax.value_and_grad(mr.parameter_tying_penalty)(
        as_jax(params), as_jax(reference)
    )
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for a, b in kernels:
        np.testing.assert_allclose(
            grads[a][b], 2 * (params[a][b] - reference[a][b]), rtol=1e-5
        )
    np.testing.assert_array_equal(grads["Dense_0"]["bias"], 0.0)
    np.testing.assert_array_equal(grads["norm"]["scale"], 0.0)


def test_a_mask_selects_any_leaf(trees):
    params, reference = trees
    mask = {"Dense_0": {"kernel": False, "bias": True}, "Conv_0": False, "norm": True}
    want = np.sum((params["Dense_0"]["bias"] - reference["Dense_0"]["bias"]) ** 2)
    want += np.sum((params["norm"]["scale"] - reference["norm"]["scale"]) ** 2)
    value = mr.parameter_tying_penalty(as_jax(params), as_jax(reference), mask=mask)
    np.testing.assert_allclose(value, want, rtol=1e-5)


def test_zero_at_the_reference_and_under_jit(trees):
    params = as_jax(trees[0])
    assert float(jax.jit(mr.parameter_tying_penalty)(params, params)) == 0.0


def test_mismatched_trees_name_the_first_path_that_differs(trees):
    params, reference = as_jax(trees[0]), as_jax(trees[1])
    renamed = {**reference, "Dense_0": {"kernel": reference["Dense_0"]["kernel"]}}
    with pytest.raises(ValueError, match="'Dense_0/bias'"):
        mr.parameter_tying_penalty(params, renamed)
    reshaped = {**reference, "Conv_0": {"kernel": jnp.ones((9, 2, 4))}}
    with pytest.raises(
        ValueError, match=r"'Conv_0/kernel'.*\(3, 3, 2, 4\).*\(9, 2, 4\)"
    ):
        mr.parameter_tying_penalty(params, reshaped)
    extra = {**reference, "z": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="'z/kernel', which only reference has"):
        mr.parameter_tying_penalty(params, extra)
