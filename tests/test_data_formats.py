"""IDX and CIFAR readers: round trips of miniature datasets, corrupt files, the pickle guard."""

from __future__ import annotations

import os
import pickle
import struct
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from cfbench.data import formats
from cfbench.data.formats import (
    make_miniature_cifar,
    make_miniature_mnist,
    read_idx,
    write_cifar_batch,
    write_idx,
)
from cfbench.data.specs import CIFAR10, CIFAR100, MNIST, FashionMNIST
from cfbench.errors import DatasetError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    """Tests must not pick up the developer's own data directory."""
    monkeypatch.delenv(formats.ENV_DATA_DIR, raising=False)


@pytest.fixture
def no_torchvision(monkeypatch):
    """Make ``import torchvision`` fail even where it is installed."""
    monkeypatch.setitem(sys.modules, "torchvision", None)


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255


# ------------------------------------------------------------------------------ IDX


def test_read_idx_detects_gzip_by_magic_not_name(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "plain-name", a, gzip=True)
    assert (tmp_path / "plain-name").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-name"), a)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trip(tmp_path, gz):
    written = make_miniature_mnist(tmp_path, 20, 7, gzip=gz)
    ds = MNIST().load(data_dir=tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (7, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.x_train[:, 0], _unit(written["x_train"]))
    np.testing.assert_array_equal(ds.x_test[:, 0], _unit(written["x_test"]))
    np.testing.assert_array_equal(ds.y_train, written["y_train"])
    np.testing.assert_array_equal(ds.y_test, written["y_test"])
    assert ds.source == str(tmp_path)
    assert ds.class_names == MNIST.class_names


@pytest.mark.parametrize("spec, sub", [(FashionMNIST, "FashionMNIST/raw"), (FashionMNIST, "fashion-mnist"),
                                       (MNIST, "MNIST/raw"), (MNIST, "mnist")])
def test_dataset_subfolder_layouts(tmp_path, spec, sub):
    written = make_miniature_mnist(tmp_path / sub, 5, 3, gzip=True)
    ds = spec().load(data_dir=tmp_path)
    assert ds.source == str(tmp_path / sub)
    assert ds.class_names == spec.class_names
    np.testing.assert_array_equal(ds.x_test[:, 0], _unit(written["x_test"]))


def test_env_var_is_default_data_dir(tmp_path, monkeypatch):
    make_miniature_mnist(tmp_path, 4, 2)
    monkeypatch.setenv(formats.ENV_DATA_DIR, str(tmp_path))
    assert MNIST().load().source == str(tmp_path)


def test_truncated_images_name_file_and_sizes(tmp_path):
    make_miniature_mnist(tmp_path, 10, 2)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated") as e:
        MNIST().load(data_dir=tmp_path)
    assert "train-images-idx3-ubyte" in str(e.value)
    assert str(10 * 28 * 28) in str(e.value) and str(10 * 28 * 28 - 5) in str(e.value)


def test_trailing_garbage(tmp_path):
    make_miniature_mnist(tmp_path, 3, 2)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.*need 2 bytes.*found 6 bytes.*trailing"):
        MNIST().load(data_dir=tmp_path)


@pytest.mark.parametrize("content, match", [(b"\x01\x00\x08\x01\x00\x00\x00\x00", "not an IDX file"),
                                            (b"\x00\x00\x0d\x01\x00\x00\x00\x00", "type code 0x0d"),
                                            (b"", "empty file")])
def test_wrong_magic(tmp_path, content, match):
    path = tmp_path / "x-idx"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=match):
        read_idx(path)


def test_corrupt_gzip_names_file(tmp_path):
    path = tmp_path / "labels.gz"
    write_idx(path, np.zeros(1000, np.uint8), gzip=True)
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DatasetError, match="labels.gz: corrupt gzip"):
        read_idx(path)


def test_label_image_count_mismatch(tmp_path):
    make_miniature_mnist(tmp_path, 6, 2)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DatasetError, match="5 labels but .* 6 images"):
        MNIST().load(data_dir=tmp_path)


def test_bad_image_shape_and_label_range(tmp_path):
    make_miniature_mnist(tmp_path, 4, 2)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 10], np.uint8))
    with pytest.raises(DatasetError, match=r"labels must be in \[0, 10\)"):
        MNIST().load(data_dir=tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 27, 28), np.uint8))
    with pytest.raises(DatasetError, match=r"shape \(N, 28, 28\).*\(2, 27, 28\)"):
        MNIST().load(data_dir=tmp_path)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DatasetError) as e:
        FashionMNIST().load(data_dir=tmp_path)
    msg = str(e.value)
    assert "fashion-mnist" in msg and str(tmp_path) in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert FashionMNIST.how_to_get in msg


def test_partial_directory_names_missing_file(tmp_path):
    make_miniature_mnist(tmp_path, 3, 2)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"lacks t10k-labels-idx1-ubyte\)"):
        MNIST().load(data_dir=tmp_path)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(),
                    reason=f"{DEBIAN_FASHION} missing (apt-get install dataset-fashion-mnist)")
def test_real_debian_fashion_mnist():
    ds = FashionMNIST().load()
    assert ds.source == str(DEBIAN_FASHION)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10


