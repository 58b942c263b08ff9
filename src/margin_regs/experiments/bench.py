"""Overhead benchmarks: a regularized training step against a plain optax SGD step.

Per (model, batch size, case): XLA's cost model of one compiled step, FLOPs and bytes
over those of the reference step (:func:`cost_model`); the seconds XLA takes to
compile it; where asked, the median over interleaved rounds of the paired time ratio,
with a second copy of the reference as the null control (:func:`measure`). The
reference is plain SGD unless the case names its own (:class:`Versus`). Cases live in
:data:`CASES` (:func:`register`); ``margin-regs bench`` calls :func:`main`, and
``benchmarks/readme_table.py`` renders its ``--json`` (docs/guides/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import margin_regs as mr
from margin_regs.experiments import bagging, models, recipes

__all__ = [
    "BATCH_SIZES",
    "CASES",
    "MODELS",
    "Amortised",
    "BenchModel",
    "Case",
    "Costs",
    "Problem",
    "Result",
    "Stepper",
    "Timing",
    "Versus",
    "build_parser",
    "compiled_costs",
    "cost_model",
    "from_json",
    "main",
    "make_problem",
    "measure",
    "register",
    "run",
    "run_from_args",
    "to_json",
    "train_step",
]

BATCH_SIZE = 128
BATCH_SIZES: tuple[int, ...] = (128, 4096)
LEARNING_RATE = 0.01
COEFF = 0.01
NUM_CLASSES = 10


class BenchModel(NamedTuple):
    """A :mod:`~margin_regs.experiments.models` constructor ``build(num_classes,
    **overrides)``, one sample's ``input_shape`` (channels last), a ``description``
    for ``--help``, and the overrides (and ``input_shape``) of a ``tiny`` copy that
    compiles in seconds (``--tiny``, tests)."""

    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    tiny: dict[str, Any]


def _transformer(num_classes: int, **overrides: Any) -> nn.Module:
    # Unrolled so the cost model counts every block (it counts a loop body once);
    # the parameters stay stacked as nn.scan makes them.
    blocks = overrides.get("num_blocks", models.TransformerEncoder.num_blocks)
    return models.TransformerEncoder(num_classes, unroll=blocks, **overrides)


MODELS: dict[str, BenchModel] = {
    "mlp": BenchModel(
        models.SokolicMLP,
        (28, 28, 1),
        "Sokolić et al.'s MLP 784-392-392-10",
        {"input_shape": (8, 8, 1)},
    ),
    "cnn": BenchModel(
        models.SokolicCNN,
        (28, 28, 1),
        "Sokolić et al.'s CNN conv32-pool-conv32-pool",
        {"input_shape": (8, 8, 1), "features": 4},
    ),
    "vgg11": BenchModel(
        models.VGG11,
        (32, 32, 3),
        "VGG-11, CIFAR-10 shapes",
        {"input_shape": (8, 8, 3), "width": 2},
    ),
    "resnet18": BenchModel(
        models.ResNet18,
        (32, 32, 3),
        "ResNet-18 (GroupNorm), CIFAR-10 shapes",
        {"input_shape": (8, 8, 3), "width": 4},
    ),
    "transformer": BenchModel(
        _transformer,
        (128, 64),
        "4-block encoder, d_model 256, 4 heads, 128 tokens, blocks in one nn.scan",
        {"input_shape": (4, 3), "d_model": 8, "num_heads": 2, "mlp_ratio": 2},
    ),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One model (``module``, its initial ``params``) on one batch ``x``, ``y``."""

    model: str
    module: nn.Module
    params: Any
    x: jax.Array
    y: jax.Array

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        """The logits ``(batch, classes)``."""
        return self.module.apply({"params": params}, x)

    def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        """Mean softmax cross-entropy of the model on ``(x, y)``."""
        return _per_sample_loss(self, params)(x, y).mean()

    def sgd(self) -> optax.GradientTransformation:
        """The baseline optimizer every case shares."""
        return optax.sgd(LEARNING_RATE)


def _per_sample_loss(problem: Problem, params: Any) -> Callable[..., jax.Array]:
    return lambda x, y: optax.softmax_cross_entropy_with_integer_labels(
        problem.apply(params, x), y
    )


