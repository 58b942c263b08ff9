"""Overhead benchmarks: a regularized training step against a plain optax SGD step.

Three figures for every (model, batch size, case):

* XLA's cost model of one compiled step: the FLOPs and bytes accessed of the
  case's executable over those of plain SGD's (``compile().cost_analysis()``),
  deterministic, so measured at every batch size. It counts a loop's body once, a
  conditional's costliest branch, and nothing inside a LAPACK call.
* The seconds XLA takes to compile the case's step (the penalties' iteration
  counts must not grow it).
* Timings, on the batch sizes asked for (:func:`measure`): blocks of plain SGD
  ``A``, the case ``B`` and a second copy of ``A`` (the null control ``A'``) in a
  random order each round; the median over rounds of ``B/A`` and of ``A'/A``.

A case may name its own reference instead of plain SGD (:class:`Versus`): the
vmapped ensembles are timed against their members run one by one. Cases live in a
registry (:func:`register`); ``margin-regs bench`` and ``benchmarks/run.py`` call
:func:`main`, and ``benchmarks/readme_table.py`` renders the ``--json`` output.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import json
import math
import os
import statistics
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
    """A benchmark model: a :mod:`~margin_regs.experiments.models` constructor.

    Attributes:
      build: ``(num_classes, **overrides) -> nn.Module``.
      input_shape: one sample's shape, channels last.
      description: what it is, for ``--help`` and the README.
      tiny: the same constructor's overrides, and ``input_shape``, for a copy that
        compiles in a second or two (``--tiny``, tests).
    """

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
    """One model on one synthetic batch: what a case builds its step from.

    Attributes:
      model: the name in :data:`MODELS`.
      module: the Flax module.
      params: the initial parameters (a flax linen dict).
      x: inputs ``(batch, *input_shape)``.
      y: integer labels ``(batch,)``.
    """

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
        logits = self.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def sgd(self) -> optax.GradientTransformation:
        """The baseline optimizer every case shares."""
        return optax.sgd(LEARNING_RATE)


@dataclasses.dataclass
class Stepper:
    """A jitted ``step(carry, x, y) -> carry`` and its current ``carry``.

    Mutable: timing advances ``carry`` in place, because the step donates it, and
    the compiled executable is kept once built (the cost model and the timing use
    the same one).
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
    """A case whose cost recurs every ``period`` steps (AdaReg's re-solve).

    Its figures are ``((period − 1) · steady + periodic) / period``. XLA's cost model
    counts a conditional's costliest branch, so a steady step that skips the event
    under ``lax.cond`` is counted as if it ran it; ``event_costs`` gives the event's
    own cost (compiled alone), which the steady step's figures then leave out.

    Attributes:
      steady: the step between the periodic events.
      periodic: a step in which the event happens every time.
      period: steps per event.
      event_costs: ``() -> Costs`` of the event alone, or ``None``.
    """

    steady: Stepper
    periodic: Stepper
    period: int
    event_costs: Callable[[], Costs] | None = None


class Versus(NamedTuple):
    """A case whose ratios are taken against its own reference, not plain SGD.

    Attributes:
      case: the step measured.
      reference: ``() -> Stepper``, a fresh reference step (called twice: the
        reference and its null control).
      against: what the reference is, for the tables.
    """

    case: Stepper
    reference: Callable[[], Stepper]
    against: str


