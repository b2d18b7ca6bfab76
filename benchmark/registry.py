"""One generic registry for every component kind.

Components are found through entry-point groups (``cfbench.defenses``, ``cfbench.datasets``,
``cfbench.models``, ``cfbench.attacks``, ``cfbench.evaluators``) -- cfbench's own built-ins
are declared there too -- or from a local file named with ``--plugin path.py``.  Names are
listed without importing anything; a component is imported on first use, its type and
plugin API version are checked, and a typo gets close-match suggestions.

Failure isolation: a plugin that fails to import is reported as a warning (with its error)
and left out; everything else keeps working.  Two components with one name are an error
naming both sources.  ``CFBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` loads only cfbench's own
components plus the files named with ``--plugin``.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import PLUGIN_API_VERSION
from .errors import PluginError, UsageError, suggest

KINDS = {
    "defense": ("cfbench.defenses", "cfbench.defense:Defense"),
    "dataset": ("cfbench.datasets", "cfbench.data.specs:DatasetSpec"),
    "model": ("cfbench.models", "cfbench.models:ModelBase"),
    "attack": ("cfbench.attacks", "cfbench.attacks.base:Attack"),
    "evaluator": ("cfbench.evaluators", "cfbench.evaluators.base:Evaluator"),
}


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the rest of cfbench still works."""


def _resolve(path: str):
    mod, _, attr = path.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Entry:
    """A registered component: loaded lazily from an entry point or given directly."""

    kind: str
    name: str
    source: str                 # "cfbench 0.1.0", "mart-plugin 1.0 (entry point)" or a file path
    distribution: str | None    # distribution name, or None for a --plugin file
    dist_version: str | None
    target: str | None = None   # "module:attr" for entry points
    obj: Any = None
    error: str | None = None

    def load(self):
        if self.obj is None:
            try:
                self.obj = _resolve(self.target)  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - report any import failure of a plugin
                self.error = f"{type(e).__name__}: {e}"
                raise PluginError(
                    f"{self.kind} {self.name!r} from {self.source} failed to import: {self.error}") from e
        return self.obj

    @property
    def builtin(self) -> bool:
        return self.distribution == "cfbench"


@dataclass
class Registry:
    kind: str
    group: str
    base_path: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        old = self.entries.get(entry.name)
        if old is not None:
            same = (old.target is not None and old.target == entry.target) or (
                old.obj is not None and old.obj is entry.obj)
            if same:
                return
            raise PluginError(
                f"two {self.kind}s are named {entry.name!r}: one from {old.source} "
                f"({old.target or old.obj!r}) and one from {entry.source} ({entry.target or entry.obj!r}). "
                "Uninstall or rename one of them.")
        self.entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self.entries)

    def base(self):
        return _resolve(self.base_path)

    def get(self, name: str):
        """The component class registered as ``name`` (imported and checked on first use)."""
        if name not in self.entries:
            raise UsageError(f"unknown {self.kind} {name!r}." + suggest(name, self.entries))
        entry = self.entries[name]
        obj = entry.load()
        check_component(self.kind, entry, obj, self.base())
        return obj

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise UsageError(f"unknown {self.kind} {name!r}." + suggest(name, self.entries))
        return self.entries[name]


def check_component(kind: str, entry: Entry, obj, base) -> None:
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise PluginError(f"{kind} {entry.name!r} from {entry.source} is {obj!r}, "
                          f"not a subclass of {base.__module__}.{base.__qualname__}.")
    api = getattr(obj, "api_version", PLUGIN_API_VERSION)
    if api != PLUGIN_API_VERSION:
        raise PluginError(
            f"{kind} {entry.name!r} from {entry.source} was written for cfbench plugin API "
            f"version {api}, but this cfbench (version {_version()}) provides API version "
            f"{PLUGIN_API_VERSION}. Update the plugin or install a matching cfbench.")
    declared = getattr(obj, "name", None)
    if declared and declared != entry.name:
        raise PluginError(f"{kind} registered as {entry.name!r} from {entry.source} declares "
                          f"name = {declared!r}; the two must agree.")


def _version() -> str:
    from . import __version__
    return __version__


_REGISTRIES: dict[str, Registry] | None = None
_PLUGIN_FILES: list[str] = []
LOAD_WARNINGS: list[str] = []