@dataclasses.dataclass
class Stepper:
    """A jitted ``step(carry, x, y) -> carry`` and its current ``carry``.

    Mutable: timing advances ``carry`` (the step donates it), and the executable is
    kept once compiled, so the cost model and the timing use the same one.
    """

    step: Callable[[Any, jax.Array, jax.Array], Any]
    carry: Any
    compiled: Any = None
    compile_seconds: float = math.nan

    def compile(self, x: jax.Array, y: jax.Array) -> Any:
        """The executable for ``(carry, x, y)``, compiled (and timed) on first use."""
        if self.compiled is None:
            start = time.perf_counter()
            self.compiled = self.step.lower(self.carry, x, y).compile()
            self.compile_seconds = time.perf_counter() - start
        return self.compiled


class Costs(NamedTuple):
    """XLA's cost-model figures for one compiled step (NaN where unavailable)."""

    flops: float
    bytes: float


class Amortised(NamedTuple):
    """A case whose cost recurs every ``period`` steps: its figures are
    ``((period − 1) · steady + periodic) / period``, ``periodic`` a step with the
    event every time. ``event_costs() -> Costs``, the event alone, is taken off the
    steady step's (XLA counts a ``lax.cond``'s costliest branch)."""

    steady: Stepper
    periodic: Stepper
    period: int
    event_costs: Callable[[], Costs] | None = None


class Versus(NamedTuple):
    """A ``case`` step measured against ``reference()`` (a fresh step, called twice
    for the null control) instead of plain SGD; ``against`` names it."""

    case: Stepper
    reference: Callable[[], Stepper]
    against: str


