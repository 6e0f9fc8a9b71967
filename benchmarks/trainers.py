"""hf vs native trainer tokens/s on the same run (embedded SmolLM2-135M, LoRA r16 all-linear),
alternating trainers so both see the same machine state. Writes
benchmarks/results/trainers_<device>.{json,md}.

    python benchmarks/trainers.py [--quantizers bnb-nf4,none] [--steps 30] [--batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import environment, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantizers", default="bnb-nf4,none")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from qpeft import orchestrator
    from qpeft.registry import load_registry

    registry = load_registry()
    rows = []
    for quantizer in args.quantizers.split(","):
        for rep in range(args.repeats):
            for trainer in ("hf", "native"):
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = {
                        "quantizer": quantizer,
                        "peft": {"name": "lora", "options": {"r": 16, "alpha": 32}},
                        "trainer": {
                            "name": trainer,
                            "options": {"batch_size": args.batch, "max_steps": args.steps, "lr": 2e-4, "logging_steps": 5},
                        },
                        "data": {"path": "embedded:text", "max_length": args.max_length, "max_val_examples": 4},
                        "evaluate": False,
                        "output_dir": tmp,
                        "generate": {"max_new_tokens": 8},
                    }
                    resolved, reg = orchestrator.prepare(cfg, registry=registry)
                    s = orchestrator.run(resolved, reg)
                rows.append(
                    {
                        "quantizer": quantizer,
                        "trainer": trainer,
                        "repeat": rep,
                        "device": s["device"],
                        "tokens_per_s": s["tokens_per_s"],
                        "train_seconds": s["train_seconds"],
                        "train_tokens": s["train_tokens"],
                        "train_loss": s["train_loss"],
                        "grad_ckpt": s["gradient_checkpointing"],
                        **{k: v for k, v in s.items() if k.startswith("peak_")},
                    }
                )
                print(rows[-1], flush=True)
    device = rows[0]["device"]
    write(
        f"trainers_{device}",
        {"command": "python " + " ".join(sys.argv), "environment": environment(), "model": "SmolLM2-135M-Instruct (embedded)"},
        rows,
        [
            "quantizer",
            "trainer",
            "repeat",
            "device",
            "tokens_per_s",
            "train_seconds",
            "train_tokens",
            "train_loss",
            "grad_ckpt",
            "peak_allocated_gib",
            "peak_rss_gib",
        ],
        args.out and __import__("pathlib").Path(args.out),
    )


if __name__ == "__main__":
    main()
