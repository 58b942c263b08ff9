# %% [markdown]
# # Eigenvalue Decay (Ludwig et al.)
#
# **The claim.** Adding `C · Σ_k √λ_dom(W_k W_kᵀ)` to the loss, i.e. `C` times the
# spectral norm `σ(W_k)` of each weight matrix, raises a lower bound on the
# classification margin. Their Theorem 1: for a correctly classified training
# example `x_i`, the margin satisfies
#
# `m_i ≥ µ / Π_k √λ_dom(W_k W_kᵀ) = µ / Π_k σ(W_k)`,
#
# with `µ` a term that involves the projections of `x_i` onto the decision surface
# (no closed form). Eigenvalue Decay shrinks the denominator; the paper says itself
# that this does not assure a larger margin, since `µ` also depends on the weights.
# Its experiments (Table 2) report small accuracy gains over dropout-regularized
# Keras models at 1.35× to over 5× the cost per epoch, "given the cost associated
# with the computation of the dominant eigenvalue by the power method".
#
# **Two implementations, one regularizer.** The *seed-faithful* penalty
# (`mr.eigenvalue_decay_penalty`) does what the authors' Keras code does: 9 power
# iterations on `M = KᵀK` from an all-ones vector, `λ = (Mv·v)/(v·v)`, and autodiff
# through all of it. The *fast* transform (`mr.eigenvalue_decay`) adds the same
# gradient, `C · u vᵀ`, directly, from one power iteration per step whose vector is
# carried in the optimizer state. This notebook trains both, checks they have the
# same effect, compares their cost, and follows the `1/Π σ` factor of the bound over
# training.
#
# **Setting.** Sokolić et al.'s MLP (two hidden layers of 32 units) on the 8×8
# digits, cross-entropy (the loss of Ludwig et al.'s experiments), Nesterov SGD, the
# regularizer on every weight matrix. The paper chose `C` by 5-fold cross-validation
# and does not report it; we use `C = 0.03`, large enough to see its effect at this
# scale.

# %%
import os

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import margin_regs as mr
from margin_regs.experiments import bench, training
from margin_regs.experiments.data import load_digits, prepare
from margin_regs.experiments.models import logits_fn, make_model
from margin_regs.experiments.recipes import RECIPES, Recipe
from margin_regs.experiments.reproduce.verdicts import Claim, judge

# The test suite sets MARGIN_REGS_SMOKE=1 to run every notebook on tiny settings.
SMOKE = os.environ.get("MARGIN_REGS_SMOKE") == "1"
EPOCHS = 3 if SMOKE else 40
SEEDS = (0,) if SMOKE else (0, 1)
C = 0.03

data = prepare(load_digits(), seed=0)
config = training.TrainConfig(model="mlp", epochs=EPOCHS, batch_size=32)

# %% [markdown]
# ## Two recipes for the same regularizer
#
# The registry of the shared training loop already has the seed-faithful penalty
# (`"eigenvalue_decay"`). Adding the fast transform is one entry.

# %%
recipes = {
    **RECIPES,
    "eigenvalue_decay_fast": Recipe(
        "Eigenvalue Decay as an optax transform: adds C·u vᵀ, 1 persisted power iteration",
        "Ludwig et al.; margin_regs.eigenvalue_decay",
        coeff=C,
        coeff_name="C",
        transform=lambda c, setup: mr.eigenvalue_decay(c),
    ),
}
methods = {"vanilla": None, "eigenvalue_decay": C, "eigenvalue_decay_fast": C}
runs = {
    (name, seed): training.run(
        name, data, seed=seed, config=config, coeff=coeff, recipes=recipes
    )
    for name, coeff in methods.items()
    for seed in SEEDS
}

# %% [markdown]
# ## Same effect?
#
# Final spectral norms per layer, accuracy, and the median first-order input margin
# on the test set (the distance to the decision boundary of the network linearised at
# each test digit, `mr.input_margin_estimates`), averaged over seeds.

