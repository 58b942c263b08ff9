"""The Deep Learning ch. 7 baselines' recipes, trained end to end by the harness.

Split from tests/test_baselines.py, which tests the core functions and must not
import the harness.
"""

import contextlib
import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import margin_regs as mr
from margin_regs.experiments import bagging, cli, models, recipes
from margin_regs.experiments import grid as grid_module
from margin_regs.experiments import training as ex
from margin_regs.experiments.data import load_digits, prepare
from margin_regs.experiments.grid import train_grid

# ---------------------------------------------------------------- recipes end to end
# The setting of tests/test_training.py, so that in one pytest process the cached
# vanilla Trainer and the Evaluator compile once for both modules. max_norm and
# early_stopping are tested there, every recipe's run through `compare` in test_cli.

RECIPE_CONFIG = ex.TrainConfig(
    epochs=4, batch_size=16, learning_rate=0.05, margin_samples=64
)


@pytest.fixture(scope="module")
def tiny():
    return prepare(load_digits(), train_size=64, seed=0)


@pytest.fixture(scope="module")
def vanilla_run(tiny):
    return ex.run("vanilla", tiny, seed=0, config=RECIPE_CONFIG)


@pytest.mark.parametrize(
    "name", ["weight_noise", "input_noise", "label_smoothing", "dropout"]
)
def test_recipe_runs_with_its_default_and_changes_training(tiny, vanilla_run, name):
    """Same seed, same batches and init: only the recipe differs from vanilla."""
    recipe = ex.RECIPES[name]
    assert recipe.coeff is not None and "Goodfellow" in recipe.reference
    result = ex.run(name, tiny, seed=0, config=RECIPE_CONFIG)
    assert result.coeff == recipe.coeff
    assert np.all(np.isfinite(result.history["objective"]))
    assert 0.0 <= result.final["test_acc"] <= 1.0
    assert result.history["objective"] != vanilla_run.history["objective"]


def test_l1_recipe_shrinks_the_kernels_l1_norm(tiny, vanilla_run):
    # Kernel entries start at |w| ≈ 0.1 (fan_in 64); each of the 16 steps pushes
    # them ≈ lr·λ = 1e-3 towards 0 (more with momentum): several percent in all.
    sparse = ex.run("l1", tiny, seed=0, config=RECIPE_CONFIG, coeff=0.02)
    assert np.all(np.isfinite(sparse.history["objective"]))
    assert mr.l1_penalty(sparse.params) < 0.97 * mr.l1_penalty(vanilla_run.params)


# ---------------------------------------------- Deep Learning ch. 7, complete (issue 24)
CH7_CONFIG = ex.TrainConfig(epochs=1, batch_size=16)


@pytest.fixture(scope="module")
def ch7_splits():
    return [prepare(load_digits(), train_size=48, seed=s) for s in (0, 1)]


def test_tangent_prop_recipe_is_its_coefficient_times_the_dense_penalty(tiny):
    model = models.make_model("mlp", 10)
    params = model.init(jax.random.key(0), tiny.x_train[:1])["params"]
    x = jnp.asarray(tiny.x_train[:6])

    def apply(p, inputs):
        return model.apply({"params": p}, inputs)

    ctx = recipes.StepContext(params, x, None, None, apply, 10, None)
    tangents = mr.image_tangents(x)  # (6, 4, 8, 8, 1)
    jacobians = jax.vmap(jax.jacrev(lambda xi: apply(params, xi[None])[0]))(x)
    rows = np.asarray(tangents).reshape(6, 4, -1)
    dense = np.sum(
        np.einsum("nkd,ncd->nkc", rows, np.asarray(jacobians).reshape(6, 10, -1)) ** 2
    )
    value = recipes.RECIPES["tangent_prop"].penalty(ctx, 0.5)
    np.testing.assert_allclose(value, 0.5 * dense / 6, rtol=1e-4)


def test_shift_and_rotate_moves_and_turns_the_content(rng):
    x = rng.uniform(size=(2, 6, 6, 2)).astype(np.float32)
    moved = recipes.shift_and_rotate(
        x, jnp.array([[1.0, -2.0], [0.0, 0.0]]), jnp.zeros(2)
    )
    want = np.zeros_like(x[0])
    want[1:, :-2] = x[0, :-1, 2:]  # content one row down, two columns left, zero fill
    np.testing.assert_allclose(moved[0], want, atol=1e-6)
    np.testing.assert_allclose(moved[1], x[1], atol=1e-6)
    # np.rot90 turns counter-clockwise as displayed, as dm_pix.rotate does; edge
    # pixels too (their samples fall a rounding error outside the image).
    turned = recipes.shift_and_rotate(x, jnp.zeros((2, 2)), jnp.full(2, np.pi / 2))
    np.testing.assert_allclose(turned, np.rot90(x, axes=(1, 2)), atol=1e-5)


