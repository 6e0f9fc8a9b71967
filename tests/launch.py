"""Launching ``qpeft run`` as several processes from the tests: one process, ``torchrun`` on one
machine (CPU, gloo), ``torchrun`` as several "nodes" on localhost (one ``torchrun`` per node, as
on a cluster), or ``accelerate launch`` on GPUs; DDP or FSDP2. Shared by tests/test_multi_gpu.py,
tests/test_fsdp.py and tests/test_multi_node.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
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
    "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS / "fsdp_on_cpu"), os.environ.get("PYTHONPATH")])),
}


def launch_nodes(
    nodes: int, target: list, env: dict, timeout: float = 600, launcher: str = "torchrun"
) -> list[subprocess.CompletedProcess]:
    """``nodes`` launchers on localhost, one per "node" as one would start them on N machines
    (main process 127.0.0.1 on a free port; one CPU rank per node), each running ``target``
    (``["-m", "qpeft", "run", ...]``, or a list of those, one per node). ``launcher``:
    ``torchrun --nnodes N --nproc-per-node 1 --node-rank I`` or ``accelerate launch --multi_gpu
    --num_machines N --num_processes N --machine_rank I`` (which starts torchrun; on a machine
    without GPUs its ranks run on the CPU). Waits for all; returns each node's result."""
    port = str(free_port())
    if launcher == "torchrun":
        head = [
            "torch.distributed.run",
            "--nnodes",
            str(nodes),
            "--nproc-per-node",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
        ]
        rank_flag = "--node-rank"
    else:
        head = ["accelerate.commands.launch", "--multi_gpu", "--num_machines", str(nodes), "--num_processes", str(nodes)]
        head += ["--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"]
        rank_flag = "--machine_rank"
    procs = []
    for i in range(nodes):
        cmd = [sys.executable, "-m", *head, rank_flag, str(i), *(target[i] if isinstance(target[0], list) else target)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True))
    done = []
    try:
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(i, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:  # the launcher and the ranks it started (its own process group)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return done


def run_qpeft(
    cfg: dict | list[dict],
    tmp_path,
    name: str,
    processes: int,
    cpu: bool = False,
    fsdp: bool = False,
    args=(),
    ok: bool = True,
    nodes: int = 1,
    launcher: str = "torchrun",
):
    """``qpeft run`` of ``cfg`` (written to ``tmp_path/NAME.yaml``) in one process, in
    ``processes`` ranks on this machine (``torchrun`` on CPUs, ``accelerate launch`` on GPUs), or
    over ``nodes`` "nodes" of one CPU process each (``processes`` == ``nodes``; ``cfg`` may be one
    config per node, e.g. with another output_dir on each; ``launcher``: see :func:`launch_nodes`). Returns rank 0's summary
    (``tmp_path/NAME/summary.json``), or, with ``ok=False``, asserts that the run failed and
    returns its output (every node's)."""
    cfgs = cfg if isinstance(cfg, list) else [cfg]
    paths = []
    for i, c in enumerate(cfgs):
        paths.append(tmp_path / (f"{name}.yaml" if i == 0 else f"{name}-node{i}.yaml"))
        paths[-1].write_text(yaml.safe_dump(c))
    path = paths[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fsdp and (cpu or nodes > 1):
        env.update(FSDP2_ENV)
    if nodes > 1:
        assert cpu and processes == nodes, "several nodes: one CPU process each"
        targets = [["-m", "qpeft", "run", str(paths[min(i, len(paths) - 1)]), *args] for i in range(nodes)]
        procs = launch_nodes(nodes, targets, env, launcher=launcher)
        returncode = max(p.returncode for p in procs)  # nonzero if any node failed
        stdout = "".join(f"--- node {i} stdout\n{p.stdout}" for i, p in enumerate(procs))
        stderr = "".join(f"--- node {i} stderr\n{p.stderr[-5000:]}" for i, p in enumerate(procs))
    else:
        if processes == 1:
            cmd = [sys.executable, "-m", "qpeft", "run", str(path), *args]
        elif cpu:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(processes),
                "--master_port",
                str(free_port()),
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
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    if not ok:  # expected to fail: its output
        assert returncode != 0, stdout[-3000:]
        return stdout + stderr
    assert returncode == 0, stdout[-3000:] + stderr[-5000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


def one_vs_two(
    tiny_config,
    tmp_path,
    trainer,
    *,
    quantizer,
    device,
    steps,
    examples,
    cpu=False,
    fsdp=False,
    evaluate=False,
    nodes=1,
    launcher="torchrun",
):
    """The same global batch (4 examples a step) in one process and as 2 ranks × 2 (on one
    machine, or on ``nodes`` = 2 "nodes" of one rank each, started by ``launcher``): both summaries and their per-step
    losses, after the checks every device shares (steps and tokens equal)."""

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

    one = run_qpeft(cfg("one", 4), tmp_path, "one", 1, cpu=cpu)
    two = run_qpeft(cfg("two", 2), tmp_path, "two", 2, cpu=cpu, fsdp=fsdp, nodes=nodes, launcher=launcher)
    assert two["train_steps"] == one["train_steps"] == steps
    assert two["train_tokens"] == one["train_tokens"]  # every rank counts the whole step (a bug once)
    return one, two, [h["loss"] for h in one["loss_history"]], [h["loss"] for h in two["loss_history"]]


def check_fsdp_run(one, two, a, b, rel):
    """An FSDP2 run (``two``) against a one-process run with the same global batch: losses within
    ``rel`` of the first, really sharded, rank 0's rebuilt model evaluating and reloading alike."""
    assert max(abs(x - y) for x, y in zip(a, b)) <= rel * a[0], (a, b)
    assert b[-1] < b[0]
    sharded = [n for n in two["notes"] if n.startswith("FSDP2:")]
    assert sharded and not sharded[0].startswith("FSDP2: 0 of"), two["notes"]  # really sharded, not DDP
    assert not any(n.startswith("FSDP") for n in one["notes"])
    # rank 0's rebuilt model evaluates as the one-process model, and its saved adapter reloads to it
    assert abs(two["val_loss_after"] - one["val_loss_after"]) <= rel * one["val_loss_after"]
    assert two["val_loss_after"] < two["val_loss_before"]
    assert two["reload_max_abs_logit_diff"] < 5e-2
