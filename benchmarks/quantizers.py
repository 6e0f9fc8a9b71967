"""The measured quantizer table (docs/quantizers.md): every quantizer on one model, each row from
qpeft's own code paths.

Default rows (the embedded SmolLM2-135M): weight memory, held-out perplexity (vs ``none``),
greedy generation tokens/s, quantization time (the quantizer's ``load``, the disk cache not
used), LoRA training tokens/s (``native`` trainer, or ``hf``), and the merge's max |Δlogit|
(``qpeft merge`` of the trained adapter), or why the quantizer is refused here.

``--rows 7b`` (a Llama-2-7B-shaped model from benchmarks/make_random_model.py, on a GPU): LoRA
r16/alpha32 on every linear layer, batch 4 × 1024 tokens as configs/bench/h100.yaml, training
tokens/s and peak memory; ``--steps`` optimizer steps, the first ``--warmup`` not timed.

Each finished row is appended to ``OUT/quantizers_<rows>_<device>.jsonl`` as it finishes, and a
row already there is not measured again (run the same command to resume); the JSON and Markdown
results are written from it at the end, and ``--docs`` renders the table into docs/quantizers.md
between its ``generated:quantizers-<rows>-<device>`` markers.

    python benchmarks/quantizers.py                      # CPU: embedded model, every quantizer
    python benchmarks/quantizers.py --device cuda --docs
    python benchmarks/quantizers.py --rows 7b --model runs/bench-assets/random-llama-2-7b \\
        --data runs/bench-assets/long_text --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write  # noqa: E402

ALL = "none,bnb-8bit,bnb-nf4,bnb-fp4,hqq,torchao-int8,torchao-float8,torchao-int4,awq,fp8,gptq"
#: Options that keep the calibration-based quantizers' one-time cost bounded (and that fit
#: SmolLM2's 576-wide layers: group 64).
OPTIONS = {
    "gptq": {"group_size": 64, "num_calibration_samples": 32, "calibration_max_length": 256},
    "awq": {"group_size": 64, "num_calibration_samples": 32, "calibration_max_length": 256},
}
OPTIONS_7B = {
    "gptq": {"group_size": 128, "num_calibration_samples": 8, "calibration_max_length": 256},
    "awq": {"group_size": 128, "num_calibration_samples": 8, "calibration_max_length": 256},
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "quantizers.md"


def _config(args, name: str) -> dict:
    opts = (OPTIONS_7B if args.rows == "7b" else OPTIONS).get(name, {})
    model = {"name_or_path": args.model_name, "device": args.device, "dtype": "auto", "quantized_cache": args.cache or True}
    if args.rows == "7b":
        data = {
            "path": f"{args.data}/train.jsonl",
            "val_path": f"{args.data}/val.jsonl",
            "format": "text",
            "max_length": 1024,
            "max_val_examples": 2,
        }
        train = {"batch_size": 4, "max_steps": args.steps, "lr": 1e-4, "scheduler": "constant"}
        peft = {"name": "lora", "options": {"r": 16, "alpha": 32}}
    else:
        data = {"path": "embedded:text", "max_length": args.max_length, "max_val_examples": None}
        train = {"batch_size": 2, "max_steps": args.steps, "lr": 2e-4, "scheduler": "constant"}
        peft = {"name": "lora", "options": {"r": 8, "alpha": 16}}
    return {
        "model": model,
        "quantizer": {"name": name, "options": opts},
        "peft": peft,
        "trainer": {"name": "hf", "options": train},
        "data": data,
        "gradient_checkpointing": args.rows == "7b",
        "output_dir": str(Path(args.work) / name),
        "evaluate": False,
    }


def _prepare(args, name: str, registry):
    """Resolved run for quantizer ``name``, with the native trainer when it refuses ``hf``."""
    from qpeft import orchestrator

    cfg = _config(args, name)
    if "hf" in registry.get("quantizer", name).capabilities.incompatible:
        cfg["trainer"]["name"] = "native"
    return orchestrator.prepare(cfg, registry=registry)[0]


def _train(resolved, registry, model, tok, ctx, warmup: int) -> dict:
    """LoRA on ``model``: ``warmup`` untimed steps, then the timed ones; tokens/s and peak memory."""
    from qpeft.data import load_datasets
    from qpeft.modeling import kv_cache_off, peak_memory_gib, reset_peak_memory

    data = load_datasets(resolved.config.data, tok)
    quant, peft, trainer = resolved.quantizer, resolved.peft, resolved.trainer
    model = quant.prepare_for_training(model, resolved.quantizer_options, ctx, grad_checkpointing=resolved.grad_checkpointing)
    model = peft.attach(model, resolved.peft_options, ctx)
    opts = resolved.trainer_options
    if warmup:
        with kv_cache_off(model):
            trainer.train(model, tok, data.train, data.val, opts.model_copy(update={"max_steps": warmup}), ctx)
    reset_peak_memory(ctx.device)
    with kv_cache_off(model):
        result = trainer.train(model, tok, data.train, data.val, opts, ctx)
    memory = peak_memory_gib(ctx.device)
    return {
        "model": model,
        "train_tokens_per_s": result.tokens_per_s,
        "train_steps": result.steps,
        "train_tokens": result.tokens,
        "train_loss": result.train_loss,
        "trainer": trainer.name,
        **{k: v for k, v in memory.items() if k.startswith("peak")},
    }


def _merge(resolved, registry, trained, work: Path) -> dict:
    """Save the trained adapter as ``qpeft run`` does and merge it with ``qpeft merge``."""
    from qpeft import capability_table, orchestrator

    support = capability_table.cell(resolved.quantizer, resolved.peft)
    if not support.merge:
        return {"merge": f"refused: {support.merge_reason}"}
    trainable, total = resolved.quantizer.count_parameters(trained, resolved.quantizer_options)
    summary = {
        "train_steps": 0,
        "train_loss": 0.0,
        "val_perplexity_before": None,
        "val_perplexity_after": None,
        "run_id": "bench",
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
    }
    adapter = work / "adapter"
    orchestrator.save_adapter(trained, resolved.peft, adapter, resolved, summary)
    result = orchestrator.merge(str(adapter), str(work / "merged"), registry, force=True)
    return {
        "merge_max_abs_logit_diff": result["max_abs_logit_diff"],
        "merge_source": result["merge_source"],
        # the quantized base's own distance from its full-precision weights, no adapter: the floor
        # of a reference that runs the quantized kernels (LLM.int8 also quantizes activations)
        "merge_floor_abs_logit_diff": result["base_path_diff"],
    }


def measure(args, name: str, registry, tok) -> dict:
    """One row (see the module docstring); a quantizer refused here gives ``{"refused": why}``."""
    import torch

    from qpeft import orchestrator, quantized_cache
    from qpeft.data import count_label_tokens, load_records, tokenize
    from qpeft.modeling import evaluate_perplexity, generate_text, weight_memory_gib

    try:
        resolved = _prepare(args, name, registry)
    except Exception as exc:  # noqa: BLE001 - the refusal is the row (CPU-only machine, missing package)
        return {"quantizer": name, "refused": str(exc).splitlines()[0][:300]}
    ctx = orchestrator._context(resolved, registry)
    ctx.tokenizer = tok
    quant, opts = resolved.quantizer, resolved.quantizer_options
    row = {"quantizer": name, "options": opts.model_dump(mode="json"), "device": resolved.device, "dtype": resolved.dtype}
    t0 = time.perf_counter()
    model = quant.load(args.model, opts, ctx, training=True)  # what the cache would otherwise skip
    row["quantize_s"] = time.perf_counter() - t0
    row["quantize_note"] = next((n for n in ctx.notes if "cached" in n or "from cache" in n), "")
    key = quantized_cache.cache_key(quant, args.model, opts, ctx)
    root = quantized_cache.cache_folder(ctx)
    if key is not None and root is not None and args.rows != "7b":  # the merge's loads read it back
        entry = quantized_cache.entry_dir(root, quant, key)
        if quantized_cache.verify_entry(entry, key) is not None:
            quantized_cache.write_entry(quant, model, entry, key, opts, ctx)
    row["weight_memory_gib"] = weight_memory_gib(model, quant, opts)
    if args.rows != "7b":
        _, val_rows, fmt = load_records(resolved.config.data)
        val = tokenize(val_rows, fmt, tok, args.max_length)
        model.eval()
        row["perplexity"] = evaluate_perplexity(model, val, tok.pad_token_id)["perplexity"]
        row["eval_tokens"] = count_label_tokens(val)
        generate_text(model, tok, "Write a short poem about the sea.", 8)  # warm-up
        row["gen_tokens_per_s"] = generate_text(model, tok, "Explain what a Python list is.", args.new_tokens)["tokens_per_s"]
        quant.ensure_training_kernels(model, opts)
    trained = _train(resolved, registry, model, tok, ctx, args.warmup)
    model = trained.pop("model")
    row.update(trained)
    if args.rows != "7b":
        model.eval()
        with tempfile.TemporaryDirectory(prefix=f"qpeft-bench-{name}-", dir=args.work) as tmp:
            try:
                row.update(_merge(resolved, registry, model, Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - recorded, the table goes on
                row["merge"] = f"failed: {str(exc).splitlines()[0][:300]}"
    row["notes"] = list(dict.fromkeys(ctx.notes))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def merge_floor(args, name: str, registry, tok) -> float:
    """What ``qpeft merge`` reports as ``base_path_diff``, for rows measured before it was
    recorded: max |Δlogit| of the quantized base (training kernels, no adapter) against the
    full-precision model the quantizer merges into, on the merge's probe sentence."""
    import torch

    from qpeft import orchestrator
    from qpeft.data import tokenize
    from qpeft.modeling import logits_for
    from qpeft.quantized_cache import load_base

    resolved = _prepare(args, name, registry)
    ctx = orchestrator._context(resolved, registry)
    quant, opts = resolved.quantizer, resolved.quantizer_options
    probe = tokenize([{"text": "The quick brown fox jumps over the lazy dog."}], "text", tok, 64)[0]
    model = load_base(quant, args.model, opts, ctx, training=True).eval()
    quantized = logits_for(model, probe, tok.pad_token_id)
    full = quant.full_precision_model(model, args.model, opts, ctx).to(torch.float32)
    return float((logits_for(full, probe, tok.pad_token_id) - quantized).abs().max())


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(rows: list[dict], rows_kind: str) -> str:
    """The docs table of ``rows``."""
    ref = next((r for r in rows if r["quantizer"] == "none" and "weight_memory_gib" in r), None)
    if rows_kind == "7b":
        lines = [
            "| quantizer | trainer | train tok/s | peak allocated (GiB) | weight memory (GiB) | quantization (s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "refused" in r:
                lines.append(f"| {r['quantizer']} | refused: {r['refused']} | | | | |")
                continue
            lines.append(
                f"| {r['quantizer']} | {r['trainer']} | {r['train_tokens_per_s']:,.0f} | {_fmt(r.get('peak_allocated_gib'), '.2f')} | "
                f"{r['weight_memory_gib']:.2f} | {r['quantize_s']:.1f} |"
            )
        return "\n".join(lines)
    lines = [
        "| quantizer | weight memory (GiB) | vs none | perplexity | vs none | gen tok/s | LoRA train tok/s | quantization (s) | merge max \\|Δlogit\\| |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['quantizer']} | refused: {r['refused']} | | | | | | | |")
            continue
        mem = r["weight_memory_gib"] / ref["weight_memory_gib"] if ref else None
        ppl = 100 * (r["perplexity"] / ref["perplexity"] - 1) if ref and r["quantizer"] != "none" else None
        merge = r.get("merge") or f"{r['merge_max_abs_logit_diff']:.1e} ({r['merge_source']})"
        if r.get("merge_floor_abs_logit_diff") is not None:
            merge += f"; floor {r['merge_floor_abs_logit_diff']:.1e}"
        lines.append(
            f"| {r['quantizer']} | {r['weight_memory_gib']:.3f} | {_fmt(mem, '.2f')} | {r['perplexity']:.2f} | "
            f"{'—' if ppl is None else f'{ppl:+.1f}%'} | {r['gen_tokens_per_s']:.1f} | {r['train_tokens_per_s']:.0f} | "
            f"{r['quantize_s']:.1f} | {merge} |"
        )
    return "\n".join(lines)


def render_docs(text: str, block: str, doc: Path = DOCS) -> None:
    """Replace what stands between ``<!-- generated:BLOCK -->`` and ``<!-- /generated:BLOCK -->``."""
    from qpeft.io import atomic_write_text

    content = doc.read_text(encoding="utf-8")
    start, end = f"<!-- generated:{block} -->", f"<!-- /generated:{block} -->"
    if start not in content:
        raise SystemExit(f"{doc} has no {start} marker")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(doc, f"{head}{start}\n{text}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantizers", default=ALL)
    ap.add_argument("--rows", choices=("embedded", "7b"), default="embedded")
    ap.add_argument("--model", default="smollm2", help="model.name_or_path (7b rows: the random Llama-2-7B folder)")
    ap.add_argument("--data", default="runs/bench-assets/long_text", help="7b rows: folder with train.jsonl and val.jsonl")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--max-length", type=int, default=256, help="tokens per training and held-out sequence (embedded rows)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: 4 embedded, 10 for 7b)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 embedded, 3 for 7b)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--cache", default=None, help="quantized-base cache folder (default: qpeft's)")
    ap.add_argument("--out", default=None, help=f"results folder (default {RESULTS})")
    ap.add_argument("--docs", action="store_true", help="render the table into docs/quantizers.md")
    args = ap.parse_args()
    args.steps = args.steps or (10 if args.rows == "7b" else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.rows == "7b" else 1)

    import torch

    from qpeft.model_source import resolve_model_path
    from qpeft.registry import load_registry
    from qpeft.tokenizer import load_tokenizer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    out = Path(args.out or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    args.work = tempfile.mkdtemp(prefix=f"qpeft-quantizers-{args.rows}-{device}-")  # adapters and merged models
    args.model_name, args.model = args.model, resolve_model_path(args.model)
    registry = load_registry()
    tok, _ = load_tokenizer(args.model)
    name = f"quantizers_{args.rows}_{device}"
    log = out / f"{name}.jsonl"
    done = {json.loads(l)["quantizer"]: json.loads(l) for l in log.read_text().splitlines() if l.strip()} if log.exists() else {}
    for q in args.quantizers.split(","):
        if q in done:
            print(f"{q}: already measured ({log})", flush=True)
            continue
        if q not in registry.backends["quantizer"]:
            row = {"quantizer": q, "refused": "not installed here"}
        else:
            row = measure(args, q, registry, tok)
        print(json.dumps(row, default=str), flush=True)
        with log.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        done[q] = row
    missing = [q for q, r in done.items() if "merge_max_abs_logit_diff" in r and "merge_floor_abs_logit_diff" not in r]
    for q in missing:
        done[q]["merge_floor_abs_logit_diff"] = merge_floor(args, q, registry, tok)
        print(f"{q}: merge floor {done[q]['merge_floor_abs_logit_diff']:.2e}", flush=True)
    if missing:
        from qpeft.io import atomic_write_text

        atomic_write_text(log, "".join(json.dumps(r, default=str) + "\n" for r in done.values()))
    rows = [done[q] for q in args.quantizers.split(",") if q in done]
    columns = ["quantizer", "trainer", "weight_memory_gib", "perplexity", "gen_tokens_per_s", "train_tokens_per_s"]
    columns += ["peak_allocated_gib", "quantize_s", "merge_max_abs_logit_diff", "merge_floor_abs_logit_diff", "merge", "refused"]
    payload = {"command": "python " + " ".join(sys.argv), "environment": environment(), "model": args.model, "rows_kind": args.rows}
    write(name, payload, rows, columns, out)
    if args.docs:
        env = payload["environment"]
        where = env.get("gpu") or f"{env['cpu_model']} ({env['cpu_isa']}, {env['cpu_threads']} threads)"
        head = (
            f"Measured on {where}; torch {env['torch']}, transformers {env['transformers']}, peft {env.get('peft')}. "
            f"Command: `{payload['command']}`; raw: `benchmarks/results/{name}.json`.\n\n"
        )
        render_docs(head + markdown(rows, args.rows), f"quantizers-{args.rows}-{device}")


if __name__ == "__main__":
    main()