def make_problem(
    model: str,
    batch_size: int = BATCH_SIZE,
    *,
    seed: int = 0,
    tiny: bool = False,
) -> Problem:
    """The named model, initialised, on a synthetic batch.

    Args:
      model: a name in :data:`MODELS`.
      batch_size: samples in the batch.
      seed: for the batch and the initial parameters.
      tiny: build the model's tiny copy (:attr:`BenchModel.tiny`).

    Returns:
      The :class:`Problem`.
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
) -> Stepper:
    """A fresh jitted SGD step: ``grad`` of the loss, ``tx.update``, apply.

    Args:
      problem: the model and batch.
      tx: the optimizer, by default ``problem.sgd()``; chain a transform before it
        to benchmark the transform.
      penalty: optional ``(params, penalty_state, x, y) -> (value, penalty_state)``
        added to the loss (its state is carried across steps, e.g. power-iteration
        vectors; return ``None`` as state when there is none).
      penalty_state: the penalty's initial state.

    Returns:
      A :class:`Stepper`; each call compiles its own executable, so two calls
      give the independent copies the null control needs.
    """
    tx = problem.sgd() if tx is None else tx
    params = jax.tree.map(jnp.copy, problem.params)
    # The step donates its carry, and a donated buffer may appear only once: copy
    # every leaf, since an initial state may hold one array in two places.
    carry = _copy((params, tx.init(params), penalty_state))
    return Stepper(jax.jit(_step_fn(problem, tx, penalty), donate_argnums=0), carry)


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.copy(), tree)


def _step_fn(
    problem: Problem, tx: optax.GradientTransformation, penalty: Callable | None
) -> Callable[[Any, jax.Array, jax.Array], Any]:
    def objective(params, aux, x, y):
        loss = problem.loss(params, x, y)
        if penalty is None:
            return loss, aux
        value, aux = penalty(params, aux, x, y)
        return loss + value, aux

    def step(carry, x, y):
        params, opt_state, aux = carry
        grads, aux = jax.grad(objective, has_aux=True)(params, aux, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    return step


Builder = Callable[[Problem], "Stepper | Amortised | Versus"]


class Case(NamedTuple):
    """A registered benchmark: how to build its step, and where it runs.

    Attributes:
      build: ``Problem -> Stepper | Amortised | Versus``.
      models: the model names it runs on.
      by_default: whether a pattern such as ``*`` selects it; a slow reference
        case sets ``False`` and runs only when named exactly.
    """

    build: Builder
    models: tuple[str, ...]
    by_default: bool


CASES: dict[str, Case] = {}


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


def _inferred_layouts(problem: Problem, conv: str = "matrix") -> Any:
    """Each kernel's layout read from the traced model (one sample is enough)."""
    return mr.infer_weight_dimension_numbers(
        problem.apply, problem.params, problem.x[:1], conv=conv
    )


def _default_layouts(problem: Problem) -> Any:
    """The library's default layouts, or the inferred ones for the transformer,
    whose scanned ``(layers, in, out)`` kernels have no default (it refuses them)."""
    return _inferred_layouts(problem) if problem.model == "transformer" else None


@register("spectral_norm_regularization")
def _spectral_transform(problem: Problem) -> Stepper:
    transform = mr.spectral_norm_regularization(
        COEFF, weight_dimension_numbers=_default_layouts(problem)
    )
    return train_step(problem, tx=optax.chain(transform, problem.sgd()))


@register("eigenvalue_decay")
def _eigenvalue_decay_transform(problem: Problem) -> Stepper:
    transform = mr.eigenvalue_decay(
        COEFF, weight_dimension_numbers=_default_layouts(problem)
    )
    return train_step(problem, tx=optax.chain(transform, problem.sgd()))


@register("spectral_norm_regularization_layouts", models=("transformer",))
def _spectral_transform_layouts(problem: Problem) -> Stepper:
    """Each scanned block's, each attention projection's true matrix (inferred
    layouts: a batch axis per block, heads folded into the fan-out)."""
    transform = mr.spectral_norm_regularization(
        COEFF, weight_dimension_numbers=_inferred_layouts(problem)
    )
    return train_step(problem, tx=optax.chain(transform, problem.sgd()))


@register("eigenvalue_decay_layouts", models=("transformer",))
def _eigenvalue_decay_layouts(problem: Problem) -> Stepper:
    """The fast Eigenvalue Decay transform on the inferred layouts."""
    transform = mr.eigenvalue_decay(
        COEFF, weight_dimension_numbers=_inferred_layouts(problem)
    )
    return train_step(problem, tx=optax.chain(transform, problem.sgd()))


@register(
    "spectral_norm_regularization_conv_operator", models=("cnn", "vgg11", "resnet18")
)
def _spectral_transform_conv_operator(problem: Problem) -> Stepper:
    """Each convolution as the linear map it is on its input (``mr.ConvOperator``):
    power iteration runs a convolution and its transpose on one input-shaped vector."""
    transform = mr.spectral_norm_regularization(
        COEFF, weight_dimension_numbers=_inferred_layouts(problem, "operator")
    )
    return train_step(problem, tx=optax.chain(transform, problem.sgd()))


