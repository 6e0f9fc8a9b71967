"""Evaluator plugins (the config's ``eval`` list): perplexity and generation run before and after
training on a tiny random Llama, with real peft and bitsandbytes; bad eval configs fail before any
weight loads; evaluators run with the network closed."""

import json
import socket
import time

import pytest

from qpeft import orchestrator
from qpeft.config import load_config
from qpeft.errors import ConfigError, QpeftError
from qpeft.evaluation import NetworkBlocked, no_network
from qpeft.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _fast(cfg: dict) -> dict:
    cfg["trainer"] = {"name": "native", "options": {"batch_size": 2, "max_steps": 2, "lr": 3e-3, "scheduler": "constant"}}
    cfg["quantizer"] = {"name": "none"}
    cfg["model"] = {**cfg["model"], "device": "cpu"}
    return cfg


def test_evaluators_are_registered(registry):
    assert {"perplexity", "generation"} <= set(registry.backends["evaluator"])
    kinds = registry.describe()
    assert any(e["name"] == "generation" for e in kinds["evaluator"])


def test_default_eval_is_perplexity_and_false_turns_it_off(tiny_config, registry):
    resolved, _ = orchestrator.prepare(tiny_config(), registry=registry)
    assert [e.label for e in resolved.evaluators] == ["perplexity"]
    assert resolved.to_dict()["eval"] == [{"name": "perplexity", "options": {"batch_size": 4}, "label": "perplexity"}]
    resolved, _ = orchestrator.prepare(tiny_config(evaluate=False), registry=registry)
    assert resolved.evaluators == []


@pytest.mark.parametrize(
    ("evals", "key", "words"),
    [
        (["perplexty"], "eval.0.name", "did you mean 'perplexity'"),
        ([{"name": "generation", "options": {"max_new_token": 3}}], "eval.0.options.max_new_token", "unknown key"),
        ([{"name": "generation", "options": {"prompts": "/nonexistent/prompts.jsonl"}}], "eval.0.options.prompts", "no such file"),
        (["perplexity", {"name": "perplexity", "options": {"batch_size": 2}}], "eval", "give one a label"),
    ],
)
def test_bad_eval_config_fails_before_loading(tiny_config, registry, evals, key, words):
    with pytest.raises(ConfigError) as err:
        orchestrator.prepare(tiny_config(eval=evals), registry=registry)
    assert err.value.key == key and words in str(err.value)


