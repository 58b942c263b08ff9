"""Functions checked only against themselves before, now against independent maths.

* The parameter gradients of the Jacobian penalties against the formulas of
  DESIGN.md evaluated on per-sample Jacobians built by ``jax.jacfwd`` of an
  unbatched model, in float64.
* ``margin_lower_bounds(margin_type="geometric")`` against Sokolić et al., Thm 5,
  eq. (20), evaluated in float64 NumPy on a ReLU network.
* ``init_adareg_precisions`` and the sweeps from it against float64 Alg. 1.
* ``ConvOperator`` singular values at scales 1e±20 against the float64 SVD of the
  dense operator matrix built by a NumPy convolution.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numpy_nets import conv, relu
from optax.contrib import MuonDimensionNumbers

import margin_regs as mr

N, D, HIDDEN, C = 4, 5, 6, 3


def _tanh_mlp_params(dtype=jnp.float32):
    rng = np.random.default_rng(7)
    shapes = {"hidden": (D, HIDDEN), "classifier": (HIDDEN, C)}
    return {
        name: {
            "kernel": jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), dtype),
            "bias": jnp.asarray(rng.normal(size=shape[1]) * 0.1, dtype),
        }
        for name, shape in shapes.items()
    }


def _single(params, xi):
    """One sample ``(D,) -> (C,)``: the model written without a batch axis."""
    h = jnp.tanh(xi @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return h @ params["classifier"]["kernel"] + params["classifier"]["bias"]


def _batched(params):
    return lambda x: jax.vmap(lambda xi: _single(params, xi))(x)


X = np.random.default_rng(8).normal(size=(N, D))


def _jacobians64(params):
    """``J(xᵢ) = ∂z/∂x`` per sample ``(N, C, D)``, forward mode, one sample at a time."""
    return jnp.stack(
        [jax.jacfwd(lambda xi: _single(params, xi))(jnp.asarray(xi)) for xi in X]
    )


def _as64(tree):
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def _check_value_and_grad(penalty, reference, params):
    """``penalty(params)`` (float32) and its gradient against ``reference`` in float64."""
    value, grad = jax.jit(jax.value_and_grad(penalty))(params)
    with jax.enable_x64(True):
        want, want_grad = jax.value_and_grad(reference)(_as64(params))
        want, want_grad = float(want), jax.tree.map(np.asarray, want_grad)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    for got, ref in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
        # float32 double backprop through tanh: ~1e-6 of the largest entry.
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _unit_projections(key, k):
    v = np.asarray(jax.random.normal(key, (k, N, C)), np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize("n_projections", [None, 1, 3])
def test_frobenius_penalty_and_its_parameter_gradient(n_projections):
    # (1/n) Σᵢ ‖J(xᵢ)‖_F², or its estimate (C/k) Σₖ ‖vᵢₖᵀ J(xᵢ)‖² with the
    # documented unit projections (reproduced from the same key).
    params, key = _tanh_mlp_params(), jax.random.key(3)
    # Drawn here, in float32: under enable_x64 the same key draws other numbers.
    v = None if n_projections is None else _unit_projections(key, n_projections)

    def penalty(p):
        return mr.jacobian_frobenius_penalty(
            _batched(p),
            jnp.asarray(X, jnp.float32),
            n_projections=n_projections,
            key=key,
        )

    def reference(p):
        j = _jacobians64(p)
        if n_projections is None:
            return jnp.mean(jnp.sum(j**2, axis=(1, 2)))
        rows = jnp.einsum("kic,icd->kid", v, j)
        return C * jnp.mean(jnp.sum(rows**2, axis=-1))

    _check_value_and_grad(penalty, reference, params)


def test_frobenius_estimate_is_unbiased_in_value_and_gradient():
    # E[C ‖vᵀJ‖²] = ‖J‖_F² for v uniform on the sphere: 4000 one-projection draws.
    params, x = _tanh_mlp_params(), jnp.asarray(X, jnp.float32)

    def estimate(p, key):
        return mr.jacobian_frobenius_penalty(_batched(p), x, n_projections=1, key=key)

    keys = jax.random.split(jax.random.key(0), 4000)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(estimate), (None, 0)))(
        params, keys
    )
    with jax.enable_x64(True):
        exact, exact_grad = jax.value_and_grad(
            lambda p: jnp.mean(jnp.sum(_jacobians64(p) ** 2, axis=(1, 2)))
        )(_as64(params))
    for draws, want in [
        (values, exact),
        *zip(jax.tree.leaves(grads), jax.tree.leaves(exact_grad), strict=True),
    ]:
        draws = np.asarray(draws, np.float64)
        stderr = draws.std(0) / np.sqrt(len(draws))
        assert np.all(np.abs(draws.mean(0) - np.asarray(want)) <= 5 * stderr + 1e-6)


@pytest.mark.parametrize("classes", ["all", "random", "labels"])
@pytest.mark.parametrize(
    "normalised", [False, True], ids=["no_classifier", "classifier"]
)
def test_margin_penalty_and_its_parameter_gradient(classes, normalised):
    # (1/n) Σᵢ Σ_{c ∈ Cᵢ} ‖∇ₓ z_c(xᵢ)‖ / ‖v_c‖ (Sokolić et al., eq. (26)); with the
    # classifier, ‖v_c‖ is differentiated too (the kernel is a parameter).
    params, key = _tanh_mlp_params(), jax.random.key(5)
    labels = np.array([2, 0, 1, 2])
    chosen = {
        "all": None,
        # the documented draw: c = jax.random.randint(key, (n,), 0, n_classes)
        "random": np.asarray(jax.random.randint(key, (N,), 0, C)),
        "labels": labels,
    }[classes]
    arg = {"all": "all", "random": "random", "labels": jnp.asarray(labels)}[classes]

    def penalty(p):
        classifier = p["classifier"]["kernel"] if normalised else None
        return mr.jacobian_margin_penalty(
            _batched(p), jnp.asarray(X, jnp.float32), classes=arg, key=key,
            classifier=classifier,
        )  # fmt: skip

    def reference(p):
        norms = jnp.sqrt(jnp.sum(_jacobians64(p) ** 2, axis=-1))  # (N, C)
        if normalised:
            norms = norms / jnp.sqrt(jnp.sum(p["classifier"]["kernel"] ** 2, axis=0))
        if chosen is None:
            return jnp.mean(jnp.sum(norms, axis=1))
        return jnp.mean(norms[np.arange(N), chosen])

    _check_value_and_grad(penalty, reference, params)


# ------------------------------------------------ Sokolić et al., Thm 5, eq. (20)


def _relu_net(rng):
    shapes = {"hidden_0": (4, 8), "hidden_1": (8, 8), "classifier": (8, 3)}
    return {
        name: {
            "kernel": jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=s[1]) * 0.1, jnp.float32),
        }
        for name, s in shapes.items()
    }


def _relu_logits64(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(x, np.float64)
    for layer in ("hidden_0", "hidden_1"):
        h = relu(h @ p[layer]["kernel"] + p[layer]["bias"])
    return h @ p["classifier"]["kernel"] + p["classifier"]["bias"]


def test_geometric_margin_bound_is_thm5_in_float64_and_holds(rng):
    params = _relu_net(rng)
    x = rng.normal(size=(32, 4))
    labels = rng.integers(0, 3, 32)  # random labels: some samples misclassified
    z = _relu_logits64(params, x)
    v = np.asarray(params["classifier"]["kernel"], np.float64)
    # γᵢ = min_{j≠y} (z_y − z_j) / ‖v_y − v_j‖, the distance to the nearest hyperplane.
    gamma = np.array([
        min((z[i, y] - z[i, j]) / np.linalg.norm(v[:, y] - v[:, j])
            for j in range(3) if j != y)
        for i, y in enumerate(labels)
    ])  # fmt: skip
    assert (gamma < 0).any() and (gamma > 0).any()
    logits = jnp.asarray(z, jnp.float32)
    margins = mr.output_margins(logits, jnp.asarray(labels), classifier=v)
    np.testing.assert_allclose(margins, gamma, rtol=1e-5, atol=1e-6)

    hidden = {name: {"kernel": name != "classifier", "bias": False} for name in params}
    bounds = mr.margin_lower_bounds(
        margins, params, mask=hidden, margin_type="geometric"
    )
    kernels = [
        np.asarray(params[n]["kernel"], np.float64) for n in ("hidden_0", "hidden_1")
    ]
    spectral = np.prod([np.linalg.norm(k, 2) for k in kernels])
    frobenius = np.prod([np.linalg.norm(k) for k in kernels])
    clipped = np.maximum(gamma, 0.0)
    np.testing.assert_allclose(bounds["spectral"], clipped / spectral, rtol=1e-5)
    np.testing.assert_allclose(bounds["frobenius"], clipped / frobenius, rtol=1e-5)

    # And it is a bound: no input within it changes the class, along 200 random
    # directions and along the gradients of every z_y − z_j.
    grads = jax.vmap(jax.jacrev(lambda xi: _jax_relu_logits(params, xi)))(
        jnp.asarray(x, jnp.float32)
    )
    directions = rng.normal(size=(200, 4))
    for i in np.flatnonzero(gamma > 0):
        towards = [
            grads[i, j] - grads[i, labels[i]] for j in range(3) if j != labels[i]
        ]
        u = np.concatenate([directions, np.asarray(towards, np.float64)])
        u = u[np.linalg.norm(u, axis=1) > 0]  # a sample where every ReLU is off
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        for radius in (0.5, 0.999):
            moved = _relu_logits64(
                params, x[i] + radius * float(bounds["spectral"][i]) * u
            )
            assert np.all(moved.argmax(1) == labels[i])


def _jax_relu_logits(params, xi):
    h = xi
    for layer in ("hidden_0", "hidden_1"):
        h = jax.nn.relu(h @ params[layer]["kernel"] + params[layer]["bias"])
    return h @ params["classifier"]["kernel"] + params["classifier"]["bias"]


# ----------------------------------------------------- AdaReg, Zhao et al. Alg. 1


def _inv_threshold64(delta, m, lower, upper):
    r, q = np.linalg.eigh(0.5 * (delta + delta.T))
    r = np.maximum(r, 0.0)
    zero = r <= len(r) * np.finfo(np.float64).eps * r.max()
    omega = np.where(zero, upper, m / np.where(zero, 1.0, r))
    return (q * np.clip(omega, lower, upper)) @ q.T


# Every layout named (None would mean "not a weight"): the default reshape of a
# dense and a conv kernel, a scanned stack of three (6, 4) matrices, and an equinox
# (out, in) weight whose matrix is its transpose.
LAYOUTS = {
    "dense": MuonDimensionNumbers(0, 1),
    "conv": MuonDimensionNumbers((0, 1, 2), 3),
    "stack": MuonDimensionNumbers(1, 2),
    "eqx": MuonDimensionNumbers(1, 0),
    "bias": None,
}


def _adareg_params(rng):
    shapes = {"dense": (6, 4), "conv": (3, 3, 2, 5), "stack": (3, 6, 4), "eqx": (4, 6)}
    params = {
        n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()
    }
    return {**params, "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}


def _matrices64(params):
    """``{(leaf, slice): K}`` in float64, K as Zhao et al.'s (fan_in, fan_out)."""
    p = {n: np.asarray(a, np.float64) for n, a in params.items()}
    out = {("dense", None): p["dense"], ("conv", None): p["conv"].reshape(18, 5)}
    out |= {("stack", b): p["stack"][b] for b in range(3)}
    return out | {("eqx", None): p["eqx"].T}


