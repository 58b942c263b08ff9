"""Tangent propagation (Deep Learning book §7.14): the model's directional derivative
along known directions of invariance, and those directions for images.

:func:`tangent_prop_penalty` gets ``J(xᵢ) tᵢₖ`` for every sample from one batched
forward-mode JVP per direction ``k`` (samples must not interact, as for the other
input-space penalties in :mod:`margin_regs._jacobian`); :func:`image_tangents` gives
the directions of the infinitesimal translations, rotation and scaling of images.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from margin_regs._jacobian import LogitsFn, _check_input, _n_classes

__all__ = ["IMAGE_TRANSFORMS", "image_tangents", "tangent_prop_penalty"]

IMAGE_TRANSFORMS = ("translate_x", "translate_y", "rotate", "scale")


def _as_directions(x: jax.Array, tangents: jax.Array) -> jax.Array:
    """``tangents`` as ``(n, k, ...)``, or a ValueError naming both shapes."""
    tangents = jnp.asarray(tangents)
    if tangents.shape == x.shape:
        return tangents[:, None]
    if (
        tangents.ndim == x.ndim + 1
        and tangents.shape[:1] == x.shape[:1]
        and tangents.shape[2:] == x.shape[1:]
    ):
        return tangents
    raise ValueError(
        f"tangents of shape {tangents.shape} do not match x of shape {x.shape}: give "
        f"one tangent per sample {x.shape} or k of them (n, k, ...) = "
        f"({x.shape[0]}, k, {', '.join(map(str, x.shape[1:]))})"
    )


def tangent_prop_penalty(
    logits_fn: LogitsFn, x: jax.Array, tangents: jax.Array
) -> jax.Array:
    """Tangent propagation: the squared directional derivatives of the logits along
    each sample's tangent vectors.

    ``(1/n) Σᵢ Σₖ ‖J(xᵢ) tᵢₖ‖₂²``, ``J(xᵢ) = ∂ logits_fn(x)ᵢ / ∂xᵢ``, from one batched
    ``jax.jvp`` per direction ``k`` (one forward pass, ``k`` tangent passes);
    differentiable w.r.t. the parameters ``logits_fn`` closes over.

    Args:
      logits_fn: the model, ``(n, ...) -> (n, n_classes)``; samples must not interact.
      x: the input batch ``(n, ...)``, floating point.
      tangents: ``(n, k, ...)``, or ``(n, ...)`` for one tangent per sample (e.g.
        :func:`image_tangents`).

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> w = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> float(mr.tangent_prop_penalty(lambda b: b @ w, jnp.ones((2, 2)),
      ...                               jnp.array([[1.0, 1.0], [0.0, 1.0]])))
      4.5

    References:
      Simard, Victorri, LeCun & Denker, "Tangent Prop", NIPS 1992; Goodfellow,
      Bengio & Courville, "Deep Learning", 2016, §7.14.
    """
    x = _check_input(x)
    directions = _as_directions(x, tangents).astype(x.dtype)
    _n_classes(logits_fn, x)

    def directional(t: jax.Array) -> jax.Array:
        return jax.jvp(logits_fn, (x,), (t,))[1]

    derivatives = jax.vmap(directional, in_axes=1)(directions)
    return jnp.sum(jnp.square(derivatives)) / x.shape[0]


def image_tangents(
    images: jax.Array, *, transforms: Sequence[str] = IMAGE_TRANSFORMS
) -> jax.Array:
    """``d/dt`` of each image under each infinitesimal transformation, at ``t = 0``.

    Pixel ``(i, j)`` = (row, column), centre ``c = ((H−1)/2, (W−1)/2)``, ``u = p − c``;
    ``∂ᵢ, ∂ⱼ``: central differences, the image 0 outside (the limit of the symmetric
    finite difference of the bilinearly transformed image, zero fill):

    - ``translate_x``: ``d/dt I(i, j − t) = −∂ⱼI`` (content moves right, per pixel);
    - ``translate_y``: ``d/dt I(i − t, j) = −∂ᵢI`` (content moves down, per pixel);
    - ``rotate``: ``u_j ∂ᵢI − u_i ∂ⱼI``, counter-clockwise as displayed (rows grow
      downward), per radian: ``dm_pix.rotate``'s sign;
    - ``scale``: ``d/ds I(c + u / (1 + s)) = −(u_i ∂ᵢI + u_j ∂ⱼI)``, per unit scale.

    Args:
      images: ``(n, H, W, C)``, channels last, floating point.
      transforms: names from ``IMAGE_TRANSFORMS``, in the order wanted.

    Returns:
      ``(n, k, H, W, C)`` with ``k = len(transforms)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> ramp = jnp.arange(3.0)[None, None, :, None] * jnp.ones((1, 3, 1, 1))
      >>> mr.image_tangents(ramp, transforms=("translate_x",))[0, 0, 1, :, 0].tolist()
      [-0.5, -1.0, 0.5]

    References:
      Simard, Victorri, LeCun & Denker, "Tangent Prop", NIPS 1992.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            "images must be a floating-point batch (n, H, W, C), channels last, "
            f"got shape {images.shape} and dtype {images.dtype}"
        )
    unknown = [t for t in transforms if t not in IMAGE_TRANSFORMS]
    if unknown or not transforms:
        raise ValueError(
            f"transforms must be a non-empty sequence of {IMAGE_TRANSFORMS}, got "
            f"{tuple(transforms)!r}"
        )
    _, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    d_i = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2
    d_j = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2
    u_i = (jnp.arange(h, dtype=images.dtype) - (h - 1) / 2)[:, None, None]
    u_j = (jnp.arange(w, dtype=images.dtype) - (w - 1) / 2)[None, :, None]
    fields = {
        "translate_x": lambda: -d_j,
        "translate_y": lambda: -d_i,
        "rotate": lambda: u_j * d_i - u_i * d_j,
        "scale": lambda: -(u_i * d_i + u_j * d_j),
    }
    return jnp.stack([fields[t]() for t in transforms], axis=1)