@register("spectral_norm_penalty")
def _spectral_penalty(problem: Problem) -> Stepper:
    layouts = _default_layouts(problem)

    def penalty(params, vectors, x, y):
        value, vectors = mr.spectral_norm_penalty(
            params, vectors, weight_dimension_numbers=layouts
        )
        return COEFF * value, vectors

    return train_step(
        problem,
        penalty=penalty,
        penalty_state=mr.init_power_iteration(
            problem.params, 0, weight_dimension_numbers=layouts
        ),
    )


@register("eigenvalue_decay_penalty")
def _eigenvalue_decay_in_loss(problem: Problem) -> Stepper:
    layouts = _default_layouts(problem)
    return train_step(
        problem,
        penalty=lambda params, aux, x, y: (
            COEFF
            * mr.eigenvalue_decay_penalty(params, weight_dimension_numbers=layouts),
            aux,
        ),
    )


@register("exact_svd_penalty", models=("mlp",), by_default=False)
def _exact_svd_penalty(problem: Problem) -> Stepper:
    """½ Σ σ² by a full SVD in the loss: the cost power iteration avoids."""

    def penalty(params, aux, x, y):
        kernels = [k for k in jax.tree.leaves(params) if k.ndim >= 2]
        value = sum(0.5 * mr.singular_values(k)[0] ** 2 for k in kernels)
        return COEFF * value, aux

    return train_step(problem, penalty=penalty)


ADAREG_PERIOD = 500
ADAREG_BOUNDS = {"lower": 0.1, "upper": 10.0}  # the library's defaults


def _adareg_last_layer_step(problem: Problem, update_every: int) -> Stepper:
    # AdaReg on the softmax layer, as in all of Zhao et al. 2019's experiments.
    tx = mr.adareg(
        COEFF, update_every=update_every, mask=models.classifier_mask, **ADAREG_BOUNDS
    )
    return train_step(problem, tx=optax.chain(tx, problem.sgd()))


@register("adareg_last_layer")
def _adareg_last_layer(problem: Problem) -> Amortised:
    """Amortised over the default period: 499 steady steps and one re-solve (two
    ``eigh``), the latter timed from a copy that re-solves at every step. The cost
    model cannot see inside ``eigh`` (a LAPACK call on the CPU)."""

    def resolve_costs() -> Costs:
        solve = jax.jit(
            lambda params, precisions: mr.adareg_update_precisions(
                params, precisions, mask=models.classifier_mask, **ADAREG_BOUNDS
            )
        )
        precisions = mr.init_adareg_precisions(
            problem.params, mask=models.classifier_mask
        )
        return compiled_costs(solve.lower(problem.params, precisions).compile())

    return Amortised(
        _adareg_last_layer_step(problem, ADAREG_PERIOD),
        _adareg_last_layer_step(problem, 1),
        ADAREG_PERIOD,
        resolve_costs,
    )


@register("adareg_all_layers", models=("mlp",), by_default=False)
def _adareg_all_layers(problem: Problem) -> Stepper:
    """Every kernel, between re-solves: d²p + dp² multiply-adds per kernel and step."""
    return train_step(problem, tx=optax.chain(mr.adareg(COEFF), problem.sgd()))


ENSEMBLE = 4


def _ensemble(problem: Problem, tx: optax.GradientTransformation) -> Versus:
    """``ENSEMBLE`` members in one ``jax.vmap``ped step, against one jitted step
    that runs them one after the other (a Python loop, so the cost model counts
    every member)."""
    step = _step_fn(problem, tx, None)
    init = jax.jit(problem.module.init)
    keys = jax.random.split(jax.random.key(1), ENSEMBLE)
    members = [init(k, problem.x[:1])["params"] for k in keys]
    carries = [(p, tx.init(p), None) for p in members]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *carries)
    vmapped = jax.jit(jax.vmap(step, in_axes=(0, None, None)), donate_argnums=0)

    def one_by_one() -> Stepper:
        loop = jax.jit(lambda cs, x, y: [step(c, x, y) for c in cs], donate_argnums=0)
        return Stepper(loop, _copy(carries))

    return Versus(Stepper(vmapped, stacked), one_by_one, "members one by one")


