"""margin_regs: large-margin regularizers for JAX, as optax transforms and penalties."""

# Each block re-exports one module's public API; keep blocks in import order
# (linalg <- penalties/adareg/jacobian/losses <- transforms <- diagnostics).
from margin_regs.baselines import (
    L1PenaltyState,
    activation_l1_penalty,
    add_input_noise,
    add_l1_penalty,
    l1_penalty,
    max_norm_constraint,
    perturb_weights,
)
from margin_regs.linalg import (
    as_matrix,
    singular_values,
    spectral_norm,
    stable_rank,
)

__version__ = "0.1.0"

__all__ = [
    "L1PenaltyState",
    "activation_l1_penalty",
    "add_input_noise",
    "add_l1_penalty",
    "as_matrix",
    "l1_penalty",
    "max_norm_constraint",
    "perturb_weights",
    "singular_values",
    "spectral_norm",
    "stable_rank",
]
