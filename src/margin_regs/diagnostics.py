"""Measurements of what the regularizers claim to change.

Per-layer spectra (Yoshida & Miyato 2017, §4.4; Zhao et al. 2019, §5), output and
input margins and closed-form lower bounds on the input margin (Sokolić et al.,
Thm 5), input-gradient norms and the Hessian's dominant eigenvalue (Yoshida &
Miyato 2017, §4.2–4.3), and the generalization gap at a threshold (ibid., Table 1).

Per-layer results are dicts keyed by the readable parameter path
(``'params/Dense_0/kernel'`` for a linen dict, ``'l1/kernel'`` for an
``nnx.State``), so one call works on any params pytree and logs directly. Every
per-layer diagnostic selects and views kernels as the methods do (default mask, no
integer leaves, layouts refused where the default cannot know them:
``docs/guides/layouts.md``); a batched layout gives one result per slice.

**Margin bounds** (:func:`margin_lower_bounds`). The features of a feed-forward
network move by at most ``Π_l ‖W_l‖₂ · ‖δ‖`` when the input moves by ``δ``
(Sokolić et al., Thm 3). The logit bound's ``√2`` is needed because
``‖v_y − v_j‖ = ‖V(e_y − e_j)‖ ≤ √2 ‖V‖``, attained when ``v_j = −v_y``. As in the
paper's eq. (13) a misclassified sample's bound is 0. Max-pooling over disjoint
windows is 1-Lipschitz, so a conv-pool network with ``ConvOperator`` layouts is
covered; residual connections and normalisation layers are not, and the product must
not skip a layer. Ludwig's Thm 1 divides by the same ``Π_k ‖W_k‖₂`` (as
``Π_k √λ_dom(W_k W_kᵀ)``), but its numerator needs the projections of ``x`` onto the
boundary, so it has no closed form; :func:`input_margin_estimates` is its computable
first-order counterpart (Ludwig, "Deep Learning with Eigenvalue Decay Regularizer",
2016, Thm 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from margin_regs import _common, _layouts, _tree
from margin_regs._conv_operator import ConvLinearOperator
from margin_regs._jacobian import _check_input, per_sample_input_gradients
from margin_regs._layouts import WeightDimensionNumbers
from margin_regs.linalg import as_matrix, safe_norm, stable_rank_of

__all__ = [
    "generalization_gap",
    "hessian_max_eigenvalue",
    "input_gradient_norms",
    "input_margin_estimates",
    "margin_lower_bounds",
    "output_margins",
    "singular_value_spectra",
    "spectral_norms",
    "stable_ranks",
]


def _per_matrix(
    fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    mask: _tree.Mask,
    weight_dimension_numbers: WeightDimensionNumbers,
) -> dict[str, jax.Array]:
    """``{path: fn(operator, kernel)}`` over the weight matrices selected."""
    layouts = _layouts.resolve_layouts(params, weight_dimension_numbers, mask)
    masked = jax.tree.map(
        lambda spec, x: optax.MaskedNode() if spec is None else x,
        layouts,
        params,
        is_leaf=_layouts.is_spec,
    )
    _, _, ops, _ = _layouts.flatten_selected(params, layouts)
    paths = jax.tree_util.tree_flatten_with_path(masked)[0]
    out: dict[str, jax.Array] = {}
    for (path, kernel), op in zip(paths, ops, strict=True):
        name = _tree.path_name(path)
        if name in out:
            raise ValueError(f"two parameters share the readable path {name!r}")
        out[name] = fn(op, kernel)
    return out


def _spectrum(op: Any, kernel: jax.Array) -> jax.Array:
    # A convolution on a realistic input has thousands of singular values: its
    # spectrum is the top 64 where a dense SVD would take minutes.
    if isinstance(op, ConvLinearOperator):
        return op.spectrum(kernel)
    return op.singular_values(kernel)


def _stable_rank(op: Any, kernel: jax.Array) -> jax.Array:
    # A convolution's is exact from its Frobenius norm and σ₁, without the spectrum.
    if isinstance(op, ConvLinearOperator):
        return op.stable_rank(kernel)
    return stable_rank_of(op.singular_values(kernel))


def _norms(op: Any, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(σ₁, ‖·‖_F)`` of every batch slice, flattened to 1-D."""
    if isinstance(op, ConvLinearOperator):
        return op.singular_values(kernel, 1), op.frobenius_norm(kernel)[None]
    s = op.singular_values(kernel)
    s = s.reshape(-1, s.shape[-1])
    return s[:, 0], safe_norm(s)


