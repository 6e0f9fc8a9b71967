"""The seed's QLoRA recipe, unsloth and qpeft's fast paths, on the same card, back to back.

Recipe, as users write it with transformers + peft + bitsandbytes: bitsandbytes NF4 + double
quantization + bf16 compute (or LLM.int8), ``prepare_model_for_kbit_training`` with gradient
checkpointing, peft LoRA r=16 (alpha 32, dropout 0.05) on all linear layers, AdamW lr 2e-4,
gradient clipping 1.0, batch 4 × 1024 tokens, trained by ``transformers.Trainer(bf16=True)``
(mixed precision, as the seed does): path ``recipe-nf4`` / ``recipe-int8``, the baseline of every
ratio. ``recipe-loop-nf4`` / ``recipe-loop-int8`` is the same recipe in a minimal loop under bf16
autocast (what the Trainer does underneath, without its overhead).

unsloth (path ``unsloth-nf4``, when unsloth imports; it is not a qpeft dependency): its documented
QLoRA path, ``FastLanguageModel.from_pretrained(load_in_4bit=True)`` + ``get_peft_model`` with
``use_gradient_checkpointing="unsloth"``, the same LoRA shape, optimizer and data, in a loop under
bf16 autocast. Its process alone gets ``$QPEFT_UNSLOTH_PATH`` prepended to ``sys.path`` (unsloth
patches transformers and peft on import, so no other path may import it).

qpeft: the same model, adapter, optimizer and data through qpeft's plugins (quantizer →
prepare_for_training → peft attach → ``native`` trainer), with qpeft's defaults on CUDA:
no float32 upcast of the frozen non-quantized weights, bf16 autocast, chunked cross-entropy,
non-reentrant checkpointing; for int8 the dequantize-then-matmul path.

    python benchmarks/seed_recipe.py --model DIR [--steps 12 --warmup 3] --out benchmarks/results

A qpeft path may name trainer options after "@" to measure a variant against the defaults:
``--paths recipe-nf4,qpeft-nf4,qpeft-nf4@liger=off,qpeft-nf4@compile=true+liger=off``. ``speedup_*`` in
the JSON is always the default path's (``qpeft-nf4``, ``qpeft-int8``); variants get their own rows.

``--lora-dropout`` sets the dropout of every path (unsloth's fast path wants 0); ``--batch`` and
``--seq`` the shape (``--batch 1 --seq 16384`` for long rows).

Each path runs in its own subprocess (so one path's memory peak never counts for another),
in the order of PATHS. Writes seed_recipe_<device>[_BxT].json and .md with tokens/s after
warm-up, peak allocated memory, MFU (4 × parameters FLOP per token against the card's dense bf16
peak), the ratios against the recipe and against unsloth, and the loss of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("recipe-nf4", "recipe-loop-nf4", "unsloth-nf4", "qpeft-nf4", "recipe-int8", "recipe-loop-int8", "qpeft-int8")
#: "cpu" only for a smoke test of this script on a tiny model (timings meaningless there).
DEVICE = os.environ.get("SEED_RECIPE_DEVICE", "cuda")
BATCH, SEQ = 4, 1024  # --batch / --seq
LORA_DROPOUT = 0.05  # --lora-dropout
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (the recipe's reference figures quote ~790 measured)


class _Profiler:
    """With --profile: torch.profiler over the steps after the first two; a kernel table."""

    def __init__(self, path: str | None, steps: int):
        self.path, self.steps, self.prof = path, steps, None

    def on_step(self, step: int) -> None:
        if not self.path:
            return
        import torch

        if step == 2:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
        elif step == self.steps and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)
            Path(self.path).write_text(f"steps 3..{self.steps}\n{table}\n")


PROFILER = _Profiler(None, 0)


def _batches(steps: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (BATCH, SEQ), generator=g) for _ in range(steps)]


def _recipe_model(model_dir: str, quant: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant == "nf4":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0 if DEVICE == "cuda" else "cpu"}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=LORA_DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def run_recipe(model_dir: str, quant: str, steps: int) -> dict:
    """The seed's recipe as written: ``transformers.Trainer(bf16=True, gradient_checkpointing=True)``."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = _recipe_model(model_dir, quant)
    load_s = time.perf_counter() - t0
    model.config.use_cache = False
    rows = [row for batch in _batches(steps, model.config.vocab_size) for row in batch]
    losses, marks = [], []

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            PROFILER.on_step(len(marks))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir="/tmp/seed-recipe-trainer",
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        bf16=True,
        gradient_checkpointing=True,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=DEVICE == "cpu",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Marks()])
    _reset_peak()
    start = time.perf_counter()
    trainer.train()
    return {"load_seconds": load_s, "losses": losses, "marks": marks, "start": start, "peak_mem_gib": _peak()}


