"""The classic regularizers of Deep Learning ch. 7 that optax and flax lack.

What the stack already has is used as it is and not wrapped here: L2 / weight decay
is ``optax.add_decayed_weights`` (mask it to kernels, §7.1), label smoothing is
``optax.smooth_labels`` (§7.5), dropout is ``flax.nnx.Dropout`` /
``flax.linen.Dropout`` (§7.12). This module adds the rest:

- L1 penalty (§7.1): :func:`l1_penalty` and the transform :func:`add_l1_penalty`.
- max-norm constraint (§7.2): :func:`max_norm_constraint`, a projection that
  must be the last transform of the chain.
- weight noise (§7.5): :func:`perturb_weights`, applied to the weights of the
  forward pass inside the train step; input noise (§7.4): :func:`add_input_noise`.
- representation sparsity (§7.10): :func:`activation_l1_penalty`.

References:
  Goodfellow, Bengio & Courville, "Deep Learning", MIT Press 2016, ch. 7.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from margin_regs import _common, _layouts, _tree, linalg
from margin_regs._layouts import WeightDimensionNumbers

__all__ = [
    "L1PenaltyState",
    "activation_l1_penalty",
    "add_input_noise",
    "add_l1_penalty",
    "l1_penalty",
    "max_norm_constraint",
    "perturb_weights",
]


def _selected_mask(mask: _tree.Mask) -> Any:
    """The mask to hand to ``optax.masked``: kernels unless the user gave one."""
    return _tree.default_mask if mask is None else mask


def l1_penalty(params: Any, *, mask: _tree.Mask = None) -> jax.Array:
    """Sum of absolute values of the selected weights.

    ``Ω(w) = Σ_i |w_i|`` over the selected leaves (kernels by default, biases
    excluded as §7.1 advises). Written as ``Σ w · sign(w)`` so that its gradient is
    ``sign(w)`` everywhere, with the subgradient 0 at ``w = 0`` (``jnp.abs`` would
    give 1 there); multiply by the coefficient yourself, as with any loss term.

    Args:
      params: a pytree of arrays.
      mask: which leaves, as in ``optax.masked`` (default: the weight matrices,
        ``docs/guides/layouts.md``); L1 is defined for any leaf, biases too.

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"kernel": jnp.array([[1.0, -2.0], [0.0, 3.0]]),
      ...           "bias": jnp.array([5.0, 5.0])}
      >>> print(mr.l1_penalty(params))
      6.0

    References:
      Goodfellow, Bengio & Courville, "Deep Learning", 2016, §7.1.2.
    """
    full = _tree.resolve_mask(mask, params)
    terms = [
        jnp.sum(w.astype(jnp.float32) * jnp.sign(w).astype(jnp.float32))
        for m, w in zip(jax.tree.leaves(full), jax.tree.leaves(params), strict=True)
        if m
    ]
    return sum(terms, jnp.zeros((), jnp.float32))


class L1PenaltyState(NamedTuple):
    """State of :func:`add_l1_penalty`: the step count that a schedule reads."""

    count: jax.Array


def add_l1_penalty(
    coeff: optax.ScalarOrSchedule, *, mask: _tree.Mask = None
) -> optax.GradientTransformationExtraArgs:
    """Add the L1 penalty's gradient ``coeff · sign(w)`` to the updates.

    ``g ← g + coeff · sign(w)``: the (sub)gradient of ``coeff · Σ|w|``, 0 where
    ``w = 0``, the same as ``jax.grad`` of ``coeff ·`` :func:`l1_penalty`. Chain it
    before the optimizer, like ``optax.add_decayed_weights``.

    Args:
      coeff: ≥ 0, a float, array or optax schedule (checked when built; a bad
        traced value makes the update NaN); see ``docs/guides/layouts.md``.
      mask: which leaves, as in ``optax.masked``; see ``docs/guides/layouts.md``
        (under ``optax.inject_hyperparams``, a callable mask is a static arg).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jax
      >>> import margin_regs as mr
      >>> params = {"kernel": jnp.array([[1.0, -2.0], [0.0, 3.0]]),
      ...           "bias": jnp.array([5.0, 5.0])}
      >>> tx = mr.add_l1_penalty(0.1)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"])
      [[ 0.1 -0.1]
       [ 0.   0.1]]
      >>> print(updates["bias"])
      [0. 0.]

    References:
      Goodfellow, Bengio & Courville, "Deep Learning", 2016, §7.1.2.
    """
    _common.check_coeff(coeff, "coeff", "add_l1_penalty")

    def init_fn(params):
        del params
        return L1PenaltyState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise _common.needs_params("add_l1_penalty")
        c = _common.coeff_at(coeff, state.count)
        updates = jax.tree.map(
            lambda g, w: (g + c * jnp.sign(w)).astype(g.dtype), updates, params
        )
        return updates, L1PenaltyState(count=optax.safe_increment(state.count))

    return optax.masked(
        optax.GradientTransformationExtraArgs(init_fn, update_fn), _selected_mask(mask)
    )


def max_norm_constraint(
    max_norm: float | jax.Array,
    *,
    mask: _tree.Mask = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
) -> optax.GradientTransformationExtraArgs:
    """Replace the updates so that every unit's incoming weights have norm ≤ c.

    With ``W = as_matrix(params + updates)`` ``(fan_in, fan_out)`` (per batch slice),
    each column (the weights into one unit; a conv filter's ``kh·kw·in``) becomes::

        W[:, j] ← W[:, j] · c / max(‖W[:, j]‖, c)

    (``optax.projections.projection_l2_ball`` per column), and the update is
    ``projected − params``; columns inside the ball keep their update bit for bit.
    A constraint, not a penalty: put it **last** in the chain, after the optimizer
    (``optax.chain(optax.sgd(lr), mr.max_norm_constraint(3.0))``).

    Args:
      max_norm: the radius ``c > 0`` (Srivastava et al. use 3 to 4).
      mask: which leaves, as in ``optax.masked``; see ``docs/guides/layouts.md``.
      weight_dimension_numbers: each leaf's layout (columns: its output axes); see
        ``docs/guides/layouts.md``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import margin_regs as mr
      >>> params = {"kernel": jnp.array([[3.0, 0.1], [4.0, 0.2]])}
      >>> tx = mr.max_norm_constraint(1.0)
      >>> zero = jax.tree.map(jnp.zeros_like, params)
      >>> updates, _ = tx.update(zero, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)["kernel"]
      >>> [[round(float(w), 4) for w in row] for row in new]
      [[0.6, 0.1], [0.8, 0.2]]

    References:
      Goodfellow, Bengio & Courville, "Deep Learning", 2016, §7.2; Srivastava et
      al., "Dropout", JMLR 2014, §5.1.
    """
    _common.check_positive(max_norm, "max_norm", "max_norm_constraint")

    def init(params, layouts):
        del params
        _layouts.require_matrices(layouts, "max_norm_constraint")
        return optax.EmptyState()

    def project(op, u, w):
        c = jnp.asarray(max_norm, jnp.float32)
        w32 = op.view(w.astype(jnp.float32))
        new = w32 + op.view(u.astype(jnp.float32))
        norms = linalg.safe_norm(new, axis=-2)
        inside = (norms <= c)[..., None, :]
        # optax.projections.projection_l2_ball per column, with a norm that
        # neither overflows nor underflows.
        step = new * (c / jnp.maximum(norms, c))[..., None, :] - w32
        # The exact original update where no projection is needed, so the
        # constraint leaves inside columns as the optimizer made them.
        step = jnp.where(inside, op.view(u), step.astype(u.dtype))
        return op.unview(step)

    def update(updates, state, params, layouts):
        kernels, _, ops, treedef = _layouts.flatten_selected(params, layouts)
        grads = treedef.flatten_up_to(updates)
        new = [project(op, u, w) for op, u, w in zip(ops, grads, kernels, strict=True)]
        return treedef.unflatten(new), state

    return _layouts.masked_transform(
        "max_norm_constraint", init, update, weight_dimension_numbers, mask
    )


def perturb_weights(
    params: Any,
    key: jax.Array | int,
    stddev: float | jax.Array,
    *,
    mask: _tree.Mask = None,
) -> Any:
    """The params with Gaussian noise on the selected weights, for one forward pass.

    ``w̃ = w + σ ε``, ``ε ~ N(0, I)`` independently per entry and per call. Weight
    noise is a change of the forward pass, not of the update, so it is a function
    the train step applies, not an optax transform::

        loss = loss_fn(mr.perturb_weights(params, key, 0.01), batch)

    Differentiating through it gives the gradient at the perturbed weights applied
    to the clean ones (the perturbation is additive, ``∂w̃/∂w = I``), the scheme
    the book describes as a stochastic flatness penalty. Draw a fresh key each
    step; evaluate with the clean params.

    Args:
      params: a pytree of arrays.
      key: a ``jax.random`` key or an int seed.
      stddev: σ ≥ 0; 0 returns the params unchanged.
      mask: which leaves, as in ``optax.masked``; see ``docs/guides/layouts.md``.

    Returns:
      A pytree like ``params``, each leaf of its own dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}
      >>> noisy = mr.perturb_weights(params, 0, 0.1)
      >>> bool(jnp.any(noisy["kernel"] != 0)), bool(jnp.all(noisy["bias"] == 0))
      (True, True)

    References:
      Goodfellow, Bengio & Courville, "Deep Learning", 2016, §7.5.
      Graves, "Practical Variational Inference for Neural Networks", NeurIPS 2011.
    """
    _common.check_coeff(stddev, "stddev", "perturb_weights")
    full = _tree.resolve_mask(mask, params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(_common.as_key(key), len(leaves))
    noisy = [
        add_input_noise(w, k, stddev) if m else w
        for m, w, k in zip(jax.tree.leaves(full), leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def add_input_noise(
    x: jax.Array, key: jax.Array | int, stddev: float | jax.Array
) -> jax.Array:
    """``x`` plus isotropic Gaussian noise, a data augmentation for training.

    ``x̃ = x + σ ε``, ``ε ~ N(0, I)`` of ``x``'s shape, in ``x``'s dtype. Apply it
    to each training batch with a fresh key, never at evaluation.

    Args:
      x: an array of inputs, e.g. ``(batch, features)`` or ``(batch, h, w, c)``.
      key: a ``jax.random`` key or an int seed.
      stddev: σ ≥ 0; 0 returns ``x`` unchanged.

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> x = jnp.ones((1000, 4))
      >>> noisy = mr.add_input_noise(x, 0, 0.5)
      >>> print(f"{float(jnp.std(noisy - x)):.1f}")
      0.5

    References:
      Goodfellow, Bengio & Courville, "Deep Learning", 2016, §7.4.
    """
    _common.check_coeff(stddev, "stddev", "add_input_noise")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"add_input_noise needs a floating x, got dtype {x.dtype}")
    noise = jax.random.normal(_common.as_key(key), x.shape, jnp.float32)
    return (x + (stddev * noise).astype(x.dtype)).astype(x.dtype)


def activation_l1_penalty(activations: Any) -> jax.Array:
    """Mean over the batch of the L1 norm of the hidden representations.

    ``Ω(h) = (1/n) Σ_i Σ_l ‖h_l(x_i)‖₁`` for activations ``h_l`` of shape
    ``(n, ...)`` (batch first), summed over the leaves of a list, tuple or dict.
    Add ``α · Ω`` to the loss for a sparse representation.

    Args:
      activations: a pytree of arrays, each with the batch on axis 0.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: if a leaf is a scalar (it has no batch axis) or has an empty
        batch.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> h1 = jnp.array([[1.0, -1.0], [0.0, 2.0]])
      >>> h2 = jnp.array([[3.0], [-1.0]])
      >>> print(mr.activation_l1_penalty([h1, h2]))
      4.0

    References:
      Goodfellow, Bengio & Courville, "Deep Learning", 2016, §7.10.
    """

    def term(path, h):
        h = jnp.asarray(h)
        if h.ndim < 1 or h.shape[0] == 0:
            raise ValueError(
                f"activation_l1_penalty: {_tree.path_name(path)!r} has shape "
                f"{h.shape}, expected a non-empty batch on axis 0"
            )
        return jnp.sum(jnp.abs(h.astype(jnp.float32))) / h.shape[0]

    terms = jax.tree.leaves(jax.tree.map_with_path(term, activations))
    return sum(terms, jnp.zeros((), jnp.float32))
