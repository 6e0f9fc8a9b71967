"""Both trainers on the tiny Llama: loss goes down, runs are reproducible, and hf and native
agree step by step on the same data and seed."""

import pytest

from qpeft import orchestrator
from qpeft.data import epoch_order, ordered_examples, plan_steps
from qpeft.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _losses(tiny_config, registry, trainer, tmp_path, **opts):
    cfg = tiny_config(
        quantizer="none",
        trainer={
            "name": trainer,
            "options": {"batch_size": 4, "max_steps": 6, "lr": 3e-3, "scheduler": "cosine", "warmup_steps": 1, **opts},
        },
        evaluate=False,
        output_dir=str(tmp_path / trainer),
    )
    cfg["data"]["max_train_examples"] = 10
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    s = orchestrator.run(resolved, reg)
    return [h["loss"] for h in s["loss_history"]], s


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(10, 0, 0)) == list(range(10))
    assert epoch_order(10, 0, 0) == epoch_order(10, 0, 0)
    assert epoch_order(10, 0, 0) != epoch_order(10, 0, 1) != epoch_order(10, 1, 0)
    assert plan_steps(10, 4, 1.0, None) == (3, 1) and plan_steps(10, 4, 1.0, 6) == (6, 3)
    assert len(ordered_examples([{"i": i} for i in range(10)], 0, 3)) == 30


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_hf_and_native_loss_curves_agree(tiny_config, registry, tmp_path, grad_accum):
    hf, s_hf = _losses(tiny_config, registry, "hf", tmp_path, grad_accum=grad_accum, batch_size=4 // grad_accum)
    native, s_nat = _losses(tiny_config, registry, "native", tmp_path, grad_accum=grad_accum, batch_size=4 // grad_accum)
    assert len(hf) == len(native) == 6
    assert native[-1] < native[0]
    # Same data order, init and optimizer: only float summation order differs.
    for a, b in zip(hf, native):
        assert abs(a - b) <= 2e-3 * abs(a), (hf, native)
    assert s_hf["train_tokens"] == s_nat["train_tokens"]
    for s in (s_hf, s_nat):  # both trainers' first optimizer step is found (qpeft.timeline)
        t = s["timeline"]
        assert t["from"] == "run" and t["startup_s"] is None, t
        assert t["load_s"] > 0 and t["first_step_s"] > 0, t
        assert t["to_first_step_s"] >= t["imports_s"] + t["data_s"] + t["load_s"] + t["setup_s"] + t["first_step_s"] - 1e-2, t


def test_native_is_reproducible(tiny_config, registry, tmp_path):
    a, _ = _losses(tiny_config, registry, "native", tmp_path / "a")
    b, _ = _losses(tiny_config, registry, "native", tmp_path / "b")
    assert a == b


def test_native_run_after_other_accelerate_settings_in_the_process(tiny_config, registry, tmp_path):
    """Regression: accelerate keeps process-wide settings and refused the native trainer's
    Accelerator after one with another precision or device existed in the process (seen on the
    H100: a CPU run, then a bf16 CUDA run, in one pytest process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # this test's own "foreign" settings, whatever ran before
    Accelerator(cpu=True, mixed_precision="bf16")  # e.g. the user's own code, or an earlier run elsewhere
    losses, s = _losses(tiny_config, registry, "native", tmp_path)
    assert len(losses) == 6 and s["train_steps"] == 6
