"""Datasets: specs (registered components), on-disk formats and seeded splits."""

from .specs import ArrayDataset, DatasetSpec  # noqa: F401
