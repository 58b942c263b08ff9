"""Which linear map each parameter leaf is: layouts, the default mask, operators.

A *layout* names the matrix (or operator) a leaf stands for. For matrices it is
optax's own ``optax.contrib.MuonDimensionNumbers(reduction_axis, output_axis)``,
with ``optax.contrib.muon``'s semantics: the reduction axes are the rows
(fan_in), the output axes the columns (fan_out), and every other axis is a *batch*
axis whose slices are separate matrices: the view is ``(*batch, fan_in, fan_out)``
with the batch axes in their original order. The default layout, for 2-D leaves
and 4-D conv kernels only, is the ``reshape(-1, last)`` view of flax and haiku
kernels (a conv kernel ``(kh, kw, in, out)`` becomes ``(kh·kw·in, out)``, Yoshida
& Miyato's reshape); a selected leaf it cannot know (3-D, a fan-out-first 4-D
``weight``) is refused with its path (:func:`default_layout`).

Typical layouts (``M = MuonDimensionNumbers``)::

    flax Dense kernel (in, out)                    default, M(0, 1)
    DenseGeneral q/k/v kernel (in, heads, head)    M((0,), (1, 2))
    attention out kernel (heads, head, out)        M((0, 1), (2,))
    nn.scan stack (layers, in, out)                M((1,), (2,)): per-layer σ
    equinox Linear weight (out, in)                M(1, 0)
    equinox Conv2d weight (out, in, kh, kw)        M((1, 2, 3), (0,))

The *default mask* selects a leaf iff ``ndim >= 2``, its dtype is a float and its
last path key is not one of ``bias``, ``b`` (haiku), ``scale`` (norms),
``embedding`` (flax, nnx) or ``embeddings`` (haiku), and it is not the ``weight``
of an ``equinox.nn.Embedding``
(:func:`margin_regs._tree.default_mask`): biases, norm scales and embedding tables
are not weight matrices to regularize, whatever their ndim (Goodfellow et al.,
Deep Learning, §7.1). A user's ``mask`` or ``weight_dimension_numbers`` overrides
it.

Every method's maths runs on the operator :func:`make_operator` builds from a
layout (``matvec``, ``rmatvec``, ``outer``, ``singular_values``), so a new kind of
layout is one new operator class and one line in :func:`make_operator`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from margin_regs import _batching, _common, _tree
from margin_regs._conv_operator import ConvOperator

__all__ = [
    "MatrixOperator",
    "MuonDimensionNumbers",
    "WeightDimensionNumbers",
    "check_layout",
    "default_layout",
    "flatten_selected",
    "is_layout",
    "is_spec",
    "make_operator",
    "map_selected",
    "masked_transform",
    "require_matrices",
    "resolve_layouts",
]

WeightDimensionNumbers = Any | Callable[[Any], Any] | None


def is_layout(x: Any) -> bool:
    """Whether ``x`` is one layout value (not a pytree of them)."""
    return isinstance(x, MuonDimensionNumbers | ConvOperator)


def is_spec(x: Any) -> bool:
    """A layout or ``None``: a leaf of a resolved layouts tree."""
    return x is None or is_layout(x)


def _is_nnx_variable(x: Any) -> bool:
    # flax is imported only if the user uses it, and only then can a tree hold one.
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def _unwrap_variables(tree: Any) -> Any:
    """``tree`` with every nnx ``Variable`` holding a layout or ``None`` replaced by it.

    :func:`margin_regs.infer_weight_dimension_numbers` on an ``nnx.State`` returns
    ``Param(layout)`` leaves, but ``nnx.Optimizer`` passes ``tx.init`` the state
    with its ``Param`` wrappers and ``tx.update`` the pure arrays
    (``nnx.as_pure``). Bare layouts are a prefix of both: a layout broadcasts over a
    ``Param(array)`` as over an array.
    """

    def unwrap(x):
        if _is_nnx_variable(x) and is_spec(x.get_value()):
            return x.get_value()
        return x

    return jax.tree.map(
        unwrap, tree, is_leaf=lambda x: is_spec(x) or _is_nnx_variable(x)
    )


def _is_function(wdn: Any) -> bool:
    """Whether ``weight_dimension_numbers`` is a ``params -> layouts`` function.

    A callable that is itself a pytree node is a tree of layouts, not a function:
    equinox Modules (what inference returns for equinox params) and nnx
    Variables are callable. Wrap a callable pytree meant as the function in a
    plain ``lambda params: ...``.
    """
    return callable(wdn) and jax.tree_util.treedef_is_leaf(
        jax.tree.structure(wdn, is_leaf=is_spec)
    )


def fan_out_last(ndim: int) -> MuonDimensionNumbers:
    """``MuonDimensionNumbers(tuple(range(ndim - 1)), ndim - 1)``: ``reshape(-1, last)``."""
    return MuonDimensionNumbers(tuple(range(ndim - 1)), ndim - 1)


INFER_HINT = (
    "pass weight_dimension_numbers=mr.infer_weight_dimension_numbers(model.apply, "
    "params, x), or an explicit layout for it (see docs/guides/layouts.md)"
)


def default_layout(
    shape: Sequence[int], where: str | None = None
) -> MuonDimensionNumbers:
    """The layout of a leaf no one named: fan-out last, ``reshape(-1, last)``.

    Known only for 2-D leaves and 4-D conv kernels ``(kh, kw, in, out)`` (flax
    ``kernel``, haiku ``w``). Anything else is refused, never guessed: a 3-D leaf
    may be ``(in, heads, head_dim)``, ``(heads, head_dim, out)``, ``(layers, in,
    out)`` or ``(width, in, out)``, and a 4-D leaf named ``weight`` (equinox,
    PyTorch) is ``(out, in, kh, kw)``, fan-out first.

    Args:
      shape: the leaf's shape.
      where: its readable path (``None`` for a bare array, whose 4-D default holds).

    Raises:
      ValueError: naming ``where`` and the fix, for a layout the default cannot know.
    """
    shape = tuple(shape)
    name = "the array" if where is None else repr(where)
    if len(shape) in (2, 4) and not (
        len(shape) == 4 and where is not None and where.rsplit("/", 1)[-1] == "weight"
    ):
        return fan_out_last(len(shape))
    if len(shape) == 4:
        raise ValueError(
            f"{name} of shape {shape} is a 4-D 'weight', laid out fan-out first "
            "(out, in, kh, kw) by equinox and PyTorch, not as the default's "
            f"(kh, kw, in, out); {INFER_HINT}, e.g. MuonDimensionNumbers((1, 2, 3), "
            "(0,)), or mask it out"
        )
    if len(shape) == 3:
        raise ValueError(
            f"{name} of shape {shape} has no default layout: a 3-D leaf may be "
            "(in, heads, head_dim), (heads, head_dim, out), (layers, in, out) or "
            f"(width, in, out); {INFER_HINT}, e.g. MuonDimensionNumbers((0,), (1, 2)) "
            "for a query kernel, or mask it out"
        )
    raise ValueError(
        f"{name} of shape {shape} has no default layout: a {len(shape)}-D leaf may "
        "be a 3-D convolution, a scanned stack of layers or a multi-axis projection; "
        f"{INFER_HINT}, or mask it out"
    )


def _first_mismatch(tree: Any, params: Any) -> str:
    """The readable path of the first place where ``tree`` is no prefix of ``params``."""
    spec_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_spec)[0]]
    param_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

    def covers(prefix, path):
        return tuple(path[: len(prefix)]) == tuple(prefix)

    for path in param_paths:
        if not any(covers(s, path) for s in spec_paths):
            return _tree.path_name(path) or "<root>"
    for s in spec_paths:
        if not any(covers(s, path) for path in param_paths):
            return _tree.path_name(s) or "<root>"
    return "<root>"


def _broadcast(tree: Any, params: Any) -> Any:
    """A layout-or-None per leaf of ``params`` from the prefix tree ``tree``."""
    try:
        return jax.tree.map(
            lambda spec, sub: jax.tree.map(lambda _: spec, sub),
            tree,
            params,
            is_leaf=is_spec,
        )
    except (ValueError, TypeError):
        raise ValueError(
            "weight_dimension_numbers does not match the params' tree: first "
            f"mismatch at {_first_mismatch(tree, params)!r}"
        ) from None


def _normalize_axes(axes: Any, ndim: int, name: str, where: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(
                f"weight_dimension_numbers at {where!r}: {name} {a!r} is out of range "
                f"for a leaf of ndim {ndim}"
            )
    normalized = tuple(a % ndim for a in axes)
    if len(set(normalized)) != len(normalized):
        raise ValueError(
            f"weight_dimension_numbers at {where!r}: {name} {axes} repeats an axis"
        )
    if not normalized:
        raise ValueError(
            f"weight_dimension_numbers at {where!r}: no {name}; a weight matrix needs "
            "at least one reduction axis and one output axis"
        )
    return normalized


def check_layout(layout: Any, shape: tuple[int, ...], where: str) -> Any:
    """``layout`` with its axes normalised, or a ValueError naming ``where``."""
    if not is_layout(layout):
        raise TypeError(
            f"weight_dimension_numbers at {where!r} must be a MuonDimensionNumbers, a "
            f"ConvOperator or None, got {layout!r}"
        )
    if isinstance(layout, ConvOperator):
        try:
            layout.operator(shape)
        except ValueError as err:
            raise ValueError(f"weight_dimension_numbers at {where!r}: {err}") from None
        return layout
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{where!r} of shape {shape} is selected but is not a weight matrix "
            "(ndim < 2); mask it out or give it None"
        )
    reduction = _normalize_axes(layout.reduction_axis, ndim, "reduction_axis", where)
    output = _normalize_axes(layout.output_axis, ndim, "output_axis", where)
    if set(reduction) & set(output):
        raise ValueError(
            f"weight_dimension_numbers at {where!r}: reduction axes {reduction} and "
            f"output axes {output} overlap"
        )
    return MuonDimensionNumbers(reduction, output)


def resolve_layouts(
    params: Any,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    mask: _tree.Mask = None,
) -> Any:
    """The layout of every leaf of ``params``, ``None`` where not selected.

    * ``weight_dimension_numbers`` None: the leaves ``mask`` selects (by default
      :func:`margin_regs._tree.default_mask`) get :func:`default_layout`, which
      refuses what it cannot know (3-D leaves, fan-out-first 4-D ``weight``s);
    * one layout value: every leaf the mask selects gets it;
    * a pytree of layouts and ``None`` (a prefix of params allowed) or a callable
      ``params -> such a pytree``: the leaves where it is not None (and that a
      user-given mask selects). A callable that is a pytree node (an equinox
      Module, as :func:`margin_regs.infer_weight_dimension_numbers` returns for
      equinox params) is a tree, never called. nnx Variables holding a
      layout or ``None`` (inference on an ``nnx.State``) stand for their value, so
      the same tree fits the ``nnx.State`` and its pure arrays (``nnx.as_pure``),
      the two trees ``nnx.Optimizer`` gives ``tx.init`` and ``tx.update``.

    ``optax.MaskedNode`` leaves (from an outer ``optax.masked``) are never
    selected.

    Args:
      params: a pytree of arrays.
      weight_dimension_numbers: see above; as ``optax.contrib.muon`` takes it.
      mask: a pytree of bools or a callable, as in ``optax.masked``.

    Returns:
      A pytree with params' structure holding a normalised layout or ``None``.

    Raises:
      ValueError: naming the leaf's path, for overlapping, repeated or
        out-of-range axes, no reduction or output axis, a selected leaf with
        ``ndim < 2`` or an integer or boolean dtype, a selected leaf with no
        default layout, or a tree that does not match params (the first mismatch).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax.contrib import MuonDimensionNumbers as M
      >>> from margin_regs._layouts import resolve_layouts
      >>> params = {"stack": jnp.ones((4, 3, 2)), "bias": jnp.ones((4, 2))}
      >>> resolve_layouts(params, {"stack": M(1, 2), "bias": None})["stack"]
      MuonDimensionNumbers(reduction_axis=(1,), output_axis=(2,))
    """
    wdn = weight_dimension_numbers
    if _is_function(wdn):
        wdn = wdn(params)
    wdn = _unwrap_variables(wdn)
    if wdn is None or is_layout(wdn):
        selected = _tree.resolve_mask(mask, params)
        layouts = jax.tree_util.tree_map_with_path(
            lambda path, s, p: (
                (_default_for(path, p) if wdn is None else wdn) if s else None
            ),
            selected,
            params,
        )
    else:
        layouts = _broadcast(wdn, params)
        if mask is not None:
            selected = _tree.resolve_mask(mask, params)
            layouts = jax.tree.map(
                lambda s, spec: spec if s else None, selected, layouts, is_leaf=is_spec
            )

    def check(path, spec, p):
        if spec is None:
            return None
        where = _tree.path_name(path)
        if jnp.ndim(p) >= 2:
            _tree.check_weight(p, where)
        return check_layout(spec, jnp.shape(p), where)

    return jax.tree_util.tree_map_with_path(check, layouts, params, is_leaf=is_spec)


def _default_for(path: Any, leaf: Any) -> Any:
    shape = jnp.shape(leaf)
    if len(shape) < 2:
        return fan_out_last(2)  # check_layout names the selected vector
    return default_layout(shape, _tree.path_name(path))


@dataclasses.dataclass(frozen=True)
class MatrixOperator:
    """A kernel as the stack of matrices ``K_b`` (fan_in × fan_out) a layout names.

    ``A_b = K_b`` maps ``v`` (fan_out) to ``u = K_b v`` (fan_in), as in Yoshida &
    Miyato's Alg. 1. :meth:`view` is one transpose and one reshape (optax muon's
    ``_compute_muon_reshape``); XLA folds them into the products and fuses
    :meth:`outer` into the update that consumes it.

    Attributes:
      kernel_shape: the leaf's shape.
      reduction_axes: the rows' axes, in the order they are flattened.
      output_axes: the columns' axes, in the order they are flattened.
    """

    kernel_shape: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    output_axes: tuple[int, ...]

    @property
    def batch_axes(self) -> tuple[int, ...]:
        used = set(self.reduction_axes) | set(self.output_axes)
        return tuple(a for a in range(len(self.kernel_shape)) if a not in used)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.kernel_shape[a] for a in self.batch_axes)

    @property
    def fan_in(self) -> int:
        return math.prod(self.kernel_shape[a] for a in self.reduction_axes)

    @property
    def fan_out(self) -> int:
        return math.prod(self.kernel_shape[a] for a in self.output_axes)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.fan_out,)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.fan_in,)

    def view(self, kernel: jax.Array) -> jax.Array:
        """The ``(*batch, fan_in, fan_out)`` matrices."""
        order = self.batch_axes + self.reduction_axes + self.output_axes
        shape = (*self.batch_shape, self.fan_in, self.fan_out)
        return jnp.transpose(kernel, order).reshape(shape)

    def unview(self, matrices: jax.Array) -> jax.Array:
        """The inverse of :meth:`view`."""
        order = self.batch_axes + self.reduction_axes + self.output_axes
        x = matrices.reshape([self.kernel_shape[a] for a in order])
        return jnp.transpose(x, tuple(order.index(a) for a in range(len(order))))

    def matvec(self, kernel: jax.Array, v: jax.Array) -> jax.Array:
        """``u_b = K_b v_b``: ``(*batch, fan_out) -> (*batch, fan_in)``, float32."""
        k = self.view(kernel).astype(jnp.float32)
        return jnp.einsum("...ij,...j->...i", k, v.astype(jnp.float32))

    def rmatvec(self, kernel: jax.Array, u: jax.Array) -> jax.Array:
        """``v_b = K_bᵀ u_b``: ``(*batch, fan_in) -> (*batch, fan_out)``, float32."""
        k = self.view(kernel).astype(jnp.float32)
        return jnp.einsum("...ij,...i->...j", k, u.astype(jnp.float32))

    def outer(self, kernel: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
        """``u_b v_bᵀ`` in the kernel's shape: the gradient of ``Σ_b u_bᵀ K_b v_b``."""
        del kernel
        return self.unview(u[..., :, None] * v[..., None, :])

    def singular_values(self, kernel: jax.Array, k: int | None = None) -> jax.Array:
        """``(*batch, k or min(fan_in, fan_out))`` singular values, descending."""
        s = singular_values_of(self.view(kernel).astype(jnp.float32))
        return s if k is None else s[..., :k]