# %%
layers = list(runs["vanilla", SEEDS[0]].final["sigma_max"])
print(
    f"{'method':22s} {'test acc':>8s} "
    + " ".join(f"{'σ ' + k.split('/')[0]:>13s}" for k in layers)
    + f" {'input margin':>12s}"
)
summary = {}
for name in methods:
    rs = [runs[name, s] for s in SEEDS]
    summary[name] = {
        "test_acc": np.mean([r.final["test_acc"] for r in rs]),
        "sigma": {k: np.mean([r.final["sigma_max"][k] for r in rs]) for k in layers},
        "margin": np.mean([np.median(r.input_margins) for r in rs]),
    }
    s = summary[name]
    print(
        f"{name:22s} {s['test_acc']:8.3f} "
        + " ".join(f"{s['sigma'][k]:13.3f}" for k in layers)
        + f" {s['margin']:12.3f}"
    )

# %% [markdown]
# ## Cost
#
# An epoch on the digits takes milliseconds, too little to time reliably on a
# shared CPU. `margin_regs.experiments.bench` times training steps side by side instead, at the
# MNIST scale of the papers (a 784-392-392-10 MLP, batch 128): blocks of plain SGD
# steps (`A`), regularized steps (`B`) and a second copy of plain SGD (`A'`, the null
# control) run interleaved in random order; the figure is the median paired ratio
# `B/A`, meaningful where it stands clear of the null ratio `A'/A`.

# %%
# Compiling the MNIST-sized steps dominates a short run, so the small settings the
# test suite uses skip the measurement (the benchmark has its own tests).
if not SMOKE:
    costs = bench.run(
        cases=("eigenvalue_decay", "eigenvalue_decay_penalty"),
        models=("mlp",),
        rounds=20,
    )

# %% [markdown]
# ## Theorem 1 over training: the `1 / Π_k σ(W_k)` factor
#
# The bound divides by the product of the hidden layers' spectral norms. The loop
# records every layer's `σ_max` after each epoch.

# %%
hidden = [k for k in layers if k.startswith("hidden")]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for name in methods:
    history = runs[name, SEEDS[0]].history
    product = np.prod([history["sigma_max"][k] for k in hidden], axis=0)
    axes[0].plot(1 / product, label=name)
    axes[1].plot(history["test_acc"], label=name)
axes[0].set(title="1 / Π σ(W_k), hidden layers (Thm 1's factor)", xlabel="epoch")
axes[1].set(title="test accuracy", xlabel="epoch")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Margins at the end of training
#
# Left: the first-order input-margin estimates on the test set. Right: a margin
# bound that *is* computable, Sokolić et al.'s Theorem 5 with spectral norms
# (`mr.margin_lower_bounds`): the geometric output margin divided by the same
# product of hidden spectral norms as Ludwig's bound. Every sample's true margin is
# at least its bound.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
model = make_model("mlp", data.num_classes)
for name in methods:
    r = runs[name, SEEDS[0]]
    axes[0].hist(r.input_margins, bins=40, histtype="step", label=name)
    logits = logits_fn(model, r.params)(jnp.asarray(data.x_test))
    margins = mr.output_margins(
        logits, data.y_test, classifier=r.params["classifier"]["kernel"]
    )
    bounds = mr.margin_lower_bounds(
        margins, r.params, mask=mr.mask_by_path("hidden"), margin_type="geometric"
    )["spectral"]
    axes[1].hist(np.asarray(bounds), bins=40, histtype="step", label=name)
axes[0].set(title="input-margin estimates (test)", xlabel="distance")
axes[1].set(title="certified lower bounds (Sokolić Thm 5, spectral)", xlabel="distance")
axes[0].legend()
plt.tight_layout()
plt.show()