def spectral_norms(
    params: Any,
    *,
    mask: _tree.Mask = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
) -> dict[str, jax.Array]:
    """Exact spectral norm ``σ_max(K)`` of every weight matrix, by SVD.

    ``K`` is the ``(fan_in, fan_out)`` view of each selected kernel
    (:func:`margin_regs.as_matrix`).

    Args:
      params: any params pytree (linen dict, ``nnx.State``, plain dict).
      mask: which leaves, as in ``optax.masked``; see ``docs/guides/layouts.md``.
      weight_dimension_numbers: each leaf's layout; see ``docs/guides/layouts.md``.

    Returns:
      ``{path: σ_max}``, float32 scalars (``(*batch,)`` for batched layouts); for
      a ``ConvOperator`` leaf the convolution's operator norm (dense SVD when
      small, else block Krylov iteration to 1e-5).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"dense": {"kernel": 3.0 * jnp.eye(2), "bias": jnp.zeros(2)}}
      >>> {k: float(v) for k, v in mr.spectral_norms(params).items()}
      {'dense/kernel': 3.0}

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, §4.4.
    """
    return _per_matrix(
        lambda op, k: op.singular_values(k, 1)[..., 0],
        params,
        mask,
        weight_dimension_numbers,
    )


def singular_value_spectra(
    params: Any,
    *,
    mask: _tree.Mask = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
) -> dict[str, jax.Array]:
    """All singular values ``σ_1 ≥ … ≥ σ_r`` of every weight matrix, by SVD.

    The spectra of Yoshida & Miyato's Fig. 4: skewed without regularization, flat
    under spectral norm regularization.

    Args:
      params: any params pytree (linen dict, ``nnx.State``, plain dict).
      mask: which leaves, as in ``optax.masked``; see ``docs/guides/layouts.md``.
      weight_dimension_numbers: each leaf's layout; see ``docs/guides/layouts.md``.

    Returns:
      ``{path: σ}``, float32 arrays ``(*batch, min(fan_in, fan_out))`` in
      descending order. A ``ConvOperator`` leaf gives all its operator's singular
      values where a dense SVD is cheap, else its top 64 (a convolution on a
      realistic input has thousands).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.diag(jnp.array([1.0, 2.0, 3.0]))}
      >>> mr.singular_value_spectra(params)["w"].tolist()
      [3.0, 2.0, 1.0]

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, §4.4, Fig. 4.
    """
    return _per_matrix(_spectrum, params, mask, weight_dimension_numbers)


def stable_ranks(
    params: Any,
    *,
    mask: _tree.Mask = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
) -> dict[str, jax.Array]:
    """Stable rank ``srank(K) = ‖K‖_F² / ‖K‖₂²`` of every weight matrix.

    Lies in ``[1, rank K]`` (0 for the zero matrix); AdaReg lowers it.

    Args:
      params: any params pytree (linen dict, ``nnx.State``, plain dict).
      mask: which leaves, as in ``optax.masked``; see ``docs/guides/layouts.md``.
      weight_dimension_numbers: each leaf's layout; see ``docs/guides/layouts.md``.

    Returns:
      ``{path: srank}``, float32 scalars (``(*batch,)`` for batched layouts); for
      a ``ConvOperator`` leaf, exact from the operator's Frobenius norm and σ₁.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.diag(jnp.array([2.0, 2.0, 1.0]))}
      >>> float(mr.stable_ranks(params)["w"])
      2.25

    References:
      Zhao, Tsai, Salakhutdinov & Gordon, "Learning Neural Networks with Adaptive
      Regularization", NeurIPS 2019, §5.
    """
    return _per_matrix(
        _stable_rank,
        params,
        mask,
        weight_dimension_numbers,
    )


