"""Progress for people and for log files.

In a terminal: a tqdm bar with "k/K", the rate and an ETA, left on screen when it ends (so
the history of a run stays readable).  When stderr is not a terminal (piped to a file, CI):
no bar frames at all -- one line per step with a UTC timestamp, the elapsed time and an ETA
(e.g. one line per epoch), so a log reads top to bottom.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone


def _fmt(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def log_line(text: str, stream=None) -> None:
    """A timestamped line (UTC, seconds) on stderr."""
    stream = stream or sys.stderr
    print(f"{datetime.now(timezone.utc).strftime('%H:%M:%S')} {text}", file=stream, flush=True)


class Progress:
    """``with Progress(total, desc, unit) as p: p.update(1, loss=0.3)``."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True,
                 stream=None, leave: bool = True):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.start_n = self.n
        self.bar = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=leave,
                            dynamic_ncols=True, file=self.stream)

    def update(self, k: int = 1, **info) -> None:
        self.n += k
        if not self.enabled:
            return
        if self.bar is not None:
            if info:
                self.bar.set_postfix({key: (f"{v:.3g}" if isinstance(v, float) else v) for key, v in info.items()},
                                     refresh=False)
            self.bar.update(k)
            return
        elapsed = time.perf_counter() - self.t0
        done = self.n - self.start_n
        eta = elapsed / done * (self.total - self.n) if done else 0.0
        extra = "".join(f" {key} {v:.4g}" if isinstance(v, float) else f" {key} {v}" for key, v in info.items())
        log_line(f"{self.desc}: {self.unit} {self.n}/{self.total}{extra} (elapsed {_fmt(elapsed)}, "
                 f"ETA {_fmt(eta)})", self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