def run_recipe_loop(model_dir: str, quant: str, steps: int) -> dict:
    """The same recipe in a minimal loop under bf16 autocast (the Trainer's mixed precision, without the Trainer)."""
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = _recipe_model(model_dir, quant)
    load_s = time.perf_counter() - t0
    model.config.use_cache = False
    model.train()
    return {"load_seconds": load_s, **_autocast_loop(model, steps)}


def _autocast_loop(model, steps: int) -> dict:
    """AdamW 2e-4 on the trainable parameters, bf16 autocast, gradients clipped at 1.0: the loop
    of ``recipe-loop-*`` and of unsloth's path; per-step losses, step-end marks, peak memory."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    _reset_peak()
    losses, marks = [], []
    start = time.perf_counter()
    for batch in _batches(steps, model.config.vocab_size):
        x = batch.to(DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs, so the mark below is the step's end
        marks.append(time.perf_counter())
        PROFILER.on_step(len(marks))
    return {"losses": losses, "marks": marks, "start": start, "peak_mem_gib": _peak()}


def run_unsloth(model_dir: str, steps: int) -> dict:
    """unsloth's documented QLoRA path (4-bit load, get_peft_model, its gradient checkpointing) in a bf16-autocast loop."""
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_compiled_cache")
    if os.environ.get("QPEFT_UNSLOTH_PATH"):
        sys.path[:0] = os.environ["QPEFT_UNSLOTH_PATH"].split(os.pathsep)
    import unsloth  # noqa: F401, I001  first, before torch/transformers/peft, so that its patches apply
    from unsloth import FastLanguageModel
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(
        model_name=os.path.abspath(model_dir), max_seq_length=SEQ, dtype=torch.bfloat16, load_in_4bit=True, local_files_only=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=LORA_DROPOUT,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        bias="none",
        use_gradient_checkpointing="unsloth",
    )
    load_s = time.perf_counter() - t0
    FastLanguageModel.for_training(model)
    return {"load_seconds": load_s, **_autocast_loop(model, steps), "version": getattr(unsloth, "__version__", None)}


def _reset_peak():
    """Before the first step of every path (after its imports: unsloth must come before torch)."""
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        if os.environ.get("QPEFT_MEM_CAP_GIB"):
            # benchmarks/max_context.py: emulate a card of this size (the caching allocator raises
            # an out-of-memory error beyond it; the loaded weights count)
            cap = float(os.environ["QPEFT_MEM_CAP_GIB"]) * 2**30
            torch.cuda.set_per_process_memory_fraction(min(cap / torch.cuda.get_device_properties(0).total_memory, 1.0))


def _peak() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


def _variant_options(spec: str) -> dict:
    """ "liger=off+compile=true" → {"liger": "off", "compile": True} (trainer options)."""
    out = {}
    for item in filter(None, spec.split("+")):
        key, _, value = item.partition("=")
        out[key] = {"true": True, "false": False}.get(value, value)
    return out


