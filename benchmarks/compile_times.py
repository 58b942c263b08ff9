"""Seconds to compile ``jax.grad`` of the power-iteration penalties against ``p``.

    python benchmarks/compile_times.py                 # p = 1, 9, 30
    python benchmarks/compile_times.py --p 1 9 30 100

On 8 conv kernels ``(3, 3, 16, 16)``: the seed Eigenvalue Decay penalty
differentiates through its ``p`` iterations and the spectral penalty runs ``p``
before its fixed-vector term. Iterations are a ``fori_loop``, so the compile time
should not grow with ``p`` (issue 21: 7.4x at p = 9 and 184x at p = 30 when they
were a Python loop).
"""

from __future__ import annotations

import argparse
import time

import jax

import margin_regs as mr

KERNELS = {
    f"conv{i}": {"kernel": jax.random.normal(jax.random.key(i), (3, 3, 16, 16))}
    for i in range(8)
}


def compile_seconds(penalty, p: int) -> float:
    fn = jax.jit(jax.grad(lambda params: penalty(params, p)))
    start = time.perf_counter()
    fn.lower(KERNELS).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", nargs="+", type=int, default=[1, 9, 30])
    args = parser.parse_args()
    vectors = mr.init_power_iteration(KERNELS, 0)
    penalties = {
        "eigenvalue_decay_penalty": lambda params, p: mr.eigenvalue_decay_penalty(
            params, n_power_iterations=p
        ),
        "spectral_norm_penalty": lambda params, p: mr.spectral_norm_penalty(
            params, vectors, n_power_iterations=p
        )[0],
    }
    for name, penalty in penalties.items():
        for p in args.p:
            print(f"{name:26s} p={p:3d}  {compile_seconds(penalty, p):7.1f} s")


if __name__ == "__main__":
    main()
