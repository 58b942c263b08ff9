"""The shared keys, coefficients and hyperparameter checks, and every public
constructor's use of them: each bad value raises an error naming the argument."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import margin_regs as mr
from margin_regs import _common

PARAMS = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))}


def key_data(key):
    return np.asarray(jax.random.key_data(key))


@pytest.mark.parametrize(
    "seed",
    [3, np.int64(3), np.int32(3), jax.random.key(3), jax.random.PRNGKey(3)],
    ids=["int", "np.int64", "np.int32", "typed", "raw"],
)
def test_as_key_gives_one_key_for_every_spelling_of_a_seed(seed):
    np.testing.assert_array_equal(
        key_data(_common.as_key(seed)), key_data(jax.random.key(3))
    )


def test_as_key_takes_a_traced_seed_and_names_what_needs_a_key():
    traced = jax.jit(lambda s: jax.random.key_data(_common.as_key(s)))(3)
    np.testing.assert_array_equal(traced, key_data(jax.random.key(3)))
    with pytest.raises(ValueError, match="the estimate needs a key"):
        _common.as_key(None, "the estimate")
    with pytest.raises(TypeError, match="key"):
        _common.as_key(True)


def test_np_int64_seed_behaves_like_the_int_everywhere():
    x = jnp.zeros((3, 4))
    loss = lambda p, b: jnp.sum(b * p["w"] ** 2)  # noqa: E731
    for fn in (
        lambda k: mr.init_power_iteration(PARAMS, k)["w"],
        lambda k: mr.perturb_weights(PARAMS, k, 0.1)["w"],
        lambda k: mr.add_input_noise(x, k, 0.1),
        lambda k: mr.hessian_max_eigenvalue(loss, PARAMS, 1.0, n_iterations=3, key=k),
        lambda k: mr.jacobian_frobenius_penalty(lambda b: b @ PARAMS["w"], x, key=k),
        lambda k: mr.spectral_norm_regularization(1.0, key=k).init(PARAMS),
    ):
        for got, want in zip(
            jax.tree.leaves(fn(np.int64(7))), jax.tree.leaves(fn(7)), strict=True
        ):
            np.testing.assert_array_equal(got, want)


def test_coeff_at_evaluates_a_schedule_at_the_count():
    assert _common.coeff_at(0.5, jnp.int32(3)) == 0.5
    schedule = optax.linear_schedule(1.0, 0.0, 4)
    assert float(_common.coeff_at(schedule, jnp.int32(1))) == 0.75


def test_needs_params_names_the_transform():
    assert "my_transform needs params" in str(_common.needs_params("my_transform"))


BAD_COEFFS = [
    (-0.1, ValueError),
    (math.nan, ValueError),
    (math.inf, ValueError),
    (jnp.array(-1.0), ValueError),
    (jnp.array(jnp.nan), ValueError),
    (np.float32(-1.0), ValueError),
    ("0.1", TypeError),
    (True, TypeError),
]
COEFF_TRANSFORMS = [
    mr.spectral_norm_regularization,
    mr.eigenvalue_decay,
    mr.adareg,
    mr.add_l1_penalty,
]


@pytest.mark.parametrize("factory", COEFF_TRANSFORMS)
@pytest.mark.parametrize(("coeff", "error"), BAD_COEFFS)
def test_transforms_reject_a_bad_coeff_where_they_are_built(factory, coeff, error):
    with pytest.raises(error, match=f"{factory.__name__}: coeff"):
        factory(coeff)


@pytest.mark.parametrize("factory", COEFF_TRANSFORMS)
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_transforms_check_a_schedule_at_step_0(factory, value):
    with pytest.raises(ValueError, match=rf"{factory.__name__}: coeff\(0\)"):
        factory(optax.constant_schedule(value))


def expected_term(name, coeff):
    """The term each transform adds to a zero gradient, from float64 numpy."""
    w = np.asarray(PARAMS["w"], np.float64)
    u, s, vt = np.linalg.svd(w)
    top = np.outer(u[:, 0], vt[0])
    return (
        coeff
        * {
            "spectral_norm_regularization": s[0] * top,  # ∇ ½σ²
            "eigenvalue_decay": top,  # ∇ σ
            "adareg": 2 * w,  # 2 Ω_in K Ω_out at the identity precisions
            "add_l1_penalty": np.sign(w),
        }[name]
    )


@pytest.mark.parametrize("factory", COEFF_TRANSFORMS)
@pytest.mark.parametrize(
    "coeff",
    [0.5, np.float32(0.5), jnp.asarray(0.5), optax.constant_schedule(0.5)],
    ids=["float", "numpy", "array", "schedule"],
)
def test_every_spelling_of_a_good_coeff_adds_the_papers_term(factory, coeff):
    tx = factory(coeff)
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zero, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(
        updates["w"], expected_term(factory.__name__, 0.5), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("factory", COEFF_TRANSFORMS)
def test_a_bad_coeff_under_jit_makes_the_update_nan_not_a_wrong_step(factory):
    """Traced coefficients cannot raise: negative or non-finite ones give NaN."""
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    state = factory(0.5).init(PARAMS)

    @jax.jit
    def step(coeff):
        return factory(coeff).update(zero, state, PARAMS)[0]["w"]

    for bad in (-1.0, jnp.nan, jnp.inf):
        assert np.all(np.isnan(step(jnp.float32(bad)))), bad
    np.testing.assert_allclose(
        step(jnp.float32(0.5)),
        expected_term(factory.__name__, 0.5),
        rtol=1e-5,
        atol=1e-6,
    )
    # A schedule passes step 0 and turns negative at step 1.
    tx = factory(optax.linear_schedule(0.5, -0.5, 1))
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    first, state = update(zero, state, PARAMS)
    second, _ = update(zero, state, PARAMS)
    assert np.all(np.isfinite(first["w"])) and np.all(np.isnan(second["w"]))
    # Under inject_hyperparams the coeff is an array in the state.
    static = {
        "spectral_norm_regularization": ("n_power_iterations", "key"),
        "eigenvalue_decay": ("n_power_iterations", "key"),
        "adareg": ("update_every",),
        "add_l1_penalty": (),
    }[factory.__name__]
    injected = optax.inject_hyperparams(factory, static_args=static)(coeff=0.5)
    hyper_state = injected.init(PARAMS)
    hyper_state.hyperparams["coeff"] = jnp.asarray(-1.0)
    bad_update, _ = jax.jit(injected.update)(zero, hyper_state, PARAMS)
    assert np.all(np.isnan(bad_update["w"]))


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (2.5, TypeError),
        (2.0, TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_iteration_counts_are_ints_of_at_least_one(value, error):
    calls = {
        "spectral_norm_regularization": lambda: mr.spectral_norm_regularization(
            0.1, n_power_iterations=value
        ),
        "eigenvalue_decay": lambda: mr.eigenvalue_decay(0.1, n_power_iterations=value),
        "spectral_norm_penalty": lambda: mr.spectral_norm_penalty(
            PARAMS, {"w": jnp.ones(3)}, n_power_iterations=value
        ),
        "eigenvalue_decay_penalty": lambda: mr.eigenvalue_decay_penalty(
            PARAMS, n_power_iterations=value
        ),
        "hessian_max_eigenvalue": lambda: mr.hessian_max_eigenvalue(
            lambda p, b: 0.0, PARAMS, None, n_iterations=value
        ),
    }
    for fn, call in calls.items():
        name = (
            "n_iterations" if fn == "hessian_max_eigenvalue" else "n_power_iterations"
        )
        with pytest.raises(error, match=f"{fn}: {name}"):
            call()


def test_n_projections_is_an_int_of_at_least_one_or_none():
    logits_fn = lambda b: b @ PARAMS["w"]  # noqa: E731
    x = jnp.ones((2, 4))
    for value, error in ((0, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="jacobian_frobenius_penalty: n_projections"):
            mr.jacobian_frobenius_penalty(logits_fn, x, n_projections=value, key=0)
    exact = mr.jacobian_frobenius_penalty(logits_fn, x, n_projections=None)
    np.testing.assert_allclose(exact, np.sum(np.asarray(PARAMS["w"]) ** 2), rtol=1e-5)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_max_norm_is_finite_and_positive(value):
    with pytest.raises(ValueError, match="max_norm_constraint: max_norm"):
        mr.max_norm_constraint(value)


@pytest.mark.parametrize("value", [-0.1, math.nan])
def test_noise_stddev_is_finite_and_not_negative(value):
    with pytest.raises(ValueError, match="perturb_weights: stddev"):
        mr.perturb_weights(PARAMS, 0, value)
    with pytest.raises(ValueError, match="add_input_noise: stddev"):
        mr.add_input_noise(jnp.ones(3), 0, value)


def test_adversarial_hyperparameters_are_named():
    loss = lambda b, y: jnp.sum(b, axis=1)  # noqa: E731
    x = jnp.ones((2, 3))
    for kwargs, name in (
        ({"epsilon": math.nan}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": 1.0, "alpha": -0.5}, "alpha"),
        ({"epsilon": 1.0, "alpha": 1.5}, "alpha"),
    ):
        with pytest.raises(ValueError, match=f"adversarial_loss: {name}"):
            mr.adversarial_loss(loss, x, None, **kwargs)


@pytest.mark.parametrize(
    ("lower", "upper", "match"),
    [
        (0.0, 1.0, "lower"),
        (1.0, -1.0, "upper"),
        (2.0, 1.0, "lower <= upper"),
        (1.0, math.inf, "upper"),
        (math.nan, 1.0, "lower"),
    ],
)
def test_check_bounds_names_the_bad_bound(lower, upper, match):
    with pytest.raises(ValueError, match=f"fn: .*{match}"):
        _common.check_bounds(lower, upper, "fn")
    with pytest.raises(ValueError, match=f"fn: .*{match}"):
        _common.check_bounds(jnp.asarray(lower), jnp.asarray(upper), "fn")
    # Traced bounds cannot be checked, and do not raise.
    jax.jit(lambda a, b: _common.check_bounds(a, b, "fn"))(lower, upper)