def run_qpeft(model_dir: str, quant: str, steps: int, variant: str = "") -> dict:
    import torch

    import qpeft
    from qpeft import orchestrator
    from qpeft.context import RunContext
    from qpeft.data import IGNORE
    from qpeft.modeling import kv_cache_off

    marks = []

    class Marks:
        @qpeft.hookimpl
        def qpeft_on_step_end(self, step, max_steps, logs, ctx):
            marks.append((time.perf_counter(), logs["loss"]))
            PROFILER.on_step(step)

    from qpeft.registry import load_registry

    cfg = {
        "model": {"name_or_path": model_dir, "dtype": "bfloat16", "device": DEVICE},
        "quantizer": {"name": "bnb-nf4" if quant == "nf4" else "bnb-8bit"},
        "peft": {"name": "lora", "options": {"r": 16, "alpha": 32, "dropout": LORA_DROPOUT}},
        "trainer": {
            "name": "native",
            "options": {
                "batch_size": BATCH,
                "max_steps": steps,
                "lr": 2e-4,
                "scheduler": "constant",
                "max_grad_norm": 1.0,
                "logging_steps": 1,
                **_variant_options(variant),
            },
        },
        "gradient_checkpointing": True,
        "data": {"max_length": SEQ},  # what the trainer plans memory for (keep_activations: auto)
        "output_dir": "/tmp/seed-recipe-qpeft",
        "evaluate": False,
    }
    resolved, registry = orchestrator.prepare(cfg, registry=load_registry([Marks()]))
    ctx = RunContext(config=resolved.config, device=DEVICE, dtype="bfloat16", output_dir=cfg["output_dir"], hooks=registry.hooks)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = resolved.quantizer.load(model_dir, resolved.quantizer_options, ctx, training=True)
    load_s = time.perf_counter() - t0
    model = resolved.quantizer.prepare_for_training(model, resolved.quantizer_options, ctx, grad_checkpointing=True)
    model = resolved.peft.attach(model, resolved.peft_options, ctx)
    data = [{"input_ids": b[i].tolist(), "labels": b[i].tolist()} for b in _batches(steps, model.config.vocab_size) for i in range(BATCH)]
    assert all(l != IGNORE for d in data for l in d["labels"])

    class Tok:  # random-token data needs only a pad id (never present: no padding)
        pad_token_id = -1

    # The trainer lays out data in a seeded order; give it exactly one step's worth per step in
    # the recipe's order by making the "epoch" the data itself (plan: steps × batch examples).
    from qpeft.data import ordered_examples

    order = ordered_examples(list(range(len(data))), resolved.config.seed, 1)
    data_in_order = [None] * len(data)
    for pos, idx in enumerate(order):
        data_in_order[idx] = data[pos]
    _reset_peak()
    marks.append((time.perf_counter(), None))  # training starts: the warm-up (and compile) time is measured from here
    with kv_cache_off(model):
        resolved.trainer.train(model, Tok(), data_in_order, [], resolved.trainer_options, ctx)
    return {
        "load_seconds": load_s,
        "losses": [l for _, l in marks[1:]],
        "marks": [t for t, _ in marks[1:]],
        "start": marks[0][0],
        "peak_mem_gib": _peak(),
        "optimisations": ["bf16 autocast", "non-reentrant gradient checkpointing", *ctx.notes],  # the run's own notes
    }


def _worker(args) -> None:
    global PROFILER, BATCH, SEQ, LORA_DROPOUT
    PROFILER = _Profiler(args.profile, args.steps)
    BATCH, SEQ, LORA_DROPOUT = args.batch, args.seq, args.lora_dropout
    name, _, variant = args.worker.partition("@")
    quant = name.rsplit("-", 1)[1]
    if name.startswith("recipe-loop"):
        res = run_recipe_loop(args.model, quant, args.steps)
    elif name.startswith("recipe"):
        res = run_recipe(args.model, quant, args.steps)
    elif name.startswith("unsloth"):
        res = run_unsloth(args.model, args.steps)
    else:
        res = run_qpeft(args.model, quant, args.steps, variant)
    Path(args.result).write_text(json.dumps(res))


def _summarise(name: str, res: dict, warmup: int, n_params: float, peak_tflops: float) -> dict:
    marks = res["marks"]
    t = marks[-1] - marks[warmup - 1]
    tps = BATCH * SEQ * (len(marks) - warmup) / t
    return {
        "path": name,
        "tokens_per_s": round(tps, 1),
        "step_seconds": round(t / (len(marks) - warmup), 4),
        "peak_mem_gib": round(res["peak_mem_gib"], 3),
        "mfu": round(tps * 4 * n_params / (peak_tflops * 1e12), 4),
        "load_seconds": round(res["load_seconds"], 1),
        "warmup_seconds": round(marks[warmup - 1] - res["start"], 1),  # the first steps, compile included
        "losses": [round(x, 5) for x in res["losses"]],
        **({"optimisations": res["optimisations"]} if "optimisations" in res else {}),
        **({"version": res["version"]} if res.get("version") else {}),
    }


