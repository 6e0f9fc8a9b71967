"""qpeft's overhead in training tokens/s: the same NF4 + LoRA + HF Trainer workload run as a
``qpeft bench`` cell and by a plain transformers + peft + bitsandbytes script, alternating (ABBA
order) in one run. By default both sides run in this process one after the other (the qpeft
side through :func:`qpeft.bench.cell_main`, the function a bench cell's process runs);
``--isolation process`` gives every run a fresh process (the qpeft side through ``qpeft bench``).
Writes ``benchmarks/results/overhead_<device>.{json,md}``.

    python benchmarks/bench_overhead.py [--model smollm2] [--steps 12] [--batch 4] [--max-length 128] [--repeats 3] [--threads 1]

Both sides see identical rows: long texts (benchmarks/make_long_text.py) cut to exactly
``--max-length`` tokens, so no row is padded. Both measure the same way: tokens seen between the
end of the warm-up steps (the first fifth, 1 to 10) and the last step, over the wall time (and
the process CPU time) between them, taken when the Trainer logs the step. The overhead is
``1 - qpeft / plain`` per adjacent pair. Three estimates are written, because a shared machine's
other processes move wall-clock tokens/s by far more than 5%: the median pairwise overhead, the
overhead between each side's best run (the least disturbed), and the overhead in process CPU
time per step, which other processes move much less (with ``--threads``, whose OpenMP threads
wait passively instead of spinning).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write

# ---------------------------------------------------------------------------- the plain script


def plain_run(spec: dict) -> dict:
    """The same workload with transformers + peft + bitsandbytes only (no qpeft code)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    cuda = spec["device"] == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    texts = [json.loads(line)["text"] for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    rows = [tok(t, truncation=True, max_length=spec["max_length"])["input_ids"] for t in texts]
    assert all(len(r) == spec["max_length"] for r in rows), "every row must be full"
    dataset = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in rows]

    model = AutoModelForCausalLM.from_pretrained(
        spec["model_path"],
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        ),
        dtype=dtype,
        device_map={"": 0} if cuda else {"": "cpu"},
        use_safetensors=True,
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=spec["grad_ckpt"], gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=0.0, target_modules="all-linear")
    )
    model.config.use_cache = False

    marks: list[tuple[int, float, float, int]] = []

    class Marks(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                marks.append((state.global_step, time.perf_counter(), time.process_time(), int(state.num_input_tokens_seen)))

    def collate(batch):
        return {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}

    args = TrainingArguments(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch"],
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        max_steps=spec["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=cuda,
        use_cpu=not cuda,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        optim="adamw_torch",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Marks()])
    trainer.train()
    skip = min(10, max(1, len(marks) // 5))
    (s0, t0, c0, k0), (s1, t1, c1, k1) = marks[skip - 1], marks[-1]
    return {
        "tokens_per_s_after_warmup": (k1 - k0) / (t1 - t0),
        "step_seconds_after_warmup": (t1 - t0) / (s1 - s0),
        "cpu_seconds_per_step_after_warmup": (c1 - c0) / (s1 - s0),
        "warmup_steps": s0,
        "train_tokens": k1,
    }


def plain_worker(spec_path: str) -> None:
    """``--plain-worker SPEC``: one plain run in this process, its result written where the spec says."""
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["result"]).write_text(json.dumps(plain_run(spec)))


def run_plain(spec: dict, tmp: Path, n: int, isolation: str) -> dict:
    """One plain run, in this process or a fresh one; its throughput after warm-up."""
    spec = {**spec, "output_dir": str(tmp / f"plain-{n}"), "result": str(tmp / f"plain-{n}.json")}
    if isolation == "inprocess":
        result = plain_run(spec)
        _release()
        return result
    path = tmp / f"plain-{n}-spec.json"
    path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--plain-worker", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"plain run failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(Path(spec["result"]).read_text()), "wall_seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- the qpeft cell


def _release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_qpeft(matrix_path: Path, tmp: Path, n: int, isolation: str) -> dict:
    """One qpeft bench cell; its metrics. ``process``: ``qpeft bench`` runs it in a fresh process;
    ``inprocess``: the cell's entry (:func:`qpeft.bench.cell_main`, what that process runs) is
    called here, its output sent to a log file."""
    import contextlib

    from qpeft import bench
    from qpeft.registry import load_registry

    if isolation == "inprocess":
        cell_dir = tmp / f"qpeft-{n}"
        (cell,) = bench.expand(bench.load_matrix(matrix_path), load_registry(), cell_dir)
        cell_dir.mkdir(parents=True, exist_ok=True)
        spec = {"cell": cell.id, "config": cell.config, "merge": False, "result": str(cell_dir / "result.json")}
        (cell_dir / "cell.json").write_text(json.dumps(spec))
        with open(cell_dir / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            rc = bench.cell_main([str(cell_dir / "cell.json")])
        if rc != 0:
            raise RuntimeError(f"qpeft cell failed (log: {cell_dir / 'log.txt'})")
        _release()
        return json.loads((cell_dir / "result.json").read_text())["metrics"]
    out = tmp / "qpeft-results"
    t0 = time.perf_counter()
    counts = bench.run_matrix(matrix_path, out_dir=out, rerun=["*"])
    record = bench.read_records(out)[-1]
    if counts["ok"] != 1 or record["status"] != "ok":
        raise RuntimeError(f"qpeft cell failed: {record.get('error')} (log: {out / record.get('log', '')})")
    return {**record["metrics"], "wall_seconds": time.perf_counter() - t0}


def main() -> None:
    """Command line: alternate qpeft and plain runs; write JSON + Markdown."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plain-worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2", help="smollm2 (embedded) or a local model folder")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (qpeft + plain)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument(
        "--isolation",
        choices=["inprocess", "process"],
        default="inprocess",
        help="alternate both sides in this process (default) or run each in a fresh process",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads per run (OMP_NUM_THREADS, passive OpenMP waiting); default: torch's"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        # Spinning OpenMP threads make a run on a shared machine several times slower whenever
        # another process wants the same cores; passive waiting keeps CPU time meaningful.
        os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    if args.plain_worker:
        plain_worker(args.plain_worker)
        return

    import torch
    import yaml

    from qpeft.model_source import resolve_model_path

    sys.path.insert(0, os.path.dirname(__file__))
    import make_long_text

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_path = resolve_model_path(args.model)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qpeft-overhead-") as tmpdir:
        tmp = Path(tmpdir)
        n_rows = args.steps * args.batch
        data = Path(make_long_text.build(model_path, tmp / "data", min_tokens=args.max_length, n_train=n_rows, n_val=2)) / "train.jsonl"
        spec = {
            "model_path": model_path,
            "device": device,
            "data": str(data),
            "max_length": args.max_length,
            "batch": args.batch,
            "steps": args.steps,
            "r": args.r,
            "grad_ckpt": args.grad_ckpt,
        }
        matrix = {
            "name": "overhead",
            "base": {
                "model": {"name_or_path": model_path, "device": device, "dtype": "bfloat16" if device == "cuda" else "float32"},
                # upcast: the plain script's prepare_model_for_kbit_training casts the frozen
                # non-quantized weights to float32; qpeft keeps them in bf16 unless told (a speed-up
                # of its own, measured in seed_recipe.py), which would not be overhead
                "quantizer": {"name": "bnb-nf4", "options": {"double_quant": True, "compute_dtype": "auto", "upcast_non_quantized": True}},
                "peft": {"name": "lora", "options": {"r": args.r, "alpha": 2 * args.r, "dropout": 0.0}},
                "trainer": {
                    "name": "hf",
                    "options": {"batch_size": args.batch, "max_steps": args.steps, "lr": 2e-4, "scheduler": "constant", "logging_steps": 1},
                },
                "data": {"path": str(data), "format": "text", "max_length": args.max_length, "max_val_examples": 1},
                "gradient_checkpointing": args.grad_ckpt,
                "evaluate": False,
                "generate": {"max_new_tokens": 1, "chat_template": False},
            },
            "axes": {"quantizer.name": ["bnb-nf4"]},
            "merge": False,
        }
        matrix_path = tmp / "matrix.yaml"
        matrix_path.write_text(yaml.safe_dump(matrix, sort_keys=False))
        for rep in range(args.repeats):
            # ABBA: qpeft first in even pairs, plain first in odd ones, so drift cancels out
            order = ("qpeft", "plain") if rep % 2 == 0 else ("plain", "qpeft")
            pair = {}
            for side in order:
                pair[side] = (
                    run_qpeft(matrix_path, tmp, rep, args.isolation) if side == "qpeft" else run_plain(spec, tmp, rep, args.isolation)
                )
                print(side, rep, round(pair[side]["tokens_per_s_after_warmup"], 2), flush=True)
            q, p = pair["qpeft"]["tokens_per_s_after_warmup"], pair["plain"]["tokens_per_s_after_warmup"]
            qc, pc = pair["qpeft"]["cpu_seconds_per_step_after_warmup"], pair["plain"]["cpu_seconds_per_step_after_warmup"]
            rows.append(
                {
                    "pair": rep,
                    "order": "/".join(order),
                    "qpeft_tokens_per_s": q,
                    "plain_tokens_per_s": p,
                    "overhead_pct": 100 * (1 - q / p),
                    "qpeft_step_s": pair["qpeft"]["step_seconds_after_warmup"],
                    "plain_step_s": pair["plain"]["step_seconds_after_warmup"],
                    "qpeft_cpu_s_per_step": qc,
                    "plain_cpu_s_per_step": pc,
                    "cpu_overhead_pct": 100 * (1 - pc / qc),
                    "train_tokens": pair["plain"]["train_tokens"],
                    "qpeft_train_tokens": pair["qpeft"]["train_tokens"],
                }
            )
    summary = {
        # wall clock, pair by pair (the two runs of a pair are next to each other in time)
        "median_overhead_pct": statistics.median(r["overhead_pct"] for r in rows),
        # wall clock, each side's best run: the least disturbed by other processes
        "best_run_overhead_pct": 100 * (1 - max(r["qpeft_tokens_per_s"] for r in rows) / max(r["plain_tokens_per_s"] for r in rows)),
        # process CPU time per step (all threads), pair by pair: barely moved by other processes
        "median_cpu_time_overhead_pct": statistics.median(r["cpu_overhead_pct"] for r in rows),
        "mean_qpeft_tokens_per_s": statistics.mean(r["qpeft_tokens_per_s"] for r in rows),
        "mean_plain_tokens_per_s": statistics.mean(r["plain_tokens_per_s"] for r in rows),
    }
    summary["overhead_of_means_pct"] = 100 * (1 - summary["mean_qpeft_tokens_per_s"] / summary["mean_plain_tokens_per_s"])
    print(json.dumps(summary), flush=True)
    name = f"overhead_{device}"
    path = write(
        name,
        {
            "command": "python " + " ".join(sys.argv),
            "environment": environment(),
            "model": args.model,
            "workload": {k: v for k, v in spec.items() if k not in ("model_path", "data")}
            | {
                "quantizer": "bnb-nf4 (double quant)",
                "trainer": "hf",
                "lora": f"r{args.r} alpha{2 * args.r} all-linear",
                "isolation": args.isolation,
                "threads": args.threads or "torch default",
            },
            "summary": summary,
        },
        rows,
        [
            "pair",
            "order",
            "qpeft_tokens_per_s",
            "plain_tokens_per_s",
            "overhead_pct",
            "qpeft_step_s",
            "plain_step_s",
            "qpeft_cpu_s_per_step",
            "plain_cpu_s_per_step",
            "cpu_overhead_pct",
            "train_tokens",
            "qpeft_train_tokens",
        ],
        args.out and Path(args.out),
    )
    md = path.with_suffix(".md")
    md.write_text(md.read_text() + "\n" + "\n".join(f"* {k}: {v:.2f}" for k, v in summary.items()) + "\n")


if __name__ == "__main__":
    main()
