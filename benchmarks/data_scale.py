"""Data at scale: tokenizing a large corpus into a token store, and training from it.

For each corpus size (default 1M, 10M and 100M tokens of generated English-like text, JSONL),
two ``qpeft run``s on the embedded SmolLM2 (its real 49k tokenizer), each in a fresh process:

* **cold**: an empty token-store cache, so the run tokenizes the corpus first;
* **warm**: the same config again, mapping the store built by the cold run.

Measured: tokenization throughput (tokens/s, and per core), store size on disk, peak RSS of
the run's process (``summary.json``'s ``peak_rss_gib``: data, model load and training
together) and the largest RSS of a tokenizing worker process (sampled every 0.1 s), time from process start to the first
optimizer step, and the whole run's time.
The training part is short (``--steps``) and identical for every size, so any growth of the
peak RSS with the corpus comes from the data path.

    python benchmarks/data_scale.py                      # 1M, 10M, 100M tokens
    python benchmarks/data_scale.py --tokens 1e6 --tokens 1e7 --work /tmp/ds

Writes benchmarks/results/data_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write  # noqa: E402

CONFIG = """
model: {model}
quantizer: none
peft: {{name: lora, options: {{r: 8, target_modules: all-linear}}}}
trainer: {{name: native, options: {{max_steps: {steps}, batch_size: 1, lr: 1.0e-4, logging_steps: 1}}}}
data: {{path: {corpus}, format: text, max_length: 512, packing: true, max_val_examples: 4}}
evaluate: false
generate: {{max_new_tokens: 4}}
output_dir: {out}
"""


def make_corpus(path: Path, tokens: int, tok) -> int:
    """A JSONL corpus of about ``tokens`` tokens: paragraphs of 20–300 words drawn from the
    embedded Hamlet text's vocabulary (fixed seed; none longer than the 512-token rows they
    are packed into). Returns its row count."""
    from qpeft.data import EMBEDDED_DATA

    words = sorted({w for line in (EMBEDDED_DATA / "text_train.jsonl").open() for w in json.loads(line)["text"].split()})
    rng = random.Random(0)
    sample = [" ".join(rng.choices(words, k=rng.randint(20, 300))) for _ in range(200)]
    per_char = sum(len(tok(s)["input_ids"]) for s in sample) / sum(len(s) for s in sample)
    target_chars = tokens / per_char
    tmp = path.with_suffix(".tmp")
    chars = rows = 0
    with tmp.open("w") as f:
        while chars < target_chars:
            text = " ".join(rng.choices(words, k=rng.randint(20, 300)))
            f.write(json.dumps({"text": text}) + "\n")
            chars += len(text)
            rows += 1
    tmp.rename(path)
    return rows


class ChildRss(threading.Thread):
    """The largest RSS any child process (a tokenizing worker) had, sampled every 0.1 s from
    /proc (getrusage's children maxrss is no use here: a spawned child starts with its
    parent's high-water mark)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kib, self.stop = 0, False

    def run(self):
        me = os.getpid()
        while not self.stop:
            try:
                children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
            except OSError:
                children = []
            for pid in children:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                rss = next((int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:")), 0)
                self.peak_kib = max(self.peak_kib, rss)
            time.sleep(0.1)


def one_run(config: Path, result: Path) -> None:
    """Run the config in this process; write timings and the summary to ``result``."""
    t_start = time.perf_counter()
    from qpeft import hookimpl, orchestrator

    class FirstStep:
        at = None

        @hookimpl
        def qpeft_on_step_end(self, step, max_steps, logs, ctx):
            if self.at is None:
                self.at = time.perf_counter() - t_start

    first = FirstStep()
    lines = []

    def say(msg):
        lines.append((round(time.perf_counter() - t_start, 2), msg))
        print(f"[{lines[-1][0]:7.2f}s] {msg}", flush=True)

    resolved, registry = orchestrator.prepare(str(config))
    registry.pm.register(first)
    sampler = ChildRss()
    sampler.start()
    summary = orchestrator.run(resolved, registry, say=say)
    sampler.stop = True
    workers_gib = sampler.peak_kib / 2**20
    payload = {
        "seconds": time.perf_counter() - t_start,
        "first_step_s": first.at,
        "workers_peak_rss_gib": workers_gib,
        "summary": summary,
        "log": lines,
    }
    result.write_text(json.dumps(payload))


def measure(config: Path, cache: Path, result: Path) -> dict:
    env = {**os.environ, "QPEFT_CACHE": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run([sys.executable, __file__, "--one-run", str(config), str(result)], env=env, check=True)
    return json.loads(result.read_text())


def store_info(cache: Path) -> dict:
    stores = [p for p in (cache / "tokens").iterdir() if (p / "meta.json").is_file()]
    biggest = max(stores, key=lambda p: json.loads((p / "meta.json").read_text())["tokens"])
    meta = json.loads((biggest / "meta.json").read_text())
    meta["bytes"] = sum(f.stat().st_size for f in biggest.iterdir())
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", action="append", type=float, help="corpus sizes in tokens (repeat); default 1e6, 1e7, 1e8")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qpeft_data_scale"), help="corpora, caches and runs")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--name", default="data_scale")
    ap.add_argument("--corpus-only", action="store_true", help="write the corpora and stop")
    ap.add_argument("--one-run", nargs=2, type=Path, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_run:
        return one_run(*args.one_run)

    from qpeft.model_source import resolve_model_path
    from qpeft.tokenizer import load_tokenizer

    model = resolve_model_path("smollm2")  # the converted embedded model, outside the per-size caches
    tok, _ = load_tokenizer(model)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for tokens in args.tokens or [1e6, 1e7, 1e8]:
        label = f"{tokens / 1e6:g}M"
        corpus = args.work / f"corpus_{label}.jsonl"
        if not corpus.exists():
            t0 = time.perf_counter()
            n_rows = make_corpus(corpus, int(tokens), tok)
            print(
                f"corpus {corpus}: {n_rows:,} rows, {corpus.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f}s", flush=True
            )
        if args.corpus_only:
            continue
        cache = args.work / f"cache_{label}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        for phase in ("cold", "warm"):
            out = args.work / f"run_{label}_{phase}"
            config = args.work / f"config_{label}_{phase}.yaml"
            config.write_text(CONFIG.format(model=model, steps=args.steps, corpus=corpus, out=out))
            r = measure(config, cache, args.work / f"result_{label}_{phase}.json")
            meta = store_info(cache)
            s = r["summary"]
            row = {
                "corpus": label,
                "phase": phase,
                "corpus_mib": round(corpus.stat().st_size / 2**20, 1),
                "store_tokens": meta["tokens"],
                "store_documents": meta["documents"],
                "store_mib": round(meta["bytes"] / 2**20, 1),
                "tokenize_s": meta["seconds"] if phase == "cold" else None,
                "tokenize_workers": meta["workers"],
                "tokens_per_s": round(meta["tokens"] / meta["seconds"]) if phase == "cold" else None,
                "tokens_per_s_per_core": round(meta["tokens"] / meta["seconds"] / max(1, os.cpu_count() or 1)) if phase == "cold" else None,
                "first_step_s": round(r["first_step_s"], 1),
                "run_s": round(r["seconds"], 1),
                "peak_rss_gib": s.get("peak_rss_gib"),
                "worker_peak_rss_gib": round(r["workers_peak_rss_gib"], 3) if meta["workers"] and phase == "cold" else None,
                "train_loss": s.get("train_loss"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.corpus_only:
        return
    columns = [
        "corpus",
        "phase",
        "corpus_mib",
        "store_tokens",
        "store_mib",
        "tokenize_s",
        "tokens_per_s",
        "tokens_per_s_per_core",
        "first_step_s",
        "run_s",
        "peak_rss_gib",
        "worker_peak_rss_gib",
    ]
    payload = {"environment": environment(), "cpus": os.cpu_count(), "steps": args.steps, "config": CONFIG}
    print(write(args.name, payload, rows, columns))


if __name__ == "__main__":
    main()