def main() -> None:
    global BATCH, SEQ, LORA_DROPOUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Llama-2-7B-shaped model folder (benchmarks/make_random_model.py)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--lora-dropout", type=float, default=LORA_DROPOUT)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--append", action="store_true", help="keep the other paths of an existing report from the same card")
    ap.add_argument("--worker")
    ap.add_argument("--profile", help="with --worker: write a torch.profiler kernel table here")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.worker:
        return _worker(args)
    BATCH, SEQ, LORA_DROPOUT = args.batch, args.seq, args.lora_dropout

    import torch

    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    n_params = L * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h
    out = Path(args.out)
    tag = "h100" if "H100" in device else "".join(c for c in device.lower() if c.isalnum())[:16]
    if (BATCH, SEQ) != (4, 1024):
        tag += f"_{BATCH}x{SEQ}"
    entries = {}
    previous = out / f"seed_recipe_{tag}.json"
    if args.append and previous.is_file():  # paths measured by an earlier run on this card
        entries = {e["path"]: e for e in json.loads(previous.read_text())["paths"]}
    for name in args.paths.split(","):
        result = Path(f"/tmp/seed_recipe_{name}.json")
        result.unlink(missing_ok=True)
        if name.startswith("unsloth") and not _unsloth_available():
            entries[name] = {"path": name, "error": "skipped: unsloth is not installed (set QPEFT_UNSLOTH_PATH to where it is)"}
            print(f"== {name}: {entries[name]['error']}", flush=True)
            _write_report(entries, args, device, n_params, out, tag)
            continue
        cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--worker", name, "--result", str(result)]
        cmd += ["--batch", str(BATCH), "--seq", str(SEQ), "--lora-dropout", str(LORA_DROPOUT)]
        print(f"== {name}", flush=True)
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0 or not result.exists():
            entries[name] = {"path": name, "error": f"exit {proc.returncode}"}
            _write_report(entries, args, device, n_params, out, tag)
            continue
        entries[name] = _summarise(name, json.loads(result.read_text()), args.warmup, n_params, H100_BF16_TFLOPS)
        print(json.dumps({k: v for k, v in entries[name].items() if k != "losses"}), flush=True)
        _write_report(entries, args, device, n_params, out, tag)  # after every path: a run cut off keeps what ran


def _unsloth_available() -> bool:
    import importlib.util

    extra = [p for p in os.environ.get("QPEFT_UNSLOTH_PATH", "").split(os.pathsep) if p]
    saved = sys.path[:]
    sys.path[:0] = extra
    try:
        return importlib.util.find_spec("unsloth") is not None
    finally:
        sys.path[:] = saved


