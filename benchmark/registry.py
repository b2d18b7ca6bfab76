"""One generic registry for every component kind.

Components are found through entry-point groups (``cfbench.defenses``, ``cfbench.datasets``,
``cfbench.models``, ``cfbench.attacks``, ``cfbench.evaluators``) -- cfbench's own built-ins
are declared there too -- or from a local file named with ``--plugin path.py``.  Names are
listed without importing anything; a component is imported on first use, its type, its
``Params`` and its plugin API version are checked, and a typo gets close-match suggestions.
The contract of each kind is documented in ``docs/plugins.md``.

Failure isolation:

* an entry point that fails to import (or is of the wrong type, or was written for another
  plugin API version) is an error only when its name is used; ``cfbench list`` shows it with
  its error, warns (:class:`PluginWarning`) and lists everything else;
* two entry points with one name are an error naming both sources, again only when the
  ambiguous name is used (so an unrelated run is not broken by two other plugins);
* a ``--plugin`` file is loaded eagerly, because the user named it: if it fails to import,
  defines a component of the wrong type or API version, or reuses a registered name, loading
  it raises :class:`~cfbench.errors.PluginError` (the CLI exits with status 2) and nothing
  from the file is registered.

Security: code is imported only from installed entry points and from files the user names;
no directory is ever scanned.  ``CFBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` loads only cfbench's own
components plus the files named with ``--plugin`` (like pytest's
``PYTEST_DISABLE_PLUGIN_AUTOLOAD``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import inspect
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import PLUGIN_API_VERSION
from .errors import PluginError, UsageError, suggest

KINDS = {
    "defense": ("cfbench.defenses", "cfbench.defenses.base:Defense"),
    "dataset": ("cfbench.datasets", "cfbench.data.base:DatasetSpec"),
    "model": ("cfbench.models", "cfbench.models:ModelBase"),
    "attack": ("cfbench.attacks", "cfbench.attacks.base:Attack"),
    "evaluator": ("cfbench.evaluators", "cfbench.evaluators.base:Evaluator"),
}

#: kinds whose classes carry a ``Params`` dataclass of typed hyper-parameters
KINDS_WITH_PARAMS = ("defense", "model", "attack", "evaluator")

#: a component name: it becomes part of run ids, hence of folder names, so no ``/``, no
#: leading dot, nothing a shell or a file system treats specially
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"
_NAME_RE = re.compile(NAME_PATTERN + r"\Z")


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a component (None if it can)."""
    if isinstance(name, str) and _NAME_RE.match(name) and len(name) <= 100:
        return None
    return (f"the name {name!r} is not a valid component name: names must match {NAME_PATTERN} "
            "(lower-case letters, digits, '.', '_' and '-', starting with a letter or a digit; at most "
            "100 characters), because they become part of run folder names")


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the rest of cfbench still works."""


def _resolve(path: str):
    mod, _, attr = path.partition(":")
    obj = importlib.import_module(mod)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _describe_exception(e: BaseException) -> str:
    """``Type: message (at file:line)``, the line being the innermost frame outside the import machinery."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith("<frozen") and Path(f.filename).name != "registry.py"]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


@dataclass
class Entry:
    """A registered component: loaded lazily from an entry point, or given directly (a file)."""

    kind: str
    name: str
    source: str                 # "cfbench 0.1.0", "cfbench-mart 0.1.0" or a --plugin file path
    distribution: str | None    # distribution name, or None for a --plugin file
    dist_version: str | None    # distribution version (a --plugin file: the class' plugin_version)
    target: str | None = None   # "module:attr" for entry points
    obj: Any = None
    error: str | None = None
    file: str | None = None     # a --plugin file: its absolute path ...
    sha256: str | None = None   # ... and the sha256 of the bytes that were executed

    def load(self):
        if self.obj is None:
            if self.error is not None:  # failed before: do not import again
                raise PluginError(self._failure())
            try:
                self.obj = _resolve(self.target)  # type: ignore[arg-type]
            except (Exception, SystemExit) as e:  # report any import failure of a plugin (even an exit)
                self.error = _describe_exception(e)
                raise PluginError(self._failure()) from e
        return self.obj

    def _failure(self) -> str:
        return f"{self.kind} {self.name!r} from {self.source} ({self.target}) failed to import: {self.error}"

    def describe_origin(self) -> str:
        what = self.target or (f"{self.obj.__qualname__}" if self.obj is not None else "?")
        return f"{self.source} ({what})"

    def provenance(self) -> dict[str, Any]:
        """Where the component came from, for the result record."""
        return {"source": self.source, "distribution": self.distribution,
                "distribution_version": self.dist_version, "entry_point": self.target,
                "file": self.file, "sha256": self.sha256}


