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


# ---------------------------------------------------------------------------- lm-eval


def _lora_model(path: str):
    """The model qpeft evaluates after training: a base with a LoRA adapter (random, non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def _harness_direct(model, tok, limit):
    """The harness called directly (no qpeft) on the same model object."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qpeft.plugins.eval_lm_eval import shipped_task

    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=8),
        tasks=[shipped_task("python_topics_mc")],
        task_manager=TaskManager(include_defaults=False),
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    return out["results"]["python_topics_mc"]


def _through_qpeft(model, tok, limit, tmp_path, registry):
    from qpeft.config import load_config, resolve

    cfg = load_config(
        {
            "quantizer": "none",
            "peft": "lora",
            "trainer": "native",
            "model": {"device": "cpu"},
            "output_dir": str(tmp_path / "r"),
            "eval": [{"name": "lm-eval", "options": {"limit": limit}}],
        }
    )
    resolved = resolve(cfg, registry)
    from qpeft.context import RunContext
    from qpeft.evaluation import run_evaluators

    ctx = RunContext(config=cfg, device="cpu", dtype="float32", output_dir=str(tmp_path / "r"), tokenizer=tok)
    return run_evaluators(resolved.evaluators, model, tok, None, ctx, "after", {}, lambda m: None)["lm-eval"]


def test_lm_eval_equals_the_harness_called_directly_tiny(tiny_llama_path, tmp_path, registry):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    model = _lora_model(tiny_llama_path)
    entry = _through_qpeft(model, tok, 12, tmp_path, registry)
    direct = _harness_direct(model, tok, 12)
    after = entry["after"]
    assert entry["primary"] == "python_topics_mc/acc" and entry["higher_is_better"]["python_topics_mc/acc"] is True
    assert after["python_topics_mc/acc"] == direct["acc,none"] and after["python_topics_mc/acc_norm"] == direct["acc_norm,none"]
    assert after["python_topics_mc/samples"] == 12 and 0 <= after["python_topics_mc/acc"] <= 1


@pytest.mark.slow
def test_lm_eval_equals_the_harness_called_directly_embedded(embedded_model_path, tmp_path, registry):
    """SmolLM2 with a LoRA adapter on the shipped smoke task: qpeft's numbers are the harness's,
    and the real model beats chance (0.25) by far on 40 questions."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_path)
    model = _lora_model(embedded_model_path)
    with model.disable_adapter():
        base = _harness_direct(model, tok, 40)
    entry = _through_qpeft(model, tok, 40, tmp_path, registry)
    direct = _harness_direct(model, tok, 40)
    assert entry["after"]["python_topics_mc/acc"] == direct["acc,none"]
    assert entry["after"]["python_topics_mc/acc_norm"] == direct["acc_norm,none"]
    assert base["acc,none"] > 0.5, base


@pytest.mark.slow  # an unknown name makes the harness index its own ~15k task configs (~25 s)
def test_lm_eval_unknown_task_fails_before_loading(tiny_config, registry):
    pytest.importorskip("lm_eval")
    with pytest.raises(ConfigError) as err:
        orchestrator.prepare(tiny_config(eval=[{"name": "lm-eval", "options": {"tasks": ["python_topics_mcq"]}}]), registry=registry)
    assert err.value.key == "eval.0.options.tasks" and "python_topics_mc" in str(err.value)


def test_lm_eval_task_whose_data_is_on_the_hub_fails_in_one_line(tiny_llama_path, tmp_path, registry):
    """A custom task over a hub data set: evaluation is offline, so one line at once, no hang."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from qpeft.config import load_config, resolve
    from qpeft.context import RunContext
    from qpeft.evaluation import run_evaluators

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub.yaml").write_text(
        "task: qpeft_hub_probe\ndataset_path: qpeft-no-such-org/no-such-dataset\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n"
    )
    cfg = load_config(
        {
            "quantizer": "none",
            "peft": "lora",
            "trainer": "native",
            "model": {"device": "cpu"},
            "output_dir": str(tmp_path / "r"),
            "eval": [{"name": "lm-eval", "options": {"tasks": ["qpeft_hub_probe"], "include_path": str(tasks)}}],
        }
    )
    resolved = resolve(cfg, registry)
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    ctx = RunContext(config=cfg, device="cpu", dtype="float32", output_dir=str(tmp_path / "r"), tokenizer=tok)
    t0 = time.perf_counter()
    with pytest.raises(QpeftError) as err:
        run_evaluators(resolved.evaluators, model, tok, None, ctx, "before", {}, lambda m: None)
    assert time.perf_counter() - t0 < 60
    assert "\n" not in str(err.value) and "eval 'lm-eval'" in str(err.value), str(err.value)
