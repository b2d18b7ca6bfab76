"""Reading a store: every record under a folder, with the bad files reported, never fatal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .record import RECORD, problems, upgrade

#: the shared cache folder inside a store (reference models, signals, generated sets): not runs
CACHE_DIR = "_cache"


@dataclass
class StoreIssues:
    """Files under a store that could not be used, as ``(path, reason)`` pairs."""

    bad: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path | str, reason: str) -> None:
        self.bad.append((str(path), reason))

    def __bool__(self) -> bool:
        return bool(self.bad)

    def lines(self) -> list[str]:
        return [f"{p}: {r}" for p, r in self.bad]


def iter_records(root: str | Path, *, status: str | None = "ok",
                 issues: StoreIssues | None = None) -> Iterator[dict[str, Any]]:
    """Every record under ``root`` (recursively; the shared cache and hidden folders --
    ``.staging`` attempts of ``--force``, ``.trash`` -- excluded), upgraded to the current
    schema, optionally only those with a given ``status``.  A file that is not valid JSON or
    not a usable record (truncated, ``[]``, ``null``, a field of the wrong type, a directory
    named record.json) is skipped and added to ``issues`` with its reason; nothing raises."""
    root = Path(root)
    if not root.exists():
        return
    for path in sorted(root.rglob(RECORD)):
        parts = path.relative_to(root).parts[:-1]
        if CACHE_DIR in parts or any(p.startswith(".") for p in parts):
            continue
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            if issues is not None:
                issues.add(path, f"unreadable ({type(e).__name__}: {e})")
            continue
        bad = problems(rec)
        if bad:
            if issues is not None:
                issues.add(path, "; ".join(bad))
            continue
        rec = upgrade(rec)
        if status is None or rec.get("status") == status:
            rec["_path"] = str(path.parent)
            yield rec