def test_shift_and_rotate_matches_scipy_with_zero_fill_at_the_edges(rng):
    x = rng.uniform(size=(3, 7, 8, 2))
    shifts, angles = rng.uniform(-2, 2, size=(3, 2)), rng.uniform(-0.3, 0.3, size=3)
    ours = recipes.shift_and_rotate(jnp.asarray(x, jnp.float32), shifts, angles)
    i, j = np.indices((7, 8)) - np.array([3.0, 3.5])[:, None, None]
    for n in range(3):
        c, s = np.cos(angles[n]), np.sin(angles[n])
        source = np.stack([3 + c * i + s * j, 3.5 - s * i + c * j])
        source -= shifts[n][:, None, None]
        for ch in range(2):
            want = ndimage.map_coordinates(
                x[n, ..., ch], source, order=1, mode="grid-constant"
            )
            np.testing.assert_allclose(ours[n, ..., ch], want, atol=1e-5)


def test_augmentation_is_tangent_prop_made_finite(rng):
    """§7.14: the tangents are the augmentation's derivatives at zero (zero border)."""
    x = np.pad(rng.uniform(size=(1, 6, 6, 1)), ((0, 0), (2, 2), (2, 2), (0, 0)))
    x = jnp.asarray(x, jnp.float32)
    tangents = mr.image_tangents(x, transforms=("translate_x", "translate_y", "rotate"))
    h = 1e-3
    for k, (shift, angle) in enumerate([((0, h), 0.0), ((h, 0), 0.0), ((0, 0), h)]):
        s, a = jnp.array([shift], jnp.float32), jnp.array([angle], jnp.float32)
        fd = (
            recipes.shift_and_rotate(x, s, a) - recipes.shift_and_rotate(x, -s, -a)
        ) / (2 * h)
        np.testing.assert_allclose(tangents[:, k], fd, atol=5e-3)


def test_augmentation_draws_within_its_range_and_none_at_zero():
    x = jnp.zeros((64, 9, 9, 1)).at[:, 4, 4].set(1.0)  # one pixel at the centre
    out = np.asarray(recipes.augment_images(x, jax.random.key(1), 2.0))[..., 0]
    rows, cols = np.indices((9, 9))
    mass = out.sum((1, 2))
    centre_row = (out * rows).sum((1, 2)) / mass - 4
    centre_col = (out * cols).sum((1, 2)) / mass - 4
    # The centre pixel's centroid moves by the shift (≤ 2 pixels per axis), up to
    # the bilinear sampling of a rotated grid (a few hundredths of a pixel).
    assert np.abs(centre_row).max() <= 2.25 and np.abs(centre_col).max() <= 2.25
    assert np.abs(centre_row).max() > 1 and np.std(centre_col) > 0.5
    np.testing.assert_array_equal(recipes.augment_images(x, jax.random.key(1), 0.0), x)


def test_tie_to_init_adds_the_tying_gradient_to_the_kernels(rng):
    start = {"Dense_0": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=2)}}
    now = jax.tree.map(lambda a: a + rng.normal(size=a.shape), start)
    grads = jax.tree.map(lambda a: rng.normal(size=a.shape), start)
    tx = recipes.tie_to_init(0.3)
    state = tx.init(jax.tree.map(jnp.asarray, start))
    updates, _ = tx.update(grads, state, now)
    kernel = now["Dense_0"]["kernel"] - start["Dense_0"]["kernel"]
    np.testing.assert_allclose(
        updates["Dense_0"]["kernel"],
        grads["Dense_0"]["kernel"] + 0.6 * kernel,
        rtol=1e-5,
    )
    np.testing.assert_allclose(updates["Dense_0"]["bias"], grads["Dense_0"]["bias"])
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state)


def test_bootstrap_training_sets_are_resamples_with_replacement(rng):
    n, members, seeds = 300, 6, [0, 7]
    x = rng.permutation(2 * n).reshape(2, n, 1).astype(np.float32)  # unique rows
    y = (x[..., 0] % 10).astype(np.int32)
    bx, by = bagging.bootstrap_training_sets(
        jnp.asarray(x), jnp.asarray(y), seeds, members
    )
    assert bx.shape == (members, 2, n, 1) and by.shape == (members, 2, n)
    distinct = []
    for m in range(members):
        for s in range(2):
            # Recover each drawn row's index in the seed's own training set.
            where = {v: i for i, v in enumerate(x[s, :, 0])}
            idx = np.array([where[v] for v in np.asarray(bx[m, s, :, 0])])
            np.testing.assert_array_equal(by[m, s], y[s][idx])
            distinct.append(len(np.unique(idx)) / n)
    # A bootstrap sample holds 1 − (1 − 1/n)ⁿ ≈ 63.3% of the samples.
    assert abs(np.mean(distinct) - (1 - (1 - 1 / n) ** n)) < 0.02
    assert len(set(distinct)) > 1  # members and seeds resample differently
    again = bagging.bootstrap_training_sets(
        jnp.asarray(x), jnp.asarray(y), seeds, members
    )
    np.testing.assert_array_equal(again[0], bx)


