"""Datasets: specs (registered components), on-disk formats and seeded splits."""

from .base import ArrayDataset, DatasetSpec  # noqa: F401
