"""Diagnostics against independent computations: numpy SVD, closed-form distances of a
linear model, a ray scan with bisection on a small ReLU network, dense Hessians."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from optax.contrib import MuonDimensionNumbers

import margin_regs as mr

# Parameters come from numpy and model structures from ``eval_shape``: eager JAX
# random ops and ``init`` would each compile, which dominates this module's time.


def _fill(shapes, seed):
    r = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(r.normal(size=a.shape).astype(np.float32)), shapes
    )


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Dense(5)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(x)


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 6, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _linen_params():
    shapes = jax.eval_shape(_LinenNet().init, jax.random.key(0), jnp.ones((1, 5, 5, 2)))
    return _fill(shapes, 1)


def _nnx_split(seed=2):
    """``(graphdef, state)`` of an ``_NnxNet`` with ``nnx.Param`` values from numpy."""
    graphdef, shapes = nnx.split(
        nnx.eval_shape(lambda: _NnxNet(nnx.Rngs(0))), nnx.Param
    )
    return graphdef, _fill(shapes, seed)


def _plain_params():
    r = np.random.default_rng(3)
    normal = lambda *shape: jnp.asarray(r.normal(size=shape).astype(np.float32))  # noqa: E731
    return {
        "layers": [
            {"w": normal(4, 7), "b": jnp.zeros(7)},
            {"w": normal(7, 3), "b": jnp.zeros(3)},
        ],
        "conv": normal(2, 2, 3, 5),
    }


CONTAINERS = {
    "linen": (
        _linen_params,
        {
            "params/Conv_0/kernel": (3, 3, 2, 4),
            "params/Dense_0/kernel": (100, 5),
            "params/Dense_1/kernel": (5, 3),
        },
    ),
    "nnx": (
        lambda: _nnx_split()[1],
        {"hidden/kernel": (4, 6), "out/kernel": (6, 3)},
    ),
    "plain": (
        _plain_params,
        {"conv": (2, 2, 3, 5), "layers/0/w": (4, 7), "layers/1/w": (7, 3)},
    ),
}


def _leaf(params, path):
    node = params
    for part in path.split("/"):
        node = node[int(part) if isinstance(node, list) else part]
    return np.asarray(node[...] if isinstance(node, nnx.Variable) else node)


@functools.partial(jax.jit, static_argnames="mask")
def _all_spectral(params, mask=None):
    return (
        mr.spectral_norms(params, mask=mask),
        mr.singular_value_spectra(params, mask=mask),
        mr.stable_ranks(params, mask=mask),
    )


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_spectra_match_numpy_svd(container):
    make, shapes = CONTAINERS[container]
    params = make()
    norms, spectra, ranks = _all_spectral(params)
    assert set(norms) == set(spectra) == set(ranks) == set(shapes)
    for path, shape in shapes.items():
        kernel = _leaf(params, path)
        assert kernel.shape == shape
        s = np.linalg.svd(kernel.reshape(-1, shape[-1]), compute_uv=False)
        np.testing.assert_allclose(spectra[path], s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(norms[path], s[0], rtol=1e-5)
        np.testing.assert_allclose(ranks[path], np.sum(s**2) / s[0] ** 2, rtol=1e-5)


def test_mask_selects_and_rejects_vectors():
    params = _plain_params()
    only_conv = {"layers": [False, False], "conv": True}
    norms = mr.spectral_norms(params, mask=only_conv)
    assert list(norms) == ["conv"]
    expected = np.linalg.svd(np.asarray(params["conv"]).reshape(-1, 5))[1][0]
    np.testing.assert_allclose(norms["conv"], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="layers/0/b"):
        mr.stable_ranks(params, mask=lambda p: jax.tree.map(lambda _: True, p))


# A 2-D kernel, a batched layout (two 4 x 3 matrices) and a convolution operator.
_RANK_LAYOUTS = {
    "dense": MuonDimensionNumbers(0, 1),  # the default layout of a 2-D leaf
    "batched": MuonDimensionNumbers(1, 2),
    "conv": mr.ConvOperator((5, 5, 2)),
}
_ranks_by_layout = jax.jit(
    functools.partial(mr.stable_ranks, weight_dimension_numbers=_RANK_LAYOUTS)
)


def _dense_stable_ranks(params):
    """Float64 ``Σσ²/σ₁²`` per matrix, the conv's from its dense operator matrix."""
    op = mr.ConvOperator((5, 5, 2)).operator(params["conv"].shape)
    conv = jax.jacfwd(lambda x: op.matvec(params["conv"], x))(jnp.zeros((5, 5, 2)))
    matrices = {
        "dense": [params["dense"]],
        "batched": list(params["batched"]),
        "conv": [np.reshape(conv, (50, 50))],
    }
    out = {}
    for name, mats in matrices.items():
        s = [np.linalg.svd(np.asarray(m, np.float64), compute_uv=False) for m in mats]
        out[name] = np.squeeze([np.sum(v**2) / v[0] ** 2 for v in s])
    return out


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_stable_rank_is_nan_for_a_nonfinite_kernel_and_zero_only_for_zero(rng, bad):
    # `σ₁ > 0` is False for NaN, so a NaN kernel used to take the zero-matrix branch
    # and report stable rank 0 where spectral_norms gives NaN.
    params = {
        "dense": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
        "batched": jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32),
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.float32),
    }
    expected = _dense_stable_ranks(params)
    ranks = _ranks_by_layout(params)
    assert set(ranks) == set(expected)
    for name, value in ranks.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5)
    # one entry of each leaf non-finite; the batched leaf's other slice unaffected
    poisoned = {
        "dense": params["dense"].at[2, 1].set(bad),
        "batched": params["batched"].at[0, 3, 0].set(bad),
        "conv": params["conv"].at[1, 1, 0, 1].set(bad),
    }
    ranks = _ranks_by_layout(poisoned)
    assert np.isnan(ranks["dense"]) and np.isnan(ranks["conv"])
    assert np.isnan(ranks["batched"][0])
    np.testing.assert_allclose(ranks["batched"][1], expected["batched"][1], rtol=1e-5)
    assert np.isnan(mr.stable_rank(poisoned["dense"]))
    batched = mr.stable_rank(
        poisoned["batched"], weight_dimension_numbers=_RANK_LAYOUTS["batched"]
    )
    assert np.isnan(batched[0]) and np.isfinite(batched[1])
    op = _RANK_LAYOUTS["conv"].operator(params["conv"].shape)
    assert np.isnan(op.stable_rank(poisoned["conv"]))
    # the exact zero matrix (a zero slice beside a nonzero one) keeps 0
    zeros = {
        "dense": jnp.zeros_like(params["dense"]),
        "batched": params["batched"].at[0].set(0.0),
        "conv": jnp.zeros_like(params["conv"]),
    }
    ranks = _ranks_by_layout(zeros)
    assert ranks["dense"] == 0 and ranks["conv"] == 0 and ranks["batched"][0] == 0
    np.testing.assert_allclose(ranks["batched"][1], expected["batched"][1], rtol=1e-5)
    assert op.stable_rank(zeros["conv"]) == 0