@dataclass
class Registry:
    kind: str
    group: str
    base_path: str
    entries: dict[str, Entry] = field(default_factory=dict)
    #: names claimed by more than one entry point: every claimant after the first
    conflicts: dict[str, list[Entry]] = field(default_factory=dict)

    def _collision(self, entry: Entry) -> Entry | None:
        """The entry already registered under ``entry.name`` that is not the same component."""
        old = self.entries.get(entry.name)
        if old is None:
            return None
        same = (old.target is not None and old.target == entry.target) or (
            old.obj is not None and old.obj is entry.obj)
        return None if same else old

    def add(self, entry: Entry, *, strict: bool = True) -> None:
        """Register ``entry``.  A different component with the same name raises a
        :class:`PluginError` naming both sources (``strict``) or is recorded as a conflict that
        is raised when the name is used."""
        old = self._collision(entry)
        if old is None:
            self.entries.setdefault(entry.name, entry)
            return
        if strict:
            raise PluginError(self._conflict_message(entry.name, [old, entry]))
        self.conflicts.setdefault(entry.name, []).append(entry)

    def _conflict_message(self, name: str, claimants: list[Entry]) -> str:
        srcs = " and ".join(f"one from {e.describe_origin()}" for e in claimants)
        return (f"{len(claimants)} {self.kind}s are named {name!r}: {srcs}. "
                "Uninstall or rename one of them.")

    def names(self) -> list[str]:
        return sorted(self.entries)

    def base(self):
        return _resolve(self.base_path)

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise UsageError(f"unknown {self.kind} {name!r}." + suggest(name, self.entries))
        if name in self.conflicts:
            raise PluginError(self._conflict_message(name, [self.entries[name], *self.conflicts[name]]))
        return self.entries[name]

    def get(self, name: str):
        """The component class registered as ``name`` (imported and checked on first use)."""
        entry = self.entry(name)
        obj = entry.load()
        check_component(self.kind, entry, obj, self.base())
        return obj


def check_component(kind: str, entry: Entry, obj, base) -> None:
    """Raise :class:`PluginError` unless ``obj`` is a usable component of ``kind``."""
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise PluginError(f"{kind} {entry.name!r} from {entry.source} is {obj!r}, "
                          f"not a subclass of {base.__module__}.{base.__qualname__}.")
    api = getattr(obj, "api_version", PLUGIN_API_VERSION)
    if api != PLUGIN_API_VERSION:
        raise PluginError(
            f"{kind} {entry.name!r} from {entry.source} was written for cfbench plugin API "
            f"version {api!r}, but this cfbench (version {_version()}) provides plugin API version "
            f"{PLUGIN_API_VERSION}. Install a version of the plugin made for plugin API "
            f"{PLUGIN_API_VERSION}, or a cfbench that provides API {api!r}.")
    declared = getattr(obj, "name", None)
    if declared and declared != entry.name:
        raise PluginError(f"{kind} registered as {entry.name!r} from {entry.source} declares "
                          f"name = {declared!r}; the two must agree.")
    if kind in KINDS_WITH_PARAMS:
        params = getattr(obj, "Params", None)
        if not (inspect.isclass(params) and dataclasses.is_dataclass(params)):
            raise PluginError(
                f"{kind} {entry.name!r} from {entry.source} has no `Params` dataclass (found {params!r}); "
                "declare its hyper-parameters as a frozen dataclass (an empty one if it has none).")


