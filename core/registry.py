"""Discovers plugins through the ``qpeft`` entry-point group and indexes their backends.

A plugin module that fails to import, targets another API version, or registers an invalid
backend is recorded as *broken* (with the reason) and skipped: it never breaks qpeft.
Two backends of one kind claiming the same name is a :class:`PluginError` naming both.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from . import API_VERSION, hookspecs
from .api import PLUGIN_KINDS
from .errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "qpeft"

_REGISTER_HOOKS = {
    "quantizer": "qpeft_register_quantizers",
    "peft": "qpeft_register_peft_methods",
    "trainer": "qpeft_register_trainers",
}


@dataclass
class BrokenPlugin:
    """A plugin that could not be used, and why."""

    name: str
    source: str
    reason: str


@dataclass
class Registry:
    """All usable backends by kind and name, plus the plugins that are broken."""

    pm: pluggy.PluginManager
    backends: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: {} for k in PLUGIN_KINDS})
    origins: dict[tuple[str, str], str] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)

    @property
    def hooks(self):
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
        broken = [b for b in self.broken if name in b.name]
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


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "?"


def load_registry(extra_plugins: Iterable[Any] = (), use_entry_points: bool = True) -> Registry:
    """Build the registry from the ``qpeft`` entry points plus ``extra_plugins`` (objects or
    modules with hook implementations, e.g. for tests)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm=pm)

    candidates: list[tuple[str, str, Any]] = []
    if use_entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            source = _dist_name(ep)
            try:
                candidates.append((ep.name, source, ep.load()))
            except Exception as exc:  # a broken plugin must never break qpeft
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
            except Exception as exc:
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
    if getattr(backend, "api_version", None) != API_VERSION:
        reg.broken.append(
            BrokenPlugin(
                plugin_name,
                source,
                f"{kind} {backend.name!r} targets qpeft plugin API {backend.api_version}, this qpeft has {API_VERSION}",
            )
        )
        return
    existing = reg.backends[kind].get(backend.name)
    if existing is not None:
        raise PluginError(
            f"two plugins provide the {kind} {backend.name!r}: {reg.origins[(kind, backend.name)]} and {label}; "
            "uninstall one of them"
        )
    reg.backends[kind][backend.name] = backend
    reg.origins[(kind, backend.name)] = label
