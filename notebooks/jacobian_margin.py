# %% [markdown]
# # The Jacobian large-margin regularizer (Sokolić et al., 2017)
#
# **The claim.** A network's input margin `γ_in(x)` (the distance from `x` to the
# nearest decision boundary) is large when its output margin is large *and* the
# network does not shrink distances in the direction normal to the boundary. They
# train with the multi-class hinge loss (a large output margin) and penalise, per
# training sample, `‖v_cᵀ J(x_i)‖₂ / ‖v_c‖₂`, the norm of the input gradient of one
# class score `z_c` normalised by its classification vector (eq. 26). The paper's
# Table I: on MNIST with 256, 512 and 1,024 training samples, this **LM**
# regularizer beats weight decay (**WD**) for every training-set size, loss and
# depth, and WD is never worse than no regularization; the differences are largest
# for the smallest training sets.
#
# **The setting here, scaled down.** The 8×8 digits with 128, 256 and 512 training
# samples (of 1,080), Sokolić et al.'s MLP (hidden layers of half the input width:
# 32 units), the multi-class hinge loss for all three methods, SGD with Nesterov
# momentum. Coefficients from the paper's grids, picked once at this scale:
# `λ_WD = 10⁻³`, `λ_LM = 0.3` (the penalty averages over the batch, which is the
# paper's coefficient divided by the batch size). The LM penalty uses one random
# class per sample, as in the paper's MLP experiments. The test set (597 digits) is
# the same for every run.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import margin_regs as mr
from margin_regs.experiments import training
from margin_regs.experiments.data import load_digits, prepare
from margin_regs.experiments.models import classifier_kernel
from margin_regs.experiments.recipes import Recipe
from margin_regs.experiments.reproduce.verdicts import Claim, judge

# The test suite sets MARGIN_REGS_SMOKE=1 to run every notebook on tiny settings.
SMOKE = os.environ.get("MARGIN_REGS_SMOKE") == "1"
TRAIN_SIZES = (64,) if SMOKE else (128, 256, 512)
SEEDS = (0,) if SMOKE else (0, 1)
EPOCHS = 3 if SMOKE else 100
config = training.TrainConfig(
    model="mlp", epochs=EPOCHS, batch_size=32, learning_rate=0.05
)
full = load_digits()

# %% [markdown]
# ## Three recipes: hinge, hinge + WD, hinge + LM
#
# Each is one entry of the shared loop's registry: a loss that replaces the
# cross-entropy, plus an optax transform or a penalty.


# %%
def hinge(ctx, coeff):
    logits = ctx.apply(ctx.params, ctx.x)
    return jnp.mean(optax.losses.multiclass_hinge_loss(logits, ctx.y))


def large_margin_penalty(ctx, coeff):
    return coeff * mr.jacobian_margin_penalty(
        ctx.logits_fn(),
        ctx.x,
        classes="random",
        key=ctx.key,
        classifier=classifier_kernel(ctx.params),
    )


recipes = {
    "no reg.": Recipe("hinge loss", "Sokolić et al. Table I", loss=hinge),
    "WD": Recipe(
        "hinge + weight decay",
        "Sokolić et al. Table I",
        coeff=1e-3,
        loss=hinge,
        transform=lambda c, setup: optax.add_decayed_weights(
            c, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        ),
    ),
    "LM": Recipe(
        "hinge + Jacobian large-margin penalty",
        "Sokolić et al. eq. (26), Table I",
        coeff=0.3,
        loss=hinge,
        penalty=large_margin_penalty,
    ),
}
runs = {
    (size, name, seed): training.run(
        name,
        prepare(full, train_size=size, seed=seed),
        seed=seed,
        config=config,
        recipes=recipes,
    )
    for size in TRAIN_SIZES
    for name in recipes
    for seed in SEEDS
}

# %% [markdown]
# ## Table I, scaled down: test accuracy [%]
#
# Final-epoch test accuracy, mean over seeds (the paper reports the best test
# accuracy over training; the final one does not peek at the test set).