@register("adareg_ensemble", models=("mlp",))
def _adareg_ensemble(problem: Problem) -> Versus:
    """AdaReg on every layer, 4 vmapped members: the re-solve stays a real branch
    and the SVDs run one member at a time (issue 21)."""
    tx = mr.adareg(COEFF, update_every=ADAREG_PERIOD, **ADAREG_BOUNDS)
    return _ensemble(problem, optax.chain(tx, problem.sgd()))


@register("spectral_norm_regularization_ensemble", models=("mlp",))
def _spectral_ensemble(problem: Problem) -> Versus:
    """The spectral transform, 4 vmapped members against the 4 one by one."""
    tx = mr.spectral_norm_regularization(COEFF)
    return _ensemble(problem, optax.chain(tx, problem.sgd()))


@register("jacobian_margin_vjp")
def _jacobian_margin_vjp(problem: Problem) -> Stepper:
    """One random class per sample (Sokolić's DNN setup) from one batched VJP."""
    return _jacobian_margin_case(problem, "random", "vjp")


@register("jacobian_margin_jacrev", models=("mlp",), by_default=False)
def _jacobian_margin_jacrev(problem: Problem) -> Stepper:
    """The same penalty from per-sample vmap(jacrev): the cost the fast path avoids."""
    return _jacobian_margin_case(problem, "random", "jacrev")


@register("jacobian_margin_all", models=("mlp", "cnn"))
def _jacobian_margin_all(problem: Problem) -> Stepper:
    """All classes per sample (Sokolić's CNN setup): one forward, C batched VJPs."""
    return _jacobian_margin_case(problem, "all", "vjp")


def _jacobian_margin_case(problem: Problem, classes: str, method: str) -> Stepper:
    def penalty(params, key, x, y):
        key, sub = jax.random.split(key)
        value = mr.jacobian_margin_penalty(
            lambda b: problem.apply(params, b),
            x,
            classes=classes,
            key=sub,
            classifier=models.classifier_kernel(params),
            method=method,
        )
        return COEFF * value, key

    return train_step(problem, penalty=penalty, penalty_state=jax.random.key(0))


@register("jacobian_frobenius", models=("mlp",))
def _jacobian_frobenius(problem: Problem) -> Stepper:
    """One random projection per sample (Hoffman et al.'s default)."""

    def penalty(params, key, x, y):
        key, sub = jax.random.split(key)
        value = mr.jacobian_frobenius_penalty(
            lambda b: problem.apply(params, b), x, key=sub
        )
        return COEFF * value, key

    return train_step(problem, penalty=penalty, penalty_state=jax.random.key(0))


def _per_sample_loss(problem: Problem, params: Any) -> Callable[..., jax.Array]:
    return lambda x, y: optax.softmax_cross_entropy_with_integer_labels(
        problem.apply(params, x), y
    )


@register("input_gradient_penalty", models=("mlp",))
def _input_gradient(problem: Problem) -> Stepper:
    return train_step(
        problem,
        penalty=lambda params, aux, x, y: (
            COEFF * mr.input_gradient_penalty(_per_sample_loss(problem, params), x, y),
            aux,
        ),
    )


@dataclasses.dataclass(frozen=True)
class _AdversarialProblem(Problem):
    """The same model and batch, with Yoshida's eq. (3) (α = 0.5, ε = 1) as the loss."""

    def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return mr.adversarial_loss(_per_sample_loss(self, params), x, y, epsilon=1.0)


@register("adversarial_loss", models=("mlp",))
def _adversarial(problem: Problem) -> Stepper:
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)}
    return train_step(_AdversarialProblem(**fields))


# Deep Learning book ch. 7, as `margin-regs compare` applies them; image models only
# where the regularizer needs images.
_IMAGE_MODELS = ("mlp", "cnn")


@register("tangent_prop", models=_IMAGE_MODELS)
def _tangent_prop(problem: Problem) -> Stepper:
    def penalty(params, state, x, y):
        logits_fn = functools.partial(problem.apply, params)
        return COEFF * mr.tangent_prop_penalty(
            logits_fn, x, mr.image_tangents(x)
        ), state

    return train_step(problem, penalty=penalty)


