"""Start-up: the command line, ``import qpeft`` and the plugin registry load no heavy library,
and a run's summary says where its first seconds went (:mod:`qpeft.timeline`)."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


def _heavy_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import qpeft",
        # what `qpeft --help` runs: the CLI module and typer's help (exits 0)
        "import sys\nfrom qpeft.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code",
        "from qpeft.registry import load_registry\nassert load_registry().backends['trainer']",
    ],
    ids=["import", "help", "registry"],
)
def test_no_heavy_library_at_startup(code):
    assert _heavy_after(code) == []


def test_registry_schema_check_keeps_field_docs():
    """The registry checks each Options schema without reading the field comments (start-up
    time); the schemas users see still carry them."""
    from qpeft.registry import load_registry

    schema = load_registry().get("trainer", "native").Options.model_json_schema()
    assert "fused AdamW" in schema["properties"]["optim"]["description"]


def test_process_age_counts_from_process_start():
    code = "import time; time.sleep(0.4); from qpeft.timeline import process_age; print(process_age())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    age = float(proc.stdout.strip())
    assert 0.4 <= age < 30, age


def test_first_optimizer_step_is_marked_once_and_the_hook_removed():
    import torch
    from torch.optim.optimizer import _global_optimizer_post_hooks

    from qpeft.timeline import Timeline

    hooks = len(_global_optimizer_post_hooks)
    clock = Timeline()
    clock.mark("run")
    clock.mark("load")
    clock.mark("loaded")
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    clock.mark("train")
    with clock.first_optimizer_step():
        assert "first_step" not in clock.marks
        w.sum().backward()
        opt.step()
        first = clock.marks["first_step"]
        opt.step()
        assert clock.marks["first_step"] == first
    assert len(_global_optimizer_post_hooks) == hooks
    s = clock.summary()
    assert s["from"] == "run" and s["startup_s"] is None
    assert s["first_step_s"] >= 0 and s["to_first_step_s"] >= s["first_step_s"]
