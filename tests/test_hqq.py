"""The ``hqq`` quantizer beyond the conformance kit (tests/test_conformance.py::TestHqq): methods
peft cannot put on HQQ layers are refused before loading, a group size that does not divide the
layers is refused naming the option, and a saved HQQ model loads by ``model.name_or_path``
without quantizing again."""

import pytest
import torch

import qpeft
from qpeft.api import Capabilities, PeftPlugin
from qpeft.errors import ConfigError
from qpeft.registry import load_registry
from qpeft.testing import tiny_model_path

pytest.importorskip("hqq")


class _Ia3Stub(PeftPlugin):
    """Stands in for an IA3 plugin (issue 23): only its name and capabilities matter here."""

    name = "ia3"
    api_version = 1
    capabilities = Capabilities(mergeable=False)


class _Stubs:
    @qpeft.hookimpl
    def qpeft_register_peft_methods(self, register):
        register(_Ia3Stub())


def _context(cfg):
    from qpeft import orchestrator

    resolved, registry = orchestrator.prepare(cfg, registry=load_registry())
    return resolved, orchestrator._context(resolved, registry)


def test_methods_peft_cannot_put_on_hqq_layers_are_refused_before_loading(tiny_config):
    from qpeft import orchestrator

    watch = __import__("conftest").WeightWatch()
    registry = load_registry([watch])  # ia3 is a built-in since issue 23
    with pytest.raises(
        ConfigError, match=r"peft.name: peft 'ia3' does not work with quantizer 'hqq': peft 0.21 has no IA3 layer for HQQ's HQQLinear"
    ):
        orchestrator.prepare(tiny_config(quantizer="hqq", peft="ia3"), registry=registry)
    assert watch.loaded == 0
    from qpeft import capability_table

    cell = capability_table.cell(registry.get("quantizer", "hqq"), registry.get("peft", "ia3"))
    assert not cell.train and "HQQLinear" in cell.reason


def test_group_size_that_does_not_divide_the_layers_is_refused(tiny_config):
    resolved, ctx = _context(tiny_config(quantizer={"name": "hqq", "options": {"group_size": 512}}))
    with pytest.raises(ConfigError, match=r"quantizer.options.group_size: 512 does not divide the input widths \[128, 256\]"):
        resolved.quantizer.load(tiny_model_path(), resolved.quantizer_options, ctx, training=True)


def test_saved_model_loads_by_name_or_path_without_quantizing(tiny_config, tmp_path, monkeypatch):
    from hqq.core.quantize import HQQLinear, Quantizer

    resolved, ctx = _context(tiny_config(quantizer={"name": "hqq", "options": {"nbits": 3}}))
    plugin, opts = resolved.quantizer, resolved.quantizer_options
    model = plugin.load(tiny_model_path(), opts, ctx, training=False)
    plugin.save_quantized(model, str(tmp_path / "q"), opts, ctx)
    ids = torch.arange(4, 40).reshape(2, 18)
    with torch.no_grad():
        want = model(input_ids=ids).logits

    def no_quantizing(*a, **k):
        raise AssertionError("the saved model was quantized again")

    monkeypatch.setattr(Quantizer, "quantize", no_quantizing)
    again = plugin.load(str(tmp_path / "q"), opts, ctx, training=True)
    assert sum(isinstance(m, HQQLinear) for m in again.modules()) == 14
    with torch.no_grad():
        got = again(input_ids=ids).logits
    assert torch.equal(got, want)


def test_qpeft_quantize_writes_a_model_that_name_or_path_loads(tiny_config, tmp_path):
    """``qpeft quantize`` (hqq, its own format): saved, loaded back and verified; a run naming the
    folder as its base trains on it; a quantizer that cannot save is refused before loading."""
    import yaml

    from qpeft import orchestrator
    from qpeft.errors import QpeftError

    cfg = tiny_config(quantizer={"name": "hqq", "options": {"nbits": 4}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = orchestrator.quantize(str(path), str(tmp_path / "q"), load_registry())
    assert result["reload_max_abs_logit_diff"] == 0.0 and result["logit_rel_err_vs_merged"] < 0.5
    assert (tmp_path / "q" / "qpeft-hqq.json").is_file() and (tmp_path / "q" / "tokenizer.json").is_file()
    cfg2 = tiny_config(quantizer={"name": "hqq", "options": {"nbits": 4}}, evaluate=False, output_dir=str(tmp_path / "run2"))
    cfg2["model"]["name_or_path"] = str(tmp_path / "q")
    cfg2["trainer"]["options"]["max_steps"] = 2
    s = orchestrator.run(*orchestrator.prepare(cfg2, registry=load_registry()))
    assert s["reload_max_abs_logit_diff"] == 0.0
    with pytest.raises(QpeftError, match="exists; pass --force"):
        orchestrator.quantize(str(path), str(tmp_path / "q"), load_registry())