@dataclasses.dataclass(frozen=True)
class _AugmentedProblem(Problem):
    """The same model and batch, each image shifted by up to 2 pixels and rotated."""

    def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        # A key that depends on the batch, so that XLA cannot fold the draws away.
        key = jax.random.fold_in(jax.random.key(0), jnp.sum(y))
        return super().loss(params, recipes.augment_images(x, key, 2.0), y)


@register("augmentation", models=_IMAGE_MODELS)
def _augmentation(problem: Problem) -> Stepper:
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)}
    return train_step(_AugmentedProblem(**fields))


@register("l2_init", models=_IMAGE_MODELS)
def _l2_init(problem: Problem) -> Stepper:
    return train_step(
        problem, tx=optax.chain(recipes.tie_to_init(COEFF), problem.sgd())
    )


BAGGING_MEMBERS = 5


@register("bagging", models=_IMAGE_MODELS)
def _bagging(problem: Problem) -> Stepper:
    """k members, each on its bootstrap resample of the batch, as one vmapped step."""
    one = train_step(problem)
    member = _step_fn(problem, problem.sgd(), None)
    idx = bagging.bootstrap_indices(
        jax.random.key(1), BAGGING_MEMBERS, problem.x.shape[0]
    )

    def step(carry, x, y):
        return jax.vmap(member)(carry, x[idx], y[idx])

    carry = jax.tree.map(lambda a: jnp.stack([a] * BAGGING_MEMBERS), one.carry)
    return Stepper(jax.jit(step, donate_argnums=0), carry)


def cost_model(stepper: Stepper, x: jax.Array, y: jax.Array) -> Costs:
    """FLOPs and bytes accessed of one compiled step, from XLA's cost analysis."""
    return compiled_costs(stepper.compile(x, y))


def compiled_costs(compiled: Any) -> Costs:
    """FLOPs and bytes accessed of a compiled executable (``Lowered.compile()``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_regs.experiments.bench import compiled_costs
      >>> a = jnp.ones((8, 8))
      >>> compiled_costs(jax.jit(jnp.matmul).lower(a, a).compile())  # 2·8³ FLOPs
      Costs(flops=1024.0, bytes=768.0)
    """
    costs = compiled.cost_analysis()
    costs = (costs[0] if isinstance(costs, list) else costs) or {}
    return Costs(
        float(costs.get("flops", math.nan)),
        float(costs.get("bytes accessed", math.nan)),
    )


