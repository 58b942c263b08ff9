"""Each parameter's layout, read from the matmuls and convolutions of the traced model.

A kernel's layout is a fact about the model, not the array: ``(in, heads, head_dim)``
is one ``(in, heads·head_dim)`` matrix in attention, a ``(layers, in, out)`` leaf is
``layers`` separate matrices under ``scan``, an equinox ``(out, in)`` weight is read
fan-out first. The model's jaxpr states all of it: the ``dot_general`` that consumes a
leaf names the axes it contracts (the matrix's rows), the ones it batches over, and
the free ones (its columns); a ``conv_general_dilated`` names the kernel's
output-feature axis. This module follows each leaf from the jaxpr's inputs to those
equations and turns what it finds into the layouts ``weight_dimension_numbers`` takes.

**What is followed.** Dtype casts, ``transpose``, ``reshape`` and
``broadcast_in_dim`` (when axes map cleanly), ``squeeze``, and the bodies of ``jit``,
``checkpoint``, ``custom_jvp``/``custom_vjp``, ``cond``, ``while`` and ``scan``. A leaf
is the matrices ``W.transpose(batch + reduction + output).reshape(*batch_shape,
fan_in, fan_out)`` (optax's ``_compute_muon_reshape``). A convolution kernel with
``conv="matrix"``: the output-feature axis is the output axis, the input-feature and
spatial axes the reduction axes; with ``conv="operator"``: ``ConvOperator(input_shape,
strides, padding, rhs_dilation, feature_group_count, dimension_numbers)`` read from the
convolution (``input_shape`` without the batch axis, ``padding`` as ``(lo, hi)``
pairs). Layouts are normalised: two tuples of increasing non-negative ints.

**``None``** for a leaf whose last path key is ``bias``, ``b``, ``scale``,
``embedding`` or ``embeddings``, an integer or boolean leaf, a leaf no matmul or
convolution consumes (a gather, a norm's scale, a leaf reaching a matmul only through
an elementwise op such as ``W * mask``), and a leaf used as a vector.

**What it cannot see.** A ``vmap`` over a stack of weights whose input is not mapped
compiles to one matmul with the stack folded into the free axes, and is read as that
one wide matrix; ``shard_map``, ``pallas_call`` and other primitives are not entered.
Every matmul in ``fn`` counts, so trace the plain forward pass (a power iteration
inside the model, or a Gram matrix in a loss, makes a leaf's uses conflict).

**Errors** (a ValueError naming the leaf): a leaf consumed in two different layouts
(tied weights used the same way are fine), reshaped so that one axis lands in two
roles, multiplied by another parameter, used as a convolution's input, or by a
transposed (``lhs_dilation``) or ``batch_group_count`` convolution; with
``conv="operator"``, a kernel scanned over or reshaped before its convolution.

**flax nnx**: ``graphdef, state = nnx.split(model, nnx.Param)`` and
``fn = lambda s, x: nnx.merge(graphdef, s)(x)`` return an ``nnx.State`` of layouts
that fits the state and its ``nnx.as_pure`` arrays (so ``nnx.Optimizer`` works).
**equinox**: ``params, static = eqx.partition(model, eqx.is_array)`` and
``fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)`` return a Module of layouts
(callable, but read as a tree, never called).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
from jax import lax
from jax.extend import core as jcore
from optax.contrib import MuonDimensionNumbers

from margin_regs._conv_operator import ConvOperator
from margin_regs._tree import is_float, path_name

__all__ = ["infer_weight_dimension_numbers"]

# The default mask's rule by name (biases, norm scales, embedding tables: flax, nnx,
# equinox and haiku spellings); such a leaf is never a weight, whatever feeds it.
_NOT_WEIGHTS = frozenset({"bias", "b", "scale", "embedding", "embeddings"})

# Primitives whose output is their (first) operand unchanged up to dtype or placement.
_SAME = frozenset(
    {
        "convert_element_type",
        "copy",
        "copy_p",
        "reduce_precision",
        "sharding_constraint",
    }
)

# Primitives that call a sub-jaxpr on exactly their operands and return its outputs.
_CALLS = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
    }
)

Layout = MuonDimensionNumbers | ConvOperator | None


@dataclasses.dataclass(frozen=True)
class _View:
    """A value of the jaxpr that is parameter leaf ``leaf`` seen through a view.

    ``axes[k]`` holds the leaf axes that the value's axis ``k`` spans: one for a kept
    or transposed axis, several where a reshape merged them, the same one on several
    value axes where a reshape split it, none for an inserted axis. ``sliced`` holds
    the leaf axes a ``scan`` iterates over; each iteration sees one slice, so they
    are batch axes of the layout.
    """

    leaf: int
    axes: tuple[frozenset[int], ...]
    sliced: frozenset[int] = frozenset()


def infer_weight_dimension_numbers(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    conv: Literal["matrix", "operator"] = "matrix",
) -> Any:
    """The layout of every parameter leaf, read from the matmuls that ``fn`` applies.

    Traces ``fn(params, *args)`` (nothing runs) and follows each leaf to the
    ``dot_general`` or ``conv_general_dilated`` consuming it; for ``y =
    dot_general(x, W)``::

        reduction_axis = W's contracting axes   (rows, fan_in)
        output_axis    = W's free axes          (columns, fan_out)
        batch axes     = W's batch axes and the axes a ``scan`` slices

    What it follows, what it cannot see, and the nnx and equinox recipes are in the
    module docstring and ``docs/guides/layouts.md``.

    Args:
      fn: the forward function, called as ``fn(params, *args)``; only traced.
      params: linen dict, ``nnx.State``, equinox module or plain dict (leaves may
        be ``jax.ShapeDtypeStruct``s).
      *args: the other inputs of ``fn``; one small batch suffices.
      conv: ``"matrix"`` (Yoshida & Miyato's reshaped kernel) or ``"operator"``
        (a :class:`~margin_regs.ConvOperator` on inputs of the traced shape).

    Returns:
      ``params``' structure with a normalised layout or ``None`` per leaf (``None``
      for biases, scales, embeddings, integer leaves and leaves no matmul reads).

    Raises:
      ValueError: naming the leaf, where its layout is ambiguous (module docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_regs as mr
      >>> params = {"weight": jnp.ones((3, 4)), "bias": jnp.zeros(3)}
      >>> fn = lambda p, x: x @ p["weight"].T + p["bias"]
      >>> layouts = mr.infer_weight_dimension_numbers(fn, params, jnp.ones((2, 4)))
      >>> layouts["weight"], layouts["bias"]
      (MuonDimensionNumbers(reduction_axis=(1,), output_axis=(0,)), None)

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural networks",
      2024 (the dimension-numbers convention of ``optax.contrib.muon``).
    """
    if conv not in ("matrix", "operator"):
        raise ValueError(
            "infer_weight_dimension_numbers: conv must be 'matrix' or 'operator',"
            f" got {conv!r}"
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_name(path) for path, _ in flat]
    closed = jax.make_jaxpr(fn)(params, *args)
    # make_jaxpr flattens (params, *args) in order: params' leaves come first.
    invars = closed.jaxpr.invars
    views = [
        None
        if _last_key(path) in _NOT_WEIGHTS or not is_float(leaf)
        else _View(i, tuple(frozenset({a}) for a in range(invars[i].aval.ndim)))
        for i, (path, leaf) in enumerate(flat)
    ]
    reader = _Reader(paths, conv)
    reader.run(closed.jaxpr, views + [None] * (len(invars) - len(views)))
    layouts = [reader.layout(i) for i in range(len(flat))]
    return jax.tree_util.tree_unflatten(treedef, layouts)


def _last_key(path: Sequence[Any]) -> str:
    # path_name already drops nnx's trailing ``.value``.
    return path_name(path).rsplit("/", 1)[-1]


class _Reader:
    """Walks a jaxpr, carrying leaf views forward and recording each leaf's uses."""

    def __init__(self, paths: list[str], conv: str):
        self.paths = paths
        self.conv = conv
        # leaf -> ("matrix", reduction, output) or a ConvOperator: one per leaf.
        self.found: dict[int, Any] = {}

    def layout(self, leaf: int) -> Layout:
        found = self.found.get(leaf)
        if isinstance(found, ConvOperator):
            return found
        if found is None or not (found[1] and found[2]):
            return None
        return MuonDimensionNumbers(found[1], found[2])

    def run(self, jaxpr: jcore.Jaxpr, views: Sequence[_View | None]) -> list:
        env = {
            v: view
            for v, view in zip(jaxpr.invars, views, strict=True)
            if view is not None
        }

        def read(v):
            return env.get(v) if isinstance(v, jcore.Var) else None

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if any(view is not None for view in ins):
                for v, view in zip(eqn.outvars, self.eqn(eqn, ins), strict=False):
                    if view is not None:
                        env[v] = view
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: jcore.JaxprEqn, ins: list) -> list:
        """The views of ``eqn``'s outputs; records the uses a matmul makes."""
        name, p = eqn.primitive.name, eqn.params
        if name == "dot_general":
            self.dot_general(eqn, ins)
        elif name == "conv_general_dilated":
            self.convolution(eqn, ins)
        elif name == "scan":
            n = p["num_consts"] + p["num_carry"]
            self.run(_open(p["jaxpr"]), ins[:n] + [_slice(v) for v in ins[n:]])
        elif name == "cond":
            for branch in p["branches"]:
                self.run(_open(branch), ins[1:])
        elif name == "while":
            self.run(_open(p["body_jaxpr"]), ins[p["cond_nconsts"] :])
        elif name in _CALLS:
            sub = _open(p.get("jaxpr", p.get("call_jaxpr")))
            if len(sub.invars) == len(ins):
                return self.run(sub, ins)
        elif ins[0] is not None:
            return [_reshaped(eqn, ins[0])]
        return []

    def dot_general(self, eqn: jcore.JaxprEqn, ins: list) -> None:
        contract, batch = eqn.params["dimension_numbers"]
        lhs, rhs = ins[0], ins[1]
        if lhs is not None and rhs is not None:
            raise ValueError(
                f"infer_weight_dimension_numbers: {self.paths[lhs.leaf]!r} is"
                f" multiplied by {self.paths[rhs.leaf]!r}, so which of them is the"
                " linear map is ambiguous; give weight_dimension_numbers explicitly"
            )
        side = 0 if lhs is not None else 1
        view = ins[side]
        roles = [
            "r" if k in contract[side] else "b" if k in batch[side] else "o"
            for k in range(len(view.axes))
        ]
        self.record(view, roles)

    def convolution(self, eqn: jcore.JaxprEqn, ins: list) -> None:
        p = eqn.params
        view = ins[0] if ins[0] is not None else ins[1]
        path = self.paths[view.leaf]
        if ins[0] is not None:
            problem = "is the input (lhs) of a convolution, not its kernel"
        elif any(d != 1 for d in p["lhs_dilation"]):
            problem = "is the kernel of a transposed (lhs_dilation != 1) convolution"
        elif p["batch_group_count"] != 1:
            problem = "is the kernel of a convolution with batch_group_count != 1"
        else:
            problem = None
        if problem is not None:
            raise ValueError(
                f"infer_weight_dimension_numbers: {path!r} {problem}; its layout is"
                " ambiguous, give weight_dimension_numbers explicitly"
            )
        numbers = p["dimension_numbers"]
        if self.conv == "matrix":
            roles = ["r"] * len(view.axes)
            roles[numbers.rhs_spec[0]] = "o"
            self.record(view, roles)
            return
        if view.sliced or any(len(axes) != 1 for axes in view.axes):
            raise ValueError(
                f"infer_weight_dimension_numbers: {path!r} is scanned over or"
                " reshaped before its convolution, which a ConvOperator cannot"
                " describe; use conv='matrix' or give weight_dimension_numbers"
            )
        leaf_axis = [next(iter(axes)) for axes in view.axes]
        lhs_shape = eqn.invars[0].aval.shape
        try:
            operator = ConvOperator(
                input_shape=tuple(
                    d for k, d in enumerate(lhs_shape) if k != numbers.lhs_spec[0]
                ),
                strides=tuple(p["window_strides"]),
                padding=tuple(tuple(pair) for pair in p["padding"]),
                rhs_dilation=tuple(p["rhs_dilation"]),
                feature_group_count=p["feature_group_count"],
                dimension_numbers=lax.ConvDimensionNumbers(
                    numbers.lhs_spec,
                    tuple(leaf_axis[k] for k in numbers.rhs_spec),
                    numbers.out_spec,
                ),
            )
        except ValueError as err:
            raise ValueError(
                f"infer_weight_dimension_numbers: {path!r}: {err}"
            ) from None
        self.use(view.leaf, operator)

    def record(self, view: _View, roles: Sequence[str]) -> None:
        """Maps the roles of the value's axes back to the leaf's axes."""
        leaf_roles = dict.fromkeys(view.sliced, "b")
        for axes, role in zip(view.axes, roles, strict=True):
            for a in axes:
                if leaf_roles.setdefault(a, role) != role:
                    raise ValueError(
                        f"infer_weight_dimension_numbers: {self.paths[view.leaf]!r}"
                        f" is reshaped so that its axis {a} is both a"
                        f" {_ROLE_NAMES[leaf_roles[a]]} and a {_ROLE_NAMES[role]}"
                        " axis of the matmul; give weight_dimension_numbers explicitly"
                    )
        ordered = sorted(leaf_roles)
        reduction = tuple(a for a in ordered if leaf_roles[a] == "r")
        output = tuple(a for a in ordered if leaf_roles[a] == "o")
        self.use(view.leaf, ("matrix", reduction, output))

    def use(self, leaf: int, found: Any) -> None:
        before = self.found.setdefault(leaf, found)
        if before != found:
            raise ValueError(
                f"infer_weight_dimension_numbers: {self.paths[leaf]!r} is consumed in"
                f" two incompatible ways, as {_describe(before)} and as"
                f" {_describe(found)}; give weight_dimension_numbers explicitly"
            )