def _autoload_disabled() -> bool:
    return os.environ.get("CFBENCH_DISABLE_PLUGIN_AUTOLOAD", "").lower() in {"1", "true", "yes"}


def registries() -> dict[str, Registry]:
    """All registries, discovering entry points on first call."""
    global _REGISTRIES
    if _REGISTRIES is None:
        regs = {k: Registry(k, g, b) for k, (g, b) in KINDS.items()}
        only_builtin = _autoload_disabled()
        for kind, reg in regs.items():
            for ep in sorted(md.entry_points(group=reg.group), key=lambda e: (e.name, e.value)):
                dist = getattr(ep, "dist", None)
                dname = dist.metadata["Name"] if dist is not None else None
                dver = dist.version if dist is not None else None
                if only_builtin and dname != "cfbench":
                    continue
                src = f"{dname} {dver}" if dname else f"entry point {ep.value}"
                reg.add(Entry(kind, ep.name, src, dname, dver, target=ep.value))
        _REGISTRIES = regs
        for path in list(_PLUGIN_FILES):
            _load_file_into(regs, path)
    return _REGISTRIES


def registry(kind: str) -> Registry:
    regs = registries()
    if kind not in regs:
        raise UsageError(f"unknown component kind {kind!r}." + suggest(kind, regs))
    return regs[kind]


def get(kind: str, name: str):
    return registry(kind).get(name)


def load_plugin_file(path: str | os.PathLike) -> list[Entry]:
    """Register every component class defined in a local Python file (``--plugin``)."""
    p = str(Path(path).resolve())
    if not Path(p).is_file():
        raise UsageError(f"plugin file {str(path)!r} does not exist.")
    if p in _PLUGIN_FILES:
        return []
    _PLUGIN_FILES.append(p)
    if _REGISTRIES is None:
        registries()  # discovers entry points and then this file
        return [e for r in _REGISTRIES.values() for e in r.entries.values() if e.source == p]  # type: ignore[union-attr]
    return _load_file_into(_REGISTRIES, p)


def _load_file_into(regs: dict[str, Registry], path: str) -> list[Entry]:
    modname = "cfbench_plugin_" + Path(path).stem.replace("-", "_")
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"plugin file {path!r} is not a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        del sys.modules[modname]
        raise PluginError(f"plugin file {path} failed to import: {type(e).__name__}: {e}") from e
    added = []
    for kind, reg in regs.items():
        base = reg.base()
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, base) and obj is not base
                    and obj.__module__ == modname and getattr(obj, "name", None)):
                entry = Entry(kind, obj.name, path, None, getattr(obj, "plugin_version", None), obj=obj)
                check_component(kind, entry, obj, base)
                reg.add(entry)
                added.append(entry)
    if not added:
        warnings.warn(PluginWarning(f"plugin file {path} defines no cfbench component "
                                    "(a subclass of Defense, DatasetSpec, ModelBase, Attack or Evaluator with a `name`)."))
    return added


def list_components(kind: str) -> list[dict[str, Any]]:
    """Name, description, source, version and parameters of each component of a kind.

    A component that fails to import is listed with its error (and warned about), so that a
    broken plugin never hides the others.
    """
    from .params import describe

    out = []
    reg = registry(kind)
    for name in reg.names():
        entry = reg.entries[name]
        row: dict[str, Any] = {"name": name, "source": entry.source}
        try:
            obj = reg.get(name)
        except (PluginError, UsageError) as e:
            msg = str(e)
            if msg not in LOAD_WARNINGS:
                LOAD_WARNINGS.append(msg)
                warnings.warn(PluginWarning(msg))
            row.update(error=msg, description="(failed to load)", params=[], version=None)
            out.append(row)
            continue
        row["description"] = (getattr(obj, "description", "") or (obj.__doc__ or "").strip().split("\n")[0])
        row["version"] = getattr(obj, "version", 1)
        params_cls = getattr(obj, "Params", None)
        row["params"] = describe(params_cls) if params_cls is not None else []
        out.append(row)
    return out


def reset() -> None:
    """Forget discovered components and plugin files (for tests)."""
    global _REGISTRIES
    _REGISTRIES = None
    _PLUGIN_FILES.clear()
    LOAD_WARNINGS.clear()