class Timing(NamedTuple):
    """Interleaved timings of one or more cases against a baseline.

    The first six fields describe the first case (the order ``benchmarks/adareg.py``
    reads); ``ratios`` and ``spreads`` hold every case's.

    Attributes:
      ratio: the first case's median over rounds of ``time(B) / time(A)``.
      null: the median of ``time(A') / time(A)``.
      spread: the interquartile range of the first case's per-round ratios.
      baseline_seconds: the median seconds per baseline step.
      steps_per_block: steps in each timed block.
      rounds: rounds done.
      ratios: per case, the median ratio.
      spreads: per case, the interquartile range of its per-round ratios.
      null_spread: the interquartile range of the null's per-round ratios.
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


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return math.nan
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 - q1


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
    min_rounds: int = 5,
    warmup: int = 3,
    seed: int = 0,
) -> Timing:
    """Median paired ratios ``B/A`` and ``A'/A`` over interleaved random-order blocks.

    Args:
      baseline: the stepper ``A`` (plain SGD).
      null: ``A'``, a separately compiled copy of ``A``.
      cases: the stepper(s) ``B`` being measured, interleaved with the others.
      x: the batch's inputs, seen by every step.
      y: the batch's labels.
      rounds: paired rounds; each times one block of each stepper, in random order.
      block_seconds: the target length of a baseline block, which sets the steps
        per block (at least one) unless ``steps`` is given.
      steps: steps per block (skips the calibration: for slow models).
      max_seconds: stop after this many seconds of timed rounds (at least
        ``min_rounds`` rounds run), so slow models cost a bounded time.
      min_rounds: rounds that run whatever ``max_seconds`` says.
      warmup: untimed single steps per stepper first (caches; compiling is done
        before, by :meth:`Stepper.compile`).
      seed: the seed of the block order.

    Returns:
      A :class:`Timing`.
    """
    cases = [cases] if isinstance(cases, Stepper) else list(cases)
    steppers = [baseline, null, *cases]
    for s in steppers:
        for _ in range(warmup):
            _block(s, 1, x, y)
    if steps is None:
        per_step = min(_block(baseline, 1, x, y) for _ in range(3))
        steps = max(1, round(block_seconds / max(per_step, 1e-9)))
    order = np.random.default_rng(seed)
    times: list[list[float]] = []
    start = time.perf_counter()
    for r in range(rounds):
        if (
            r >= min_rounds
            and max_seconds
            and time.perf_counter() - start > max_seconds
        ):
            break
        row = [0.0] * len(steppers)
        for i in order.permutation(len(steppers)):
            row[i] = _block(steppers[i], steps, x, y)
        times.append(row)
    ratios = [[row[i] / row[0] for row in times] for i in range(1, len(steppers))]
    medians = tuple(statistics.median(r) for r in ratios[1:])
    spreads = tuple(_iqr(r) for r in ratios[1:])
    return Timing(
        medians[0],
        statistics.median(ratios[0]),
        spreads[0],
        statistics.median(row[0] for row in times) / steps,
        steps,
        len(times),
        medians,
        spreads,
        _iqr(ratios[0]),
    )


class Result(NamedTuple):
    """The figures of one case on one model at one batch size.

    Attributes:
      case: the registered name.
      model: the model name.
      batch_size: samples per step.
      flops_ratio: XLA's cost-model FLOPs of one compiled step, case/reference
        (plain SGD unless ``against`` says otherwise).
      bytes_ratio: XLA's cost-model bytes accessed, case/reference: the extra
        passes over weights and activations.
      ratio: the median paired time ratio (NaN where not timed).
      spread: the interquartile range of the per-round time ratios.
      null: the null control's median ``A'/A``.
      null_spread: its interquartile range.
      baseline_ms: median milliseconds per reference step.
      rounds: paired rounds timed (0: cost model only).
      steps_per_block: steps in each timed block.
      compile_seconds: seconds XLA took to compile the case's step.
      baseline_compile_seconds: the same for the reference step.
      against: the reference, ``"plain SGD"`` unless the case is a :class:`Versus`.
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


def _amortise(steady: float, periodic: float, period: int) -> float:
    return ((period - 1) * steady + periodic) / period


def _costs(built: Stepper | Amortised, problem: Problem) -> Costs:
    if isinstance(built, Stepper):
        return cost_model(built, problem.x, problem.y)
    steady = cost_model(built.steady, problem.x, problem.y)
    if built.event_costs is not None:
        event = built.event_costs()
        steady = Costs(*(s - e for s, e in zip(steady, event, strict=True)))
    periodic = cost_model(built.periodic, problem.x, problem.y)
    return Costs(
        *(_amortise(s, p, built.period) for s, p in zip(steady, periodic, strict=True))
    )


def _time(
    built: Stepper | Amortised,
    problem: Problem,
    baseline: Stepper,
    null: Stepper,
    **settings: Any,
) -> tuple[float, float, Timing]:
    """``(ratio, spread, timing)``; an amortised case's steps run in one interleave."""
    cases = [built] if isinstance(built, Stepper) else [built.steady, built.periodic]
    timing = measure(baseline, null, cases, problem.x, problem.y, **settings)
    if isinstance(built, Stepper):
        return timing.ratio, timing.spread, timing
    ratio = _amortise(*timing.ratios, built.period)
    return ratio, _amortise(*timing.spreads, built.period), timing


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


class _Baseline(NamedTuple):
    """A problem, its plain step, the null control's copy and the plain step's costs."""

    problem: Problem
    step: Stepper
    null: Stepper
    costs: Costs


def _baseline(model: str, batch_size: int, tiny: bool) -> _Baseline:
    problem = make_problem(model, batch_size, tiny=tiny)
    step = train_step(problem)
    costs = cost_model(step, problem.x, problem.y)
    return _Baseline(problem, step, train_step(problem), costs)


def _compile_seconds(built: Stepper | Amortised) -> float:
    return (built if isinstance(built, Stepper) else built.steady).compile_seconds


