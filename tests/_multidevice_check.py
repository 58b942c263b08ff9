"""Train a few steps on an 8-device mesh and on one device; print how they compare.

Run by ``tests/test_multidevice.py`` in a subprocess, because the host-platform
device count is read once, when JAX initialises. Standalone::

    python tests/_multidevice_check.py spectral adareg

The recipe is JAX's own SPMD, nothing else: a ``Mesh`` with a ``data`` axis (the
batch is split over it) and a ``model`` axis (every kernel's fan-out and every bias
are split over it), ``NamedSharding`` on the inputs, ``jax.jit`` on the step, and
the optimizer state created by ``opt.init`` from the sharded params, so XLA
chooses the state's layout. Prints one JSON object: per case, the largest
differences to the single-device run, whether every replica of every state leaf
holds the same bits, and how many devices params and state live on.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import itertools
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _states import canonical
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import margin_regs as mr

N_STEPS = 4
# input, hidden, classes: non-square layers are well conditioned, which
# AdaReg's re-solve needs (it inverts KᵀΩK, squaring κ(K)).
SIZES = (16, 8, 4)
BATCH = 32


def init_params(seed):
    """A tanh MLP's params, as host (NumPy) arrays: placed by ``jax.device_put``."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES)):
        kernel = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        params[f"dense{i}"] = {
            "kernel": kernel.astype(np.float32),
            "bias": np.full((fan_out,), 0.01 * (i + 1), np.float32),
        }
    return params


_rng = np.random.default_rng(0)
PARAMS = init_params(1)
BATCHES = [
    (
        _rng.standard_normal((BATCH, SIZES[0])).astype(np.float32),
        _rng.integers(0, SIZES[-1], BATCH).astype(np.int32),
    )
    for _ in range(N_STEPS)
]


def logits_fn(params, x):
    *hidden, last = params.values()
    for layer in hidden:
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return x @ last["kernel"] + last["bias"]


def cross_entropy(params, x, y):
    logits = logits_fn(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def jacobian_loss(classes):
    def loss(params, x, y):
        penalty = mr.jacobian_margin_penalty(
            lambda b: logits_fn(params, b),
            x,
            classes=y if classes == "labels" else classes,
            key=jax.random.key(7),
            classifier=params[f"dense{len(SIZES) - 2}"]["kernel"],
        )
        return cross_entropy(params, x, y) + 0.1 * penalty

    return loss


def cases():
    """name -> (loss, optimizer); built lazily so a missing name fails one case."""
    sgd = optax.sgd(0.1, momentum=0.9)
    return {
        "spectral": lambda: (
            cross_entropy,
            optax.chain(mr.spectral_norm_regularization(0.05), sgd),
        ),
        "eigenvalue_decay": lambda: (
            cross_entropy,
            optax.chain(mr.eigenvalue_decay(0.05), sgd),
        ),
        "adareg": lambda: (
            cross_entropy,
            optax.chain(mr.adareg(1e-4, update_every=2), sgd),
        ),
        "jacobian_random": lambda: (jacobian_loss("random"), sgd),
    }


def make_step(loss, opt):
    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def train(step, opt, params, batches):
    # Eager init, as users (and flax.nnx.Optimizer) call it: on sharded params its
    # jitted pieces run sharded, and compile once for every transform that shares
    # them.
    opt_state = opt.init(params)
    for x, y in batches:
        params, opt_state = step(params, opt_state, x, y)
    return params, opt_state


def param_shardings(mesh, params):
    """Fan-out (last axis) of every kernel and every bias over ``model``."""
    spec = lambda p: P(*([None] * (p.ndim - 1)), "model")  # noqa: E731
    return jax.tree.map(lambda p: NamedSharding(mesh, spec(p)), params)


def max_difference(a, b):
    leaves_a, tree_a = jax.tree.flatten(canonical(a))
    leaves_b, tree_b = jax.tree.flatten(canonical(b))
    if tree_a != tree_b:
        raise AssertionError(f"structures differ: {tree_a} vs {tree_b}")
    worst = 0.0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if x.dtype != y.dtype or x.shape != y.shape:
            raise AssertionError(f"{x.dtype}{x.shape} vs {y.dtype}{y.shape}")
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(1.0, float(np.max(np.abs(y64), initial=0.0)))
        worst = max(worst, float(np.max(np.abs(x64 - y64), initial=0.0)) / scale)
    return worst


def replicas_identical(tree):
    """Every copy of every piece of every leaf, on every device, holds the same bits."""
    for leaf in jax.tree.leaves(tree):
        seen = {}
        for shard in leaf.addressable_shards:
            index = repr(shard.index)
            data = np.asarray(shard.data).tobytes()
            if seen.setdefault(index, data) != data:
                return False
    return True


def device_counts(tree):
    return sorted({len(leaf.sharding.device_set) for leaf in jax.tree.leaves(tree)})


def perturbed(params, seed):
    """params · (1 + 2⁻²³ ξ): a change of the order of float32 rounding."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: (p * (1 + 2.0**-23 * rng.standard_normal(p.shape))).astype(p.dtype),
        params,
    )


def run_case(build, mesh):
    start = time.perf_counter()
    loss, opt = build()
    # One jitted step: it compiles once for one device and once for the mesh.
    step = make_step(loss, opt)
    params, batches = PARAMS, BATCHES
    one = jax.devices()[0]
    single = train(step, opt, jax.device_put(params, one), jax.device_put(batches, one))
    # The null control: how far float32 rounding alone moves the single-device run.
    control = train(
        step,
        opt,
        jax.device_put(perturbed(params, 1), one),
        jax.device_put(batches, one),
    )

    data = NamedSharding(mesh, P("data"))
    sharded_params = jax.device_put(params, param_shardings(mesh, params))
    sharded = train(step, opt, sharded_params, jax.device_put(batches, data))
    return {
        "param_difference": max_difference(sharded[0], single[0]),
        "state_difference": max_difference(sharded[1], single[1]),
        "rounding_sensitivity": max(
            max_difference(control[0], single[0]), max_difference(control[1], single[1])
        ),
        "replicas_identical": replicas_identical(sharded),
        "param_devices": device_counts(sharded[0]),
        "state_devices": device_counts(sharded[1]),
        "param_shardings_kept": all(
            a.sharding.is_equivalent_to(b.sharding, a.ndim)
            for a, b in zip(
                jax.tree.leaves(sharded[0]),
                jax.tree.leaves(sharded_params),
                strict=True,
            )
        ),
        "state_leaves": len(jax.tree.leaves(sharded[1])),
        "params_finite": all(
            np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(sharded[0])
        ),
        "seconds": time.perf_counter() - start,
    }


def main(names):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    registry = cases()
    report = {"n_devices": jax.device_count()}
    for name in names or registry:
        try:
            report[name] = run_case(registry[name], mesh)
        except Exception:
            report[name] = {"error": traceback.format_exc()}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
