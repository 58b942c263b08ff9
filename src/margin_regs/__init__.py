"""margin_regs: large-margin regularizers for JAX, as optax transforms and penalties."""

# Each block re-exports one module's public API, sorted by module; imports run one
# way: linalg <- the method modules <- diagnostics.
from margin_regs._adareg import (
    AdaRegPrecisions,
    AdaRegState,
    adareg,
    adareg_penalty,
    adareg_update_precisions,
    init_adareg_precisions,
)
from margin_regs._baselines import (
    L1PenaltyState,
    activation_l1_penalty,
    add_input_noise,
    add_l1_penalty,
    l1_penalty,
    max_norm_constraint,
    perturb_weights,
)
from margin_regs._conv_operator import ConvOperator
from margin_regs._eigenvalue_decay import eigenvalue_decay, eigenvalue_decay_penalty
from margin_regs._infer import infer_weight_dimension_numbers
from margin_regs._jacobian import (
    adversarial_loss,
    input_gradient_penalty,
    jacobian_frobenius_penalty,
    jacobian_margin_penalty,
)
from margin_regs._spectral import (
    PowerIterationState,
    init_power_iteration,
    spectral_norm_penalty,
    spectral_norm_regularization,
)
from margin_regs._tangent import image_tangents, tangent_prop_penalty
from margin_regs._tree import mask_by_path
from margin_regs._tying import parameter_tying_penalty
from margin_regs.diagnostics import (
    generalization_gap,
    hessian_max_eigenvalue,
    input_gradient_norms,
    input_margin_estimates,
    margin_lower_bounds,
    output_margins,
    singular_value_spectra,
    spectral_norms,
    stable_ranks,
)
from margin_regs.linalg import (
    as_matrix,
    inv_threshold,
    singular_values,
    spectral_norm,
    stable_rank,
)
from margin_regs.losses import one_vs_all_hinge_loss

__version__ = "0.2.0"

__all__ = [
    "AdaRegPrecisions",
    "AdaRegState",
    "ConvOperator",
    "L1PenaltyState",
    "PowerIterationState",
    "activation_l1_penalty",
    "adareg",
    "adareg_penalty",
    "adareg_update_precisions",
    "add_input_noise",
    "add_l1_penalty",
    "adversarial_loss",
    "as_matrix",
    "eigenvalue_decay",
    "eigenvalue_decay_penalty",
    "generalization_gap",
    "hessian_max_eigenvalue",
    "image_tangents",
    "infer_weight_dimension_numbers",
    "init_adareg_precisions",
    "init_power_iteration",
    "input_gradient_norms",
    "input_gradient_penalty",
    "input_margin_estimates",
    "inv_threshold",
    "jacobian_frobenius_penalty",
    "jacobian_margin_penalty",
    "l1_penalty",
    "margin_lower_bounds",
    "mask_by_path",
    "max_norm_constraint",
    "one_vs_all_hinge_loss",
    "output_margins",
    "parameter_tying_penalty",
    "perturb_weights",
    "singular_value_spectra",
    "singular_values",
    "spectral_norm",
    "spectral_norm_penalty",
    "spectral_norm_regularization",
    "spectral_norms",
    "stable_rank",
    "stable_ranks",
    "tangent_prop_penalty",
]
