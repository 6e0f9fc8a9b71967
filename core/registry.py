"""Discovers plugins through the ``qpeft`` entry-point group and indexes their backends.

A plugin module that fails to import, targets another API version, or registers an invalid
backend is recorded as *broken* (with the reason) and skipped: it never breaks qpeft.
Two backends of one kind claiming the same name is a :class:`PluginError` naming both.

Backends of third-party packages must state the plugin API they target (``api_version = 1``
on the class); qpeft's own backends ship with the core and target its version by definition.
See docs/plugins.md.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import API_VERSION, hookspecs
from .api import PLUGIN_KINDS, Capabilities, EvaluatorPlugin, PeftPlugin, QuantizerPlugin, TrackerPlugin, TrainerPlugin, _Plugin
from .config import FIELD_DOCS
from .errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "qpeft"

_REGISTER_HOOKS = {
    "quantizer": "qpeft_register_quantizers",
    "peft": "qpeft_register_peft_methods",
    "trainer": "qpeft_register_trainers",
    "evaluator": "qpeft_register_evaluators",
    "tracker": "qpeft_register_trackers",
}


@dataclass
class BrokenPlugin:
    """A plugin that could not be used, and why."""

    name: str
    source: str
    reason: str
    #: Name of the backend that was refused, when the plugin got as far as registering one.
    backend: str = ""


@dataclass
class Registry:
    """All usable backends by kind and name, plus the plugins that are broken."""

    pm: pluggy.PluginManager
    backends: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: {} for k in PLUGIN_KINDS})
    origins: dict[tuple[str, str], str] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)

    @property
    def hooks(self):
        """The lifecycle hook caller (``registry.hooks.qpeft_on_step_end(...)``)."""
        return self.pm.hook

    def get(self, kind: str, name: str, key: str | None = None):
        """Return the backend of ``kind`` called ``name``, or raise a ConfigError naming
        ``key`` (default ``<kind>.name``) with the valid names and a did-you-mean."""
        found = self.backends[kind].get(name)
        if found is not None:
            return found
        valid = sorted(self.backends[kind])
        hint = difflib.get_close_matches(str(name), valid, n=1)
        msg = f"unknown {kind} {name!r}; valid: {', '.join(valid) or '(none installed)'}"
        if hint:
            msg += f" (did you mean {hint[0]!r}?)"
        broken = [b for b in self.broken if b.backend == name or (not b.backend and name in b.name)]
        if broken:
            msg += f"; plugin {broken[0].name!r} is broken: {broken[0].reason}"
        raise ConfigError(key or f"{kind}.name", msg)

    def describe(self) -> dict:
        """A JSON-able listing of every backend with its capabilities, and broken plugins."""
        out: dict[str, Any] = {}
        for kind, items in self.backends.items():
            out[kind] = [
                {
                    "name": name,
                    "description": p.description,
                    "source": self.origins[(kind, name)],
                    "api_version": p.api_version,
                    "capabilities": p.capabilities.to_dict(),
                    "options": p.Options.model_json_schema(),
                }
                for name, p in sorted(items.items())
            ]
        out["broken"] = [vars(b) for b in self.broken]
        return out


def _dist_name(ep, seen: dict) -> str:
    """ "name version" of the distribution behind ``ep`` (read once per distribution: each read
    parses its METADATA file)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?"
    key = str(getattr(dist, "_path", id(dist)))
    if key not in seen:
        seen[key] = f"{dist.name} {dist.version}"
    return seen[key]


_API_BASES = (_Plugin, QuantizerPlugin, PeftPlugin, TrainerPlugin, EvaluatorPlugin, TrackerPlugin)


def declared_api_version(backend: Any):
    """The ``api_version`` a backend's own class (or a base of its package) states, or None
    when it only inherits qpeft's default."""
    if "api_version" in getattr(backend, "__dict__", {}):
        return backend.__dict__["api_version"]
    for cls in type(backend).__mro__:
        if cls in _API_BASES:
            return None
        if "api_version" in vars(cls):
            return vars(cls)["api_version"]
    return None