# One matrix per LAPACK call under vmap too: batched CPU SVDs running at once can
# deadlock XLA's thread pool (margin_regs._batching).
_thin_svd = _batching.per_matrix(lambda m: jnp.linalg.svd(m, full_matrices=False))


def _singular_values_jvp(m: jax.Array, dm: jax.Array) -> tuple[jax.Array, jax.Array]:
    # dσ_i = u_iᵀ dM v_i, from the same one-matrix-at-a-time SVD.
    u, s, vt = _thin_svd(m)
    return s, jnp.einsum("...ji,...jk,...ik->...i", u, dm, vt)


singular_values_of = _batching.per_matrix(
    lambda m: jnp.linalg.svd(m, compute_uv=False), _singular_values_jvp
)


def make_operator(layout: Any, kernel_shape: Sequence[int]) -> Any:
    """The linear operator a (normalised) ``layout`` makes of a kernel's shape."""
    if isinstance(layout, ConvOperator):
        return layout.operator(kernel_shape)
    if is_layout(layout):
        reduction, output = (
            (a,) if isinstance(a, int) else tuple(a)
            for a in (layout.reduction_axis, layout.output_axis)
        )
        ndim = len(kernel_shape)
        return MatrixOperator(
            tuple(kernel_shape),
            tuple(a % ndim for a in reduction),
            tuple(a % ndim for a in output),
        )
    raise TypeError(f"not a layout: {layout!r}")


