"""Input-space penalties: Jacobian large-margin, Jacobian Frobenius, input gradients,
adversarial training.

Every function here takes a *batched* function of the input (``logits_fn: (n, ...) ->
(n, n_classes)`` or ``loss_fn: (x, y) -> (n,)``) and gets all per-sample input
gradients from one batched VJP: when samples do not interact, ``∂ f(x)ᵢ / ∂ xⱼ = 0``
for ``i ≠ j``, so one backward pass of ``Σᵢ wᵢᵀ f(x)ᵢ`` w.r.t. the batch returns every
``wᵢᵀ ∂f(x)ᵢ/∂xᵢ`` at once. That holds for MLPs, CNNs, dropout and BatchNorm in
inference mode; it does **not** hold for BatchNorm in training mode (batch statistics
couple the samples) or attention across the batch, where the results mix samples.

All penalties are differentiable w.r.t. parameters that ``logits_fn``/``loss_fn``
close over (double backprop), so they go straight into a Flax ``train_step``'s loss.

**The Jacobian margin penalty** (:func:`jacobian_margin_penalty`): ``J(xᵢ)`` is the
Jacobian of the last hidden layer, so ``‖v_cᵀ J(xᵢ)‖ = ‖∇ₓ z_c(xᵢ)‖`` (a bias does not
change ``∇ₓ z_c``); the paper's eq. (26) sums over the training set and its experiments
divide the coefficient by the batch size, which is this batch mean. ``method="vjp"``
takes one batched VJP of ``Σᵢ wᵢᵀ z(x)ᵢ`` with ``wᵢ = e_{cᵢ} / ‖v_{cᵢ}‖`` (``C`` of them
for ``"all"``), exact when samples are independent. ``method="jacrev"`` builds each
sample's Jacobian with ``jax.vmap(jax.jacrev(...))`` on batches of one, exact for any
per-sample model (a batch-coupled model becomes a different function) and about ``C``
times the work. Both agree to float32 precision, in value and in gradient. A zero
classifier column contributes 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from margin_regs import _common
from margin_regs.linalg import safe_norm

__all__ = [
    "adversarial_loss",
    "input_gradient_penalty",
    "jacobian_frobenius_penalty",
    "jacobian_margin_penalty",
    "per_sample_input_gradients",
]

LogitsFn = Callable[[jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


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
      >>> from margin_regs._jacobian import per_sample_input_gradients
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> per_sample_input_gradients(lambda b: jnp.sum(b**2, axis=1), x).tolist()
      [[2.0, 4.0], [6.0, 8.0]]
    """
    return _values_and_input_gradients(fn, x)[1]