# %%
v, p, f = (summary[m] for m in methods)
print(
    "penalty and transform agree on every layer's σ within 10%:",
    all(abs(p["sigma"][k] - f["sigma"][k]) <= 0.1 * p["sigma"][k] for k in layers),
)
# Shrinking σ and gaining accuracy are "A beats vanilla" claims on paired runs (the
# same seeds' data and initialization), judged by the reproduce package's rule: the
# paired difference over seeds and its 95% t-interval (one seed: inconclusive).
results = {
    "digits": {
        name: {
            "test_acc": [runs[name, s].final["test_acc"] for s in SEEDS],
            **{k: [runs[name, s].final["sigma_max"][k] for s in SEEDS] for k in layers},
        }
        for name in methods
    }
}
for name in ("eigenvalue_decay", "eigenvalue_decay_fast"):
    for metric in ("test_acc", *layers):
        claim = Claim(
            f"{name} beats vanilla on {metric}",
            "Ludwig et al.",
            name,
            "vanilla",
            ("digits",),
            metric=metric,
            higher_is_better=metric == "test_acc",
        )
        judgement = judge(claim, results)
        d = judgement.difference
        interval = "" if d.low is None else f" [{d.low:+.4f}, {d.high:+.4f}]"
        print(f"{claim.text}: {judgement.verdict} ({d.mean:+.4f}{interval})")
print(
    "median input margin, vanilla / penalty / transform:",
    f"{v['margin']:.3f} / {p['margin']:.3f} / {f['margin']:.3f}",
)

# %% [markdown]
# ## Did it reproduce?
#
# Measured with the default settings above (2 seeds, 40 epochs; about two minutes on
# a 2-core CPU, the benchmark included):
#
# | method | test acc | σ classifier | σ hidden_0 | σ hidden_1 | median input margin | step cost (MNIST MLP) |
# |---|---|---|---|---|---|---|
# | vanilla | 0.958 | 2.99 | 2.81 | 2.96 | 0.456 | 1 |
# | penalty (9 iterations, autodiff) | 0.957 | 2.48 | 2.45 | 2.56 | 0.476 | 1.7–2.0× |
# | transform (1 persisted iteration) | 0.955 | 2.37 | 2.34 | 2.43 | 0.481 | 1.08–1.21× |
#
# * **Same effect: yes.** The seed-faithful penalty and the fast transform shrink
#   every layer's spectral norm by 13–21% and agree with each other within about
#   5%; the transform pulls slightly harder, probably because its `u vᵀ` comes from
#   a vector converged over many steps while nine iterations from the all-ones
#   vector are not fully converged. Their accuracies agree within 0.2 points.
# * **Cost: the paper's observation reproduced, and removed.** Differentiating
#   through nine power iterations costs 1.7–2.0× a plain SGD step (the paper's
#   Table 2: 1.35× to over 5× per epoch); the transform's one persisted iteration
#   costs 1.08–1.21×, close to the noise floor of the null control (0.94–1.11×),
#   over three runs of the benchmark. XLA's count of bytes accessed per step, which
#   no other process can disturb, says the same: 5.3× for the penalty, 1.2× for the
#   transform.
# * **Theorem 1's factor: reproduced.** `1 / Π_k σ(W_k)` falls during training for
#   every method, and ends 33% (penalty) to 47% (transform) higher with Eigenvalue
#   Decay than without: the denominator of the bound is what the method controls.
#   The margin itself moves much less: the median input-margin estimate grows by
#   5% (0.456 → 0.48), as the paper warns (`µ` depends on the weights too).
# * **Accuracy: no gain at this scale** (the paper's gains are 0.4–2.7 points over
#   dropout-regularized Keras models; here all three are within 0.3 points, with
#   `C` not tuned by cross-validation).
# * **The paired verdicts** (the reproduce package's rule, same run): both
#   implementations lower every layer's σ below vanilla's, **reproduced** per layer
#   (penalty: by 0.36 to 0.51, the transform: by 0.47 to 0.63, every 95% interval
#   above 0 despite two seeds). Accuracy: the penalty's −0.08 points is
#   **inconclusive** ([−1.15, +0.98]); the transform's −0.34 points reads **not
#   reproduced** with a zero-width interval, because it is exactly two of the 597
#   test digits on both seeds: the rule has no minimum effect size, and two seeds
#   cannot tell a two-digit difference from noise.
