"""The benchmark harness: its statistics, its registry, and what XLA compiles.

Timing ratios are noisy on a shared machine, so the harness is tested on steps
whose cost ratio is known and large, with wide bounds; the claim that the
power-iteration transforms add no pass over the weights beyond their two matvecs
is tested on XLA's deterministic cost model instead.
"""

import jax
import jax.numpy as jnp
import pytest

from margin_regs.experiments import bench


def matmul_stepper(repeats):
    """``repeats`` dependent 192×192 matmuls per step: cost proportional to it."""

    @jax.jit
    def step(carry, x, y):
        for _ in range(repeats):
            carry = jnp.tanh(carry @ x)
        return carry

    return bench.Stepper(step, jnp.eye(192))


def test_measure_recovers_a_known_cost_ratio():
    x = jax.random.normal(jax.random.key(0), (192, 192)) / 14
    ratio, null, _, per_step, n, rounds = bench.measure(
        matmul_stepper(1),
        matmul_stepper(1),
        matmul_stepper(4),
        x,
        None,
        rounds=15,
        block_seconds=0.01,
        warmup=1,
    )
    assert 2.0 < ratio < 8.0
    assert 0.5 < null < 2.0
    assert per_step > 0 and n >= 1 and rounds == 15


def test_registry_selection_and_errors():
    assert bench.CASES["exact_svd_penalty"].by_default is False
    with pytest.raises(ValueError, match="already registered"):
        bench.register("spectral_norm_regularization")(lambda problem: None)
    with pytest.raises(ValueError, match="no benchmark case matches"):
        bench.run(cases=("no-such-case",), log=None)


@pytest.fixture(scope="module")
def mlp():
    problem = bench.make_problem("mlp")
    baseline = bench._bytes_accessed(bench.train_step(problem), problem.x, problem.y)
    return problem, baseline


@pytest.mark.parametrize("name", ["spectral_norm_regularization", "eigenvalue_decay"])
def test_transforms_read_each_kernel_twice_and_fuse_the_rank_one_term(mlp, name):
    """K v and Kᵀ u read each kernel once each; σ u vᵀ must fuse into the SGD
    update (materialising it would add a write and a read of every kernel)."""
    problem, baseline = mlp
    kernel_bytes = sum(
        k.size * k.dtype.itemsize
        for k in jax.tree.leaves(problem.params)
        if k.ndim >= 2
    )
    case = bench.CASES[name].build(problem)
    extra = bench._bytes_accessed(case, problem.x, problem.y) - baseline
    assert 1.9 * kernel_bytes < extra < 2.2 * kernel_bytes
