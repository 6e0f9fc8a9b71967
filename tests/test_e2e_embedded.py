"""End to end on the embedded SmolLM2-135M-Instruct: the README's run command, shortened."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, tol


def _quickstart(*overrides: str) -> subprocess.CompletedProcess:
    """``qpeft run configs/quickstart.yaml --set ...`` in a fresh process, offline."""
    return subprocess.run(
        [sys.executable, "-m", "qpeft", "run", str(REPO / "configs" / "quickstart.yaml"), *(a for o in overrides for a in ("--set", o))],
        capture_output=True,
        text=True,
        timeout=1800,  # generous: a loaded 2-core CI machine ran the quickstart for 15 minutes
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
def test_quickstart_on_embedded_model(tmp_path, embedded_model_path):
    out = tmp_path / "quickstart"
    proc = _quickstart(
        "trainer.options.max_steps=8",
        f"output_dir={out}",
        "generate.max_new_tokens=24",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qpeft run summary" in proc.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["quantizer"] == "bnb-nf4" and s["peft"] == "lora" and s["trainer"] == "hf"
    assert s["val_perplexity_after"] < s["val_perplexity_before"], s
    assert s["reload_max_abs_logit_diff"] < tol(s["dtype"], 1e-3, 0.25)
    assert s["generation"]["new_tokens"] > 0 and s["generation"]["completion"].strip()
    assert s["pad_token"]["action"] == "reused"  # SmolLM2 ships pad == eos
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    t = s["timeline"]  # from the command's start: the CLI marks it (qpeft.timeline)
    assert t["from"] == "command" and t["startup_s"] > 0 and t["first_step_s"] > 0, t
    assert t["to_first_step_s"] >= t["startup_s"] + t["load_s"], t


@pytest.mark.slow
@pytest.mark.parametrize("method,lr", [("prefix", "1.0e-2"), ("adapters", "1.0e-3")])
def test_other_methods_on_embedded_model(tmp_path, embedded_model_path, method, lr):
    out = tmp_path / method
    proc = _quickstart(
        f"peft={method}",
        "trainer.options.max_steps=6",
        f"trainer.options.lr={lr}",
        "trainer.options.scheduler=constant",
        f"output_dir={out}",
        "generate.max_new_tokens=16",
        "evaluate=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["peft"] == method
    losses = [h["loss"] for h in s["loss_history"]]
    assert min(losses[-2:]) < losses[0], losses
    assert s["reload_max_abs_logit_diff"] < tol(s["dtype"], 1e-3, 0.25)
    assert s["generation"]["new_tokens"] > 0
