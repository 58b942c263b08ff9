"""Overhead benchmarks: a regularized training step against a plain optax SGD step.

Every case is timed side by side with the baseline in one process, on the same
synthetic batch: blocks of steps of the baseline ``A``, the case ``B`` and a
second, separately compiled copy of the baseline ``A'`` (the null control) run in
a random order each round, each block ends in ``block_until_ready``, and the
reported figure is the median over rounds of the paired ratio ``B/A``. The null
control's median ``A'/A`` shows the noise floor of the machine: a ratio is only
meaningful where it stands clear of it. Next to it stands XLA's cost-model estimate
of the bytes one compiled step accesses, ``B/A``, which no other process can
disturb: it shows the extra passes over the weights a case makes.

Cases live in a registry, so other modules' benchmarks are one decorated builder::

    @register("my_regularizer")
    def _my_regularizer(problem: Problem) -> Stepper:
        return train_step(problem, tx=optax.chain(my_transform(0.01), problem.sgd()))

``margin-regs bench`` and ``benchmarks/run.py`` call :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import margin_regs as mr
from margin_regs.experiments.models import (
    classifier_kernel,
    classifier_mask,
    make_model,
)

__all__ = [
    "CASES",
    "MODELS",
    "Case",
    "Problem",
    "Result",
    "Stepper",
    "build_parser",
    "main",
    "make_problem",
    "measure",
    "register",
    "run",
    "run_from_args",
    "train_step",
]

BATCH_SIZE = 128
LEARNING_RATE = 0.01
COEFF = 0.01


# The reference models on MNIST shapes: "mlp" is Sokolić et al.'s and Yoshida &
# Miyato's 784-392-392-10, "cnn" Sokolić et al.'s two conv-pool stages.
MODELS: tuple[str, ...] = ("mlp", "cnn")
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Problem:
    """One model on one synthetic batch: what a case builds its step from.

    Attributes:
      model: the name in :data:`MODELS` (a :mod:`~margin_regs.experiments.models`
        reference model).
      apply: ``(params, x) -> logits``.
      params: the initial parameters (a flax linen dict).
      x: inputs ``(batch, 28, 28, 1)``.
      y: integer labels ``(batch,)``.
    """

    model: str
    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any
    x: jax.Array
    y: jax.Array

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

    Mutable: timing advances ``carry`` in place, because the step donates it.
    """

    step: Callable[[Any, jax.Array, jax.Array], Any]
    carry: Any


def make_problem(model: str, seed: int = 0) -> Problem:
    """The named model, initialised, on a synthetic batch of 128 (MNIST shapes)."""
    module = make_model(model, NUM_CLASSES)
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (BATCH_SIZE, 28, 28, 1), jnp.float32)
    y = jax.random.randint(ky, (BATCH_SIZE,), 0, NUM_CLASSES)
    params = module.init(kp, x[:1])["params"]
    return Problem(model, lambda p, x: module.apply({"params": p}, x), params, x, y)


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

    params = jax.tree.map(jnp.copy, problem.params)
    carry = (params, tx.init(params), penalty_state)
    return Stepper(jax.jit(step, donate_argnums=0), carry)


Builder = Callable[[Problem], Stepper]


class Case(NamedTuple):
    """A registered benchmark: how to build its step, and where it runs.

    Attributes:
      build: ``Problem -> Stepper``.
      models: the model names it runs on.
      by_default: whether a pattern such as ``*`` selects it; a slow reference
        case sets ``False`` and runs only when named exactly.
    """

    build: Builder
    models: tuple[str, ...]
    by_default: bool


CASES: dict[str, Case] = {}


def register(
    name: str, models: Sequence[str] = ("mlp", "cnn"), *, by_default: bool = True
) -> Callable[[Builder], Builder]:
    """Decorator adding the case ``name``, run on each of ``models``, to the registry."""

    def add(builder: Builder) -> Builder:
        if name in CASES:
            raise ValueError(f"benchmark case {name!r} is already registered")
        CASES[name] = Case(builder, tuple(models), by_default)
        return builder

    return add


@register("spectral_norm_regularization")
def _spectral_transform(problem: Problem) -> Stepper:
    return train_step(
        problem, tx=optax.chain(mr.spectral_norm_regularization(COEFF), problem.sgd())
    )


@register("eigenvalue_decay")
def _eigenvalue_decay_transform(problem: Problem) -> Stepper:
    return train_step(
        problem, tx=optax.chain(mr.eigenvalue_decay(COEFF), problem.sgd())
    )


@register("spectral_norm_penalty")
def _spectral_penalty(problem: Problem) -> Stepper:
    def penalty(params, vectors, x, y):
        value, vectors = mr.spectral_norm_penalty(params, vectors)
        return COEFF * value, vectors

    return train_step(
        problem,
        penalty=penalty,
        penalty_state=mr.init_power_iteration(problem.params, 0),
    )


