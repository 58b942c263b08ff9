"""Input-space penalties against dense per-sample Jacobians (jax.jacfwd), float64
central finite differences and per-sample jax.grad, plus Flax training steps."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import margin_regs as mr
from margin_regs._jacobian import per_sample_input_gradients

N, D, H, C = 8, 6, 5, 3


def init_params(seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    return {
        "w1": jax.random.normal(k1, (D, H)) / np.sqrt(D),
        "b1": 0.1 * jax.random.normal(k2, (H,)),
        "w2": jax.random.normal(k3, (H, C)) / np.sqrt(H),
        "b2": 0.1 * jax.random.normal(k4, (C,)),
    }


def mlp(params, x):
    # tanh, not ReLU: smooth, so central finite differences are accurate
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def mlp_np(params, x):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    return np.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def fd_jacobians(params, x, eps=1e-6):
    """Per-sample Jacobians (n, C, D) by float64 central differences."""
    x = np.asarray(x, np.float64)
    jac = np.zeros((x.shape[0], C, x.shape[1]))
    for k in range(x.shape[1]):
        step = np.zeros_like(x)
        step[:, k] = eps
        jac[:, :, k] = (mlp_np(params, x + step) - mlp_np(params, x - step)) / (2 * eps)
    return jac


@jax.jit
def dense_jacobians(params, x):
    """Per-sample Jacobians (n, C, D) by forward mode, one sample at a time."""
    return jax.vmap(jax.jacfwd(lambda xi: mlp(params, xi[None])[0]))(x)


@functools.partial(jax.jit, static_argnames=("classes", "method", "normalise"))
def margin(params, x, key=None, labels=None, *, classes, method, normalise):
    chosen = labels if classes == "labels" else classes
    return mr.jacobian_margin_penalty(
        lambda b: mlp(params, b),
        x,
        classes=chosen,
        key=key,
        classifier=params["w2"] if normalise else None,
        method=method,
    )


margin_and_grad = jax.jit(
    jax.value_and_grad(margin), static_argnames=("classes", "method", "normalise")
)


def reference_margin(jac, classes, classifier=None):
    """``mean_i Σ_{c ∈ C_i} ‖J_i[c]‖ / ‖v_c‖`` from dense Jacobians (n, C, D)."""
    norms = np.linalg.norm(np.asarray(jac, np.float64), axis=2)
    if classifier is not None:
        norms = norms / np.linalg.norm(np.asarray(classifier, np.float64), axis=0)
    if isinstance(classes, str):
        return norms.sum(axis=1).mean()
    return norms[np.arange(len(classes)), np.asarray(classes)].mean()


@pytest.fixture(scope="module")
def params():
    return init_params()


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (N, D))


@pytest.fixture(scope="module")
def labels():
    return jnp.array([0, 1, 2, 0, 1, 2, 2, 0])


@pytest.mark.parametrize("method", ["vjp", "jacrev"])
@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("classes", ["labels", "all"])
def test_margin_penalty_matches_dense_jacobian(
    params, x, labels, classes, method, normalise
):
    got = margin(
        params, x, labels=labels, classes=classes, method=method, normalise=normalise
    )
    want = reference_margin(
        dense_jacobians(params, x),
        labels if classes == "labels" else "all",
        params["w2"] if normalise else None,
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_margin_penalty_matches_finite_differences(params, x, labels):
    jac = fd_jacobians(params, x)
    for classes in ("labels", "all"):
        got = margin(
            params, x, labels=labels, classes=classes, method="vjp", normalise=True
        )
        want = reference_margin(
            jac, labels if classes == "labels" else "all", params["w2"]
        )
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_random_classes_follow_the_documented_draw(params, x):
    key = jax.random.key(7)
    got = margin(params, x, key, classes="random", method="vjp", normalise=True)
    drawn = jax.random.randint(key, (N,), 0, C)
    want = reference_margin(dense_jacobians(params, x), drawn, params["w2"])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # an int seed is the same key
    seeded = mr.jacobian_margin_penalty(
        lambda b: mlp(params, b), x, key=7, classifier=params["w2"]
    )
    np.testing.assert_allclose(float(seeded), float(got), rtol=1e-6)


def test_random_classes_average_to_all_classes_over_c(params, x):
    """E_c[penalty] = penalty("all") / C; 4 standard errors over 4000 keys."""
    keys = jax.random.split(jax.random.key(3), 4000)
    draws = jax.jit(
        jax.vmap(
            lambda k: margin(
                params, x, k, classes="random", method="vjp", normalise=True
            )
        )
    )(keys)
    draws = np.asarray(draws, np.float64)
    target = float(margin(params, x, classes="all", method="vjp", normalise=True)) / C
    assert abs(draws.mean() - target) < 4 * draws.std() / np.sqrt(draws.size)


@pytest.mark.parametrize(
    ("classes", "normalise"),
    [("random", True), ("all", True), ("labels", True), ("all", False)],
)
def test_vjp_and_jacrev_agree_in_value_and_parameter_gradient(
    params, x, labels, classes, normalise
):
    args = dict(classes=classes, normalise=normalise)
    key = jax.random.key(5)
    fast, fast_grad = margin_and_grad(params, x, key, labels, method="vjp", **args)
    exact, exact_grad = margin_and_grad(params, x, key, labels, method="jacrev", **args)
    np.testing.assert_allclose(float(fast), float(exact), rtol=1e-6)
    for name in params:
        np.testing.assert_allclose(
            fast_grad[name], exact_grad[name], rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_parameter_gradient_matches_dense_jacobian_reference(params, x, labels):
    def reference(p):
        jac = jax.vmap(jax.jacfwd(lambda xi: mlp(p, xi[None])[0]))(x)
        rows = jac[jnp.arange(N), labels]
        return jnp.mean(
            jnp.linalg.norm(rows, axis=1) / jnp.linalg.norm(p["w2"], axis=0)[labels]
        )

    want = jax.jit(jax.grad(reference))(params)
    _, got = margin_and_grad(
        params, x, None, labels, classes="labels", method="vjp", normalise=True
    )
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["vjp", "jacrev"])
def test_out_of_range_label_under_jit_gives_nan(params, x, labels, method):
    for bad in (C, -1):
        got = margin(
            params,
            x,
            labels=labels.at[0].set(bad),
            classes="labels",
            method=method,
            normalise=True,
        )
        assert np.isnan(float(got))


def test_zero_classifier_column_contributes_zero_without_nan(params, x):
    p = dict(params, w2=params["w2"].at[:, 1].set(0.0))
    value, grads = margin_and_grad(
        p, x, None, None, classes="all", method="vjp", normalise=True
    )
    jac = np.asarray(dense_jacobians(p, x))
    norms = np.linalg.norm(jac, axis=2) / np.where(
        np.linalg.norm(p["w2"], axis=0) > 0, np.linalg.norm(p["w2"], axis=0), np.inf
    )
    np.testing.assert_allclose(float(value), norms.sum(1).mean(), rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_vjp_path_is_wrong_when_samples_interact_as_documented(params, x):
    """Batch centring (BatchNorm in training mode): the batched VJP returns
    Σⱼ ∂zⱼ/∂xᵢ, not the in-batch ∂zᵢ/∂xᵢ."""
    w = params["w1"][:, :C]

    def coupled(b):
        return (b - jnp.mean(b, axis=0)) @ w

    full = jax.jacfwd(coupled)(x)  # (n, C, n, D)
    in_batch = full[jnp.arange(N), :, jnp.arange(N)]  # (n, C, D)
    want = reference_margin(in_batch, "all")
    np.testing.assert_allclose(
        want, (1 - 1 / N) * np.linalg.norm(np.asarray(w), axis=0).sum(), rtol=1e-5
    )
    fast = mr.jacobian_margin_penalty(coupled, x, classes="all", method="vjp")
    assert float(fast) < 1e-5 * want  # the centring cancels the summed gradient


def test_margin_penalty_rejects_bad_input(params, x):
    def logits(b):
        return mlp(params, b)

    with pytest.raises(ValueError, match="needs a key"):
        mr.jacobian_margin_penalty(logits, x)
    with pytest.raises(ValueError, match="classes must be"):
        mr.jacobian_margin_penalty(logits, x, classes="some")
    with pytest.raises(ValueError, match="shape"):
        mr.jacobian_margin_penalty(logits, x, classes=jnp.zeros((N, 1), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        mr.jacobian_margin_penalty(logits, x, classes=jnp.zeros(N))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        mr.jacobian_margin_penalty(logits, x, classes=jnp.full(N, -1))
    with pytest.raises(ValueError, match="classifier"):
        mr.jacobian_margin_penalty(logits, x, classes="all", classifier=jnp.ones((5,)))
    with pytest.raises(ValueError, match="method"):
        mr.jacobian_margin_penalty(logits, x, classes="all", method="jacfwd")
    with pytest.raises(ValueError, match="logits"):
        mr.jacobian_margin_penalty(lambda b: b.sum(), x, classes="all")
    with pytest.raises(ValueError, match="floating"):
        mr.jacobian_margin_penalty(logits, x.astype(jnp.int32), classes="all")


frobenius = jax.jit(
    lambda params, x, key, n: mr.jacobian_frobenius_penalty(
        lambda b: mlp(params, b), x, n_projections=n, key=key
    ),
    static_argnums=3,
)


def test_exact_frobenius_matches_dense_jacobian_and_finite_differences(params, x):
    got = float(frobenius(params, x, None, None))
    dense = np.asarray(dense_jacobians(params, x), np.float64)
    np.testing.assert_allclose(got, np.mean(np.sum(dense**2, axis=(1, 2))), rtol=1e-5)
    fd = fd_jacobians(params, x)
    np.testing.assert_allclose(got, np.mean(np.sum(fd**2, axis=(1, 2))), rtol=1e-5)


def test_random_projection_estimate_is_unbiased_and_converges(params, x):
    exact = float(frobenius(params, x, None, None))
    # unbiased: 4000 independent one-projection estimates, mean within 4 std errors
    keys = jax.random.split(jax.random.key(11), 4000)
    draws = np.asarray(jax.vmap(lambda k: frobenius(params, x, k, 1))(keys))
    assert abs(draws.mean() - exact) < 4 * draws.std() / np.sqrt(draws.size)
    # converges: the relative error shrinks like 1/sqrt(k); 2% at k = 4096 here
    errors = [
        abs(float(frobenius(params, x, jax.random.key(12), k)) - exact) / exact
        for k in (4, 4096)
    ]
    assert errors[1] < 0.02
    assert errors[1] < errors[0]


def test_frobenius_rejects_bad_arguments(params, x):
    def logits(b):
        return mlp(params, b)

    with pytest.raises(ValueError, match="needs a key"):
        mr.jacobian_frobenius_penalty(logits, x)
    for bad, error in ((0, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match="n_projections"):
            mr.jacobian_frobenius_penalty(logits, x, n_projections=bad, key=0)


def per_sample_ce(params, x, y):
    return optax.losses.softmax_cross_entropy_with_integer_labels(mlp(params, x), y)


def single_ce(params, xi, yi):
    return per_sample_ce(params, xi[None], yi[None])[0]


@jax.jit
def per_sample_grads(params, x, y):
    """Reference: jax.grad of each sample's own loss, one sample at a time."""
    return jax.vmap(jax.grad(single_ce, argnums=1), in_axes=(None, 0, 0))(params, x, y)


