"""The dataset contract: :class:`ArrayDataset` (arrays in [0, 1], (N, C, H, W), int64 labels)
and :class:`DatasetSpec`, the base class of dataset components."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import DatasetError


@dataclass
class ArrayDataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: list[str]
    source: str
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self):
        for part in ("x_train", "x_test"):
            x = getattr(self, part)
            if x.ndim != 4:
                raise DatasetError(f"{self.name}: {part} must be (N, C, H, W), got shape {x.shape}.")
            if x.dtype != np.float32:
                setattr(self, part, x.astype(np.float32))
        self.y_train = self.y_train.astype(np.int64)
        self.y_test = self.y_test.astype(np.int64)
        if not self.mean:
            c = self.x_train.shape[1]
            self.mean = tuple(float(v) for v in self.x_train.transpose(1, 0, 2, 3).reshape(c, -1).mean(1))
            self.std = tuple(float(v) for v in self.x_train.transpose(1, 0, 2, 3).reshape(c, -1).std(1))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """sha256 over the arrays: identifies exactly which data a run used."""
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


class DatasetSpec:
    """Base class of dataset components (register under ``cfbench.datasets``)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[int] = 1
    api_version: ClassVar[int] = 1
    shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    num_classes: ClassVar[int] = 10
    default_model: ClassVar[str] = "cnn28"
    #: default threat model: Linf radius (and L2 radius when --set norm=L2)
    default_eps: ClassVar[float] = 0.1
    default_eps_l2: ClassVar[float] = 1.0
    #: augmentation family for training / MIA query augmentations: "none", "shift" or "flip-shift"
    augmentation: ClassVar[str] = "shift"
    #: default training recipe (overridable with --set)
    default_epochs: ClassVar[int] = 10
    default_batch_size: ClassVar[int] = 128
    default_lr: ClassVar[float] = 0.05
    #: evaluator settings this dataset changes from the evaluators' own defaults ("section.name":
    #: value); a --set of the same key wins.  Part of the resolved config, hence of the hash.
    default_evaluator_settings: ClassVar[dict[str, Any]] = {}
    #: how to get the data when it is missing (shown in the error)
    how_to_get: ClassVar[str] = ""

    def load(self, data_dir: str | Path | None = None, download: bool = False) -> ArrayDataset:
        raise NotImplementedError