@register("eigenvalue_decay_penalty")
def _eigenvalue_decay_in_loss(problem: Problem) -> Stepper:
    return train_step(
        problem,
        penalty=lambda params, aux, x, y: (
            COEFF * mr.eigenvalue_decay_penalty(params),
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


@register("adareg_last_layer")
def _adareg_last_layer(problem: Problem) -> Stepper:
    """Steady-state step cost: a block rarely holds one of the re-solves (every 500
    steps); ``benchmarks/adareg.py`` times the amortised cost with them."""
    # AdaReg on the softmax layer, as in all of Zhao et al. 2019's experiments.
    tx = optax.chain(mr.adareg(COEFF, mask=classifier_mask), problem.sgd())
    return train_step(problem, tx=tx)


@register("adareg_all_layers", models=("mlp",), by_default=False)
def _adareg_all_layers(problem: Problem) -> Stepper:
    """Every kernel: d²p + dp² multiply-adds per kernel and step."""
    return train_step(problem, tx=optax.chain(mr.adareg(COEFF), problem.sgd()))


@register("jacobian_margin_vjp", models=("mlp",))
def _jacobian_margin_vjp(problem: Problem) -> Stepper:
    """One random class per sample (Sokolić's DNN setup) from one batched VJP."""
    return _jacobian_margin_case(problem, "random", "vjp")


@register("jacobian_margin_jacrev", models=("mlp",), by_default=False)
def _jacobian_margin_jacrev(problem: Problem) -> Stepper:
    """The same penalty from per-sample vmap(jacrev): the cost the fast path avoids."""
    return _jacobian_margin_case(problem, "random", "jacrev")


@register("jacobian_margin_all", models=("mlp",))
def _jacobian_margin_all(problem: Problem) -> Stepper:
    """All classes per sample (Sokolić's CNN setup): one forward, C batched VJPs."""
    return _jacobian_margin_case(problem, "all", "vjp")


def _jacobian_margin_case(problem: Problem, classes: str, method: str) -> Stepper:
    def penalty(params, key, x, y):
        key, sub = jax.random.split(key)
        classifier = classifier_kernel(params)
        value = mr.jacobian_margin_penalty(
            lambda b: problem.apply(params, b),
            x,
            classes=classes,
            key=sub,
            classifier=classifier,
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


class Result(NamedTuple):
    """Median paired ratios of one case on one model.

    Attributes:
      case: the registered name.
      model: the model name.
      ratio: median over rounds of ``time(B) / time(A)``.
      null: median over rounds of ``time(A') / time(A)``, the noise floor.
      spread: interquartile range of the per-round ratios ``B/A``.
      baseline_ms: median milliseconds per baseline step.
      rounds: number of paired rounds.
      steps_per_block: steps in each timed block.
      bytes_ratio: XLA's estimate of bytes accessed by one compiled step, ``B/A``:
        free of timing noise, it counts the extra passes over the weights.
    """

    case: str
    model: str
    ratio: float
    null: float
    spread: float
    baseline_ms: float
    rounds: int
    steps_per_block: int
    bytes_ratio: float


def _bytes_accessed(stepper: Stepper, x: jax.Array, y: jax.Array) -> float:
    """XLA's cost-model bytes accessed by one compiled step (NaN if unavailable)."""
    costs = stepper.step.lower(stepper.carry, x, y).compile().cost_analysis()
    costs = costs[0] if isinstance(costs, list) else costs
    return float((costs or {}).get("bytes accessed", float("nan")))


def _block(stepper: Stepper, n: int, x: jax.Array, y: jax.Array) -> float:
    """Seconds for ``n`` steps, ending in ``block_until_ready``."""
    step, carry = stepper.step, stepper.carry
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
    case: Stepper,
    x: jax.Array,
    y: jax.Array,
    *,
    rounds: int = 40,
    block_seconds: float = 0.05,
    max_seconds: float | None = None,
    warmup: int = 3,
    seed: int = 0,
) -> tuple[float, float, float, float, int, int]:
    """Median paired ratios ``B/A`` and ``A'/A`` over interleaved random-order blocks.

    Args:
      baseline: the stepper ``A`` (plain SGD).
      null: ``A'``, a separately compiled copy of ``A``.
      case: the stepper ``B`` being measured.
      x: the batch's inputs, seen by every step.
      y: the batch's labels.
      rounds: paired rounds; each times one block of each stepper, in random order.
      block_seconds: the target length of a baseline block, which sets the steps
        per block (at least one).
      max_seconds: stop after this many seconds of timed rounds (at least five
        rounds run), so slow models cost a bounded time.
      warmup: untimed blocks per stepper first (compilation, caches).
      seed: the seed of the block order.

    Returns:
      ``(ratio, null_ratio, iqr_of_ratio, baseline_seconds_per_step,
      steps_per_block, rounds_done)``.
    """
    steppers = (baseline, null, case)
    for s in steppers:
        for _ in range(warmup):
            _block(s, 1, x, y)
    per_step = min(_block(steppers[0], 1, x, y) for _ in range(3))
    n = max(1, round(block_seconds / max(per_step, 1e-9)))
    order = np.random.default_rng(seed)
    ratios, nulls, base = [], [], []
    start = time.perf_counter()
    for r in range(rounds):
        if r >= 5 and max_seconds and time.perf_counter() - start > max_seconds:
            break
        times = [0.0, 0.0, 0.0]
        for i in order.permutation(3):
            times[i] = _block(steppers[i], n, x, y)
        ratios.append(times[2] / times[0])
        nulls.append(times[1] / times[0])
        base.append(times[0] / n)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (
        statistics.median(ratios),
        statistics.median(nulls),
        q3 - q1,
        statistics.median(base),
        n,
        len(ratios),
    )


def run(
    cases: Sequence[str] = ("*",),
    models: Sequence[str] = MODELS,
    *,
    rounds: int = 40,
    block_seconds: float = 0.05,
    seconds_per_case: float | None = None,
    warmup: int = 3,
    log: Callable[[str], None] | None = print,
) -> list[Result]:
    """Measure every registered case matching a pattern in ``cases`` on ``models``.

    Args:
      cases: names or ``fnmatch`` patterns of registered cases.
      models: model names; a case runs only on the models it registered for.
      rounds: paired rounds per case (at most).
      block_seconds: target length of one baseline block.
      seconds_per_case: cap on the timed rounds of one case, in seconds.
      warmup: untimed blocks per stepper before timing (the first compiles).
      log: called with one formatted line per result (``None``: silent).

    Returns:
      One :class:`Result` per (case, model) pair.
    """
    names = [
        n
        for n, c in CASES.items()
        if n in cases or (c.by_default and any(fnmatch.fnmatch(n, p) for p in cases))
    ]
    if not names:
        raise ValueError(f"no benchmark case matches {list(cases)}; have {list(CASES)}")
    results = []
    for model in models:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; have {list(MODELS)}")
        problem = make_problem(model)
        baseline, null = train_step(problem), train_step(problem)
        baseline_bytes = _bytes_accessed(baseline, problem.x, problem.y)
        for name in names:
            builder, case_models, _ = CASES[name]
            if model not in case_models:
                continue
            case = builder(problem)
            bytes_ratio = _bytes_accessed(case, problem.x, problem.y) / baseline_bytes
            ratio, null_ratio, spread, per_step, n, done = measure(
                baseline,
                null,
                case,
                problem.x,
                problem.y,
                rounds=rounds,
                block_seconds=block_seconds,
                max_seconds=seconds_per_case,
                warmup=warmup,
            )
            result = Result(
                name,
                model,
                ratio,
                null_ratio,
                spread,
                1e3 * per_step,
                done,
                n,
                bytes_ratio,
            )
            results.append(result)
            if log is not None:
                log(_format(result))
    return results


def _format(r: Result) -> str:
    return (
        f"{r.model:4s} {r.case:34s} {r.ratio:6.3f}x  (null {r.null:5.3f}x, "
        f"IQR {r.spread:5.3f}; bytes {r.bytes_ratio:5.3f}x; "
        f"baseline {r.baseline_ms:7.2f} ms/step, "
        f"{r.rounds} rounds x {r.steps_per_block} steps)"
    )


def build_parser(
    parser: argparse.ArgumentParser | None = None,
) -> argparse.ArgumentParser:
    """The ``bench`` arguments, added to ``parser`` (for the CLI) or a new one."""
    parser = parser or argparse.ArgumentParser(
        prog="margin-regs bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["*"],
        help=f"case names or patterns (default: all): {', '.join(CASES)}",
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS)
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="paired rounds per case, at most"
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
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks from command-line arguments and print one line per case."""
    args = build_parser().parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmarks for parsed ``bench`` arguments (shared with the CLI)."""
    rounds = args.rounds or 400
    seconds = args.seconds or (4.0 if args.quick else 30.0)
    block_seconds = 0.02 if args.quick else 0.05
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; ratio = median "
        "paired time(case)/time(plain SGD); null = a second copy of plain SGD; "
        "bytes = XLA's estimate of bytes accessed per step, case/plain SGD",
        file=sys.stderr,
    )
    results = run(
        args.cases,
        args.models,
        rounds=rounds,
        block_seconds=block_seconds,
        seconds_per_case=seconds,
        warmup=1 if args.quick else 3,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r._asdict() for r in results], f, indent=2)
    return 0