def require_matrices(layouts: Any, name: str) -> None:
    """A ValueError naming the first leaf whose layout is a :class:`ConvOperator`.

    For what needs true matrices (max-norm's columns, AdaReg's precisions,
    ``as_matrix``): a convolution operator has no ``(fan_in, fan_out)`` view.
    """
    flat = jax.tree_util.tree_flatten_with_path(layouts, is_leaf=is_layout)[0]
    for path, layout in flat:
        if isinstance(layout, ConvOperator):
            where = _tree.path_name(path) or "kernel"
            raise ValueError(
                f"{name} needs weight matrices, but {where!r} has a ConvOperator "
                "layout (a convolution, which has no matrix view); give it a "
                "MuonDimensionNumbers layout or None"
            )


def flatten_selected(
    tree: Any, layouts: Any
) -> tuple[list[jax.Array], list[Any], list[Any], Any]:
    """The selected leaves of ``tree``, their layouts and operators, as aligned lists.

    Returns:
      ``(leaves, layouts, operators, treedef)``; ``treedef`` is the structure of
      ``tree`` with ``optax.MaskedNode()`` at every unselected leaf, the structure
      of penalty and transform state.
    """
    masked = jax.tree.map(
        lambda spec, x: optax.MaskedNode() if spec is None else x,
        layouts,
        tree,
        is_leaf=is_spec,
    )
    leaves, treedef = jax.tree.flatten(masked)
    specs = [s for s in jax.tree.leaves(layouts, is_leaf=is_spec) if s is not None]
    ops = [make_operator(s, jnp.shape(x)) for s, x in zip(specs, leaves, strict=True)]
    return leaves, specs, ops, treedef