@pytest.fixture(scope="module")
def bagged(ch7_splits):
    return train_grid("bagging", ex.RECIPES["bagging"], [3], ch7_splits, CH7_CONFIG)


def test_bagging_row_is_the_averaged_probability_ensemble(bagged, ch7_splits):
    model = models.make_model("mlp", 10)
    results = bagged.run_results(0, ch7_splits, CH7_CONFIG)
    for s, ds in enumerate(ch7_splits):
        probs, members = 0.0, []
        for m in range(3):
            p = jax.tree.map(lambda a, m=m, s=s: a[m, s], bagged.members[0].params)
            logits = np.asarray(model.apply({"params": p}, ds.x_test), np.float64)
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs = probs + e / e.sum(1, keepdims=True) / 3
            members.append(np.mean(logits.argmax(1) == ds.y_test))
        accuracy = np.mean(probs.argmax(1) == ds.y_test)
        assert bagged.test_acc[0, s] == pytest.approx(accuracy)
        assert results[s].final["test_acc"] == pytest.approx(accuracy)
        np.testing.assert_allclose(results[s].final["member_test_acc"], members)
        loss = -np.mean(np.log(probs[np.arange(len(probs)), ds.y_test]))
        assert results[s].final["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_a_single_run_refuses_bagging(ch7_splits):
    with pytest.raises(ValueError, match="ensemble of runs"):
        ex.run("bagging", ch7_splits[0], config=CH7_CONFIG)


def test_each_bagging_member_is_a_run_on_its_resample(bagged, ch7_splits):
    data = grid_module.stack_splits(ch7_splits)
    bx, by = bagging.bootstrap_training_sets(data.x_train, data.y_train, [0, 1], 3)
    m, s = 2, 1
    resampled = dataclasses.replace(
        ch7_splits[s], x_train=np.asarray(bx[m, s]), y_train=np.asarray(by[m, s])
    )
    alone = ex.run("vanilla", resampled, seed=s, config=CH7_CONFIG)
    member = jax.tree.map(lambda a: a[m, s], bagged.members[0].params)
    for a, b in zip(
        jax.tree.leaves(member), jax.tree.leaves(alone.params), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_chapter_7_regularizers_through_compare(tmp_path):
    argv = ["compare", "--train-size", "48", "--epochs", "1", "--batch-size", "16"]
    argv += ["--seeds", "2", "--no-progress", "--out", str(tmp_path)]
    argv += ["--regularizers", "vanilla,tangent_prop,augmentation,bagging,l2_init"]
    for value in ("tangent_prop=0.1", "augmentation=2", "bagging=3", "l2_init=0.01"):
        argv += ["--coeff", value]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert cli.main(argv) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    for name in ("tangent_prop", "augmentation", "bagging", "l2_init"):
        assert name in stdout.getvalue() and "diff" in payload["summary"][name]
    runs = {(r["regularizer"], r["seed"]): r for r in payload["runs"]}
    for s in (0, 1):
        bag = runs["bagging", s]["final"]
        assert len(bag["member_test_acc"]) == 3
        assert bag["test_acc"] == payload["regularizers"]["bagging"]["test_acc"][0][s]
        # Same init and batches: the penalty raises the objective, augmentation moves it.
        vanilla = runs["vanilla", s]["history"]["objective"][0]
        assert runs["tangent_prop", s]["history"]["objective"][0] > vanilla + 0.05
        assert runs["augmentation", s]["history"]["objective"][0] != vanilla


@pytest.mark.parametrize("dataset", ["mnist1d", "flat.npz"])
def test_image_recipes_refuse_data_that_are_not_images(tmp_path, capsys, dataset):
    if dataset.endswith(".npz"):
        dataset = str(tmp_path / dataset)
        np.savez(dataset, x=np.zeros((40, 6)), y=np.arange(40) % 2)
    for name in ("tangent_prop", "augmentation"):
        argv = ["compare", "--dataset", dataset, "--train-size", "16"]
        argv += ["--regularizers", f"vanilla,{name}"]
        with pytest.raises(SystemExit) as info:
            cli.main([*argv, "--out", str(tmp_path / "out")])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and dataset in err
