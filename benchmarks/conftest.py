"""Collect ``bench_*.py`` files when the folder is given (``pytest benchmarks/``).

pytest's default ``python_files`` pattern only matches ``test_*.py``; an explicitly named
file is collected anyway, so this hook skips files that are already initial arguments.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
