"""What every method repeats, in one place: keys, coefficients, argument checks.

The role optax's ``base.NO_PARAMS_MSG`` and ``utils.canonicalize_key`` play there:
one key conversion, one "needs params" message, one way to read a coefficient at the
step count, and one set of hyperparameter checks, each raising an error that names
the argument and the function it was given to.

Checks apply to every value known where a transform is built: Python and numpy
numbers, concrete ``jax.Array``s, and a schedule's value at step 0. A tracer (under
``jit``, or ``optax.inject_hyperparams`` inside a jitted update) cannot raise; there
:func:`coeff_at` turns a negative or non-finite coefficient into NaN.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "NO_PARAMS_MSG",
    "as_key",
    "check_bounds",
    "check_coeff",
    "check_label_range",
    "check_positive",
    "check_positive_int",
    "coeff_at",
    "is_number",
    "labels_in_range",
    "needs_params",
]

NO_PARAMS_MSG = "{name} needs params: call update(updates, state, params)"


def needs_params(name: str) -> ValueError:
    """The error a transform's ``update`` raises when ``params`` is None."""
    return ValueError(NO_PARAMS_MSG.format(name=name))


def as_key(key: jax.Array | int | None, what: str | None = None) -> jax.Array:
    """A typed ``jax.random`` key from an int seed, a typed key or a raw ``PRNGKey``.

    Python ints and numpy integers (``np.int64(3)``) are seeds and give the same key
    as the equal int; an integer array of shape ``()`` (a traced seed) too.

    Args:
      key: a typed key, a raw ``uint32`` key of shape ``(2,)``, or an int seed.
      what: what needs the key; given, ``key=None`` raises a ValueError naming it.

    Returns:
      A typed key.

    Example:
      >>> import jax, numpy as np
      >>> from margin_regs._common import as_key
      >>> bool(jax.random.key_data(as_key(np.int64(3))).tolist()
      ...      == jax.random.key_data(jax.random.key(3)).tolist())
      True
    """
    if key is None:
        raise ValueError(
            f"{what or 'this function'} needs a key (a jax.random key or an int seed)"
        )
    if isinstance(key, bool):
        raise TypeError(f"a key must be a jax.random key or an int seed, got {key!r}")
    if isinstance(key, numbers.Integral):
        return jax.random.key(int(key))
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.ndim == 0 and jnp.issubdtype(key.dtype, jnp.integer):
        return jax.random.key(key)
    return jax.random.wrap_key_data(key)


def coeff_at(coeff: optax.ScalarOrSchedule, count: jax.Array) -> Any:
    """``coeff(count)`` for a schedule, ``coeff`` itself otherwise; NaN if bad.

    A Python number was checked where the transform was built and is returned as
    it is. An array, a tracer (under ``jit`` or ``optax.inject_hyperparams``) or a
    schedule's value can be negative or non-finite where nothing can raise: there
    the coefficient becomes NaN, so the update is NaN (which
    ``optax.apply_if_finite`` skips), never a finite step of gradient ascent.
    """
    if is_number(coeff):
        return coeff
    value = jnp.asarray(coeff(count) if callable(coeff) else coeff)
    return jnp.where(jnp.isfinite(value) & (value >= 0), value, jnp.nan)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a concrete scalar number (not an array, tracer or schedule)."""
    return (
        isinstance(value, numbers.Real | np.ndarray | np.generic)
        and np.ndim(value) == 0
    )


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a float64 array when it is known now: numbers, numpy and
    concrete jax arrays; ``None`` for tracers (under ``jit``), whose values are not."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, np.float64)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None


def _check_type(value: Any, name: str, fn: str) -> None:
    if isinstance(value, bool) or isinstance(value, str | bytes):
        raise TypeError(f"{fn}: {name} must be a number, got {value!r}")


def check_coeff(value: Any, name: str, fn: str) -> None:
    """``value`` finite and ≥ 0: a number, a concrete array, or a schedule at step 0.

    A schedule is evaluated at step 0 here (it is cheap); its later values, and
    traced values, are guarded by :func:`coeff_at` (NaN, never a wrong step).

    Raises:
      TypeError: for a bool or a string.
      ValueError: for a negative, NaN or infinite value.
    """
    _check_type(value, name, fn)
    where = name
    if callable(value):
        value, where = value(jnp.zeros([], jnp.int32)), f"{name}(0)"
    known = _concrete(value)
    if known is not None and not (np.all(np.isfinite(known)) and np.all(known >= 0)):
        raise ValueError(f"{fn}: {where} must be finite and >= 0, got {value!r}")


def check_positive(value: Any, name: str, fn: str) -> None:
    """``value`` finite and > 0 when it is known (a number or a concrete array)."""
    _check_type(value, name, fn)
    known = _concrete(value)
    if known is not None and not (np.all(np.isfinite(known)) and np.all(known > 0)):
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {value!r}")


def check_positive_int(value: Any, name: str, fn: str) -> None:
    """``value`` a Python (or numpy) int ≥ 1: it shapes the computation.

    Raises:
      TypeError: for a bool, a float (even ``2.0``) or anything else not an int.
      ValueError: for an int < 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be an int >= 1, got {value!r}")


def check_bounds(lower: Any, upper: Any, fn: str) -> None:
    """``0 < lower <= upper``, both finite, for the bounds that are known."""
    check_positive(lower, "lower", fn)
    check_positive(upper, "upper", fn)
    known_lower, known_upper = _concrete(lower), _concrete(upper)
    if (
        known_lower is not None
        and known_upper is not None
        and not np.all(known_lower <= known_upper)
    ):
        raise ValueError(
            f"{fn}: needs lower <= upper, got lower={lower}, upper={upper}"
        )


def labels_in_range(labels: jax.Array, n_classes: int) -> jax.Array:
    """Elementwise ``0 <= labels < n_classes``: where False, results must be NaN.

    Under ``jit`` labels cannot be checked, and indexing with a bad one would pick
    another class (negative indices wrap) or a zero row: a finite wrong number. The
    functions that take labels return NaN there instead.
    """
    return (labels >= 0) & (labels < n_classes)


def check_label_range(labels: jax.Array, n_classes: int) -> None:
    """Raise a ValueError unless ``labels`` are integers in ``[0, n_classes)``.

    The range is checked only when the values are known (not under ``jit``); there,
    :func:`labels_in_range` turns the results of bad labels into NaN.
    """
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    try:
        concrete = np.asarray(labels)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if concrete.size and (concrete.min() < 0 or concrete.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}), got values in "
            f"[{concrete.min()}, {concrete.max()}]"
        )