def _check_logits(logits: jax.Array, labels: jax.Array) -> tuple[int, int]:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"logits must be (n, n_classes) with n_classes >= 2, got {logits.shape}"
        )
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must be integer class indices of shape {logits.shape[:1]}, "
            f"got shape {labels.shape}"
        )
    _common.check_label_range(labels, logits.shape[1])
    return logits.shape


def _min_ratio_over_others(
    numerator: jax.Array, denominator: jax.Array, labels: jax.Array
) -> jax.Array:
    """``min_{j≠y} numerator_j / denominator_j`` per row, for ``(n, C)`` inputs.

    A zero denominator (two classes whose scores never separate) puts that class
    infinitely far on the side of the numerator's sign, instead of a NaN.
    """
    positive = denominator > 0
    ratio = jnp.where(
        positive,
        numerator / jnp.where(positive, denominator, 1.0),
        jnp.sign(numerator) * jnp.inf,
    )
    others = labels[:, None] != jnp.arange(numerator.shape[1])
    margin = jnp.min(jnp.where(others, ratio, jnp.inf), axis=1)
    # Labels are unchecked under jit; a bad one would index another class.
    return jnp.where(
        _common.labels_in_range(labels, numerator.shape[1]), margin, jnp.nan
    )


def output_margins(
    logits: jax.Array, labels: jax.Array, *, classifier: jax.Array | None = None
) -> jax.Array:
    """Per-sample output margin: the logit margin, or the geometric one.

    Without ``classifier``: ``z_y − max_{j≠y} z_j``. With the classifier kernel
    ``V (fan_in, n_classes)`` whose columns ``v_j`` make the logits
    ``z_j = v_jᵀ h + c_j`` of the features ``h``: the distance of ``h`` to the
    nearest decision hyperplane of the linear classifier,
    ``min_{j≠y} (z_y − z_j) / ‖v_y − v_j‖`` (Sokolić et al., eq. (13), for many
    classes). Both are negative for misclassified samples.

    Args:
      logits: ``(n, n_classes)``.
      labels: integer classes ``(n,)`` in ``[0, n_classes)``; out-of-range labels
        raise a ValueError when known, and give NaN margins under ``jit``.
      classifier: optional last-layer kernel ``(fan_in, n_classes)`` (or a kernel
        whose :func:`margin_regs.as_matrix` view is that).

    Returns:
      ``(n,)`` margins (``+inf`` where the relevant columns of ``V`` coincide).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> logits = jnp.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
      >>> mr.output_margins(logits, jnp.array([0, 0])).tolist()
      [2.0, -2.0]
      >>> v = jnp.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
      >>> mr.output_margins(logits, jnp.array([0, 0]), classifier=v).tolist()
      [1.0, -1.0]

    References:
      Sokolić, Giryes, Sapiro & Rodrigues, "Robust Large Margin Deep Neural
      Networks", arXiv:1605.08254 (IEEE TSP 2017), eq. (13).
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _, n_classes = _check_logits(logits, labels)
    z_y = jnp.take_along_axis(logits, labels[:, None], axis=1)
    differences = z_y - logits
    if classifier is None:
        return _min_ratio_over_others(differences, jnp.ones_like(logits), labels)
    v = as_matrix(classifier).astype(logits.dtype)
    if v.shape[1] != n_classes:
        raise ValueError(
            f"classifier has {v.shape[1]} columns (classes), logits have {n_classes}"
        )
    column_distances = safe_norm(v[:, :, None] - v[:, None, :], axis=0)
    return _min_ratio_over_others(differences, column_distances[labels], labels)


def input_margin_estimates(
    logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, labels: jax.Array
) -> jax.Array:
    """First-order distance of each sample to the nearest decision boundary.

    ``min_{j≠y} (z_y(x) − z_j(x)) / ‖∇ₓ(z_y − z_j)(x)‖₂``: the distance to the
    boundary between ``y`` and ``j`` of the network linearised at ``x`` (Ludwig,
    Thm 1's proof, eqs. (14)–(15), with the gradient taken at the sample). Exact
    for a linear model, and for a ReLU network whenever the nearest boundary lies
    in the linear region of ``x``; negative for misclassified samples. All per-class
    input gradients come from one batched VJP per class
    (:func:`margin_regs._jacobian.per_sample_input_gradients`, vectorised over
    classes).

    Args:
      logits_fn: batched ``(n, ...) -> (n, n_classes)``, samples independent (no
        BatchNorm in training mode).
      x: inputs ``(n, ...)``.
      labels: integer classes ``(n,)`` in ``[0, n_classes)``; out-of-range labels
        raise a ValueError when known, and give NaN margins under ``jit``.

    Returns:
      ``(n,)`` signed estimates, in the units of ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> w = jnp.array([[1.0, -1.0], [0.0, 0.0]])
      >>> x = jnp.array([[2.0, 5.0], [-1.0, 0.0]])
      >>> mr.input_margin_estimates(lambda b: b @ w, x, jnp.array([0, 0])).tolist()
      [2.0, -1.0]

    References:
      Ludwig, "Deep Learning with Eigenvalue Decay Regularizer", arXiv:1604.06985,
      2016, Thm 1's proof, eqs. (14)–(15); Sokolić et al., eq. (14).
    """
    x = _check_input(x)
    labels = jnp.asarray(labels)
    logits = logits_fn(x)
    n, n_classes = _check_logits(logits, labels)

    def gradient_of_class(c: jax.Array) -> jax.Array:
        return per_sample_input_gradients(lambda b: logits_fn(b)[:, c], x)

    grads = jax.vmap(gradient_of_class)(jnp.arange(n_classes))
    grads = jnp.moveaxis(grads.reshape(n_classes, n, -1), 0, 1)
    grad_y = jnp.take_along_axis(grads, labels[:, None, None], axis=1)
    z_y = jnp.take_along_axis(logits, labels[:, None], axis=1)
    return _min_ratio_over_others(
        z_y - logits, safe_norm(grad_y - grads, axis=-1), labels
    )


def margin_lower_bounds(
    margins: jax.Array,
    params: Any,
    *,
    mask: _tree.Mask = None,
    margin_type: Literal["logit", "geometric"] = "logit",
    weight_dimension_numbers: WeightDimensionNumbers = None,
) -> dict[str, jax.Array]:
    """Closed-form lower bounds on the input margin from an output margin.

    For ``h_l = φ(W_lᵀ h_{l−1} + b_l)`` with ``|φ'| ≤ 1`` and a linear classifier
    ``z = Vᵀ h_L + c``, no decision boundary lies within (Sokolić et al., Thm 3/5)::

        geometric:  γ_geo   / Π_{l≤L} ‖W_l‖           (mask: hidden kernels only)
        logit:      γ_logit / (√2 ‖V‖ Π_{l≤L} ‖W_l‖)  (mask: every kernel)

    with ``γ`` from :func:`output_margins` (with ``classifier=V`` for geometric),
    clipped at 0, and ``‖·‖`` the spectral norm (sharper) or the Frobenius norm
    (Thm 5's closed form). Convolutions count with their operator norms under a
    :class:`~margin_regs.ConvOperator` layout; a 4-D or 5-D kernel under a reshaped
    layout warns (its σ bounds no convolution). Why the √2, what the bounds do not
    cover (residuals, norms) and Ludwig's Thm 1: the module docstring.

    Args:
      margins: output margins ``(n,)``, of the kind ``margin_type`` names.
      params: the network's params (linen dict, ``nnx.State``, plain dict).
      mask: the kernels in the product; see ``docs/guides/layouts.md``.
      margin_type: ``"logit"`` or ``"geometric"``.
      weight_dimension_numbers: layouts (a stack's slices are layers); see the guide.

    Returns:
      ``{"spectral": (n,), "frobenius": (n,)}``, ``spectral ≥ frobenius``.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"hidden": {"kernel": 2.0 * jnp.eye(2)},
      ...           "classifier": {"kernel": jnp.eye(2)}}
      >>> b = mr.margin_lower_bounds(jnp.array([2.0, -1.0]), params)
      >>> [round(v, 4) for v in b["spectral"].tolist()]
      [0.7071, 0.0]

    References:
      Sokolić, Giryes, Sapiro & Rodrigues, "Robust Large Margin Deep Neural
      Networks", IEEE TSP 2017, Thm 3 and Thm 5 (eq. (20)).
    """
    if margin_type not in ("logit", "geometric"):
        raise ValueError(
            f"margin_type must be 'logit' or 'geometric', got {margin_type!r}"
        )
    margins = jnp.asarray(margins)
    if margins.ndim != 1:
        raise ValueError(f"margins must be (n,), got shape {margins.shape}")
    _warn_if_reshaped(params, mask, weight_dimension_numbers)
    norms = list(_per_matrix(_norms, params, mask, weight_dimension_numbers).values())
    if margin_type == "logit" and not norms:
        raise ValueError(
            "margin_type='logit' needs the classifier's kernel among the selected "
            "weight matrices, but the mask selects none"
        )
    factor = jnp.sqrt(2.0) if margin_type == "logit" else jnp.ones(())
    products = {
        name: jnp.prod(jnp.concatenate([n[i] for n in norms] + [factor[None]]))
        for i, name in enumerate(("spectral", "frobenius"))
    }
    clipped = jnp.maximum(margins, 0.0)
    # A zero product means a constant network: no boundary at any finite distance.
    return {
        name: jnp.where(clipped > 0, clipped / product, 0.0)
        for name, product in products.items()
    }


def _warn_if_reshaped(params: Any, mask: _tree.Mask, layouts: Any) -> None:
    """Warn about 4-D and 5-D kernels (convolutions) under the reshaped layout.

    A 3-D leaf under ``reshape(-1, last)`` is as often an attention output
    projection ``(heads, head_dim, out)``, a true matrix, as a Conv1D: no warning.
    """
    layouts = _layouts.resolve_layouts(params, layouts, mask)

    def reshaped(path, layout, leaf):
        shape = jnp.shape(leaf)
        if layout is None or not 4 <= len(shape) <= 5:
            return None
        default = _layouts.check_layout(
            _layouts.fan_out_last(len(shape)), shape, "kernel"
        )
        return _tree.path_name(path) if layout == default else None

    names = jax.tree.leaves(
        jax.tree_util.tree_map_with_path(
            reshaped, layouts, params, is_leaf=_layouts.is_spec
        )
    )
    if names:
        warnings.warn(
            f"margin_lower_bounds: {', '.join(names)} enter as reshaped "
            "(fan_in, fan_out) matrices, whose σ does not bound a convolution's "
            "operator norm, so the bounds are not valid for them; give them "
            "mr.ConvOperator layouts (infer_weight_dimension_numbers(..., "
            "conv='operator'))",
            stacklevel=3,
        )


def input_gradient_norms(
    loss_fn: Callable[[jax.Array, Any], jax.Array], x: jax.Array, y: Any
) -> jax.Array:
    """Per-sample ``‖∇ₓ L(xᵢ, yᵢ)‖₂``, the sensitivity of Yoshida & Miyato's §4.2.

    Measured on test data it tracks the generalization gap; on training data it
    does not (ibid., Fig. 2).

    Args:
      loss_fn: ``(x, y) -> (n,)`` per-sample losses, samples independent.
      x: inputs ``(n, ...)``.
      y: targets, passed through to ``loss_fn``.

    Returns:
      ``(n,)`` gradient norms (over all non-batch axes of ``x``).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> loss_fn = lambda x, y: jnp.sum((x - y) ** 2, axis=1)
      >>> x = jnp.array([[3.0, 4.0], [1.0, 1.0]])
      >>> mr.input_gradient_norms(loss_fn, x, jnp.zeros((2, 2))).tolist()
      [10.0, 2.8284270763397217]

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, §4.2.
    """
    x = _check_input(x)
    grads = per_sample_input_gradients(lambda b: loss_fn(b, y), x)
    return safe_norm(grads.reshape(x.shape[0], -1), axis=-1)


def hessian_max_eigenvalue(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    n_iterations: int = 100,
    key: jax.Array | int = 0,
) -> jax.Array:
    """Dominant eigenvalue of ``∇²_θ loss_fn(θ, batch)`` over all parameters.

    Power iteration (``optax.power_iteration``) on Hessian-vector products
    ``H v = ∂/∂ε ∇_θ L(θ + ε v)|₀``, forward-over-reverse (``jax.jvp`` of
    ``jax.grad``), so the Hessian is never formed (Yoshida & Miyato, §4.3). It
    returns the Rayleigh quotient ``vᵀ H v`` of the converged unit vector: the
    eigenvalue of largest magnitude, with its sign. Near a minimum ``H`` is close
    to positive semi-definite and this is the largest eigenvalue; a negative result
    means a negative-curvature direction dominates. Convergence is geometric in
    ``|λ₂| / |λ₁|``; the iterations stop early at ``optax``'s residual tolerance.
    A zero Hessian gives 0.

    Args:
      loss_fn: ``(params, batch) -> scalar`` loss.
      params: any params pytree of floats (linen dict, ``nnx.State``, plain dict).
      batch: anything ``loss_fn`` takes.
      n_iterations: maximum number of Hessian-vector products.
      key: a ``jax.random`` key or int seed for the Gaussian start vector.

    Returns:
      A scalar, the dominant eigenvalue.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> loss_fn = lambda p, b: jnp.sum(b * p["w"] ** 2)
      >>> params = {"w": jnp.ones(3)}
      >>> lam = mr.hessian_max_eigenvalue(loss_fn, params, jnp.array([1.0, 3.0, 0.5]))
      >>> round(float(lam), 3)
      6.0

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, §4.3; Pearlmutter, "Fast Exact
      Multiplication by the Hessian", 1994.
    """
    _common.check_positive_int(n_iterations, "n_iterations", "hessian_max_eigenvalue")
    key = _common.as_key(key)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    v0 = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(p), p.dtype)
            for k, p in zip(keys, leaves, strict=True)
        ],
    )
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))

    def hvp(v: Any) -> Any:
        return jax.jvp(grad_fn, (params,), (v,))[1]

    eigenvalue, _ = optax.power_iteration(hvp, v0=v0, num_iters=n_iterations)
    # A zero Hessian (a loss linear in θ) makes every iterate 0/0; its eigenvalue is
    # 0. A NaN loss still yields NaN, since NaN == 0 is false.
    zero_hessian = optax.tree.norm(hvp(v0)) == 0
    return jnp.where(zero_hessian, 0.0, eigenvalue)


def generalization_gap(
    train_acc: jax.Array, test_acc: jax.Array, threshold: float
) -> jax.Array:
    """Yoshida & Miyato's generalization gap at a threshold ``α``.

    ``min { train_t − test_t : test_t > α }`` over the recorded points ``t`` of a
    run (e.g. epochs): "the minimum difference between the training and test
    accuracies when the test accuracy exceeds α" (ibid., §4.1, Table 1). The
    comparison is strict, as "exceeds" reads. Comparing methods at one ``α`` that
    every method exceeds keeps a method from looking good by barely fitting.

    Args:
      train_acc: training accuracies ``(T,)``.
      test_acc: test accuracies ``(T,)``, at the same points.
      threshold: ``α``.

    Returns:
      A scalar; ``NaN`` when the test accuracy never exceeds ``α`` (the gap is
      undefined there, and ``NaN`` keeps the function jittable and tables
      printable).

    Example:
      >>> import margin_regs as mr
      >>> train = [0.70, 0.90, 0.99, 1.00]
      >>> test = [0.60, 0.85, 0.88, 0.87]
      >>> round(float(mr.generalization_gap(train, test, 0.8)), 4)
      0.05
      >>> float(mr.generalization_gap(train, test, 0.9))
      nan

    References:
      Yoshida & Miyato, "Spectral Norm Regularization for Improving the
      Generalizability of Deep Learning", 2017, §4.1, Table 1.
    """
    train_acc = jnp.asarray(train_acc, jnp.float32)
    test_acc = jnp.asarray(test_acc, jnp.float32)
    if train_acc.ndim != 1 or train_acc.shape != test_acc.shape:
        raise ValueError(
            "train_acc and test_acc must be 1-D of the same length, got shapes "
            f"{train_acc.shape} and {test_acc.shape}"
        )
    exceeds = test_acc > threshold
    gap = jnp.min(jnp.where(exceeds, train_acc - test_acc, jnp.inf), initial=jnp.inf)
    return jnp.where(jnp.any(exceeds), gap, jnp.nan)