def map_selected(
    fn: Callable[..., Any], layouts: Any, *trees: Any, n_outputs: int = 1
) -> Any:
    """``fn(op, *leaves)`` at every selected leaf, as ``optax.contrib.muon`` maps.

    ``layouts`` holds a layout or ``None`` per leaf; each tree has the params'
    structure (``optax.MaskedNode()`` where unselected, as inside
    :func:`masked_transform`). Leaf by leaf, so XLA fuses each kernel's work with
    its update. Unselected leaves give ``MaskedNode()``; with ``n_outputs > 1``
    ``fn`` returns a tuple and the result is a tuple of trees.
    """
    specs, treedef = jax.tree.flatten(layouts, is_leaf=is_spec)
    columns = [treedef.flatten_up_to(t) for t in trees]

    def apply(spec, *xs):
        if spec is None:
            return (optax.MaskedNode(),) * n_outputs
        result = fn(make_operator(spec, jnp.shape(xs[0])), *xs)
        return result if n_outputs > 1 else (result,)

    out = [apply(*row) for row in zip(specs, *columns, strict=True)]
    trees_out = tuple(treedef.unflatten([o[i] for o in out]) for i in range(n_outputs))
    return trees_out if n_outputs > 1 else trees_out[0]


def masked_transform(
    name: str,
    init: Callable[[Any, Any], Any],
    update: Callable[[Any, Any, Any, Any], tuple[Any, Any]],
    weight_dimension_numbers: WeightDimensionNumbers,
    mask: _tree.Mask,
) -> optax.GradientTransformationExtraArgs:
    """A transform acting on the selected weights only, as ``optax.masked`` does.

    Layouts are resolved once per call on the full params (so a callable
    ``weight_dimension_numbers`` sees what the user passed); ``init(params,
    layouts)`` and ``update(updates, state, params, layouts)`` get trees with
    ``optax.MaskedNode()`` at unselected leaves, and the state is an
    ``optax.MaskedState``, exactly as inside ``optax.masked``.
    """

    def hide(tree, layouts):
        return jax.tree.map(
            lambda spec, x: optax.MaskedNode() if spec is None else x,
            layouts,
            tree,
            is_leaf=is_spec,
        )

    def init_fn(params):
        layouts = resolve_layouts(params, weight_dimension_numbers, mask)
        inner = init(hide(params, layouts), hide(layouts, layouts))
        return optax.MaskedState(inner_state=inner)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise _common.needs_params(name)
        layouts = resolve_layouts(params, weight_dimension_numbers, mask)
        new, inner = update(
            hide(updates, layouts),
            state.inner_state,
            hide(params, layouts),
            hide(layouts, layouts),
        )
        fresh = iter(jax.tree.leaves(new))
        old, treedef = jax.tree.flatten(updates)
        # Up to the updates' leaves: a ``None`` in the params (equinox's partition)
        # is a node with no leaf in both trees, not a layout.
        flags = treedef.flatten_up_to(layouts)
        merged = [
            o if f is None else next(fresh) for f, o in zip(flags, old, strict=True)
        ]
        return treedef.unflatten(merged), optax.MaskedState(inner_state=inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
