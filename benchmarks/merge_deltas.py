"""Merge Δ for every mergeable cell on the embedded SmolLM2-135M: train LoRA a few steps on
each quantizer, merge into full-precision weights, report max |Δlogit| against the adapter on
its quantized base. Writes benchmarks/results/merge_deltas_<device>[_<cpu family>].{json,md}.

    python benchmarks/merge_deltas.py [--steps 4] [--quantizers none,bnb-8bit,bnb-4bit,bnb-nf4,bnb-fp4,gptq]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import cpu_isa, environment, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quantizers", default=None, help="default: every quantizer whose LoRA cell is mergeable")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from qpeft import capability_table, orchestrator
    from qpeft.registry import load_registry

    registry = load_registry()
    cells = [c for c in capability_table.table(registry) if c.peft == "lora" and c.merge]
    wanted = args.quantizers.split(",") if args.quantizers else [c.quantizer for c in cells]
    rows = []
    for cell in cells:
        if cell.quantizer not in wanted:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {
                "quantizer": cell.quantizer,
                "peft": "lora",
                "trainer": {"name": "hf", "options": {"batch_size": 4, "max_steps": args.steps, "lr": 1e-3}},
                "data": {"path": "embedded:instruct", "max_length": 128, "max_val_examples": 2},
                "evaluate": False,
                "output_dir": tmp,
                "generate": {"max_new_tokens": 4},
            }
            try:
                resolved, reg = orchestrator.prepare(cfg, registry=registry)
                s = orchestrator.run(resolved, reg)
                m = orchestrator.merge(f"{tmp}/adapter", f"{tmp}/merged", registry)
            except Exception as exc:
                rows.append({"quantizer": cell.quantizer, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
        rows.append(
            {
                "quantizer": cell.quantizer,
                "peft": "lora",
                "device": s["device"],
                "dtype": s["dtype"],
                "merge_source": m["merge_source"],
                "merged_dtype": m["dtype"],
                "max_abs_logit_diff": m["max_abs_logit_diff"],
                "base_path_diff": m["base_path_diff"],
                "reload_max_abs_logit_diff": s["reload_max_abs_logit_diff"],
            }
        )
        print(rows[-1], flush=True)
    device = next((r["device"] for r in rows if "device" in r), "cpu")
    write(
        f"merge_deltas_{device}" + (f"_{cpu_isa()}" if device == "cpu" else ""),
        {
            "command": "python " + " ".join(sys.argv),
            "environment": environment(),
            "model": "SmolLM2-135M-Instruct (embedded)",
            "probe": "max |Δlogit| over the vocabulary on 'The quick brown fox jumps over the lazy dog.'",
        },
        rows,
        [
            "quantizer",
            "peft",
            "device",
            "dtype",
            "merge_source",
            "merged_dtype",
            "max_abs_logit_diff",
            "base_path_diff",
            "reload_max_abs_logit_diff",
            "error",
        ],
        args.out and __import__("pathlib").Path(args.out),
    )


if __name__ == "__main__":
    main()
