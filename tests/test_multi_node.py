"""Several nodes: ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank {0,1}`` started twice on
localhost (CPU, gloo), as one would start it once on each of two machines. The run must equal a
one-process run with the same global batch (DDP with both trainers, FSDP2 with ``native``), and a
checkpoint written by two nodes must resume on two nodes to the uninterrupted adapter.

On one machine the two "nodes" share ``output_dir`` (the shared-filesystem case). Giving each node
its own ``output_dir`` (a config per node) is the case of nodes that do not share it: rank 0
alone writes the adapter, summary and checkpoints, so training works, but ``--resume`` reads the
checkpoint on every rank and must be refused (:func:`qpeft.distributed.check_shared_output_dir`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from launch import check_fsdp_run, launch_nodes, one_vs_two, run_qpeft
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
#: Whether the orchestrator runs the shared-output_dir check (``qpeft run`` on several nodes).
CHECK_WIRED = "check_shared_output_dir" in (REPO / "core" / "orchestrator.py").read_text()
NOT_SHARED = "is not the same folder on every node"


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over every adapter tensor. Not the largest element's difference: AdamW's
    update divides by the root of each element's squared gradients, so an element whose gradient
    is near zero moves by up to the learning rate on a reduction-order difference (a max-element
    check at 1e-4 failed on such an element, 1.02e-4, in a loaded 2-core run)."""
    import torch

    assert a.keys() == b.keys()
    diff = torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in a))
    return float(diff / torch.sqrt(sum((a[k].double() ** 2).sum() for k in a)))


# ------------------------------------------------------------------ the check itself, no model

_CHECK = """
import json, sys
import torch.distributed as dist
from qpeft.distributed import check_shared_output_dir
from qpeft.errors import QpeftError
results = []
for resume in (False, True):
    try:
        results.append({"note": check_shared_output_dir(sys.argv[1], resume=resume, cpu=True)})
    except QpeftError as exc:
        results.append({"error": str(exc)})
    results[-1]["group"] = dist.is_initialized()
print("RESULT " + json.dumps(results), flush=True)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


def _check_on_nodes(tmp_path, dirs: list[Path]) -> list[list[dict]]:
    """Each node's results of the check without and with ``--resume``."""
    script = tmp_path / "check.py"
    script.write_text(_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = launch_nodes(len(dirs), [[str(script), str(d)] for d in dirs], env, timeout=120)
    results = []
    for p in procs:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        results.append(json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:]))
    return results


def test_check_shared_output_dir_on_two_nodes(tmp_path):
    shared = tmp_path / "shared"
    assert _check_on_nodes(tmp_path, [shared, shared]) == [[{"note": None, "group": True}] * 2] * 2
    assert os.listdir(shared) == []  # rank 0's file is gone again

    mine, theirs = tmp_path / "node0", tmp_path / "node1"
    theirs.mkdir()
    for (fresh, resumed), folder in zip(_check_on_nodes(tmp_path, [mine, theirs]), [mine, theirs]):
        # every rank decides alike: without --resume a note; with it, an error in one line naming output_dir
        assert "rank 1 on" in fresh["note"] and "--resume needs output_dir on a filesystem all nodes share" in fresh["note"], fresh
        assert resumed["error"].startswith(f"output_dir: {folder} {NOT_SHARED} (rank 1 on "), resumed
        assert "must be on a filesystem all nodes share" in resumed["error"] and "\n" not in resumed["error"]
    assert os.listdir(mine) == [] and os.listdir(theirs) == []


def test_check_shared_output_dir_does_nothing_on_one_machine(tmp_path, monkeypatch):
    """One process, or torchrun's ranks on one machine: no process group, no file."""
    from qpeft.distributed import check_shared_output_dir

    assert check_shared_output_dir(tmp_path / "x", resume=True, cpu=True) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert check_shared_output_dir(tmp_path / "x", resume=True, cpu=True) is None
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ qpeft run on two nodes