def _is_builtin(source: str) -> bool:
    return source.split(" ", 1)[0] == "qpeft"


def _malformed(kind: str, backend: Any, source: str) -> str | None:
    """Why a registered backend cannot be used (None if it can), checked before indexing it."""
    from pydantic import BaseModel

    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        return f'registered a {kind} whose name is {name!r}; set name = "..." (what configs write) on {type(backend).__name__}'
    stated = declared_api_version(backend)
    if stated is None and not _is_builtin(source) and source != "(in-process)":
        return (
            f"{kind} {name!r} does not state the qpeft plugin API it targets; set api_version = {API_VERSION} on {type(backend).__name__}"
        )
    version = getattr(backend, "api_version", None)
    if version != API_VERSION:
        return f"{kind} {name!r} targets qpeft plugin API {version!r}, this qpeft has {API_VERSION}; install a {source.split(' ', 1)[0]} release for API {API_VERSION}"
    opts = getattr(backend, "Options", None)
    if not (isinstance(opts, type) and issubclass(opts, BaseModel)):
        return f"{kind} {name!r}: Options is {opts!r}, not a pydantic model (subclass qpeft.api.Options)"
    if not isinstance(getattr(backend, "capabilities", None), Capabilities):
        return f"{kind} {name!r}: capabilities is not a qpeft.api.Capabilities"
    token = FIELD_DOCS.set(False)
    try:
        opts.model_json_schema()
    except Exception as exc:
        return f"{kind} {name!r}: its Options model has no JSON schema ({type(exc).__name__}: {exc})"
    finally:
        FIELD_DOCS.reset(token)
    return None


def load_registry(extra_plugins: Iterable[Any] = (), use_entry_points: bool = True) -> Registry:
    """Build the registry from the ``qpeft`` entry points plus ``extra_plugins`` (objects or
    modules with hook implementations, e.g. for tests)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm=pm)

    candidates: list[tuple[str, str, Any]] = []
    if use_entry_points:
        names: dict[str, str] = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            source = _dist_name(ep, names)
            try:
                candidates.append((ep.name, source, ep.load()))
            except (Exception, SystemExit) as exc:  # a broken plugin must never break qpeft
                reg.broken.append(BrokenPlugin(ep.name, source, f"import failed: {type(exc).__name__}: {exc}"))
    for obj in extra_plugins:
        candidates.append((getattr(obj, "__name__", type(obj).__name__), "(in-process)", obj))

    for name, source, module in candidates:
        if pm.is_registered(module):
            continue
        try:
            pm.register(module, name=name)
        except Exception as exc:
            reg.broken.append(BrokenPlugin(name, source, f"invalid hooks: {exc}"))
            continue
        for kind, hook_name in _REGISTER_HOOKS.items():
            impl = getattr(module, hook_name, None)
            if impl is None:
                continue
            collected: list[Any] = []
            try:
                impl(register=collected.append)
            except (Exception, SystemExit) as exc:
                reg.broken.append(BrokenPlugin(name, source, f"{hook_name} failed: {type(exc).__name__}: {exc}"))
                continue
            for backend in collected:
                _add_backend(reg, kind, backend, name, source)
    return reg


def _add_backend(reg: Registry, kind: str, backend: Any, plugin_name: str, source: str) -> None:
    base = PLUGIN_KINDS[kind]
    label = f"{plugin_name} ({source})"
    if not isinstance(backend, base):
        reg.broken.append(BrokenPlugin(plugin_name, source, f"registered {backend!r}, which is not a {base.__name__}"))
        return
    problem = _malformed(kind, backend, source)
    if problem:
        name = getattr(backend, "name", "")
        reg.broken.append(BrokenPlugin(plugin_name, source, problem, name if isinstance(name, str) else ""))
        return
    existing = reg.backends[kind].get(backend.name)
    if existing is not None:
        raise PluginError(
            f"two plugins provide the {kind} {backend.name!r}: {reg.origins[(kind, backend.name)]} and {label}; uninstall one of them"
        )
    reg.backends[kind][backend.name] = backend
    reg.origins[(kind, backend.name)] = label