def _values_and_input_gradients(
    fn: Callable[[jax.Array], jax.Array], x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(fn(x), per-sample ∇ₓ fn(x)ᵢ)`` from one forward and one backward pass."""
    values, vjp = jax.vjp(fn, x)
    if values.shape != x.shape[:1]:
        raise ValueError(
            f"fn must return one scalar per sample, shape {x.shape[:1]}, "
            f"got {values.shape}"
        )
    return values, vjp(jnp.ones_like(values))[0]


def _check_input(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            "x must be a floating-point batch (n, ...) to differentiate w.r.t. it, "
            f"got shape {x.shape} and dtype {x.dtype}"
        )
    return x


def _check_logits_shape(shape: tuple[int, ...], n: int) -> int:
    if len(shape) != 2 or shape[0] != n:
        raise ValueError(
            f"logits_fn must map a batch of {n} to logits (n, n_classes) = ({n}, C), "
            f"got shape {shape}"
        )
    return shape[1]


def _row_norms(rows: jax.Array) -> jax.Array:
    """‖·‖₂ over everything after the leading ``k`` (and sample) axes ``(k, n, ...)``."""
    return safe_norm(rows.reshape(*rows.shape[:2], -1), axis=-1)


def _class_weights(classifier: jax.Array | None, n_classes: int) -> jax.Array:
    """``1 / ‖v_c‖`` per class (0 for a zero column), or ones without a classifier."""
    if classifier is None:
        return jnp.ones((n_classes,), jnp.float32)
    classifier = jnp.asarray(classifier)
    if classifier.ndim != 2 or classifier.shape[1] != n_classes:
        raise ValueError(
            "classifier must be the last layer's kernel (fan_in, n_classes) with "
            f"n_classes={n_classes}, got shape {classifier.shape}"
        )
    norms = safe_norm(classifier, axis=0)
    positive = norms > 0
    return jnp.where(positive, 1.0 / jnp.where(positive, norms, 1.0), 0.0)


def _class_indices(
    classes: str | jax.Array, key: jax.Array | int | None, n: int, n_classes: int
) -> jax.Array | None:
    """The class per sample ``(n,)``, or None for ``"all"``."""
    if isinstance(classes, str):
        if classes == "all":
            return None
        if classes == "random":
            key = _common.as_key(key, 'classes="random"')
            return jax.random.randint(key, (n,), 0, n_classes)
        raise ValueError(
            f'classes must be "random", "all" or integer labels (n,), got {classes!r}'
        )
    labels = jnp.asarray(classes)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    _common.check_label_range(labels, n_classes)
    return labels


def _n_classes(logits_fn: LogitsFn, x: jax.Array) -> int:
    out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return _check_logits_shape(out.shape, x.shape[0])


def _batched_vjp_rows(logits_fn: LogitsFn, x: jax.Array, w: jax.Array) -> jax.Array:
    """``wₖᵢᵀ ∂z(x)ᵢ/∂xᵢ`` for ``k`` cotangents ``w (k, n, C)``, shape ``(k, n, ...)``.

    ``vmap`` over ``k`` leaves the forward pass unbatched (it does not depend on
    ``w``): one forward pass and ``k`` batched backward passes.
    """

    def weighted_logits(b: jax.Array, wk: jax.Array) -> jax.Array:
        z = logits_fn(b)
        return jnp.sum(z * wk.astype(z.dtype), axis=1)

    def rows(wk: jax.Array) -> jax.Array:
        return per_sample_input_gradients(lambda b: weighted_logits(b, wk), x)

    return jax.vmap(rows)(w)


def jacobian_margin_penalty(
    logits_fn: LogitsFn,
    x: jax.Array,
    *,
    classes: Literal["random", "all"] | jax.Array = "random",
    key: jax.Array | int | None = None,
    classifier: jax.Array | None = None,
    method: Literal["vjp", "jacrev"] = "vjp",
) -> jax.Array:
    """Sokolić et al.'s large-margin regularizer, eq. (26), as a batch mean.

    ``(1/n) Σᵢ Σ_{c ∈ Cᵢ} ‖∇ₓ z_c(xᵢ)‖₂ / ‖v_c‖₂``, with ``z = logits_fn(x)`` and
    ``v_c`` column ``c`` of the classifier kernel. ``Cᵢ``: one random class per
    sample (the paper's DNNs), all classes (its CNNs) or a given class (the label).

    **Cost.** One class per sample costs one extra backward pass and its double
    backprop (about 2× a plain step). ``classes="all"`` costs one per class,
    measured 7.8× a plain step at 10 classes and 81.7× at 100 (as does
    ``method="jacrev"``). With many classes use ``classes="random"``, an unbiased
    estimate of ``1/C`` times the all-class penalty (scale the coefficient by ``C``).

    Args:
      logits_fn: the model, ``(n, ...) -> (n, n_classes)``, samples independent.
      x: the input batch ``(n, ...)``, floating point.
      classes: ``"random"`` (needs ``key``; a fresh one every step), ``"all"``, or
        integer labels ``(n,)`` (out of range: ValueError, NaN under ``jit``).
      key: a jax.random key or an int seed, for ``classes="random"``.
      classifier: the last kernel ``(fan_in, n_classes)``; ``None``: ``‖v_c‖ = 1``.
      method: ``"vjp"`` (one batched VJP per class) or ``"jacrev"`` (per-sample
        Jacobians, exact for any per-sample model); see the module docstring.

    Returns:
      A scalar, the penalty to add (times a coefficient) to the loss.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import margin_regs as mr
      >>> w = jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
      >>> float(mr.jacobian_margin_penalty(lambda b: b @ w, jnp.ones((4, 3)),
      ...                                  classes="all", classifier=w))
      2.0

    References:
      Sokolić, Giryes, Sapiro & Rodrigues, "Robust Large Margin Deep Neural
      Networks", arXiv:1605.08254 (IEEE TSP 2017), eq. (26) and the appendix.
    """
    x = _check_input(x)
    n = x.shape[0]
    if method not in ("vjp", "jacrev"):
        raise ValueError(f'method must be "vjp" or "jacrev", got {method!r}')
    n_classes = _n_classes(logits_fn, x)
    weights = _class_weights(classifier, n_classes)
    chosen = _class_indices(classes, key, n, n_classes)

    if method == "jacrev":
        jacobians = jax.vmap(jax.jacrev(lambda xi: logits_fn(xi[None])[0]))(x)
        norms = _row_norms(jacobians) * weights
        if chosen is None:
            return jnp.mean(jnp.sum(norms, axis=1))
        picked = jax.nn.one_hot(chosen, n_classes, dtype=norms.dtype)
        per_sample = jnp.sum(norms * picked, axis=1)
    elif chosen is None:
        w = jnp.broadcast_to(jnp.diag(weights)[:, None, :], (n_classes, n, n_classes))
        return jnp.mean(jnp.sum(_row_norms(_batched_vjp_rows(logits_fn, x, w)), axis=0))
    else:
        w = jax.nn.one_hot(chosen, n_classes) * weights
        per_sample = _row_norms(_batched_vjp_rows(logits_fn, x, w[None]))[0]
    # An out-of-range label (unchecked under jit) has a zero one-hot row: NaN, not 0.
    valid = _common.labels_in_range(chosen, n_classes)
    return jnp.mean(jnp.where(valid, per_sample, jnp.nan))


def jacobian_frobenius_penalty(
    logits_fn: LogitsFn,
    x: jax.Array,
    *,
    n_projections: int | None = 1,
    key: jax.Array | int | None = None,
) -> jax.Array:
    """Mean squared Frobenius norm of the input-output Jacobian, exact or estimated.

    ``(1/n) Σᵢ ‖J(xᵢ)‖_F²``, ``J(xᵢ) = ∂z(xᵢ)/∂xᵢ`` of shape ``(n_classes, d)``.
    With ``n_projections = k``, each sample gets ``k`` independent ``vᵢₖ`` drawn
    uniformly on the unit sphere in the output space (not Gaussian: the sphere has
    lower variance) and ``‖J‖_F² = C · E ‖vᵀ J‖₂²`` gives the unbiased estimate
    ``(C/k) Σₖ ‖vᵢₖᵀ J(xᵢ)‖₂²``, which costs ``k`` batched VJPs. ``n_projections=None``
    computes it exactly from ``C`` batched VJPs (one per class).

    Args:
      logits_fn: the model, ``(n, ...) -> (n, n_classes)``; samples must not interact
        (see the module docstring).
      x: the input batch ``(n, ...)``, floating point.
      n_projections: a Python int ≥ 1, or None for the exact value.
      key: a jax.random key or an int seed; needed unless ``n_projections`` is None.

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> w = jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
      >>> float(mr.jacobian_frobenius_penalty(lambda b: b @ w, jnp.ones((4, 3)),
      ...                                     n_projections=None))
      5.0

    References:
      Hoffman, Roberts & Yaida, "Robust Learning with Jacobian Regularization", 2019,
      Algorithm 1; Goodfellow, Bengio & Courville, "Deep Learning", 2016, §7.14.
    """
    x = _check_input(x)
    n = x.shape[0]
    n_classes = _n_classes(logits_fn, x)
    if n_projections is None:
        w = jnp.broadcast_to(jnp.eye(n_classes)[:, None, :], (n_classes, n, n_classes))
        rows = _batched_vjp_rows(logits_fn, x, w)
        return jnp.mean(jnp.sum(rows.reshape(n_classes, n, -1) ** 2, axis=(0, 2)))
    _common.check_positive_int(
        n_projections, "n_projections", "jacobian_frobenius_penalty"
    )
    key = _common.as_key(
        key, "a random-projection estimate (n_projections is not None)"
    )
    v = jax.random.normal(key, (n_projections, n, n_classes))
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    rows = _batched_vjp_rows(logits_fn, x, v)
    squares = jnp.sum(rows.reshape(n_projections, n, -1) ** 2, axis=-1)
    return n_classes * jnp.mean(squares)


def input_gradient_penalty(loss_fn: LossFn, x: jax.Array, y: jax.Array) -> jax.Array:
    """Double backprop: the mean squared norm of each sample's loss gradient w.r.t.
    its input.

    ``(1/n) Σᵢ ‖∇ₓ L(xᵢ, yᵢ)‖₂²``, with the per-sample gradients from one batched VJP
    (samples must not interact, see the module docstring). ``loss_fn`` returns the
    *per-sample* losses ``(n,)`` (like ``optax.losses``), not their mean: a mean would
    scale every gradient by ``1/n``.

    Args:
      loss_fn: ``(x, y) -> (n,)``, per-sample losses; may close over parameters.
      x: the input batch ``(n, ...)``, floating point.
      y: the targets, passed through to ``loss_fn``.

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> loss = lambda x, y: jnp.sum((x - y) ** 2, axis=1)   # ∇ₓ = 2 (x - y)
      >>> float(mr.input_gradient_penalty(loss, jnp.ones((2, 3)), jnp.zeros((2, 3))))
      12.0

    References:
      Drucker & LeCun, "Improving Generalization Performance Using Double
      Backpropagation", 1992; Goodfellow, Bengio & Courville, "Deep Learning", 2016,
      §7.14.
    """
    x = _check_input(x)
    grads = per_sample_input_gradients(lambda b: loss_fn(b, y), x)
    return jnp.mean(jnp.sum(grads.reshape(x.shape[0], -1) ** 2, axis=1))


def adversarial_loss(
    loss_fn: LossFn,
    x: jax.Array,
    y: jax.Array,
    *,
    epsilon: float | jax.Array,
    alpha: float | jax.Array = 0.5,
) -> jax.Array:
    """The l2 fast-gradient adversarial training objective of Yoshida & Miyato, eq. (3).

    ``α · (1/n) Σᵢ L(xᵢ, yᵢ) + (1 − α) · (1/n) Σᵢ L(xᵢ + ηᵢ, yᵢ)``,
    ``ηᵢ = ε · gᵢ / ‖gᵢ‖₂``, ``gᵢ = ∇ₓ L(x, yᵢ)|ₓ₌ₓᵢ``

    The ``gᵢ`` come from one batched VJP (samples must not interact) and are held
    constant (``stop_gradient``), as in FGSM training: the parameter gradient is that
    of the loss at the fixed perturbed inputs, with no second-order term. A sample
    with ``gᵢ = 0`` is not perturbed (no NaN).

    Args:
      loss_fn: ``(x, y) -> (n,)``, per-sample losses; may close over parameters.
      x: the input batch ``(n, ...)``, floating point.
      y: the targets, passed through to ``loss_fn``.
      epsilon: ε ≥ 0, the l2 radius of the perturbation (per sample).
      alpha: α in [0, 1], the weight of the clean loss (the paper uses 0.5).

    Returns:
      A scalar, the objective (it already contains the clean loss).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> loss = lambda x, y: jnp.sum((x - y) ** 2, axis=1)
      >>> x, y = jnp.array([[3.0, 4.0]]), jnp.zeros((1, 2))   # ‖x - y‖ = 5
      >>> float(mr.adversarial_loss(loss, x, y, epsilon=1.0))   # (25 + 36) / 2
      30.5

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, eq. (3); Goodfellow, Shlens &
      Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
    """
    x = _check_input(x)
    _common.check_coeff(epsilon, "epsilon", "adversarial_loss")
    _common.check_coeff(alpha, "alpha", "adversarial_loss")
    if _common.is_number(alpha) and alpha > 1:
        raise ValueError(f"adversarial_loss: alpha must be in [0, 1], got {alpha!r}")
    clean, grads = _values_and_input_gradients(lambda b: loss_fn(b, y), x)
    grads = jax.lax.stop_gradient(grads).reshape(x.shape[0], -1)
    norms = safe_norm(grads, axis=1, keepdims=True)
    positive = norms > 0
    direction = jnp.where(positive, grads / jnp.where(positive, norms, 1.0), 0.0)
    perturbed = x + (epsilon * direction).reshape(x.shape).astype(x.dtype)
    return alpha * jnp.mean(clean) + (1 - alpha) * jnp.mean(loss_fn(perturbed, y))
