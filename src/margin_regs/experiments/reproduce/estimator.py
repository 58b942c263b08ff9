"""How good Table I's one-class LM estimator is: its gradient against the exact one.

Sokolić et al.'s CNN experiments sum the LM penalty over all ``C`` classes (``C``
double backprops a step). ``margin-regs reproduce`` trains with ``C`` times the
penalty of one random class per sample, whose expectation is the sum: one double
backprop. :func:`lm_gradient_variance` measures what that costs in gradient noise,
on one minibatch of the protocol's data, at the initial params.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import margin_regs as mr
from margin_regs.experiments import models

__all__ = ["lm_gradient_variance"]


def _timed(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def lm_gradient_variance(
    model_name: str, x: np.ndarray, *, draws: int = 64, seed: int = 0
) -> dict[str, float]:
    """Relative variance and bias of the one-class LM estimator's gradient.

    ``variance = mean_k ‖g_k − g‖² / ‖g‖²`` and ``bias = ‖mean_k g_k − g‖ / ‖g‖``,
    with ``g`` the gradient (w.r.t. every param) of the exact all-class penalty and
    ``g_k`` that of ``C`` × the penalty of one random class per sample (draw ``k``).

    Args:
      model_name: a model of :data:`margin_regs.experiments.models.MODELS`.
      x: one minibatch of inputs.
      draws: estimator draws.
      seed: initialization and draws.

    Returns:
      ``{"variance", "bias", "draws", "batch", "seconds_exact", "seconds_estimator"}``
      (seconds: one jitted gradient of each).
    """
    model = models.make_model(model_name, 10)
    x = jnp.asarray(x)
    params = model.init(jax.random.key(seed), x[:1])["params"]

    def penalty(p, classes, key=None):
        return mr.jacobian_margin_penalty(
            lambda b: model.apply({"params": p}, b),
            x,
            classes=classes,
            key=key,
            classifier=models.classifier_kernel(p),
        )

    exact = jax.jit(jax.grad(lambda p: penalty(p, "all")))
    one = jax.jit(jax.grad(lambda p, k: 10 * penalty(p, "random", k)))
    g = exact(params)
    keys = jax.random.split(jax.random.key(seed + 1), draws)
    flat = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(g)])
    samples = jnp.stack(
        [
            jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(one(params, k))])
            for k in keys
        ]
    )
    norm2 = float(jnp.sum(flat**2))
    return {
        "variance": float(jnp.mean(jnp.sum((samples - flat) ** 2, axis=1)) / norm2),
        "bias": float(jnp.linalg.norm(samples.mean(0) - flat) / np.sqrt(norm2)),
        "draws": draws,
        "batch": int(x.shape[0]),
        "seconds_exact": _timed(exact, params),
        "seconds_estimator": _timed(one, params, keys[0]),
    }