# %%
print(f"{'train size':>10s} " + " ".join(f"{name:>8s}" for name in recipes))
table = {}
for size in TRAIN_SIZES:
    for name in recipes:
        table[size, name] = 100 * np.mean(
            [runs[size, name, s].final["test_acc"] for s in SEEDS]
        )
    print(f"{size:10d} " + " ".join(f"{table[size, n]:8.2f}" for n in recipes))

# %% [markdown]
# ## Input margins
#
# The first-order distance of each test digit to the nearest decision boundary
# (`mr.input_margin_estimates`; negative when misclassified), for the smallest
# training set.

# %%
size = TRAIN_SIZES[0]
fig, ax = plt.subplots(figsize=(6, 3.2))
bins = np.linspace(-1.0, 2.0, 61)
for name in recipes:
    margins = np.concatenate([runs[size, name, s].input_margins for s in SEEDS])
    ax.hist(
        np.clip(margins, bins[0], bins[-1]),
        bins=bins,
        histtype="step",
        label=f"{name} (median {np.median(margins):.3f})",
    )
ax.set(
    title=f"input-margin estimates, {size} training samples",
    xlabel="distance to the nearest boundary",
    ylabel="test samples",
)
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The verdicts, by the reproduce package's rule
#
# Every method of a training-set size trains on the same per-seed split and
# initialization, so the evidence for "A beats B" is the paired difference of test
# accuracy over seeds with its 95% t-interval; `judge` applies the rule of
# `margin_regs.experiments.reproduce` (reproduced when the interval lies above 0,
# or above −tolerance for an "at least as good" claim; with one seed, no interval
# and so inconclusive).

# %%
results = {
    f"n={size}": {
        name: {"test_acc": [runs[size, name, s].final["test_acc"] for s in SEEDS]}
        for name in recipes
    }
    for size in TRAIN_SIZES
}
claims = (
    Claim("LM > WD", "Table I", "LM", "WD", tuple(results)),
    Claim(
        "WD ≥ no reg. (tolerance 0.5 points)",
        "Table I",
        "WD",
        "no reg.",
        tuple(results),
        kind="at_least",
        tolerance=0.005,
    ),
)


def points(d):
    interval = "" if d.low is None else f" [{100 * d.low:+.2f}, {100 * d.high:+.2f}]"
    return f"{100 * d.mean:+.2f}{interval} points"


for claim in claims:
    judgement = judge(claim, results)
    print(f"{claim.text}: {judgement.verdict} ({points(judgement.difference)})")
    for cell, (cell_verdict, d) in judgement.cells.items():
        print(f"  {cell}: {cell_verdict} ({points(d)})")

# %% [markdown]
# ## Did it reproduce?
#
# **The seed means agree with the paper; two seeds are too few for the verdict
# rule to confirm it.** Measured with the default settings above (2 seeds, 100
# epochs; 2-core CPU, about two minutes), final test accuracy [%]:
#
# | training samples | no reg. | WD | LM |
# |---|---|---|---|
# | 128 | 88.78 | 88.94 | **91.96** |
# | 256 | 91.21 | 92.46 | **94.89** |
# | 512 | 93.72 | 94.89 | **96.40** |
#
# As in the paper's Table I, LM beats WD at every training-set size, WD is never
# worse than no regularization, and LM's lead over WD shrinks as the training set
# grows (+3.0, +2.4, +1.5 points). The margin mechanism shows too: with 128
# training samples the median input-margin estimate on the test set is 0.47 with LM
# against 0.37 (no reg.) and 0.39 (WD). Caveats: two seeds, one architecture, and the coefficients
# were picked once at this scale (from the paper's grids), not by cross-validation
# per setting as the paper does.
#
# The paired verdicts (same run) are all **inconclusive**: LM − WD is +2.32 points
# pooled over the three sizes with 95% interval [−4.42, +9.06] (per size +3.02,
# +2.43, +1.51), WD − no reg. +0.87 [−5.87, +7.61]. With two seeds the interval's
# t-quantile is 12.7, so the interval is wide unless the two seeds' differences
# nearly coincide; `margin-regs reproduce sokolic-table1` runs the paper's own
# protocol (Table I: CNNs on MNIST) with three seeds.