def _in_leaf_layout(leaf, b, matrix):
    """A matrix-shaped gradient back in the leaf's own layout."""
    if leaf == "conv":
        return matrix.reshape(3, 3, 2, 5)
    return matrix.T if leaf == "eqx" else matrix


def _pick(tree, leaf, b):
    x = np.asarray(tree[leaf], np.float64)
    return x if b is None else x[b]


def test_adareg_from_init_follows_float64_alg1_for_every_layout(rng):
    lower, upper = 1e-2, 1e2
    params = _adareg_params(rng)
    wdn = LAYOUTS
    prec = mr.init_adareg_precisions(params, weight_dimension_numbers=wdn)
    sweep = jax.jit(
        lambda p, q: mr.adareg_update_precisions(
            p, q, lower=lower, upper=upper, weight_dimension_numbers=wdn
        )
    )
    value_and_grad = jax.jit(
        jax.value_and_grad(
            lambda p, q: mr.adareg_penalty(p, q, weight_dimension_numbers=wdn)
        )
    )
    matrices = _matrices64(params)
    omegas = {key: tuple(map(np.eye, k.shape)) for key, k in matrices.items()}
    # Sweep 0 is the init: identities, the penalty Σ‖K‖_F² and its gradient 2K
    # (plain L2, §3.2); then three sweeps of Alg. 1, lines 3–4, from there.
    for sweep_count in range(4):
        if sweep_count:
            prec = sweep(params, prec)
            for key, k in matrices.items():
                d, p = k.shape
                o_out = _inv_threshold64(k.T @ omegas[key][0] @ k, d, lower, upper)
                o_in = _inv_threshold64(k @ o_out @ k.T, p, lower, upper)
                omegas[key] = (o_in, o_out)
        value, grad = value_and_grad(params, prec)
        want_value = 0.0
        for (leaf, b), k in matrices.items():
            o_in, o_out = omegas[leaf, b]
            where = f"{leaf}[{b}], sweep {sweep_count}"
            for got, want in [(prec.omega_in, o_in), (prec.omega_out, o_out)]:
                got = _pick(got, leaf, b)
                np.testing.assert_allclose(
                    got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=where
                )
            want_grad = _in_leaf_layout(leaf, b, 2 * o_in @ k @ o_out)
            got_grad = _pick(grad, leaf, b)
            np.testing.assert_allclose(
                got_grad, want_grad, rtol=0, atol=1e-5 * np.abs(want_grad).max(),
                err_msg=where,
            )  # fmt: skip
            want_value += np.trace(o_in @ k @ o_out @ k.T)
        np.testing.assert_allclose(float(value), want_value, rtol=1e-5)
    np.testing.assert_array_equal(grad["bias"], 0.0)


