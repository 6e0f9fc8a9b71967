"""qpeft's ``dpo`` trainer vs TRL's ``DPOTrainer`` used directly, same settings, one process per
path (alternating, ``--repeats`` times). Writes benchmarks/results/dpo_vs_trl_<device>.{json,md}.

Both paths train LoRA (r, alpha, every linear layer but the head) on the same rendered preference
rows (qpeft's embedded set, or ``--data``) with the same DPOConfig (batch, steps, lr, max_length,
beta, precision, no gradient checkpointing unless ``--grad-ckpt``); the quantization is bnb NF4
(double quant, compute in the run dtype) or none. Measured around ``trainer.train()``: seconds,
TRL's non-padding input tokens per second, peak memory (CUDA allocated/reserved, else the
process's peak RSS).

    python benchmarks/dpo_vs_trl.py --model smollm2 --quant none --steps 8            # CPU
    python benchmarks/dpo_vs_trl.py --model runs/bench-assets/random-llama-2-7b --quant nf4 \\
        --steps 30 --batch 4 --max-length 1024 --repeats 2                           # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write  # noqa: E402


def _peak() -> dict:
    import resource

    import torch

    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available():
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return out


def run_qpeft(a: dict) -> dict:
    from qpeft import orchestrator

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "model": {"name_or_path": a["model"], "device": a["device"]},
            "quantizer": {"name": "bnb-nf4", "options": {"double_quant": True}} if a["quant"] == "nf4" else "none",
            "peft": {"name": "lora", "options": {"r": a["r"], "alpha": 2 * a["r"], "dropout": 0.0, "target_modules": "all-linear"}},
            "trainer": {
                "name": "dpo",
                "options": {
                    "batch_size": a["batch"],
                    "max_steps": a["steps"],
                    "lr": 5e-5,
                    "scheduler": "constant",
                    "logging_steps": 1,
                    "beta": 0.1,
                },
            },
            "data": {"path": a["data"], "max_length": a["max_length"], "max_val_examples": 1},
            "output_dir": tmp,
            "evaluate": False,
            "gradient_checkpointing": a["grad_ckpt"],
            "generate": {"max_new_tokens": 1},
        }
        resolved, registry = orchestrator.prepare(cfg)
        s = orchestrator.run(resolved, registry)
    # The peak of the training phase (qpeft resets it after loading), as the TRL path measures it.
    peak = {k: round(s[k], 3) for k in ("peak_allocated_gib", "peak_reserved_gib", "peak_rss_gib") if s.get(k) is not None}
    return {
        "train_seconds": s["train_seconds"],
        "tokens": s["train_tokens"],
        "loss": s["train_loss"],
        "metrics": s.get("objective_metrics"),
        "reload_max_abs_logit_diff": s.get("reload_max_abs_logit_diff"),
        **_peak(),
        **peak,
    }


def run_trl(a: dict) -> dict:
    """TRL as its documentation shows it: from_pretrained (+ BitsAndBytesConfig), a LoraConfig
    passed as peft_config, DPOTrainer; the rows are qpeft's rendered ones (the same data)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    from qpeft.config import DataConfig
    from qpeft.data.objectives import load_objective_data
    from qpeft.model_source import resolve_model_path

    path = resolve_model_path(a["model"])
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = tok.eos_token if tok.pad_token is None else tok.pad_token
    rows = load_objective_data(DataConfig(path=a["data"], max_length=a["max_length"], max_val_examples=1), "preference", tok).train
    cuda = a["device"] == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        if a["quant"] == "nf4"
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant, device_map={"": 0} if cuda else None)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=a["batch"],
        max_steps=a["steps"],
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        beta=0.1,
        max_length=a["max_length"],
        save_strategy="no",
        report_to=[],
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=a["grad_ckpt"],
        disable_tqdm=True,
        seed=0,
        include_num_input_tokens_seen="non_padding",
    )
    lora = LoraConfig(r=a["r"], lora_alpha=2 * a["r"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, peft_config=lora)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    return {
        "train_seconds": round(seconds, 2),
        "tokens": int(trainer.state.num_input_tokens_seen),
        "loss": float(out.training_loss),
        **_peak(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quant", choices=["none", "nf4"], default="none")
    ap.add_argument("--data", default="embedded:preference")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: qpeft or trl, args as JSON
    args = ap.parse_args()
    if args.one:
        a = json.loads(args.one)
        result = (run_qpeft if a["path"] == "qpeft" else run_trl)(a)
        print("@result " + json.dumps(result))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = {
        "model": args.model,
        "quant": args.quant,
        "data": args.data,
        "steps": args.steps,
        "batch": args.batch,
        "max_length": args.max_length,
        "r": args.r,
        "grad_ckpt": args.grad_ckpt,
        "device": device,
    }
    rows = []
    for rep in range(args.repeats):
        for path in ("trl", "qpeft"):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps({**base, "path": path})], capture_output=True, text=True, check=False
            )
            line = next((l for l in proc.stdout.splitlines() if l.startswith("@result ")), None)
            if line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{path} failed (exit {proc.returncode})")
            r = json.loads(line.removeprefix("@result "))
            r.update(path=path, repeat=rep, tokens_per_s=round(r["tokens"] / r["train_seconds"], 1) if r["train_seconds"] else None)
            print(json.dumps(r), flush=True)
            rows.append(r)
            out, payload = _write(args, base, device, rows)  # after every run: a stopped benchmark keeps what it measured
    print(
        f"wrote {out}; qpeft overhead {payload['qpeft_overhead_percent']}% in tokens/s, "
        f"{payload['qpeft_time_overhead_percent']}% in training time (best of {args.repeats})"
    )


def _write(args, base: dict, device: str, rows: list[dict]):
    paths = [p for p in ("trl", "qpeft") if any(r["path"] == p for r in rows)]
    best = {p: max(r["tokens_per_s"] for r in rows if r["path"] == p) for p in paths}
    # Same rows, same steps: the training time is the like-for-like measure (the token counts
    # come from each path's own counter).
    fastest = {p: min(r["train_seconds"] for r in rows if r["path"] == p) for p in paths}
    both = len(paths) == 2
    payload = {
        "command": " ".join(sys.argv),
        "environment": environment(),
        "settings": base,
        "best_tokens_per_s": best,
        "best_train_seconds": fastest,
        "qpeft_overhead_percent": round(100 * (best["trl"] / best["qpeft"] - 1), 2) if both else None,
        "qpeft_time_overhead_percent": round(100 * (fastest["qpeft"] / fastest["trl"] - 1), 2) if both else None,
    }
    columns = [
        "path",
        "repeat",
        "train_seconds",
        "tokens",
        "tokens_per_s",
        "loss",
        "peak_rss_gib",
        "peak_allocated_gib",
        "peak_reserved_gib",
    ]
    out = write(f"dpo_vs_trl_{device}", payload, rows, columns + ["reload_max_abs_logit_diff"], Path(args.out) if args.out else None)
    return out, payload


if __name__ == "__main__":
    main()
