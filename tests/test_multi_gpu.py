"""Data-parallel training: under ``accelerate launch`` on two GPUs (skipped elsewhere) each rank
loads its own quantized base, the ranks split every optimizer step's examples, and the run equals a
one-GPU run with the same global batch, step by step. The same holds for two CPU processes
(``torchrun``, gloo), which keeps the data-parallel code paths under test on machines without GPUs."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: accelerate launch flags for FSDP2 as docs/training.md gives them (qpeft does its own
#: activation checkpointing; each rank loads its own copy, so no rank-0-only loading).
FSDP2_FLAGS = [
    "--use_fsdp",
    "--fsdp_version",
    "2",
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",
    "--fsdp_reshard_after_forward",
    "true",
    "--fsdp_state_dict_type",
    "FULL_STATE_DICT",
    "--fsdp_cpu_ram_efficient_loading",
    "false",
    "--fsdp_activation_checkpointing",
    "false",
]
#: What those flags put in the ranks' environment, for CPU processes started by torchrun (with
#: tests/fsdp_on_cpu, which lets accelerate keep FSDP on CPUs).
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
    "QPEFT_FSDP_ON_CPU": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(os.path.dirname(__file__), "fsdp_on_cpu"), os.environ.get("PYTHONPATH")])),
}


def _run(cfg: dict, tmp_path, name: str, processes: int, cpu: bool = False, fsdp: bool = False, args=(), ok: bool = True):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "qpeft", "run", str(path), *args]
    elif cpu:
        if fsdp:
            env.update(FSDP2_ENV)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(_free_port()),
            "-m",
            "qpeft",
            "run",
            str(path),
            *args,
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *(FSDP2_FLAGS if fsdp else ["--multi_gpu"]),
            "--num_machines",
            "1",
            "--num_processes",
            str(processes),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "qpeft",
            "run",
            str(path),
            *args,
        ]
    if not cpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(processes))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if not ok:  # expected to fail: its output
        assert proc.returncode != 0, proc.stdout[-3000:]
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


def _one_vs_two(tiny_config, tmp_path, trainer, *, quantizer, device, steps, examples, cpu=False, fsdp=False, evaluate=False):
    """The same global batch (4 examples a step) in one process and as 2 ranks × 2: both summaries
    and their per-step losses, after the checks every device shares (steps and tokens equal)."""

    def cfg(name, per_rank):
        c = tiny_config(
            quantizer=quantizer,
            output_dir=str(tmp_path / name),
            evaluate=evaluate,
            trainer={"name": trainer, "options": {"batch_size": per_rank, "max_steps": steps, "lr": 3e-3, "scheduler": "constant"}},
        )
        c["model"]["device"] = device
        c["data"]["max_train_examples"] = examples
        if cpu:
            c["generate"] = {"max_new_tokens": 2}
        return c

    one = _run(cfg("one", 4), tmp_path, "one", 1, cpu=cpu)
    two = _run(cfg("two", 2), tmp_path, "two", 2, cpu=cpu, fsdp=fsdp)
    assert two["train_steps"] == one["train_steps"] == steps
    assert two["train_tokens"] == one["train_tokens"]  # every rank counts the whole step (a bug once)
    return one, two, [h["loss"] for h in one["loss_history"]], [h["loss"] for h in two["loss_history"]]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("trainer", ["native", "hf"])
def test_two_gpu_data_parallel_equals_one_gpu_run(tiny_config, tmp_path, trainer):
    _, two, a, b = _one_vs_two(tiny_config, tmp_path, trainer, quantizer="bnb-nf4", device="cuda", steps=6, examples=24)
    # bf16 compute, gradients averaged across ranks in another order: bf16 noise, not a different run
    assert max(abs(x - y) for x, y in zip(a, b)) <= 2e-2 * a[0], (a, b)
    assert b[-1] < b[0]
    assert two["reload_max_abs_logit_diff"] < 5e-2  # rank 0 saved an adapter that reloads


@pytest.mark.parametrize("trainer", ["native", "hf"])
def test_two_cpu_processes_data_parallel_equal_one_process(tiny_config, tmp_path, trainer):
    _, _, a, b = _one_vs_two(tiny_config, tmp_path, trainer, quantizer="none", device="cpu", steps=4, examples=16, cpu=True)
    # float32: the ranks' gradients are averaged in another order than one process sums them
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4 * a[0], (a, b)
