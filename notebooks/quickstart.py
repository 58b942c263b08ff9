# %% [markdown]
# # margin_regs quickstart
#
# `margin_regs` packages large-margin regularizers for JAX in two forms:
#
# 1. **optax transforms**, chained before the optimizer: they add the regularizer's
#    gradient to the weights' gradients and keep their iteration state (power-iteration
#    vectors, precision matrices) in the optimizer state.
# 2. **penalty functions** that return a scalar to add to the loss in your own Flax
#    `train_step`.
#
# This notebook trains a small Flax `nnx` MLP on scikit-learn's 8×8 digits both ways,
# then runs each diagnostic in one cell. It takes about a minute on a laptop CPU. The
# four method notebooks (`spectral_norm`, `eigenvalue_decay`, `jacobian_margin`,
# `adareg`) each reproduce one paper's claim.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import margin_regs as mr
from margin_regs.experiments.data import load_digits, prepare

# The test suite sets MARGIN_REGS_SMOKE=1 to run every notebook on tiny settings.
SMOKE = os.environ.get("MARGIN_REGS_SMOKE") == "1"
EPOCHS = 2 if SMOKE else 30
BATCH = 64

# %% [markdown]
# ## Data and model
#
# `load_digits` holds out a fixed test set of 597 digits; `prepare` holds out a
# validation set and draws a training subset (here: 600 samples).

# %%
data = prepare(load_digits(), train_size=600, seed=0)
x_train = jnp.asarray(data.x_train.reshape(len(data.x_train), -1))
x_test = jnp.asarray(data.x_test.reshape(len(data.x_test), -1))
y_train, y_test = jnp.asarray(data.y_train), jnp.asarray(data.y_test)
print(x_train.shape, x_test.shape)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(64, 128, rngs=rngs)
        self.hidden2 = nnx.Linear(128, 128, rngs=rngs)
        self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.hidden1(x))
        x = jax.nn.relu(self.hidden2(x))
        return self.out(x)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(model, x, y):
    return float(jnp.mean(jnp.argmax(model(x), -1) == y))


def minibatches(epoch):
    order = np.random.default_rng(epoch).permutation(len(x_train))
    for start in range(0, len(order) - BATCH + 1, BATCH):
        idx = order[start : start + BATCH]
        yield x_train[idx], y_train[idx]


# %% [markdown]
# ## Form 1: an optax transform
#
# `mr.spectral_norm_regularization(coeff)` adds `coeff · σ u vᵀ` to the gradient of
# every weight matrix (Yoshida & Miyato, Alg. 1), with `u, v` carried across steps
# by one power iteration per step. Biases are left alone by default. `nnx.Optimizer`
# passes the parameters to the transform, which it needs.

# %%
model = MLP(nnx.Rngs(0))
tx = optax.chain(
    mr.spectral_norm_regularization(0.01),
    optax.sgd(0.05, momentum=0.9, nesterov=True),
)
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
    optimizer.update(model, grads)
    return loss


for epoch in range(EPOCHS):
    for x, y in minibatches(epoch):
        train_step(model, optimizer, x, y)
spectral_model = model
print(
    f"spectral (transform): train acc {accuracy(model, x_train, y_train):.3f}, "
    f"test acc {accuracy(model, x_test, y_test):.3f}"
)

# %% [markdown]
# ## Form 2: penalties in your own `train_step`
#
# The same regularizer as a penalty: `mr.spectral_norm_penalty` returns `½ Σ σ²` and
# the next power-iteration state, and its gradient is exactly the transform's
# `σ u vᵀ`. Next to it, the input-space penalty of Sokolić et al.:
# `mr.jacobian_margin_penalty(logits_fn, x)` is the classifier-normalised norm of the
# input gradient of a logit, differentiated twice (double backprop). Penalties take
# the parameter pytree (`nnx.state(model, nnx.Param)`), so they work on any model.