def test_per_sample_input_gradients_match_per_sample_grad(params, x, labels):
    got = per_sample_input_gradients(lambda b: per_sample_ce(params, b, labels), x)
    np.testing.assert_allclose(
        got, per_sample_grads(params, x, labels), rtol=1e-5, atol=1e-7
    )
    with pytest.raises(ValueError, match="one scalar per sample"):
        per_sample_input_gradients(lambda b: mlp(params, b), x)


def test_input_gradient_penalty_matches_per_sample_grad(params, x, labels):
    penalty = jax.jit(
        lambda p: mr.input_gradient_penalty(
            lambda b, y: per_sample_ce(p, b, y), x, labels
        )
    )
    want = jnp.mean(jnp.sum(per_sample_grads(params, x, labels) ** 2, axis=1))
    np.testing.assert_allclose(float(penalty(params)), float(want), rtol=1e-5)
    # and its parameter gradient (double backprop) matches the reference's
    ref_grad = jax.jit(
        jax.grad(
            lambda p: jnp.mean(jnp.sum(per_sample_grads(p, x, labels) ** 2, axis=1))
        )
    )(params)
    got_grad = jax.jit(jax.grad(penalty))(params)
    for name in params:
        np.testing.assert_allclose(got_grad[name], ref_grad[name], rtol=1e-4, atol=1e-7)


