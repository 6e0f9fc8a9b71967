"""Per-quantizer table on the embedded SmolLM2-135M: weight memory, held-out perplexity,
load time, inference tokens/s. Writes benchmarks/results/quantizers_<device>.{json,md}.

    python benchmarks/quantizers.py [--quantizers none,bnb-8bit,bnb-nf4,bnb-fp4,gptq] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import environment, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantizers", default="none,bnb-8bit,bnb-nf4,bnb-fp4,gptq")
    ap.add_argument("--eval-set", default="embedded:text", help="held-out text: the val split of this set")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from qpeft import orchestrator
    from qpeft.config import load_config
    from qpeft.data import count_label_tokens, load_records, tokenize
    from qpeft.model_source import resolve_model_path
    from qpeft.modeling import evaluate_perplexity, generate_text, weight_memory_gib
    from qpeft.registry import load_registry
    from qpeft.tokenizer import load_tokenizer

    registry = load_registry()
    model_path = resolve_model_path("smollm2")
    tok, _ = load_tokenizer(model_path)
    rows = []
    for name in args.quantizers.split(","):
        if name not in registry.backends["quantizer"]:
            continue
        cfg = load_config(
            {
                "quantizer": name,
                "peft": "lora",
                "trainer": "hf",
                "data": {"path": args.eval_set, "max_val_examples": None, "max_length": args.max_length},
            }
        )
        try:
            resolved, _ = orchestrator.prepare(cfg, registry=registry)
        except Exception as exc:  # e.g. gptqmodel not installed on this machine
            rows.append({"quantizer": name, "error": str(exc)[:200]})
            continue
        ctx = orchestrator._context(resolved, registry)
        _, val_rows, fmt = load_records(cfg.data)
        val = tokenize(val_rows, fmt, tok, args.max_length)
        t0 = time.perf_counter()
        model = resolved.quantizer.load(model_path, resolved.quantizer_options, ctx, training=False)
        load_s = time.perf_counter() - t0
        ppl = evaluate_perplexity(model, val, tok.pad_token_id)
        generate_text(model, tok, "Write a short poem about the sea.", args.new_tokens)  # warm-up
        gen2 = generate_text(model, tok, "Explain what a Python list is.", args.new_tokens)
        rows.append(
            {
                "quantizer": name,
                "device": resolved.device,
                "dtype": resolved.dtype,
                "weight_memory_gib": weight_memory_gib(model),
                "perplexity": ppl["perplexity"],
                "eval_tokens": count_label_tokens(val),
                "load_s": load_s,
                "gen_tokens_per_s": gen2["tokens_per_s"],
            }
        )
        print(rows[-1], flush=True)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ref = next((r for r in rows if r["quantizer"] == "none" and "perplexity" in r), None)
    for r in rows:
        if ref and "perplexity" in r:
            r["ppl_vs_none_pct"] = 100 * (r["perplexity"] / ref["perplexity"] - 1)
            r["memory_vs_none"] = r["weight_memory_gib"] / ref["weight_memory_gib"]
    device = rows[0].get("device", "cpu") if rows else "cpu"
    write(
        f"quantizers_{device}",
        {
            "command": "python " + " ".join(sys.argv),
            "environment": environment(),
            "model": "SmolLM2-135M-Instruct (embedded)",
            "eval_set": args.eval_set + " (val split)",
        },
        rows,
        [
            "quantizer",
            "device",
            "dtype",
            "weight_memory_gib",
            "memory_vs_none",
            "perplexity",
            "ppl_vs_none_pct",
            "eval_tokens",
            "load_s",
            "gen_tokens_per_s",
            "error",
        ],
        args.out and __import__("pathlib").Path(args.out),
    )


if __name__ == "__main__":
    main()
