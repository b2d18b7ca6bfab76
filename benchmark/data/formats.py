"""On-disk dataset formats: IDX files (MNIST, Fashion-MNIST) and CIFAR python batches.

**IDX** (LeCun's format, used by MNIST and Fashion-MNIST): a 4-byte magic number -- two zero
bytes, a type code (only ``0x08``, unsigned byte, occurs in these datasets and is supported)
and the number of dimensions -- then one big-endian uint32 per dimension, then the values in
row-major order.  The files are distributed gzip-compressed; :func:`read_idx` detects gzip by
its magic bytes ``1f 8b``, not by the file name, and checks that the payload is exactly as
long as the header says (a truncated download or trailing garbage is an error).

**CIFAR-10 / CIFAR-100** ("python version"): each batch is a pickled dict with bytes keys;
``b'data'`` is a uint8 array (N, 3072) holding the red, green and blue 32x32 planes of each
image, the labels are a list of ints (``b'labels'`` in CIFAR-10, ``b'fine_labels'`` in
CIFAR-100) and a meta file holds the class names.

Security: unpickling runs whatever callables a pickle names, so a CIFAR file from an
untrusted source must never reach ``pickle.load``.  The batches are read with a restricted
unpickler that resolves only the handful of globals a numpy array needs (``_reconstruct``,
``ndarray``, ``dtype``, and ``_codecs.encode`` which Python 3 uses for bytes at protocol 2)
from a fixed table -- it imports nothing -- and refuses everything else with a
:class:`~cfbench.errors.DatasetError`.

Where files are looked for: in ``data_dir`` (``--data-dir``) when given, otherwise in
``$CFBENCH_DATA_DIR`` and in system locations (Fashion-MNIST: the Debian package
``dataset-fashion-mnist``); in each of those also in the dataset's subfolder (as the original
archives and torchvision lay them out).  With ``download=True`` missing files are fetched with
torchvision (optional dependency) and then read with the readers here.

The writers (:func:`write_idx`, :func:`write_cifar_batch`, :func:`make_miniature_mnist`,
:func:`make_miniature_cifar`) produce the genuine formats; they serve tests and anyone who
wants a miniature dataset.
"""

from __future__ import annotations

import codecs
import gzip as gzip_lib
import os
import pickle
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from .base import ArrayDataset, DatasetSpec

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 1.26 has no numpy._core
    from numpy.core.multiarray import _reconstruct

#: environment variable naming the default data directory
ENV_DATA_DIR = "CFBENCH_DATA_DIR"
#: where ``download=True`` puts the files when neither data_dir nor $CFBENCH_DATA_DIR is set
DEFAULT_DOWNLOAD_DIR = Path("~/.cache/cfbench")
#: directories searched when no data_dir is given, by dataset name
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),  # apt-get install dataset-fashion-mnist
}
#: the IDX files of MNIST-like datasets, per split: (images, labels); each may end in .gz
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_SUFFIXES = ("", ".gz")  # an uncompressed copy is preferred: it reads faster
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10",
                      "cifar100": "CIFAR100"}


@dataclass(frozen=True)
class CifarLayout:
    """File names and dict keys of one CIFAR variant."""

    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes
    names_key: bytes


CIFAR10_LAYOUT = CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                             "test_batch", "batches.meta", b"labels", b"label_names")
CIFAR100_LAYOUT = CifarLayout("cifar-100-python", ("train",), "test", "meta", b"fine_labels",
                              b"fine_label_names")

#: the only globals a CIFAR pickle may name, resolved from this table (nothing is imported)
_CIFAR_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # written by numpy < 2 (the originals)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes objects pickled by Python 3 at protocol 2
}


# ----------------------------------------------------------------------------------- IDX


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes, raw or gzip-compressed, as a uint8 array.

    Raises :class:`DatasetError` naming the file if it cannot be read, is corrupt gzip, has a
    wrong magic number or a payload that is not exactly ``prod(dims)`` bytes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}.") from e
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip_lib.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: corrupt gzip data ({e}); download the file again.") from e
    if len(data) < 4 or data[:2] != b"\0\0":
        raise DatasetError(f"{path}: not an IDX file (expected magic bytes 00 00 08 <ndim>, "
                           f"found {data[:4].hex(' ') or 'an empty file'}).")
    if data[2] != _IDX_UBYTE:
        raise DatasetError(f"{path}: IDX type code 0x{data[2]:02x} is not supported "
                           f"(expected 0x{_IDX_UBYTE:02x}, unsigned byte).")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares 0 dimensions.")
    if len(data) < header:
        raise DatasetError(f"{path}: IDX header declares {ndim} dimensions and needs {header} bytes, "
                           f"found {len(data)} bytes (file truncated).")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected, found = prod(dims), len(data) - header
    if found != expected:
        problem = "file truncated" if found < expected else "trailing garbage"
        raise DatasetError(f"{path}: IDX dims {dims} need {expected} bytes of data after the "
                           f"{header}-byte header, found {found} bytes ({problem}).")
    return np.frombuffer(data, np.uint8, count=expected, offset=header).reshape(dims).copy()