# --------------------------------------------- ConvOperator at extreme scales


CONV_CASES = {
    "same": ({"input_shape": (6, 6, 2)}, (3, 3, 2, 3), "SAME", 1),
    "valid_stride2": (
        {"input_shape": (7, 7, 2), "strides": 2, "padding": "VALID"},
        (3, 3, 2, 3),
        "VALID",
        2,
    ),
    "1d_same": ({"input_shape": (12, 2)}, (3, 2, 3), "SAME", 1),
}


def _dense_operator64(kernel, input_shape, padding, strides):
    """The ``(m, n)`` matrix of ``x ↦ conv(x, K)``: every basis input convolved."""
    n = int(np.prod(input_shape))
    basis = np.eye(n).reshape(n, *input_shape)
    return (
        conv(basis, np.asarray(kernel, np.float64), padding, strides).reshape(n, -1).T
    )


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20], ids=["1e-20", "1", "1e20"])
@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_operator_spectrum_matches_float64_svd_at_any_scale(name, scale, rng):
    kwargs, kernel_shape, padding, strides = CONV_CASES[name]
    kernel = jnp.asarray(rng.normal(size=kernel_shape) * scale, jnp.float32)
    dense = _dense_operator64(kernel, kwargs["input_shape"], padding, strides)
    expected = np.linalg.svd(dense, compute_uv=False)
    spec = mr.ConvOperator(**kwargs)
    op = spec.operator(kernel_shape)
    values = jax.jit(op.singular_values)(kernel)
    top = jax.jit(lambda k: op.singular_values(k, 3, method="krylov"))(kernel)
    # Both rescale by max|K| first: float32's relative precision at any scale.
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-5 * expected[0])
    np.testing.assert_allclose(top, expected[:3], rtol=1e-5)
    np.testing.assert_allclose(
        op.frobenius_norm(kernel), np.linalg.norm(dense), rtol=1e-5
    )
    norms = mr.spectral_norms({"w": kernel}, weight_dimension_numbers={"w": spec})
    np.testing.assert_allclose(norms["w"], expected[0], rtol=1e-5)
    ranks = mr.stable_ranks({"w": kernel}, weight_dimension_numbers={"w": spec})
    np.testing.assert_allclose(
        ranks["w"], np.sum(expected**2) / expected[0] ** 2, rtol=1e-4
    )
