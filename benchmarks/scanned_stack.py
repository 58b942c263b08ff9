"""The spectral transform's step on a 12-layer scanned stack vs the 12 layers apart.

A stack ``(12, d, d)`` with ``MuonDimensionNumbers(1, 2)`` is 12 separate matrices
(per-layer σ, vector and rank-one term), iterated by one batched matvec; the same
12 layers as separate ``(d, d)`` leaves are iterated leaf by leaf. Both steps add ``coeff · σ u vᵀ`` to the gradient and apply SGD; the
printed figures are the median wall time per step over interleaved rounds, and
XLA's estimate of the bytes each step reads and writes.

    PYTHONPATH=src python benchmarks/scanned_stack.py [--width 256] [--rounds 30]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

import margin_regs as mr

LAYERS = 12


def make_step(params, weight_dimension_numbers):
    tx = optax.chain(
        mr.spectral_norm_regularization(
            0.01, weight_dimension_numbers=weight_dimension_numbers
        ),
        optax.sgd(0.1),
    )

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step, tx.init(params)


def bytes_accessed(step, *args) -> float:
    costs = step.lower(*args).compile().cost_analysis()
    costs = costs[0] if isinstance(costs, list) else costs
    return float(costs["bytes accessed"])


def seconds_per_step(step, params, state, grads, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        params, state = step(params, state, grads)
    jax.block_until_ready(params)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    stack = jax.random.normal(jax.random.key(0), (LAYERS, args.width, args.width))
    stack = stack / np.sqrt(args.width)
    cases = {
        "stacked": ({"stack": stack}, {"stack": MuonDimensionNumbers(1, 2)}),
        "unstacked": ({f"layer_{i}": stack[i] for i in range(LAYERS)}, None),
    }
    runs = {}
    for name, (params, wdn) in cases.items():
        step, state = make_step(params, wdn)
        grads = jax.tree.map(jnp.ones_like, params)
        step(params, state, grads)  # compile
        runs[name] = (step, params, state, grads)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(seconds_per_step(*run, n=args.steps))
    for name, (step, params, state, grads) in runs.items():
        print(
            f"{name:>9}: {1e3 * np.median(times[name]):.3f} ms/step, "
            f"{bytes_accessed(step, params, state, grads) / 1e6:.2f} MB accessed"
        )
    ratio = np.median(times["stacked"]) / np.median(times["unstacked"])
    print(f"stacked / unstacked: {ratio:.2f}")


if __name__ == "__main__":
    main()