def test_input_gradient_penalty_matches_finite_differences(params, x, labels):
    def ce_np(xb):
        z = mlp_np(params, xb)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -logp[np.arange(len(xb)), np.asarray(labels)]

    x64, eps = np.asarray(x, np.float64), 1e-6
    grads = np.zeros_like(x64)
    for k in range(D):
        step = np.zeros_like(x64)
        step[:, k] = eps
        grads[:, k] = (ce_np(x64 + step) - ce_np(x64 - step)) / (2 * eps)
    got = mr.input_gradient_penalty(lambda b, y: per_sample_ce(params, b, y), x, labels)
    np.testing.assert_allclose(float(got), np.mean(np.sum(grads**2, 1)), rtol=1e-4)


def test_input_gradient_penalty_needs_per_sample_losses(params, x, labels):
    with pytest.raises(ValueError, match="one scalar per sample"):
        mr.input_gradient_penalty(
            lambda b, y: jnp.mean(per_sample_ce(params, b, y)), x, labels
        )


@functools.partial(jax.jit, static_argnames=("epsilon", "alpha"))
def adversarial(params, x, y, epsilon, alpha):
    return mr.adversarial_loss(
        lambda b, t: per_sample_ce(params, b, t), x, y, epsilon=epsilon, alpha=alpha
    )