def write_idx(path: str | Path, array: np.ndarray, gzip: bool = False) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed if ``gzip``)."""
    a = np.ascontiguousarray(array)
    if a.dtype != np.uint8 or not 1 <= a.ndim <= 255:
        raise ValueError(f"write_idx needs a uint8 array with 1 to 255 dimensions, got {a.dtype} {a.shape}.")
    data = bytes([0, 0, _IDX_UBYTE, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    Path(path).write_bytes(gzip_lib.compress(data, mtime=0) if gzip else data)


# ------------------------------------------------------------------------- MNIST-like


def load_mnist_like(spec: DatasetSpec, data_dir: str | Path | None, download: bool) -> ArrayDataset:
    """Load MNIST or Fashion-MNIST from the four IDX files (see the module docstring)."""
    names = [name for pair in MNIST_FILES.values() for name in pair]
    dirs = _mnist_dirs(spec, _search_roots(spec, data_dir))
    found = _locate(dirs, names, _IDX_SUFFIXES)
    if found is None and download:
        dirs = _unique(dirs + _mnist_dirs(spec, [_download(spec, data_dir)]))
        found = _locate(dirs, names, _IDX_SUFFIXES)
    if found is None:
        raise DatasetError(_missing_message(spec, dirs, names, _IDX_SUFFIXES))
    directory, files = found
    x_train, y_train = _read_mnist_split(spec, *(files[n] for n in MNIST_FILES["train"]))
    x_test, y_test = _read_mnist_split(spec, *(files[n] for n in MNIST_FILES["test"]))
    return ArrayDataset(spec.name, x_train, y_train, x_test, y_test, spec.num_classes,
                        list(spec.class_names), str(directory))


def _mnist_dirs(spec: DatasetSpec, roots: Iterable[Path]) -> list[Path]:
    """Each root, its subfolder named after the dataset and torchvision's ``<Class>/raw``."""
    return _unique(d for root in roots
                   for d in (root, root / spec.name, root / _torchvision_name(spec) / "raw"))


def _read_mnist_split(spec: DatasetSpec, images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images_path), read_idx(labels_path)
    height, width = spec.shape[1:]
    if x.ndim != 3 or x.shape[1:] != (height, width) or len(x) == 0:
        raise DatasetError(f"{images_path}: expected images of shape (N, {height}, {width}) with N > 0, "
                           f"found shape {x.shape}.")
    if y.ndim != 1:
        raise DatasetError(f"{labels_path}: expected 1-d labels, found shape {y.shape}.")
    if len(y) != len(x):
        raise DatasetError(f"{labels_path} has {len(y)} labels but {images_path} has {len(x)} images.")
    _check_label_range(y, spec.num_classes, labels_path)
    return _to_unit_float(x[:, None]), y


# ---------------------------------------------------------------------------- CIFAR


def load_cifar(spec: DatasetSpec, data_dir: str | Path | None, download: bool) -> ArrayDataset:
    """Load CIFAR-10 or CIFAR-100 (fine labels) from the python batches (see the module docstring)."""
    layout = CIFAR100_LAYOUT if spec.num_classes == 100 else CIFAR10_LAYOUT
    names = [*layout.train, layout.test, layout.meta]
    dirs = _cifar_dirs(layout, _search_roots(spec, data_dir))
    found = _locate(dirs, names, ("",))
    if found is None and download:
        dirs = _unique(dirs + _cifar_dirs(layout, [_download(spec, data_dir)]))
        found = _locate(dirs, names, ("",))
    if found is None:
        raise DatasetError(_missing_message(spec, dirs, names, ("",)))
    directory, files = found
    train = [_read_cifar_batch(files[n], layout.label_key, spec.num_classes) for n in layout.train]
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    x_test, y_test = _read_cifar_batch(files[layout.test], layout.label_key, spec.num_classes)
    class_names = _read_cifar_names(files[layout.meta], layout.names_key, spec.num_classes)
    return ArrayDataset(spec.name, _to_unit_float(x_train.reshape(-1, 3, 32, 32)), y_train,
                        _to_unit_float(x_test.reshape(-1, 3, 32, 32)), y_test, spec.num_classes,
                        class_names, str(directory))


