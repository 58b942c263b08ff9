"""A two-layer tanh MLP on plain dicts, shared by the checkpoint and compile tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def init_params(key, sizes=(5, 7, 3), dtype=jnp.float32):
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense{i}": {
            "kernel": (jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(dtype),
            "bias": jnp.full((b,), 0.01, dtype),
        }
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def logits_fn(params, x):
    h = jnp.tanh(x @ params["dense0"]["kernel"] + params["dense0"]["bias"])
    return h @ params["dense1"]["kernel"] + params["dense1"]["bias"]


def loss_fn(params, x, y):
    z = logits_fn(params, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
