"""Plugin discovery: built-ins through entry points, broken plugins isolated, name clashes refused."""

import json
import subprocess
import sys
import types

import pytest

import qpeft
from qpeft.api import Capabilities, QuantizerPlugin
from qpeft.errors import ConfigError, PluginError
from qpeft.registry import load_registry

BUILTIN = {"quantizer": {"none", "bnb-4bit", "bnb-nf4", "bnb-fp4", "bnb-8bit"}, "peft": {"lora"}, "trainer": {"hf"}}


def _plugin_module(name, register):
    mod = types.ModuleType(name)
    mod.qpeft_register_quantizers = qpeft.hookimpl(register)
    return mod


class _Q(QuantizerPlugin):
    name = "extra-q"
    capabilities = Capabilities(bits=2)


def test_builtins_register_through_entry_points():
    reg = load_registry()
    for kind, names in BUILTIN.items():
        assert names <= set(reg.backends[kind]), kind
    # (other installed packages, e.g. examples/qpeft-torchao, may add their own backends)
    assert all(reg.origins[(kind, n)].startswith(("quant_", "peft_", "trainer_")) for kind, names in BUILTIN.items() for n in names)


def test_broken_plugin_is_reported_not_fatal():
    def register(register):
        raise RuntimeError("kernel library missing")

    reg = load_registry([_plugin_module("boom", register)])
    assert "lora" in reg.backends["peft"]
    assert any(b.name == "boom" and "kernel library missing" in b.reason for b in reg.broken)


def test_wrong_api_version_is_broken():
    class Old(_Q):
        name = "old-q"
        api_version = 0

    reg = load_registry([_plugin_module("old", lambda register: register(Old()))])
    assert "old-q" not in reg.backends["quantizer"]
    assert any("targets qpeft plugin API 0" in b.reason for b in reg.broken)


def test_non_plugin_object_is_broken():
    reg = load_registry([_plugin_module("junk", lambda register: register(object()))])
    assert any("not a QuantizerPlugin" in b.reason for b in reg.broken)


def test_duplicate_name_names_both_sources():
    class Clash(_Q):
        name = "bnb-nf4"

    with pytest.raises(PluginError, match=r"bnb-nf4.*quant_bnb.*clash"):
        load_registry([_plugin_module("clash", lambda register: register(Clash()))])


def test_third_party_backend_is_usable():
    reg = load_registry([_plugin_module("extra", lambda register: register(_Q()))])
    assert reg.get("quantizer", "extra-q").capabilities.bits == 2


def test_unknown_name_lists_valid_and_suggests():
    reg = load_registry()
    with pytest.raises(ConfigError) as exc:
        reg.get("quantizer", "bnb-nf5")
    msg = str(exc.value)
    assert msg.startswith("quantizer.name: unknown quantizer 'bnb-nf5'")
    assert "bnb-8bit" in msg and "did you mean 'bnb-nf4'" in msg


def test_cli_plugins_json_lists_every_builtin_with_capabilities():
    out = subprocess.run([sys.executable, "-m", "qpeft", "plugins", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    for kind, names in BUILTIN.items():
        listed = {p["name"]: p for p in info[kind]}
        assert names <= set(listed)
        for name in names:
            caps = listed[name]["capabilities"]
            assert {"devices", "trainable", "mergeable", "grad_checkpointing", "incompatible"} <= set(caps)
            assert listed[name]["options"]["type"] == "object"
    assert info["broken"] == []
