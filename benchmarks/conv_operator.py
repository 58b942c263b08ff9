"""The cost of regularizing convolutions as operators: the bench CNN, batch 128.

Spectral norm regularization on the bench CNN (``margin_regs.experiments.bench``,
two 5×5 convolutions of 32 channels on 28×28×1 inputs, batch 128), with each conv
kernel's layout a ``ConvOperator`` read by ``infer_weight_dimension_numbers(...,
conv="operator")``, against plain SGD; the reshaped-kernel transform alongside.
One power iteration of a ``ConvOperator`` is two convolutions of one sample (plus
the kernel VJP for the update), a small fraction of the batch-128 step.

Method (as ``margin_regs.experiments.bench``): the candidates run in blocks, in a
random order each round; the figure is the median over rounds of the paired time
ratio against SGD, with a separately compiled copy of SGD (the null control)
showing the noise floor of the machine, and XLA's cost-model bytes-accessed ratio.

Measured on the shared 2-core CPU (load average 12-13, so the paired ratios are
noisy; the update-alone figure, the fastest of 30 calls, is not), jax 0.10.2:

    operator  time 1.000x (IQR 0.16, null 1.014x)  XLA bytes 1.005x
              update alone 0.29 ms = 0.001 of a plain step (goal <= 1.05x)
    reshaped  time 0.980x (IQR 0.22, null 1.015x)  XLA bytes 1.001x
              update alone 0.07 ms

    python benchmarks/conv_operator.py             # ~2.5 minutes
    python benchmarks/conv_operator.py --rounds 5  # a noisy smoke run
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import margin_regs as mr
from margin_regs.experiments import bench


def _transforms(problem: bench.Problem) -> dict[str, optax.GradientTransformation]:
    layouts = mr.infer_weight_dimension_numbers(
        problem.apply, problem.params, problem.x[:1], conv="operator"
    )
    return {
        "operator": mr.spectral_norm_regularization(
            bench.COEFF, weight_dimension_numbers=layouts
        ),
        "reshaped": mr.spectral_norm_regularization(bench.COEFF),
    }


def _fastest(fn, *args, repeats: int = 30) -> float:
    """The fastest of ``repeats`` timed calls, in seconds: the least disturbed by
    other load on a shared machine."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def _update_alone(problem: bench.Problem, tx: optax.GradientTransformation) -> float:
    """Seconds of the regularizer's ``update`` alone (power iteration and term)."""
    params = problem.params
    grads = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p)[0])
    return _fastest(update, grads, tx.init(params), params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    problem = bench.make_problem("cnn")
    baseline, null = bench.train_step(problem), bench.train_step(problem)
    x, y = problem.x, problem.y
    base_bytes = bench.cost_model(baseline, x, y).bytes
    plain = min(bench._block(baseline, 1, x, y) for _ in range(10))
    for name, tx in _transforms(problem).items():
        case = bench.train_step(problem, tx=optax.chain(tx, problem.sgd()))
        timing = bench.measure(baseline, null, case, x, y, rounds=args.rounds)
        alone = _update_alone(problem, tx)
        print(
            f"{name:9s} time {timing.ratio:.3f}x (IQR {timing.spread:.3f}, null"
            f" {timing.null:.3f}x, {timing.rounds} rounds, SGD"
            f" {timing.baseline_seconds * 1e3:.1f} ms/step)  XLA bytes"
            f" {bench.cost_model(case, x, y).bytes / base_bytes:.3f}x  update alone"
            f" {alone * 1e3:.2f} ms = {alone / plain:.3f} of the fastest plain step"
        )


if __name__ == "__main__":
    main()