def _figures(name: str, base: _Baseline, timed: bool, settings: dict) -> Result:
    """The cost-model ratios of one case, and its timing if ``timed``."""
    problem = base.problem
    built = CASES[name].build(problem)
    against = "plain SGD"
    if isinstance(built, Versus):
        reference, null = built.reference(), built.reference()
        base = base._replace(
            step=reference, null=null, costs=_costs(reference, problem)
        )
        built, against = built.case, built.against
    costs = _costs(built, problem)
    ratios = (c / b for c, b in zip(costs, base.costs, strict=True))
    result = Result(
        name,
        problem.model,
        len(problem.x),
        *ratios,
        compile_seconds=_compile_seconds(built),
        baseline_compile_seconds=base.step.compile_seconds,
        against=against,
    )
    if not timed:
        return result
    ratio, spread, t = _time(built, problem, base.step, base.null, **settings)
    return result._replace(
        ratio=ratio,
        spread=spread,
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
      timed_batch_sizes: those of ``batch_sizes`` that are also timed (default
        all of them; ``()`` for the cost model alone).
      tiny: the models' tiny copies (a smoke run; tests).
      log: called with each result as it comes (default: print one line;
        ``None``: silent).
      **settings: passed to :func:`measure` (``rounds``, ``steps``, ...).

    Returns:
      One :class:`Result` per (model, case, batch size).
    """
    names = _select(cases)
    timed = batch_sizes if timed_batch_sizes is None else timed_batch_sizes
    results = []
    for model in models:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; have {list(MODELS)}")
        bases: dict[int, _Baseline] = {}
        for name in (n for n in names if model in CASES[n].models):
            for batch_size in batch_sizes:
                if batch_size not in bases:
                    bases[batch_size] = _baseline(model, batch_size, tiny)
                base = bases[batch_size]
                results.append(_figures(name, base, batch_size in timed, settings))
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


def _run_time_note() -> str:
    """What a default run does and an upper bound on how long its timing takes."""
    pairs = sum(len(CASES[n].models) for n in _select(["*"]))
    minutes = pairs * 30 / 60
    return (
        f"Defaults: every default case on every model it registers for ({pairs} "
        "pairs), the cost model at batch 128 and 4096, timing at batch 128 for at "
        f"most 30 s a pair: up to {minutes:.0f} min of timing plus compilation (a "
        "few seconds a step on the MLP, about a minute on ResNet-18 and VGG-11). "
        "--quick --tiny is a smoke run of a few minutes; --timed-batch-sizes with "
        "no value gives the cost model alone."
    )


def build_parser(
    parser: argparse.ArgumentParser | None = None,
) -> argparse.ArgumentParser:
    """The ``bench`` arguments, added to ``parser`` (for the CLI) or a new one."""
    parser = parser or argparse.ArgumentParser(prog="margin-regs bench")
    parser.description = __doc__.splitlines()[0]
    parser.epilog = _run_time_note()
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["*"],
        help=f"case names or patterns (default: all): {', '.join(CASES)}",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=list(MODELS),
        help="; ".join(f"{k}: {v.description}" for k, v in MODELS.items()),
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=list(BATCH_SIZES),
        help="batch sizes for the cost model (default: 128 4096)",
    )
    parser.add_argument(
        "--timed-batch-sizes",
        nargs="*",
        type=int,
        default=[BATCH_SIZE],
        help="those also timed (default: 128; none: the cost model alone)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="paired rounds per case, at most"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per timed block (slow models)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="timed seconds per case, at most (default 30; 4 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short rounds for a few seconds per case: a smoke run, noisy figures",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny copies of the models (widths of a few units): a smoke run",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks from command-line arguments and print one line per case."""
    args = build_parser().parse_args(argv)
    return run_from_args(args)


def _meta() -> dict[str, Any]:
    return {
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmarks for parsed ``bench`` arguments (shared with the CLI)."""
    meta = _meta()
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
        rounds=args.rounds or 400,
        steps=args.steps,
        block_seconds=0.02 if args.quick else 0.05,
        max_seconds=args.seconds or (4.0 if args.quick else 30.0),
        warmup=1 if args.quick else 3,
        tiny=args.tiny,
        log=log,
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
    return [
        Result(
            **{
                k: math.nan if v is None else v
                for k, v in row.items()
                if k in Result._fields
            }
        )
        for row in data["results"]
    ]
