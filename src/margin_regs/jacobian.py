"""Input-space penalties: Jacobian large-margin, Jacobian Frobenius, input gradients,
adversarial training."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["per_sample_input_gradients"]


def per_sample_input_gradients(
    fn: Callable[[jax.Array], jax.Array], x: jax.Array
) -> jax.Array:
    """``∇ₓ fn(x)ᵢ`` at every sample ``xᵢ``, from one batched VJP.

    ``fn`` maps a batch ``(n, ...)`` to per-sample scalars ``(n,)``. When samples do
    not interact (no BatchNorm in training mode, no cross-sample attention),
    ``∂ fn(x)ᵢ / ∂ xⱼ = 0`` for ``i ≠ j``, so the gradient of ``Σᵢ fn(x)ᵢ`` w.r.t.
    the batch holds every per-sample gradient at once: one backward pass instead of
    ``n``. Differentiable again (double backprop).

    Args:
      fn: batched per-sample scalar function, ``(n, ...) -> (n,)``.
      x: the batch, ``(n, ...)``.

    Returns:
      ``(n, ...)``, the per-sample input gradients.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_regs.jacobian import per_sample_input_gradients
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> per_sample_input_gradients(lambda b: jnp.sum(b**2, axis=1), x).tolist()
      [[2.0, 4.0], [6.0, 8.0]]
    """
    values, vjp = jax.vjp(fn, x)
    if values.shape != x.shape[:1]:
        raise ValueError(
            f"fn must return one scalar per sample, shape {x.shape[:1]}, "
            f"got {values.shape}"
        )
    return vjp(jnp.ones_like(values))[0]