def _cifar_dirs(layout: CifarLayout, roots: Iterable[Path]) -> list[Path]:
    return _unique(d for root in roots for d in (root / layout.folder, root))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_CIFAR_PICKLE_GLOBALS``."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(f"refusing to unpickle {module}.{name} from {self._path}: "
                               "not a CIFAR batch.") from None


def _unpickle_dict(path: Path, required: Sequence[bytes]) -> dict:
    """Read a CIFAR pickle with the restricted unpickler; it must be a dict with ``required`` keys."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except DatasetError:
        raise
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}.") from e
    except Exception as e:  # a corrupt pickle can fail in many ways (EOFError, UnpicklingError, ...)
        raise DatasetError(f"{path}: corrupt CIFAR pickle ({type(e).__name__}: {e}).") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}.")
    missing = [k for k in required if k not in obj]
    if missing:
        raise DatasetError(f"{path}: missing keys {missing} (found keys {sorted(map(repr, obj))}).")
    return obj


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The (N, 3072) uint8 data and int64 labels of one batch file, checked."""
    batch = _unpickle_dict(path, (b"data", label_key))
    data = batch[b"data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: expected b'data' to be a uint8 array of shape (N, 3072), found {found}.")
    labels = np.asarray(batch[label_key])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: expected {label_key!r} to be a list of ints, found {labels.dtype} "
                           f"values of shape {labels.shape}.")
    if len(labels) != len(data):
        raise DatasetError(f"{path}: {len(labels)} labels for {len(data)} images.")
    _check_label_range(labels, num_classes, path)
    return data, labels.astype(np.int64)


def _read_cifar_names(path: Path, key: bytes, num_classes: int) -> list[str]:
    names = _unpickle_dict(path, (key,))[key]
    if not (isinstance(names, list) and len(names) == num_classes
            and all(isinstance(n, (bytes, str)) for n in names)):
        raise DatasetError(f"{path}: expected {key!r} to be a list of {num_classes} class names.")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def write_cifar_batch(path: str | Path, data: np.ndarray, labels: Iterable[int], label_key: bytes = b"labels",
                      extra: dict[bytes, Any] | None = None) -> None:
    """Write one CIFAR batch as the original files are: a protocol-2 pickle of a bytes-keyed dict.

    ``data`` is uint8 (N, 3072) (red, green, blue 32x32 planes per row); ``extra`` adds entries
    (e.g. ``b'coarse_labels'`` or ``b'filenames'``).
    """
    data = np.asarray(data)
    labels = [int(v) for v in labels]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR data must be a uint8 array of shape (N, 3072), got {data.dtype} {data.shape}.")
    if len(labels) != len(data):
        raise ValueError(f"{len(labels)} labels for {len(data)} images.")
    _dump_pickle(path, {**(extra or {}), b"data": data, label_key: labels})