_ROLE_NAMES = {"r": "reduction", "o": "output", "b": "batch"}


def _describe(found: Any) -> str:
    if isinstance(found, ConvOperator):
        return repr(found)
    return f"reduction axes {found[1]} / output axes {found[2]}"


def _open(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> jcore.Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr


def _slice(view: _View | None) -> _View | None:
    """The view inside a ``scan`` body of an ``xs`` input: axis 0 is iterated over."""
    if view is None:
        return None
    return _View(view.leaf, view.axes[1:], view.sliced | view.axes[0])


def _is_whole(eqn: jcore.JaxprEqn) -> bool:
    """A ``slice`` that keeps every element (jax < 0.10 traces ``x[0]`` of a size-1
    axis as one, then ``squeeze``)."""
    p, shape = eqn.params, eqn.invars[0].aval.shape
    strides = p["strides"] or (1,) * len(shape)
    return (
        all(s == 0 for s in p["start_indices"])
        and tuple(p["limit_indices"]) == tuple(shape)
        and all(s == 1 for s in strides)
    )


def _reshaped(eqn: jcore.JaxprEqn, view: _View) -> _View | None:
    """The view of a one-operand layout op's output; ``None`` for any other op."""
    name, p = eqn.primitive.name, eqn.params
    axes = view.axes
    if name in _SAME or (name == "slice" and _is_whole(eqn)):
        new = axes
    elif name == "transpose":
        new = tuple(axes[k] for k in p["permutation"])
    elif name == "squeeze":
        new = tuple(g for k, g in enumerate(axes) if k not in p["dimensions"])
    elif name == "broadcast_in_dim":
        # New axes hold copies, not leaf axes; the leaf's own axes keep their roles.
        new = [frozenset()] * len(p["shape"])
        for k, out in enumerate(p["broadcast_dimensions"]):
            new[int(out)] = axes[k]
        new = tuple(new)
    elif name == "reshape" and p.get("dimensions") is None:
        new = _reshape_axes(eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape, axes)
    else:
        return None
    return _View(view.leaf, new, view.sliced)


def _reshape_axes(
    before: Sequence[int], after: Sequence[int], axes: Sequence[frozenset[int]]
) -> tuple[frozenset[int], ...]:
    """The leaf axes each output axis of a row-major reshape spans.

    Axes are matched in blocks of equal size products (merging, splitting or both);
    every output axis of a block spans the union of the block's input axes. Size-1
    axes carry no data: new ones span nothing, dropped ones vanish.
    """
    ins = [k for k, d in enumerate(before) if d != 1]
    outs = [k for k, d in enumerate(after) if d != 1]
    new = [frozenset()] * len(after)
    i = j = 0
    while i < len(ins):
        block_in, block_out = [ins[i]], [outs[j]]
        size_in, size_out = before[ins[i]], after[outs[j]]
        i, j = i + 1, j + 1
        while size_in != size_out:
            if size_in < size_out:
                block_in.append(ins[i])
                size_in *= before[ins[i]]
                i += 1
            else:
                block_out.append(outs[j])
                size_out *= after[outs[j]]
                j += 1
        spanned = frozenset().union(*(axes[k] for k in block_in))
        for k in block_out:
            new[k] = spanned
    return tuple(new)