# %%
model = MLP(nnx.Rngs(0))
optimizer = nnx.Optimizer(
    model, optax.sgd(0.05, momentum=0.9, nesterov=True), wrt=nnx.Param
)
power_state = mr.init_power_iteration(nnx.state(model, nnx.Param), jax.random.key(0))


@nnx.jit
def penalized_step(model, optimizer, power_state, x, y, key):
    def loss_fn(model):
        params = nnx.state(model, nnx.Param)
        spectral, new_state = mr.spectral_norm_penalty(params, power_state)
        margin = mr.jacobian_margin_penalty(
            model, x, classes="random", key=key, classifier=model.out.kernel[...]
        )
        return cross_entropy(model(x), y) + 0.01 * spectral + 0.01 * margin, new_state

    (loss, new_state), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, new_state


key = jax.random.key(1)
for epoch in range(EPOCHS):
    for x, y in minibatches(epoch):
        key, step_key = jax.random.split(key)
        loss, power_state = penalized_step(
            model, optimizer, power_state, x, y, step_key
        )
penalized_model = model
print(
    f"spectral + Jacobian (penalties): train acc "
    f"{accuracy(model, x_train, y_train):.3f}, test acc {accuracy(model, x_test, y_test):.3f}"
)

# %% [markdown]
# ## Diagnostics, one per cell
#
# Each takes the parameter pytree (any container: linen dict, `nnx.State`, plain
# dict) or the model as a function of its input, and returns arrays keyed by a
# readable parameter path. They are jittable; jitting the input-space ones, as here,
# saves most of their time.

# %%
graphdef, params = nnx.split(spectral_model, nnx.Param)


def apply(params, x):
    return nnx.merge(graphdef, params)(x)


print({k: round(float(v), 3) for k, v in mr.spectral_norms(params).items()})

# %%
print({k: round(float(v), 2) for k, v in mr.stable_ranks(params).items()})

# %%
fig, ax = plt.subplots(figsize=(5, 3))
for name, sv in mr.singular_value_spectra(params).items():
    ax.plot(np.asarray(sv), label=name)
ax.set(xlabel="index", ylabel="singular value", title="singular value spectra")
ax.legend()
plt.tight_layout()
plt.show()

# %%
margins = mr.output_margins(apply(params, x_test), y_test)
print(f"median output margin z_y − max_j z_j: {float(jnp.median(margins)):.3f}")

# %%
input_margins = jax.jit(
    lambda p, x, y: mr.input_margin_estimates(lambda b: apply(p, b), x, y)
)(params, x_test, y_test)
fig, ax = plt.subplots(figsize=(5, 3))
ax.hist(np.asarray(input_margins), bins=40)
ax.set(xlabel="first-order distance to the decision boundary", ylabel="test samples")
plt.tight_layout()
plt.show()

# %%
bounds = mr.margin_lower_bounds(margins, params)
print(
    "median certified distance to the boundary (Sokolić Thm 3/5): "
    f"{float(jnp.median(bounds['spectral'])):.4f} with spectral norms, "
    f"{float(jnp.median(bounds['frobenius'])):.4f} with Frobenius norms"
)


# %%
def per_sample_loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y)


grad_norms = jax.jit(
    lambda p, x, y: mr.input_gradient_norms(lambda b, t: per_sample_loss(p, b, t), x, y)
)(params, x_test, y_test)
print(f"mean ‖∇ₓ L‖ on test data: {float(grad_norms.mean()):.4f}")

# %%
top = jax.jit(
    lambda p: mr.hessian_max_eigenvalue(
        lambda q, batch: per_sample_loss(q, *batch).mean(),
        p,
        (x_train, y_train),
        n_iterations=20,
        key=0,
    )
)(params)
print(f"top Hessian eigenvalue of the training loss: {float(top):.3f}")

# %%
# Yoshida & Miyato's gap: min (train − test accuracy) over the epochs whose test
# accuracy exceeds the threshold; here on made-up curves.
gap = mr.generalization_gap([0.90, 0.99, 1.00], [0.85, 0.93, 0.95], threshold=0.9)
print(f"generalization gap at threshold 0.9: {float(gap):.3f}")