# ----------------------------------------------------------------------------------
# Output margins.

_output_margins = jax.jit(mr.output_margins)


def _brute_force_margins(logits, labels, columns=None):
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    out = []
    for z, y in zip(logits, labels, strict=True):
        ratios = []
        for j in range(len(z)):
            if j == y:
                continue
            scale = 1.0 if columns is None else np.linalg.norm(columns[y] - columns[j])
            ratios.append((z[y] - z[j]) / scale)
        out.append(min(ratios))
    return np.array(out)


def test_output_margins_match_brute_force(rng):
    logits = rng.normal(size=(9, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=9)
    np.testing.assert_allclose(
        _output_margins(logits, labels),
        _brute_force_margins(logits, labels),
        rtol=1e-6,
    )
    v = rng.normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_allclose(
        _output_margins(logits, labels, classifier=v),
        _brute_force_margins(logits, labels, columns=np.asarray(v, np.float64).T),
        rtol=1e-5,
    )


def test_coinciding_classifier_columns_give_infinite_margin():
    # v_0 = v_1: z_0 − z_1 is the constant bias gap, so no boundary exists.
    v = jnp.array([[1.0, 1.0], [2.0, 2.0]])
    logits = jnp.array([[1.0, 0.5], [0.2, 0.5]])
    got = mr.output_margins(logits, jnp.array([0, 0]), classifier=v)
    np.testing.assert_array_equal(got, [np.inf, -np.inf])


def test_input_margin_estimates_flatten_all_feature_axes(linear_model):
    w, b, x = linear_model
    labels = np.argmax(x @ w + b, axis=1)
    cubes = x.reshape(len(x), 5, 1, 1)
    got = jax.jit(
        lambda t, y: mr.input_margin_estimates(
            lambda c: c.reshape(len(c), -1) @ w + b, t, y
        )
    )(cubes, labels)
    exact = [
        _nearest_hyperplane(w, b, xi, y)[1] for xi, y in zip(x, labels, strict=True)
    ]
    np.testing.assert_allclose(got, exact, rtol=1e-4)


def test_margins_under_jit_are_nan_exactly_at_out_of_range_labels(linear_model):
    """Unchecked under jit, a bad label (negative ones would wrap) gives NaN."""
    w, b, x = (jnp.asarray(a) for a in linear_model)

    def logits_fn(inputs):
        return inputs @ w + b

    logits = logits_fn(x)
    labels = jnp.argmax(logits, axis=1).at[0].set(-1).at[1].set(99)
    for got in (
        jax.jit(mr.output_margins)(logits, labels),
        jax.jit(mr.input_margin_estimates, static_argnums=0)(logits_fn, x, labels),
    ):
        got = np.asarray(got)
        assert np.all(np.isnan(got[:2])) and np.all(np.isfinite(got[2:]))


def test_output_margins_reject_bad_input():
    logits = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="n_classes"):
        mr.output_margins(jnp.zeros(3), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="shape"):
        mr.output_margins(logits, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        mr.output_margins(logits, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        mr.output_margins(logits, jnp.array([0, 1, 4]))
    with pytest.raises(ValueError, match="columns"):
        mr.output_margins(logits, jnp.zeros(3, jnp.int32), classifier=jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="floating"):
        mr.input_margin_estimates(lambda t: t, jnp.zeros((3, 4), jnp.int32), None)


# ----------------------------------------------------------------------------------
# Linear model: the distance to the decision boundary is known in closed form.


@jax.jit
def _linear_measure(w, b, x, labels):
    logits_fn = lambda t: t @ w + b  # noqa: E731
    logits = logits_fn(x)
    params = {"out": {"kernel": w}}
    return {
        "estimate": mr.input_margin_estimates(logits_fn, x, labels),
        "geometric_margin": mr.output_margins(logits, labels, classifier=w),
        # No hidden layer: the product of hidden norms is empty.
        "geometric": mr.margin_lower_bounds(
            mr.output_margins(logits, labels, classifier=w),
            params,
            mask={"out": {"kernel": False}},
            margin_type="geometric",
        ),
        "logit": mr.margin_lower_bounds(mr.output_margins(logits, labels), params),
    }


@pytest.fixture(scope="module")
def linear_model():
    r = np.random.default_rng(4)
    w = r.normal(size=(5, 4)).astype(np.float32)
    b = r.normal(size=4).astype(np.float32)
    x = r.normal(size=(16, 5)).astype(np.float32)
    return w, b, x


def _nearest_hyperplane(w, b, x, y):
    """Index ``j`` and signed distance to ``(w_y − w_j)·x + b_y − b_j = 0``."""
    w, b, x = (np.asarray(a, np.float64) for a in (w, b, x))
    z = x @ w + b
    ratios = [
        (z[y] - z[j]) / np.linalg.norm(w[:, y] - w[:, j]) if j != y else np.inf
        for j in range(len(z))
    ]
    j = int(np.argmin(ratios))
    return j, ratios[j]


def test_input_margin_estimate_is_exact_for_linear_model(linear_model):
    w, b, x = linear_model
    predicted = np.argmax(x @ w + b, axis=1)
    wrong = (predicted + 1) % 4
    for labels in (predicted, wrong):
        exact = [
            _nearest_hyperplane(w, b, xi, y)[1] for xi, y in zip(x, labels, strict=True)
        ]
        got = _linear_measure(w, b, x, labels)
        np.testing.assert_allclose(got["estimate"], exact, rtol=1e-4)
        # With the input as the features, the geometric output margin agrees.
        np.testing.assert_allclose(got["geometric_margin"], exact, rtol=1e-4)
    assert np.all(np.asarray(exact) < 0)

    # The distance is where the prediction actually changes along the normal.
    for xi, y in zip(x, predicted, strict=True):
        j, distance = _nearest_hyperplane(w, b, xi, y)
        normal = (w[:, j] - w[:, y]) / np.linalg.norm(w[:, j] - w[:, y])
        assert np.argmax((xi + 0.999 * distance * normal) @ w + b) == y
        assert np.argmax((xi + 1.001 * distance * normal) @ w + b) != y


def test_bounds_on_linear_model(linear_model):
    w, b, x = linear_model
    labels = np.argmax(x @ w + b, axis=1)
    exact = np.array(
        [_nearest_hyperplane(w, b, xi, y)[1] for xi, y in zip(x, labels, strict=True)]
    )
    got = _linear_measure(w, b, x, labels)
    # No hidden layer: the geometric bound is the exact distance.
    np.testing.assert_allclose(got["geometric"]["spectral"], exact, rtol=1e-4)
    np.testing.assert_allclose(got["geometric"]["frobenius"], exact, rtol=1e-4)
    # Logit margin over √2‖V‖: a valid bound, with the Frobenius one below it.
    margins = _brute_force_margins(x @ w + b, labels)
    s = np.linalg.svd(w, compute_uv=False)
    logit = got["logit"]
    np.testing.assert_allclose(logit["spectral"], margins / (np.sqrt(2) * s[0]), 1e-5)
    np.testing.assert_allclose(
        logit["frobenius"], margins / (np.sqrt(2) * np.linalg.norm(w)), rtol=1e-5
    )
    assert np.all(logit["spectral"] <= exact * (1 + 1e-5))
    assert np.all(logit["frobenius"] <= logit["spectral"] * (1 + 1e-6))


def test_logit_bound_is_attained_with_opposite_columns():
    # v_1 = −v_0 makes ‖v_0 − v_1‖ = √2‖V‖₂: the √2 is needed, and tight here.
    v = np.array([[1.0, -1.0], [0.0, 0.0]], np.float32)
    x = np.array([[0.7, 3.0]], np.float32)
    got = _linear_measure(v, np.zeros(2, np.float32), x, np.array([0]))
    np.testing.assert_allclose(got["estimate"], [0.7], rtol=1e-6)
    np.testing.assert_allclose(got["logit"]["spectral"], [0.7], rtol=1e-6)


def test_margin_lower_bounds_reject_bad_input():
    params = {"v": jnp.eye(2), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="margin_type"):
        mr.margin_lower_bounds(jnp.ones(3), params, margin_type="input")
    with pytest.raises(ValueError, match=r"\(n,\)"):
        mr.margin_lower_bounds(jnp.ones((3, 1)), params)
    with pytest.raises(ValueError, match="classifier"):
        mr.margin_lower_bounds(jnp.ones(3), params, mask={"v": False, "b": False})


# ----------------------------------------------------------------------------------
# Small ReLU network in 2-D: the true margin by a ray scan with bisection.


def _relu_net(params, x):
    h = jax.nn.relu(x @ params["dense0"]["kernel"] + params["dense0"]["bias"])
    h = jax.nn.relu(h @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def _activation_pattern(params, x):
    h = x @ params["dense0"]["kernel"] + params["dense0"]["bias"]
    h2 = jax.nn.relu(h) @ params["dense1"]["kernel"] + params["dense1"]["bias"]
    return jnp.concatenate([h > 0, h2 > 0], axis=-1)


HIDDEN_ONLY = {
    "dense0": {"kernel": True, "bias": False},
    "dense1": {"kernel": True, "bias": False},
    "out": {"kernel": False, "bias": False},
}


@jax.jit
def _relu_measure(params, x, labels):
    logits = _relu_net(params, x)
    geometric = mr.output_margins(logits, labels, classifier=params["out"]["kernel"])
    return {
        "estimate": mr.input_margin_estimates(
            functools.partial(_relu_net, params), x, labels
        ),
        "geometric": mr.margin_lower_bounds(
            geometric, params, mask=HIDDEN_ONLY, margin_type="geometric"
        ),
        "logit": mr.margin_lower_bounds(mr.output_margins(logits, labels), params),
    }


@jax.jit
def _dense_input_jacobians(params, x):
    return jax.vmap(jax.jacrev(lambda t: _relu_net(params, t[None])[0]))(x)


@jax.jit
def _first_crossings(params, x, labels, directions, radii):
    """Distance from each ``x (n, 2)`` along unit ``directions (n, D, 2)`` to the first
    point not classified as its label: the first point outside on a fine radius
    grid, refined by 40 bisection steps from the grid point before. ``inf`` if none.
    """

    def predicted(points):
        return jnp.argmax(_relu_net(params, points), axis=-1)

    pts = x[:, None, None] + radii[:, None] * directions[:, :, None]
    outside = predicted(pts) != labels[:, None, None]
    first = jnp.argmax(outside, axis=-1)
    lo, hi = radii[jnp.maximum(first - 1, 0)], radii[first]

    def step(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        out = predicted(x[:, None] + mid[..., None] * directions) != labels[:, None]
        return jnp.where(out, lo, mid), jnp.where(out, mid, hi)

    _, hi = jax.lax.fori_loop(0, 40, step, (lo, hi))
    return jnp.where(jnp.any(outside, axis=-1), hi, jnp.inf)


RADII = jnp.linspace(0.0, 8.0, 800)


@pytest.fixture(scope="module")
def relu_setup():
    r = np.random.default_rng(5)
    normal = lambda *shape: jnp.asarray(r.normal(size=shape).astype(np.float32))  # noqa: E731
    params = {
        "dense0": {"kernel": normal(2, 12), "bias": 0.5 * normal(12)},
        "dense1": {"kernel": normal(12, 12) / np.sqrt(12), "bias": 0.5 * normal(12)},
        "out": {"kernel": normal(12, 3) / np.sqrt(12), "bias": 0.1 * normal(3)},
    }
    x = jnp.asarray(r.uniform(-1.5, 1.5, size=(64, 2)).astype(np.float32))
    labels = jnp.argmax(_relu_net(params, x), axis=1)
    measured = _relu_measure(params, x, labels)
    jacobians = np.asarray(_dense_input_jacobians(params, x), np.float64)
    logits = np.asarray(_relu_net(params, x), np.float64)
    # Unit normal of the linearised nearest boundary, from the dense Jacobians.
    normals, estimates = [], []
    for z, g, y in zip(logits, jacobians, np.asarray(labels), strict=True):
        ratios = [
            (z[y] - z[j]) / np.linalg.norm(g[y] - g[j]) if j != y else np.inf
            for j in range(3)
        ]
        j = int(np.argmin(ratios))
        normals.append((g[j] - g[y]) / np.linalg.norm(g[j] - g[y]))
        estimates.append(ratios[j])
    return {
        "params": params,
        "x": x,
        "labels": labels,
        "measured": measured,
        "dense_estimates": np.array(estimates),
        "normals": np.array(normals, np.float32),
    }


N_SCANNED = 12


@pytest.fixture(scope="module")
def true_margins(relu_setup):
    """Minimum over 360 ray directions and the gradient direction of the first
    crossing: the true margin up to the angular resolution (from above)."""
    angles = np.linspace(0.0, 2 * np.pi, 360, endpoint=False)
    scan = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    normals = relu_setup["normals"][:N_SCANNED, None]
    directions = np.concatenate(
        [normals, np.broadcast_to(scan, (N_SCANNED, *scan.shape))], axis=1
    )
    crossings = np.asarray(
        _first_crossings(
            relu_setup["params"],
            relu_setup["x"][:N_SCANNED],
            relu_setup["labels"][:N_SCANNED],
            jnp.asarray(directions),
            RADII,
        )
    )
    return crossings.min(axis=1), crossings[:, 0]


def test_input_margin_estimates_match_dense_jacobian(relu_setup):
    np.testing.assert_allclose(
        relu_setup["measured"]["estimate"], relu_setup["dense_estimates"], rtol=1e-4
    )


def test_bounds_hold_below_the_true_margin(relu_setup, true_margins):
    true, along_gradient = true_margins
    assert np.all(np.isfinite(true))
    measured = jax.tree.map(lambda a: np.asarray(a)[:N_SCANNED], relu_setup["measured"])
    geometric, logit = measured["geometric"], measured["logit"]
    for bounds in (geometric, logit):
        assert np.all(bounds["frobenius"] > 0)
        assert np.all(bounds["frobenius"] <= bounds["spectral"] * (1 + 1e-6))
        assert np.all(bounds["spectral"] <= true)
    # The geometric margin can only sharpen the logit one (‖v_y − v_j‖ ≤ √2‖V‖₂),
    assert np.all(logit["spectral"] <= geometric["spectral"] * (1 + 1e-5))
    # the local gradient never exceeds the product of norms,
    assert np.all(geometric["spectral"] <= measured["estimate"] * (1 + 1e-5))
    # and no direction reaches the boundary sooner than the nearest point.
    assert np.all(true <= along_gradient)


def test_estimate_is_exact_inside_one_linear_region(relu_setup):
    """Where ``x`` and its linearised projection share one ReLU activation pattern,
    the network is affine on the segment between them, so bisection along the
    gradient direction meets the boundary exactly at the estimate."""
    params, x = relu_setup["params"], relu_setup["x"]
    estimates = np.asarray(relu_setup["measured"]["estimate"])
    normals = relu_setup["normals"]
    targets = np.asarray(x) + 0.999 * estimates[:, None] * normals
    same_region = np.all(
        np.asarray(_activation_pattern(params, x))
        == np.asarray(_activation_pattern(params, jnp.asarray(targets))),
        axis=1,
    )
    along_gradient = np.asarray(
        _first_crossings(
            params, x, relu_setup["labels"], jnp.asarray(normals[:, None]), RADII
        )
    )[:, 0]
    assert same_region.sum() >= 3
    np.testing.assert_allclose(
        along_gradient[same_region], estimates[same_region], rtol=2e-3
    )


def test_misclassified_margins_are_negative_and_bounds_zero(relu_setup):
    wrong = (relu_setup["labels"] + 1) % 3
    measured = _relu_measure(relu_setup["params"], relu_setup["x"], wrong)
    assert np.all(measured["estimate"] < 0)
    for kind in ("geometric", "logit"):
        for bound in measured[kind].values():
            np.testing.assert_array_equal(bound, 0.0)


# ----------------------------------------------------------------------------------
# Input-gradient norms.


def test_input_gradient_norms_match_per_sample_grad(relu_setup):
    params, x, labels = relu_setup["params"], relu_setup["x"], relu_setup["labels"]

    def loss_fn(t, y):
        return optax.losses.softmax_cross_entropy_with_integer_labels(
            _relu_net(params, t), y
        )

    @jax.jit
    def both(x, labels):
        single = jax.vmap(jax.grad(lambda t, y: loss_fn(t[None], y[None])[0]))
        return mr.input_gradient_norms(loss_fn, x, labels), single(x, labels)

    norms, single = both(x, labels)
    np.testing.assert_allclose(norms, np.linalg.norm(single, axis=1), rtol=1e-5)


def test_input_gradient_norms_flatten_all_feature_axes():
    x = jnp.arange(12.0).reshape(2, 2, 3)
    norms = mr.input_gradient_norms(lambda t, y: jnp.sum(t**2, axis=(1, 2)), x, None)
    np.testing.assert_allclose(norms, 2 * np.linalg.norm(x.reshape(2, -1), axis=1))


# ----------------------------------------------------------------------------------
# Hessian's dominant eigenvalue against the dense Hessian.


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _nnx_hessian_case():
    graphdef, state = _nnx_split(seed=8)
    return (lambda s, b: _cross_entropy(nnx.merge(graphdef, s)(b[0]), b[1])), state


def _plain_hessian_case():
    r = np.random.default_rng(9)
    params = {
        "w1": jnp.asarray(r.normal(size=(4, 3)).astype(np.float32)),
        "b1": jnp.zeros(3),
        "w2": jnp.asarray(r.normal(size=(3, 3)).astype(np.float32)),
    }

    def loss(p, b):
        return _cross_entropy(jnp.tanh(b[0] @ p["w1"] + p["b1"]) @ p["w2"], b[1])

    return loss, params


@functools.partial(jax.jit, static_argnums=0)
def _dense_hessian_and_power_iteration(loss, params, batch):
    flat, unravel = ravel_pytree(params)
    dense = jax.hessian(lambda f: loss(unravel(f), batch))(flat)
    top = mr.hessian_max_eigenvalue(
        loss, params, batch, n_iterations=500, key=jax.random.key(0)
    )
    return dense, top


# A linen dict is a plain nested dict; the spectral tests cover its paths.
@pytest.mark.parametrize("case", [_nnx_hessian_case, _plain_hessian_case])
def test_hessian_max_eigenvalue_matches_dense_hessian(case):
    loss, params = case()
    r = np.random.default_rng(6)
    batch = (
        jnp.asarray(r.normal(size=(8, 4)).astype(np.float32)),
        jnp.asarray(r.integers(0, 3, size=8)),
    )
    dense, top = _dense_hessian_and_power_iteration(loss, params, batch)
    eigenvalues = np.linalg.eigvalsh(np.asarray(dense, np.float64))
    by_magnitude = eigenvalues[np.argsort(-np.abs(eigenvalues))]
    # Power iteration converges at rate |λ₂/λ₁|; the test needs a real gap.
    assert abs(by_magnitude[1]) < 0.9 * abs(by_magnitude[0])
    # The Rayleigh quotient's error is the squared residual (stopped at 1e-6) over
    # the gap, plus float32 rounding of the Hessian-vector products: ~1e-7 here.
    np.testing.assert_allclose(top, by_magnitude[0], rtol=1e-5)


def test_hessian_max_eigenvalue_keeps_the_sign_of_a_dominant_negative():
    loss = lambda p, c: 0.5 * jnp.sum(c * p["w"] ** 2)  # noqa: E731
    curvature = jnp.array([1.0, -4.0, 2.0])
    top = jax.jit(mr.hessian_max_eigenvalue, static_argnums=0)(
        loss, {"w": jnp.ones(3)}, curvature, key=1
    )
    np.testing.assert_allclose(top, -4.0, rtol=1e-4)


def test_hessian_max_eigenvalue_of_a_zero_hessian_is_zero():
    loss = lambda p, c: jnp.sum(c * p["w"])  # noqa: E731
    top = mr.hessian_max_eigenvalue(loss, {"w": jnp.ones(3)}, jnp.ones(3), key=0)
    assert float(top) == 0.0


# ----------------------------------------------------------------------------------
# Generalization gap at a threshold.

_generalization_gap = jax.jit(mr.generalization_gap)


def test_generalization_gap_matches_definition(rng):
    for _ in range(10):
        test = rng.uniform(0.5, 0.9, size=12)
        train = test + rng.uniform(0.0, 0.2, size=12)
        threshold = float(rng.uniform(0.5, 0.85))
        gaps = [a - b for a, b in zip(train, test, strict=True) if b > threshold]
        got = _generalization_gap(train, test, threshold)
        np.testing.assert_allclose(got, min(gaps), rtol=1e-5, atol=1e-6)


def test_generalization_gap_is_strict_and_nan_when_never_exceeded():
    train = np.array([0.95, 0.99], np.float32)
    test = np.array([0.80, 0.85], np.float32)
    # 0.85 equals the threshold: "exceeds" excludes it, so the gap is undefined.
    assert np.isnan(_generalization_gap(train, test, test[1]))
    np.testing.assert_allclose(_generalization_gap(train, test, 0.84), 0.14, 1e-6)
    with pytest.raises(ValueError, match="same length"):
        mr.generalization_gap([0.9, 0.9], [0.8], 0.5)
