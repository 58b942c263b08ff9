"""Pytree plumbing shared by every module: masks, readable paths, shape groups.

Masks follow ``optax.masked``: a pytree of bools with the params' structure (or a
prefix of it), or a callable ``params -> such a pytree``. Masked-out positions of
penalty state hold ``optax.MaskedNode()``, exactly as the state of a transform
wrapped in ``optax.masked`` does, so the two forms share one state layout.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

Mask = Any | Callable[[Any], Any] | None

NON_WEIGHT_NAMES = frozenset({"bias", "b", "scale", "embedding", "embeddings"})

__all__ = [
    "NON_WEIGHT_NAMES",
    "Mask",
    "check_weight",
    "default_mask",
    "group_by_shape",
    "is_float",
    "is_masked_node",
    "mask_by_path",
    "path_name",
    "resolve_mask",
    "select",
]


def _last_key(path: Sequence[Any]) -> str:
    name = path_name(path)
    return name.rsplit("/", 1)[-1]


def _is_equinox_embedding(x: Any) -> bool:
    # equinox is imported only if the user uses it, and then params may hold one.
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(x, eqx.nn.Embedding)


def is_float(x: Any) -> bool:
    """Whether ``x`` holds real or complex floats: integer and boolean leaves
    (counters, step numbers, masks) are never weights."""
    dtype = getattr(x, "dtype", None) or jax.numpy.result_type(x)
    return jax.numpy.issubdtype(dtype, jax.numpy.inexact)


def default_mask(params: Any) -> Any:
    """``True`` at the weight matrices of ``params``, ``False`` elsewhere.

    A leaf is selected iff ``ndim >= 2``, its dtype is a float (never an integer or
    boolean), its last path key is not in :data:`NON_WEIGHT_NAMES` (``bias``,
    ``b``, ``scale``, ``embedding``, ``embeddings``) and it is not inside an
    ``equinox.nn.Embedding``.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_regs._tree import default_mask
      >>> default_mask({"kernel": jnp.ones((2, 3)), "bias": jnp.ones((4, 3)),
      ...               "count": jnp.ones((2, 2), int), "w": jnp.ones(3)})
      {'bias': False, 'count': False, 'kernel': True, 'w': False}
    """

    def pick(path, x):
        if _is_equinox_embedding(x):
            return jax.tree.map(lambda _: False, x)
        return (
            jax.numpy.ndim(x) >= 2
            and is_float(x)
            and _last_key(path) not in NON_WEIGHT_NAMES
        )

    return jax.tree_util.tree_map_with_path(pick, params, is_leaf=_is_equinox_embedding)


def is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def resolve_mask(mask: Mask, params: Any) -> Any:
    """The full boolean pytree that ``mask`` selects on ``params``.

    ``None`` means :func:`default_mask`; a callable is called on ``params``; a
    prefix pytree is broadcast to the params' structure, as ``optax.masked`` does.
    """
    if mask is None:
        return default_mask(params)
    tree = mask(params) if callable(mask) else mask
    return jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), tree, params)


def select(params: Any, mask: Mask) -> Any:
    """``params`` with masked-out leaves replaced by ``optax.MaskedNode()``.

    Raises:
      ValueError: if the mask selects a leaf with fewer than two dimensions or of
        an integer or boolean dtype; such a leaf is not a weight matrix (the error
        names its path).
    """
    full = resolve_mask(mask, params)

    def pick(path, m, p):
        if not m:
            return optax.MaskedNode()
        check_weight(p, path_name(path))
        return p

    return jax.tree.map_with_path(pick, full, params)


def check_weight(x: Any, where: str) -> None:
    """A ValueError naming ``where`` unless ``x`` can be a weight matrix."""
    if jax.numpy.ndim(x) < 2:
        raise ValueError(
            f"the mask selects {where!r} of shape {jax.numpy.shape(x)}, "
            "which is not a weight matrix (ndim < 2); mask it out"
        )
    if not is_float(x):
        raise ValueError(
            f"{where!r} of dtype {x.dtype} is selected but is not a weight "
            "(integer and boolean leaves never are); mask it out or give it None"
        )


def path_name(path: Sequence[Any]) -> str:
    """A readable ``'a/b/kernel'`` name for a key path.

    Works for flax linen dicts, ``nnx.State`` (whose leaves end in a ``.value``
    attribute, dropped here), plain dicts, lists and NamedTuples.
    """
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def group_by_shape(arrays: Sequence[jax.Array]) -> dict[tuple, list[int]]:
    """Indices of ``arrays`` grouped by (shape, dtype), in first-seen order.

    Same-shaped matrices are stacked and handled by one batched call (one matmul,
    one ``eigh``) instead of one small call each.
    """
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault((tuple(a.shape), jax.numpy.dtype(a.dtype)), []).append(i)
    return groups


def mask_by_path(pattern: str) -> Callable[[Any], Any]:
    """A callable mask selecting the weight matrices whose path matches ``pattern``.

    A leaf is selected when ``re.search(pattern, path)`` matches its readable path
    (``'Dense_2/kernel'``; flax linen dicts, ``nnx.State`` and plain dicts alike),
    it has ``ndim >= 2`` and a float dtype, so a layer's name selects its kernel,
    not its bias or an integer counter.

    Args:
      pattern: a regular expression, searched in each leaf's path.

    Returns:
      A callable ``params -> pytree of bools``, usable as any ``mask`` argument.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
      ...           "Dense_1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> mr.mask_by_path(r"Dense_1/")(params)
      {'Dense_0': {'bias': False, 'kernel': False}, 'Dense_1': {'bias': False, 'kernel': True}}
    """
    regex = re.compile(pattern)

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, x: (
                jax.numpy.ndim(x) >= 2
                and is_float(x)
                and regex.search(path_name(path)) is not None
            ),
            params,
        )

    return mask