def _version() -> str:
    from . import __version__
    return __version__


_REGISTRIES: dict[str, Registry] | None = None
_PLUGIN_FILES: list[str] = []
_PLUGIN_MODULES: list[str] = []
LOAD_WARNINGS: list[str] = []


def _warn(msg: str) -> None:
    if msg not in LOAD_WARNINGS:
        LOAD_WARNINGS.append(msg)
        warnings.warn(PluginWarning(msg), stacklevel=3)


def _autoload_disabled() -> bool:
    return os.environ.get("CFBENCH_DISABLE_PLUGIN_AUTOLOAD", "").lower() in {"1", "true", "yes"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _discover(regs: dict[str, Registry]) -> None:
    """Register every entry point of the cfbench groups, distribution by distribution.

    Like ``importlib.metadata.entry_points()``, only the first distribution of a given name on
    ``sys.path`` counts.  A distribution whose metadata cannot be read is skipped with a warning.
    """
    groups = {reg.group: reg for reg in regs.values()}
    only_builtin = _autoload_disabled()
    seen: set[str] = set()
    found: list[tuple[str, str, str, str | None, str | None]] = []
    for dist in md.distributions():
        try:
            # the folder name gives the normalised name without parsing METADATA (fast)
            key = getattr(dist, "_normalized_name", None) or dist.metadata["Name"]
            key = _norm(key) if key else None
            if key is None or key in seen:
                continue
            seen.add(key)
            eps = [ep for ep in dist.entry_points if ep.group in groups]
            if not eps:
                continue
            dname = dist.metadata["Name"] or key
        except Exception as e:  # noqa: BLE001 - broken metadata of one distribution
            where = getattr(dist, "_path", "?")
            _warn(f"could not read the entry points of the distribution at {where}: {_describe_exception(e)}")
            continue
        if only_builtin and key != "cfbench":
            continue
        for ep in eps:
            found.append((ep.group, ep.name, ep.value, dname, dist.version))
    for group, name, value, dname, dver in sorted(found, key=lambda t: tuple(v or "" for v in t)):
        reg = groups[group]
        # an invalid name is listed with its error and refused when used (never a folder name)
        reg.add(Entry(reg.kind, name, f"{dname} {dver}", dname, dver, target=value, error=name_problem(name)),
                strict=False)


def registries() -> dict[str, Registry]:
    """All registries, discovering entry points on first call."""
    global _REGISTRIES
    if _REGISTRIES is None:
        regs = {k: Registry(k, g, b) for k, (g, b) in KINDS.items()}
        _discover(regs)
        _REGISTRIES = regs
    return _REGISTRIES


def registry(kind: str) -> Registry:
    regs = registries()
    if kind not in regs:
        raise UsageError(f"unknown component kind {kind!r}." + suggest(kind, regs))
    return regs[kind]


def get(kind: str, name: str):
    return registry(kind).get(name)


def load_plugin_file(path: str | os.PathLike) -> list[Entry]:
    """Register every component class defined in a local Python file (``--plugin``).

    A component is a class *defined in the file* (classes it imports are ignored) that
    subclasses one of the five base classes and declares its own ``name``.  Loading is
    all-or-nothing: an import error, a wrong type or API version, or a name that is already
    registered raises :class:`PluginError` and registers nothing.  Loading the same file twice
    is a no-op.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"plugin file {str(path)!r} does not exist (--plugin takes the path of a .py file).")
    if p.suffix != ".py":
        raise UsageError(f"plugin file {str(path)!r} is not a .py file.")
    resolved = str(p.resolve())
    regs = registries()
    if resolved in _PLUGIN_FILES:
        return [e for r in regs.values() for e in r.entries.values() if e.file == resolved]
    added = _load_file_into(regs, resolved)
    _PLUGIN_FILES.append(resolved)
    return added


def _load_file_into(regs: dict[str, Registry], path: str) -> list[Entry]:
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    stem = re.sub(r"\W", "_", Path(path).stem)
    # unique per path, so two files named defense.py in different folders do not clash
    modname = f"cfbench_plugin_{stem}_{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"plugin file {path!r} is not a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module  # dataclasses and typing.get_type_hints look the module up
    try:
        # execute exactly the bytes that were hashed (the record carries the hash)
        exec(compile(data, path, "exec"), module.__dict__)  # noqa: S102 - a file the user named
    except BaseException as e:
        del sys.modules[modname]
        if isinstance(e, SystemExit):  # a plugin must never end the process (or pick its exit status)
            raise PluginError(f"plugin file {path} called sys.exit({e.code!r}) while being imported "
                              f"({_describe_exception(e)}); a plugin must not exit.") from None
        if not isinstance(e, Exception):
            raise
        raise PluginError(f"plugin file {path} failed to import: {_describe_exception(e)}") from e
    try:
        staged: list[tuple[Registry, Entry]] = []
        for kind, reg in regs.items():
            base = reg.base()
            for obj in vars(module).values():
                if not (inspect.isclass(obj) and issubclass(obj, base) and obj is not base
                        and obj.__module__ == modname):
                    continue
                name = vars(obj).get("name")  # declared by this class, not inherited
                if not name:
                    continue
                if not isinstance(name, str):
                    raise PluginError(f"{kind} class {obj.__qualname__} in {path} has name = {name!r}; "
                                      "a name must be a string.")
                bad_name = name_problem(name)
                if bad_name:
                    raise PluginError(f"{kind} class {obj.__qualname__} in {path}: {bad_name}.")
                entry = Entry(kind, name, path, None, getattr(obj, "plugin_version", None), obj=obj,
                              file=path, sha256=digest)
                check_component(kind, entry, obj, base)
                clash = reg._collision(entry) or next(
                    (e for r, e in staged if r is reg and e.name == name), None)
                if clash is not None:
                    raise PluginError(reg._conflict_message(name, [clash, entry]))
                staged.append((reg, entry))
        if not staged:
            raise PluginError(
                f"plugin file {path} defines no cfbench component (a class defined in the file that "
                "subclasses Defense, DatasetSpec, ModelBase, Attack or Evaluator and sets its own `name`).")
    except BaseException:
        del sys.modules[modname]
        raise
    for reg, entry in staged:
        reg.add(entry)
    _PLUGIN_MODULES.append(modname)
    return [e for _, e in staged]


def list_components(kind: str) -> list[dict[str, Any]]:
    """Name, description, source, version and parameters of each component of a kind.

    A component that fails to import (or is ambiguous, or broken in any other way) is listed
    with its error and warned about, so that a broken plugin never hides the others.
    """
    from .params import describe

    out = []
    reg = registry(kind)
    for name in reg.names():
        entry = reg.entries[name]
        row: dict[str, Any] = {"name": name, "source": entry.source}
        try:
            obj = reg.get(name)
            description = (getattr(obj, "description", "") or (obj.__doc__ or "").strip().split("\n")[0])
            version = getattr(obj, "version", 1)
            params_cls = getattr(obj, "Params", None)
            params = describe(params_cls) if params_cls is not None else []
        except Exception as e:  # noqa: BLE001 - isolate any broken plugin
            msg = str(e) if isinstance(e, (PluginError, UsageError)) else (
                f"{kind} {name!r} from {entry.source} is broken: {_describe_exception(e)}")
            _warn(msg)
            row.update(error=msg, description="(failed to load)", params=[], version=None)
            out.append(row)
            continue
        row.update(description=description, version=version, params=params)
        out.append(row)
    return out


def plugin_files() -> list[str]:
    """The ``--plugin`` files loaded so far, in order (worker processes load them too)."""
    return list(_PLUGIN_FILES)


def reset() -> None:
    """Forget discovered components and plugin files (for tests)."""
    global _REGISTRIES
    _REGISTRIES = None
    _PLUGIN_FILES.clear()
    for modname in _PLUGIN_MODULES:
        sys.modules.pop(modname, None)
    _PLUGIN_MODULES.clear()
    LOAD_WARNINGS.clear()