def make_problem(
    model: str, batch_size: int = BATCH_SIZE, *, seed: int = 0, tiny: bool = False
) -> Problem:
    """The named model, initialised, on a synthetic batch.

    Args:
      model: a name in :data:`MODELS`.
      batch_size: samples in the batch.
      seed: for the batch and the initial parameters.
      tiny: build the model's tiny copy (:attr:`BenchModel.tiny`).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; have {list(MODELS)}")
    spec = MODELS[model]
    overrides = dict(spec.tiny) if tiny else {}
    shape = overrides.pop("input_shape", spec.input_shape)
    module = spec.build(NUM_CLASSES, **overrides)
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch_size, *shape), jnp.float32)
    y = jax.random.randint(ky, (batch_size,), 0, NUM_CLASSES)
    params = jax.jit(module.init)(kp, x[:1])["params"]
    return Problem(model, module, params, x, y)


def train_step(
    problem: Problem,
    *,
    tx: optax.GradientTransformation | None = None,
    penalty: Callable[..., tuple[jax.Array, Any]] | None = None,
    penalty_state: Any = None,
    loss: Callable[..., jax.Array] | None = None,
) -> Stepper:
    """A fresh jitted step: ``grad`` of the loss (plus ``penalty``), ``tx``, apply.

    Each call compiles its own executable (two calls: the null control's copies).

    Args:
      problem: the model and batch.
      tx: the optimizer, by default ``problem.sgd()``.
      penalty: ``(params, penalty_state, x, y) -> (value, penalty_state)`` added to
        the loss, its state carried across steps.
      penalty_state: the penalty's initial state.
      loss: ``(params, x, y) -> loss`` in place of ``problem.loss``.
    """
    tx = problem.sgd() if tx is None else tx
    # The step donates its carry, and a donated buffer may appear only once: copy
    # every leaf, since an initial state may hold one array in two places.
    carry = _copy((problem.params, tx.init(problem.params), penalty_state))
    step = _step_fn(problem, tx, penalty, loss)
    return Stepper(jax.jit(step, donate_argnums=0), carry)


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.copy(), tree)


def _step_fn(
    problem: Problem,
    tx: optax.GradientTransformation,
    penalty: Callable | None = None,
    loss: Callable | None = None,
) -> Callable[[Any, jax.Array, jax.Array], Any]:
    loss = loss or problem.loss

    def objective(params, aux, x, y):
        value = loss(params, x, y)
        if penalty is None:
            return value, aux
        term, aux = penalty(params, aux, x, y)
        return value + term, aux

    def step(carry, x, y):
        params, opt_state, aux = carry
        grads, aux = jax.grad(objective, has_aux=True)(params, aux, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    return step


Builder = Callable[[Problem], "Stepper | Amortised | Versus"]


class Case(NamedTuple):
    """A case's ``build(problem)``, the ``models`` it runs on, and whether a pattern
    such as ``*`` selects it (``by_default``; else only its exact name)."""

    build: Builder
    models: tuple[str, ...]
    by_default: bool = True


def _layouts(problem: Problem, conv: str | None = None) -> Any:
    """Each kernel's layout inferred from the model on one sample, convolutions as
    ``conv`` says; without ``conv``, the library's defaults (``None``) except on the
    transformer, whose scanned ``(layers, in, out)`` kernels have none."""
    if conv is None and problem.model != "transformer":
        return None
    x, conv = problem.x[:1], conv or "matrix"
    return mr.infer_weight_dimension_numbers(
        problem.apply, problem.params, x, conv=conv
    )


def _chained(factory: Callable, layouts: Callable | None = _layouts) -> Builder:
    """A case: ``factory(COEFF, weight_dimension_numbers=layouts(problem))``, then
    SGD (``layouts=None``: ``factory(COEFF)``)."""

    def build(problem: Problem) -> Stepper:
        kwargs = {"weight_dimension_numbers": layouts(problem)} if layouts else {}
        tx = optax.chain(factory(COEFF, **kwargs), problem.sgd())
        return train_step(problem, tx=tx)

    return build


def _penalty(term: Callable, keyed: bool = False) -> Builder:
    """A case adding ``COEFF · term(problem, params, x, y)`` to the loss (``keyed``:
    ``term(problem, params, x, key)``, a fresh key every step)."""

    def build(problem: Problem) -> Stepper:
        def penalty(params, key, x, y):
            if not keyed:
                return COEFF * term(problem, params, x, y), key
            key, sub = jax.random.split(key)
            return COEFF * term(problem, params, x, sub), key

        state = jax.random.key(0) if keyed else None
        return train_step(problem, penalty=penalty, penalty_state=state)

    return build


def _spectral_norm_penalty(problem: Problem) -> Stepper:
    layouts = _layouts(problem)

    def penalty(params, vectors, x, y):
        value, vectors = mr.spectral_norm_penalty(
            params, vectors, weight_dimension_numbers=layouts
        )
        return COEFF * value, vectors

    vectors = mr.init_power_iteration(
        problem.params, 0, weight_dimension_numbers=layouts
    )
    return train_step(problem, penalty=penalty, penalty_state=vectors)


def _eigenvalue_decay_penalty(problem: Problem, params: Any, x, y) -> jax.Array:
    layouts = _layouts(problem)
    return mr.eigenvalue_decay_penalty(params, weight_dimension_numbers=layouts)


def _exact_svd_penalty(problem: Problem, params: Any, x, y) -> jax.Array:
    kernels = [k for k in jax.tree.leaves(params) if k.ndim >= 2]
    return sum(0.5 * mr.singular_values(k)[0] ** 2 for k in kernels)


ADAREG_PERIOD = 500
ADAREG_BOUNDS = {"lower": 0.1, "upper": 10.0}  # the library's defaults


def _adareg_last_layer(problem: Problem) -> Amortised:
    """The softmax layer, as in all of Zhao et al. 2019's experiments: 499 steady
    steps and one re-solve (two ``eigh``, which the cost model cannot see into),
    timed from a copy that re-solves at every step."""
    mask = models.classifier_mask

    def step(update_every: int) -> Stepper:
        tx = mr.adareg(COEFF, update_every=update_every, mask=mask, **ADAREG_BOUNDS)
        return train_step(problem, tx=optax.chain(tx, problem.sgd()))

    def resolve_costs() -> Costs:
        solve = functools.partial(
            mr.adareg_update_precisions, mask=mask, **ADAREG_BOUNDS
        )
        precisions = mr.init_adareg_precisions(problem.params, mask=mask)
        lowered = jax.jit(solve).lower(problem.params, precisions)
        return compiled_costs(lowered.compile())

    return Amortised(step(ADAREG_PERIOD), step(1), ADAREG_PERIOD, resolve_costs)


ENSEMBLE = 4


def _ensemble(factory: Callable) -> Builder:
    """``ENSEMBLE`` members with ``factory(COEFF)`` in one ``jax.vmap``ped step,
    against one jitted step running them one after the other (a Python loop, so
    the cost model counts every member)."""

    def build(problem: Problem) -> Versus:
        tx = optax.chain(factory(COEFF), problem.sgd())
        step = _step_fn(problem, tx)
        init = jax.jit(problem.module.init)
        keys = jax.random.split(jax.random.key(1), ENSEMBLE)
        members = [init(k, problem.x[:1]) for k in keys]
        carries = [(m["params"], tx.init(m["params"]), None) for m in members]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *carries)
        vmapped = jax.jit(jax.vmap(step, in_axes=(0, None, None)), donate_argnums=0)

        def one_by_one() -> Stepper:
            loop = jax.jit(
                lambda cs, x, y: [step(c, x, y) for c in cs], donate_argnums=0
            )
            return Stepper(loop, _copy(carries))

        return Versus(Stepper(vmapped, stacked), one_by_one, "members one by one")

    return build


def _jacobian_margin(classes: str, method: str) -> Builder:
    def term(problem: Problem, params: Any, x, key) -> jax.Array:
        logits = functools.partial(problem.apply, params)
        classifier = models.classifier_kernel(params)
        return mr.jacobian_margin_penalty(
            logits, x, classes=classes, key=key, classifier=classifier, method=method
        )

    return _penalty(term, keyed=True)


def _jacobian_frobenius(problem: Problem, params: Any, x, key) -> jax.Array:
    logits = functools.partial(problem.apply, params)
    return mr.jacobian_frobenius_penalty(logits, x, key=key)


def _input_gradient(problem: Problem, params: Any, x, y) -> jax.Array:
    return mr.input_gradient_penalty(_per_sample_loss(problem, params), x, y)


def _tangent_prop(problem: Problem, params: Any, x, y) -> jax.Array:
    logits = functools.partial(problem.apply, params)
    return mr.tangent_prop_penalty(logits, x, mr.image_tangents(x))


def _with_loss(loss: Callable) -> Builder:
    """A case: plain SGD on ``loss(problem, params, x, y)``."""
    return lambda problem: train_step(problem, loss=functools.partial(loss, problem))


def _adversarial_loss(problem: Problem, params: Any, x, y) -> jax.Array:
    """Yoshida's eq. (3), α = 0.5, ε = 1."""
    return mr.adversarial_loss(_per_sample_loss(problem, params), x, y, epsilon=1.0)


def _augmented_loss(problem: Problem, params: Any, x, y) -> jax.Array:
    """The loss on each image shifted by up to 2 pixels and rotated."""
    # A key that depends on the batch, so that XLA cannot fold the draws away.
    key = jax.random.fold_in(jax.random.key(0), jnp.sum(y))
    return problem.loss(params, recipes.augment_images(x, key, 2.0), y)


BAGGING_MEMBERS = 5


def _bagging(problem: Problem) -> Stepper:
    """k members, each on its bootstrap resample of the batch, as one vmapped step."""
    member = _step_fn(problem, problem.sgd())
    idx = bagging.bootstrap_indices(jax.random.key(1), BAGGING_MEMBERS, len(problem.x))

    def step(carry, x, y):
        return jax.vmap(member)(carry, x[idx], y[idx])

    one = train_step(problem).carry
    carry = jax.tree.map(lambda a: jnp.stack([a] * BAGGING_MEMBERS), one)
    return Stepper(jax.jit(step, donate_argnums=0), carry)


_ALL, _MLP, _IMAGES = tuple(MODELS), ("mlp",), ("mlp", "cnn")
_SPECTRAL, _DECAY = mr.spectral_norm_regularization, mr.eigenvalue_decay
_MATRICES = functools.partial(_layouts, conv="matrix")
_OPERATORS = functools.partial(_layouts, conv="operator")
CASES: dict[str, Case] = {
    "spectral_norm_regularization": Case(_chained(_SPECTRAL), _ALL),
    "eigenvalue_decay": Case(_chained(_DECAY), _ALL),
    # Each scanned block's, each attention projection's own matrix.
    "spectral_norm_regularization_layouts": Case(
        _chained(_SPECTRAL, _MATRICES), ("transformer",)
    ),
    "eigenvalue_decay_layouts": Case(_chained(_DECAY, _MATRICES), ("transformer",)),
    # Each convolution as the linear map it is on its input (mr.ConvOperator).
    "spectral_norm_regularization_conv_operator": Case(
        _chained(_SPECTRAL, _OPERATORS), ("cnn", "vgg11", "resnet18")
    ),
    "spectral_norm_penalty": Case(_spectral_norm_penalty, _ALL),
    "eigenvalue_decay_penalty": Case(_penalty(_eigenvalue_decay_penalty), _ALL),
    # ½ Σ σ² by a full SVD in the loss: the cost power iteration avoids.
    "exact_svd_penalty": Case(_penalty(_exact_svd_penalty), _MLP, False),
    "adareg_last_layer": Case(_adareg_last_layer, _ALL),
    # Every kernel, between re-solves: d²p + dp² multiply-adds per kernel and step.
    "adareg_all_layers": Case(_chained(mr.adareg, None), _MLP, False),
    # The re-solve stays a real branch under vmap; the SVDs run member by member.
    "adareg_ensemble": Case(_ensemble(mr.adareg), _MLP),
    "spectral_norm_regularization_ensemble": Case(_ensemble(_SPECTRAL), _MLP),
    # One random class per sample (Sokolić's DNN setup) by one batched VJP, or by
    # per-sample jacrev (the cost it avoids); all classes (the CNN setup).
    "jacobian_margin_vjp": Case(_jacobian_margin("random", "vjp"), _ALL),
    "jacobian_margin_jacrev": Case(_jacobian_margin("random", "jacrev"), _MLP, False),
    "jacobian_margin_all": Case(_jacobian_margin("all", "vjp"), _IMAGES),
    # One random projection per sample (Hoffman et al.'s default).
    "jacobian_frobenius": Case(_penalty(_jacobian_frobenius, keyed=True), _MLP),
    "input_gradient_penalty": Case(_penalty(_input_gradient), _MLP),
    "adversarial_loss": Case(_with_loss(_adversarial_loss), _MLP),
    # Deep Learning book ch. 7, as `margin-regs compare` applies them.
    "tangent_prop": Case(_penalty(_tangent_prop), _IMAGES),
    "augmentation": Case(_with_loss(_augmented_loss), _IMAGES),
    "l2_init": Case(_chained(recipes.tie_to_init, None), _IMAGES),
    "bagging": Case(_bagging, _IMAGES),
}


def register(
    name: str, models: Sequence[str] | None = None, *, by_default: bool = True
) -> Callable[[Builder], Builder]:
    """Decorator adding the case ``name``, run on each of ``models`` (default all)."""

    def add(builder: Builder) -> Builder:
        if name in CASES:
            raise ValueError(f"benchmark case {name!r} is already registered")
        CASES[name] = Case(builder, tuple(models or MODELS), by_default)
        return builder

    return add


def cost_model(stepper: Stepper, x: jax.Array, y: jax.Array) -> Costs:
    """FLOPs and bytes accessed of one compiled step, from XLA's cost analysis."""
    return compiled_costs(stepper.compile(x, y))


def compiled_costs(compiled: Any) -> Costs:
    """FLOPs and bytes accessed of a compiled executable (``Lowered.compile()``).

    XLA counts a loop's body once, a conditional's costliest branch, and nothing
    inside a LAPACK call.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_regs.experiments.bench import compiled_costs
      >>> a = jnp.ones((8, 8))
      >>> compiled_costs(jax.jit(jnp.matmul).lower(a, a).compile())  # 2·8³ FLOPs
      Costs(flops=1024.0, bytes=768.0)
    """
    costs = compiled.cost_analysis()
    costs = (costs[0] if isinstance(costs, list) else costs) or {}
    return Costs(*(float(costs.get(k, math.nan)) for k in ("flops", "bytes accessed")))


class Timing(NamedTuple):
    """Interleaved timings of cases ``B`` against a baseline ``A`` and its copy
    ``A'``: the first case's median ``time(B)/time(A)`` over rounds (``ratio``) and
    its IQR (``spread``), the null's median ``time(A')/time(A)`` (``null``) and IQR
    (``null_spread``), the median seconds per baseline step, the steps per block,
    the rounds done, and every case's medians (``ratios``) and IQRs (``spreads``).
    """

    ratio: float
    null: float
    spread: float
    baseline_seconds: float
    steps_per_block: int
    rounds: int
    ratios: tuple[float, ...]
    spreads: tuple[float, ...]
    null_spread: float


def _block(stepper: Stepper, n: int, x: jax.Array, y: jax.Array) -> float:
    """Seconds for ``n`` steps, ending in ``block_until_ready``."""
    step, carry = stepper.compile(x, y), stepper.carry
    start = time.perf_counter()
    for _ in range(n):
        carry = step(carry, x, y)
    jax.block_until_ready(carry)
    elapsed = time.perf_counter() - start
    stepper.carry = carry
    return elapsed


def measure(
    baseline: Stepper,
    null: Stepper,
    cases: Stepper | Sequence[Stepper],
    x: jax.Array,
    y: jax.Array,
    *,
    rounds: int = 40,
    block_seconds: float = 0.05,
    steps: int | None = None,
    max_seconds: float | None = None,
    warmup: int = 3,
) -> Timing:
    """Median paired ratios ``B/A`` and ``A'/A`` over rounds, each round a block of
    every stepper in a random order, after ``warmup`` untimed steps each.

    Args:
      baseline: the stepper ``A`` (plain SGD).
      null: ``A'``, a separately compiled copy of ``A``.
      cases: the stepper(s) ``B`` being measured.
      x: the batch's inputs, seen by every step.
      y: the batch's labels.
      rounds: paired rounds, at most.
      block_seconds: a baseline block's target length; sets ``steps`` if not given.
      steps: steps per block (skips the calibration: for slow models).
      max_seconds: stop after this many seconds of rounds (5 rounds at least).
      warmup: untimed single steps per stepper first.
    """
    steppers = [baseline, null, *([cases] if isinstance(cases, Stepper) else cases)]
    for s in steppers:
        for _ in range(warmup):
            _block(s, 1, x, y)
    if steps is None:
        per_step = min(_block(baseline, 1, x, y) for _ in range(3))
        steps = max(1, round(block_seconds / max(per_step, 1e-9)))
    order, times, start = np.random.default_rng(0), [], time.perf_counter()
    for r in range(rounds):
        if r >= 5 and max_seconds and time.perf_counter() - start > max_seconds:
            break
        row = np.zeros(len(steppers))
        for i in order.permutation(len(steppers)):
            row[i] = _block(steppers[i], steps, x, y)
        times.append(row)
    return _paired(np.array(times), steps)


def _paired(times: np.ndarray, steps: int) -> Timing:
    """The :class:`Timing` of block seconds ``times``, a row a round, its columns
    ``A``, ``A'`` and each case."""
    ratios = times[:, 1:] / times[:, :1]  # the null's, then each case's
    medians = np.median(ratios, axis=0).tolist()
    # The IQR as statistics.quantiles's default method takes it (from 3 rounds).
    q1, q3 = np.percentile(ratios, [25, 75], axis=0, method="weibull")
    iqr = (q3 - q1).tolist() if len(times) > 1 else [math.nan] * len(medians)
    seconds = float(np.median(times[:, 0])) / steps
    head = (medians[1], medians[0], iqr[1], seconds, steps, len(times))
    return Timing(*head, tuple(medians[1:]), tuple(iqr[1:]), iqr[0])


class Result(NamedTuple):
    """The figures of one case on one model at one batch size.

    Ratios are case/reference, the reference plain SGD unless ``against`` names
    another: XLA's cost-model ``flops_ratio`` and ``bytes_ratio``; the median
    paired time ``ratio`` and its IQR ``spread``, the null control's median ``A'/A``
    and IQR (``null_spread``), the reference's median ``baseline_ms`` per step, over
    ``rounds`` (0: cost model only, times NaN) of ``steps_per_block`` steps; the
    seconds XLA took to compile the case's step and the reference's.
    """

    case: str
    model: str
    batch_size: int
    flops_ratio: float
    bytes_ratio: float
    ratio: float = math.nan
    spread: float = math.nan
    null: float = math.nan
    null_spread: float = math.nan
    baseline_ms: float = math.nan
    rounds: int = 0
    steps_per_block: int = 0
    compile_seconds: float = math.nan
    baseline_compile_seconds: float = math.nan
    against: str = "plain SGD"


def _parts(built: Stepper | Amortised) -> tuple[list[Stepper], np.ndarray]:
    """The steps of a case and the weights of their figures in the case's."""
    if isinstance(built, Stepper):
        return [built], np.ones(1)
    weights = np.array([built.period - 1, 1]) / built.period
    return [built.steady, built.periodic], weights


def _costs(built: Stepper | Amortised, problem: Problem) -> Costs:
    steppers, weights = _parts(built)
    costs = np.array([cost_model(s, problem.x, problem.y) for s in steppers])
    if isinstance(built, Amortised) and built.event_costs is not None:
        costs[0] -= built.event_costs()
    return Costs(*(weights @ costs).tolist())


def _select(cases: Sequence[str]) -> list[str]:
    """Registered names matching ``cases``, in the order of the patterns given."""
    names = [
        n
        for p in cases
        for n, c in CASES.items()
        if n == p or (c.by_default and fnmatch.fnmatch(n, p))
    ]
    if not names:
        raise ValueError(f"no benchmark case matches {list(cases)}; have {list(CASES)}")
    return list(dict.fromkeys(names))


def _figures(name: str, base: tuple, timed: bool, settings: dict) -> Result:
    """The cost-model ratios of one case, and its timing if ``timed``."""
    problem, reference, null = base
    built, against = CASES[name].build(problem), "plain SGD"
    if isinstance(built, Versus):
        reference, null = built.reference(), built.reference()
        built, against = built.case, built.against
    reference_costs = _costs(reference, problem)
    steppers, weights = _parts(built)
    result = Result(
        name,
        problem.model,
        len(problem.x),
        *np.divide(_costs(built, problem), reference_costs).tolist(),
        compile_seconds=steppers[0].compile_seconds,
        baseline_compile_seconds=reference.compile_seconds,
        against=against,
    )
    if not timed:
        return result
    t = measure(reference, null, steppers, problem.x, problem.y, **settings)
    return result._replace(
        ratio=float(np.dot(weights, t.ratios)),
        spread=float(np.dot(weights, t.spreads)),
        null=t.null,
        null_spread=t.null_spread,
        baseline_ms=1e3 * t.baseline_seconds,
        rounds=t.rounds,
        steps_per_block=t.steps_per_block,
    )


def _print_result(result: Result) -> None:
    print(format_result(result), flush=True)


def run(
    cases: Sequence[str] = ("*",),
    models: Sequence[str] = tuple(MODELS),
    batch_sizes: Sequence[int] = (BATCH_SIZE,),
    *,
    timed_batch_sizes: Sequence[int] | None = None,
    tiny: bool = False,
    log: Callable[[Result], None] | None = _print_result,
    **settings: Any,
) -> list[Result]:
    """Cost-model figures, and timings where asked, per (model, case, batch size).

    Args:
      cases: names or ``fnmatch`` patterns of registered cases, run in this order.
      models: model names; a case runs only on the models it registered for.
      batch_sizes: batch sizes for the cost model.
      timed_batch_sizes: those also timed (default all; ``()``: cost model alone).
      tiny: the models' tiny copies (a smoke run; tests).
      log: called with each result as it comes (default print; ``None``: silent).
      **settings: passed to :func:`measure` (``rounds``, ``steps``, ...).
    """
    names = _select(cases)
    timed = batch_sizes if timed_batch_sizes is None else timed_batch_sizes
    results = []
    for model in models:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; have {list(MODELS)}")
        bases: dict[int, tuple] = {}  # a problem, plain SGD and the null's copy
        for name in (n for n in names if model in CASES[n].models):
            for size in batch_sizes:
                if size not in bases:
                    problem = make_problem(model, size, tiny=tiny)
                    bases[size] = (problem, train_step(problem), train_step(problem))
                results.append(_figures(name, bases[size], size in timed, settings))
                if log is not None:
                    log(results[-1])
    return results


def format_result(r: Result) -> str:
    """One line: cost-model ratios, compile seconds, then the timing."""
    line = (
        f"{r.model:11s} {r.batch_size:5d} {r.case:38s} "
        f"flops {r.flops_ratio:6.3f}x  bytes {r.bytes_ratio:6.3f}x  "
        f"compile {r.compile_seconds:6.1f}s ({r.baseline_compile_seconds:.1f}s)"
    )
    if r.rounds:
        line += (
            f"  time {r.ratio:6.3f}x (IQR {r.spread:5.3f}; null {r.null:5.3f}x, "
            f"IQR {r.null_spread:5.3f}; {r.baseline_ms:8.2f} ms/step, "
            f"{r.rounds} rounds x {r.steps_per_block} steps)"
        )
    return line + ("" if r.against == "plain SGD" else f"  vs {r.against}")


def build_parser(
    parser: argparse.ArgumentParser | None = None,
) -> argparse.ArgumentParser:
    """The ``bench`` arguments, added to ``parser`` (for the CLI) or a new one."""
    parser = parser or argparse.ArgumentParser(prog="margin-regs bench")
    pairs = sum(len(CASES[n].models) for n in _select(["*"]))
    parser.description = __doc__.splitlines()[0]
    parser.epilog = (
        f"Defaults: every default case on every model it registers for ({pairs} "
        "pairs), the cost model at batch 128 and 4096, timing at batch 128 for at "
        f"most 30 s a pair: up to {pairs * 30 / 60:.0f} min of timing plus "
        "compilation (a few seconds a step on the MLP, about a minute on ResNet-18 "
        "and VGG-11). --quick --tiny is a smoke run of a few minutes; "
        "--timed-batch-sizes with no value gives the cost model alone."
    )
    add = parser.add_argument
    add(
        "--cases",
        nargs="+",
        default=["*"],
        help=f"case names or patterns (default: all): {', '.join(CASES)}",
    )
    about = "; ".join(f"{k}: {v.description}" for k, v in MODELS.items())
    add("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help=about)
    add(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=list(BATCH_SIZES),
        help="batch sizes for the cost model (default: 128 4096)",
    )
    add(
        "--timed-batch-sizes",
        nargs="*",
        type=int,
        default=[BATCH_SIZE],
        help="those also timed (default: 128; none: the cost model alone)",
    )
    add("--rounds", type=int, help="paired rounds per case, at most")
    add("--steps", type=int, help="steps per timed block (slow models)")
    add(
        "--seconds",
        type=float,
        help="timed seconds per case, at most (default 30; 4 with --quick)",
    )
    add(
        "--quick",
        action="store_true",
        help="short rounds for a few seconds per case: a smoke run, noisy figures",
    )
    add(
        "--tiny",
        action="store_true",
        help="tiny copies of the models (widths of a few units): a smoke run",
    )
    add("--json", help="also write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks from command-line arguments and print one line per case."""
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmarks for parsed ``bench`` arguments (shared with the CLI)."""
    device = jax.devices()[0]
    meta = {
        "jax": jax.__version__,
        "device": device.device_kind,
        "platform": device.platform,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    print(
        f"jax {meta['jax']} on {meta['device']} (load {meta['load_average']:.1f}); "
        "flops/bytes = XLA's cost model of one step, case/plain SGD; time = median "
        "paired time(case)/time(plain SGD, or the case's own reference); null = a "
        "second copy of the reference; compile = seconds to compile (reference's)",
        file=sys.stderr,
    )
    results: list[Result] = []

    def log(result: Result) -> None:
        # Written after every result, so a long run that is stopped keeps its figures.
        _print_result(result)
        results.append(result)
        if args.json:
            meta["load_average_end"] = os.getloadavg()[0]
            with open(args.json, "w") as f:
                json.dump(to_json(meta, results), f, indent=2)

    run(
        args.cases,
        args.models,
        args.batch_sizes,
        timed_batch_sizes=args.timed_batch_sizes,
        tiny=args.tiny,
        log=log,
        rounds=args.rounds or 400,
        steps=args.steps,
        block_seconds=0.02 if args.quick else 0.05,
        max_seconds=args.seconds or (4.0 if args.quick else 30.0),
        warmup=1 if args.quick else 3,
    )
    return 0


def to_json(meta: dict[str, Any], results: Sequence[Result]) -> dict[str, Any]:
    """``{"meta": ..., "results": [...]}`` with ``null`` for NaN (strict JSON)."""
    rows = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row}
        for row in (r._asdict().items() for r in results)
    ]
    return {"meta": meta, "results": rows}


def from_json(data: dict[str, Any]) -> list[Result]:
    """The :class:`Result` list of :func:`to_json`'s output."""
    fields = set(Result._fields)
    return [
        Result(
            **{k: math.nan if v is None else v for k, v in row.items() if k in fields}
        )
        for row in data["results"]
    ]
