"""Float64 NumPy references for convolutions, pooling and the reference models,
written from the layer definitions (cross-correlation as ``lax.conv``, flax's
``SAME`` split of the padding), not from the code under test."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv(x, kernel, padding="SAME", strides=1):
    """``(n, *spatial, in) ⋆ (*window, in, out)``, stride ``strides`` per axis."""
    window = kernel.shape[:-2]
    axes = tuple(range(1, 1 + len(window)))
    pads = [(0, 0)] * x.ndim
    if padding == "SAME":
        for axis, w in zip(axes, window, strict=True):
            size = x.shape[axis]
            out = -(-size // strides)
            total = max((out - 1) * strides + w - size, 0)
            pads[axis] = (total // 2, total - total // 2)
    patches = sliding_window_view(np.pad(x, pads), window, axis=axes)
    patches = patches[(slice(None), *(slice(None, None, strides) for _ in axes))]
    # patches: (n, *out, in, *window); contract in and the window with the kernel.
    k = np.moveaxis(kernel, -2, 0)  # (in, *window, out)
    return np.tensordot(
        patches, k, axes=(list(range(-1 - len(window), 0)), list(range(k.ndim - 1)))
    )


def max_pool(x, size=2):
    """Non-overlapping ``size`` windows on every spatial axis, ``SAME`` (−inf pad)."""
    pads = [(0, 0)] + [(0, -(-s // size) * size - s) for s in x.shape[1:-1]] + [(0, 0)]
    x = np.pad(x, pads, constant_values=-np.inf)
    shape = [x.shape[0]]
    for s in x.shape[1:-1]:
        shape += [s // size, size]
    x = x.reshape(*shape, x.shape[-1])
    return x.max(axis=tuple(range(2, x.ndim - 1, 2)))


def dense(x, layer):
    return x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"])


def conv_layer(x, layer, padding="SAME"):
    kernel = np.asarray(layer["kernel"], np.float64)
    return conv(x, kernel, padding) + np.asarray(layer["bias"], np.float64)


def relu(x):
    return np.maximum(x, 0.0)
