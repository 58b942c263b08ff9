"""Optimizer states in the form their maths depends on, for equality checks."""

import jax

import margin_regs as mr


def canonical(tree):
    """``tree`` with AdaReg's factored precisions replaced by dense Ω_in, Ω_out.

    An eigenbasis is unique only up to signs and rotations within repeated
    eigenvalues (the ``upper`` block), so two runs whose precisions agree to
    rounding can hold bases that differ by O(1); the dense matrices and the kernel
    at the last re-solve are what every later step depends on.
    """
    return jax.tree.map(
        lambda x: (
            (x.omega_in, x.omega_out, x.anchor)
            if isinstance(x, mr.AdaRegPrecisions)
            else x
        ),
        tree,
        is_leaf=lambda x: isinstance(x, mr.AdaRegPrecisions),
    )
