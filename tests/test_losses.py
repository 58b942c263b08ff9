"""Margin losses against per-sample, per-class loops in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import margin_regs as mr


def one_vs_all_reference(logits, labels):
    logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    labels = np.asarray(labels).reshape(-1)
    out = np.zeros(len(labels))
    for i, (z, y) in enumerate(zip(logits, labels, strict=True)):
        for c, zc in enumerate(z):
            t = 1.0 if c == y else -1.0
            out[i] += max(0.0, 1.0 - t * zc) / len(z)
    return out


@pytest.fixture(scope="module")
def logits():
    return 2.0 * jax.random.normal(jax.random.key(0), (16, 5))


@pytest.fixture(scope="module")
def labels():
    return jax.random.randint(jax.random.key(1), (16,), 0, 5)


def test_one_vs_all_hinge_matches_per_class_loop(logits, labels):
    got = mr.one_vs_all_hinge_loss(logits, labels)
    assert got.shape == (16,)
    np.testing.assert_allclose(got, one_vs_all_reference(logits, labels), rtol=1e-6)


def test_one_vs_all_hinge_keeps_leading_axes(logits, labels):
    got = mr.one_vs_all_hinge_loss(logits.reshape(4, 4, 5), labels.reshape(4, 4))
    want = one_vs_all_reference(logits, labels).reshape(4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_one_vs_all_hinge_is_zero_beyond_the_margin():
    logits = jnp.array([[1.0, -1.0, -3.0], [-2.0, -1.0, 4.0]])
    np.testing.assert_array_equal(
        mr.one_vs_all_hinge_loss(logits, jnp.array([0, 2])), [0.0, 0.0]
    )


def test_one_vs_all_hinge_out_of_range_label_under_jit_is_nan(logits, labels):
    for bad in (5, -1):
        got = jax.jit(mr.one_vs_all_hinge_loss)(logits, labels.at[0].set(bad))
        assert np.isnan(got[0]) and np.all(np.isfinite(got[1:]))


def test_one_vs_all_hinge_rejects_bad_labels(logits, labels):
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        mr.one_vs_all_hinge_loss(logits, labels.at[0].set(5))
    with pytest.raises(ValueError, match="integer"):
        mr.one_vs_all_hinge_loss(logits, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match="agree"):
        mr.one_vs_all_hinge_loss(logits, labels[:3])


def test_optax_multiclass_hinge_is_crammer_singer(logits, labels):
    """The identity losses.py relies on to reuse optax for Sokolić's hinge loss."""
    z = np.asarray(logits, np.float64)
    z[0, :2] = z[0, 2]  # ties with the true class must not matter
    want = [
        max(0.0, 1.0 + max(np.delete(zi, y)) - zi[y])
        for zi, y in zip(z, np.asarray(labels), strict=True)
    ]
    got = optax.losses.multiclass_hinge_loss(jnp.asarray(z, jnp.float32), labels)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