@pytest.mark.slow
@pytest.mark.parametrize("trainer,launcher", [("native", "torchrun"), ("hf", "torchrun"), ("native", "accelerate")])
def test_two_nodes_data_parallel_equal_one_process(tiny_config, tmp_path, trainer, launcher):
    one, two, a, b = one_vs_two(
        tiny_config, tmp_path, trainer, quantizer="none", device="cpu", steps=4, examples=16, cpu=True, nodes=2, launcher=launcher
    )
    # float32: the ranks' gradients are averaged in another order than one process sums them
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4 * a[0], (a, b)
    whole, split = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert _rel_diff(whole, split) <= 1e-4
    assert not any("not shared" in n for n in two["notes"]), two["notes"]


@pytest.mark.slow
def test_two_nodes_fsdp2_equal_one_process(tiny_config, tmp_path):
    one, two, a, b = one_vs_two(
        tiny_config,
        tmp_path,
        "native",
        quantizer="bnb-nf4",
        device="cpu",
        steps=4,
        examples=16,
        cpu=True,
        fsdp=True,
        evaluate=True,
        nodes=2,
    )
    check_fsdp_run(one, two, a, b, rel=1e-4)  # float32
    whole, split = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert _rel_diff(whole, split) <= 1e-4


def _resume_config(tiny_config, tmp_path, name: str) -> dict:
    cfg = tiny_config(
        quantizer="none",
        output_dir=str(tmp_path / name),
        evaluate=False,
        generate={"max_new_tokens": 2},
        trainer={
            "name": "native",
            "options": {"batch_size": 2, "max_steps": 6, "save_steps": 2, "lr": 3e-3, "scheduler": "cosine", "warmup_steps": 2},
        },
    )
    cfg["model"]["device"] = "cpu"
    cfg["data"]["max_train_examples"] = 16
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_nodes_native_resume_gives_the_uninterrupted_adapter(tiny_config, tmp_path, fsdp):
    """A checkpoint written by a 2-node run, resumed by a 2-node run from step 4 of 6 (the step-6
    checkpoint and the outputs deleted): every rank reads it from the shared output_dir (under
    FSDP each rank loads the full optimizer state and keeps its shard) and the run ends with the
    uninterrupted adapter."""
    import shutil

    cfg = _resume_config(tiny_config, tmp_path, "run")
    run_qpeft(cfg, tmp_path, "run", 2, cpu=True, fsdp=fsdp, nodes=2)
    run = tmp_path / "run"
    whole = _adapter(run)
    assert (run / "checkpoints" / "checkpoint-4" / ("optimizer_full.pt" if fsdp else "optimizer.pt")).is_file()
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()

    resumed = run_qpeft(cfg, tmp_path, "run", 2, cpu=True, fsdp=fsdp, nodes=2, args=["--resume"])
    assert [h["step"] for h in resumed["loss_history"]] == [5, 6]
    assert any("resuming from" in n and "checkpoint-4" in n for n in resumed["notes"]), resumed["notes"]
    assert _max_diff(whole, _adapter(run)) <= 1e-6  # float32 on CPU: the same arithmetic


@pytest.mark.slow
@pytest.mark.skipif(not CHECK_WIRED, reason="core/orchestrator.py does not call qpeft.distributed.check_shared_output_dir yet")
def test_two_nodes_without_a_shared_output_dir(tiny_config, tmp_path):
    """Each node its own output_dir: the run trains, rank 0 writes everything on its node and the
    summary says the folder is not shared; ``--resume`` is then refused on every node, in one
    line naming output_dir, before any weight is loaded."""
    cfgs = [_resume_config(tiny_config, tmp_path, "run"), _resume_config(tiny_config, tmp_path, "node1")]
    summary = run_qpeft(cfgs, tmp_path, "run", 2, cpu=True, nodes=2)
    assert summary["train_steps"] == 6
    assert any("is not shared by the nodes" in n for n in summary["notes"]), summary["notes"]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-6").is_dir() and (tmp_path / "run" / "adapter").is_dir()
    other = tmp_path / "node1"
    assert not (other / "adapter").exists() and not (other / "checkpoints").exists() and not (other / "summary.json").exists()

    out = run_qpeft(cfgs, tmp_path, "run", 2, cpu=True, nodes=2, args=["--resume"], ok=False)
    # every node says why, in one line naming its output_dir (the same path on real nodes)
    for folder in ("run", "node1"):
        assert f"error: output_dir: {tmp_path / folder} {NOT_SHARED} (rank 1 on " in out, out[-4000:]
    assert "loaded base" not in out