def test_bad_prompts_file_names_the_line(tiny_config, registry, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a", "expected": "b"}\n{"prompt": ""}\n')
    with pytest.raises(ConfigError, match="line 2"):
        orchestrator.prepare(tiny_config(eval=[{"name": "generation", "options": {"prompts": str(bad)}}]), registry=registry)


def test_eval_shorthand_names():
    cfg = load_config({"quantizer": "none", "peft": "lora", "trainer": "hf", "eval": ["perplexity", "generation"]})
    assert [e.name for e in cfg.eval] == ["perplexity", "generation"]


def test_run_with_perplexity_and_generation(tiny_config, registry, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Say yes.", "expected": ["yes"]}, {"prompt": "Name a colour.", "expected": ["red", "blue"]}, {"prompt": "Hi"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _fast(tiny_config())
    cfg["eval"] = [
        "perplexity",
        {"name": "generation", "options": {"prompts": str(prompts), "max_new_tokens": 4, "chat_template": False}},
        {"name": "generation", "label": "topics", "options": {"limit": 2, "max_new_tokens": 3}},
    ]
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    s = orchestrator.run(resolved, reg)
    ev = s["eval"]
    assert set(ev) == {"perplexity", "generation", "topics"}
    ppl = ev["perplexity"]
    # the summary's val_perplexity_* come from the perplexity evaluator
    assert s["val_perplexity_before"] == round(ppl["before"]["perplexity"], 4) and s["val_perplexity_after"] == round(
        ppl["after"]["perplexity"], 4
    )
    assert ppl["primary"] == "perplexity" and ppl["higher_is_better"]["perplexity"] is False
    assert ppl["before"]["perplexity"] != ppl["after"]["perplexity"]  # the adapter changed the model
    gen = ev["generation"]
    assert gen["before"]["prompts"] == 3 and gen["before"]["scored"] == 2 and 0 <= gen["after"]["contains"] <= 1
    saved = [json.loads(l) for l in (tmp_path / "run" / "eval" / "generation" / "generations_after.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in saved] == [r["prompt"] for r in rows]
    assert all(isinstance(r["completion"], str) and r["new_tokens"] >= 1 for r in saved)
    assert "exact_match" not in saved[2]  # no expected answer: saved, not scored
    # the scores are what the saved completions give
    scored = [r for r in saved if "contains" in r]
    assert gen["after"]["contains"] == sum(r["contains"] for r in scored) / len(scored)
    assert ev["topics"]["after"]["prompts"] == 2 and (tmp_path / "run" / "eval" / "topics" / "generations_before.jsonl").is_file()
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["eval"]["generation"]["after"] == gen["after"]


def test_generation_scoring_is_exact_or_contains():
    from qpeft.plugins.eval_generation import normalize

    assert normalize("  The  Assert statement. ", False) == "the assert statement"
    assert normalize("The assert statement", True) != normalize("the assert statement", True)


def test_no_network_refuses_at_once_and_allows_loopback():
    t0 = time.perf_counter()
    with no_network(), pytest.raises(NetworkBlocked, match="offline"):
        socket.create_connection(("huggingface.co", 443), timeout=30)
    with no_network(), pytest.raises(NetworkBlocked):
        socket.socket().connect(("93.184.216.34", 80))
    assert time.perf_counter() - t0 < 1
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with no_network():
        socket.create_connection(server.getsockname(), timeout=5).close()
    server.close()
    assert socket.getaddrinfo is not None and "no_network" not in repr(socket.getaddrinfo)


def test_evaluator_reaching_for_network_fails_in_one_line_before_training(tiny_config, tmp_path):
    from qpeft import hookimpl
    from qpeft.api import EvalResult, EvaluatorPlugin

    class Downloads(EvaluatorPlugin):
        name = "downloads"

        def evaluate(self, model, tokenizer, options, ctx, *, stage, data, out_dir):
            import urllib.request

            urllib.request.urlopen("https://example.org/metric.py", timeout=60)
            return EvalResult(metrics={})

    class Plugin:
        @hookimpl
        def qpeft_register_evaluators(self, register):
            register(Downloads())

    reg = load_registry([Plugin()])
    cfg = _fast(tiny_config(eval=["downloads"]))
    resolved, reg = orchestrator.prepare(cfg, registry=reg)
    t0 = time.perf_counter()
    with pytest.raises(QpeftError) as err:
        orchestrator.run(resolved, reg)
    assert time.perf_counter() - t0 < 60
    message = str(err.value)
    assert "\n" not in message and "eval 'downloads'" in message and "offline" in message
    assert not (tmp_path / "run" / "adapter").exists()  # stopped before training


@pytest.mark.parametrize(("name", "options"), [("perplexity", {}), ("generation", {"limit": 2, "max_new_tokens": 2})])
def test_conformance_kit_passes_builtin_evaluators(tiny_llama_path, name, options):
    from qpeft.testing import check_evaluator

    result = check_evaluator(name, options, model_path=tiny_llama_path)
    assert set(result) == {"registration", "options_schema", "evaluate"}
    assert result["evaluate"]["primary"] in result["evaluate"]["metrics"]


def test_conformance_kit_fails_an_evaluator_that_changes_the_model(tiny_llama_path):
    from qpeft import hookimpl
    from qpeft.api import EvalResult, EvaluatorPlugin
    from qpeft.testing import ConformanceError, EvaluatorChecker

    class Meddles(EvaluatorPlugin):
        name = "meddles"
        description = "adds 1 to a weight"

        def evaluate(self, model, tokenizer, options, ctx, *, stage, data, out_dir):
            import torch

            with torch.no_grad():
                next(model.parameters()).add_(1.0)
            return EvalResult(metrics={"x": 1.0}, primary="x")

    class Plugin:
        @hookimpl
        def qpeft_register_evaluators(self, register):
            register(Meddles())

    checker = EvaluatorChecker("meddles", model_path=tiny_llama_path, plugins=(Plugin(),))
    try:
        with pytest.raises(ConformanceError, match="changed the model's weights"):
            checker.check_evaluate()
    finally:
        checker.close()