# ---------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("spec, hundred", [(CIFAR10, False), (CIFAR100, True)])
def test_cifar_round_trip(tmp_path, spec, hundred):
    written = make_miniature_cifar(tmp_path, 4, 5, hundred=hundred)
    ds = spec().load(data_dir=tmp_path)
    n_train = 4 * (1 if hundred else 5)
    assert ds.x_train.shape == (n_train, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train, _unit(written["x_train"]).reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.x_test, _unit(written["x_test"]).reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.y_train, written["y_train"])
    np.testing.assert_array_equal(ds.y_test, written["y_test"])
    assert ds.class_names == written["class_names"] and len(ds.class_names) == spec.num_classes
    assert ds.source == str(tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py"))


def test_cifar_folder_given_directly(tmp_path):
    make_miniature_cifar(tmp_path, 2, 2)
    folder = tmp_path / "cifar-10-batches-py"
    assert CIFAR10().load(data_dir=folder).source == str(folder)


def test_cifar_pickle_from_numpy_1_is_accepted_without_warnings(tmp_path):
    """The original files name numpy.core.multiarray._reconstruct (numpy < 2)."""
    written = make_miniature_cifar(tmp_path, 2, 3)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    legacy = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in legacy
    path.write_bytes(legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CIFAR10().load(data_dir=tmp_path)
    np.testing.assert_array_equal(ds.x_test, _unit(written["x_test"]).reshape(-1, 3, 32, 32))


def test_python2_cifar_pickle(tmp_path):
    """The original batches were written by Python 2's cPickle: 8-bit strings, numpy.core globals."""
    def string(s: bytes) -> bytes:  # BINSTRING: Python 2 str
        return b"T" + struct.pack("<i", len(s)) + s

    def small_int(v: int) -> bytes:  # BININT1
        return b"K" + bytes([v])

    pixels = bytes(range(256)) + bytes(2 * 3072 - 256)
    dtype_u1 = (b"cnumpy\ndtype\n" + string(b"u1") + small_int(0) + small_int(1) + b"\x87R"  # dtype('u1', 0, 1)
                + b"(" + small_int(3) + string(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + small_int(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + small_int(0) + b"\x85" + string(b"b")
             + b"\x87R"  # _reconstruct(ndarray, (0,), 'b'), then __setstate__((1, (2, 3072), u1, False, pixels))
             + b"(" + small_int(1) + small_int(2) + b"M\x00\x0c\x86" + dtype_u1 + b"\x89" + string(pixels) + b"tb")
    batch = b"\x80\x02}(" + string(b"data") + array + string(b"labels") + b"](" + small_int(7) + small_int(1) + b"eu."
    make_miniature_cifar(tmp_path, 2, 2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(batch)
    ds = CIFAR10().load(data_dir=tmp_path)
    assert ds.y_train[:2].tolist() == [7, 1]
    np.testing.assert_array_equal(ds.x_train[:2], _unit(np.frombuffer(pixels, np.uint8)).reshape(2, 3, 32, 32))


class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_not_run(tmp_path):
    make_miniature_cifar(tmp_path, 2, 2)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": _Exploit(f"touch {marker}"), b"labels": [0]}, protocol=2))
    with pytest.raises(DatasetError, match=r"refusing to unpickle (posix|os|nt)\.system from .*data_batch_3"):
        CIFAR10().load(data_dir=tmp_path)
    assert not marker.exists()


def test_cifar_corrupt_pickle(tmp_path):
    make_miniature_cifar(tmp_path, 2, 2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="test_batch: corrupt CIFAR pickle"):
        CIFAR10().load(data_dir=tmp_path)


def test_cifar_bad_data_and_label_count(tmp_path):
    make_miniature_cifar(tmp_path, 2, 2)
    folder = tmp_path / "cifar-10-batches-py"
    for batch, match in [({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "1 labels for 2 images"),
                         ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]},
                          r"shape \(N, 3072\), found uint8 array of shape \(2, 1024\)"),
                         ({b"labels": [0, 1]}, r"missing keys \[b'data'\]")]:
        (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
        with pytest.raises(DatasetError, match=match):
            CIFAR10().load(data_dir=tmp_path)


def test_cifar100_uses_fine_labels_in_range(tmp_path):
    make_miniature_cifar(tmp_path, 3, 2, hundred=True)
    write_cifar_batch(tmp_path / "cifar-100-python" / "test", np.zeros((2, 3072), np.uint8), [5, 100],
                      label_key=b"fine_labels")
    with pytest.raises(DatasetError, match=r"labels must be in \[0, 100\)"):
        CIFAR100().load(data_dir=tmp_path)


def test_cifar_missing_says_how(tmp_path):
    with pytest.raises(DatasetError) as e:
        CIFAR100().load(data_dir=tmp_path)
    assert CIFAR100.how_to_get in str(e.value) and str(tmp_path / "cifar-100-python") in str(e.value)
    with pytest.raises(DatasetError, match="no data directory given"):
        CIFAR10().load()


# ------------------------------------------------------------------------- download


@pytest.mark.parametrize("spec", [MNIST, FashionMNIST, CIFAR10])
def test_download_without_torchvision(tmp_path, no_torchvision, spec):
    with pytest.raises(DatasetError, match=r"torchvision.*pip install torchvision") as e:
        spec().load(data_dir=tmp_path, download=True)
    assert spec.how_to_get in str(e.value)


def test_download_not_needed_when_files_present(tmp_path, no_torchvision):
    make_miniature_mnist(tmp_path, 3, 2)
    assert MNIST().load(data_dir=tmp_path, download=True).source == str(tmp_path)


def test_download_reads_torchvision_layout(tmp_path, monkeypatch):
    """A stand-in torchvision writes the raw files where the real one does; our reader reads them."""
    class FakeMNIST:
        def __init__(self, root, download):
            assert download
            make_miniature_mnist(Path(root) / "MNIST" / "raw", 4, 2, gzip=True)

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST = FakeMNIST
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    ds = MNIST().load(data_dir=tmp_path, download=True)
    assert ds.source == str(tmp_path / "MNIST" / "raw") and len(ds.x_train) == 4


def test_writers_reject_wrong_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        write_cifar_batch(tmp_path / "b", np.zeros((2, 10), np.uint8), [0, 1])
