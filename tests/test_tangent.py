"""Tangent propagation against a dense per-sample Jacobian and a linear model in closed
form; image tangents against finite differences of actually transformed images."""

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import margin_regs as mr


def mlp(params, x):
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"]


@pytest.fixture(scope="module")
def setting():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(k1, (16, 6)) / 4,
        "b1": jax.random.normal(k2, (6,)) / 4,
        "w2": jax.random.normal(k3, (6, 3)) / 2,
    }
    x = jax.random.uniform(k4, (5, 4, 4, 1))
    return params, x


def dense_penalty(params, x, tangents):
    """(1/n) Σᵢ Σₖ ‖J(xᵢ) tᵢₖ‖² with J(xᵢ) built by jax.jacrev on one sample."""
    jacobians = jax.vmap(jax.jacrev(lambda xi: mlp(params, xi[None])[0]))(x)
    rows = tangents.reshape(*tangents.shape[:2], -1)
    products = jnp.einsum("nkd,ncd->nkc", rows, jacobians.reshape(x.shape[0], 3, -1))
    return jnp.sum(products**2) / x.shape[0]


@pytest.mark.parametrize("k", [1, 4])
def test_tangent_prop_matches_a_dense_jacobian_in_value_and_gradient(setting, k):
    params, x = setting
    tangents = mr.image_tangents(x)[:, :k]

    def ours(p, t):
        return mr.tangent_prop_penalty(lambda b: mlp(p, b), x, t)

    given = tangents[:, 0] if k == 1 else tangents  # (n, ...) is one per sample
    value, grads = jax.value_and_grad(ours)(params, given)
    want, want_grads = jax.value_and_grad(dense_penalty)(params, x, tangents)
    assert value > 0
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-4, atol=1e-7)


def test_tangent_prop_of_a_linear_model_in_closed_form(rng):
    w, b = rng.normal(size=(6, 3)), rng.normal(size=3)
    x, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 2, 6))

    def ours(w):
        return mr.tangent_prop_penalty(lambda z: z @ w + b, jnp.asarray(x), t)

    value, grad = jax.value_and_grad(ours)(jnp.asarray(w, jnp.float32))
    # J = Wᵀ for every sample: (1/n) Σ ‖Wᵀ t‖², gradient (2/n) Σ t tᵀ W.
    flat = t.reshape(-1, 6)
    np.testing.assert_allclose(value, np.sum((flat @ w) ** 2) / 4, rtol=1e-5)
    np.testing.assert_allclose(grad, 2 / 4 * flat.T @ flat @ w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 5), (4, 2, 3), (3, 2, 6), (4, 2, 6, 1)])
def test_tangent_shapes_that_do_not_match_x_name_both(shape):
    x = jnp.ones((4, 6))
    with pytest.raises(ValueError, match=r"\(4, 6\)") as err:
        mr.tangent_prop_penalty(lambda z: z[:, :2], x, jnp.ones(shape))
    assert str(shape) in str(err.value)


# ------------------------------------------------------------------ image tangents
def transformed(image, kind, t):
    """``image (H, W, C)`` really transformed by ``t`` (scipy, bilinear, zero fill)."""
    h, w = image.shape[:2]
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ui, uj = i - (h - 1) / 2, j - (w - 1) / 2
    c, s = np.cos(t), np.sin(t)
    source = {  # the input pixel that lands on output pixel (i, j)
        "translate_x": (i, j - t),
        "translate_y": (i - t, j),
        "rotate": ((h - 1) / 2 + c * ui + s * uj, (w - 1) / 2 - s * ui + c * uj),
        "scale": ((h - 1) / 2 + ui / (1 + t), (w - 1) / 2 + uj / (1 + t)),
    }[kind]
    return np.stack(
        [
            ndimage.map_coordinates(
                image[..., ch], np.stack(source), order=1, mode="grid-constant"
            )
            for ch in range(image.shape[-1])
        ],
        axis=-1,
    )


def test_image_tangents_are_finite_differences_of_transformed_images(rng):
    images = rng.uniform(size=(2, 7, 9, 2))
    tangents = np.asarray(mr.image_tangents(jnp.asarray(images, jnp.float32)))
    assert tangents.shape == (2, 4, 7, 9, 2)
    h = 1e-4
    for n in range(2):
        for k, kind in enumerate(mr._tangent.IMAGE_TRANSFORMS):
            plus = transformed(images[n], kind, h)
            minus = transformed(images[n], kind, -h)
            fd = (plus - minus) / (2 * h)
            np.testing.assert_allclose(tangents[n, k], fd, atol=2e-3, err_msg=kind)


def test_rotation_tangent_has_dm_pix_rotate_sign(rng):
    # dm_pix.rotate turns counter-clockwise; a zero border keeps its edge mode out.
    image = np.pad(rng.uniform(size=(6, 6, 1)), ((2, 2), (2, 2), (0, 0)))
    angle = 1e-3
    fd = (
        dm_pix.rotate(jnp.asarray(image, jnp.float32), angle)
        - dm_pix.rotate(jnp.asarray(image, jnp.float32), -angle)
    ) / (2 * angle)
    tangent = mr.image_tangents(jnp.asarray(image[None], jnp.float32))[0, 2]
    np.testing.assert_allclose(tangent, fd, atol=5e-3)
    assert np.abs(np.asarray(tangent)).max() > 0.5


def test_image_tangents_refuse_flat_inputs_and_unknown_transforms():
    with pytest.raises(ValueError, match=r"\(n, H, W, C\)"):
        mr.image_tangents(jnp.ones((4, 8, 1)))
    with pytest.raises(ValueError, match="shear"):
        mr.image_tangents(jnp.ones((1, 4, 4, 1)), transforms=("shear",))
