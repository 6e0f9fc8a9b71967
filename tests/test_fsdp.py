"""FSDP2 with quantized bases (``accelerate launch --use_fsdp --fsdp_version 2 -m qpeft run``).

On two GPUs (skipped elsewhere): the base, 4-bit weights stored as bf16, and the adapter are
sharded over the ranks; rank 0 gathers the trained adapter and finishes the run (evaluation,
save, reload, generation) on a fresh base of its own. The run must equal a one-GPU run.
On two CPU processes the same path runs with tests/fsdp_on_cpu, which lets accelerate keep
FSDP on CPUs (it falls back to DDP there otherwise); torch's FSDP2 shards over gloo.
What qpeft does not run under FSDP is refused before any weight is loaded."""

import pytest
import torch
from launch import check_fsdp_run, one_vs_two, run_qpeft

from qpeft.config import load_config, resolve
from qpeft.errors import ConfigError
from qpeft.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("trainer,quantizer", [("native", "bnb-nf4"), ("hf", "bnb-nf4"), ("native", "none")])
def test_two_gpu_fsdp2_equals_one_gpu_run(tiny_config, tmp_path, trainer, quantizer):
    one, two, a, b = one_vs_two(
        tiny_config, tmp_path, trainer, quantizer=quantizer, device="cuda", steps=6, examples=24, fsdp=True, evaluate=True
    )
    check_fsdp_run(one, two, a, b, rel=2e-2)  # bf16 compute, gradients reduced in another order


@pytest.mark.parametrize("trainer", ["native", "hf"])
def test_two_cpu_processes_fsdp2_equal_one_process(tiny_config, tmp_path, trainer):
    one, two, a, b = one_vs_two(
        tiny_config, tmp_path, trainer, quantizer="bnb-nf4", device="cpu", steps=4, examples=16, cpu=True, fsdp=True, evaluate=True
    )
    check_fsdp_run(one, two, a, b, rel=1e-4)  # float32


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")])],
)
def test_fsdp2_native_resume_gives_the_uninterrupted_adapter(tiny_config, tmp_path, device):
    """Checkpoints under FSDP hold the gathered adapter and the full optimizer state; resuming
    from step 4 of 6 (the step-6 checkpoint and the outputs deleted) ends with the same adapter.
    Two CPU processes (float32) or two GPUs (bf16 compute)."""
    import shutil

    from safetensors.torch import load_file

    cfg = tiny_config(
        output_dir=str(tmp_path / "run"),
        evaluate=False,
        generate={"max_new_tokens": 2},
        trainer={
            "name": "native",
            "options": {"batch_size": 2, "max_steps": 6, "save_steps": 2, "lr": 3e-3, "scheduler": "cosine", "warmup_steps": 2},
        },
    )
    cfg["model"]["device"] = device
    cfg["data"]["max_train_examples"] = 16
    cpu = device == "cpu"
    first = run_qpeft(cfg, tmp_path, "run", 2, cpu=cpu, fsdp=True)
    assert any(n.startswith("FSDP2:") and not n.startswith("FSDP2: 0 of") for n in first["notes"])
    run = tmp_path / "run"
    whole = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    ckpts = run / "checkpoints"
    assert (ckpts / "checkpoint-4" / "optimizer_full.pt").is_file()  # FSDP's full optimizer state
    shutil.rmtree(ckpts / "checkpoint-6")
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()

    # the same checkpoint without FSDP: refused, naming why
    out = run_qpeft(cfg, tmp_path, "run", 1, cpu=cpu, args=["--resume"], ok=False)
    assert "written under FSDP" in out, out[-2000:]

    resumed = run_qpeft(cfg, tmp_path, "run", 2, cpu=cpu, fsdp=True, args=["--resume"])
    assert [h["step"] for h in resumed["loss_history"]] == [5, 6]
    again = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert whole.keys() == again.keys()
    # float32 on CPU: the same arithmetic; on GPUs, reductions may round differently from run to run
    assert max(float((whole[k] - again[k]).abs().max()) for k in whole) <= (1e-6 if cpu else 1e-3)


# ------------------------------------------------------------------ refused before loading


@pytest.fixture
def under_fsdp(monkeypatch):
    """The environment accelerate gives each rank of ``accelerate launch --use_fsdp``."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    return monkeypatch


def _resolve(tiny_config, registry, device="cuda", **overrides):
    return resolve(load_config(tiny_config(**overrides)), registry, device=device)


def _refused(tiny_config, registry, key, device="cuda", **overrides) -> str:
    with pytest.raises(ConfigError) as e:
        _resolve(tiny_config, registry, device=device, **overrides)
    assert e.value.key == key, e.value
    return e.value.message


def test_fsdp_runs_resolve_with_the_tested_backends(under_fsdp, tiny_config, registry):
    for quantizer in ("bnb-nf4", "bnb-4bit", "none"):
        for trainer in ("hf", "native"):
            run = _resolve(tiny_config, registry, quantizer=quantizer, trainer={"name": trainer})
            assert run.device == "cuda"
    _resolve(tiny_config, registry, quantizer={"name": "bnb-nf4", "options": {"quant_storage": "bfloat16"}})


def test_fsdp_refuses_what_it_does_not_run(under_fsdp, tiny_config, registry):
    msg = _refused(tiny_config, registry, "quantizer.name", quantizer="bnb-8bit")
    assert "bnb-8bit" in msg and "bnb-nf4" in msg and "none" in msg  # names the valid choices
    assert "lora" in _refused(tiny_config, registry, "peft.name", peft={"name": "prefix"})
    assert "bfloat16" in _refused(
        tiny_config, registry, "quantizer.options.quant_storage", quantizer={"name": "bnb-nf4", "options": {"quant_storage": "uint8"}}
    )
    _refused(
        tiny_config, registry, "quantizer.options.quant_storage", quantizer={"name": "bnb-nf4", "options": {"quant_storage": "float32"}}
    )
    _refused(tiny_config, registry, "trainer.options.save_steps", trainer={"name": "hf", "options": {"save_steps": 2}})
    _resolve(tiny_config, registry, trainer={"name": "native", "options": {"save_steps": 2}})  # native checkpoints under FSDP
    for key, value in (("loss", "chunked"), ("compile", True), ("liger", "on"), ("activation_offload", True), ("mlp_chunk", 64)):
        _refused(tiny_config, registry, f"trainer.options.{key}", trainer={"name": "native", "options": {key: value}})
    assert "GPU" in _refused(tiny_config, registry, "model.device", device="cpu")
    under_fsdp.setenv("FSDP_VERSION", "1")
    assert "--fsdp_version 2" in _refused(tiny_config, registry, "accelerate: fsdp_version")


def test_without_fsdp_nothing_changes(tiny_config, registry, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    _resolve(tiny_config, registry, quantizer="bnb-8bit", trainer={"name": "native", "options": {"save_steps": 2, "loss": "chunked"}})
