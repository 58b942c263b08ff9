"""AdaReg: a matrix-normal prior on weight matrices with learned Kronecker precisions.

Zhao et al. 2019 place the prior ``W ~ MN(0, Σ_r, Σ_c)`` on a weight matrix and
learn its precisions with the weights, by block coordinate descent (Alg. 1):
gradient steps on the weights with the penalty ``tr(Ω_in K Ω_out Kᵀ)`` for fixed
precisions, then each precision in closed form by :func:`~margin_regs.inv_threshold`.
With ``K = as_matrix(kernel)`` of shape ``(d, p) = (fan_in, fan_out)`` (the paper's
``W`` is ``Kᵀ``, its ``Ω_r`` our ``Ω_out``, its ``Ω_c`` our ``Ω_in``), the
precisions minimise the prior's negative log-density (eq. 4, 8–9)::

    tr(Ω_in K Ω_out Kᵀ) − d log det Ω_out − p log det Ω_in
    over  lower·I ⪯ Ω_out ⪯ upper·I,  lower·I ⪯ Ω_in ⪯ upper·I

one block at a time, output side first (Alg. 1, lines 3–4)::

    Ω_out ← INVTHRESHOLD(Kᵀ Ω_in K, d, lower, upper)        (p × p)
    Ω_in  ← INVTHRESHOLD(K Ω_out Kᵀ, p, lower, upper)       (d × d)

**Where the authors' PyTorch code differs.** It solves the input side first and
weights each log-determinant by the precision's *own* dimension (``m = d`` for
``Ω_in``, ``m = p`` for ``Ω_out``): it minimises
``tr(Ω_in K Ω_out Kᵀ) − p log det Ω_out − d log det Ω_in``, which is not the
matrix-normal density (its normaliser is ``det Σ_r^{d/2} det Σ_c^{p/2}``,
footnote 2). For the same other factor and before clipping, its ``Ω_out`` is
``p/d`` times the paper's and its ``Ω_in`` ``d/p`` times (1/39.2 and 39.2 for a
392 × 10 softmax layer), and the penalty right after such a solve is off by the
same factor. Both orders, though, end a sweep with a solve whose ``m`` is ``p``,
and that solve absorbs the other factor's scale: for a full-column-rank ``K``
(fan_in ≥ fan_out, as a softmax layer) the gradient after a sweep is
``2·coeff·p·K(KᵀK)⁻¹``, the gradient of ``coeff·p·log det(KᵀK)`` (the log-volume
of §3.2), whatever ``Ω_out`` is, wherever ``Ω_in``'s eigenvalues on the range of
``K`` are not clipped. In float64 checks (40 × 5, 392 × 10 and 10 × 392 kernels,
bounds 1e-3…1e3, 1–5 sweeps from identities) penalty and gradient after each full
sweep agreed between the two to 1e-9 while the factors themselves differed by up
to 10⁶ (``Ω_out`` at 1e3 here, at 1e-3 there). The training signal is the same;
the learned covariances (the paper's Fig. 8) are not. This module implements the
paper.

**Which layers.** The paper applies AdaReg to the last (softmax) layer in all its
experiments and found that best in its ablation (appendix B.3: all layers, conv
only, FC only, last only); select it with a mask, e.g.
``mask=mask_by_path(r"Dense_2/kernel$")``. Hidden layers cost, per kernel, an
``eigh`` of a ``d × d`` and a ``p × p`` matrix at each re-solve and ``d²p + dp²``
multiply-adds per step for ``Ω_in K Ω_out`` (a 1024 × 1024 layer: two 1024²
``eigh`` per re-solve and 2·10⁹ multiply-adds a step, two thirds of the layer's own
forward and backward pass at batch 1024; the MLP 784-392-392-10 regularized
everywhere: 4.8·10⁸ a step against 1.8·10⁸ for the whole network's forward and
backward at batch 128).
Conv kernels ``(kh, kw, in, out)`` are viewed as ``(kh·kw·in, out)`` (appendix B.3).

**CPU threads.** On the CPU, ``jnp.linalg.eigh`` runs LAPACK from OpenBLAS, whose
worker threads compete with XLA's own: on a shared 2-core machine a 1024² INVTHRESHOLD
took 3.8 s with OpenBLAS's default threads and 0.44 s with one, and a re-solving MLP
step (a 392 × 10 last layer) cost 35–40× a plain step instead of 3–3.5× (amortised
over 500 steps: +8% against +0.4%). On small or shared CPUs set ``OPENBLAS_NUM_THREADS=1``
in the environment before Python starts (numpy and scipy read it when they load);
``benchmarks/adareg.py`` measures both settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from margin_regs import _tree
from margin_regs.linalg import as_matrix, inv_threshold

__all__ = [
    "AdaRegPrecisions",
    "AdaRegState",
    "adareg",
    "adareg_penalty",
    "adareg_update_precisions",
    "init_adareg_precisions",
    "mask_by_path",
]


class AdaRegPrecisions(NamedTuple):
    """The precision factors of every selected kernel, float32.

    Two pytrees in the params' structure (``optax.MaskedNode`` at masked-out
    leaves), like the moments of ``optax.adam``, so that they survive
    ``flax.nnx.Optimizer``'s state handling.

    Attributes:
      omega_in: ``Ω_in``, ``(fan_in, fan_in)`` per kernel: the paper's ``Ω_c``.
      omega_out: ``Ω_out``, ``(fan_out, fan_out)`` per kernel: the paper's ``Ω_r``.
    """

    omega_in: Any
    omega_out: Any


class AdaRegState(NamedTuple):
    """State of :func:`adareg`.

    Attributes:
      count: steps taken, int32; drives ``coeff`` schedules and the re-solve period.
      precisions: the :class:`AdaRegPrecisions` in use.
    """

    count: jax.Array
    precisions: AdaRegPrecisions


def _select_all(params: Any) -> Any:
    # Inside optax.masked every leaf that arrives was selected by the user's mask;
    # marking all of them (instead of the default ndim >= 2 mask) makes a selected
    # bias an error rather than a silent skip.
    return jax.tree.map(lambda _: True, params)


def _check_bounds(lower: Any, upper: Any) -> None:
    # Traced bounds (under inject_hyperparams) cannot be checked here.
    if isinstance(lower, int | float) and isinstance(upper, int | float):
        if not 0 < lower <= upper:
            raise ValueError(f"adareg needs 0 < lower <= upper, got {lower}, {upper}")


def _preconditioned(
    kernel: jax.Array, omega_in: jax.Array, omega_out: jax.Array
) -> jax.Array:
    """``Ω_in K Ω_out``, ``(fan_in, fan_out)`` float32: half the penalty's gradient.

    Costs ``d²p + dp²`` flops; neither ``Ω_in ⊗ Ω_out`` nor ``K Ω_out Kᵀ`` is formed.
    """
    k = as_matrix(kernel).astype(jnp.float32)
    return (omega_in @ k) @ omega_out


def _flatten(selected: Any, precisions: Any) -> tuple[list, list, list]:
    """Selected kernels and their ``Ω_in``, ``Ω_out``, as three aligned lists."""
    kernels = jax.tree.leaves(selected)
    ins = jax.tree.leaves(getattr(precisions, "omega_in", None))
    outs = jax.tree.leaves(getattr(precisions, "omega_out", None))
    shapes = [as_matrix(k).shape for k in kernels]
    if [o.shape for o in ins] != [(d, d) for d, _ in shapes] or [
        o.shape for o in outs
    ] != [(p, p) for _, p in shapes]:
        raise ValueError(
            "adareg: precisions do not match the selected kernels; build them with "
            "init_adareg_precisions(params, mask=...) using the same mask"
        )
    return kernels, ins, outs


def _solve(selected: Any, precisions: AdaRegPrecisions, lower: Any, upper: Any) -> Any:
    """One block-coordinate sweep (Alg. 1, lines 3–4), batched by kernel shape."""
    kernels, ins, outs = _flatten(selected, precisions)
    matrices = [as_matrix(k).astype(jnp.float32) for k in kernels]
    new_ins, new_outs = list(ins), list(outs)
    for indices in _tree.group_by_shape(matrices).values():
        k = jnp.stack([matrices[i] for i in indices])
        omega_in = jnp.stack([ins[i] for i in indices])
        omega_out = jnp.stack([outs[i] for i in indices])
        d, p = k.shape[-2:]
        kt = jnp.swapaxes(k, -1, -2)
        new_out = inv_threshold(kt @ omega_in @ k, d, lower, upper)
        new_in = inv_threshold(k @ new_out @ kt, p, lower, upper)
        # A non-finite kernel (a diverged step) keeps its old precisions, so one bad
        # step cannot leave NaN in the optimizer state for good.
        finite = jnp.all(jnp.isfinite(new_out), (-2, -1)) & jnp.all(
            jnp.isfinite(new_in), (-2, -1)
        )
        new_out = jnp.where(finite[:, None, None], new_out, omega_out)
        new_in = jnp.where(finite[:, None, None], new_in, omega_in)
        for j, i in enumerate(indices):
            new_ins[i], new_outs[i] = new_in[j], new_out[j]
    return AdaRegPrecisions(
        jax.tree.unflatten(jax.tree.structure(precisions.omega_in), new_ins),
        jax.tree.unflatten(jax.tree.structure(precisions.omega_out), new_outs),
    )


def init_adareg_precisions(params: Any, *, mask: _tree.Mask = None) -> Any:
    """Identity precisions ``Ω_in = I_d``, ``Ω_out = I_p`` for each selected kernel.

    With identities the penalty is ``‖K‖_F²``, plain L2 (Zhao et al. 2019, §3.2).

    Args:
      params: a pytree of parameters.
      mask: which leaves to regularize (pytree of bools or callable, as in
        ``optax.masked``); default: every leaf with ``ndim >= 2``.

    Returns:
      :class:`AdaRegPrecisions`: two pytrees in the params' structure with float32
      identities at the selected kernels and ``optax.MaskedNode()`` elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> prec = mr.init_adareg_precisions({"w": jnp.ones((5, 3)), "b": jnp.ones(3)})
      >>> prec.omega_in["w"].shape, prec.omega_out["w"].shape, prec.omega_in["b"]
      ((5, 5), (3, 3), MaskedNode())
    """
    selected = _tree.select(params, mask)

    def eye(n):
        return jnp.eye(n, dtype=jnp.float32)

    return AdaRegPrecisions(
        jax.tree.map(lambda k: eye(as_matrix(k).shape[0]), selected),
        jax.tree.map(lambda k: eye(as_matrix(k).shape[1]), selected),
    )


def adareg_penalty(
    params: Any, precisions: Any, *, mask: _tree.Mask = None
) -> jax.Array:
    """The matrix-normal prior's penalty ``Σ tr(Ω_in K Ω_out Kᵀ)``.

    Equals ``Σ ‖Ω_in^½ K Ω_out^½‖_F²``; its gradient with respect to each kernel is
    ``2 Ω_in K Ω_out``, the term :func:`adareg` adds. The log-determinant terms do not
    depend on the weights and are left out. Add ``coeff`` times this to the loss.

    Args:
      params: a pytree of parameters.
      precisions: from :func:`init_adareg_precisions` or
        :func:`adareg_update_precisions`, with the same ``mask``.
      mask: which leaves to regularize; default: every leaf with ``ndim >= 2``.

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.ones((2, 3))}
      >>> float(mr.adareg_penalty(params, mr.init_adareg_precisions(params)))
      6.0

    References:
      Zhao et al., "Learning Neural Networks with Adaptive Regularization", 2019, eq. 4.
    """
    total = jnp.zeros((), jnp.float32)
    for k, o_in, o_out in zip(
        *_flatten(_tree.select(params, mask), precisions), strict=True
    ):
        total += jnp.sum(
            _preconditioned(k, o_in, o_out) * as_matrix(k).astype(jnp.float32)
        )
    return total


def adareg_update_precisions(
    params: Any,
    precisions: Any,
    *,
    lower: float,
    upper: float,
    mask: _tree.Mask = None,
) -> Any:
    """One block-coordinate sweep of the precisions (Zhao et al. 2019, Alg. 1, l. 3–4).

    With ``K = as_matrix(kernel)`` of shape ``(d, p)``::

        Ω_out ← INVTHRESHOLD(Kᵀ Ω_in K, d, lower, upper)
        Ω_in  ← INVTHRESHOLD(K Ω_out Kᵀ, p, lower, upper)

    Each solve is exact, so the objective
    ``tr(Ω_in K Ω_out Kᵀ) − d log det Ω_out − p log det Ω_in`` never increases.
    Same-shaped kernels share one batched ``eigh``. A kernel with non-finite
    entries keeps its old precisions.

    Args:
      params: a pytree of parameters.
      precisions: the current precisions (same ``mask``).
      lower: lower eigenvalue bound of each precision, > 0 (the paper's ``u``).
      upper: upper eigenvalue bound, ≥ ``lower`` (the paper's ``v``).
      mask: which leaves to regularize; default: every leaf with ``ndim >= 2``.

    Returns:
      The new :class:`AdaRegPrecisions`, float32, structured as ``precisions``.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"w": jnp.diag(jnp.array([1.0, 2.0]))}
      >>> prec = mr.init_adareg_precisions(params)
      >>> prec = mr.adareg_update_precisions(params, prec, lower=1e-3, upper=1e3)
      >>> jnp.diag(prec.omega_out["w"]).tolist()   # d / r = 2 / [1, 4]
      [2.0, 0.5]

    References:
      Zhao et al., "Learning Neural Networks with Adaptive Regularization", 2019,
      Algorithm 1 and Corollary 1.
    """
    _check_bounds(lower, upper)
    return _solve(_tree.select(params, mask), precisions, lower, upper)


def adareg(
    coeff: optax.ScalarOrSchedule,
    *,
    lower: float = 1e-3,
    upper: float = 1e3,
    update_every: int = 500,
    mask: _tree.Mask = None,
) -> optax.GradientTransformationExtraArgs:
    """Adds the gradient of AdaReg's matrix-normal prior, re-solving its precisions.

    For each selected kernel ``K`` (viewed as ``(fan_in, fan_out)``)::

        g ← g + 2 · coeff · Ω_in K Ω_out          (the gradient of coeff · tr(Ω_in K Ω_out Kᵀ))

    The precisions start at the identity (so AdaReg starts as L2 with weight
    ``coeff``) and follow Alg. 1's outer loop: at every step whose count is a
    positive multiple of ``update_every``, *before* the gradient term, they are
    re-solved from the params passed to ``update`` (the weights after
    ``update_every`` steps at fixed precisions) by
    :func:`adareg_update_precisions`; that step and the next ``update_every − 1``
    use them. The re-solve runs under ``lax.cond``, so other steps skip the ``eigh``.

    The default period, 500 steps, is the paper's inner block in steps: it trains
    30–50 epochs per outer loop on training sets of 600–6,000 samples at batch 256,
    i.e. 150–1,200 steps (Fig. 3; the authors' code: 30 epochs); 500 steps is about
    one MNIST epoch at batch 128 and 16 epochs of MNIST-1D. Shorter periods make the
    precisions track the weights more closely; each re-solve costs two ``eigh``.

    Stability: the added term is linear in ``K`` with curvature up to
    ``2 · coeff · upper²``, so plain SGD at learning rate ``lr`` needs
    ``lr · 2 · coeff · upper² < 2``. With the default bounds that is ``coeff · lr <
    1e-6``: measured on digits, coeff 1e-4 at lr 0.01 diverges (σ ≈ 2.5e4), while
    bounds ``[1e-2, 1e2]`` train normally (``margin-regs compare`` uses those).
    On a classifier kernel (fan_in > fan_out) the paper's update order drives the
    class precision ``Ω_out`` to ``upper · I`` (measured on 392×10: every eigenvalue
    at 1e3), so the learned class covariance sits at its lower bound, as the paper
    notes.

    Args:
      coeff: the penalty's weight (the paper's λ, the authors' ``rho``, 1e-4 by
        default there): a float, array or an optax schedule evaluated at the count.
      lower: lower eigenvalue bound of the precisions (the paper's ``u``).
      upper: upper eigenvalue bound (the paper's ``v``); ``lower · upper = 1`` in
        the paper, any ``0 < lower ≤ upper`` works here.
      update_every: a Python int ≥ 1, the re-solve period in steps.
      mask: which leaves to regularize (pytree of bools or callable, applied with
        ``optax.masked``); default every leaf with ``ndim >= 2``. The paper
        regularizes the last layer only: ``mask=mask_by_path(r"Dense_2/kernel$")``.
        Under ``optax.inject_hyperparams``, put ``update_every`` and a callable
        ``mask`` in ``static_args``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state holds an
      :class:`AdaRegState`; ``update`` needs ``params``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import margin_regs as mr
      >>> params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
      ...           "Dense_1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> tx = optax.chain(
      ...     mr.adareg(0.5, update_every=100, mask=mr.mask_by_path("Dense_1")),
      ...     optax.sgd(0.1),
      ... )
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> print(updates["Dense_1"]["kernel"])   # −0.1 · 2 · 0.5 · K
      [[-0.1 -0.1]
       [-0.1 -0.1]
       [-0.1 -0.1]]
      >>> float(jnp.abs(updates["Dense_0"]["kernel"]).max())
      0.0

    References:
      Zhao, Tsai, Salakhutdinov & Gordon, "Learning Neural Networks with Adaptive
      Regularization", NeurIPS 2019, Algorithm 1.
    """
    _check_bounds(lower, upper)
    if (
        isinstance(update_every, bool)
        or not isinstance(update_every, int)
        or update_every < 1
    ):
        raise ValueError(
            f"adareg needs a Python int update_every >= 1, got {update_every!r}"
        )

    def init_fn(params):
        return AdaRegState(
            count=jnp.zeros([], jnp.int32),
            precisions=init_adareg_precisions(params, mask=_select_all),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "adareg: update() needs params (tx.update(grads, state, params))"
            )
        selected = _tree.select(params, _select_all)
        resolve = (state.count > 0) & (state.count % update_every == 0)
        precisions = jax.lax.cond(
            resolve,
            lambda: _solve(selected, state.precisions, lower, upper),
            lambda: state.precisions,
        )
        c = coeff(state.count) if callable(coeff) else coeff
        updates = jax.tree.map(
            lambda g, k, o_in, o_out: (
                g
                + (2 * c * _preconditioned(k, o_in, o_out))
                .reshape(g.shape)
                .astype(g.dtype)
            ),
            updates,
            selected,
            precisions.omega_in,
            precisions.omega_out,
        )
        return updates, AdaRegState(optax.safe_increment(state.count), precisions)

    inner = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return optax.masked(inner, _tree.default_mask if mask is None else mask)


def mask_by_path(pattern: str) -> Callable[[Any], Any]:
    """A callable mask selecting the weight matrices whose path matches ``pattern``.

    A leaf is selected when ``re.search(pattern, path)`` matches its readable path
    (``'Dense_2/kernel'``; flax linen dicts, ``nnx.State`` and plain dicts alike)
    and it has ``ndim >= 2``, so a layer's name selects its kernel, not its bias.

    Args:
      pattern: a regular expression, searched in each leaf's path.

    Returns:
      A callable ``params -> pytree of bools``, usable as any ``mask`` argument.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
      ...           "Dense_1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> mr.mask_by_path(r"Dense_1/")(params)
      {'Dense_0': {'bias': False, 'kernel': False}, 'Dense_1': {'bias': False, 'kernel': True}}
    """
    regex = re.compile(pattern)

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, x: (
                jnp.ndim(x) >= 2 and regex.search(_tree.path_name(path)) is not None
            ),
            params,
        )

    return mask
