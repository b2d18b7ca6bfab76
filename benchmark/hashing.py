"""Canonical JSON and its sha256: the one hasher behind run identities, cache keys and
protocol ids (config hashes, reference-model recipes, proto-cf caches, leaderboard protocols)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON (``default=str`` for anything JSON lacks)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def canonical_hash(obj: Any) -> str:
    """sha256 hex digest of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