def _write_report(entries, args, device, n_params, out, tag) -> None:
    """Write seed_recipe_<tag>.json and .md for the paths measured so far."""

    def ratio(a, b, key):
        try:
            return round(entries[a][key] / entries[b][key], 3)
        except (KeyError, ZeroDivisionError):
            return None

    def loss_diff(a, b):
        try:
            return round(max(abs(x - y) / abs(y) for x, y in zip(entries[a]["losses"], entries[b]["losses"])), 5)
        except KeyError:
            return None

    report = {
        "device": device,
        "command": "python benchmarks/seed_recipe.py " + " ".join(a for a in sys.argv[1:] if a != "--append"),
        "model": {"path": args.model, "parameters": n_params, "batch": BATCH, "seq": SEQ},
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "peak_tflops_assumed": H100_BF16_TFLOPS,
        "lora_dropout": LORA_DROPOUT,
        "baseline": "recipe-*: transformers.Trainer(bf16=True), the seed's recipe as written",
        "speedup_nf4": ratio("qpeft-nf4", "recipe-nf4", "tokens_per_s"),
        "speedup_nf4_vs_unsloth": ratio("qpeft-nf4", "unsloth-nf4", "tokens_per_s"),
        "mem_ratio_nf4_vs_unsloth": ratio("qpeft-nf4", "unsloth-nf4", "peak_mem_gib"),
        "speedup_int8": ratio("qpeft-int8", "recipe-int8", "tokens_per_s"),
        "mem_ratio_nf4": ratio("qpeft-nf4", "recipe-nf4", "peak_mem_gib"),
        "mem_ratio_int8": ratio("qpeft-int8", "recipe-int8", "peak_mem_gib"),
        "max_rel_loss_diff_nf4": loss_diff("qpeft-nf4", "recipe-nf4"),
        "max_rel_loss_diff_int8": loss_diff("qpeft-int8", "recipe-int8"),
        # a variant ("qpeft-nf4@activation_offload=true") against its path's defaults, step by step
        "max_rel_loss_diff_variants": {k: loss_diff(k, k.split("@")[0]) for k in entries if "@" in k and k.split("@")[0] in entries},
        "paths": list(entries.values()),
    }
    out.mkdir(parents=True, exist_ok=True)
    order = {k: i for i, k in enumerate(PATHS)}  # recipe/qpeft pairs first, variants after their path
    entries = {k: entries[k] for k in sorted(entries, key=lambda k: (order.get(k.split("@")[0], 99), k))}
    report["paths"] = list(entries.values())
    (out / f"seed_recipe_{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Seed recipe vs qpeft on {device}",
        "",
        f"Command: `{report['command']}`. Model: Llama-2-7B shape, random weights ({n_params / 1e9:.2f} B parameters), "
        f"batch {BATCH} × {SEQ} tokens, LoRA dropout {LORA_DROPOUT}, {args.steps} steps, first {args.warmup} left out of timing. "
        "`recipe-*` is the seed's recipe as written (transformers.Trainer with bf16 mixed precision), the baseline of 'vs recipe'; "
        "`recipe-loop-*` the same in a minimal loop under bf16 autocast; `unsloth-nf4` unsloth's documented QLoRA path.",
        "",
        "| path | tokens/s | vs recipe | vs unsloth | step s | peak allocated GiB | MFU (4N FLOP/token) | load s | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries.values():
        if "error" in e:
            lines.append(f"| {e['path']} | {e['error']} | | | | | | | |")
            continue
        quant = e["path"].split("@")[0].rsplit("-", 1)[1]
        recipe = entries.get("recipe-" + quant, {})
        unsloth = entries.get("unsloth-" + quant, {})
        vs_unsloth = (
            f"{e['tokens_per_s'] / unsloth['tokens_per_s']:.2f}×"
            if unsloth.get("tokens_per_s") and not e["path"].startswith("unsloth")
            else ""
        )
        vs = f"{e['tokens_per_s'] / recipe['tokens_per_s']:.2f}×" if recipe.get("tokens_per_s") and e["path"] != "recipe-" + quant else ""
        lines.append(
            f"| {e['path']} | {e['tokens_per_s']:,.0f} | {vs} | {vs_unsloth} | {e['step_seconds']:.3f} | {e['peak_mem_gib']:.2f} | {100 * e['mfu']:.1f}% | {e['load_seconds']:.0f} | {e.get('warmup_seconds', '')} |"
        )
    # the summary lines of the pairs that ran (a run of variants alone has none)
    lines.append("")
    if report["speedup_nf4"] is not None:
        lines.append(f"qpeft NF4 vs the recipe: {report['speedup_nf4']}× the tokens/s at memory ratio {report['mem_ratio_nf4']}.")
    if report["speedup_nf4_vs_unsloth"] is not None:
        lines.append(
            f"qpeft NF4 vs unsloth: {report['speedup_nf4_vs_unsloth']}× the tokens/s at memory ratio {report['mem_ratio_nf4_vs_unsloth']}."
        )
    if report["speedup_int8"] is not None:
        lines.append(f"qpeft int8 vs the recipe: {report['speedup_int8']}× the tokens/s at memory ratio {report['mem_ratio_int8']}.")
    for quant in ("nf4", "int8"):
        if report[f"max_rel_loss_diff_{quant}"] is not None:
            lines.append(
                f"Largest relative difference of the per-step loss, qpeft vs recipe ({quant}): {report[f'max_rel_loss_diff_{quant}']}."
            )
    for k, v in report["max_rel_loss_diff_variants"].items():
        lines.append(f"Largest relative difference of the per-step loss, {k} vs {k.split('@')[0]}: {v}.")
    (out / f"seed_recipe_{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