def _dump_pickle(path: str | Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


# ------------------------------------------------------------------ miniature datasets


def make_miniature_mnist(directory: str | Path, n_train: int, n_test: int, gzip: bool = False,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """Write random MNIST-format IDX files into ``directory``; return the uint8 arrays written.

    The result has keys ``x_train`` (n_train, 28, 28), ``y_train``, ``x_test`` and ``y_test``.
    """
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = MNIST_FILES[split]
        suffix = ".gz" if gzip else ""
        arrays[f"x_{split}"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"y_{split}"] = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / (images_name + suffix), arrays[f"x_{split}"], gzip)
        write_idx(directory / (labels_name + suffix), arrays[f"y_{split}"], gzip)
    return arrays


def make_miniature_cifar(directory: str | Path, n_train_per_batch: int, n_test: int, hundred: bool = False,
                         seed: int = 0) -> dict[str, Any]:
    """Write a random CIFAR-10 (or, if ``hundred``, CIFAR-100) folder into ``directory``.

    Returns the data written: ``x_train`` (uint8, (N, 3072), the train batches concatenated),
    ``y_train``, ``x_test``, ``y_test`` and ``class_names``.
    """
    layout = CIFAR100_LAYOUT if hundred else CIFAR10_LAYOUT
    num_classes = 100 if hundred else 10
    rng = np.random.default_rng(seed)
    folder = Path(directory) / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in [*layout.train, layout.test]:
        n = n_test if name == layout.test else n_train_per_batch
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, num_classes, n)
        extra = {b"batch_label": name.encode(), b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        if hundred:
            extra[b"coarse_labels"] = [int(v) // 5 for v in y]
        write_cifar_batch(folder / name, x, y, layout.label_key, extra)
        xs.append(x)
        ys.append(y)
    class_names = [f"class_{i}" for i in range(num_classes)]
    meta: dict[bytes, Any] = {layout.names_key: [n.encode() for n in class_names]}
    if hundred:
        meta[b"coarse_label_names"] = [f"superclass_{i}".encode() for i in range(20)]
    else:
        meta.update({b"num_cases_per_batch": n_train_per_batch, b"num_vis": 3072})
    _dump_pickle(folder / layout.meta, meta)
    return {"x_train": np.concatenate(xs[:-1]), "y_train": np.concatenate(ys[:-1]),
            "x_test": xs[-1], "y_test": ys[-1], "class_names": class_names}


# ------------------------------------------------------------------------------ shared


def _search_roots(spec: DatasetSpec, data_dir: str | Path | None) -> list[Path]:
    """``data_dir`` alone when given; otherwise ``$CFBENCH_DATA_DIR`` and the system locations."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = os.environ.get(ENV_DATA_DIR)
    return ([Path(env).expanduser()] if env else []) + list(SYSTEM_DIRS.get(spec.name, ()))


def _unique(paths: Iterable[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def _find(directory: Path, name: str, suffixes: Sequence[str]) -> Path | None:
    return next((directory / (name + s) for s in suffixes if (directory / (name + s)).is_file()), None)


def _locate(dirs: Sequence[Path], names: Sequence[str],
            suffixes: Sequence[str]) -> tuple[Path, dict[str, Path]] | None:
    """The first directory holding every file of ``names`` (each under one of ``suffixes``)."""
    for directory in dirs:
        files = {name: _find(directory, name, suffixes) for name in names}
        if all(files.values()):
            return directory, files  # type: ignore[return-value]
    return None


def _missing_message(spec: DatasetSpec, dirs: Sequence[Path], names: Sequence[str],
                     suffixes: Sequence[str]) -> str:
    if not dirs:
        searched = f"nothing (no data directory given: pass --data-dir DIR or set {ENV_DATA_DIR})"
    else:
        parts = []
        for d in dirs:
            missing = [n for n in names if _find(d, n, suffixes) is None]
            parts.append(f"{d} (lacks {', '.join(missing)})" if len(missing) < len(names) else str(d))
        searched = ", ".join(parts)
    optional = "".join(f"[{s}]" for s in suffixes if s)
    return (f"dataset {spec.name!r} not found: need {', '.join(n + optional for n in names)}. Searched {searched}. "
            f"To get it: {spec.how_to_get}")


def _torchvision_name(spec: DatasetSpec) -> str:
    return _TORCHVISION_CLASS.get(spec.name, type(spec).__name__)


def _download(spec: DatasetSpec, data_dir: str | Path | None) -> Path:
    """Fetch the dataset with torchvision; return the root it was written under."""
    try:
        from torchvision import datasets
    except ImportError:
        raise DatasetError(f"dataset {spec.name!r}: --download needs torchvision, which is not installed "
                           f"(`pip install torchvision`). Or supply the files by hand: {spec.how_to_get}") from None
    root = Path(data_dir or os.environ.get(ENV_DATA_DIR) or DEFAULT_DOWNLOAD_DIR).expanduser()
    try:
        getattr(datasets, _torchvision_name(spec))(root=str(root), download=True)
    except (OSError, RuntimeError) as e:
        raise DatasetError(f"dataset {spec.name!r}: download into {root} failed ({e}). "
                           f"To get it by hand: {spec.how_to_get}") from e
    return root


def _check_label_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels must be in [0, {num_classes}), found values from "
                           f"{labels.min()} to {labels.max()}.")


def _to_unit_float(x: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1]."""
    out = x.astype(np.float32)
    out /= 255
    return out