def test_adversarial_loss_matches_manual_fgsm(params, x, labels):
    eps, alpha = 0.3, 0.25
    g = np.asarray(per_sample_grads(params, x, labels), np.float64)
    x_adv = x + eps * g / np.linalg.norm(g, axis=1, keepdims=True)

    def reference(p, x_fixed):
        clean = jnp.mean(per_sample_ce(p, x, labels))
        return alpha * clean + (1 - alpha) * jnp.mean(per_sample_ce(p, x_fixed, labels))

    x_adv = jnp.asarray(x_adv, jnp.float32)
    np.testing.assert_allclose(
        float(adversarial(params, x, labels, eps, alpha)),
        float(reference(params, x_adv)),
        rtol=1e-6,
    )
    # no gradient through the perturbation's direction: the perturbed input is fixed
    got = jax.grad(adversarial)(params, x, labels, eps, alpha)
    want = jax.grad(reference)(params, x_adv)
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_adversarial_loss_leaves_zero_gradient_samples_unperturbed(params, x, labels):
    blind = dict(params, w1=jnp.zeros_like(params["w1"]))  # logits ignore x: g = 0
    value = adversarial(blind, x, labels, 1.0, 0.5)
    clean = jnp.mean(per_sample_ce(blind, x, labels))
    np.testing.assert_allclose(float(value), float(clean), rtol=1e-6)
    grads = jax.grad(adversarial)(blind, x, labels, 1.0, 0.5)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_adversarial_loss_rejects_bad_hyperparameters(params, x, labels):
    def loss(b, y):
        return per_sample_ce(params, b, y)

    with pytest.raises(ValueError, match="epsilon"):
        mr.adversarial_loss(loss, x, labels, epsilon=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        mr.adversarial_loss(loss, x, labels, epsilon=1.0, alpha=1.5)


LAMBDA, LR = 0.1, 0.05


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = jnp.tanh(nn.Dense(H, name="hidden")(x))
        return nn.Dense(C, name="out")(hidden)


def linen_objective(params, model, x, y, method):
    def logits_fn(b):
        return model.apply({"params": params}, b)

    ce = jnp.mean(per_sample_ce_from_logits(logits_fn(x), y))
    penalty = mr.jacobian_margin_penalty(
        logits_fn,
        x,
        classes=y,
        classifier=params["out"]["kernel"],
        method=method,
    )
    return ce + LAMBDA * penalty


def per_sample_ce_from_logits(logits, y):
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)


def test_linen_train_step_gradient_matches_exact_path(x, labels):
    model = LinenMLP()
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.sgd(LR)

    @functools.partial(jax.jit, static_argnames="method")
    def train_step(params, opt_state, method):
        loss, grads = jax.value_and_grad(linen_objective)(
            params, model, x, labels, method
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    new, _, loss, grads = train_step(params, tx.init(params), "vjp")
    _, _, exact_loss, exact_grads = train_step(params, tx.init(params), "jacrev")
    np.testing.assert_allclose(float(loss), float(exact_loss), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        grads,
        exact_grads,
    )
    # the step descends the regularised objective
    assert float(linen_objective(new, model, x, labels, "vjp")) < float(loss)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(D, H, rngs=rngs)
        self.out = nnx.Linear(H, C, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def nnx_objective(model, x, y, method):
    ce = jnp.mean(per_sample_ce_from_logits(model(x), y))
    penalty = mr.jacobian_margin_penalty(
        model, x, classes=y, classifier=model.out.kernel[...], method=method
    )
    return ce + LAMBDA * penalty


def test_nnx_train_step_gradient_matches_exact_path(x, labels):
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)

    @nnx.jit(static_argnames="method")
    def gradients(model, method):
        return nnx.value_and_grad(nnx_objective)(model, x, labels, method)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = gradients(model, "vjp")
        optimizer.update(model, grads)
        return loss

    loss, grads = gradients(model, "vjp")
    exact_loss, exact_grads = gradients(model, "jacrev")
    np.testing.assert_allclose(float(loss), float(exact_loss), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.to_pure_dict(grads),
        nnx.to_pure_dict(exact_grads),
    )
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert float(train_step(model, optimizer)) == pytest.approx(float(loss))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(
        lambda b, a, g: np.testing.assert_allclose(a, b - LR * g, rtol=1e-6, atol=1e-7),
        before,
        after,
        nnx.to_pure_dict(grads),
    )
    assert float(nnx_objective(model, x, labels, "vjp")) < float(loss)
