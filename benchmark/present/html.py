"""HTML pages: rendering the Jinja2 templates in ``present/templates/`` and writing pages.

Autoescaping is on, so text from records (a defense's name or description, a warning) is
always rendered as text, never as markup.  Pages are written through
:func:`cfbench.store.atomic_write_text` (atomic, mode 0644: reports are meant to be shared).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import atomic_write_text

TEMPLATES = Path(__file__).resolve().parent / "templates"


def render_template(name: str, **context: Any) -> str:
    """Render ``present/templates/<name>`` with autoescaping on."""
    from jinja2 import Environment, FileSystemLoader

    from .. import __version__

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, trim_blocks=False,
                      lstrip_blocks=False, keep_trailing_newline=True)
    return env.get_template(name).render(cfbench_version=__version__, **context)


def write_html(html: str, out: str | Path) -> Path:
    """Write one page atomically (parent folders created); returns its path."""
    out = Path(out)
    atomic_write_text(out, html)
    return out
